"""Tests for geoclip.data.synth: layout, georeferencing, determinism, realism (colour alone is not enough), calibration."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio

from geoclip.bands import ALL_BAND_NAMES, EUROSAT_CLASSES
from geoclip.config import params_from_dict
from geoclip.data import synth_textures as tx
from geoclip.data.baselines import nearest_centroid_accuracy
from geoclip.data.synth import _class_arrays, calibrate, calibration_table, derive_calibration, generate, render_scene
from geoclip.errors import GeoclipError


def make_params(raw: Path, classes: list[str] | None = None, **synth):
    """Small synth params writing tiles under ``raw`` and scenes under ``<raw>_synthetic`` beside it."""
    data = {"paths": {"raw": str(raw), "synthetic": str(scenes_of(raw))},
            "synth": {"tiles_per_class": 4, "scene_size": 256, **synth}}
    if classes:
        data["classes"] = {"names": classes}
    return params_from_dict(data)


def scenes_of(raw: Path) -> Path:
    """The synthetic scenes folder that goes with ``raw`` in these tests."""
    return raw.with_name(f"{raw.name}_synthetic")


def digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """4 tiles per class and one 320 px scene (2 x 2 blocks of 256); returns (params, summary)."""
    params = make_params(tmp_path_factory.mktemp("synth") / "raw", scene_size=320)
    return params, generate(params)


@pytest.fixture(scope="module")
def modest_dir(tmp_path_factory) -> Path:
    """12 tiles per class, no scene: enough to measure colour separability; returns the tiles folder."""
    raw = tmp_path_factory.mktemp("modest") / "raw"
    generate(make_params(raw, tiles_per_class=12, n_scenes=0, seed=3))
    return raw / "tiles"


@pytest.fixture(scope="module")
def modest(modest_dir) -> dict[str, np.ndarray]:
    """The modest set as arrays by class."""
    return _class_arrays(modest_dir)


def test_tiles_layout_and_georeferencing(small):
    params, summary = small
    raw = Path(params.paths.raw)
    labels = pd.read_csv(raw / "labels.csv")
    assert summary["tiles"] == len(labels) == 40
    assert {"id", "path", "class", "caption"} <= set(labels.columns) and labels["id"].is_unique
    assert labels["caption"].str.len().min() > 20 and labels["caption"].nunique() > 20  # one per tile, varied
    assert labels.loc[labels["class"] == "SeaLake", "caption"].str.contains("water").all()
    assert labels.groupby("class").size().to_dict() == {c: 4 for c in EUROSAT_CLASSES}
    for row in labels.to_dict("records"):
        assert row["path"] == f"tiles/{row['class']}/{row['id']}.tif"
        with rasterio.open(raw / row["path"]) as src:
            assert (src.count, src.width, src.height, src.dtypes[0]) == (13, 64, 64, "uint16")
            assert src.crs.to_epsg() == 32632 and src.descriptions == ALL_BAND_NAMES
            assert (src.transform.a, src.transform.e) == (10.0, -10.0)
            assert src.xy(32, 32, offset="ul") == (row["x"], row["y"])  # labels carry the tile centre
            data = src.read()
        assert data.min() >= 1 and data.max() <= 20000  # 0 is nodata: none inside tiles
    # every tile at its own place: centres at least a tile width apart
    xy = labels[["x", "y"]].to_numpy()
    gap = np.abs(xy[:, None] - xy[None]).max(-1) + np.eye(len(xy)) * 1e9
    assert gap.min() >= 640


def test_band_spectra_are_physical(small):
    params, _ = small
    arr = _class_arrays(Path(params.paths.raw) / "tiles")
    mean = {c: a.mean(axis=(0, 2, 3)) for c, a in arr.items()}
    b = {name: i for i, name in enumerate(ALL_BAND_NAMES)}
    assert all(m[b["B10"]] < 40 for m in mean.values())  # cirrus band: almost nothing reaches the sensor
    assert mean["SeaLake"][b["B08"]] < 600 < mean["Forest"][b["B08"]]  # water is dark in NIR
    assert mean["Forest"][b["B08"]] > 4 * mean["Forest"][b["B04"]]  # red edge: vegetation bright in NIR
    assert mean["Industrial"][b["B04"]] > 2 * mean["Forest"][b["B04"]]  # roofs bright in the visible


def test_scene_and_truth(small):
    params, summary = small
    home = Path(params.paths.synthetic)
    assert summary["scenes"] == [str(home / "scenes/scene_1.tif")]
    assert summary["truth"] == [str(home / "truth/scene_1_truth.tif")]
    assert not (Path(params.paths.raw) / "scenes").exists()  # scenes are never inside what ingest replaces
    with rasterio.open(home / "scenes/scene_1.tif") as src, rasterio.open(home / "truth/scene_1_truth.tif") as tru:
        assert (src.count, src.width, src.dtypes[0], src.nodata) == (13, 320, "uint16", 0)
        assert src.profile["tiled"] and src.block_shapes[0] == (256, 256)
        assert src.descriptions == ALL_BAND_NAMES
        assert (tru.count, tru.dtypes[0], tru.nodata) == (1, "uint8", 255)
        assert (tru.crs, tru.transform, tru.shape) == (src.crs, src.transform, src.shape)
        assert src.crs.to_epsg() == 32632
        data, truth = src.read(), tru.read(1)
    nodata = truth == 255
    assert 0 < nodata.mean() < 0.05  # a small nodata corner
    assert (data[:, nodata] == 0).all() and (data[:, ~nodata] > 0).all()
    assert len(np.unique(truth[~nodata])) >= 5 and truth[~nodata].max() < 10


def test_full_scene_has_every_class_in_regions():
    data, truth = render_scene(np.random.default_rng(1), 512, list(EUROSAT_CLASSES))
    assert data.shape == (13, 512, 512) and data.dtype == np.uint16
    assert set(np.unique(truth)) == set(range(10)) | {255}
    b08 = data[ALL_BAND_NAMES.index("B08")].astype(float)
    sea, forest = EUROSAT_CLASSES.index("SeaLake"), EUROSAT_CLASSES.index("Forest")
    assert np.median(b08[truth == sea]) < 600 < np.median(b08[truth == forest])


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    kw = {"tiles_per_class": 2, "scene_size": 128}
    generate(make_params(tmp_path / "a", **kw))
    generate(make_params(tmp_path / "b", **kw))
    generate(make_params(tmp_path / "c", seed=1, **kw))
    a, b, c = ({**digest(tmp_path / k), **{f"synthetic/{f}": h for f, h in digest(scenes_of(tmp_path / k)).items()}}
               for k in "abc")
    assert a == b and len(a) == 20 + 3 + 2 + 1  # tiles, labels/bands/ingest.json; scene, truth, ingest.json
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a if k.endswith(".tif"))


def test_class_subset_keeps_tiles_and_indexes_truth(small, tmp_path):
    params, _ = small
    raw = tmp_path / "raw"
    generate(make_params(raw, classes=["SeaLake", "Forest"]))
    assert sorted(p.name for p in (raw / "tiles").iterdir()) == ["Forest", "SeaLake"]
    # tiles are seeded by EuroSAT class: the same Forest tile whatever the class list
    assert (raw / "tiles/Forest/Forest_2.tif").read_bytes() == \
        (Path(params.paths.raw) / "tiles/Forest/Forest_2.tif").read_bytes()
    with rasterio.open(scenes_of(raw) / "truth/scene_1_truth.tif") as tru:
        assert set(np.unique(tru.read(1))) == {0, 1, 255}


def test_regenerating_replaces_its_own_folders_and_refuses_others_files(tmp_path):
    raw = tmp_path / "raw"
    generate(make_params(raw, classes=["SeaLake", "Forest"], tiles_per_class=2, scene_size=64))
    generate(make_params(raw, tiles_per_class=1, n_scenes=0))
    assert len(pd.read_csv(raw / "labels.csv")) == 10 and (raw / "tiles/Forest/Forest_1.tif").exists()
    assert not (raw / "tiles/Forest/Forest_2.tif").exists() and not list(scenes_of(raw).glob("scenes/*"))
    (raw / "tiles/Glacier").mkdir()
    (raw / "tiles/Glacier/mine.txt").write_text("a user's")
    with pytest.raises(GeoclipError, match=r"raw: holds 1 file\(s\) ingest did not write \(tiles/Glacier/mine.txt\)"):
        generate(make_params(raw, tiles_per_class=1, n_scenes=0))
    assert (raw / "tiles/Glacier/mine.txt").read_text() == "a user's"


@pytest.mark.parametrize("kw, message", [
    ({"classes": ["Forest", "Glacier"]}, "Glacier"),
    ({"epsg": 4326}, "synth.epsg"),
    ({"tiles_per_class": 0}, "synth.tiles_per_class"),
])
def test_bad_params_raise_and_write_nothing(tmp_path, kw, message):
    raw = tmp_path / "raw"
    with pytest.raises(GeoclipError, match=message):
        generate(make_params(raw, **kw))
    assert not raw.exists() and not list(tmp_path.iterdir())


def test_colour_alone_does_not_solve_the_classes(modest):
    classes = list(EUROSAT_CLASSES)
    x = np.concatenate([modest[c] for c in classes])
    y = np.concatenate([np.full(len(modest[c]), i) for i, c in enumerate(classes)])
    train = np.arange(len(y)) % 2 == 0
    acc = nearest_centroid_accuracy(x[train], y[train], x[~train], y[~train])
    assert 0.3 < acc < 0.9  # well above chance (0.1), well below perfect: the confusable pairs overlap
    # the four vegetated farmland classes overlap most: colour alone mixes them up
    farm = np.isin(y, [classes.index(c) for c in ("AnnualCrop", "PermanentCrop", "Pasture", "HerbaceousVegetation")])
    assert nearest_centroid_accuracy(x[train & farm], y[train & farm], x[~train & farm], y[~train & farm]) < 0.9


def test_synthetic_means_match_the_calibrated_class_means(modest):
    # Each class mean implied by the hard-coded table IS the real dev-tile mean (groups partition the pixels).
    # Allowed gap: 5 % for texture composition, 3 standard errors of a 12-tile mean, 2 DN for rounding (B10).
    for cls, arr in modest.items():
        tile_means = arr.mean(axis=(2, 3), dtype=np.float64)
        expected = tx.class_mean(cls)
        allowed = 0.05 * expected + 3 * tile_means.std(0) / np.sqrt(len(arr)) + 2
        assert (np.abs(tile_means.mean(0) - expected) <= allowed).all(), cls


def test_hard_coded_spectra_are_derived_from_the_real_tiles(real_tiles):
    derived = derive_calibration(real_tiles)
    assert derived["endmembers"] == tx.ENDMEMBERS
    for cls, pcs in derived["tile_pcs"].items():
        assert np.allclose(pcs, tx.TILE_PCS[cls], atol=0.002), cls


def test_calibration_against_real_tiles(real_tiles, modest_dir, tmp_path):
    table = calibration_table(real_tiles, modest_dir)
    assert len(table) == 10 * 13 and set(table["class"]) == set(EUROSAT_CLASSES)
    assert {"class", "band", "real_mean", "real_std", "synth_mean", "synth_std"} <= set(table.columns)
    # Same allowance as above: 5 % composition + 3 standard errors of the 12-tile synthetic mean + 2 DN.
    gap = (table["synth_mean"] - table["real_mean"]).abs()
    assert (gap <= 0.05 * table["real_mean"] + 3 * table["synth_tile_std"] / np.sqrt(12) + 2).all()
    assert table["mean_ratio"].between(0.5, 2).all()  # and never off by a factor of 2
    assert table["std_ratio"].between(0.25, 4).all()  # the spread has the right order of magnitude
    out = tmp_path / "calibration.md"
    calibrate(real_tiles, modest_dir, out)
    text = out.read_text()
    assert "## Forest" in text and "| B8A |" in text and "colour-only baseline" in text
    gaps = re.findall(r"real-vs-synthetic gap: linear discriminant on (.*?), .*: ([0-9.]+)% \+- ", text)
    assert [g[0].split(",")[0] for g in gaps] == ["band mean + std", "band mean + std"]  # colour, then texture too
    assert all(40.0 <= float(g[1]) <= 100.0 for g in gaps)


def test_calibration_table_needs_common_classes(tmp_path, small):
    params, _ = small
    (tmp_path / "empty" / "NotAClass").mkdir(parents=True)
    from factories import make_tile

    make_tile(tmp_path / "empty" / "NotAClass" / "x.tif", np.ones((13, 8, 8), np.uint16))
    with pytest.raises(GeoclipError, match="no EuroSAT class"):
        calibration_table(tmp_path / "empty", Path(params.paths.raw) / "tiles")


def test_tile_variation_is_mean_one_along_the_real_between_tile_directions():
    rng = np.random.default_rng(0)
    pcs = np.asarray(tx.TILE_PCS["AnnualCrop"]) * tx.VARIATION_SCALE
    f = np.stack([tx.variation(rng, "AnnualCrop") for _ in range(4000)]).astype(np.float64)
    assert np.allclose(f.mean(0), 1, atol=0.03)  # whole-tile factors keep the calibrated class mean
    # bands move together as the real tiles' principal components say (not each band on its own)
    assert np.allclose(np.cov(np.log(f), rowvar=False), pcs.T @ pcs, atol=0.01)


def test_noise_draws_independent_fields_at_once():
    fields = tx.noise(np.random.default_rng(0), 64, 48, 4, k=3)
    assert fields.shape == (3, 64, 48)
    assert abs(np.corrcoef(fields.reshape(3, -1))[0, 1]) < 0.3 and 0.5 < fields.std() < 1.5


def test_10m_detail_and_band_correlation_match_the_real_dev_tiles(real_tiles, modest):
    """Synthetic 10 m bands are as detailed as real ones (mean |gradient| over std, B02/B03/B04/B08: real dev
    0.35, 0.25 before this was calibrated) and bands as correlated within a tile (mean over the 78 band pairs:
    real 0.44, 0.51 before), both on log DN as the realism gap measures them (geoclip.data.baselines)."""
    from geoclip.data.baselines import tile_features

    ten = [ALL_BAND_NAMES.index(b) for b in ("B02", "B03", "B04", "B08")]

    def detail_and_correlation(arrays):
        f = tile_features(np.concatenate([arrays[c] for c in EUROSAT_CLASSES]))
        return f[:, 26:39][:, ten].mean(), f[:, 39:].mean()

    (real_grad, real_corr), (syn_grad, syn_corr) = detail_and_correlation(_class_arrays(real_tiles)), \
        detail_and_correlation(modest)
    assert abs(syn_grad - real_grad) < 0.05, (syn_grad, real_grad)
    assert abs(syn_corr - real_corr) < 0.04, (syn_corr, real_corr)


def test_calibration_doc_reports_held_out_gap_and_keeps_its_history(real_tiles, modest_dir, tmp_path):
    out = tmp_path / "calibration.md"
    calibrate(real_tiles, modest_dir, out, held_out_dir=real_tiles)  # any real folder stands in for the held-out one
    assert len(re.findall(r"real-vs-synthetic gap \(held-out real tiles\): linear discriminant", out.read_text())) == 2
    out.write_text(out.read_text() + "\n## Before and after\n\nhand-kept figures\n")
    calibrate(real_tiles, modest_dir, out)
    text = out.read_text()
    assert text.count("## Before and after") == 1 and text.rstrip().endswith("hand-kept figures")
    assert "held-out real tiles" not in text
