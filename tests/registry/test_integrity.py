"""A registered model whose files were changed in the artifact store after registration is never loaded."""

from __future__ import annotations

import uuid
from pathlib import Path

import mlflow
import pytest
from factories import make_model_dir, own_tracking_store, synthetic_tiles
from mlflow import MlflowClient

from geoclip.errors import GeoclipError
from geoclip.registry import models
from geoclip.registry.integrity import DIGEST_TAG, artifacts_digest, logged_model_digest
from geoclip.registry.models import load_served_model
from geoclip.registry.pyfunc import log_pyfunc


@pytest.fixture
def registered(tmp_path):
    """A pyfunc logged to a local SQLite store (artifacts under tmp_path) and registered with its digest tag."""
    with own_tracking_store():
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
        experiment = mlflow.create_experiment("integrity", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = log_pyfunc(make_model_dir(tmp_path / "model"), synthetic_tiles(2))
        name = f"geoclip-{uuid.uuid4().hex[:8]}"
        version = mlflow.register_model(info.model_uri, name,
                                        tags={DIGEST_TAG: logged_model_digest(info.model_uri)}).version
        yield f"models:/{name}/{version}", tmp_path / "artifacts"


def test_the_digest_covers_every_file_and_its_path(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"1")
    first = artifacts_digest(tmp_path)
    (tmp_path / "a" / "x.bin").write_bytes(b"2")
    assert artifacts_digest(tmp_path) != first
    (tmp_path / "a" / "x.bin").write_bytes(b"1")
    (tmp_path / "a" / "x.bin").rename(tmp_path / "a" / "y.bin")
    assert artifacts_digest(tmp_path) != first
    (tmp_path / "a" / "y.bin").rename(tmp_path / "a" / "x.bin")
    assert artifacts_digest(tmp_path) == first


def test_a_model_changed_after_registration_is_refused_before_unpickling(registered):
    uri, artifacts = registered
    with own_tracking_store():
        mlflow.set_tracking_uri(f"sqlite:///{artifacts.parent}/mlflow.db")
        assert load_served_model(uri).predict(synthetic_tiles(2))["probabilities"].shape == (2, 10)
        (pickled,) = artifacts.rglob("python_model.pkl")
        pickled.write_bytes(pickled.read_bytes() + b"\n")  # anyone with write access to the store could do this
        models._MODELS.clear()  # as a new scoring worker would start
        with pytest.raises(GeoclipError, match="artifacts changed after registration"):
            load_served_model(uri)


def test_a_model_registered_without_a_digest_still_loads_with_a_warning(tmp_path, capsys):
    with own_tracking_store():
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
        experiment = mlflow.create_experiment("plain", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = log_pyfunc(make_model_dir(tmp_path / "model"), synthetic_tiles(2))
        name = f"geoclip-{uuid.uuid4().hex[:8]}"
        version = mlflow.register_model(info.model_uri, name).version
        assert DIGEST_TAG not in (MlflowClient().get_model_version(name, version).tags or {})
        assert load_served_model(f"models:/{name}/{version}") is not None
    assert f"no {DIGEST_TAG} tag" in capsys.readouterr().err
    assert Path(tmp_path / "artifacts").is_dir()
