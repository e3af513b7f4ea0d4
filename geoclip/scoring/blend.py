"""From window predictions to output rasters: blend overlapping windows per stride cell, stream the final rows
into a class-map (and per-class probability, and novelty) GeoTIFF in block-aligned strips, then copy them into COGs.

Only the cell rows that later windows can still touch are held, so memory follows the strip being read and
the window batch, not the scene.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import rasterio
from rasterio.windows import Window
from tqdm import tqdm

from geoclip.errors import GeoclipError
from geoclip.scoring.scene_io import COG_BLOCK, AlignedWriter, gdal_path, scan_windows, to_cog

# Probabilities (N, C) for a batch of windows, or a dict with "probabilities", "embeddings" (N, D), "novelty" (N,).
PredictFn = Callable[[np.ndarray], np.ndarray | dict]
EmbeddingSink = Callable[[list[tuple[int, int]], np.ndarray], None]
NODATA_CLASS = 255
PROB_SCALE = 254  # probability rasters: 0-254 = probability 0-1, so that 255 stays free for nodata
NOVELTY_DESCRIPTION = ("novelty (open-set score): 0 = as close to a class prompt as validation tiles are to their "
                       "own class, 1 = farther from every class than all of them; 0-254 = 0-1")


# matplotlib's tab20 palette (tab10 is every other colour), written out so scoring needs no matplotlib.
TAB20 = ["1f77b4", "aec7e8", "ff7f0e", "ffbb78", "2ca02c", "98df8a", "d62728", "ff9896", "9467bd", "c5b0d5",
         "8c564b", "c49c94", "e377c2", "f7b6d2", "7f7f7f", "c7c7c7", "bcbd22", "dbdb8d", "17becf", "9edae5"]


def class_colors(n: int) -> np.ndarray:
    """``(n, 3)`` uint8 display colours for class indices: tab10 up to 10 classes, else tab20 (repeating)."""
    palette = TAB20[::2] if n <= 10 else TAB20
    return np.array([list(bytes.fromhex(palette[i % len(palette)])) for i in range(n)], dtype=np.uint8).reshape(n, 3)


class BlendedRows(NamedTuple):
    """Final rows of a scene's outputs, top to bottom."""

    row: int  # first scene row
    classes: np.ndarray  # (n, width) uint8 class indices; NODATA_CLASS where the input is nodata
    probabilities: np.ndarray | None  # (classes, n, width) uint8, 0..PROB_SCALE; NODATA_CLASS likewise
    novelty: np.ndarray | None = None  # (n, width) uint8 novelty 0..PROB_SCALE (0 familiar); NODATA_CLASS likewise


def _grow(acc: np.ndarray, hits: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad the cell sums and hit counts with zero rows up to ``rows`` rows."""
    extra = rows - hits.shape[0]
    if extra <= 0:
        return acc, hits
    return (np.concatenate([acc, np.zeros((acc.shape[0], extra, acc.shape[2]), acc.dtype)], axis=1),
            np.concatenate([hits, np.zeros((extra, hits.shape[1]), hits.dtype)]))


def _cells_to_rows(acc: np.ndarray, hits: np.ndarray, valid: np.ndarray, stride: int,
                   probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Cell sums -> pixel rows: argmax class (and scaled mean probabilities), NODATA_CLASS where nothing is valid."""
    n, w = valid.shape
    classes = acc.argmax(axis=0).astype(np.uint8)
    classes[hits == 0] = NODATA_CLASS  # only all-nodata windows covered it
    pixels = np.repeat(np.repeat(classes, stride, 0), stride, 1)[:n, :w]
    pixels[~valid] = NODATA_CLASS
    if not probabilities:
        return pixels, None
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = np.rint(acc / hits * PROB_SCALE)
    probs = np.where(hits > 0, scaled, NODATA_CLASS).astype(np.uint8)
    probs = np.repeat(np.repeat(probs, stride, 1), stride, 2)[:, :n, :w]
    probs[:, ~valid] = NODATA_CLASS
    return pixels, probs


def _lerp_weights(start: int, stop: int, stride: int, n_cells: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For pixels ``start..stop`` along one axis: the two cells whose centres bracket each pixel's centre (clamped
    to the grid) and the second one's weight."""
    f = (np.arange(start, stop) + 0.5) / stride - 0.5
    lo = np.floor(f).astype(np.int64)
    return np.clip(lo, 0, n_cells - 1), np.clip(lo + 1, 0, n_cells - 1), (f - lo).astype(np.float32)


def _smooth_rows(acc: np.ndarray, hits: np.ndarray, c0: int, y0: int, y1: int, stride: int, n_cell_rows: int,
                 valid: np.ndarray, probabilities: bool, chunk: int = 16) -> tuple[np.ndarray, np.ndarray | None]:
    """Pixel rows ``y0..y1``: window probabilities blended per cell, interpolated bilinearly between cell centres
    (cells no window covered carry no weight), then the argmax class; NODATA_CLASS where nothing is valid."""
    n_classes, w = acc.shape[0], valid.shape[1]
    covered = (hits > 0).astype(np.float32)
    weighted = np.where(hits > 0, acc / np.maximum(hits, 1), 0).astype(np.float32)  # cell mean x covered
    q0, q1, wx = _lerp_weights(0, w, stride, acc.shape[2])
    classes = np.empty((y1 - y0, w), np.uint8)
    probs = np.empty((n_classes, y1 - y0, w), np.uint8) if probabilities else None
    for a in range(y0, y1, chunk):  # a few rows at a time: (classes, rows, width) floats stay in cache
        b = min(a + chunk, y1)
        r0, r1, wy = _lerp_weights(a, b, stride, n_cell_rows)
        r0, r1, wy = r0 - c0, r1 - c0, wy[:, None]
        # Bilinear weights are separable: blend between cell rows at cell resolution, then between cell columns.
        num_cells = weighted[:, r0] * (1 - wy) + weighted[:, r1] * wy
        den_cells = covered[r0] * (1 - wy) + covered[r1] * wy
        num = num_cells[:, :, q0] * (1 - wx) + num_cells[:, :, q1] * wx
        den = den_cells[:, q0] * (1 - wx) + den_cells[:, q1] * wx
        part = num.argmax(axis=0).astype(np.uint8)  # the weights' sum (den) is the same for every class
        nothing = (den <= 0) | ~valid[a - y0:b - y0]
        part[nothing] = NODATA_CLASS
        classes[a - y0:b - y0] = part
        if probs is not None:
            scaled = np.rint(num / np.maximum(den, 1e-12) * PROB_SCALE).astype(np.uint8)
            scaled[:, nothing] = NODATA_CLASS
            probs[:, a - y0:b - y0] = scaled
    return classes, probs


def blend_rows(predict_fn: PredictFn, src, n_classes: int, window: int, stride: int, batch_size: int, nodata: int,
               probabilities: bool = False, embeddings: EmbeddingSink | None = None,
               full_resolution: bool = False, strips: Iterable[tuple[int, np.ndarray]] | None = None,
               novelty: bool = False) -> Iterator[BlendedRows]:
    """Average overlapping window probabilities on a grid of ``stride`` cells; yield final output rows top to bottom.

    ``full_resolution``: each pixel's probabilities are interpolated between the cell centres around it (smooth
    class boundaries at the input's resolution), else each cell is one class. Only the cell rows that later windows
    (or the interpolation) can still need are held: memory follows the strip, not the scene. ``embeddings``
    receives each batch's window positions and embeddings (``predict_fn`` must return them). ``strips``: the scene's
    strips being read elsewhere (see geoclip.scoring.scene_io.scan_windows). ``novelty``: also blend each window's
    open-set score (``predict_fn`` must return ``novelty`` (N,) in [0, 1]) the same way, into ``BlendedRows.novelty``.
    """
    gw, gh = math.ceil(src.width / stride), math.ceil(src.height / stride)
    acc, hits = np.zeros((n_classes, 0, gw), np.float32), np.zeros((0, gw), np.int32)
    acc_n = np.zeros((1, 0, gw), np.float32)  # novelty sums per cell (only with ``novelty``)
    c0 = done = 0  # first cell row held; first scene row not yet yielded
    valid = np.zeros((0, src.width), bool)  # rows [done, settled): settled but not yet yielded
    with tqdm(total=src.height, desc=f"score {Path(src.name).name}", unit="row") as bar:
        for batch in scan_windows(src, window, stride, batch_size, nodata, strips):
            if batch.where:
                out = predict_fn(batch.tiles)
                probs = np.asarray(out["probabilities"] if isinstance(out, dict) else out)
                if embeddings is not None:
                    if not isinstance(out, dict) or "embeddings" not in out:
                        raise GeoclipError("model output: no embeddings to write (score.embeddings is on)")
                    embeddings(batch.where, np.asarray(out["embeddings"]))
                if probs.shape != (len(batch.where), n_classes):
                    raise GeoclipError(f"model output: shape {probs.shape}, expected ({len(batch.where)}, {n_classes})")
                rows_now = -(-(batch.where[-1][0] + window) // stride) - c0  # rows come in order
                if novelty:  # grown before acc: both follow the same hits
                    acc_n = _grow(acc_n, hits, rows_now)[0]
                    scores = _novelty(out, len(batch.where))
                acc, hits = _grow(acc, hits, rows_now)
                for i, ((y0, x0), p) in enumerate(zip(batch.where, probs)):
                    r0, r1 = y0 // stride - c0, -(-(y0 + window) // stride) - c0
                    q0, q1 = x0 // stride, -(-(x0 + window) // stride)
                    acc[:, r0:r1, q0:q1] += p[:, None, None]
                    if novelty:
                        acc_n[0, r0:r1, q0:q1] += scores[i]
                    hits[r0:r1, q0:q1] += 1
            valid = np.concatenate([valid, batch.valid])
            last = batch.settled >= src.height
            # Interpolated rows need the cell below their own to be final: the lower half of the last settled cell
            # row waits for the next one.
            end = batch.settled if last or not full_resolution else batch.settled - stride // 2
            if end <= done:
                continue
            rows_now = (gh if last else -(-batch.settled // stride)) - c0
            if novelty:
                acc_n = _grow(acc_n, hits, rows_now)[0]
            acc, hits = _grow(acc, hits, rows_now)
            n = end - done
            nov = None
            if full_resolution:
                classes, scaled = _smooth_rows(acc, hits, c0, done, end, stride, gh, valid[:n], probabilities)
                if novelty:
                    nov = _smooth_rows(acc_n, hits, c0, done, end, stride, gh, valid[:n], True)[1][0]
                keep = max(0, math.floor((end + 0.5) / stride - 0.5))  # the first cell row the next rows need
            else:
                c1 = -(-end // stride) - c0
                classes, scaled = _cells_to_rows(acc[:, :c1], hits[:c1], valid[:n], stride, probabilities)
                if novelty:
                    nov = _cells_to_rows(acc_n[:, :c1], hits[:c1], valid[:n], stride, True)[1][0]
                keep = c0 + c1
            yield BlendedRows(done, classes, scaled, nov)
            acc, acc_n, hits, c0 = acc[:, keep - c0:], acc_n[:, keep - c0:], hits[keep - c0:], keep
            valid = valid[n:]
            bar.update(n)
            done = end


def _novelty(out, n: int) -> np.ndarray:
    """The ``novelty`` (N,) of a batch's model output, checked: finite, in [0, 1]."""
    if not isinstance(out, dict) or "novelty" not in out:
        raise GeoclipError("model output: no novelty to write (the model predates open-set scores)")
    scores = np.asarray(out["novelty"], np.float32)
    if scores.shape != (n,) or not np.isfinite(scores).all():
        raise GeoclipError(f"model output: novelty of shape {scores.shape}, expected ({n},) finite values (a model "
                           "without open-set calibration gives NaN)")
    return np.clip(scores, 0.0, 1.0)


def _temp_beside(out: Path) -> Path:
    """A hidden temporary file name beside ``out`` (for the plain GeoTIFF a COG is copied from)."""
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".gtiff.tmp", dir=out.parent)
    os.close(fd)
    return Path(name)


def write_outputs(rows: Iterator[BlendedRows], src, outs: dict[str, Path], class_names: list[str], tags: dict,
                  truth: str | None, row_area: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Stream blended rows into plain tiled GeoTIFFs, then copy them into COGs at ``outs`` (class map,
    probabilities, novelty); return class pixel counts, class areas (m², from ``row_area``: one pixel's area in each row;
    default 1), pixels agreeing with the truth map, and pixels judged."""
    h, w = src.height, src.width
    base = {"driver": "GTiff", "dtype": "uint8", "width": w, "height": h, "crs": src.crs, "transform": src.transform,
            "nodata": NODATA_CLASS, "tiled": True, "blockxsize": COG_BLOCK, "blockysize": COG_BLOCK,
            "compress": "deflate"}
    counts, areas = np.zeros(256, np.int64), np.zeros(256)
    row_area = np.ones(h) if row_area is None else np.asarray(row_area, np.float64)
    correct = judged = 0
    plains = {k: _temp_beside(p) for k, p in outs.items()}
    truth_src = rasterio.open(gdal_path(truth)) if truth else None
    try:
        if truth_src is not None and (truth_src.height, truth_src.width) != (h, w):
            raise GeoclipError(f"{truth}: {truth_src.width}x{truth_src.height}, expected the scene's {w}x{h}")
        with contextlib.ExitStack() as files:  # the plain files are closed before they are copied
            bands = {k: len(class_names) if k == "probabilities" else 1 for k in plains}
            dsts = {k: files.enter_context(rasterio.open(p, "w", **base, count=bands[k])) for k, p in plains.items()}
            writers = {k: AlignedWriter(d) for k, d in dsts.items()}
            for part in rows:
                writers["classmap"].write(part.classes[None])
                if "probabilities" in writers:
                    writers["probabilities"].write(part.probabilities)
                if "novelty" in writers:
                    writers["novelty"].write(part.novelty[None])
                counts += np.bincount(part.classes.ravel(), minlength=256)
                n = part.classes.shape[0]
                areas += np.bincount(part.classes.ravel(), np.repeat(row_area[part.row:part.row + n], w), 256)
                if truth_src is not None:
                    t = truth_src.read(1, window=Window(0, part.row, w, part.classes.shape[0]))
                    judge = (t != NODATA_CLASS) & (part.classes != NODATA_CLASS)
                    correct += int((t[judge] == part.classes[judge]).sum())
                    judged += int(judge.sum())
            for writer in writers.values():
                writer.close()
            _describe(dsts, class_names, tags)
        # MODE: an overview pixel takes its area's majority class, never a blend of class indices.
        to_cog(plains["classmap"], outs["classmap"], "MODE")
        if "probabilities" in outs:
            to_cog(plains["probabilities"], outs["probabilities"], "AVERAGE")
        if "novelty" in outs:
            to_cog(plains["novelty"], outs["novelty"], "AVERAGE")
    finally:
        for p in plains.values():
            p.unlink(missing_ok=True)
        if truth_src is not None:
            truth_src.close()
    return counts, areas, correct, judged


def _describe(dsts: dict, class_names: list[str], tags: dict) -> None:
    """Colour table, band descriptions and tags of the class map (and probability raster) being written."""
    cm = dsts["classmap"]
    colors = class_colors(len(class_names))
    cm.write_colormap(1, {i: (*map(int, c), 255) for i, c in enumerate(colors)} | {NODATA_CLASS: (0, 0, 0, 0)})
    cm.set_band_description(1, "class: " + ", ".join(f"{i}={c}" for i, c in enumerate(class_names)))
    cm.update_tags(class_names=json.dumps(class_names), **tags)
    if "probabilities" in dsts:
        pr = dsts["probabilities"]
        for i, name in enumerate(class_names):
            pr.set_band_description(i + 1, name)
        pr.scales = [1 / PROB_SCALE] * len(class_names)  # GDAL-aware readers get probabilities 0-1 back
        pr.update_tags(class_names=json.dumps(class_names), probability_scale=str(PROB_SCALE), **tags)
    if "novelty" in dsts:
        nv = dsts["novelty"]
        nv.set_band_description(1, NOVELTY_DESCRIPTION)
        nv.scales = [1 / PROB_SCALE]  # GDAL-aware readers get novelty 0-1 back
        nv.update_tags(class_names=json.dumps(class_names), novelty_scale=str(PROB_SCALE), **tags)
