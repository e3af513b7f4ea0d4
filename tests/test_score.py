"""Sliding-window scene scoring: class map COGs, areas, nodata, truth, S3 in and out."""

from __future__ import annotations

import json
import uuid

import boto3
import numpy as np
import pytest
import rasterio

from geoclip.bands import EUROSAT_CLASSES
from geoclip.config import params_from_dict
from geoclip.errors import GeoclipError
from geoclip.score import list_scenes, score_scene, score_scenes, window_starts
from factories import GEO, register_champion, write_scene

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
    summary = score_scene(fake_predict, scene, out, CLASSES, batch_size=16, model_uri="models:/x/1")

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
    summary = score_scene(fake_predict, scene, tmp_path / "out", CLASSES, quicklook=False)
    assert summary["truth_pixels"] == 256 * 240 - 1600
    assert summary["accuracy"] == pytest.approx(1 - 1024 / (256 * 240 - 1600))
    assert "quicklook" not in summary


def test_wrong_band_count_names_file_and_counts(tmp_path):
    scene = tmp_path / "scenes" / "rgb.tif"
    write_scene(scene, count=3)
    with pytest.raises(GeoclipError, match=r"rgb\.tif: has 3 band\(s\), the model expects 13"):
        score_scene(fake_predict, scene, tmp_path / "out", CLASSES)
    assert not (tmp_path / "out").exists()


def test_scene_smaller_than_a_window_is_refused(tmp_path):
    scene = tmp_path / "scenes" / "tiny.tif"
    write_scene(scene, h=48, w=100, nodata_box=0)
    with pytest.raises(GeoclipError, match="smaller than one 64x64 window"):
        score_scene(fake_predict, scene, tmp_path / "out", CLASSES)


def test_geographic_crs_is_refused_for_areas(tmp_path):
    scene = tmp_path / "scenes" / "wgs84.tif"
    write_scene(scene, crs="EPSG:4326")
    with pytest.raises(GeoclipError, match="not a projected CRS in metres"):
        score_scene(fake_predict, scene, tmp_path / "out", CLASSES)


def test_local_scene_listing(tmp_path):
    with pytest.raises(GeoclipError, match="no such folder"):
        list_scenes(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GeoclipError, match="no .tif scenes"):
        list_scenes(tmp_path / "empty")


def test_missing_s3_bucket_or_prefix_is_named(s3_server):
    with pytest.raises(GeoclipError, match="s3://no-such-bucket/scenes"):
        list_scenes("s3://no-such-bucket/scenes")
    boto3.client("s3").create_bucket(Bucket="empty-bucket")
    with pytest.raises(GeoclipError, match="s3://empty-bucket/scenes: no .tif scenes"):
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
    assert keys == {"scores/scene_0_classmap.tif", "scores/scene_0_summary.json", "scores/scene_0_quicklook.png",
                    "scores/summary.json"}
    s3.download_file("geo", "scores/scene_0_classmap.tif", str(tmp_path / "cm.tif"))
    with rasterio.open(tmp_path / "cm.tif") as cm:
        assert (cm.width, cm.height, cm.tags(ns="IMAGE_STRUCTURE")["LAYOUT"]) == (240, 256, "COG")
        assert (cm.read(1)[:40, :40] == 255).all() and (cm.read(1)[40:] < 10).all()
    overall = json.loads(s3.get_object(Bucket="geo", Key="scores/summary.json")["Body"].read())
    assert overall["n_scenes"] == 1 and overall["nodata_pixels"] == 1600
    assert overall["area_km2"] == pytest.approx((256 * 240 - 1600) * 100 / 1e6)
