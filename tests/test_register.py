"""Registration and the champion gate, against a real MLflow server."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from geoclip.bands import ALL_BAND_NAMES, EUROSAT_CLASSES
from geoclip.config import params_from_dict
from geoclip.errors import GeoclipError
from geoclip.register import register
from geoclip.storage import data_version
from geoclip.tracking import configure, write_run_info
from factories import make_model_dir, synthetic_tiles


def write_test_pack(prepared: Path, n: int = 3) -> None:
    """A minimal prepared folder: the test split pack, stats.json and index.csv."""
    prepared.mkdir(parents=True, exist_ok=True)
    np.save(prepared / "test_images.npy", synthetic_tiles(n))
    np.save(prepared / "test_labels.npy", np.arange(n, dtype=np.int64))
    (prepared / "stats.json").write_text(json.dumps({"band_names": list(ALL_BAND_NAMES),
                                                     "class_names": list(EUROSAT_CLASSES),
                                                     "mean": [1500.0] * 13, "std": [800.0] * 13}))
    (prepared / "index.csv").write_text("id,path,class,split\n" + "".join(
        f"t{i},tiles/x_{i}.tif,Forest,test\n" for i in range(n)))


@pytest.fixture
def params(tmp_path, mlflow_server, monkeypatch):
    """Params pointing at tmp folders, the real server and a fresh registered-model name; a model is saved."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = params_from_dict({
        "paths": {k: str(tmp_path / k) for k in ("raw", "prepared", "reports", "model", "eval", "scores")},
        "mlflow": {"tracking_uri": mlflow_server, "experiment": "test-register"},
        "register": {"model_name": f"geoclip-{uuid.uuid4().hex[:8]}"},
    })
    write_test_pack(Path(p.paths.prepared))
    make_model_dir(Path(p.paths.model))
    return p


def trained(params, val_top1: float) -> str:
    """Pretend a training run and an evaluation happened: run.json and metrics.json; return the run id."""
    experiment_id = configure(params)
    with mlflow.start_run() as run:
        pass
    write_run_info(params, run.info.run_id, experiment_id)
    metrics = Path(params.paths.eval) / "metrics.json"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text(json.dumps({"val_top1": val_top1, "test_top1": 0.1}))
    return run.info.run_id


def test_champion_moves_only_on_a_strictly_better_metric(params):
    name = params.register.model_name
    client = MlflowClient(params.mlflow.tracking_uri)

    run1 = trained(params, 0.6)
    first = register(params)
    assert (first["version"], first["alias"], first["champion_version"]) == ("1", "champion", "1")
    assert json.loads((Path(params.paths.model) / "registered.json").read_text()) == first
    tags = client.get_model_version(name, "1").tags
    assert float(tags["val_top1"]) == 0.6 and tags["run_id"] == run1
    assert tags["git_revision"] and tags["data_version"] == data_version(params.paths.prepared)
    assert client.get_model_version(name, "1").run_id == run1

    trained(params, 0.6)  # equal is not better
    second = register(params)
    assert (second["alias"], second["champion_version"]) == ("challenger", "1")
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert client.get_model_version_by_alias(name, "challenger").version == "2"

    trained(params, 0.75)
    third = register(params)
    assert (third["version"], third["alias"], third["champion_version"]) == ("3", "champion", "3")
    assert client.get_model_version_by_alias(name, "champion").version == "3"
    assert third["previous_champion_value"] == 0.6
    # The champion loads as a pyfunc and takes a batch larger than the input example.
    champion = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert champion.predict(synthetic_tiles(5))["probabilities"].shape == (5, 10)


def test_missing_metrics_file_is_refused_before_logging(params):
    trained(params, 0.5)
    (Path(params.paths.eval) / "metrics.json").unlink()
    with pytest.raises(GeoclipError, match="metrics.json: not found"):
        register(params)
    assert not (Path(params.paths.model) / "registered.json").exists()
    assert MlflowClient(params.mlflow.tracking_uri).search_model_versions(f"name='{params.register.model_name}'") == []


def test_unknown_metric_names_the_metric_and_the_keys(params):
    trained(params, 0.5)
    p = params_from_dict({**_as_dict(params), "register": {"model_name": params.register.model_name,
                                                           "metric": "val_f1"}})
    with pytest.raises(GeoclipError, match=r"'val_f1'.*test_top1"):
        register(p)


def test_missing_run_info_is_refused(params):
    Path(params.paths.eval).mkdir(parents=True, exist_ok=True)
    (Path(params.paths.eval) / "metrics.json").write_text('{"val_top1": 0.5}')
    with pytest.raises(GeoclipError, match="run.json: not found"):
        register(params)


def _as_dict(params) -> dict:
    """Params back to a plain mapping (for building a variant)."""
    from dataclasses import asdict

    return asdict(params)
