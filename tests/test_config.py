"""Tests for geoclip.config: strict, typed params loading."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from geoclip.config import TRAIN_EXECUTION_KEYS, Params, TrainConfig, load_params, params_from_dict
from geoclip.errors import GeoclipError

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_load_and_match_defaults_where_expected():
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert params.bands[-1] == "B8A" and len(params.bands) == 13
    assert params.classes.names[0] == "AnnualCrop" and len(params.classes.names) == 10
    assert params.train.lr == pytest.approx(1e-3)


def test_missing_sections_take_defaults():
    params = params_from_dict({"train": {"epochs": 2}})
    assert params.train.epochs == 2
    assert params.score.window == 64


def test_int_is_widened_to_float():
    assert params_from_dict({"train": {"lr": 1}}).train.lr == 1.0


@pytest.mark.parametrize("data, fragment", [
    ({"train": {"epocs": 2}}, "unknown key(s) ['epocs']"),
    ({"train": {"epochs": "two"}}, "train.epochs: expected int"),
    ({"train": {"epochs": True}}, "train.epochs: expected int"),
    ({"bands": ["B01", "B99"]}, "unknown band(s) ['B99']"),
    ({"classes": {"names": ["A"]}}, "at least two distinct names"),
    ({"classes": {"templates": ["no placeholder"]}}, "needs a '{}'"),
    ({"score": {"window": 64, "stride": 48}}, "score.stride"),
    ({"prepare": {"val_fraction": 0.6, "test_fraction": 0.5}}, "sum between 0 and 1"),
    ({"synth": []}, "synth: expected a mapping"),
    ({"paths": {"raw": "data/raw", "synthetic": "data/raw/synthetic"}}, "paths.synthetic: data/raw/synthetic overlaps"),
    ({"ingest": {"allow_outside_paths": "yes"}}, "ingest.allow_outside_paths: expected bool"),
    ({"train": {"nnodes": 0}}, "train.nnodes: 0; expected a number >= 1"),
    ({"train": {"nproc_per_node": 0}}, "train.nproc_per_node: 0; expected a number >= 1"),
    ({"train": {"max_restarts": -1}}, "train.max_restarts: -1; expected a number >= 0"),
    ({"train": {"join_timeout": 0}}, "train.join_timeout: 0; expected a number > 0 (seconds)"),
    ({"score": {"read_workers": -2}}, "score.read_workers: -2; expected a number of threads, or 0"),
    ({"train": {"lr_scaling": "quadratic"}}, "train.lr_scaling: 'quadratic'; expected one of none, sqrt, linear"),
    ({"train": {"lr_base_batch": 0}}, "train.lr_base_batch: 0; expected a number >= 1"),
    ({"train": {"compile": "on"}}, "train.compile: 'on'; expected one of off, default, reduce-overhead, max-autotune"),
])
def test_bad_params_name_the_field(data, fragment):
    with pytest.raises(GeoclipError, match=None) as info:
        params_from_dict(data)
    assert fragment in str(info.value)


def test_load_params_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(GeoclipError, match="nope.yaml: params file not found"):
        load_params(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(GeoclipError, match="bad.yaml: not valid YAML"):
        load_params(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("train:\n  batch_size: big\n")
    with pytest.raises(GeoclipError, match="wrong.yaml: train.batch_size: expected int"):
        load_params(wrong)


def test_prompts_use_descriptions_and_every_template():
    params = params_from_dict({"classes": {"names": ["Forest", "River"], "descriptions": {"Forest": "woodland"},
                                           "templates": ["a photo of {}.", "{} from space"]}})
    assert params.classes.prompts("Forest") == ["a photo of woodland.", "woodland from space"]
    assert params.classes.prompts("River") == ["a photo of River.", "River from space"]


def test_env_tracking_uri_wins(monkeypatch):
    params = params_from_dict({})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert params.mlflow.resolved_tracking_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert params.mlflow.resolved_tracking_uri() == "http://127.0.0.1:5000"


@pytest.mark.parametrize(("scaling", "factor"), [("none", 1.0), ("sqrt", 2.0), ("linear", 4.0)])
def test_the_learning_rate_scales_with_the_batch_from_its_base(scaling, factor):
    train = params_from_dict({"train": {"lr": 0.001, "batch_size": 512, "lr_base_batch": 128,
                                        "lr_scaling": scaling}}).train
    assert train.scaled_lr() == pytest.approx(0.001 * factor)
    assert params_from_dict({}).train.scaled_lr() == 0.001  # the default: lr as written


def test_dvc_tracks_every_train_key_but_how_training_runs():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]
    tracked = {p.removeprefix("train.") for p in stage["params"] if p.startswith("train.")}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    # A new train key is tracked (it may change the model) unless it is declared one of how training runs.
    assert tracked == fields - TRAIN_EXECUTION_KEYS, sorted(tracked ^ (fields - TRAIN_EXECUTION_KEYS))
    assert TRAIN_EXECUTION_KEYS < fields and "train" not in stage["params"]
    written = yaml.safe_load((REPO / "params.yaml").read_text())["train"]
    assert fields <= set(written), sorted(fields - set(written))  # DVC refuses a tracked key params.yaml lacks
