"""Split labelled tiles (stratified, seeded), compute train-only band statistics, pack into arrays."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from geoclip.bands import ALL_BAND_NAMES, band_indices
from geoclip.config import Params
from geoclip.errors import GeoclipError
from geoclip.ioutils import atomic_dir
from geoclip.tiles import read_tile

SPLITS = ("train", "val", "test")
LABELS_FILE = "labels.csv"


@dataclass(frozen=True)
class PreparedData:
    """One split loaded from the packs: raw uint16 tiles and integer labels."""

    images: np.ndarray  # (N, bands, H, W) uint16, memory-mapped
    labels: np.ndarray  # (N,) int64 index into class_names
    class_names: list[str]
    band_names: list[str]
    mean: list[float]
    std: list[float]


def read_labels(raw_dir: str | Path) -> pd.DataFrame:
    """Read ``labels.csv`` (``id``, ``path`` relative to ``raw_dir``, ``class``)."""
    path = Path(raw_dir) / LABELS_FILE
    if not path.exists():
        raise GeoclipError(f"{path}: labels manifest not found; run `geoclip synth` or provide one")
    df = pd.read_csv(path, dtype={"id": str, "path": str, "class": str})
    missing = {"id", "path", "class"} - set(df.columns)
    if missing:
        raise GeoclipError(f"{path}: missing column(s) {sorted(missing)}; expected id, path, class")
    return df


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
            raise GeoclipError(f"class {name!r}: {len(idx)} tile(s), need at least {n_val + n_test + 1} to split")
        split[idx[:n_val]] = "val"
        split[idx[n_val:n_val + n_test]] = "test"
        split[idx[n_val + n_test:]] = "train"
    return split


def prepare(params: Params) -> Path:
    """Write ``{split}_images.npy``, ``{split}_labels.npy``, ``index.csv`` and ``stats.json``; return the folder."""
    raw, out = Path(params.paths.raw), Path(params.paths.prepared)
    df = read_labels(raw)
    unknown = sorted(set(df["class"]) - set(params.classes.names))
    if unknown:
        raise GeoclipError(f"{raw / LABELS_FILE}: class(es) {unknown} not in classes.names")
    df["label"] = [params.classes.names.index(c) for c in df["class"]]
    df["split"] = stratified_split(df["class"], params.prepare.val_fraction, params.prepare.test_fraction,
                                   params.prepare.seed)
    bands = band_indices(params.bands, ALL_BAND_NAMES)
    with atomic_dir(out) as tmp:
        hashes = {}
        for split in SPLITS:
            part = df[df["split"] == split]
            size = params.validate.expected_size
            arr = np.lib.format.open_memmap(tmp / f"{split}_images.npy", mode="w+", dtype=np.uint16,
                                            shape=(len(part), len(bands), size, size))
            for i, (row_id, rel) in enumerate(tqdm(list(zip(part["id"], part["path"])), desc=f"pack {split}",
                                                     unit="tile")):
                tile = read_tile(raw / rel, bands)
                if tile.shape != arr.shape[1:]:
                    raise GeoclipError(f"{raw / rel}: shape {tile.shape}, expected {arr.shape[1:]}")
                arr[i] = tile
                hashes[row_id] = hashlib.sha256(tile.tobytes()).hexdigest()
            arr.flush()
            np.save(tmp / f"{split}_labels.npy", part["label"].to_numpy(dtype=np.int64))
        df["sha256"] = df["id"].map(hashes)
        df.to_csv(tmp / "index.csv", index=False)
        train = np.load(tmp / "train_images.npy", mmap_mode="r")
        mean, std = band_stats(train)
        (tmp / "stats.json").write_text(json.dumps({
            "band_names": list(params.bands), "class_names": list(params.classes.names),
            "mean": mean, "std": std, "counts": df.groupby(["split"]).size().to_dict(),
        }, indent=2) + "\n")
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


def data_hash(prepared_dir: str | Path) -> str:
    """sha256 of ``index.csv`` in the prepared folder: identifies the exact tiles (by content hash) and splits."""
    path = Path(prepared_dir) / "index.csv"
    if not path.exists():
        raise GeoclipError(f"{path}: not found; run `geoclip prepare` first")
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
                        stats["class_names"], stats["band_names"], stats["mean"], stats["std"])
