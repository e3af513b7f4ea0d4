"""Full-resolution class maps: window probabilities interpolated between stride-cell centres, streamed in strips."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from factories import GEO
from test_score import CLASSES, fake_predict, write_mixed_scene

import geoclip.scoring.scene_io
from geoclip.scoring.score import PROB_SCALE, score_scene, window_starts


def reference_smooth(data: np.ndarray, window: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole-scene computation: mean window probabilities per stride cell, then for every pixel the bilinear
    mix of the four cells around its centre (cells no window covered weigh nothing) and its argmax."""
    _, h, w = data.shape
    gh, gw = -(-h // stride), -(-w // stride)
    acc = np.zeros((len(CLASSES), gh, gw))
    hits = np.zeros((gh, gw))
    for y0 in window_starts(h, window, stride):
        for x0 in window_starts(w, window, stride):
            tile = data[:, y0:y0 + window, x0:x0 + window]
            if (tile != 0).any():
                p = fake_predict(tile[None])[0]
                r, q = slice(y0 // stride, -(-(y0 + window) // stride)), slice(x0 // stride, -(-(x0 + window) // stride))
                acc[:, r, q] += p[:, None, None]
                hits[r, q] += 1
    mean, covered = np.where(hits > 0, acc / np.maximum(hits, 1), 0), (hits > 0).astype(float)
    classes = np.full((h, w), 255, np.uint8)
    probs = np.full((len(CLASSES), h, w), 255, np.uint8)
    for y in range(h):
        fy = (y + 0.5) / stride - 0.5
        r0 = int(np.floor(fy))
        for x in range(w):
            fx = (x + 0.5) / stride - 0.5
            q0 = int(np.floor(fx))
            num, den = np.zeros(len(CLASSES)), 0.0
            for r, wr in ((r0, 1 - (fy - r0)), (r0 + 1, fy - r0)):
                for q, wq in ((q0, 1 - (fx - q0)), (q0 + 1, fx - q0)):
                    rc, qc = min(max(r, 0), gh - 1), min(max(q, 0), gw - 1)
                    num += wr * wq * covered[rc, qc] * mean[:, rc, qc]
                    den += wr * wq * covered[rc, qc]
            if den > 0 and (data[:, y, x] != 0).any():
                p = num / den
                classes[y, x] = p.argmax()
                probs[:, y, x] = np.rint(p * PROB_SCALE)
    return classes, probs


@pytest.mark.parametrize(("window", "stride", "batch"), [(64, 32, 16), (64, 16, 5)])
def test_streamed_full_resolution_equals_the_whole_scene_reference(tmp_path, monkeypatch, window, stride, batch):
    monkeypatch.setattr(geoclip.scoring.scene_io, "MIN_STRIP_ROWS", 64)  # many strips in a small scene
    scene = tmp_path / "scenes" / "mixed.tif"
    data = write_mixed_scene(scene, 203, 150, tiled=True, blockxsize=32, blockysize=32)
    summary = score_scene(fake_predict, scene, tmp_path / "out", CLASSES, window=window, stride=stride,
                          batch_size=batch, quicklook=False, probabilities=True)
    classes, probs = reference_smooth(data, window, stride)
    with rasterio.open(summary["classmap"]) as cm, rasterio.open(summary["probabilities"]) as pr:
        got, got_probs = cm.read(1), pr.read()
    agree = got == classes
    # float32 streaming vs float64 reference: only exact ties may flip (none expected beyond a handful).
    assert agree.mean() > 0.999, np.argwhere(~agree)[:5]
    assert np.abs(got_probs.astype(int) - probs.astype(int)).max() <= 1
    assert summary["full_resolution"] is True


def test_a_boundary_between_stride_cells_lands_where_it_is_not_on_the_cell_grid(tmp_path):
    h, w, boundary = 256, 256, 80  # 80 is not a multiple of the 32 px stride
    data = np.random.default_rng(0).integers(200, 4000, size=(13, h, w)).astype(np.uint16)
    data[0, :, :boundary], data[0, :, boundary:] = 1000, 2000  # class 0 left, class 1 right
    scene = tmp_path / "scenes" / "edge.tif"
    scene.parent.mkdir(parents=True)
    with rasterio.open(scene, "w", driver="GTiff", width=w, height=h, count=13, dtype="uint16", **GEO) as dst:
        dst.write(data)
    edges = {}
    for full in (False, True):
        summary = score_scene(fake_predict, scene, tmp_path / f"out{full}", CLASSES, quicklook=False,
                              full_resolution=full)
        with rasterio.open(summary["classmap"]) as cm:
            row = cm.read(1)[128]
        assert set(np.unique(row)) == {0, 1}
        edges[full] = int(np.argmax(row == 1))  # the first column called class 1
    assert edges[False] % 32 == 0  # blocks: the boundary snaps to the cell grid
    assert abs(edges[True] - boundary) <= 4, edges  # interpolated: within a few pixels of the true edge
    assert abs(edges[True] - boundary) < abs(edges[False] - boundary)


@pytest.mark.parametrize("nodata", [0, 5])
def test_the_quicklooks_true_colour_is_built_from_the_strips_scoring_reads(tmp_path, nodata):
    from types import SimpleNamespace

    from geoclip.bands import ALL_BAND_NAMES
    from geoclip.scoring.quicklook import TrueColour

    h, w, scale = 2100, 1030, 3  # 2100 px -> 3 px per quick-look pixel (1024 max), columns padded
    data = np.random.default_rng(0).integers(1, 3000, size=(13, h, w)).astype(np.uint16)
    data[:, :300, :200] = nodata
    data[:2, 400:410, 500:510] = nodata  # nodata in some bands only: valid, and summed as it is
    src = SimpleNamespace(model_bands=list(ALL_BAND_NAMES), height=h, width=w)
    colour = TrueColour(src, nodata)
    for r0 in range(0, h, 256):  # strips as scan_windows reads them
        colour.add(r0, data[:, r0:r0 + 256])
    rgb = data[[ALL_BAND_NAMES.index(b) for b in ("B04", "B03", "B02")]].astype(float)
    valid = (data != nodata).any(axis=0)
    pad = (-h % scale, -w % scale)
    sums = np.pad(rgb * valid, ((0, 0), (0, pad[0]), (0, pad[1]))).reshape(3, -1, scale, colour.sums.shape[2], scale)
    counts = np.pad(valid, ((0, pad[0]), (0, pad[1]))).reshape(-1, scale, colour.sums.shape[2], scale).sum(axis=(1, 3))
    np.testing.assert_allclose(colour.sums, sums.sum(axis=(2, 4)))
    np.testing.assert_array_equal(colour.counts, counts)
    image = colour.image()
    assert image.shape == (700, 344, 3) and (image[:100, :66] == 1.0).all()  # nodata white
