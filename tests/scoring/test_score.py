"""Sliding-window scene scoring: class map COGs, probabilities, areas, nodata, truth, block-aligned reads,
bounded memory, S3 in (GDAL /vsis3/) and out."""

from __future__ import annotations

import json
import tracemalloc
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest
import rasterio
from factories import GEO, register_champion, write_scene

import geoclip.data.s3
import geoclip.scoring.scene_io
from geoclip.bands import EUROSAT_CLASSES
from geoclip.config import params_from_dict
from geoclip.errors import GeoclipError
from geoclip.scoring.ledger import Ledger
from geoclip.scoring.runs import score_scenes
from geoclip.scoring.scene_io import scan_windows
from geoclip.scoring.score import PROB_SCALE, list_scenes, scene_key, scene_keys, score_one, score_scene, window_starts

CLASSES = list(EUROSAT_CLASSES)


def fake_predict(x: np.ndarray) -> np.ndarray:
    """Deterministic stand-in model: each class's probability is its share of the window's valid pixels."""
    cls = x[:, 0].astype(np.int64) // 1000 - 1  # -1 where nodata
    probs = np.stack([(cls == c).mean(axis=(1, 2)) for c in range(len(CLASSES))], axis=1)
    return probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-9)


def test_window_starts_cover_the_edges():
    assert window_starts(256, 64, 32) == [0, 32, 64, 96, 128, 160, 192]
    assert window_starts(240, 64, 32) == [0, 32, 64, 96, 128, 160, 176]  # last one shifted inward
    assert window_starts(64, 64, 32) == [0]


def test_class_map_is_a_cog_matching_the_scene(tmp_path):
    scene = tmp_path / "raw" / "scenes" / "scene_0.tif"
    truth = write_scene(scene)
    out = tmp_path / "out"
    # One class per stride cell (score.full_resolution false) recovers the blocks exactly; see the next test.
    summary = score_scene(fake_predict, scene, out, CLASSES, batch_size=16, model_uri="models:/x/1",
                          full_resolution=False)

    classmap = out / "scene_0_classmap.tif"
    with rasterio.open(scene) as src, rasterio.open(classmap) as cm:
        assert (cm.crs, cm.transform, cm.width, cm.height) == (src.crs, src.transform, src.width, src.height)
        assert cm.dtypes == ("uint8",) and cm.nodata == 255 and cm.count == 1
        assert cm.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and cm.profile["tiled"]
        assert cm.overviews(1)  # COG overviews present
        assert json.loads(cm.tags()["class_names"]) == CLASSES and "0=AnnualCrop" in cm.descriptions[0]
        np.testing.assert_array_equal(cm.read(1), truth)  # blended windows recover every block, edges included

    assert summary["nodata_pixels"] == 40 * 40
    counts = np.bincount(truth.ravel(), minlength=256)
    assert {c: v["pixels"] for c, v in summary["classes"].items()} == {c: int(counts[i]) for i, c in enumerate(CLASSES)}
    total = sum(v["area_km2"] for v in summary["classes"].values())
    assert total == pytest.approx((256 * 240 - 1600) * 100 / 1e6)  # 10 m pixels
    assert summary["model_uri"] == "models:/x/1" and summary["crs"] == "EPSG:32632"
    assert "accuracy" not in summary  # no truth folder beside the scenes
    assert json.loads((out / "scene_0_summary.json").read_text()) == summary
    assert (out / "scene_0_quicklook.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_truth_beside_the_scenes_gives_pixel_accuracy(tmp_path):
    scene = tmp_path / "raw" / "scenes" / "scene_1.tif"
    truth = write_scene(scene)
    truth[100:132, 100:132] = (truth[100:132, 100:132] + 1) % 10  # 1024 pixels the model cannot get right
    (tmp_path / "raw" / "truth").mkdir()
    with rasterio.open(tmp_path / "raw" / "truth" / "scene_1_truth.tif", "w", driver="GTiff", width=240, height=256,
                       count=1, dtype="uint8", nodata=255, **GEO) as dst:
        dst.write(truth, 1)
    summary = score_scene(fake_predict, scene, tmp_path / "out", CLASSES, quicklook=False, full_resolution=False)
    assert summary["truth_pixels"] == 256 * 240 - 1600
    assert summary["accuracy"] == pytest.approx(1 - 1024 / (256 * 240 - 1600))
    assert "quicklook" not in summary


def test_wrong_band_count_names_file_and_counts(tmp_path):
    scene = tmp_path / "scenes" / "rgb.tif"
    write_scene(scene, count=3)
    with pytest.raises(GeoclipError, match=r"rgb\.tif: 3 band\(s\), but the model's input order .* names 13"):
        score_scene(fake_predict, scene, tmp_path / "out", CLASSES)
    assert not (tmp_path / "out").exists()


def test_scene_smaller_than_a_window_is_refused(tmp_path):
    scene = tmp_path / "scenes" / "tiny.tif"
    write_scene(scene, h=48, w=100, nodata_box=0)
    with pytest.raises(GeoclipError, match="smaller than one 64x64 window"):
        score_scene(fake_predict, scene, tmp_path / "out", CLASSES)


def test_geographic_scene_is_scored_in_its_own_grid_with_ellipsoidal_areas(tmp_path):
    scene = tmp_path / "scenes" / "wgs84.tif"
    truth = write_scene(scene, h=256, w=240, nodata_box=0, crs="EPSG:4326")
    degree = 0.0001  # about 11 m north-south
    with rasterio.open(scene, "r+") as dst:
        dst.transform = rasterio.transform.from_origin(10.0, 60.0, degree, degree)  # 60 N: pixels narrow eastward
    summary = score_scene(fake_predict, scene, tmp_path / "out", CLASSES, quicklook=False, full_resolution=False)
    with rasterio.open(summary["classmap"]) as cm:
        assert cm.crs.to_epsg() == 4326 and cm.transform == rasterio.transform.from_origin(10.0, 60.0, degree, degree)
        np.testing.assert_array_equal(cm.read(1), truth)
    # A WGS84 cell's area, independently: (a cos(phi) d_lambda) x (M d_phi) with the meridional radius M.
    a, e2 = 6378137.0, 0.00669437999014
    phi = np.radians(60.0 - degree * 128)
    m = a * (1 - e2) / (1 - e2 * np.sin(phi) ** 2) ** 1.5
    n = a / np.sqrt(1 - e2 * np.sin(phi) ** 2)
    expected = (n * np.cos(phi) * np.radians(degree)) * (m * np.radians(degree)) * 256 * 240 / 1e6
    assert summary["area_km2"] == pytest.approx(expected, rel=1e-4)
    assert summary["area_method"].startswith("geodesic") and summary["crs"] == "EPSG:4326"
    assert summary["area_km2"] < 256 * 240 * (degree * 111_320) ** 2 / 1e6 * 0.6  # not a square-degree guess


def test_local_scene_listing(tmp_path):
    with pytest.raises(GeoclipError, match="no such folder"):
        list_scenes(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GeoclipError, match="no scenes found"):
        list_scenes(tmp_path / "empty")


def test_missing_s3_bucket_or_prefix_is_named(s3_server):
    with pytest.raises(GeoclipError, match="s3://no-such-bucket/scenes"):
        list_scenes("s3://no-such-bucket/scenes")
    boto3.client("s3").create_bucket(Bucket="empty-bucket")
    with pytest.raises(GeoclipError, match="s3://empty-bucket/scenes: no scenes found"):
        list_scenes("s3://empty-bucket/scenes")


def test_scenes_from_s3_scored_with_the_champion_back_to_s3(tmp_path, s3_server, mlflow_server, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = f"geoclip-{uuid.uuid4().hex[:8]}"
    version = register_champion(tmp_path, mlflow_server, name)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="geo")
    truth = write_scene(tmp_path / "raw" / "scenes" / "scene_0.tif")
    s3.upload_file(str(tmp_path / "raw" / "scenes" / "scene_0.tif"), "geo", "raw/scenes/scene_0.tif")
    with rasterio.open(tmp_path / "truth.tif", "w", driver="GTiff", width=240, height=256, count=1,
                       dtype="uint8", nodata=255, **GEO) as dst:
        dst.write(truth, 1)
    s3.upload_file(str(tmp_path / "truth.tif"), "geo", "raw/truth/scene_0_truth.tif")
    params = params_from_dict({"mlflow": {"tracking_uri": mlflow_server, "experiment": "test-score"},
                               "score": {"model_uri": f"models:/{name}@champion", "scenes": "s3://geo/raw/scenes",
                                         "batch_size": 32}})

    (result,) = score_scenes(params, out_dir="s3://geo/scores")

    assert result["scene"] == "s3://geo/raw/scenes/scene_0.tif"
    assert result["model_uri"] == f"models:/{name}/{version}"  # the alias pinned to one version
    assert result["classmap"] == "s3://geo/scores/scene_0_classmap.tif"
    assert 0.0 <= result["accuracy"] <= 1.0 and result["truth_pixels"] == 256 * 240 - 1600
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="geo", Prefix="scores/")["Contents"]}
    outputs = {k for k in keys if not k.startswith("scores/_manifest/")}  # the exactly-once records: test_ledger
    assert outputs == {"scores/scene_0_classmap.tif", "scores/scene_0_summary.json", "scores/scene_0_quicklook.png",
                       "scores/summary.json"}
    s3.download_file("geo", "scores/scene_0_classmap.tif", str(tmp_path / "cm.tif"))
    with rasterio.open(tmp_path / "cm.tif") as cm:
        assert (cm.width, cm.height, cm.tags(ns="IMAGE_STRUCTURE")["LAYOUT"]) == (240, 256, "COG")
        assert (cm.read(1)[:40, :40] == 255).all() and (cm.read(1)[40:] < 10).all()
    overall = json.loads(s3.get_object(Bucket="geo", Key="scores/summary.json")["Body"].read())
    assert overall["n_scenes"] == 1 and overall["nodata_pixels"] == 1600
    assert overall["area_km2"] == pytest.approx((256 * 240 - 1600) * 100 / 1e6)


def test_same_file_name_in_two_folders_is_two_scenes(tmp_path, mlflow_server, monkeypatch):
    """``2023/T32UQD.tif`` and ``2024/T32UQD.tif``: two scenes, two sets of outputs, two ledger entries."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = f"geoclip-{uuid.uuid4().hex[:8]}"
    register_champion(tmp_path, mlflow_server, name)
    scenes = tmp_path / "scenes"
    write_scene(scenes / "2023" / "T32UQD.tif")
    write_scene(scenes / "2024" / "T32UQD.tif", nodata_box=80)  # other content, same name
    write_scene(scenes / "_manifest" / "not_a_scene.tif")  # folders starting with _ or . are never scenes
    params = params_from_dict({"mlflow": {"tracking_uri": mlflow_server, "experiment": "test-score"},
                               "score": {"model_uri": f"models:/{name}@champion", "scenes": str(scenes),
                                         "batch_size": 32}})
    out = tmp_path / "scores"

    results = score_scenes(params, out_dir=str(out))

    assert [r["status"] for r in results] == ["scored", "scored"]
    for year, nodata in (("2023", 1600), ("2024", 6400)):
        summary = json.loads((out / year / "T32UQD_summary.json").read_text())
        assert summary["scene"] == str(scenes / year / "T32UQD.tif") and summary["nodata_pixels"] == nodata
        assert (out / year / "T32UQD_classmap.tif").is_file()
    assert sorted(r["name"] for r in Ledger(str(out)).records()) == ["2023/T32UQD", "2024/T32UQD"]
    assert [r["status"] for r in score_scenes(params, out_dir=str(out))] == ["skipped", "skipped"]


def test_scenes_whose_stems_collide_keep_their_suffixes_and_old_ledgers_hold(tmp_path, mlflow_server, monkeypatch):
    """``T32.tif`` then ``T32.tiff`` beside it: two scenes, two sets of outputs; the one scored before keeps its
    plain-stem outputs and ledger entry and is not scored again."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = f"geoclip-{uuid.uuid4().hex[:8]}"
    register_champion(tmp_path, mlflow_server, name)
    scenes = tmp_path / "scenes"
    write_scene(scenes / "T32.tif")
    params = params_from_dict({"mlflow": {"tracking_uri": mlflow_server, "experiment": "test-score"},
                               "score": {"model_uri": f"models:/{name}@champion", "scenes": str(scenes),
                                         "batch_size": 32}})
    out = tmp_path / "scores"
    assert [r["status"] for r in score_scenes(params, out_dir=str(out))] == ["scored"]  # before the other came
    write_scene(scenes / "T32.tiff", nodata_box=80)  # another scene, the same stem

    results = score_scenes(params, out_dir=str(out))

    assert [r["status"] for r in results] == ["skipped", "scored"]
    assert json.loads((out / "T32_summary.json").read_text())["nodata_pixels"] == 1600
    assert json.loads((out / "T32.tiff_summary.json").read_text())["nodata_pixels"] == 6400
    assert sorted(r["name"] for r in Ledger(str(out)).records()) == ["T32", "T32.tiff"]
    fresh = tmp_path / "fresh"  # a ledger that knows neither: both keep their suffixes
    assert [r["status"] for r in score_scenes(params, out_dir=str(fresh))] == ["scored", "scored"]
    assert sorted(r["name"] for r in Ledger(str(fresh)).records()) == ["T32.tif", "T32.tiff"]
    assert (fresh / "T32.tif_classmap.tif").is_file() and (fresh / "T32.tiff_classmap.tif").is_file()


def test_scene_keys_keep_suffixes_only_where_stems_collide():
    scenes = ["/s/a/T32.tif", "/s/a/T32.tiff", "/s/b/T32.tif", "/s/P.SAFE/MTD_MSIL1C.xml", "/s/P.tif"]
    assert scene_keys(scenes, "/s") == {"/s/a/T32.tif": "a/T32.tif", "/s/a/T32.tiff": "a/T32.tiff",
                                        "/s/b/T32.tif": "b/T32", "/s/P.SAFE/MTD_MSIL1C.xml": "P.SAFE",
                                        "/s/P.tif": "P.tif"}
    # the ledger recorded a/T32.tif (from wherever the project was then) under the plain stem: it keeps it
    recorded = {"a/T32": {"/old/place/a/T32.tif"}}
    assert scene_keys(scenes[:2], "/s", lambda key: recorded.get(key, set())) == {
        "/s/a/T32.tif": "a/T32", "/s/a/T32.tiff": "a/T32.tiff"}


def test_scenes_scored_over_another_class_list_once_per_list(tmp_path, mlflow_server, monkeypatch):
    """The champion answers over the user's classes: class map, areas and summary in those names; the trained
    list's outputs do not make the new list's run a no-op, and each list is scored once."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = f"geoclip-{uuid.uuid4().hex[:8]}"
    register_champion(tmp_path, mlflow_server, name)
    write_scene(tmp_path / "scenes" / "scene_0.tif", h=128, w=128)
    score = {"model_uri": f"models:/{name}@champion", "scenes": str(tmp_path / "scenes"), "batch_size": 64}
    mlflow = {"tracking_uri": mlflow_server, "experiment": "test-score"}
    trained = params_from_dict({"mlflow": mlflow, "score": score})
    out = tmp_path / "scores"
    assert [r["status"] for r in score_scenes(trained, out_dir=str(out))] == ["scored"]
    (tmp_path / "classes.yaml").write_text("names: [lake, forêt, vineyard]\ndescriptions: {vineyard: grape vines}\n",
                                           encoding="utf-8")
    custom = params_from_dict({"mlflow": mlflow, "score": score | {"classes_file": str(tmp_path / "classes.yaml")}})

    (result,) = score_scenes(custom, out_dir=str(out))

    assert result["status"] == "scored" and result["class_names"] == ["lake", "forêt", "vineyard"]
    assert result["model_uri"].startswith(f"models:/{name}/1#classes=")
    assert set(result["classes"]) == {"lake", "forêt", "vineyard"}
    with rasterio.open(out / "scene_0_classmap.tif") as cm:
        values = set(np.unique(cm.read(1)).tolist())
    assert values - {255} and values <= {0, 1, 2, 255}  # the three classes and nodata
    assert sum(c["pixels"] for c in result["classes"].values()) + result["nodata_pixels"] == 128 * 128
    assert [r["status"] for r in score_scenes(custom, out_dir=str(out))] == ["skipped"]
    # One output folder holds one class list: going back replaces the outputs (and the ledger says so).
    (back,) = score_scenes(trained, out_dir=str(out))
    assert back["status"] == "scored" and back["class_names"] == list(EUROSAT_CLASSES)
    assert [r["status"] for r in score_scenes(trained, out_dir=str(out))] == ["skipped"]


@pytest.mark.parametrize("score, message", [
    ({"classes": ["lake"]}, "score.classes: 1 class"),
    ({"classes": [f"class {i}" for i in range(300)]}, "at most 254"),
    ({"classes": ["a", "b"], "classes_file": "x.yaml"}, "both set; give one of them"),
    ({"classes_file": "missing.yaml"}, "cannot read the class file"),
])
def test_bad_scoring_class_lists_fail_before_any_scene_is_touched(tmp_path, score, message):
    write_scene(tmp_path / "scenes" / "scene_0.tif", h=64, w=64)
    params = params_from_dict({"score": score | {"scenes": str(tmp_path / "scenes"), "model_uri": "models:/x/1"}})
    with pytest.raises(GeoclipError, match=message):
        score_scenes(params, out_dir=str(tmp_path / "scores"))
    assert not (tmp_path / "scores").exists()


def test_scene_keys_are_paths_below_the_root():
    assert scene_key("/data/scenes/2023/T32UQD.tif", "/data/scenes") == "2023/T32UQD"
    assert scene_key("/data/scenes/scene_0.tif", "/data/scenes/") == "scene_0"  # flat folders keep their stems
    assert scene_key("s3://b/scenes/2024/T32UQD.tif", "s3://b/scenes") == "2024/T32UQD"
    assert scene_key("s3://b/other/x.tif", "s3://b/scenes") == "x"


# ---- block-aligned strips, probabilities, COG layout, bounded memory, /vsis3/ ----

def write_mixed_scene(path: Path, h: int, w: int, **layout) -> np.ndarray:
    """A scene whose class patches (37 x 29 px) straddle windows and strips, with a nodata box and a nodata band
    of rows; band 0 encodes the class as in :func:`fake_predict`. Returns the data."""
    i, j = np.meshgrid(np.arange(h) // 37, np.arange(w) // 29, indexing="ij")
    data = np.random.default_rng(1).integers(200, 4000, size=(13, h, w)).astype(np.uint16)
    data[0] = 1000 * (((i + 3 * j) % len(CLASSES)) + 1)
    data[:, :50, :70] = 0
    data[:, h // 2:h // 2 + 80] = 0  # whole strips with no window to score
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=13, dtype="uint16", **GEO,
                       **layout) as dst:
        dst.write(data)
    return data


def reference_blend(data: np.ndarray, window: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """The straightforward computation: every window read on its own and predicted alone, its probabilities added
    to every pixel of the stride cells it touches; returns the class map and the scaled probabilities."""
    _, h, w = data.shape
    acc = np.zeros((len(CLASSES), h, w), np.float32)
    hits = np.zeros((h, w), np.int32)
    for y0 in window_starts(h, window, stride):
        for x0 in window_starts(w, window, stride):
            tile = data[:, y0:y0 + window, x0:x0 + window]
            if (tile != 0).any():
                p = fake_predict(tile[None])[0]
                rows = slice(y0 // stride * stride, -(-(y0 + window) // stride) * stride)
                cols = slice(x0 // stride * stride, -(-(x0 + window) // stride) * stride)
                acc[:, rows, cols] += p[:, None, None]
                hits[rows, cols] += 1
    nodata = (data == 0).all(axis=0) | (hits == 0)
    classes = np.where(nodata, 255, acc.argmax(axis=0)).astype(np.uint8)
    with np.errstate(invalid="ignore", divide="ignore"):
        probs = np.where(nodata, 255, np.rint(acc / hits * PROB_SCALE)).astype(np.uint8)
    return classes, probs


class ReadSpy:
    """A dataset stand-in that records the windows read from the real dataset it wraps."""

    def __init__(self, src):
        self.src, self.windows = src, []

    def __getattr__(self, name):
        return getattr(self.src, name)

    def read(self, window):
        self.windows.append(window)
        return self.src.read(window=window)


@pytest.mark.parametrize("layout", [{"tiled": True, "blockxsize": 32, "blockysize": 32}, {"blockysize": 1}],
                         ids=["tiled-32", "strips-of-1-row"])
def test_strips_are_whole_blocks_each_read_once(tmp_path, monkeypatch, layout):
    monkeypatch.setattr(geoclip.scoring.scene_io, "MIN_STRIP_ROWS", 80)
    write_mixed_scene(tmp_path / "s.tif", 300, 100, **layout)
    with rasterio.open(tmp_path / "s.tif") as src:
        spy = ReadSpy(src)
        batches = list(scan_windows(spy, 64, 32, 7, 0))
        block_h = src.block_shapes[0][0]
    rows = [(int(w.row_off), int(w.height)) for w in spy.windows]
    assert all(w.col_off == 0 and w.width == 100 for w in spy.windows)  # whole rows: each block decoded once
    assert [r for r, _ in rows] == list(range(0, 300, rows[0][1])) and sum(n for _, n in rows) == 300
    assert all(r % block_h == 0 and n % block_h == 0 for r, n in rows[:-1]) and rows[0][1] >= 80
    settled = [b.settled for b in batches]
    assert settled == sorted(settled) and settled[-1] == 300
    assert sum(len(b.valid) for b in batches) == 300  # every row's validity reported exactly once


@pytest.mark.parametrize(("window", "stride", "batch"), [(64, 32, 16), (64, 16, 5), (32, 32, 256)])
def test_block_aligned_blend_equals_the_window_by_window_reference(tmp_path, monkeypatch, window, stride, batch):
    monkeypatch.setattr(geoclip.scoring.scene_io, "MIN_STRIP_ROWS", 64)  # many strips in a small scene
    scene = tmp_path / "scenes" / "mixed.tif"
    data = write_mixed_scene(scene, 333, 170, tiled=True, blockxsize=32, blockysize=32)
    summary = score_scene(fake_predict, scene, tmp_path / "out", CLASSES, window=window, stride=stride,
                          batch_size=batch, quicklook=False, probabilities=True, full_resolution=False)
    classes, probs = reference_blend(data, window, stride)
    with rasterio.open(summary["classmap"]) as cm, rasterio.open(summary["probabilities"]) as pr:
        np.testing.assert_array_equal(cm.read(1), classes)
        np.testing.assert_array_equal(pr.read(), probs)
    counts = np.bincount(classes.ravel(), minlength=256)
    assert summary["nodata_pixels"] == counts[255]
    assert {c: v["pixels"] for c, v in summary["classes"].items()} == {c: counts[i] for i, c in enumerate(CLASSES)}


def test_probability_cog_one_band_per_class_summing_to_one(tmp_path):
    scene = tmp_path / "raw" / "scenes" / "scene_0.tif"
    truth = write_scene(scene, h=300, w=270)
    summary = score_scene(fake_predict, scene, tmp_path / "out", CLASSES, quicklook=False, probabilities=True)
    assert summary["probabilities"] == str(tmp_path / "out" / "scene_0_probabilities.tif")
    with rasterio.open(scene) as src, rasterio.open(summary["probabilities"]) as pr:
        assert (pr.crs, pr.transform, pr.width, pr.height) == (src.crs, src.transform, src.width, src.height)
        assert pr.count == len(CLASSES) and set(pr.dtypes) == {"uint8"} and pr.nodata == 255
        assert list(pr.descriptions) == CLASSES and pr.scales == (1 / PROB_SCALE,) * len(CLASSES)
        assert pr.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and pr.overviews(1)
        probs = pr.read()
    with rasterio.open(summary["classmap"]) as cm:
        classes = cm.read(1)
    nodata = truth == 255
    assert (probs[:, nodata] == 255).all() and (probs[:, ~nodata] <= PROB_SCALE).all()
    total = probs[:, ~nodata].astype(int).sum(axis=0)
    assert np.abs(total - PROB_SCALE).max() <= len(CLASSES) / 2  # each band rounds by at most half a step
    picked = np.take_along_axis(probs, classes[None].astype(np.int64) % 255, axis=0)[0]
    np.testing.assert_array_equal(picked[~nodata], probs[:, ~nodata].max(axis=0))  # the class map is the argmax


def test_class_map_cog_layout_as_gdal_writes_it(tmp_path):
    scene = tmp_path / "scenes" / "big.tif"
    write_scene(scene, h=700, w=600, nodata_box=100)
    summary = score_scene(fake_predict, scene, tmp_path / "out", CLASSES, quicklook=False)
    head = Path(summary["classmap"]).read_bytes()[:400]
    # GDAL's COG ghost header: IFDs before the tile data, and nothing rewritten since (a still-valid COG).
    assert b"LAYOUT=IFDS_BEFORE_DATA" in head and b"KNOWN_INCOMPATIBLE_EDITION=NO" in head
    with rasterio.open(summary["classmap"]) as cm:
        assert cm.block_shapes == [(256, 256)] and cm.overviews(1) == [2, 4]  # down to one block
        assert cm.tags(ns="IMAGE_STRUCTURE")["COMPRESSION"] == "DEFLATE"
        assert (cm.read(1)[:100, :100] == 255).all() and (cm.read(1)[100:] < 10).all()
        assert cm.colormap(1)[255] == (0, 0, 0, 0)


def peak_traced_bytes(fn, *args, **kwargs) -> int:
    """Peak bytes traced by tracemalloc (numpy arrays included) while ``fn(*args, **kwargs)`` runs."""
    tracemalloc.start()
    try:
        fn(*args, **kwargs)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_follows_the_strip_not_the_scene(tmp_path):
    peaks = {}
    for h in (256, 1024, 4096):  # the first run only warms up imports and caches
        scene = tmp_path / f"scene_{h}" / "s.tif"
        write_scene(scene, h=h, w=192)
        # One reader: its strips in flight are the same few for every height (tests/scoring/test_scoring_pipeline.py
        # bounds them for many readers, whose lead over the consumer varies with timing).
        peaks[h] = peak_traced_bytes(score_scene, fake_predict, scene, tmp_path / f"out_{h}", CLASSES,
                                     batch_size=32, quicklook=False, probabilities=True, read_workers=1)
    # 4x the rows (several 256-row strips each), about the same peak: at most the blended parts the writer's queue
    # holds (two, one being made, one being written: class map + probabilities of a strip each), which a 1024-row
    # scene may or may not fill, depending on thread timing. The whole class map and probabilities would be 8.6 MB.
    in_flight = 4 * (1 + len(CLASSES)) * 256 * 192
    assert peaks[4096] < 1.15 * peaks[1024] + in_flight, peaks
    assert peaks[4096] < 13 * 4096 * 192 * 2, peaks  # never the whole scene in memory


def test_s3_scene_read_through_vsis3_scores_like_the_local_file(tmp_path, s3_server, pyfunc_model, monkeypatch):
    scene = tmp_path / "raw" / "scenes" / "scene_0.tif"
    truth = write_scene(scene)
    (tmp_path / "raw" / "truth").mkdir()
    with rasterio.open(tmp_path / "raw" / "truth" / "scene_0_truth.tif", "w", driver="GTiff", width=240,
                       height=256, count=1, dtype="uint8", nodata=255, **GEO) as dst:
        dst.write(truth, 1)
    bucket = f"vsis3-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(scene), bucket, "raw/scenes/scene_0.tif")
    s3.upload_file(str(tmp_path / "raw" / "truth" / "scene_0_truth.tif"), bucket, "raw/truth/scene_0_truth.tif")
    params = params_from_dict({"score": {"probabilities": True, "batch_size": 64}})
    local = score_one(params, pyfunc_model, str(scene), str(tmp_path / "local"), model_uri="m")

    def no_download(*args, **kwargs):
        raise AssertionError("the scene was downloaded")

    opened = []
    real_open = rasterio.open
    monkeypatch.setattr(geoclip.data.s3, "download", no_download)
    monkeypatch.setattr(geoclip.data.s3, "download_small", no_download)
    monkeypatch.setattr(rasterio, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    remote = score_one(params, pyfunc_model, f"s3://{bucket}/raw/scenes/scene_0.tif", f"s3://{bucket}/out",
                       model_uri="m")
    monkeypatch.setattr(rasterio, "open", real_open)

    assert f"/vsis3/{bucket}/raw/scenes/scene_0.tif" in opened and f"/vsis3/{bucket}/raw/truth/scene_0_truth.tif" in opened
    assert remote["truth"] == f"s3://{bucket}/raw/truth/scene_0_truth.tif" and remote["accuracy"] == local["accuracy"]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]}
    assert keys == {f"out/scene_0_{k}" for k in ("classmap.tif", "probabilities.tif", "quicklook.png", "summary.json")}
    for key in ("classmap", "probabilities"):
        assert remote[key] == f"s3://{bucket}/out/scene_0_{key}.tif"
        s3.download_file(bucket, f"out/scene_0_{key}.tif", str(tmp_path / f"{key}.tif"))
        with rasterio.open(tmp_path / f"{key}.tif") as a, rasterio.open(local[key]) as b:
            np.testing.assert_array_equal(a.read(), b.read())
            assert (a.crs, a.transform, a.tags(ns="IMAGE_STRUCTURE")["LAYOUT"]) == (b.crs, b.transform, "COG")
    stored = json.loads(s3.get_object(Bucket=bucket, Key="out/scene_0_summary.json")["Body"].read())
    assert stored == remote
    same = ("classes", "nodata_pixels", "truth_pixels", "width", "height", "crs", "pixel_area_m2")
    assert {k: remote[k] for k in same} == {k: local[k] for k in same}


def test_missing_s3_scene_is_named_in_one_line(s3_server, pyfunc_model, tmp_path):
    bucket = f"vsis3-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    with pytest.raises(GeoclipError, match=rf"scenes.readable .* failed for s3://{bucket}/scenes/gone.tif") as info:
        score_one(params_from_dict({}), pyfunc_model, f"s3://{bucket}/scenes/gone.tif", str(tmp_path / "out"))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_truth_of_another_size_is_refused_and_nothing_is_written(tmp_path):
    scene = tmp_path / "raw" / "scenes" / "scene_2.tif"
    write_scene(scene)
    (tmp_path / "raw" / "truth").mkdir()
    with rasterio.open(tmp_path / "raw" / "truth" / "scene_2_truth.tif", "w", driver="GTiff", width=100, height=100,
                       count=1, dtype="uint8", nodata=255, **GEO) as dst:
        dst.write(np.zeros((1, 100, 100), np.uint8))
    with pytest.raises(GeoclipError, match=r"scene_2_truth\.tif: 100x100, expected the scene's 240x256"):
        score_scene(fake_predict, scene, tmp_path / "out", CLASSES, probabilities=True)
    assert not list((tmp_path / "out").iterdir())  # no class map, no temp files


@pytest.mark.parametrize("tta", [False, True])
def test_scene_scoring_asks_the_model_for_score_tta_not_its_default(tmp_path, tta):
    from scoring_fakes import FakeModel

    from geoclip.config import params_from_dict
    from geoclip.scoring.score import score_one

    class Recording(FakeModel):
        seen: list = []

        def predict(self, x, params=None):
            self.seen.append(dict(params or {}))
            return super().predict(x, params)

    scene = tmp_path / "scenes" / "scene_0.tif"
    write_scene(scene, h=128, w=128)
    params = params_from_dict({"score": {"tta": tta, "quicklook": False}, "paths": {"reports": str(tmp_path / "r")}})
    score_one(params, Recording(str(scene)), str(scene), str(tmp_path / "out"))
    assert Recording.seen and all(p["tta"] is tta for p in Recording.seen)


def test_a_model_that_ignores_the_class_list_is_refused_not_mislabelled(tmp_path):
    """A model logged before class lists answers over its ten classes whatever it is asked: naming those columns
    after the user's classes would be silently wrong."""
    from scoring_fakes import FakeModel

    scene = tmp_path / "scenes" / "scene_0.tif"
    write_scene(scene, h=128, w=128)
    params = params_from_dict({"score": {"classes": ["water", "land"], "quicklook": False},
                               "paths": {"reports": str(tmp_path / "r")}})
    with pytest.raises(GeoclipError, match="10 class columns for 2 classes; it predates class lists"):
        score_one(params, FakeModel(str(scene)), str(scene), str(tmp_path / "out"), model_uri="models:/old/1")
    assert not (tmp_path / "out" / "scene_0_classmap.tif").exists()
