"""Tests for geoclip.registry.tracking: MLflow configuration does not leak between param sets."""

import socket

import mlflow
import pytest

from geoclip.config import params_from_dict
from geoclip.errors import GeoclipError
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


def test_an_unreachable_tracking_server_is_named_with_what_to_set(monkeypatch):
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once instead of after minutes of retries
    params = params_from_dict({"mlflow": {"tracking_uri": f"http://127.0.0.1:{port}"}})
    try:
        with pytest.raises(GeoclipError, match=rf"http://127.0.0.1:{port} \(mlflow.tracking_uri\) cannot be used"):
            configure(params)
    finally:
        mlflow.set_tracking_uri(None)
