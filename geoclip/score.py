"""Sliding-window scoring of large scenes: blended class maps as Cloud-Optimised GeoTIFFs, area summaries."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.windows import Window
from tqdm import tqdm

from geoclip import s3
from geoclip.config import Params
from geoclip.errors import GeoclipError
from geoclip.ioutils import atomic_path, write_json

PredictFn = Callable[[np.ndarray], np.ndarray]
NODATA_CLASS = 255
COG_BLOCK = 256
SCENE_SUFFIXES = (".tif", ".tiff")
SCENE_DTYPE = "uint16"  # the digital numbers the model reads (also the scenes suite's dtype rule)
SUMMARY_FILE = "summary.json"


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis: every ``stride``, plus a last one shifted inward to reach the edge."""
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def class_colors(n: int) -> np.ndarray:
    """``(n, 3)`` uint8 display colours for class indices (tab10/tab20)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return np.array([[round(255 * v) for v in cmap(i % cmap.N)[:3]] for i in range(n)], dtype=np.uint8)


def pixel_area_m2(src, scene: Path | str) -> float:
    """Area of one pixel in m²; the scene must be in a projected CRS measured in metres."""
    crs = src.crs
    if crs is None or not crs.is_projected or crs.linear_units_factor[1] != 1.0:
        raise GeoclipError(f"{scene}: CRS {crs.to_string() if crs else None} is not a projected CRS in metres; "
                           "reproject the scene (e.g. to UTM) to get areas")
    t = src.transform
    return abs(t.a * t.e - t.b * t.d)


def _open_scene(scene: Path, n_bands: int, window: int):
    """Open a scene and check bands, dtype and size against the model (a guard for direct callers of score_scene;
    score_one and score_scenes first run the scenes suite, :func:`check_scenes`, on the same rules)."""
    try:
        src = rasterio.open(scene)
    except RasterioIOError as exc:
        raise GeoclipError(f"{scene}: cannot be read as a raster ({str(exc).splitlines()[0]})") from exc
    if src.count != n_bands:
        src.close()
        raise GeoclipError(f"{scene}: has {src.count} band(s), the model expects {n_bands}")
    if src.height < window or src.width < window:
        src.close()
        raise GeoclipError(f"{scene}: {src.width}x{src.height} pixels is smaller than one {window}x{window} window")
    if src.dtypes[0] != SCENE_DTYPE:
        src.close()
        raise GeoclipError(f"{scene}: dtype {src.dtypes[0]}, expected {SCENE_DTYPE} digital numbers")
    return src


def blend_probabilities(predict_fn: PredictFn, src, n_classes: int, window: int, stride: int, batch_size: int,
                        nodata: int) -> tuple[np.ndarray, np.ndarray]:
    """Average window probabilities on a grid of ``stride`` cells; return ``(C, gh, gw)`` sums and hit counts."""
    h, w = src.height, src.width
    acc = np.zeros((n_classes, math.ceil(h / stride), math.ceil(w / stride)), np.float32)
    hits = np.zeros(acc.shape[1:], np.int32)
    ys, xs = window_starts(h, window, stride), window_starts(w, window, stride)
    tiles: list[np.ndarray] = []
    where: list[tuple[int, int]] = []

    def flush() -> None:
        probs = np.asarray(predict_fn(np.stack(tiles)))
        if probs.shape != (len(tiles), n_classes):
            raise GeoclipError(f"model output: shape {probs.shape}, expected ({len(tiles)}, {n_classes})")
        for (y0, x0), p in zip(where, probs):
            r0, r1 = y0 // stride, -(-(y0 + window) // stride)
            c0, c1 = x0 // stride, -(-(x0 + window) // stride)
            acc[:, r0:r1, c0:c1] += p[:, None, None]
            hits[r0:r1, c0:c1] += 1
        tiles.clear()
        where.clear()

    with tqdm(total=len(ys) * len(xs), desc=f"score {Path(src.name).name}", unit="win") as bar:
        for y0 in ys:
            strip = src.read(window=Window(0, y0, w, window))  # one strip of windows at a time
            valid = np.any(strip != nodata, axis=0)
            for x0 in xs:
                if valid[:, x0:x0 + window].any():  # all-nodata windows are not worth a prediction
                    tiles.append(strip[:, :, x0:x0 + window])
                    where.append((y0, x0))
                    if len(tiles) >= batch_size:
                        flush()
            bar.update(len(xs))
        if tiles:
            flush()
    return acc, hits


def _write_classmap(src, classes: np.ndarray, stride: int, nodata: int, out: Path, class_names: list[str],
                    tags: dict, truth: Path | None) -> tuple[np.ndarray, int, int]:
    """Expand cell classes to pixels (nodata -> 255), write a COG; return class counts, correct and truth pixels."""
    h, w = src.height, src.width
    profile = {"driver": "GTiff", "dtype": "uint8", "count": 1, "width": w, "height": h, "crs": src.crs,
               "transform": src.transform, "nodata": NODATA_CLASS, "tiled": True, "blockxsize": COG_BLOCK,
               "blockysize": COG_BLOCK, "compress": "deflate"}
    counts = np.zeros(256, np.int64)
    correct = judged = 0
    rows = stride * math.ceil(COG_BLOCK / stride)  # output strips aligned to cells
    truth_src = rasterio.open(truth) if truth else None
    if truth_src is not None and (truth_src.height, truth_src.width) != (h, w):
        truth_src.close()
        raise GeoclipError(f"{truth}: {truth_src.width}x{truth_src.height}, expected the scene's {w}x{h}")
    fd, plain = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".gtiff.tmp", dir=out.parent)
    os.close(fd)
    try:
        with rasterio.open(plain, "w", **profile) as dst:
            for r in range(0, h, rows):
                n = min(rows, h - r)
                block = np.repeat(np.repeat(classes[r // stride:-(-(r + n) // stride)], stride, 0), stride, 1)[:n, :w]
                block[np.all(src.read(window=Window(0, r, w, n)) == nodata, axis=0)] = NODATA_CLASS
                dst.write(block, 1, window=Window(0, r, w, n))
                counts += np.bincount(block.ravel(), minlength=256)
                if truth_src is not None:
                    t = truth_src.read(1, window=Window(0, r, w, n))
                    judge = (t != NODATA_CLASS) & (block != NODATA_CLASS)
                    correct += int((t[judge] == block[judge]).sum())
                    judged += int(judge.sum())
            colors = class_colors(len(class_names))
            dst.write_colormap(1, {i: (*map(int, c), 255) for i, c in enumerate(colors)} | {NODATA_CLASS: (0, 0, 0, 0)})
            dst.set_band_description(1, "class: " + ", ".join(f"{i}={c}" for i, c in enumerate(class_names)))
            dst.update_tags(class_names=json.dumps(class_names), **tags)
        levels = max(1, math.ceil(math.log2(max(h, w) / COG_BLOCK)))
        with atomic_path(out) as tmp:
            # MODE: an overview pixel takes its area's majority class, never a blend of class indices.
            rasterio.shutil.copy(plain, tmp, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=COG_BLOCK,
                                 OVERVIEW_RESAMPLING="MODE", OVERVIEW_COUNT=levels)
    finally:
        Path(plain).unlink(missing_ok=True)
        if truth_src is not None:
            truth_src.close()
    return counts, correct, judged


def write_quicklook(classmap: Path, out: Path, n_classes: int, max_size: int = 1024) -> Path:
    """A small PNG of a class map in class colours (nodata transparent), read from the COG's overviews."""
    from matplotlib.image import imsave

    with rasterio.open(classmap) as src:
        scale = max(1, math.ceil(max(src.height, src.width) / max_size))
        arr = src.read(1, out_shape=(math.ceil(src.height / scale), math.ceil(src.width / scale)),
                       resampling=Resampling.nearest)
    palette = np.zeros((256, 4), np.uint8)
    palette[:n_classes, :3] = class_colors(n_classes)
    palette[:n_classes, 3] = 255
    with atomic_path(out) as tmp:
        imsave(tmp, palette[arr], format="png")
    return out


def score_scene(predict_fn: PredictFn, scene: Path, out_dir: Path, class_names: list[str], window: int = 64,
                stride: int = 32, batch_size: int = 256, nodata: int = 0, n_bands: int = 13,
                model_uri: str | None = None, scene_name: str | None = None, quicklook: bool = True,
                truth: Path | None = None) -> dict:
    """Score one scene: blended class map (COG), per-class areas and, if a truth map exists, pixel accuracy."""
    scene, out_dir = Path(scene), Path(out_dir)
    if stride <= 0 or stride > window or window % stride:
        raise GeoclipError(f"stride {stride}: must be positive and divide the window ({window})")
    if not 2 <= len(class_names) < NODATA_CLASS:
        raise GeoclipError(f"class_names: {len(class_names)} classes; a uint8 class map holds 2 to {NODATA_CLASS - 1}")
    truth = Path(truth) if truth else scene.parent.parent / "truth" / f"{scene.stem}_truth.tif"
    truth = truth if truth.exists() else None
    started = time.perf_counter()
    with _open_scene(scene, n_bands, window) as src:
        area = pixel_area_m2(src, scene)  # fail before the long part
        acc, hits = blend_probabilities(predict_fn, src, len(class_names), window, stride, batch_size, nodata)
        classes = acc.argmax(axis=0).astype(np.uint8)
        classes[hits == 0] = NODATA_CLASS  # only all-nodata windows covered it
        out_dir.mkdir(parents=True, exist_ok=True)
        classmap = out_dir / f"{scene.stem}_classmap.tif"
        counts, correct, judged = _write_classmap(
            src, classes, stride, nodata, classmap, list(class_names),
            {"model_uri": str(model_uri), "scene": scene_name or str(scene)}, truth)
        h, w, crs = src.height, src.width, src.crs.to_string()
    seconds = time.perf_counter() - started
    summary = {
        "scene": scene_name or str(scene), "model_uri": model_uri, "classmap": str(classmap),
        "width": w, "height": h, "crs": crs, "pixel_area_m2": area, "window": window, "stride": stride,
        "class_names": list(class_names),
        "classes": {c: {"pixels": int(counts[i]), "area_km2": float(counts[i]) * area / 1e6}
                    for i, c in enumerate(class_names)},
        "nodata_pixels": int(counts[NODATA_CLASS]), "valid_pixels": int(h * w - counts[NODATA_CLASS]),
        "area_km2": float(h * w - counts[NODATA_CLASS]) * area / 1e6,
        "seconds": round(seconds, 3), "megapixels_per_s": round(h * w / 1e6 / max(seconds, 1e-9), 3),
    }
    if truth is not None:
        summary |= {"truth": str(truth), "truth_pixels": judged, "accuracy": correct / judged if judged else None}
    if quicklook:
        summary["quicklook"] = str(write_quicklook(classmap, out_dir / f"{scene.stem}_quicklook.png",
                                                   len(class_names)))
    summary["summary"] = str(out_dir / f"{scene.stem}_summary.json")
    write_json(summary["summary"], summary)
    return summary


# ---- many scenes, local or S3, with an MLflow pyfunc ----

_MODELS: dict[str, object] = {}
_MODELS_LOCK = threading.Lock()


def resolve_model_uri(model_uri: str) -> str:
    """Pin ``models:/name@alias`` to ``models:/name/<version>`` so every scene of a run uses the same model."""
    m = re.fullmatch(r"models:/([^/@]+)@([^/]+)", model_uri)
    if not m:
        return model_uri
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        version = MlflowClient().get_model_version_by_alias(m.group(1), m.group(2))
    except MlflowException as exc:
        raise GeoclipError(f"{model_uri}: no such registered model alias ({exc.message.splitlines()[0]}); "
                           "run `geoclip register` first") from exc
    return f"models:/{m.group(1)}/{version.version}"


def load_scoring_model(model_uri: str):
    """Load (once per process) the MLflow pyfunc at ``model_uri``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    with _MODELS_LOCK:
        if model_uri not in _MODELS:
            try:
                _MODELS[model_uri] = mlflow.pyfunc.load_model(model_uri)
            except (MlflowException, OSError) as exc:
                raise GeoclipError(f"{model_uri}: cannot load the model ({str(exc).splitlines()[0]})") from exc
        return _MODELS[model_uri]


def list_scenes(source: str | Path) -> list[str]:
    """The ``*.tif`` scenes in a local folder or under an ``s3://bucket/prefix`` (sorted)."""
    if s3.is_s3(source):
        found = s3.list_uris(str(source), SCENE_SUFFIXES)
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise GeoclipError(f"{folder}: no such folder; expected a folder of scenes or an s3:// prefix")
        found = [str(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in SCENE_SUFFIXES]
    if not found:
        raise GeoclipError(f"{source}: no .tif scenes found")
    return found


def _truth_uri(scene_uri: str) -> str:
    """Where a scene's truth map lives: ``truth/{stem}_truth.tif`` beside the scenes folder."""
    parent = scene_uri.rsplit("/", 2)[0]
    return f"{parent}/truth/{Path(scene_uri).stem}_truth.tif"


def check_scenes(params: Params, scenes: list[Path], n_bands: int, names: list[str] | None = None,
                 report: bool = False) -> None:
    """Run the scenes suite on local scene files (``names``: what to call them); GeoclipError before any scoring.

    ``report`` also writes ``scenes_validation.json`` and the scenes Data Docs under ``paths.reports``.
    """
    from geoclip.validate import validate_scenes

    reports = Path(params.paths.reports) if report else None
    validate_scenes(scenes, n_bands, params.score.window, reports, names=names, dtype=SCENE_DTYPE)


def model_input_bands(model_uri: str) -> list[str]:
    """The band names a logged geoclip pyfunc reads, from its MLmodel metadata (the model itself is not loaded)."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import get_model_info

    try:
        meta = get_model_info(model_uri).metadata or {}
    except (MlflowException, OSError) as exc:
        raise GeoclipError(f"{model_uri}: cannot load the model ({str(exc).splitlines()[0]})") from exc
    if not meta.get("input_band_names"):
        raise GeoclipError(f"{model_uri}: no input_band_names in its metadata; expected a model logged by geoclip.pyfunc")
    return list(meta["input_band_names"])


def score_one(params: Params, model, scene_uri: str, out_uri: str, model_uri: str | None = None,
              checked: bool = False) -> dict:
    """Score one local or S3 scene with a loaded pyfunc; write outputs to a local folder or S3 prefix.

    The scene first passes the scenes suite, unless ``checked`` says a local scene already did.
    """
    from geoclip.pyfunc import model_metadata

    meta = model_metadata(model)
    cfg = params.score

    def predict_fn(x: np.ndarray) -> np.ndarray:
        return model.predict(x, params={"batch_size": cfg.batch_size})["probabilities"]

    kwargs = dict(class_names=meta["class_names"], window=cfg.window, stride=cfg.stride, batch_size=cfg.batch_size,
                  nodata=cfg.nodata, n_bands=len(meta["input_band_names"]), model_uri=model_uri,
                  scene_name=str(scene_uri), quicklook=cfg.quicklook)
    if not s3.is_s3(scene_uri) and not checked:
        check_scenes(params, [Path(scene_uri)], kwargs["n_bands"])
    if not s3.is_s3(scene_uri) and not s3.is_s3(out_uri):
        return score_scene(predict_fn, Path(scene_uri), Path(out_uri), **kwargs)
    with tempfile.TemporaryDirectory(prefix="geoclip-score-") as tmp:
        scene = Path(scene_uri)
        if s3.is_s3(scene_uri):
            scene = s3.download(scene_uri, Path(tmp, "scenes", Path(scene_uri).name))
            check_scenes(params, [scene], kwargs["n_bands"], names=[scene_uri])
            if s3.exists(_truth_uri(scene_uri)):
                s3.download(_truth_uri(scene_uri), Path(tmp, "truth", f"{scene.stem}_truth.tif"))
        else:
            kwargs["truth"] = scene.parent.parent / "truth" / f"{scene.stem}_truth.tif"
        local_out = Path(tmp, "out") if s3.is_s3(out_uri) else Path(out_uri)
        summary = score_scene(predict_fn, scene, local_out, **kwargs)
        if s3.is_s3(out_uri):
            for key in ("classmap", "quicklook", "summary"):
                if key in summary:
                    summary[key] = s3.join(out_uri, Path(summary[key]).name)
            write_json(local_out / Path(summary["summary"]).name, summary)
            for key in ("classmap", "quicklook", "summary"):  # the summary last: it names the others
                if key in summary:
                    s3.upload(local_out / Path(summary[key]).name, summary[key])
    return summary


def write_summary(results: list[dict], out_uri: str, model_uri: str | None = None) -> str:
    """Aggregate per-scene summaries (areas, nodata, accuracy) into ``{out}/summary.json``; return its location."""
    names = results[0]["class_names"] if results else []
    total = {c: {"pixels": sum(r["classes"][c]["pixels"] for r in results),
                 "area_km2": sum(r["classes"][c]["area_km2"] for r in results)} for c in names}
    judged = sum(r.get("truth_pixels", 0) for r in results)
    correct = sum(r["accuracy"] * r["truth_pixels"] for r in results if r.get("accuracy") is not None)
    agg = {"model_uri": model_uri, "n_scenes": len(results), "scenes": [r["scene"] for r in results],
           "classes": total, "nodata_pixels": sum(r["nodata_pixels"] for r in results),
           "area_km2": sum(r["area_km2"] for r in results), "accuracy": correct / judged if judged else None,
           "per_scene": results}
    if s3.is_s3(out_uri):
        target = s3.join(out_uri, SUMMARY_FILE)
        with tempfile.TemporaryDirectory(prefix="geoclip-summary-") as tmp:
            write_json(Path(tmp, SUMMARY_FILE), agg)
            s3.upload(Path(tmp, SUMMARY_FILE), target)
        return target
    target = str(Path(out_uri) / SUMMARY_FILE)
    write_json(target, agg)
    return target


def score_scenes(params: Params, model_uri: str | None = None, source: str | None = None,
                 out_dir: str | None = None) -> list[dict]:
    """Score every scene of a folder or S3 prefix with the registered model; write per-scene and overall summaries."""
    from geoclip.tracking import configure

    scenes = list_scenes(source or params.score.scenes)  # a missing folder or bucket fails before anything else
    configure(params)
    uri = resolve_model_uri(model_uri or params.score.model_uri)
    local = [Path(s) for s in scenes if not s3.is_s3(s)]
    if local:  # every local scene passes the scenes suite before the model is loaded or any scene scored
        check_scenes(params, local, len(model_input_bands(uri)), report=True)
    model = load_scoring_model(uri)
    out = str(out_dir or params.paths.scores)
    results = [score_one(params, model, scene, out, model_uri=uri, checked=not s3.is_s3(scene)) for scene in scenes]
    write_summary(results, out, uri)
    return results
