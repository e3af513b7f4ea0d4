"""Peak memory that scoring allocates (numpy and Python, by tracemalloc) for a tall scene, by reader-thread count.

A synthetic 13-band uint16 scene of ``--height`` x ``--width`` pixels (256-px tiles) is scored with a model that
costs nothing (a constant prediction), so the figure is what reading, windowing, blending and writing hold at
once: it should follow the strips in flight (``read_workers + 1`` read ahead), not the scene.

    python bench/score_memory.py                       # 16384 x 128 px, 1 and 6 readers, 3 runs each
    python bench/score_memory.py --readers 2 6 --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

from geoclip.scoring.score import score_scene

CLASSES = [f"class_{i}" for i in range(10)]


def constant_predict(tiles: np.ndarray) -> np.ndarray:
    """The same probabilities for every window: no inference cost, no inference memory."""
    return np.full((len(tiles), len(CLASSES)), 1 / len(CLASSES), np.float32)


def write_scene(path: Path, height: int, width: int) -> None:
    """A georeferenced 13-band uint16 tiled scene of random digital numbers."""
    data = np.random.default_rng(0).integers(200, 4000, size=(13, height, width), dtype=np.uint16)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=13, dtype="uint16",
                       crs="EPSG:32632", transform=from_origin(500000, 5000000, 10, 10), tiled=True) as dst:
        dst.write(data)


def peak_mb(scene: Path, out: Path, readers: int) -> float:
    """Peak traced MB while scoring ``scene`` with ``readers`` reader threads (probabilities on, no quick-look)."""
    tracemalloc.start()
    try:
        score_scene(constant_predict, scene, out, CLASSES, batch_size=32, quicklook=False, probabilities=True,
                    read_workers=readers)
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def main() -> None:
    """Print the peak per reader count: median and range over the runs, beside the scene's size."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--height", type=int, default=16384)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--readers", type=int, nargs="+", default=[1, 6])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scene = Path(tmp) / "tall.tif"
        write_scene(scene, args.height, args.width)
        print(f"scene {args.width} x {args.height} px, 13 bands: {13 * args.height * args.width * 2 / 1e6:.1f} MB")
        for readers in args.readers:
            peaks = [peak_mb(scene, Path(tmp) / f"out_{readers}_{k}", readers) for k in range(args.runs)]
            print(f"{readers} reader(s): peak traced {statistics.median(peaks):.1f} MB "
                  f"(range {min(peaks):.1f}-{max(peaks):.1f}, {args.runs} runs)", flush=True)


if __name__ == "__main__":
    main()
