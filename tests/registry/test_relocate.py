"""A moved or copied project: its local MLflow store is refused until `geoclip relocate` points it at the new folder,
after which runs, artifacts and registered models resolve there, never in the original project."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from factories import own_tracking_store

from geoclip.config import params_from_dict
from geoclip.errors import GeoclipError
from geoclip.registry.relocate import relocate

PARAMS = {"mlflow": {"tracking_uri": "sqlite:///mlflow.db", "artifact_location": "mlartifacts",
                     "experiment": "geoclip-test"}}


@pytest.fixture(autouse=True)
def _own_tracking_store():
    with own_tracking_store():
        yield


# A project folder with a local store: one run with an artifact, registered as a model version. Made in a process of
# its own, as a user's `dvc repro` would: MLflow keeps one engine per URI in a process, and SQLite opens a relative
# sqlite:///mlflow.db against the folder current when a pooled connection is made, so in the test process the run
# could land in the store of an earlier test that used the same default URI.
MAKE = """
import mlflow
from geoclip.config import load_params
from geoclip.registry.tracking import configure
configure(load_params("params.yaml"))
with mlflow.start_run() as run:
    mlflow.log_text("from the original project", "notes/where.txt")
client = mlflow.MlflowClient()
client.create_registered_model("relocated")
version = client.create_model_version("relocated", f"{run.info.artifact_uri}/notes", run.info.run_id)
print(run.info.run_id, version.version)
"""


def _make_project(root: Path) -> tuple[str, str]:
    """The project folder ``root`` with its store (see MAKE); the run id and the model version."""
    root.mkdir()
    (root / "params.yaml").write_text("mlflow:\n  tracking_uri: sqlite:///mlflow.db\n  artifact_location: mlartifacts\n"
                                      "  experiment: geoclip-test\n")
    made = _in(root, "-c", MAKE)
    assert made.returncode == 0, made.stderr
    run_id, version = made.stdout.split()[-2:]
    return run_id, version


def _locations(db: Path) -> list[str]:
    with sqlite3.connect(db) as con:
        return [v for (v,) in con.execute("SELECT artifact_uri FROM runs UNION ALL SELECT artifact_location FROM "
                                          "experiments UNION ALL SELECT storage_location FROM model_versions") if v]


# What the copy runs, in a process of its own (as a user would: MLflow caches one store per URI in a process, and
# sqlite:///mlflow.db names another file once the project is elsewhere).
READ_BACK = """
import sys, mlflow
from geoclip.config import load_params
from geoclip.errors import GeoclipError
from geoclip.registry.tracking import configure
try:
    configure(load_params("params.yaml"))
except GeoclipError as exc:
    sys.exit(f"error: {exc}")
print(mlflow.artifacts.load_text(f"runs:/{sys.argv[1]}/notes/where.txt"))
print(open(mlflow.artifacts.download_artifacts(f"models:/relocated/{sys.argv[2]}", dst_path=sys.argv[3])
           + "/where.txt").read())
"""


def _in(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=folder, capture_output=True, text=True, timeout=300,
                          check=False)


def test_a_copied_project_is_refused_then_relocated_to_its_own_artifacts(tmp_path):
    original, copy = tmp_path / "original", tmp_path / "copy"
    run_id, version = _make_project(original)
    shutil.copytree(original, copy)
    (original / "mlartifacts").rename(original / "mlartifacts.gone")  # nothing may be read from the original now
    before = (original / "mlflow.db").read_bytes()

    refused = _in(copy, "-c", READ_BACK, run_id, str(version), str(tmp_path / "dl"))
    assert refused.returncode != 0
    assert (f"keeps its artifacts in {original.resolve()}/mlartifacts, not in this project ({copy.resolve()})"
            in refused.stderr) and "run `geoclip relocate`" in refused.stderr

    moved = _in(copy, "-m", "geoclip.cli", "relocate")
    assert moved.returncode == 0, moved.stderr
    assert f"moved from {original.resolve()} to {copy.resolve()}" in moved.stdout
    assert "runs.artifact_uri 1" in moved.stdout and "model_versions.storage_location 1" in moved.stdout
    assert all(str(original.resolve()) not in v for v in _locations(copy / "mlflow.db"))
    assert (original / "mlflow.db").read_bytes() == before  # the original project is untouched

    read = _in(copy, "-c", READ_BACK, run_id, str(version), str(tmp_path / "dl"))
    assert read.returncode == 0, read.stderr
    assert read.stdout.splitlines() == ["from the original project"] * 2
    again = _in(copy, "-m", "geoclip.cli", "relocate")
    assert again.returncode == 0 and "nothing to change" in again.stdout  # idempotent


def test_relocate_refuses_a_server_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = params_from_dict({"mlflow": {"tracking_uri": "http://127.0.0.1:5000"}})
    with pytest.raises(GeoclipError, match="relocate rewrites a local SQLite store"):
        relocate(params)


def test_relocate_names_a_file_that_is_not_a_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlflow.db").write_text("not a database")
    with pytest.raises(GeoclipError, match=r"mlflow.db: not an MLflow SQLite store \(file is not a database\)"):
        relocate(params_from_dict(PARAMS))
    assert (tmp_path / "mlflow.db").read_text() == "not a database"  # left as it was
