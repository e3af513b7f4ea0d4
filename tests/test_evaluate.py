"""Tests for evaluation: metrics.json, confusion files, MLflow logging (SQLite and a real server), failures."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from geoclip.config import params_from_dict
from geoclip.errors import GeoclipError
from geoclip.evaluate import evaluate, per_class_scores, topk_accuracy
from geoclip.model import build_model, save_model
from geoclip.prepare import load_split
from geoclip.train import model_config, train
from factories import PACK_CLASSES as CLASSES
from factories import make_packs, own_tracking_store, tiny_params_dict

SCALARS = {"test_top1", "test_top5", "test_macro_f1", "val_top1", "nearest_centroid_top1"}


@pytest.fixture(autouse=True)
def _own_tracking_store():
    with own_tracking_store():
        yield


@pytest.fixture(scope="module")
def served(tmp_path_factory, mlflow_server):
    """Train and evaluate once against the real MLflow server: (params, train result, metrics)."""
    root = tmp_path_factory.mktemp("evaluate")
    make_packs(root / "prepared")
    params = params_from_dict(tiny_params_dict(root, tracking_uri=mlflow_server))
    with own_tracking_store():
        result = train(params)
        return params, result, evaluate(params)


def test_metrics_json_has_flat_scalars_and_per_class(served):
    params, _, metrics = served
    on_disk = json.loads((Path(params.paths.eval) / "metrics.json").read_text())
    assert on_disk == {k: v for k, v in metrics.items() if k != "per_class"}
    assert SCALARS <= set(on_disk)
    assert all(isinstance(on_disk[k], float) and 0.0 <= on_disk[k] <= 1.0 for k in SCALARS)
    assert on_disk["test_top5"] == 1.0  # three classes: the truth is always in the top five
    per_class = json.loads((Path(params.paths.eval) / "per_class.json").read_text())
    assert per_class == metrics["per_class"] and set(per_class) == set(CLASSES)
    assert all(set(v) == {"precision", "recall"} for v in per_class.values())


def test_confusion_files_have_one_row_per_test_tile(served):
    params, _, metrics = served
    out = Path(params.paths.eval)
    df = pd.read_csv(out / "confusion.csv")
    assert list(df.columns) == ["actual", "predicted"]
    assert len(df) == len(np.load(Path(params.paths.prepared) / "test_labels.npy"))
    assert set(df["actual"]) == set(CLASSES) and set(df["predicted"]) <= set(CLASSES)
    assert (df["actual"] == df["predicted"]).mean() == pytest.approx(metrics["test_top1"])
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_metrics_and_files_are_logged_to_the_training_run(served, mlflow_server):
    _, result, metrics = served
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(result["run_id"])
    for key in SCALARS:
        assert run.data.metrics[key] == pytest.approx(metrics[key])
    assert "train_loss" in run.data.metrics  # same run as training
    logged = {a.path for a in client.list_artifacts(result["run_id"], "eval")}
    assert logged == {"eval/metrics.json", "eval/per_class.json", "eval/confusion.csv", "eval/confusion.png"}


def test_evaluate_without_a_model_raises(tmp_path):
    make_packs(tmp_path / "prepared", per_class=6)
    params = params_from_dict(tiny_params_dict(tmp_path))
    with pytest.raises(GeoclipError, match="model.pt: not found"):
        evaluate(params)
    assert not (tmp_path / "eval").exists()


def test_evaluate_without_run_info_raises_before_writing(tmp_path):
    """A model without run.json (e.g. copied by hand) has no run to log to: a clear error, no eval files."""
    make_packs(tmp_path / "prepared", per_class=6)
    params = params_from_dict(tiny_params_dict(tmp_path))
    save_model(build_model(model_config(params, load_split(params.paths.prepared, "train")), seed=0),
               params.paths.model)
    with pytest.raises(GeoclipError, match="run.json: not found"):
        evaluate(params)
    assert not (tmp_path / "eval").exists()


def test_topk_and_per_class_scores_by_hand():
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    y = np.array([0, 2, 2, 1])
    assert topk_accuracy(probs, y, 1) == 0.5
    assert topk_accuracy(probs, y, 2) == 1.0
    per_class, macro_f1 = per_class_scores(y, probs.argmax(1), ["a", "b", "c"])
    assert per_class["a"] == {"precision": 0.5, "recall": 1.0}
    assert per_class["b"] == {"precision": 0.0, "recall": 0.0}
    assert per_class["c"] == {"precision": 1.0, "recall": 0.5}
    assert macro_f1 == pytest.approx((2 / 3 + 0 + 2 / 3) / 3)
