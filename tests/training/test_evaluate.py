"""Tests for evaluation: metrics.json, confusion and calibration files, retrieval, the unseen class, MLflow, failures."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from factories import PACK_CLASSES as CLASSES
from factories import TINY_ENCODER, make_packs, own_tracking_store, tiny_params_dict

from geoclip.config import params_from_dict
from geoclip.data.prepare import load_split
from geoclip.errors import GeoclipError
from geoclip.model.clip import build_model, save_model
from geoclip.stages import evaluate, train
from geoclip.training.evaluate import (
    calibration_table,
    expected_calibration_error,
    per_class_scores,
    retrieval_scores,
    topk_accuracy,
)
from geoclip.training.train import model_config

RETRIEVAL = {f"retrieval_{m}_at_{k}" for m in ("precision", "hit") for k in (1, 5, 10)} | {"retrieval_map"}
SCALARS = {"test_top1", "test_top5", "test_macro_f1", "test_ece", "val_top1", "nearest_centroid_top1"} | RETRIEVAL
EVAL_FILES = {"metrics.json", "per_class.json", "confusion.csv", "confusion.png", "calibration.csv",
              "calibration.png"}


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
    for k, bigger in ((1, 5), (5, 10)):  # a hit needs only one relevant tile: never below precision; grows with k
        assert on_disk[f"retrieval_hit_at_{k}"] >= on_disk[f"retrieval_precision_at_{k}"]
        assert on_disk[f"retrieval_hit_at_{bigger}"] >= on_disk[f"retrieval_hit_at_{k}"]
    assert "holdout_top1" not in on_disk  # no class held out
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
    assert logged == {f"eval/{name}" for name in EVAL_FILES}
    assert run.data.tags["holdout_class"] == "none"


def test_calibration_files_match_the_ece(served):
    params, _, metrics = served
    out = Path(params.paths.eval)
    df = pd.read_csv(out / "calibration.csv")
    assert list(df.columns) == ["bin", "lower", "upper", "count", "confidence", "accuracy"]
    assert df["count"].sum() == len(np.load(Path(params.paths.prepared) / "test_labels.npy"))
    assert (df["count"] > 0).all() and df["bin"].max() < params.evaluate.ece_bins
    assert ((df["confidence"] > df["lower"]) | (df["bin"] == 0)).all() and (df["confidence"] <= df["upper"]).all()
    ece = (df["count"] * (df["accuracy"] - df["confidence"]).abs()).sum() / df["count"].sum()
    assert metrics["test_ece"] == pytest.approx(ece)
    assert (out / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


def test_ece_by_hand():
    # Four tiles at confidence 0.9 with two right (gap 0.4), two at 0.6 with both right (gap 0.4): ECE 0.4.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([0, 1, 1, 0, 0, 1])
    table = calibration_table(probs, y, n_bins=10)
    assert table["count"].tolist() == [0] * 5 + [2, 0, 0, 4, 0]
    assert table.loc[8, "accuracy"] == 0.5 and table.loc[8, "confidence"] == pytest.approx(0.9)
    assert expected_calibration_error(table) == pytest.approx(0.4)
    perfect = calibration_table(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1]), n_bins=15)
    assert expected_calibration_error(perfect) == 0.0


def test_retrieval_by_hand():
    # Two classes on two axes; class 0's ranking is [t0 (0), t2 (1), t1 (0), t3 (1)], class 1's is [t3, t2, t1, t0].
    emb = np.array([[1.0, 0.0], [0.6, 0.5], [0.8, 0.6], [0.0, 1.0]])
    labels = np.array([0, 0, 1, 1])
    scores = retrieval_scores(emb, np.eye(2), labels, ks=(1, 2, 10))
    assert scores["retrieval_precision_at_1"] == 1.0 and scores["retrieval_hit_at_1"] == 1.0
    assert scores["retrieval_precision_at_2"] == pytest.approx((0.5 + 1.0) / 2)
    assert scores["retrieval_precision_at_10"] == 0.5  # k cut to the 4 tiles: half are relevant
    ap0 = (1 / 1 + 2 / 3) / 2  # class 0's relevant tiles at ranks 1 and 3
    assert scores["retrieval_map"] == pytest.approx((ap0 + 1.0) / 2)
    # A class with no test tiles asks no query.
    assert retrieval_scores(emb, np.eye(3)[:, :2], labels)["retrieval_map"] == pytest.approx((ap0 + 1.0) / 2)


def _tiny_model_and_run(tmp_path: Path, **train_params):
    """Packs, a tiny untrained model of the pack classes and a run.json (no training): params for evaluate()."""
    import torch

    from geoclip.model.clip import GeoCLIP, ModelConfig
    from geoclip.registry.tracking import configure, write_run_info

    make_packs(tmp_path / "prepared", per_class=12)
    params = params_from_dict(tiny_params_dict(tmp_path, **train_params))
    torch.manual_seed(0)
    cfg = ModelConfig(image_encoder=TINY_ENCODER, embed_dim=16, band_names=list(params.bands), class_names=CLASSES,
                      prompts=[[f"a {c}."] for c in CLASSES], band_mean=[1500.0] * 13, band_std=[800.0] * 13)
    save_model(GeoCLIP(cfg, prompt_features=torch.randn(len(CLASSES), 1, 384)), params.paths.model)
    experiment_id = configure(params)
    with mlflow.start_run() as run:
        pass
    write_run_info(params, run.info.run_id, experiment_id)
    return params, run.info.run_id


def test_holdout_class_gets_its_own_zero_shot_accuracy(tmp_path):
    params, run_id = _tiny_model_and_run(tmp_path, holdout_class="SeaLake")
    metrics = evaluate(params)
    confusion = pd.read_csv(tmp_path / "eval" / "confusion.csv")
    held = confusion[confusion["actual"] == "SeaLake"]
    seen = confusion[confusion["actual"] != "SeaLake"]
    assert len(held) == 2  # classified over all three classes, not only the held-out one
    assert metrics["holdout_top1"] == pytest.approx((held["predicted"] == "SeaLake").mean())
    assert metrics["seen_top1"] == pytest.approx((seen["predicted"] == seen["actual"]).mean())
    on_disk = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert on_disk["holdout_top1"] == metrics["holdout_top1"]
    run = mlflow.MlflowClient(params.mlflow.resolved_tracking_uri()).get_run(run_id)
    assert run.data.tags["holdout_class"] == "SeaLake"
    assert run.data.metrics["holdout_top1"] == pytest.approx(metrics["holdout_top1"])


def test_bad_ece_bins_raise_before_writing(tmp_path):
    params, _ = _tiny_model_and_run(tmp_path)
    from dataclasses import replace

    with pytest.raises(GeoclipError, match="evaluate.ece_bins: 0; expected"):
        evaluate(replace(params, evaluate=replace(params.evaluate, ece_bins=0)))
    assert not (tmp_path / "eval").exists()


def test_synthetic_and_real_test_tiles_are_scored_apart(tmp_path):
    """index.csv names each tile's source: metrics, per-class and confusion rows split synthetic from real."""
    params, run_id = _tiny_model_and_run(tmp_path)
    index_path = Path(params.paths.prepared) / "index.csv"
    index = pd.read_csv(index_path)
    index["source"] = ["synthetic" if i % 2 else "/data/EuroSAT_MS" for i in range(len(index))]
    index.to_csv(index_path, index=False)
    metrics = evaluate(params)
    confusion = pd.read_csv(tmp_path / "eval" / "confusion.csv")
    assert list(confusion["origin"]) == ["synthetic" if i % 2 else "real"
                                         for i in index.index[index["split"] == "test"]]
    for origin in ("synthetic", "real"):
        rows = confusion[confusion["origin"] == origin]
        assert metrics[f"{origin}_test_n"] == len(rows) > 0
        assert metrics[f"{origin}_test_top1"] == pytest.approx((rows["actual"] == rows["predicted"]).mean())
        assert 0.0 <= metrics[f"{origin}_test_macro_f1"] <= 1.0 and f"{origin}_val_top1" in metrics
    per_class = json.loads((tmp_path / "eval" / "per_class.json").read_text())
    forest = confusion[(confusion["origin"] == "real") & (confusion["actual"] == CLASSES[0])]
    assert per_class[CLASSES[0]]["real_recall"] == pytest.approx((forest["predicted"] == CLASSES[0]).mean())
    logged = mlflow.MlflowClient(params.mlflow.resolved_tracking_uri()).get_run(run_id).data.metrics
    assert logged["real_test_top1"] == pytest.approx(metrics["real_test_top1"])


def test_data_prepared_without_sources_gets_no_origin_metrics(tmp_path):
    params, _ = _tiny_model_and_run(tmp_path)
    metrics = evaluate(params)
    assert not [k for k in metrics if k.startswith(("real_", "synthetic_"))]
    assert list(pd.read_csv(tmp_path / "eval" / "confusion.csv").columns) == ["actual", "predicted"]
