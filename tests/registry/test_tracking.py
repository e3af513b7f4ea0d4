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


def test_a_run_under_dvc_repro_traces_to_a_clean_commit_and_names_real_changes(tmp_path, monkeypatch):
    """dvc repro rewrites dvc.lock (and metrics) before training: that is not a change to the code or params."""
    import subprocess

    from geoclip.registry.tracking import git_changes, git_revision, git_tags

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (tmp_path / "dvc.yaml").write_text("stages:\n  evaluate:\n    cmd: x\n    metrics:\n      - eval/metrics.json:\n"
                                       "          cache: false\n    outs:\n      - models\n")
    (tmp_path / "eval").mkdir()
    for name in ("dvc.lock", "params.yaml", "eval/metrics.json"):
        (tmp_path / name).write_text("a\n")
    git("add", "-A")
    git("commit", "-qm", "one")
    commit = git("rev-parse", "HEAD")
    (tmp_path / "src").mkdir()
    monkeypatch.chdir(tmp_path / "src")  # any folder of the checkout
    for name in ("dvc.lock", "eval/metrics.json"):
        (tmp_path / name).write_text("rewritten by the pipeline\n")
    assert git_revision() == commit and git_changes() == [] and git_tags()["git_changes"] == "none"
    (tmp_path / "params.yaml").write_text("edited by hand\n")
    assert git_revision() == commit + "-dirty" and git_tags() == {"git_revision": commit + "-dirty",
                                                                 "git_changes": "params.yaml"}
