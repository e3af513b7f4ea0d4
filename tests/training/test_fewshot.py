"""Tests for few-shot adaptation: deterministic per-class split, linear probe, projection fine-tune, CLI, failures."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from factories import make_model_dir, make_tile, own_tracking_store, register_champion

from geoclip.bands import EUROSAT_CLASSES
from geoclip.cli import main
from geoclip.config import params_from_dict
from geoclip.errors import GeoclipError
from geoclip.stages import fewshot
from geoclip.training.fewshot import split_shots

SYN_CLASSES = ["Forest", "River", "SeaLake"]


def _params(shots: int = 5, method: str = "both", epochs: int = 40, lr: float = 1e-2, **extra):
    """Params with a small few-shot section (``method`` may be 'both', as the CLI allows)."""
    p = params_from_dict({"fewshot": {"shots": shots, "epochs": epochs, "lr": lr}, **extra})
    return replace(p, fewshot=replace(p.fewshot, method=method))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny untrained model over the ten EuroSAT classes."""
    return make_model_dir(tmp_path_factory.mktemp("fewshot") / "model")


@pytest.fixture(scope="module")
def separable(tmp_path_factory) -> Path:
    """Three classes x 10 GeoTIFFs in EuroSAT layout, each class a distinct flat spectrum plus noise."""
    root = tmp_path_factory.mktemp("separable")
    rng = np.random.default_rng(0)
    spectra = rng.uniform(500, 4000, size=(len(SYN_CLASSES), 13))
    for c, name in enumerate(SYN_CLASSES):
        for n in range(10):
            data = spectra[c][:, None, None] + rng.normal(0, 100, (13, 64, 64))
            make_tile(root / name / f"{name}_{n}.tif", data.clip(1, 20000).astype("uint16"))
    return root


def test_real_tiles_split_five_and_five_per_class(real_tiles, model_dir, tmp_path):
    out = tmp_path / "fs.json"
    result = fewshot(_params(epochs=5), real_tiles, model_dir, out)
    assert json.loads(out.read_text()) == result
    assert result["classes"] == list(EUROSAT_CLASSES) and result["n_shots"] == 50 and result["n_test"] == 50
    assert set(result["accuracy"]) == {"zero_shot", "linear_probe", "projection"}
    assert all(0.0 <= a <= 1.0 for a in result["accuracy"].values())
    for name in EUROSAT_CLASSES:
        shots, rest = result["shot_ids"][name], result["test_ids"][name]
        assert len(shots) == 5 and len(rest) == 5 and not set(shots) & set(rest)
        assert all(i.startswith(f"{name}_") for i in shots + rest)
        row = result["per_class"][name]
        assert row["n_test"] == 5 and all(0.0 <= row[m] <= 1.0 for m in result["accuracy"])
    # The overall accuracy is the mean of the per-class ones here (five test tiles in every class).
    for method, acc in result["accuracy"].items():
        assert acc == pytest.approx(np.mean([result["per_class"][c][method] for c in EUROSAT_CLASSES]))
    again = fewshot(_params(epochs=5), real_tiles, model_dir, tmp_path / "again.json")
    assert again == {**result, "source": again["source"]}  # same seed: same shots, same figures
    other = fewshot(replace(_params(epochs=0), fewshot=replace(_params().fewshot, seed=1, epochs=0)),
                    real_tiles, model_dir, tmp_path / "other.json")
    assert other["shot_ids"] != result["shot_ids"]  # another seed draws other shots


def test_split_is_per_class_and_independent_of_row_order():
    labels = np.array([0] * 7 + [2] * 4)
    shots, rest = split_shots(labels, 3, seed=0)
    assert np.bincount(labels[shots]).tolist() == [3, 0, 3] and len(rest) == 5
    assert sorted(np.concatenate([shots, rest]).tolist()) == list(range(11))
    assert np.array_equal(split_shots(labels, 3, seed=0)[0], shots)


def test_linear_probe_clearly_beats_chance_on_separable_tiles(separable, model_dir, tmp_path):
    result = fewshot(_params(shots=5, method="linear_probe"), separable, model_dir, tmp_path / "fs.json")
    assert result["n_shots"] == 15 and result["n_test"] == 15
    assert result["accuracy"]["linear_probe"] >= 0.9  # chance over the 10 model classes is 0.1 (1/3 over these)


def test_zero_shots_leave_every_method_at_zero_shot(separable, model_dir, tmp_path):
    result = fewshot(_params(shots=0), separable, model_dir, tmp_path / "fs.json")
    zero = result["accuracy"]["zero_shot"]
    assert result["n_shots"] == 0 and result["accuracy"] == {"zero_shot": zero, "linear_probe": zero,
                                                             "projection": zero}


def test_a_manifest_works_like_the_folder(separable, model_dir, tmp_path):
    rows = [{"path": str(p), "class": p.parent.name} for p in sorted(separable.rglob("*.tif"))]
    manifest = tmp_path / "tiles.csv"
    pd.DataFrame(rows[::-1]).to_csv(manifest, index=False)  # reversed rows: the split must not care
    params = _params(method="linear_probe", epochs=10)
    by_folder = fewshot(params, separable, model_dir, tmp_path / "a.json")
    by_manifest = fewshot(params, manifest, model_dir, tmp_path / "b.json")
    assert by_manifest["shot_ids"] == by_folder["shot_ids"]
    assert by_manifest["accuracy"] == pytest.approx(by_folder["accuracy"])


def test_cli_prints_a_table_and_writes_json(separable, model_dir, tmp_path, capsys):
    params_file = tmp_path / "params.yaml"
    params_file.write_text("fewshot:\n  epochs: 20\n  lr: 0.01\n")
    out = tmp_path / "eval" / "fewshot.json"
    code = main(["fewshot", str(separable), "--params", str(params_file), "--model", str(model_dir),
                 "--shots", "3", "--method", "linear_probe", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "3-shot" in printed and "overall" in printed and "linear_probe" in printed
    result = json.loads(out.read_text())
    assert result["shots"] == 3 and result["methods"] == ["linear_probe"] and result["n_test"] == 21


def test_registered_model_uri_gives_the_same_result_as_its_folder(separable, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with own_tracking_store():
        register_champion(tmp_path, uri, "geoclip-fs")  # logs make_model_dir(tmp_path / "model")
        params = _params(method="linear_probe", epochs=10, mlflow={"tracking_uri": uri,
                                                        "artifact_location": str(tmp_path / "art")})
        by_uri = fewshot(params, separable, "models:/geoclip-fs@champion", tmp_path / "a.json")
    by_dir = fewshot(params, separable, tmp_path / "model", tmp_path / "b.json")
    assert by_uri["accuracy"] == pytest.approx(by_dir["accuracy"])


@pytest.mark.parametrize("case, message", [
    ("unknown_class", r"class\(es\) \['Glacier'\] are not among the model's classes"),
    ("too_few", r"fewshot.shots: 10, but a class .* has only 10 tiles"),
    ("unlabelled", "no class; few-shot needs labelled tiles"),
    ("no_model", "no model.pt \\+ model_config.json"),
    ("bad_method", "fewshot.method: 'knn'"),
    ("wrong_bands", r"tile shape \(3, 64, 64\), the model expects \(13, 64, 64\)"),
])
def test_bad_inputs_raise_and_write_nothing(case, message, separable, model_dir, tmp_path):
    source, model, params = separable, model_dir, _params(method="linear_probe")
    if case == "unknown_class":
        source = tmp_path / "tiles"
        make_tile(source / "Forest" / "Forest_0.tif", np.full((13, 64, 64), 900, np.uint16))
        make_tile(source / "Glacier" / "Glacier_0.tif", np.full((13, 64, 64), 900, np.uint16))
    elif case == "too_few":
        params = _params(shots=10)
    elif case == "unlabelled":
        source = tmp_path / "flat"
        make_tile(source / "a.tif", np.full((13, 64, 64), 900, np.uint16))
    elif case == "no_model":
        model = tmp_path / "nothing"
    elif case == "bad_method":
        params = _params(method="knn")
    elif case == "wrong_bands":
        source = tmp_path / "rgb"
        for n in range(3):
            make_tile(source / "Forest" / f"Forest_{n}.tif", np.full((3, 64, 64), 900, np.uint16))
    out = tmp_path / "out" / "fs.json"
    with pytest.raises(GeoclipError, match=message):
        fewshot(params, source, model, out)
    assert not out.parent.exists()
