"""Tile prediction to CSV with a saved pyfunc: real EuroSAT_MS tiles, generated folders and manifests."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from big_files import SCENE_SIZE, write_full_scene
from factories import make_model_dir, make_tile, synthetic_tiles, torch_predict

from geoclip.bands import EUROSAT_CLASSES
from geoclip.cli import main
from geoclip.errors import GeoclipError
from geoclip.model.vocab import served_params
from geoclip.registry.models import load_served_model
from geoclip.registry.pyfunc import save_pyfunc
from geoclip.scoring.predict import predict_tiles

PROB_COLUMNS = [f"prob_{c}" for c in EUROSAT_CLASSES]
SIM_COLUMNS = [f"sim_{c}" for c in EUROSAT_CLASSES]


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory) -> str:
    """A tiny model saved as a local pyfunc folder (no server needed)."""
    root = tmp_path_factory.mktemp("predict-model")
    return str(save_pyfunc(make_model_dir(root / "model"), synthetic_tiles(2), root / "pyfunc"))


def write_tiles(folder: Path, tiles: np.ndarray) -> list[Path]:
    """Write each ``(13, H, W)`` tile as ``folder/tile_<i>.tif``; return the paths."""
    return [make_tile(folder / f"tile_{i}.tif", tile) for i, tile in enumerate(tiles)]


def test_real_eurosat_tiles(tmp_path, model_uri, real_tiles):
    out = tmp_path / "preds.csv"
    df = predict_tiles(real_tiles, model_uri, out, batch_size=16)
    assert len(df) == 100
    assert list(df.columns) == ["id", "path", "predicted", "confidence", *PROB_COLUMNS, "max_similarity", "novelty",
                                *SIM_COLUMNS, "class"]
    np.testing.assert_allclose(df["max_similarity"], df[SIM_COLUMNS].max(axis=1), atol=1e-6)
    assert df["novelty"].isna().all()  # this model was saved without open-set calibration
    assert (df["class"] == [Path(p).parent.name for p in df["path"]]).all()
    assert set(df["predicted"]) <= set(EUROSAT_CLASSES)
    np.testing.assert_allclose(df[PROB_COLUMNS].sum(axis=1), 1.0, rtol=1e-5)
    pd.testing.assert_frame_equal(pd.read_csv(out), df, check_dtype=False, atol=1e-6)


def test_generated_flat_folder_and_manifest(tmp_path, model_uri):
    tiles = synthetic_tiles(5, seed=3)
    paths = write_tiles(tmp_path / "flat", tiles)
    df = predict_tiles(tmp_path / "flat", model_uri, tmp_path / "flat.csv", batch_size=2)
    assert "class" not in df.columns and len(df) == 5
    np.testing.assert_allclose(df[PROB_COLUMNS].to_numpy(), torch_predict(Path(model_uri).parent / "model", tiles)[0],
                               atol=1e-5)
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"path": [f"flat/{p.name}" for p in paths], "class": ["Forest"] * 5}).to_csv(manifest, index=False)
    by_manifest = predict_tiles(manifest, model_uri, tmp_path / "manifest_preds.csv")
    assert (by_manifest["class"] == "Forest").all()
    np.testing.assert_allclose(by_manifest[PROB_COLUMNS].to_numpy(), df[PROB_COLUMNS].to_numpy(), atol=1e-6)


def test_wrong_tile_size_is_refused_and_nothing_written(tmp_path, model_uri):
    write_tiles(tmp_path / "tiles", synthetic_tiles(2))
    write_tiles(tmp_path / "tiles" / "big", np.zeros((1, 13, 80, 80), np.uint16))  # a class folder, wrong size
    (tmp_path / "tiles" / "tile_0.tif").unlink()
    (tmp_path / "tiles" / "tile_1.tif").unlink()
    with pytest.raises(GeoclipError, match=r"tile_0\.tif: tile shape \(13, 80, 80\)"):
        predict_tiles(tmp_path / "tiles", model_uri, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_full_scene_among_tiles_is_refused_before_its_pixels_are_read(tmp_path, model_uri):
    write_tiles(tmp_path / "tiles", synthetic_tiles(2))
    scene = write_full_scene(tmp_path / "tiles" / "tile_0_scene.tif")  # 3.1 GB of pixels in a 4 kB file
    load_served_model(model_uri)  # loaded once per process: only what predict reads is traced below
    tracemalloc.start()
    try:
        with pytest.raises(GeoclipError) as err:
            predict_tiles(tmp_path / "tiles", model_uri, tmp_path / "out.csv")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB traced: the scene's pixels were read"
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{scene}: ")
    assert f"tile shape (13, {SCENE_SIZE}, {SCENE_SIZE}), the model expects (13, 64, 64)" in msg
    assert "geoclip score" in msg  # what to do with a scene
    assert not (tmp_path / "out.csv").exists()


def test_any_class_list_names_the_columns_and_a_bad_one_writes_nothing(tmp_path, model_uri):
    write_tiles(tmp_path / "tiles", synthetic_tiles(3))
    out = tmp_path / "preds.csv"
    df = predict_tiles(tmp_path / "tiles", model_uri, out, batch_size=2,
                       classes=served_params(["lake", "forêt", "Forest"]))
    assert list(df.columns) == ["id", "path", "predicted", "confidence", "prob_lake", "prob_forêt", "prob_Forest",
                                "max_similarity", "novelty", "sim_lake", "sim_forêt", "sim_Forest"]
    assert set(df["predicted"]) <= {"lake", "forêt", "Forest"}
    pd.testing.assert_frame_equal(pd.read_csv(out, encoding="utf-8"), df, check_dtype=False, atol=1e-6)
    assert main(["predict", str(tmp_path / "tiles"), "--model", model_uri, "--out", str(tmp_path / "cli.csv"),
                 "--classes", "lake, forêt, Forest"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "cli.csv"), df, check_dtype=False, atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--classes", "lake"], "--classes: 1 class"),
    (["--classes", "lake, Lake"], "repeats"),
    (["--classes", "a, b", "--classes-file", "x.yaml"], "--classes: a class list and a class file are both set"),
    (["--classes-file", "missing.yaml"], "cannot read the class file"),
])
def test_bad_class_lists_exit_2_with_one_line(tmp_path, model_uri, capsys, args, message):
    write_tiles(tmp_path / "tiles", synthetic_tiles(1))
    out = tmp_path / "preds.csv"
    assert main(["predict", str(tmp_path / "tiles"), "--model", model_uri, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_tiles_in_another_band_order_or_per_band_files_predict_as_their_stacked_selves(tmp_path, model_uri):
    from geoclip.bands import ALL_BAND_NAMES, canonical_band

    tiles = synthetic_tiles(2, seed=5)
    write_tiles(tmp_path / "stacked", tiles)
    archive_order = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
    index = [ALL_BAND_NAMES.index(canonical_band(b)) for b in archive_order]
    make_tile(tmp_path / "other" / "tile_0.tif", tiles[0][index], descriptions=archive_order)  # B8A after B8
    folder = tmp_path / "other" / "tile_1"  # one file per band, all at 10 m
    for i, band in enumerate(ALL_BAND_NAMES):
        make_tile(folder / f"tile_1_{band}.tif", tiles[1][i:i + 1])
    pd.DataFrame({"path": ["tile_0.tif", "tile_1"]}).to_csv(tmp_path / "other" / "m.csv", index=False)
    stacked = predict_tiles(tmp_path / "stacked", model_uri, tmp_path / "a.csv")
    other = predict_tiles(tmp_path / "other" / "m.csv", model_uri, tmp_path / "b.csv")
    np.testing.assert_allclose(other[PROB_COLUMNS].to_numpy(), stacked[PROB_COLUMNS].to_numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> tuple[str, Path, Path]:
    """A tiny trained, open-set calibrated model as a local pyfunc folder; its model folder and packs folder."""
    from factories import make_trained_model_dir

    root = tmp_path_factory.mktemp("calibrated")
    model_dir, prepared = make_trained_model_dir(root)
    return str(save_pyfunc(model_dir, synthetic_tiles(2), root / "pyfunc")), model_dir, prepared


def test_novelty_and_similarities_per_tile_from_a_calibrated_model(tmp_path, calibrated, capsys):
    import torch
    from factories import PACK_CLASSES

    from geoclip.model.clip import load_model
    from geoclip.model.openset import open_set_score

    model_uri, model_dir, prepared = calibrated
    known = np.load(prepared / "test_images.npy")
    noise = np.random.default_rng(1).integers(0, 10000, (6, 13, 64, 64)).astype(np.uint16)
    write_tiles(tmp_path / "tiles", np.concatenate([known, noise]))  # tile_30 .. tile_35 are noise
    assert main(["predict", str(tmp_path / "tiles"), "--model", model_uri, "--out", str(tmp_path / "p.csv")]) == 0
    out = capsys.readouterr()
    assert "warning:" not in out.err  # the trained classes: never a far-class warning
    df = pd.read_csv(tmp_path / "p.csv")
    sims = [f"sim_{c}" for c in PACK_CLASSES]
    assert list(df.columns) == ["id", "path", "predicted", "confidence", *[f"prob_{c}" for c in PACK_CLASSES],
                                "max_similarity", "novelty", *sims]
    model = load_model(model_dir)
    tiles = np.stack([np.concatenate([known, noise])[int(Path(p).stem.split("_")[1])] for p in df["path"]])
    _, emb = model.predict(torch.from_numpy(tiles.astype(np.float32)))
    expected = emb.numpy() @ model.class_embeddings().detach().numpy().T
    np.testing.assert_allclose(df[sims].to_numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(df["max_similarity"], expected.max(axis=1), atol=1e-5)
    np.testing.assert_allclose(df["novelty"], open_set_score(expected.max(axis=1), model.cfg.open_set_quantiles),
                               atol=1e-4)
    is_noise = np.array([int(Path(p).stem.split("_")[1]) >= len(known) for p in df["path"]])
    assert (df["novelty"][is_noise] >= 0.95).all()
    assert (df["novelty"][~is_noise] >= 0.95).mean() <= 0.1
    assert f"({len(df)} tiles; {int((df['novelty'] >= 0.95).sum())} with novelty >= 0.95" in out.out


def test_far_class_lists_are_warned_by_name_and_the_trained_list_is_not(tmp_path, calibrated, capsys):
    model_uri, _, _ = calibrated
    write_tiles(tmp_path / "tiles", synthetic_tiles(2))
    args = ["predict", str(tmp_path / "tiles"), "--model", model_uri, "--out", str(tmp_path / "p.csv")]
    assert main([*args, "--classes", "spaceship interior, woodland, a cat on a sofa, Forest"]) == 0
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("warning:")]
    assert line.startswith("warning: classes 'spaceship interior', 'a cat on a sofa' are far from anything the model "
                           "learnt (nearest: ") and line.endswith("their scores are guesses")
    assert "woodland" not in line and "Forest" not in line
    assert main([*args, "--classes", "Forest, Industrial, SeaLake"]) == 0
    assert main([*args, "--classes", "woodland, factories, lake"]) == 0  # paraphrases of what was learnt
    assert "warning:" not in capsys.readouterr().err


def test_a_model_saved_before_calibration_says_not_calibrated(tmp_path, model_uri, capsys):
    write_tiles(tmp_path / "tiles", synthetic_tiles(2))
    assert main(["predict", str(tmp_path / "tiles"), "--model", model_uri, "--out", str(tmp_path / "p.csv")]) == 0
    out = capsys.readouterr()
    assert "(2 tiles; novelty: not calibrated)" in out.out
    assert f"warning: {model_uri}: open-set scores not calibrated" in out.err
    assert pd.read_csv(tmp_path / "p.csv")["novelty"].isna().all()


def test_the_served_model_returns_similarities_beside_its_old_outputs(calibrated):
    from geoclip.registry.pyfunc import served_open_set

    model_uri, _, _ = calibrated
    model = load_served_model(model_uri)
    out = model.predict(synthetic_tiles(3), params={"classes": ["lake", "spaceship interior"]})
    assert {"probabilities", "embeddings"} <= set(out)  # what callers used before
    assert out["similarities"].shape == (3, 2) and out["max_similarity"].shape == out["novelty"].shape == (3,)
    np.testing.assert_allclose(out["max_similarity"], out["similarities"].max(axis=1))
    assert ((out["novelty"] >= 0) & (out["novelty"] <= 1)).all()
    info = served_open_set(model, {"classes": ["lake", "spaceship interior"]})
    assert info["calibrated"] and [f["name"] for f in info["far_classes"]] == ["spaceship interior"]
    assert served_open_set(model) == {"calibrated": True, "far_classes": [], "warning": ""}
