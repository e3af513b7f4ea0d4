"""Scoring as a pipeline: strips decoded by a pool of reader threads ahead of inference, inference ahead of writing.

GDAL decodes a strip on one core and rasterio, numpy and torch release the GIL in their heavy parts, so threads
overlap the three stages and spread decoding over the machine's cores. Every queue is bounded: memory follows the
strips and batches in flight, not the scene. Items come out in order, so the outputs are the same bytes as a
sequential run's.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager

import numpy as np
from rasterio.windows import Window

_DONE = object()


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and schedulers set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def read_ahead(open_src: Callable[[], AbstractContextManager], height: int, width: int, rows: int, workers: int,
               env: Callable[[], AbstractContextManager] = contextlib.nullcontext) -> Iterator[tuple[int, np.ndarray]]:
    """The scene's strips of ``rows`` rows, ``(first row, (bands, n, width) array)``, top to bottom, read by
    ``workers`` threads, at most ``workers + 1`` strips ahead of the consumer.

    Each thread reads through its own handle from ``open_src()`` (a GDAL dataset must not be shared between
    threads), inside ``env()`` (GDAL settings such as S3 access are per thread).
    """
    local, opened, lock = threading.local(), [], threading.Lock()

    def read(r0: int) -> np.ndarray:
        with env():
            src = getattr(local, "src", None)
            if src is None:
                src = local.src = open_src()
                with lock:
                    opened.append(src)
            return src.read(window=Window(0, r0, width, min(rows, height - r0)))

    starts = iter(range(0, height, rows))
    pending: deque = deque()
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="geoclip-read")
    try:
        for r0 in starts:
            pending.append((r0, pool.submit(read, r0)))
            if len(pending) > workers:
                break
        while pending:
            r0, future = pending.popleft()
            data = future.result()
            following = next(starts, None)
            if following is not None:
                pending.append((following, pool.submit(read, following)))
            yield r0, data
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True)
        for src in opened:
            src.close()


def in_background(items: Iterator, depth: int = 2, name: str = "geoclip-score") -> Iterator:
    """Run the iterator ``items`` in a thread of its own, at most ``depth`` items ahead of the consumer; its
    exceptions reach the consumer, and a consumer that stops (or fails) stops it."""
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as exc:  # noqa: BLE001 (handed to the consumer, raised there)
            put((_DONE, exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator's own clean-up (its reader threads) runs in the thread that ran it

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        while True:
            item, exc = handoff.get()
            if exc is not None:
                raise exc
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        worker.join()
