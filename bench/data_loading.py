"""Tiles/s for per-file rasterio reads vs the prepared packs (shuffled minibatches), in one run; target >= 100x."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# As training would open files without packs: never list the tile's folder (set before GDAL loads).
os.environ["GDAL_DISABLE_READDIR_ON_OPEN"] = "EMPTY_DIR"

import numpy as np
import rasterio
from rasterio.transform import from_origin
from tqdm import tqdm

from geoclip.data.prepare import pack
from geoclip.data.tiles import discover_tiles

TARGET = 100.0  # the target: packs at least 100x faster than per-file reads


def write_synthetic(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` random 13x64x64 uint16 GeoTIFFs (10 m UTM) under ``folder``."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in tqdm(range(n), desc="write tiles", unit="tile"):
        path = folder / f"tile_{i:06d}.tif"
        with rasterio.open(path, "w", driver="GTiff", count=13, height=64, width=64, dtype="uint16",
                           crs="EPSG:32632", transform=from_origin(500000 + 640 * i, 5600000, 10, 10)) as dst:
            dst.write(rng.integers(200, 4000, size=(13, 64, 64), dtype=np.uint16))
        paths.append(path)
    return paths


def read_file(path: Path) -> np.ndarray:
    """One tile, all bands, as a training loader without packs would read it."""
    with rasterio.open(path) as src:
        return src.read()


def files_rate(paths: list[Path]) -> float:
    """Tiles/s reading each file in turn with rasterio (one thread)."""
    start = time.perf_counter()
    for p in paths:
        read_file(p)
    return len(paths) / (time.perf_counter() - start)


def packs_rate(pack_file: Path, batch: int, min_seconds: float, seed: int = 0) -> float:
    """Tiles/s copying shuffled minibatches out of the memory-mapped pack into one contiguous array."""
    images = np.asarray(np.load(pack_file, mmap_mode="r"))  # plain ndarray view: no memmap wrapper per tile
    rng = np.random.default_rng(seed)
    out = np.empty((batch, *images.shape[1:]), dtype=images.dtype)
    tiles, start = 0, time.perf_counter()
    while tiles == 0 or time.perf_counter() - start < min_seconds:  # whole epochs, until the clock is readable
        order = rng.permutation(len(images))
        for i in range(0, len(order), batch):
            idx = np.sort(order[i:i + batch])  # a batch is a set: reading it in file order helps the page cache
            for j, k in enumerate(idx):  # one memcpy per tile: faster here than np.take or fancy indexing
                out[j] = images[k]
            tiles += len(idx)
    return tiles / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    """Measure both rates on the same tiles; exit 1 when packs are less than ``TARGET`` times faster."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tiles", type=int, default=2000, help="number of tiles (default 2000)")
    ap.add_argument("--data", type=Path, help="a tile folder (EuroSAT_MS layout or flat); default: synthetic tiles")
    ap.add_argument("--batch", type=int, default=256, help="minibatch size read from the packs")
    ap.add_argument("--workers", type=int, default=4, help="threads packing the tiles")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="geoclip-bench-") as tmp:
        tmp = Path(tmp)
        if args.data:
            paths = [Path(p) for p in discover_tiles(args.data)["path"]][:args.tiles]
        else:
            paths = write_synthetic(tmp, args.tiles)
        shape = read_file(paths[0]).shape
        pack(paths, tmp / "pack.npy", shape, read_file, args.workers)  # also warms the page cache for files
        file_rate = files_rate(paths)
        pack_rate = packs_rate(tmp / "pack.npy", args.batch, min_seconds=2.0)
    ratio = pack_rate / file_rate
    print(f"tiles: {len(paths)} of shape {shape} ({'synthetic' if not args.data else args.data})")
    print(f"per-file rasterio reads: {file_rate:,.0f} tiles/s")
    print(f"packs (mmap, shuffled batches of {args.batch}): {pack_rate:,.0f} tiles/s")
    print(f"ratio: {ratio:,.1f}x (target >= {TARGET:.0f}x): {'PASS' if ratio >= TARGET else 'FAIL'}")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
