"""Tests for geoclip.registry.tracking: MLflow configuration does not leak between param sets."""

import mlflow

from geoclip.config import params_from_dict
from geoclip.registry.tracking import configure, flat_params


def test_configure_follows_each_params_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = params_from_dict({"mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/a.db",
                                         "artifact_location": str(tmp_path / "a")}})
    second = params_from_dict({"mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/b.db",
                                          "artifact_location": str(tmp_path / "b")}})
    configure(first)
    assert mlflow.get_tracking_uri().endswith("a.db")
    configure(second)
    assert mlflow.get_tracking_uri().endswith("b.db")
    experiment = mlflow.get_experiment_by_name("geoclip")
    assert experiment.artifact_location == (tmp_path / "b").resolve().as_uri()


def test_environment_uri_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    configure(params_from_dict({"mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/params.db"}}))
    assert mlflow.get_tracking_uri().endswith("env.db")


def test_flat_params_are_dotted_strings():
    flat = flat_params(params_from_dict({"train": {"epochs": 3}}))
    assert flat["train.epochs"] == "3" and flat["classes.names"].startswith("['AnnualCrop'")
