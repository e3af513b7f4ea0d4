"""Open-set scores of scenes: the novelty raster blended window by window, its summary figures, far-class warnings."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import rasterio
from factories import GEO, PACK_CLASSES, make_trained_model_dir, synthetic_tiles, write_scene

from geoclip.config import params_from_dict
from geoclip.registry.pyfunc import save_pyfunc
from geoclip.scoring.blend import NOVELTY_DESCRIPTION
from geoclip.scoring.score import (
    NOVELTY_THRESHOLD,
    OUTPUT_KEYS,
    PROB_SCALE,
    scene_output_bytes,
    score_one,
    score_scene,
    write_summary,
)

CLASSES = ["zero", "other"]
CALIBRATED = {"calibrated": True, "far_classes": [], "warning": ""}


def predict_with_novelty(x: np.ndarray) -> dict:
    """Band 0 encodes the block class (factories.write_scene): a window touching class 0 is ``zero`` and entirely
    novel, any other ``other`` and entirely familiar."""
    touches = ((x[:, 0].astype(np.int64) // 1000 - 1) == 0).any(axis=(1, 2)).astype(np.float32)
    return {"probabilities": np.stack([touches, 1 - touches], axis=1), "novelty": touches}


@pytest.mark.parametrize("full_resolution", [False, True])
def test_novelty_raster_is_blended_like_the_probabilities(tmp_path, full_resolution):
    scene = tmp_path / "scenes" / "scene_0.tif"
    truth = write_scene(scene, h=300, w=270)
    summary = score_scene(predict_with_novelty, scene, tmp_path / "out", CLASSES, quicklook=False, probabilities=True,
                          full_resolution=full_resolution, open_set=CALIBRATED)
    path = tmp_path / "out" / "scene_0_novelty.tif"
    assert summary["novelty"] == str(path) and summary["warnings"] == []
    figures = summary["open_set"]
    assert figures["calibrated"] and figures["far_classes"] == [] and figures["threshold"] == NOVELTY_THRESHOLD
    with rasterio.open(scene) as src, rasterio.open(path) as nv, rasterio.open(summary["probabilities"]) as pr:
        assert (nv.crs, nv.transform, nv.width, nv.height) == (src.crs, src.transform, src.width, src.height)
        assert nv.count == 1 and nv.dtypes == ("uint8",) and nv.nodata == 255
        assert nv.descriptions == (NOVELTY_DESCRIPTION,) and nv.scales == (1 / PROB_SCALE,)
        assert nv.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and nv.overviews(1)
        assert json.loads(nv.tags()["class_names"]) == CLASSES
        novelty, class0 = nv.read(1), pr.read(1)
    np.testing.assert_array_equal(novelty, class0)  # the same blending as the class-0 probability band
    scored = truth != 255
    assert (novelty[~scored] == 255).all() and (novelty[scored] <= PROB_SCALE).all()
    share = (novelty[scored] >= round(NOVELTY_THRESHOLD * PROB_SCALE)).mean()
    assert 0 < share < 1 and figures["unfamiliar_share"] == pytest.approx(share)
    assert figures["scored_km2"] == pytest.approx(scored.sum() * 100 / 1e6)
    assert figures["unfamiliar_km2"] == pytest.approx(share * scored.sum() * 100 / 1e6)
    assert figures["mean"] == pytest.approx(novelty[scored].mean() / PROB_SCALE, abs=1e-6)
    assert json.loads((tmp_path / "out" / "scene_0_summary.json").read_text()) == summary


def test_the_existing_outputs_are_unchanged_by_novelty(tmp_path):
    scene = tmp_path / "scenes" / "scene_0.tif"
    write_scene(scene, h=200, w=200)
    plain = score_scene(predict_with_novelty, scene, tmp_path / "a", CLASSES, quicklook=False, probabilities=True)
    both = score_scene(predict_with_novelty, scene, tmp_path / "b", CLASSES, quicklook=False, probabilities=True,
                       open_set=CALIBRATED)
    assert "novelty" not in plain and "open_set" not in plain and not (tmp_path / "a" / "scene_0_novelty.tif").exists()
    for key in ("classmap", "probabilities"):
        with rasterio.open(plain[key]) as a, rasterio.open(both[key]) as b:
            np.testing.assert_array_equal(a.read(), b.read())
            assert a.tags() == b.tags() and a.descriptions == b.descriptions
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "scene_0_classmap.tif", "scene_0_novelty.tif", "scene_0_probabilities.tif", "scene_0_summary.json"]


def test_an_uncalibrated_model_gets_no_raster_and_the_summary_says_so(tmp_path):
    scene = tmp_path / "scenes" / "scene_0.tif"
    write_scene(scene, h=128, w=128)
    warning = "class 'spaceship' is far from anything the model learnt (...); its scores are guesses"
    info = {"calibrated": False, "far_classes": [{"name": "spaceship"}], "warning": warning}
    summary = score_scene(predict_with_novelty, scene, tmp_path / "out", CLASSES, quicklook=False, open_set=info)
    assert summary["open_set"]["calibrated"] is False and "not calibrated" in summary["open_set"]["note"]
    assert summary["warnings"] == [warning] and summary["open_set"]["far_classes"] == [{"name": "spaceship"}]
    assert "novelty" not in summary and not (tmp_path / "out" / "scene_0_novelty.tif").exists()


def test_disk_estimate_counts_the_novelty_raster():
    without = scene_output_bytes(1000, 1000, 10, 64, 32, False, False, 0)
    with_it = scene_output_bytes(1000, 1000, 10, 64, 32, False, False, 0, novelty=True)
    assert with_it[0] - without[0] == int(1000 * 1000 * 2.5) and with_it[1] > without[1]
    assert OUTPUT_KEYS.index("novelty") < OUTPUT_KEYS.index("summary")  # uploaded before the summary naming it


def test_overall_summary_adds_up_the_unfamiliar_area(tmp_path):
    scenes = [{"scene": s, "class_names": ["a", "b"], "classes": {"a": {"pixels": 1, "area_km2": 1.0},
                                                                 "b": {"pixels": 1, "area_km2": 1.0}},
               "nodata_pixels": 0, "area_km2": 2.0, "open_set": nov}
              for s, nov in (("x", {"calibrated": True, "scored_km2": 2.0, "unfamiliar_km2": 1.5}),
                             ("y", {"calibrated": True, "scored_km2": 6.0, "unfamiliar_km2": 0.5}),
                             ("z", {"calibrated": False, "note": "not calibrated"}))]
    agg = json.loads(Path(write_summary(scenes, str(tmp_path))).read_text())
    assert agg["open_set"] == {"threshold": NOVELTY_THRESHOLD, "scenes": 2, "unfamiliar_km2": 2.0,
                              "unfamiliar_share": 0.25}


@pytest.fixture(scope="module")
def calibrated_pyfunc(tmp_path_factory):
    """A tiny trained, calibrated model as a loaded pyfunc, and its packs folder."""
    root = tmp_path_factory.mktemp("novelty-scoring")
    model_dir, prepared = make_trained_model_dir(root)
    return mlflow.pyfunc.load_model(str(save_pyfunc(model_dir, synthetic_tiles(2), root / "pf"))), prepared


def forest_and_noise_scene(path: Path, prepared: Path) -> None:
    """A 128 x 256 scene: Forest tiles of the packs on the left half, uniform noise on the right."""
    images, labels = np.load(prepared / "test_images.npy"), np.load(prepared / "test_labels.npy")
    forest = images[labels == PACK_CLASSES.index("Forest")]
    data = np.random.default_rng(3).integers(1, 10000, (13, 128, 256)).astype(np.uint16)
    data[:, :64, :64], data[:, :64, 64:128], data[:, 64:, :64], data[:, 64:, 64:128] = forest[:4]
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=256, height=128, count=13, dtype="uint16", **GEO) as dst:
        dst.write(data)


def test_a_scene_half_unlike_anything_trained_is_half_unfamiliar(tmp_path, calibrated_pyfunc, capsys):
    model, prepared = calibrated_pyfunc
    scene = tmp_path / "scenes" / "mixed.tif"
    forest_and_noise_scene(scene, prepared)
    params = params_from_dict({"score": {"quicklook": False, "batch_size": 16},
                               "paths": {"reports": str(tmp_path / "reports")}})
    summary = score_one(params, model, str(scene), str(tmp_path / "out"), model_uri="m")
    assert summary["warnings"] == [] and "warning:" not in capsys.readouterr().err
    assert summary["novelty"] == str(tmp_path / "out" / "mixed_novelty.tif")
    with rasterio.open(summary["novelty"]) as nv:
        novelty = nv.read(1).astype(float) / PROB_SCALE
    assert np.median(novelty[:, :96]) < 0.8  # windows over Forest tiles only
    assert (novelty[:, 160:] >= NOVELTY_THRESHOLD).mean() >= 0.9  # windows over noise only
    assert 0.3 < summary["open_set"]["unfamiliar_share"] < 0.7


def test_scoring_over_far_classes_warns_and_names_them(tmp_path, calibrated_pyfunc, capsys):
    model, prepared = calibrated_pyfunc
    scene = tmp_path / "scenes" / "mixed.tif"
    forest_and_noise_scene(scene, prepared)
    params = params_from_dict({"score": {"quicklook": False, "batch_size": 16,
                                         "classes": ["woodland", "spaceship interior", "a cat on a sofa"]},
                               "paths": {"reports": str(tmp_path / "reports")}})
    summary = score_one(params, model, str(scene), str(tmp_path / "out"), model_uri="m")
    (warning,) = summary["warnings"]
    assert warning.startswith("classes 'spaceship interior', 'a cat on a sofa' are far from anything the model learnt")
    assert [f["name"] for f in summary["open_set"]["far_classes"]] == ["spaceship interior", "a cat on a sofa"]
    assert f"warning: {warning}" in capsys.readouterr().err.splitlines()
    assert summary["open_set"]["calibrated"] and Path(summary["novelty"]).exists()
