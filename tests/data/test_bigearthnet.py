"""BigEarthNet-S2 patches stacked by hand (geoclip.data.bigearthnet) and the scenes-real bench on one of them."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from factories import make_model_dir

from geoclip.bands import ALL_BAND_NAMES, BAND_GSD_M, EUROSAT_CLASSES
from geoclip.config import params_from_dict
from geoclip.data.bigearthnet import (
    B10_FILL,
    CORINE_TO_EUROSAT,
    mapped_labels,
    read_patch,
    write_stacked_scene,
)
from geoclip.errors import GeoclipError

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "bigearthnet_s2_examples"
NAME = "S2A_MSIL2A_20170613T101031_87_48"  # labels: Non-irrigated arable land; Land principally occupied by ...


@pytest.fixture
def patch() -> Path:
    """One real BigEarthNet-S2 patch folder, or skip."""
    if not (DATA / NAME).is_dir():
        pytest.skip(f"BigEarthNet-S2 example patches not found at {DATA}")
    return DATA / NAME


def source(patch: Path, band: str) -> tuple[np.ndarray, rasterio.Affine, rasterio.crs.CRS]:
    """A band file's pixels, transform and CRS as BigEarthNet ships it."""
    with rasterio.open(patch / f"{patch.name}_{band}.tif") as src:
        return src.read(1), src.transform, src.crs


def test_a_patch_stacks_to_13_bands_on_the_10m_grid(patch: Path):
    pixels, profile, labels = read_patch(patch)
    assert pixels.shape == (13, 120, 120) and pixels.dtype == np.uint16
    _, transform, crs = source(patch, "B02")
    assert profile["crs"] == crs and profile["transform"] == transform and transform.a == 10
    for i, band in enumerate(ALL_BAND_NAMES):
        if BAND_GSD_M[band] == 10:
            np.testing.assert_array_equal(pixels[i], source(patch, band)[0])  # read as they are, not resampled
    assert (pixels[ALL_BAND_NAMES.index("B10")] == B10_FILL).all()
    assert (read_patch(patch, b10_fill=7).pixels[ALL_BAND_NAMES.index("B10")] == 7).all()
    assert labels == json.loads((patch / f"{NAME}_labels_metadata.json").read_text())["labels"]


@pytest.mark.parametrize("band", ["B05", "B8A", "B11", "B01", "B09"])
def test_an_upsampled_band_keeps_its_mean(patch: Path, band: str):
    pixels = read_patch(patch).pixels[ALL_BAND_NAMES.index(band)]
    native = source(patch, band)[0]
    assert native.shape[0] < 120
    assert abs(pixels.mean() - native.mean()) < 0.01 * native.mean()


@pytest.mark.parametrize("missing", [f"{NAME}_B11.tif", f"{NAME}_B02.tif", f"{NAME}_labels_metadata.json"])
def test_a_missing_file_is_named(patch: Path, tmp_path: Path, missing: str):
    copy = shutil.copytree(patch, tmp_path / NAME)
    (copy / missing).unlink()
    with pytest.raises(GeoclipError, match=missing):
        read_patch(copy)


def test_the_mapping_covers_every_label_of_the_examples(patch: Path):
    assert len(CORINE_TO_EUROSAT) == 43
    assert set(CORINE_TO_EUROSAT.values()) <= set(EUROSAT_CLASSES) | {None}
    assert set(CORINE_TO_EUROSAT.values()) - {None} == set(EUROSAT_CLASSES)  # every class can be agreed with
    found = {label for f in DATA.glob("*/*_labels_metadata.json") for label in json.loads(f.read_text())["labels"]}
    assert len(list(DATA.glob("*/*_labels_metadata.json"))) == 14
    assert found <= set(CORINE_TO_EUROSAT), found - set(CORINE_TO_EUROSAT)


def test_mapped_labels():
    assert mapped_labels(["Pastures", "Coniferous forest", "Peatbogs", "Mixed forest"]) == {"Pasture", "Forest"}
    assert mapped_labels(["Beaches, dunes, sands"]) == set()
    with pytest.raises(GeoclipError, match="Pasture land"):
        mapped_labels(["Pasture land"])


def test_a_stacked_scene_round_trips(patch: Path, tmp_path: Path):
    out = write_stacked_scene(patch, tmp_path / "scene.tif")
    stacked = read_patch(patch)
    with rasterio.open(out) as src:
        assert src.descriptions == ALL_BAND_NAMES
        assert src.crs == stacked.profile["crs"] and src.transform == stacked.profile["transform"]
        np.testing.assert_array_equal(src.read(), stacked.pixels)
    picked = write_stacked_scene(patch, tmp_path / "rgb.tif", band_names=["B04", "B03", "B02"])
    with rasterio.open(picked) as src:
        assert src.descriptions == ("B04", "B03", "B02")
        np.testing.assert_array_equal(src.read(1), stacked.pixels[ALL_BAND_NAMES.index("B04")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rgb.tif", "scene.tif"]  # no temporary left behind


def load_bench():
    """bench/bigearthnet_scenes.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bigearthnet_scenes", REPO / "bench" / "bigearthnet_scenes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_bench_scores_one_patch_end_to_end(patch: Path, tmp_path: Path):
    bench = load_bench()
    params = params_from_dict({"score": {"window": 64, "stride": 32, "batch_size": 16}})
    scorer = bench.load_scorer(make_model_dir(tmp_path / "model"), params, device="cpu")
    row = bench.score_patch(patch, scorer, tmp_path / "work", params)
    assert row["dominant"] in scorer.class_names
    assert sum(row["shares"].values()) == pytest.approx(1.0)
    assert row["share"] == max(row["shares"].values()) == row["shares"][row["dominant"]]
    assert row["valid_pixels"] == 120 * 120
    assert row["mapped"] == ["AnnualCrop"] and row["agrees"] == (row["dominant"] == "AnnualCrop")
    assert isinstance(row["any_agreement"], bool) and row["snow_share"] == 0.0  # a June patch of fields
    summary = bench.summarise([row])
    assert summary["judged"] == 1 and summary["agrees"] == int(row["agrees"])
    assert NAME in bench.markdown_table([row]) and "1 patches" in bench.summary_line(summary)
