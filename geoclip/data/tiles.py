"""Find and read multispectral tiles: class-folder layouts at any depth, a flat folder, or a CSV/Parquet manifest."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from rasterio.crs import CRS
from rasterio.errors import RasterioIOError

from geoclip.errors import GeoclipError

# Opening a tile must not list its whole folder (27k files in EuroSAT): much faster reads.
os.environ.setdefault("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")

LABELS_FILE = "labels.csv"  # the raw dataset's manifest: id, path (relative to raw), class, ...
TIFF_SUFFIXES = (".tif", ".tiff")


def read_tile(path: str | Path, band_indices: list[int] | None = None) -> np.ndarray:
    """Read a tile as ``(bands, H, W)``; ``band_indices`` (0-based) selects and orders bands."""
    try:
        with rasterio.open(path) as src:
            indexes = None if band_indices is None else [i + 1 for i in band_indices]
            if indexes is not None and max(indexes) > src.count:
                raise GeoclipError(f"{path}: has {src.count} bands, expected at least {max(indexes)}")
            return src.read(indexes)
    except RasterioIOError as exc:
        raise GeoclipError(f"{path}: cannot be read as a raster ({str(exc).splitlines()[0]})") from exc


SKIP_PREFIXES = (".", "__MACOSX")  # hidden files and macOS zip debris are never tiles
MANIFEST_SUFFIXES = (".csv", ".parquet")


def layout_tiles(rel_paths: list[str], root: str) -> pd.DataFrame:
    """Tiles and classes from file paths relative to ``root`` (``/``-separated): the one layout rule.

    Class layout: the folder whose children are class folders holding the tiles, however deep
    (EuroSAT_MS ``<Class>/<Class>_<n>.tif``, EuroSATallBands ``.../tif/<Class>/<Class>_<n>.tif``, any
    plain folder per class); the class is the folder name. Flat layout: tiles directly in ``root``
    (class unknown). Tiles under several such roots are ambiguous and refused. ``root`` may be a
    local folder or an ``s3://`` prefix; returned paths are ``root`` joined with the relative path.
    """
    tifs = sorted(p for p in rel_paths if p.lower().endswith(TIFF_SUFFIXES)
                  and not any(part.startswith(SKIP_PREFIXES) for part in p.split("/")))
    nested = [p for p in tifs if "/" in p]
    if not nested:
        return pd.DataFrame({"path": [_join(root, p) for p in tifs], "class": [None] * len(tifs)})
    parent_of_classes = {p: p.rsplit("/", 2)[0] if p.count("/") >= 2 else "" for p in nested}
    homes = sorted(set(parent_of_classes.values()))
    stray = [p for p in tifs if "/" not in p]
    if len(homes) > 1 or stray:
        places = [f"{h or '.'}/<Class>/" for h in homes] + (["./*.tif"] if stray else [])
        raise GeoclipError(f"{root}: tiles found in more than one layout ({', '.join(places[:5])}); expected "
                           f"one folder of class folders: point the source at one, or use a manifest")
    rows = [{"path": _join(root, p), "class": p.split("/")[-2]} for p in nested]
    return pd.DataFrame(rows, columns=["path", "class"])


def _join(root: str, rel: str) -> str:
    """``root`` joined with a ``/``-separated relative path (local folder or ``s3://`` prefix)."""
    if root.startswith("s3://"):
        return root.rstrip("/") + "/" + rel
    return str(Path(root, *rel.split("/")))


def walk_files(root: str | Path) -> list[Path]:
    """Every file below ``root`` (sorted, spelled through ``root``), following links to folders.

    A link back to a folder it lies in (``..``) is not entered, so a loop of links ends; dangling links are listed.
    """
    root = Path(root)
    # Each folder to walk: the real folders it lies in, itself too (a link to one of them would loop).
    chains = {os.fspath(root): frozenset({os.path.realpath(root)})}
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        chain = chains.pop(folder)
        kept = []
        for name in dirs:
            path = os.path.join(folder, name)
            real = os.path.realpath(path)
            if real not in chain:
                kept.append(name)
                chains[path] = chain | {real}
        dirs[:] = kept  # os.walk enters only these
        found += [Path(folder, f) for f in files]
    return sorted(found)


def _walk(root: Path) -> list[str]:
    """All file paths under ``root``, relative and ``/``-separated."""
    return [Path(d, f).relative_to(root).as_posix() for d, _, files in os.walk(root) for f in files]


def read_manifest(path: str | Path, base: str | None = None) -> pd.DataFrame:
    """Read a .csv or .parquet manifest: ``path`` (or ``uri``) resolved against ``base``, optional ``class``.

    ``base`` (default: the manifest's folder) may be an ``s3://`` prefix; absolute paths and URIs stay as
    they are. Every other column is kept.
    """
    path = Path(path)
    text_cols = {"id": str, "path": str, "uri": str, "class": str, "split": str}
    try:
        if path.suffix.lower() == ".parquet":
            df = pd.read_parquet(path)
            df = df.astype({c: str for c in text_cols if c in df.columns})  # missing values stay missing
        else:
            df = pd.read_csv(path, dtype=text_cols)
    except (OSError, ValueError) as exc:  # pandas' parser and pyarrow errors are ValueErrors
        raise GeoclipError(f"{path}: cannot be read as a {path.suffix} manifest ({str(exc).splitlines()[0]})") from exc
    if "path" not in df.columns:
        if "uri" not in df.columns:
            raise GeoclipError(f"{path}: manifest has no 'path' column (or 'uri'); columns: {list(df.columns)}")
        df = df.rename(columns={"uri": "path"})
    missing = df.index[df["path"].isna() | (df["path"].astype(str).str.strip() == "")]
    if len(missing):
        raise GeoclipError(f"{path}: row {missing[0] + 1} has no path; every row needs a tile path or URI")
    base = str(path.parent) if base is None else base
    df["path"] = [p if p.startswith("s3://") or Path(p).is_absolute() else _join(base, p) for p in df["path"]]
    if "class" not in df.columns:
        df["class"] = None
    return df


def discover_tiles(source: str | Path) -> pd.DataFrame:
    """List local tiles as a DataFrame with ``id``, ``path`` and ``class`` (None where unknown), plus manifest columns.

    ``source`` is a .csv/.parquet manifest, a folder of class folders at any depth (EuroSAT_MS,
    EuroSATallBands), or a flat folder of tiles.
    """
    source = Path(source)
    if not source.exists():
        raise GeoclipError(f"{source}: no such file or folder; expected a tile folder or a .csv/.parquet manifest")
    if source.is_file():
        if source.suffix.lower() not in MANIFEST_SUFFIXES:
            raise GeoclipError(f"{source}: expected a folder of tiles or a .csv/.parquet manifest")
        df = read_manifest(source)
    else:  # links to folders are followed: whether they may lead outside is ingest's to judge (confine.py)
        df = layout_tiles([p.relative_to(source).as_posix() for p in walk_files(source)], str(source))
    if df.empty:
        raise GeoclipError(f"{source}: no .tif tiles found (expected <Class>/<Class>_<n>.tif or *.tif)")
    if "id" not in df.columns:
        df.insert(0, "id", [Path(p).stem for p in df["path"]])
    return df.reset_index(drop=True)


def band_descriptions(path: str | Path) -> list[str] | None:
    """The band descriptions (names) stored in a tile, or None when it names no band."""
    try:
        with rasterio.open(path) as src:
            found = src.descriptions
    except RasterioIOError as exc:
        raise GeoclipError(f"{path}: cannot be read as a raster ({str(exc).splitlines()[0]})") from exc
    return [d or "" for d in found] if any(found) else None


def write_labels(raw_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``raw_dir/labels.csv`` for tiles laid out as ``raw_dir/tiles/<Class>/*.tif`` (a real EuroSAT download)."""
    from geoclip.ioutils import atomic_path

    raw_dir = Path(raw_dir)
    out = raw_dir / "labels.csv"
    if out.exists() and not overwrite:
        raise GeoclipError(f"{out}: already exists; pass --overwrite to replace it")
    df = discover_tiles(raw_dir / "tiles")
    if df["class"].isna().any():
        raise GeoclipError(f"{raw_dir / 'tiles'}: expected one folder per class (<Class>/<Class>_<n>.tif)")
    df["path"] = [str(Path(p).relative_to(raw_dir)) for p in df["path"]]
    with atomic_path(out) as tmp:
        df[["id", "path", "class"]].to_csv(tmp, index=False)
    return out


BANDS_FILE = "bands.json"
INGEST_RECORD = "ingest.json"  # what ingest wrote into a folder it owns: it replaces only such files


def record_written(folder: str | Path) -> None:
    """List every file under ``folder`` (about to be swapped in by ingest) in ``folder/ingest.json``.

    Deterministic (sorted relative paths, no time or host), so the same data keeps the same DVC hash.
    """
    from geoclip.ioutils import write_json

    folder = Path(folder)
    files = sorted(p for p in _walk(folder) if p != INGEST_RECORD)
    write_json(folder / INGEST_RECORD, {"written_by": "geoclip ingest", "files": files + [INGEST_RECORD]})


def refuse_unwritten(folder: str | Path) -> None:
    """Refuse to replace ``folder`` when it holds a file ingest did not write (not in its ``ingest.json``).

    Refused rather than kept: kept files would silently join the dataset (and its DVC version), and deleting them
    would lose what a user put there (scenes, a download). One line names them and says what to do.
    """
    import json

    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise GeoclipError(f"{folder}: is a file; expected a folder that ingest writes (move the file elsewhere)")
    try:
        owned = set(json.loads((folder / INGEST_RECORD).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        owned = set()  # no readable record: nothing in the folder is provably ingest's
    foreign = sorted(set(_walk(folder)) - owned)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise GeoclipError(f"{folder}: holds {len(foreign)} file(s) ingest did not write ({shown}); ingest replaces "
                           f"this folder whole: move them elsewhere (your scenes: a folder of their own, e.g. "
                           f"data/scenes, named by score.scenes) or delete them, then run ingest again")


def dataset_band_names(raw_dir: str | Path, default: list[str] | tuple[str, ...]) -> list[str]:
    """The band names, in file order, recorded with a dataset (``raw_dir/bands.json``), else ``default``."""
    import json

    path = Path(raw_dir) / BANDS_FILE
    if not path.exists():
        return list(default)
    try:
        names = json.loads(path.read_text())["band_names"]
    except (ValueError, KeyError, TypeError) as exc:
        raise GeoclipError(f"{path}: expected {{\"band_names\": [...]}} ({exc})") from exc
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise GeoclipError(f"{path}: band_names must be a non-empty list of names, got {names!r}")
    return names


def read_labels(raw_dir: str | Path) -> pd.DataFrame:
    """Read ``labels.csv`` (``id``, ``path`` relative to ``raw_dir``, ``class``, optional ``split`` and metadata).

    A missing, empty or garbled file, or one without the three columns, is a GeoclipError naming it.
    """
    path = Path(raw_dir) / LABELS_FILE
    if not path.exists():
        raise GeoclipError(f"{path}: labels manifest not found; run `geoclip ingest` or provide one")
    try:
        df = pd.read_csv(path, dtype={"id": str, "path": str, "class": str, "split": str})
    except pd.errors.EmptyDataError as exc:
        raise GeoclipError(f"{path}: empty file; expected a header id,path,class and one row per tile") from exc
    except pd.errors.ParserError as exc:
        raise GeoclipError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from exc
    missing = {"id", "path", "class"} - set(df.columns)
    if missing:
        raise GeoclipError(f"{path}: missing column(s) {sorted(missing)}; expected id, path, class")
    return df


@functools.lru_cache(maxsize=256)
def crs_name(wkt: str) -> str:
    """A short CRS name ('EPSG:32632'); cached because the EPSG lookup costs as much as reading a tile."""
    return CRS.from_wkt(wkt).to_string()
