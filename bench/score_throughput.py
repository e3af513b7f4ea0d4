"""Scene scoring speed beside the speed of only reading the scene, and peak memory, in one run.

1. A large synthetic 13-band uint16 tiled scene (default 10980 x 10980 = one Sentinel-2 tile, 256-px blocks,
   deflate + horizontal predictor) is generated in a child process under a temporary folder (or ``--scene``).
2. Read-only: the scene is read window by window exactly as scoring reads it (block-aligned strips decoded by
   ``--read-workers`` threads ahead of the window assembly, geoclip.scoring.pipeline.read_ahead and
   geoclip.scoring.scene_io.scan_windows), no model.
3. Inference-only: the model on as many windows as scoring infers, from a batch already in memory: what inference
   alone allows (scoring cannot beat it; on a CPU, reading competes with it for the cores).
4. Scoring: geoclip.scoring.score.score_scene with a real GeoCLIP (untrained, ``--encoder``; or ``--model`` = a folder
   written by save_model, or an MLflow model URI / pyfunc folder): class-map COG, quick-look, summary.

Also times decoding the block-aligned strips alone (GDAL's speed on the file, no window assembly).
Prints megapixels/s of each, the ratios of scoring to read-only and to inference-only and peak RSS: the largest
VmRSS a sampling thread saw in each phase, and ru_maxrss of the process (generation runs in a child process,
so it does not count), and the 1-minute load average after each phase (other work on the machine slows
every figure). ``--json OUT`` writes the figures.

    python bench/score_throughput.py                         # full size, CPU
    python bench/score_throughput.py --size 5490 --device cuda --batch-size 1024 --json out.json
    python bench/score_throughput.py --per-band --skip-score   # stacked vs per-band product (VRT) reading

Imports: numpy, rasterio, torch, timm, tqdm, matplotlib, pyyaml (geoclip.config); mlflow only for ``--model``
given as an MLflow URI or pyfunc folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # geoclip from this checkout, installed or not

import numpy as np

N_BANDS, N_CLASSES, CLASS_BLOCK = 13, 10, 64


def generate(path: Path, size: int, block: int, compress: str, seed: int = 0) -> None:
    """A ``size`` x ``size`` 13-band uint16 scene: 64-px class blocks with class spectra plus noise, written in strips."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    spectra = rng.integers(300, 4000, (N_BANDS, N_CLASSES)).astype(np.int32)
    profile = {"driver": "GTiff", "width": size, "height": size, "count": N_BANDS, "dtype": "uint16",
               "crs": "EPSG:32632", "transform": from_origin(300000, 5000040, 10, 10), "nodata": 0,
               "tiled": True, "blockxsize": block, "blockysize": block, "num_threads": "ALL_CPUS", "bigtiff": "IF_SAFER"}
    if compress != "none":
        profile |= {"compress": compress, "predictor": 2, "zlevel": 1}
    cols = np.arange(size) // CLASS_BLOCK
    with rasterio.open(path, "w", **profile) as dst:
        for r in tqdm(range(0, size, block), desc="generate scene", unit="strip"):
            n = min(block, size - r)
            cls = ((np.arange(r, r + n)[:, None] // CLASS_BLOCK) * 7 + cols[None] * 3) % N_CLASSES
            data = spectra[:, cls] + rng.integers(-64, 64, (N_BANDS, n, size), dtype=np.int32)
            dst.write(data.astype(np.uint16), window=Window(0, r, size, n))


class RssSampler:
    """Largest VmRSS (bytes) seen by a thread reading /proc/self/status every ``interval`` seconds."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        """Current resident set size in bytes (0 where /proc is missing)."""
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def make_predict_fn(args):
    """``(predict_fn, class_names, description)`` for the model asked for."""
    import torch

    from geoclip.bands import ALL_BAND_NAMES, EUROSAT_CLASSES
    from geoclip.model.clip import GeoCLIP, ModelConfig, load_model, predict_batches

    device = torch.device(args.device)
    if args.model and not (Path(args.model) / "model.pt").exists():  # an MLflow URI or pyfunc folder
        import mlflow

        pyfunc = mlflow.pyfunc.load_model(args.model)
        names = list(pyfunc.metadata.metadata["class_names"])
        return (lambda x: pyfunc.predict(x, params={"batch_size": args.batch_size})["probabilities"],
                names, f"mlflow pyfunc {args.model}")
    if args.model:
        model, what = load_model(args.model), f"saved model {args.model}"
    else:
        torch.manual_seed(0)
        cfg = ModelConfig(image_encoder=args.encoder, embed_dim=128, band_names=list(ALL_BAND_NAMES),
                          class_names=list(EUROSAT_CLASSES), prompts=[[c] for c in EUROSAT_CLASSES],
                          band_mean=[1500.0] * N_BANDS, band_std=[800.0] * N_BANDS)
        model, what = GeoCLIP(cfg, prompt_features=torch.randn(len(EUROSAT_CLASSES), 1, 384)), f"untrained {args.encoder}"
    model = model.to(device, memory_format=torch.channels_last).eval()
    n_params = sum(p.numel() for p in model.image_encoder.parameters()) if hasattr(model, "image_encoder") else None
    return (lambda x: predict_batches(model, x, args.batch_size, device)[0], list(model.cfg.class_names),
            f"{what} ({n_params} image-encoder parameters)" if n_params else what)


def strips_only(scene: str, args) -> dict:
    """Only decode the scene's block-aligned strips (no window assembly): GDAL's own speed on this file."""
    import rasterio
    from rasterio.windows import Window

    from geoclip.scoring.scene_io import scene_env, strip_rows

    started = time.perf_counter()
    with scene_env(scene), rasterio.open(scene) as src:
        rows = strip_rows(src, args.window)
        for r0 in range(0, src.height, rows):
            src.read(window=Window(0, r0, src.width, min(rows, src.height - r0)))
        pixels = src.width * src.height
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "megapixels_per_s": round(pixels / 1e6 / seconds, 3), "strip_rows": rows,
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def per_band_product(scene: str, folder: Path) -> str:
    """The scene as one COG per band at the band's native resolution (10, 20 or 60 m, averaged down), named as
    BigEarthNet names them: a per-band product folder as users hold them (reused when present)."""
    import rasterio
    from rasterio.enums import Resampling

    from geoclip.bands import ALL_BAND_NAMES, BAND_GSD_M
    from geoclip.scoring.scene_io import to_cog

    folder.mkdir(parents=True, exist_ok=True)
    with rasterio.open(scene) as src:
        for i, band in enumerate(ALL_BAND_NAMES, start=1):
            out = folder / f"{folder.name}_{band}.tif"
            if out.exists():
                continue
            f = BAND_GSD_M[band] // 10
            data = src.read(i, out_shape=(src.height // f, src.width // f), resampling=Resampling.average)
            plain = folder / f".{band}.plain.tif"
            with rasterio.open(plain, "w", driver="GTiff", width=data.shape[1], height=data.shape[0], count=1,
                               dtype="uint16", crs=src.crs, transform=src.transform * src.transform.scale(f, f),
                               nodata=0, tiled=True, blockxsize=256, blockysize=256) as dst:
                dst.write(data, 1)
            to_cog(plain, out, "AVERAGE")
            plain.unlink()
    return str(folder)


def read_only(scene: str, args) -> dict:
    """Read the scene (a stacked file or a per-band product folder) window by window exactly as scoring does
    (geoclip.data.product_reader, strips read ahead by ``--read-workers`` threads, window batches), without a model."""
    from geoclip.bands import ALL_BAND_NAMES
    from geoclip.data.product_reader import ReadOptions, open_product
    from geoclip.scoring.pipeline import available_cores, read_ahead
    from geoclip.scoring.scene_io import scan_windows, scene_env, strip_rows

    def opener():
        return open_product(scene, ALL_BAND_NAMES, ReadOptions())

    started, windows = time.perf_counter(), 0
    with RssSampler() as rss, scene_env(scene), opener() as src:
        strips = read_ahead(opener, src.height, src.width, strip_rows(src, args.window),
                            args.read_workers or available_cores(), env=lambda: scene_env(scene))
        for batch in scan_windows(src, args.window, args.stride, args.batch_size, args.nodata, strips):
            windows += len(batch.where)
        pixels = src.width * src.height
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "megapixels_per_s": round(pixels / 1e6 / seconds, 3), "windows": windows,
            "windows_per_s": round(windows / seconds, 1), "peak_rss_gib": round(rss.peak / 2**30, 3),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def inference_only(predict_fn, windows: int, pixels: int, args) -> dict:
    """The model alone on ``windows`` windows (one batch of random DNs, already in memory, predicted again and
    again): the speed inference allows, in scene megapixels/s."""
    batch = np.random.default_rng(0).integers(300, 4000, (args.batch_size, N_BANDS, args.window, args.window),
                                              dtype=np.uint16)
    started, left = time.perf_counter(), windows
    while left > 0:
        predict_fn(batch[:min(left, args.batch_size)])
        left -= args.batch_size
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "megapixels_per_s": round(pixels / 1e6 / seconds, 3), "windows": windows,
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def scene_windows(scene: str, args) -> tuple[int, int]:
    """(windows scoring infers on an all-valid scene, pixels): every window position."""
    import rasterio

    from geoclip.scoring.scene_io import window_starts

    with rasterio.open(scene) as src:
        h, w = src.height, src.width
    return len(window_starts(h, args.window, args.stride)) * len(window_starts(w, args.window, args.stride)), h * w


def scoring(scene: str, args, out: Path) -> dict:
    """Score the scene with geoclip.scoring.score.score_scene and a real model; outputs go to ``out``."""
    from geoclip.bands import ALL_BAND_NAMES
    from geoclip.scoring.score import score_scene

    predict_fn, names, what = make_predict_fn(args)
    started = time.perf_counter()
    with RssSampler() as rss:
        summary = score_scene(predict_fn, scene, out, names, window=args.window, stride=args.stride,
                              batch_size=args.batch_size, nodata=args.nodata, bands=ALL_BAND_NAMES,
                              quicklook=not args.no_quicklook, probabilities=args.probabilities,
                              full_resolution=not args.coarse, read_workers=args.read_workers)
    seconds = time.perf_counter() - started
    pixels = summary["width"] * summary["height"]
    return {"model": what, "seconds": round(seconds, 2), "megapixels_per_s": round(pixels / 1e6 / seconds, 3),
            "peak_rss_gib": round(rss.peak / 2**30, 3), "valid_pixels": summary["valid_pixels"],
            "classmap_bytes": Path(summary["classmap"]).stat().st_size, "load_avg_1m": round(os.getloadavg()[0], 2)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scene", help="score this scene instead of generating one")
    p.add_argument("--size", type=int, default=10980, help="generated scene width = height (default 10980)")
    p.add_argument("--block", type=int, default=256, help="generated scene block size")
    p.add_argument("--compress", choices=["deflate", "none"], default="deflate", help="generated scene compression")
    p.add_argument("--keep", help="generate the scene into this folder and keep it (reused when present)")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--stride", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--nodata", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument("--read-workers", type=int, default=0, help="threads decoding strips (0: the cores available)")
    p.add_argument("--skip-inference", action="store_true", help="skip the inference-only pass")
    p.add_argument("--encoder", default="resnet10t", help="timm image encoder of the untrained model (as params.yaml)")
    p.add_argument("--model", help="a save_model folder, an MLflow model URI or a pyfunc folder")
    p.add_argument("--probabilities", action="store_true", help="also write the per-class probability COG")
    p.add_argument("--no-quicklook", action="store_true")
    p.add_argument("--coarse", action="store_true", help="one class per stride cell (score.full_resolution false)")
    p.add_argument("--skip-read", action="store_true", help="skip the read-only passes")
    p.add_argument("--skip-score", action="store_true", help="skip scoring (I/O figures only)")
    p.add_argument("--per-band", action="store_true",
                   help="also read the scene as a per-band product (one COG per band at 10/20/60 m, through a VRT)")
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--generate-only", help=argparse.SUPPRESS)  # the child process that writes the scene
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Generate (or take) a scene, time reading and scoring it, print and optionally save the figures."""
    args = parse_args(argv)
    if args.generate_only:
        generate(Path(args.generate_only), args.size, args.block, args.compress)
        return 0
    import rasterio
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="geoclip-score-bench-"))
    try:
        scene, generated = args.scene, None
        if not scene:
            folder = Path(args.keep) if args.keep else work
            folder.mkdir(parents=True, exist_ok=True)
            scene = str(folder / f"scene_{args.size}_{args.block}_{args.compress}.tif")
            if not Path(scene).exists():
                started = time.perf_counter()
                subprocess.run([sys.executable, __file__, "--generate-only", scene, "--size", str(args.size),
                                "--block", str(args.block), "--compress", args.compress], check=True)
                generated = round(time.perf_counter() - started, 1)
        with rasterio.open(scene) as src:
            shape = {"width": src.width, "height": src.height, "bands": src.count, "dtype": src.dtypes[0],
                     "block": list(src.block_shapes[0]),
                     "compression": src.compression.value if src.compression else "none",
                     "file_bytes": os.path.getsize(scene) if os.path.exists(scene) else None}
        print(f"scene {scene}: {shape}" + (f", generated in {generated} s" if generated else ""), flush=True)
        figures: dict = {"scene": {**shape, "path": scene, "generated_s": generated},
                         "config": {k: getattr(args, k) for k in ("window", "stride", "batch_size", "device", "nodata",
                                                                  "probabilities", "coarse", "read_workers")},
                         "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                     "platform": platform.platform(), "torch": torch.__version__,
                                     "gdal": rasterio.__gdal_version__,
                                     "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}}
        import geoclip.scoring.score  # noqa: F401  (imported before the baseline, as in every phase)

        figures["rss_baseline_gib"] = round(RssSampler.rss() / 2**30, 3)  # interpreter + torch + GDAL, no data
        if not args.skip_read:
            figures["strips_only"] = strips_only(scene, args)
            print(f"strips only (GDAL decode): {figures['strips_only']}", flush=True)
            figures["read_only"] = read_only(scene, args)
            print(f"read-only (as scoring reads): {figures['read_only']}", flush=True)
        if args.per_band:
            folder = (Path(args.keep) if args.keep else work) / f"{Path(scene).stem}_per_band"
            started = time.perf_counter()
            product = per_band_product(scene, folder)
            figures["per_band_written_s"] = round(time.perf_counter() - started, 1)
            figures["read_only_per_band"] = read_only(product, args)
            stacked = figures.get("read_only", {}).get("megapixels_per_s")
            if stacked:
                figures["ratio_per_band_to_stacked_time"] = round(
                    stacked / figures["read_only_per_band"]["megapixels_per_s"], 3)
            print(f"read-only, per-band COGs (resampled per file): {figures['read_only_per_band']} "
                  f"(per-band/stacked time ratio {figures.get('ratio_per_band_to_stacked_time')}, goal <= 1.5)",
                  flush=True)
        if not args.skip_score and not args.skip_inference:
            predict_fn, _, what = make_predict_fn(args)
            figures["inference_only"] = {"model": what, **inference_only(predict_fn, *scene_windows(scene, args), args)}
            print(f"inference only: {figures['inference_only']}", flush=True)
        if not args.skip_score:
            figures["scoring"] = scoring(scene, args, work / "out")
            print(f"scoring:   {figures['scoring']}", flush=True)
        figures["peak_rss_gib_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
        score, read = figures.get("scoring", {}), figures.get("read_only", {})
        infer = figures.get("inference_only", {})
        if score and read:
            figures["ratio_scoring_to_read"] = round(score["megapixels_per_s"] / read["megapixels_per_s"], 4)
        if score and infer:
            figures["ratio_scoring_to_inference"] = round(score["megapixels_per_s"] / infer["megapixels_per_s"], 4)
        print(f"read-only {read.get('megapixels_per_s')} MP/s | inference-only {infer.get('megapixels_per_s')} MP/s | "
              f"scoring {score.get('megapixels_per_s')} MP/s | scoring/read {figures.get('ratio_scoring_to_read')}, "
              f"scoring/inference {figures.get('ratio_scoring_to_inference')} | peak RSS scoring {score.get('peak_rss_gib')} GiB, "
              f"process {figures['peak_rss_gib_process']} GiB, baseline {figures['rss_baseline_gib']} GiB")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
