"""Ingest: bring labelled tiles from one or several sources into the canonical raw layout under ``paths.raw``.

Sources (``ingest.source``, one or a list): ``synthetic``; a local folder of class folders at any depth
(EuroSAT_MS, EuroSATallBands, a plain folder per class); a .csv/.parquet manifest; the same behind ``s3://``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

import pandas as pd
import rasterio
from tqdm import tqdm

from geoclip.bands import ALL_BAND_NAMES
from geoclip.config import Params
from geoclip.data import s3
from geoclip.data.confine import refuse_outside
from geoclip.data.product_reader import ReadOptions, write_stacked
from geoclip.data.tiles import (
    BANDS_FILE,
    LABELS_FILE,
    MANIFEST_SUFFIXES,
    TIFF_SUFFIXES,
    band_descriptions,
    discover_tiles,
    layout_tiles,
    read_manifest,
    record_written,
    refuse_unwritten,
)
from geoclip.errors import GeoclipError
from geoclip.ioutils import atomic_dir, write_json

SPLITS = ("train", "val", "test")
CORE_COLUMNS = ("id", "path", "class", "split", "source", "source_path")
SYNTHETIC = "synthetic"


def ingest(params: Params) -> dict:
    """Write ``tiles/<Class>/<id>.tif``, ``labels.csv`` and ``bands.json`` under ``paths.raw``; return a summary.

    The raw folder is only ever replaced as a whole, by a successful ingest (as a DVC stage output is):
    everything is written to a temporary folder beside it and swapped in at the end, so a failure leaves
    the previous ``paths.raw`` untouched and no partial data. Only a folder ingest wrote itself is replaced:
    a file it did not write (one not listed in its ``ingest.json``) is refused, never deleted. Tiles of a folder
    source get the id ``<Class>_<stem>`` (the stem alone when it already starts with ``<Class>_``, as EuroSAT's do);
    manifest tiles keep their ``id`` column, else the file stem. With several sources every id is prefixed with
    its source's name (``eurosat_ms_train-AnnualCrop_12``) and ``labels.csv`` names each tile's ``source``.
    Every tile is checked to be a raster with the expected band names (a local one before it is copied); a tile
    whose pixels repeat a tile of an earlier source is kept once (see :func:`drop_repeated_tiles`).
    """
    cfg, start = params.ingest, time.perf_counter()
    sources = cfg.sources()
    if sources == [SYNTHETIC]:
        return _ingest_synthetic(params, start)
    if cfg.workers < 1:
        raise GeoclipError(f"ingest.workers: {cfg.workers}; expected at least 1")
    raw, several = Path(params.paths.raw), len(sources) > 1
    names = source_names(sources)
    # Every source is listed and checked before anything is written: a missing one fails the run, not half of it.
    prefix = {src: names[src] + "-" if several else "" for src in sources}
    listed = {src: _listed(src, raw, params, prefix[src]) for src in sources if src != SYNTHETIC}
    _check_split_columns(listed, SYNTHETIC in sources)
    if SYNTHETIC in sources:
        _require_synthetic_band_order(params)
    synthetic = params.paths.synthetic_dir()
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(raw, check=refuse_unwritten))
        parts = []
        if SYNTHETIC in sources:
            parts.append(_write_synthetic(tmp, stack.enter_context(atomic_dir(synthetic, check=refuse_unwritten)),
                                          params, prefix[SYNTHETIC]))
        for src, (tiles, labels) in listed.items():
            # Pixel digests find repeats across sources: one source alone skips the extra read of every tile.
            digests = _fetch_all(tiles["path"].tolist(), [tmp / p for p in labels["path"]], labels["class"].tolist(),
                                 list(cfg.band_names), cfg.workers, digest=several)
            parts.append(labels.assign(source=src, _digest=digests))
        labels, dropped = drop_repeated_tiles(pd.concat(parts, ignore_index=True), tmp)
        labels = labels[[c for c in labels.columns if c not in ("source", "source_path")]
                        + [c for c in ("source", "source_path") if c in labels.columns]]
        labels.to_csv(tmp / LABELS_FILE, index=False)
        write_json(tmp / BANDS_FILE, {"band_names": list(cfg.band_names)})
        record_written(tmp)
    # The synthetic scenes are another folder: left as they are (a DVC output of this stage, so it must exist).
    synthetic.mkdir(parents=True, exist_ok=True)
    return _summary(params, labels, start) | {"repeated_tiles_dropped": dropped}


def source_names(sources: list[str]) -> dict[str, str]:
    """A short file-name-safe name per source (``synthetic``, a folder's or manifest's name, an S3 prefix's last
    part), made unique with ``-2``, ``-3``... in list order; used as the tiles' id prefix when sources are mixed."""
    names: dict[str, str] = {}
    for src in sources:
        base = SYNTHETIC if src == SYNTHETIC else Path(src.rstrip("/")).stem or "source"
        base = re.sub(r"[^A-Za-z0-9_.]+", "_", base).lstrip(".") or "source"
        name, n = base, 1
        while name in names.values():
            n += 1
            name = f"{base}-{n}"
        names[src] = name
    return names


def _listed(src: str, raw: Path, params: Params, id_prefix: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One non-synthetic source's tiles (where they are) and labels (where they go), ids prefixed."""
    tiles, is_manifest = _list_source(src, raw, params.ingest.allow_outside_paths)
    labels = _labels(tiles, src, is_manifest, [*params.classes.names, *params.classes.concepts])
    labels["source_path"] = tiles["path"].to_numpy()  # provenance: where each tile was ingested from
    if id_prefix:
        labels["id"] = id_prefix + labels["id"]
        labels["path"] = [f"tiles/{c}/{i}.tif" for c, i in zip(labels["class"], labels["id"])]
    return tiles, labels


def _check_split_columns(listed: dict[str, tuple[pd.DataFrame, pd.DataFrame]], synthetic: bool) -> None:
    """Splits come from every source's manifest or from none: prepare cannot split half a dataset."""
    given = {src: "split" in labels.columns for src, (_, labels) in listed.items()} | (
        {SYNTHETIC: False} if synthetic else {})
    if len(set(given.values())) > 1:
        with_split, without = [s for s, g in given.items() if g], [s for s, g in given.items() if not g]
        raise GeoclipError(f"ingest.source: {with_split} give a split column but {without} do not; give every "
                           f"source's tiles a split, or none (prepare then splits them all)")


def _write_synthetic(tmp: Path, tmp_scenes: Path, params: Params, id_prefix: str) -> pd.DataFrame:
    """Generate the synthetic tiles into ``tmp`` (and scenes into ``tmp_scenes``) as one source of a mix."""
    from geoclip.data.synth import write_synthetic

    labels, _ = write_synthetic(tmp, tmp_scenes, params, id_prefix)
    record_written(tmp_scenes)
    return labels.assign(source=SYNTHETIC)


def drop_repeated_tiles(labels: pd.DataFrame, root: Path) -> tuple[pd.DataFrame, int]:
    """Keep one of the tiles of different sources with the same pixels (``_digest``; synthetic rows have none): the
    first source's; delete the repeats' copies under ``root``. A repeat with another class is refused, naming both.

    Repeats inside one source are the source's own business: prepare refuses them if they land in two splits.
    """
    seen = labels.dropna(subset=["_digest"]) if "_digest" in labels.columns else labels.iloc[:0].assign(_digest="")
    first_source = seen.groupby("_digest")["source"].transform("first")
    repeat = seen["source"] != first_source
    first = seen[~repeat].drop_duplicates("_digest").set_index("_digest")
    for i in seen.index[repeat]:
        row, kept = labels.loc[i], first.loc[seen.at[i, "_digest"]]
        if row["class"] != kept["class"]:
            raise GeoclipError(f"{row['source_path']} ({row['class']}, from {row['source']}) has the same pixels as "
                               f"{kept['source_path']} ({kept['class']}, from {kept['source']}); one image cannot "
                               f"have two classes: fix one label or drop one tile")
        (root / row["path"]).unlink()
    dropped = int(repeat.sum())
    if dropped:
        print(f"ingest: {dropped} tile(s) repeat the pixels of a tile of an earlier source and were kept once",
              file=sys.stderr)
    out = labels.drop(index=seen.index[repeat]).drop(columns=["_digest"], errors="ignore")
    return out.reset_index(drop=True), dropped


def _require_synthetic_band_order(params: Params) -> None:
    """Synthetic tiles are written in EuroSAT band order: ``ingest.band_names`` must say so."""
    if list(params.ingest.band_names) != list(ALL_BAND_NAMES):
        raise GeoclipError(f"ingest.band_names: {list(params.ingest.band_names)}; synthetic tiles are written in "
                           f"EuroSAT order {list(ALL_BAND_NAMES)}: use that order when ingest.source has 'synthetic'")


def _ingest_synthetic(params: Params, start: float) -> dict:
    """Generate the synthetic dataset and scenes (atomically, by synth; band order recorded with the tiles)."""
    from geoclip.data.synth import generate

    _require_synthetic_band_order(params)
    result = generate(params)
    labels = pd.read_csv(Path(params.paths.raw) / LABELS_FILE)
    return _summary(params, labels, start) | {"synthetic": result["synthetic"], "scenes": result["scenes"]}


def _list_source(source: str, raw: Path, allow_outside: bool = False) -> tuple[pd.DataFrame, bool]:
    """The source's tiles (``path`` = local path or URI, ``class``, manifest columns) and whether it is a manifest."""
    if s3.is_s3(source):
        return _list_s3(source, allow_outside)
    path = Path(source)
    if not path.exists():
        raise GeoclipError(f"ingest.source: {source} does not exist; expected 'synthetic', a tile folder, "
                           f"a .csv/.parquet manifest or an s3:// URI")
    if path.resolve().is_relative_to(raw.resolve()):
        raise GeoclipError(f"ingest.source: {source} is inside paths.raw ({raw}), which ingest replaces; "
                           f"keep the download elsewhere (e.g. data/downloads/)")
    tiles = discover_tiles(path)
    if path.is_file():
        _refuse_outside(tiles, source, str(path.parent), allow_outside)
    else:  # a tile reached through a link (itself, or its class folder) is where the link leads
        refuse_outside(tiles["path"], path, "ingest.allow_outside_paths", allow_outside, where=source,
                       place="this folder", expected="tiles")
    return tiles, path.is_file()


def _refuse_outside(tiles: pd.DataFrame, manifest: str, base: str, allow: bool) -> None:
    """Refuse the first manifest row whose tile lies outside the manifest's folder (or bucket/prefix), links
    followed, unless ``allow``."""
    joined = base.rstrip("/") + ("/" if s3.is_s3(base) else os.sep)  # read_manifest's join of a relative path

    def row(i: int, path: str) -> str:
        """The row as the user wrote it: its number, id and path."""
        rid, written = tiles["id"].iloc[i] if "id" in tiles.columns else None, path.removeprefix(joined)
        return f"row {i + 1} (id {rid}, path {written})" if isinstance(rid, str) else f"row {i + 1} (path {written})"

    refuse_outside(tiles["path"], base, "ingest.allow_outside_paths", allow, where=manifest,
                   place=f"the manifest's folder {base}", expected="tiles", label=row)


def _list_s3(source: str, allow_outside: bool = False) -> tuple[pd.DataFrame, bool]:
    """List an ``s3://`` manifest (downloaded to read it) or a folder-like prefix in a class-folder layout."""
    s3.require_bucket(source)
    if source.lower().endswith(MANIFEST_SUFFIXES):
        if not s3.exists(source):
            raise GeoclipError(f"{source}: no such object; expected a .csv/.parquet manifest at this key")
        base = source.rsplit("/", 1)[0]
        with tempfile.TemporaryDirectory() as tmp:
            local = s3.download(source, Path(tmp) / source.rsplit("/", 1)[1])
            try:
                tiles = read_manifest(local, base=base)
            except GeoclipError as exc:
                raise GeoclipError(str(exc).replace(str(local), source)) from exc  # name the object, not the copy
        _refuse_outside(tiles, source, base, allow_outside)
        return tiles, True
    bucket, key = s3.split_uri(source)
    base = f"{s3.SCHEME}{bucket}/{key.strip('/')}" if key.strip("/") else f"{s3.SCHEME}{bucket}"
    uris = s3.list_uris(base)
    if not uris:
        raise GeoclipError(f"{source}: no objects found; expected tiles under <Class>/ folders or a manifest "
                           f"(s3://.../manifest.csv or .parquet)")
    tiles = layout_tiles([u[len(base) + 1:] for u in uris], base)
    if tiles.empty:
        raise GeoclipError(f"{source}: no .tif tiles found among {len(uris)} objects; expected "
                           f"<Class>/<Class>_<n>.tif under the prefix, or point ingest.source at a manifest")
    return tiles, False


def _labels(tiles: pd.DataFrame, where: str, is_manifest: bool, class_names: list[str]) -> pd.DataFrame:
    """Check classes, ids and splits; return labels.csv (``path`` = where the tile goes under the raw dir)."""
    if tiles["class"].isna().all():
        raise GeoclipError(f"{where}: tiles have no class; expected one folder per class (<Class>/*.tif) "
                           f"or a manifest with a 'class' column")
    _check_rows(tiles, where, "class", lambda v: isinstance(v, str) and v.strip() != "", "a class name")
    bad = sorted(set(tiles["class"]) - set(class_names))
    if bad:
        raise GeoclipError(f"{where}: unknown class(es) {bad}; expected names from classes.names or classes.concepts {class_names} "
                           f"(add new classes, with a description, to classes in params.yaml)")
    if "split" in tiles.columns:
        _check_rows(tiles, where, "split", lambda v: v in SPLITS, f"one of {', '.join(SPLITS)}")
    if is_manifest and "id" in tiles.columns:
        _check_rows(tiles, where, "id", lambda v: isinstance(v, str) and v.strip() != "", "an id")
        ids = tiles["id"].str.strip()
    else:
        stems = [Path(p).stem for p in tiles["path"]]
        ids = pd.Series(stems if is_manifest else [s if s.startswith(f"{c}_") else f"{c}_{s}"
                                                   for s, c in zip(stems, tiles["class"])], index=tiles.index)
    unsafe = sorted({i for i in ids if "/" in i or "\\" in i or i.startswith(".")})
    if unsafe:
        raise GeoclipError(f"{where}: id(s) {unsafe[:5]} cannot name a file; expected ids without '/', '\\' "
                           f"or a leading '.'")
    dup = sorted(ids[ids.duplicated()].unique())
    if dup:
        raise GeoclipError(f"{where}: duplicate id(s) {dup[:10]}{' ...' if len(dup) > 10 else ''}; "
                           f"every tile needs its own id (it names tiles/<Class>/<id>.tif)")
    labels = pd.DataFrame({"id": ids, "path": [f"tiles/{c}/{i}.tif" for c, i in zip(tiles["class"], ids)],
                           "class": tiles["class"]})
    extra = [c for c in tiles.columns if c not in CORE_COLUMNS]
    for col in (["split"] if "split" in tiles.columns else []) + extra:
        labels[col] = tiles[col].to_numpy()
    return labels.reset_index(drop=True)


def _check_rows(df: pd.DataFrame, where: str, col: str, ok, expected: str) -> None:
    """Raise naming the first row whose ``col`` value fails ``ok``."""
    bad = [i for i, v in enumerate(df[col]) if not ok(v)]
    if bad:
        i = bad[0]
        raise GeoclipError(f"{where}: row {i + 1} ({df['path'].iloc[i]}): {col} {df[col].iloc[i]!r}; "
                           f"expected {expected}" + (f" ({len(bad)} rows like this)" if len(bad) > 1 else ""))


def _copy(src: str, dst: Path, client, band_names: list[str], digest: bool) -> str | None:
    """Copy one tile from a local path or ``s3://`` URI to ``dst``, checking it is a raster with ``band_names``;
    return the digest of its pixels (:func:`pixel_digest`) when ``digest``, else None.

    A local file is checked before it is copied (a FIFO or a device listed as a tile is never read to its end);
    an S3 object is fetched first (into the temporary folder, never into ``paths.raw``) and checked there.
    """
    if not src.rstrip("/").lower().endswith(TIFF_SUFFIXES):  # a per-band folder, a SAFE, a STAC item
        if s3.is_s3(src):
            raise GeoclipError(f"{src}: per-band, SAFE and STAC tiles are ingested from local paths; stack it to one "
                               "GeoTIFF (or copy the product locally) first")
        if not os.path.exists(src):
            raise GeoclipError(f"{src}: no such file or folder (listed by ingest.source)")
        write_stacked(src, dst, band_names)  # the same reader as scoring and predict
        return pixel_digest(dst, src) if digest else None
    if s3.is_s3(src):
        s3.download_small(src, dst, client)
        if not _in_order(src, dst, band_names):
            _restack(src, dst, dst, band_names)
        return pixel_digest(dst, src) if digest else None
    if not os.path.exists(src):
        raise GeoclipError(f"{src}: no such file (listed by ingest.source)")
    if not os.path.isfile(src):
        raise GeoclipError(f"{src}: not a regular file; expected a GeoTIFF tile")
    if not _in_order(src, Path(src), band_names):
        _restack(src, Path(src), dst, band_names)
        return pixel_digest(dst, src) if digest else None
    try:
        shutil.copy2(src, dst)
    except FileNotFoundError as exc:
        raise GeoclipError(f"{src}: no such file (listed by ingest.source)") from exc
    except OSError as exc:
        raise GeoclipError(f"{src}: cannot copy ({exc.strerror or exc})") from exc
    return pixel_digest(dst, src) if digest else None


def pixel_digest(path: Path, name: str) -> str:
    """SHA-256 of a tile's shape, data type and pixels: equal for one image stored twice, whatever the file's
    compression, tags or georeferencing (``name`` is the source named in errors)."""
    try:
        with rasterio.open(path) as src:
            data = src.read()
    except rasterio.errors.RasterioError as exc:
        raise GeoclipError(f"{name}: unreadable raster ({str(exc).splitlines()[0]})") from exc
    return hashlib.sha256(f"{data.shape}{data.dtype}".encode() + data.tobytes()).hexdigest()


def _fetch_all(srcs: list[str], dsts: list[Path], classes: list[str], band_names: list[str], workers: int,
               digest: bool = False) -> list[str | None]:
    """Copy and check every tile; return their pixel digests in order (None each unless ``digest``). The first
    tile of each class goes first, so a wrong band order fails fast."""
    for folder in {d.parent for d in dsts}:
        folder.mkdir(parents=True, exist_ok=True)
    first_of_class: dict[str, int] = {}
    for i, c in enumerate(classes):
        first_of_class.setdefault(c, i)
    first = sorted(first_of_class.values())
    rest = sorted(set(range(len(srcs))) - set(first))
    client = s3.client() if any(s3.is_s3(s) for s in srcs) else None  # one client: boto3 sessions are not thread-safe
    digests: list[str | None] = [None] * len(srcs)
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(total=len(srcs), desc="ingest", unit="tile") as bar:
        for batch in (first, rest):
            futures = {pool.submit(_copy, srcs[i], dsts[i], client, band_names, digest): i for i in batch}
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for f in pending:
                f.cancel()  # stop queued copies at the first failure
            for f in sorted(done, key=futures.__getitem__):  # the first failing tile in listing order
                digests[futures[f]] = f.result()
            bar.update(len(done))
    return digests


def _in_order(src: str, local: Path, expected: list[str]) -> bool:
    """True when a tile's stored band names are ``ingest.band_names`` in order (or it names none: EuroSAT's)."""
    try:
        found = band_descriptions(local)
    except GeoclipError as exc:
        raise GeoclipError(str(exc).replace(str(local), src)) from exc  # name the source, not the temp copy
    return found is None or found == expected


def _restack(src: str, local: Path, dst: Path, expected: list[str]) -> None:
    """Rewrite a tile whose bands are named in another order or spelling (B1 ... B8A ...) in ``ingest.band_names``
    order, through the same reader as scoring; a tile lacking a band is refused, naming the source."""
    try:
        write_stacked(str(local), dst, expected, ReadOptions(mask="none"))
    except GeoclipError as exc:
        raise GeoclipError(str(exc).replace(str(local), src) + " (ingest.band_names)") from exc


def _summary(params: Params, labels: pd.DataFrame, start: float) -> dict:
    """The ingest summary printed by the CLI."""
    counts = labels["class"].value_counts()
    seconds = round(time.perf_counter() - start, 1)
    print(f"ingest: {len(labels)} tiles of {len(counts)} classes from {params.ingest.source} written to "
          f"{params.paths.raw} in {seconds} s", file=sys.stderr)  # stdout stays for the CLI's JSON
    return {"source": params.ingest.source, "raw": str(params.paths.raw), "n_tiles": len(labels),
            "n_classes": len(counts), "classes": {c: int(n) for c, n in counts.sort_index().items()},
            "missing_classes": [c for c in params.classes.names if c not in counts.index],
            "splits": ({s: int(n) for s, n in labels["split"].value_counts().sort_index().items()}
                       if "split" in labels.columns else None),
            "sources": ({str(k): int(n) for k, n in labels["source"].value_counts(sort=False).items()}
                        if "source" in labels.columns else None),
            "metadata_columns": [c for c in labels.columns if c not in CORE_COLUMNS],
            "band_names": list(params.ingest.band_names), "labels": LABELS_FILE, "seconds": seconds}
