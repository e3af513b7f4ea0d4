"""Find and read multispectral tiles: EuroSAT_MS layout, a plain folder, or a CSV manifest."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from rasterio.errors import RasterioIOError

from geoclip.errors import GeoclipError

# Opening a tile must not list its whole folder (27k files in EuroSAT): much faster reads.
os.environ.setdefault("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")

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


def _from_class_folders(root: Path) -> pd.DataFrame:
    """Tiles in ``<root>/<Class>/*.tif`` (EuroSAT_MS layout); the class is the folder name."""
    rows = [
        {"path": str(p), "class": p.parent.name}
        for class_dir in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        for p in sorted(class_dir.iterdir())
        if p.suffix.lower() in TIFF_SUFFIXES
    ]
    return pd.DataFrame(rows, columns=["path", "class"])


def _from_manifest(path: Path) -> pd.DataFrame:
    """Tiles listed in a CSV manifest with a ``path`` column (relative to the manifest) and optional ``class``."""
    df = pd.read_csv(path)
    if "path" not in df.columns:
        raise GeoclipError(f"{path}: manifest has no 'path' column (columns: {list(df.columns)})")
    df["path"] = [str(p) if Path(p).is_absolute() or "://" in str(p) else str(path.parent / p) for p in df["path"]]
    if "class" not in df.columns:
        df["class"] = None
    return df


def discover_tiles(source: str | Path) -> pd.DataFrame:
    """List tiles as a DataFrame with ``id``, ``path`` and ``class`` (None where unknown).

    ``source`` is a CSV manifest, a folder of class folders (EuroSAT_MS), or a flat folder of tiles.
    """
    source = Path(source)
    if not source.exists():
        raise GeoclipError(f"{source}: no such file or folder; expected a tile folder or a CSV manifest")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise GeoclipError(f"{source}: expected a folder of tiles or a .csv manifest")
        df = _from_manifest(source)
    else:
        df = _from_class_folders(source)
        if df.empty:
            flat = sorted(p for p in source.iterdir() if p.suffix.lower() in TIFF_SUFFIXES)
            df = pd.DataFrame({"path": [str(p) for p in flat], "class": [None] * len(flat)})
    if df.empty:
        raise GeoclipError(f"{source}: no .tif tiles found (expected <Class>/<Class>_<n>.tif or *.tif)")
    if "id" not in df.columns:
        df.insert(0, "id", [Path(p).stem for p in df["path"]])
    return df.reset_index(drop=True)


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
