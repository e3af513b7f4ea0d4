"""Split labelled tiles (labels.csv, stratified or spatially disjoint, seeded), pack them, check the splits."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from rasterio.errors import RasterioError
from tqdm import tqdm

from geoclip.config import Params
from geoclip.data.tiles import BANDS_FILE, LABELS_FILE, crs_name, dataset_band_names, read_labels
from geoclip.diskspace import require_free
from geoclip.errors import GeoclipError
from geoclip.ioutils import atomic_dir, write_json

SPLITS = ("train", "val", "test")
#: Columns every index.csv starts with; labels.csv's other columns (x, y, ...) follow them.
INDEX_COLUMNS = ["id", "path", "class", "label", "split", "sha256", "location"]
CHUNK = 256  # tiles in flight per pool.map: bounds memory on large datasets


@dataclass(frozen=True)
class PreparedData:
    """One split loaded from the packs: raw uint16 tiles and integer labels."""

    images: np.ndarray  # (N, bands, H, W) uint16, memory-mapped
    labels: np.ndarray  # (N,) int64 index into class_names
    class_names: list[str]
    band_names: list[str]
    mean: list[float]
    std: list[float]
    source_band_names: list[str]  # the dataset's band order, which the served model takes as input
    concept_names: list[str] = field(default_factory=list)  # labels from len(class_names) on: classes.concepts


@dataclass(frozen=True)
class BandLayout:
    """The dataset's bands in file order, where that order came from, and the selected bands' positions."""

    source_names: list[str]
    source: str  # raw/bands.json, or "ingest.band_names" when the dataset records none
    selected: list[str]
    indexes: list[int]  # 0-based positions of ``selected`` in ``source_names``



def band_layout(raw_dir: str | Path, params: Params) -> BandLayout:
    """Select ``params.bands`` by name from the dataset's band names (``bands.json``, else ``ingest.band_names``)."""
    names = dataset_band_names(raw_dir, params.ingest.band_names)
    source = str(Path(raw_dir) / BANDS_FILE) if (Path(raw_dir) / BANDS_FILE).exists() else "ingest.band_names"
    missing = [b for b in params.bands if b not in names]
    if missing:
        raise GeoclipError(f"bands: {missing} not among the dataset's bands {names} ({source})")
    return BandLayout(list(names), source, list(params.bands), [names.index(b) for b in params.bands])


def labelled_splits(df: pd.DataFrame, labels_path: Path) -> np.ndarray | None:
    """The ``split`` column of labels.csv when rows carry one (then every row must); None when absent or empty."""
    if "split" not in df.columns:
        return None
    values = df["split"].astype(object).where(df["split"].notna(), None)
    given = np.array([v is not None and str(v).strip() != "" for v in values])
    if not given.any():
        return None
    for line, ok, value in zip(range(2, len(df) + 2), given, values):  # line 1 is the header
        if not ok:
            raise GeoclipError(f"{labels_path} line {line}: no split while other rows have one; expected "
                               f"one of {list(SPLITS)} on every row, or no split column")
        if value not in SPLITS:
            raise GeoclipError(f"{labels_path} line {line}: split {value!r}; expected one of {list(SPLITS)}")
    return values.to_numpy(dtype=object)


def stratified_split(classes: pd.Series, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Assign each row to train/val/test, per class, deterministically from ``seed``."""
    rng = np.random.default_rng(seed)
    split = np.empty(len(classes), dtype=object)
    for name in sorted(classes.unique()):
        idx = np.flatnonzero(classes.to_numpy() == name)
        idx = idx[rng.permutation(len(idx))]
        n_val = max(1, round(len(idx) * val_fraction))
        n_test = max(1, round(len(idx) * test_fraction))
        if len(idx) < n_val + n_test + 1:
            raise GeoclipError(f"class {name!r}: {len(idx)} tile(s), need at least {n_val + n_test + 1} to split "
                               f"(add tiles, or lower prepare.val_fraction / test_fraction)")
        split[idx[:n_val]] = "val"
        split[idx[n_val:n_val + n_test]] = "test"
        split[idx[n_val + n_test:]] = "train"
    return split



def _georef(path: Path) -> tuple[str | None, tuple[float, float] | None]:
    """A tile's CRS name and centre in CRS units from its header (no pixels read); None where missing."""
    try:
        with rasterio.open(path) as src:
            crs = crs_name(src.crs.to_wkt()) if src.crs else None
            centre = None if src.transform.is_identity else src.transform * (src.width / 2, src.height / 2)
    except RasterioError as exc:
        raise GeoclipError(f"{path}: cannot be read as a raster ({str(exc).splitlines()[0]})") from exc
    return crs, centre


def tile_locations(df: pd.DataFrame, paths: list[Path], block_m: float, workers: int) -> list[str]:
    """Each tile's location group ``CRS:ix:iy``: its centre (x/y columns, else geotransform) in ``block_m`` blocks."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        headers = list(tqdm(pool.map(_georef, paths), total=len(paths), desc="locate tiles", unit="tile"))
    try:
        xy = df[["x", "y"]].to_numpy(dtype=float) if {"x", "y"} <= set(df.columns) else np.full((len(df), 2), np.nan)
    except (TypeError, ValueError) as exc:
        raise GeoclipError(f"{LABELS_FILE}: columns x, y: expected numbers (tile centre in CRS units) ({exc})") from exc
    groups = []
    for path, (crs, centre), (x, y) in zip(paths, headers, xy):
        if math.isfinite(x) and math.isfinite(y):
            centre = (x, y)  # labels.csv's x/y are the tile centre in CRS units
        if crs is None or centre is None:
            raise GeoclipError(f"{path}: no CRS or geotransform; prepare.split: spatial needs georeferenced "
                               "tiles (or use prepare.split: stratified)")
        groups.append(f"{crs}:{math.floor(centre[0] / block_m)}:{math.floor(centre[1] / block_m)}")
    return groups


def spatial_split(groups: pd.Series, labels: pd.Series, val_fraction: float, test_fraction: float,
                  seed: int) -> np.ndarray:
    """Assign whole location groups to splits, stratified by each group's majority class, from ``seed``."""
    rng = np.random.default_rng(seed)
    counts = pd.crosstab(groups.to_numpy(), labels.to_numpy())  # groups sorted by key: order independent of rows
    sizes, majority = counts.sum(axis=1), counts.idxmax(axis=1)  # ties: the lowest label
    target = {"train": 1 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    split_of: dict[str, str] = {}
    for label in sorted(majority.unique()):
        names = majority.index[majority == label].to_numpy()
        names = list(names[rng.permutation(len(names))])
        total, done = sizes[names].sum(), dict.fromkeys(SPLITS, 0)
        if len(names) >= 3:  # the two smallest groups seed val and test, so every split gets this class
            for split, name in zip(("val", "test"), sorted(names, key=lambda n: sizes[n])[:2]):
                split_of[name] = split
                done[split] += sizes[name]
        for name in (n for n in names if n not in split_of):
            split = max(SPLITS, key=lambda s: target[s] * total - done[s])  # the split furthest below its share
            split_of[name] = split
            done[split] += sizes[name]
    return groups.map(split_of).to_numpy(dtype=object)


def read_selected(path: Path, layout: BandLayout, size: int) -> np.ndarray:
    """One tile's selected bands as uint16 ``(bands, size, size)``; its band count must match the dataset's."""
    try:
        with rasterio.open(path) as src:
            if src.count != len(layout.source_names):
                raise GeoclipError(f"{path}: {src.count} band(s), expected {len(layout.source_names)} "
                                   f"{layout.source_names} ({layout.source})")
            if src.dtypes[0] != "uint16":
                raise GeoclipError(f"{path}: dtype {src.dtypes[0]}, expected uint16")
            if (src.height, src.width) != (size, size):
                raise GeoclipError(f"{path}: {src.height}x{src.width} px, expected {size}x{size}")
            return src.read([i + 1 for i in layout.indexes])
    except RasterioError as exc:
        raise GeoclipError(f"{path}: cannot be read as a raster ({str(exc).splitlines()[0]})") from exc


def _hashed(read: Callable[[Path], np.ndarray], path: Path) -> tuple[np.ndarray, str]:
    """Read a tile and hash its bytes in the worker thread (both release the GIL)."""
    tile = np.ascontiguousarray(read(path))
    return tile, hashlib.sha256(tile.tobytes()).hexdigest()


def pack(paths: list[Path], out_file: Path, shape: tuple[int, int, int], read: Callable[[Path], np.ndarray],
         workers: int, desc: str = "pack") -> list[str]:
    """Read tiles with a thread pool into one contiguous uint16 ``.npy`` (in order); return their sha256."""
    arr = np.lib.format.open_memmap(out_file, mode="w+", dtype=np.uint16, shape=(len(paths), *shape))
    # The file is sparse: reserve its blocks now, so a full volume is an OSError here, not a SIGBUS mid-copy.
    with open(out_file, "r+b") as f:
        os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    hashes: list[str] = []
    # GDAL releases the GIL while decoding, so threads overlap reads; pool.map keeps the order.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, tqdm(total=len(paths), desc=desc, unit="tile") as bar:
        for start in range(0, len(paths), CHUNK):
            for i, (tile, digest) in enumerate(pool.map(functools.partial(_hashed, read),
                                                        paths[start:start + CHUNK]), start):
                arr[i] = tile
                hashes.append(digest)
                bar.update()
    arr.flush()
    del arr
    return hashes


def class_split_table(df: pd.DataFrame, class_names: list[str]) -> pd.DataFrame:
    """Tile count per (class, split) for every class and split, zeros included."""
    counts = df.groupby(["class", "split"]).size()
    rows = [{"class": c, "split": s, "count": int(counts.get((c, s), 0))} for c in class_names for s in SPLITS]
    return pd.DataFrame(rows, columns=["class", "split", "count"])


SPLITS_DOCS_SITE = "data_docs_splits"  # Data Docs of the split suites, beside validate's own site


def _split_parameters(params: Params) -> dict:
    """The ``$PARAMETER`` values of the splits suites."""
    return {"splits": list(SPLITS), "class_names": list(params.classes.names),
            "min_tiles": max(1, params.prepare.min_tiles_per_split)}


def run_split_suite(name: str, df: pd.DataFrame, params: Params, keys: tuple[str, ...]) -> dict:
    """Run ``expectations/{name}.json`` with validate.run_suite; raise one GeoclipError line naming each failure."""
    from geoclip.data.validate import SUITES_DIR, failure_line, run_suite  # validate imports this module

    result = run_suite(SUITES_DIR / f"{name}.json", df, _split_parameters(params), keys=keys)
    failed = [c for c in result["checks"] if not c["success"]]
    if failed:
        raise GeoclipError(f"{name} check failed: {len(failed)} of {len(result['checks'])} checks: "
                           + "; ".join(failure_line(c) for c in failed))
    return result


def check_class_counts(df: pd.DataFrame, params: Params) -> dict:
    """``split_classes`` suite on the class x split table: every class in every split, enough tiles each."""
    return run_split_suite("split_classes", class_split_table(df, params.classes.names), params, ("class", "split"))


def check_splits(df: pd.DataFrame, params: Params) -> dict:
    """``splits`` suite on the per-tile index: unique ids, no content or location group in two splits."""
    tiles = df[["id", "split", "sha256"]].assign(
        hash_splits=df.groupby("sha256")["split"].transform("nunique"),
        location_splits=(df.groupby("location")["split"].transform("nunique") if "location" in df.columns
                         else np.nan))  # nulls are not checked: no location groups unless split: spatial
    return run_split_suite("splits", tiles, params, ("id",))


def _validation_report(results: list[dict], params: Params) -> dict:
    """The passed splits checks as plain JSON, written into the prepared folder."""
    import great_expectations as gx

    checks = [c for r in results for c in r["checks"]]
    return {"success": True, "n_checks": len(checks), "parameters": _split_parameters(params),
            "suite_files": [f"expectations/{Path(r['suite_file']).name}" for r in results],
            "gx_version": gx.__version__, "checks": checks}


def assign_splits(df: pd.DataFrame, paths: list[Path], params: Params) -> str:
    """Fill ``df['split']`` (and ``df['location']`` for spatial splits) from params; return the method."""
    p = params.prepare
    if p.split == "spatial":
        df["location"] = tile_locations(df, paths, p.spatial_block_m, p.workers)
        df["split"] = spatial_split(df["location"], df["label"], p.val_fraction, p.test_fraction, p.seed)
    else:
        df["split"] = stratified_split(split_strata(df), p.val_fraction, p.test_fraction, p.seed)
    return p.split


def split_classes_only(df: pd.DataFrame, paths: list[Path], params: Params) -> str:
    """:func:`assign_splits` over the tiles of ``classes.names`` (concept tiles, labels past them, are left out)."""
    mine = (df["label"] < len(params.classes.names)).to_numpy()
    if mine.all():
        return assign_splits(df, paths, params)
    part = df[mine].copy()
    method = assign_splits(part, [p for p, m in zip(paths, mine) if m], params)
    for column in ("split", "location"):
        if column in part.columns:
            df.loc[mine, column] = part[column]
    return method


def split_strata(df: pd.DataFrame) -> pd.Series:
    """What a stratified split balances: the class, and the source too when tiles come from several (so real
    tiles reach validation and test in their share, not by chance)."""
    if "source" not in df.columns or df["source"].nunique(dropna=False) < 2:
        return df["class"]
    return df["class"] + " from " + df["source"].fillna("?").astype(str)


def prepare(params: Params) -> Path:
    """Split, pack ``{split}_images.npy``/``_labels.npy``, check the splits; write index, stats, validation."""
    raw, out = Path(params.paths.raw), Path(params.paths.prepared)
    labels_path = raw / LABELS_FILE
    df = read_labels(raw)
    if df["class"].isna().any():
        raise GeoclipError(f"{labels_path}: {int(df['class'].isna().sum())} row(s) without a class")
    vocabulary = [*params.classes.names, *params.classes.concepts]
    unknown = sorted(set(df["class"]) - set(vocabulary))
    if unknown:
        raise GeoclipError(f"{labels_path}: class(es) {unknown} not in classes.names or classes.concepts")
    layout = band_layout(raw, params)
    df["label"] = [vocabulary.index(c) for c in df["class"]]
    given = labelled_splits(df, labels_path)
    df = df.drop(columns="split", errors="ignore") if given is None else df.assign(split=given)
    # Sorted by id, so the packs do not depend on the row order of labels.csv.
    df = df.sort_values("id", kind="stable").reset_index(drop=True)
    paths = [Path(p) if Path(p).is_absolute() else raw / p for p in df["path"]]
    method = "labels.csv" if given is not None else split_classes_only(df, paths, params)
    # Concept tiles teach the class side only: all train, so validation and test stay the default class list's.
    df.loc[df["label"] >= len(params.classes.names), "split"] = "train"
    size = params.validate.expected_size
    read = functools.partial(read_selected, layout=layout, size=size)
    counts = check_class_counts(df, params)  # needs no pixels: fail before packing
    splits = None
    need = len(df) * len(layout.indexes) * size * size * np.dtype(np.uint16).itemsize
    require_free(out.parent, "the prepared packs", need, need)  # uncompressed arrays: the estimate is the size
    with atomic_dir(out, what="the prepared packs", need=need) as tmp:
        for split in SPLITS:
            mask = (df["split"] == split).to_numpy()
            df.loc[mask, "sha256"] = pack([p for p, m in zip(paths, mask) if m], tmp / f"{split}_images.npy",
                                          (len(layout.indexes), size, size), read, params.prepare.workers,
                                          desc=f"pack {split}")
            np.save(tmp / f"{split}_labels.npy", df.loc[mask, "label"].to_numpy(dtype=np.int64))
        splits = check_splits(df, params)
        write_json(tmp / "validation.json", _validation_report([counts, splits], params))
        front = [c for c in INDEX_COLUMNS if c in df.columns]
        df[front + [c for c in df.columns if c not in front]].to_csv(tmp / "index.csv", index=False)
        mean, std = band_stats(np.load(tmp / "train_images.npy", mmap_mode="r"))
        write_json(tmp / "stats.json", {
            "band_names": layout.selected, "source_band_names": layout.source_names,
            "band_source": Path(layout.source).name,
            "class_names": list(params.classes.names), "concept_names": list(params.classes.concepts),
            "mean": mean, "std": std, "split_method": method,
            "counts": {s: int((df["split"] == s).sum()) for s in SPLITS}})
    from geoclip.data.validate import publish_results  # validate imports this module

    publish_results([counts, splits], params.paths.reports, site=SPLITS_DOCS_SITE, keep_others=False)
    return out


def band_stats(images: np.ndarray, chunk: int = 512) -> tuple[list[float], list[float]]:
    """Per-band mean and standard deviation over ``(N, bands, H, W)``, in float64 chunks."""
    total = np.zeros(images.shape[1]); total_sq = np.zeros(images.shape[1]); count = 0
    for start in range(0, len(images), chunk):
        block = np.asarray(images[start:start + chunk], dtype=np.float64)
        total += block.sum(axis=(0, 2, 3)); total_sq += (block ** 2).sum(axis=(0, 2, 3))
        count += block.shape[0] * block.shape[2] * block.shape[3]
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean ** 2, 1e-6))
    return mean.tolist(), std.tolist()


SYNTHETIC_SOURCE = "synthetic"


def split_origins(prepared_dir: str | Path, split: str) -> np.ndarray | None:
    """Per tile of ``split``'s pack, ``"synthetic"`` or ``"real"`` (from index.csv's ``source``); None for data
    prepared before sources were recorded (or packs without an index)."""
    path = Path(prepared_dir) / "index.csv"
    if not path.exists():
        return None
    index = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "source" not in index.columns:
        return None
    sources = index.loc[index["split"] == split, "source"].to_numpy()  # index.csv rows are in pack order
    return np.where(sources == SYNTHETIC_SOURCE, "synthetic", "real")


def split_captions(prepared_dir: str | Path, split: str) -> np.ndarray | None:
    """Per tile of ``split``'s pack, its caption (index.csv's ``caption``, from labels.csv), "" where it has none;
    None when the data has no captions at all (or the packs no index)."""
    path = Path(prepared_dir) / "index.csv"
    if not path.exists():
        return None
    index = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "caption" not in index.columns:
        return None
    return index.loc[index["split"] == split, "caption"].str.strip().to_numpy(dtype=object)  # in pack order


def load_split(prepared_dir: str | Path, split: str) -> PreparedData:
    """Load one split from the packs (images memory-mapped)."""
    prepared_dir = Path(prepared_dir)
    if split not in SPLITS:
        raise GeoclipError(f"split {split!r}: expected one of {SPLITS}")
    path = prepared_dir / f"{split}_images.npy"
    if not path.exists():
        raise GeoclipError(f"{path}: not found; run `geoclip prepare` first")
    stats = json.loads((prepared_dir / "stats.json").read_text())
    return PreparedData(np.load(path, mmap_mode="r"), np.load(prepared_dir / f"{split}_labels.npy"),
                        stats["class_names"], stats["band_names"], stats["mean"], stats["std"],
                        stats.get("source_band_names", stats["band_names"]), stats.get("concept_names", []))
