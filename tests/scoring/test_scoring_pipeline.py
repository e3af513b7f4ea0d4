"""The scoring pipeline: strips read ahead by a pool of threads, inference ahead of writing, in bounded queues, and
outputs byte for byte those of the plain sequential loop."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from test_score import CLASSES, fake_predict, peak_traced_bytes, write_mixed_scene

import geoclip.scoring.scene_io
from geoclip.scoring.blend import blend_rows, write_outputs
from geoclip.scoring.pipeline import in_background, read_ahead
from geoclip.scoring.score import score_scene


def _sequential_outputs(scene: Path, out: Path, window: int, stride: int, batch: int) -> dict[str, bytes]:
    """The class map and probabilities written by the plain loop: one strip read after the other, inference and
    writing in one thread (scoring before the pipeline)."""
    out.mkdir(parents=True)
    outs = {"classmap": out / "mixed_classmap.tif", "probabilities": out / "mixed_probabilities.tif"}
    with rasterio.open(scene) as src:
        rows = blend_rows(fake_predict, src, len(CLASSES), window, stride, batch, 0, True, None, True)
        write_outputs(rows, src, outs, CLASSES, {"model_uri": "None", "scene": str(scene)}, None)
    return {k: p.read_bytes() for k, p in outs.items()}


@pytest.mark.parametrize("workers", [1, 3])
def test_outputs_are_the_bytes_of_the_sequential_loop(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(geoclip.scoring.scene_io, "MIN_STRIP_ROWS", 64)  # many strips in a small scene
    scene = tmp_path / "scenes" / "mixed.tif"
    write_mixed_scene(scene, 333, 170, tiled=True, blockxsize=32, blockysize=32)
    expected = _sequential_outputs(scene, tmp_path / "sequential", 64, 32, 16)
    summary = score_scene(fake_predict, scene, tmp_path / "piped", CLASSES, window=64, stride=32, batch_size=16,
                          quicklook=False, probabilities=True, read_workers=workers)
    assert Path(summary["classmap"]).read_bytes() == expected["classmap"]
    assert Path(summary["probabilities"]).read_bytes() == expected["probabilities"]


class SlowReader:
    """A rasterio dataset whose reads take a while and are counted: how many run at once, on which threads."""

    def __init__(self, path: Path, log: dict):
        self.src, self.log = rasterio.open(path), log
        log["opened"] += 1

    def read(self, window):
        with self.log["lock"]:
            self.log["running"] += 1
            self.log["most_at_once"] = max(self.log["most_at_once"], self.log["running"])
            self.log["threads"].add(threading.get_ident())
        time.sleep(0.02)
        try:
            return self.src.read(window=window)
        finally:
            with self.log["lock"]:
                self.log["running"] -= 1
                self.log["started"] += 1

    def close(self):
        self.log["closed"] += 1
        self.src.close()


def test_strips_are_read_in_parallel_in_order_and_never_far_ahead(tmp_path):
    scene = tmp_path / "mixed.tif"
    data = write_mixed_scene(scene, 300, 90)
    log = {"lock": threading.Lock(), "running": 0, "most_at_once": 0, "threads": set(), "started": 0, "opened": 0,
           "closed": 0}
    ahead = []
    got = []
    for r0, strip in read_ahead(lambda: SlowReader(scene, log), 300, 90, 32, workers=3):
        ahead.append(log["started"] - len(got))  # strips read, or being read, beyond those handed out
        time.sleep(0.03)  # a consumer slower than the readers
        got.append((r0, strip))
    assert [r for r, _ in got] == list(range(0, 300, 32))
    assert np.array_equal(np.concatenate([s for _, s in got], axis=1), data)
    assert log["most_at_once"] == 3 and len(log["threads"]) == 3  # decoding spread over the pool
    assert max(ahead) <= 3 + 1  # bounded: workers + 1 strips in flight
    assert log["opened"] == log["closed"] == 3  # a handle per thread, all closed


def test_a_failed_read_reaches_the_consumer_and_closes_every_handle(tmp_path):
    scene = tmp_path / "mixed.tif"
    write_mixed_scene(scene, 300, 90)
    log = {"lock": threading.Lock(), "running": 0, "most_at_once": 0, "threads": set(), "started": 0, "opened": 0,
           "closed": 0}

    class Failing(SlowReader):
        def read(self, window):
            if window.row_off == 128:
                raise OSError("block 4 is corrupt")
            return super().read(window)

    with pytest.raises(OSError, match="block 4 is corrupt"):
        for _ in read_ahead(lambda: Failing(scene, log), 300, 90, 32, workers=2):
            pass
    assert log["opened"] == log["closed"] > 0


def test_in_background_hands_items_on_in_order_and_raises_the_producers_error():
    assert list(in_background(iter(range(100)), depth=2)) == list(range(100))

    def failing():
        yield 1
        raise ValueError("model output: shape (3, 2), expected (3, 10)")

    got = []
    with pytest.raises(ValueError, match="shape"):
        got.extend(in_background(failing()))
    assert got == [1]


def test_a_consumer_that_stops_stops_the_producer_and_runs_its_clean_up():
    produced, cleaned = [], threading.Event()

    def endless():
        try:
            i = 0
            while True:
                produced.append(i)
                yield i
                i += 1
        finally:
            cleaned.set()

    items = in_background(endless(), depth=2)
    assert [next(items) for _ in range(5)] == [0, 1, 2, 3, 4]
    items.close()  # as when the writer fails
    assert cleaned.wait(5)
    assert len(produced) <= 5 + 2 + 1  # bounded: never more than depth ahead (plus the one being put)


def test_memory_with_many_readers_follows_the_strips_in_flight_not_the_scene(tmp_path):
    from factories import write_scene

    scene = tmp_path / "tall" / "s.tif"
    write_scene(scene, h=16384, w=128)  # 55 MB of pixels; 64 strips of 0.9 MB, at most 6 + 1 of them read ahead
    peak = peak_traced_bytes(score_scene, fake_predict, scene, tmp_path / "out", CLASSES, batch_size=32,
                             quicklook=False, probabilities=True, read_workers=6)
    # The strips read ahead, one being cut into windows and the rows it leaves for the next, the window batch, and
    # room for blending, writing and whatever else the process allocates meanwhile: 15.4 MB measured alone, 17.3 MB
    # after other tests. Each reader thread used to check the scene's values again on its own handle, all at once:
    # 28-38 MB. The whole scene would be 55 MB.
    strip, batch = 13 * 256 * 128 * 2, 32 * 13 * 64 * 64 * 2
    assert peak < (6 + 1 + 2) * strip + batch + 10e6, peak
