"""Scene I/O for scoring: block-aligned strip reads, window batches, aligned strip writes, COGs, GDAL's /vsis3/.

Reading a tiled scene one window row at a time decodes every block ``block_height / stride`` times (8 times for
256-px blocks and a 32-px stride) unless GDAL's block cache holds whole block rows, and that cache then grows to
5% of the machine's RAM. Here each strip of whole block rows is read once, its windows are copied into a reused
batch buffer, and GDAL's cache is kept small: memory follows the strip and the batch, not the scene.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window

from geoclip.data import s3
from geoclip.data.s3 import gdal_path  # noqa: F401  (part of this module's API)
from geoclip.ioutils import atomic_path

MIN_STRIP_ROWS = 256  # rows per read at least (rounded up to whole blocks): few, large reads
MAX_STRIP_ROWS = 2048  # a file whose blocks are taller (one strip per image) is read in parts instead
GDAL_CACHE_MB = 64  # each block is decoded once, so GDAL's block cache need not hold the scene
COG_BLOCK = 256


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis: every ``stride``, plus a last one shifted inward to reach the edge."""
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def gdal_s3_options() -> dict[str, str]:
    """GDAL settings for a custom S3 endpoint (moto, MinIO) from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return {}  # AWS itself: GDAL's defaults (HTTPS, virtual-hosted buckets)
    url = urlparse(endpoint)
    # GDAL wants host:port; path-style addressing because a local endpoint has no per-bucket host names.
    return {"AWS_S3_ENDPOINT": url.netloc or url.path, "AWS_HTTPS": "NO" if url.scheme == "http" else "YES",
            "AWS_VIRTUAL_HOSTING": "FALSE"}


#: How GDAL's /vsis3/ (curl) gives up on a stalled or dead endpoint instead of hanging: a connect timeout, a
#: request timeout, a low-speed cut-off (under 1 byte/s for a minute) and a few retries with a delay. Each can be
#: set in the environment instead (GDAL reads the same names), which wins over these defaults.
HTTP_STALL_OPTIONS = {"GDAL_HTTP_CONNECTTIMEOUT": "30", "GDAL_HTTP_TIMEOUT": "600", "GDAL_HTTP_LOW_SPEED_TIME": "60",
                      "GDAL_HTTP_LOW_SPEED_LIMIT": "1", "GDAL_HTTP_MAX_RETRY": "3", "GDAL_HTTP_RETRY_DELAY": "5"}


def http_stall_options() -> dict[str, str]:
    """:data:`HTTP_STALL_OPTIONS` without those the environment already sets."""
    return {k: v for k, v in HTTP_STALL_OPTIONS.items() if k not in os.environ}


def scene_envs(*uris: str | Path | None) -> Callable[[], rasterio.Env]:
    """A maker of rasterio environments for scoring ``uris`` (see :func:`scene_env`), for threads that each need
    their own (GDAL settings are per thread): the S3 session and settings are made once, here, not per read."""
    options: dict = {"GDAL_CACHEMAX": GDAL_CACHE_MB}
    if not any(u is not None and s3.is_s3(u) for u in uris):
        return lambda: rasterio.Env(**options)
    import boto3
    from rasterio.session import AWSSession

    extra = gdal_s3_options() | http_stall_options()
    session = AWSSession(boto3.Session(), endpoint_url=extra.pop("AWS_S3_ENDPOINT", None))
    # EMPTY_DIR: no bucket listing to look for sidecar files on every open.
    return lambda: rasterio.Env(session=session, GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR", **options, **extra)


def scene_env(*uris: str | Path | None) -> rasterio.Env:
    """A rasterio environment for scoring: a small GDAL block cache and, when any of ``uris`` is on S3, /vsis3/
    access with boto3's credentials (environment, profile or instance role), the endpoint from the environment and
    timeouts that end a stalled read (:data:`HTTP_STALL_OPTIONS`)."""
    return scene_envs(*uris)()


def strip_rows(src, window: int) -> int:
    """Rows per read: whole blocks of the file, at least one window and ``MIN_STRIP_ROWS``."""
    block_h = src.block_shapes[0][0]
    need = max(window, MIN_STRIP_ROWS)
    if block_h > MAX_STRIP_ROWS:
        return max(need, MAX_STRIP_ROWS)
    return block_h * math.ceil(need / block_h)


class WindowBatch(NamedTuple):
    """Windows read from a scene, and how far down the scene everything is known."""

    tiles: np.ndarray  # (n, bands, window, window): a reused buffer, valid until the next batch is asked for
    where: list[tuple[int, int]]  # (row, col) of each tile's top-left pixel
    settled: int  # once these tiles are used, no later window touches a stride cell above this row
    valid: np.ndarray  # (rows, width) bool, "some band is not nodata", for the rows newly settled by this batch


def scan_windows(src, window: int, stride: int, batch_size: int, nodata: int,
                 strips: Iterable[tuple[int, np.ndarray]] | None = None) -> Iterator[WindowBatch]:
    """The scene's windows (all-nodata ones skipped) in batches, row by row, read in block-aligned strips.

    Each block is decoded once: the rows still needed by the next window row stay in memory between strips.
    Batches may be empty: they then only report newly settled rows. ``strips``: the strips of :func:`strip_rows`
    rows, ``(first row, data)`` top to bottom, already being read (geoclip.scoring.pipeline.read_ahead); default:
    read here, one after the other.
    """
    h, w = src.height, src.width
    rows = strip_rows(src, window)
    if strips is None:
        strips = ((r0, src.read(window=Window(0, r0, w, min(rows, h - r0)))) for r0 in range(0, h, rows))
    ys, xs = window_starts(h, window, stride), np.asarray(window_starts(w, window, stride))
    batch = np.empty((batch_size, src.count, window, window), dtype=src.dtypes[0])
    where: list[tuple[int, int]] = []
    buf, buf0 = np.empty((src.count, 0, w), batch.dtype), 0  # scene rows [buf0, buf0 + rows held)
    valid, valid0 = np.empty((0, w), bool), 0
    settled, yi = 0, 0

    def report(n: int, new_settled: int) -> WindowBatch:
        nonlocal settled
        item = WindowBatch(batch[:n], where[:n], new_settled, valid[settled - valid0:new_settled - valid0])
        settled = new_settled
        del where[:n]
        return item

    for _, chunk in strips:
        buf = np.concatenate([buf, chunk], axis=1)
        valid = np.concatenate([valid, np.any(chunk != nodata, axis=0)])
        del chunk
        end = buf0 + buf.shape[1]
        while yi < len(ys) and ys[yi] + window <= end:
            y0 = ys[yi]
            cols = valid[y0 - valid0:y0 - valid0 + window].any(axis=0)
            seen = np.concatenate([[0], np.cumsum(cols)])
            for x0 in xs[seen[xs + window] > seen[xs]]:  # windows with a valid pixel
                batch[len(where)] = buf[:, y0 - buf0:y0 - buf0 + window, x0:x0 + window]
                where.append((y0, int(x0)))
                if len(where) == batch_size:
                    yield report(batch_size, y0 // stride * stride)  # the rest of this row is still to come
            yi += 1
        first = where[0][0] if where else ys[yi] if yi < len(ys) else h
        if first // stride * stride > settled and first < h:
            yield report(0, first // stride * stride)  # pending tiles stay in the buffer
        keep = ys[yi] - buf0 if yi < len(ys) else buf.shape[1]
        buf, buf0 = buf[:, keep:], buf0 + keep  # rows no later window needs
        valid, valid0 = valid[settled - valid0:], settled
    yield report(len(where), h)


class AlignedWriter:
    """Write rows to a dataset in chunks of whole blocks, so no compressed block is written twice."""

    def __init__(self, dst, rows: int = COG_BLOCK):
        self.dst, self.rows = dst, rows
        self.pending: list[np.ndarray] = []
        self.row = 0  # first row not yet written

    def write(self, data: np.ndarray | None) -> None:
        """Queue ``(bands, n, width)`` rows (the next ones down); write every whole block row queued."""
        if data is not None:
            self.pending.append(data)
        queued = sum(p.shape[1] for p in self.pending)
        n = queued if data is None else queued // self.rows * self.rows
        if n:
            block = np.concatenate(self.pending, axis=1)
            self.dst.write(block[:, :n], window=Window(0, self.row, self.dst.width, n))
            self.pending = [block[:, n:]] if n < queued else []
            self.row += n

    def close(self) -> None:
        """Write what is left."""
        self.write(None)


def to_cog(plain: str | Path, out: Path, resampling: str) -> Path:
    """Copy a tiled GeoTIFF into a Cloud-Optimised GeoTIFF at ``out`` (atomically), overviews down to one block."""
    with rasterio.open(plain) as src:
        levels = max(1, math.ceil(math.log2(max(src.height, src.width) / COG_BLOCK)))
    with atomic_path(out) as tmp:
        rasterio.shutil.copy(plain, tmp, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=COG_BLOCK,
                             OVERVIEW_RESAMPLING=resampling, OVERVIEW_COUNT=levels)
    return out
