"""Prefect flows on a temporary Prefect server: scoring with a registered champion, training end to end."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import rasterio
import yaml
from mlflow import MlflowClient

from geoclip.errors import GeoclipError
from factories import register_champion, write_scene

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server for the whole session (120 s start timeout: slow on 2 busy cores)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_params(path: Path, data: dict) -> str:
    """Write a params file; return its path as a string (what flows take)."""
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_prefect_yaml_declares_the_deployments():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    raw = yaml.safe_load((REPO / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(raw)  # the loader `prefect deploy` uses
    deployments = {d.name: d for d in model.deployments}
    assert set(deployments) == {"scheduled-scoring", "training"}
    scoring, training = deployments["scheduled-scoring"], deployments["training"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert [s.cron for s in scoring.schedules] == [params["score"]["cron"]]
    assert not training.schedules
    assert scoring.work_pool.name == training.work_pool.name == "local"
    for d in (scoring, training):
        flow = load_flow_from_entrypoint(str(REPO / d.entrypoint))
        assert set(d.parameters) <= set(flow.parameters.properties)


def test_scoring_flow_scores_every_scene_with_the_champion(tmp_path, mlflow_server, prefect_harness, monkeypatch):
    from flows.scoring import scoring_flow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = f"geoclip-{uuid.uuid4().hex[:8]}"
    version = register_champion(tmp_path, mlflow_server, name)
    for k in (1, 2):
        write_scene(tmp_path / "raw" / "scenes" / f"scene_{k}.tif", h=128, w=160)
    params_path = write_params(tmp_path / "params.yaml", {
        "paths": {"scores": str(tmp_path / "scores")},
        "score": {"model_uri": f"models:/{name}@champion", "scenes": str(tmp_path / "raw" / "scenes")},
        "mlflow": {"tracking_uri": mlflow_server, "experiment": "test-flows"},
    })

    result = scoring_flow(params_path=params_path)

    assert result["model_uri"] == f"models:/{name}/{version}"
    assert [Path(r["scene"]).name for r in result["scenes"]] == ["scene_1.tif", "scene_2.tif"]
    summary = json.loads(Path(result["summary"]).read_text())
    assert summary["n_scenes"] == 2 and summary["model_uri"] == result["model_uri"]
    for k in (1, 2):
        with rasterio.open(tmp_path / "scores" / f"scene_{k}_classmap.tif") as cm:
            assert (cm.width, cm.height, cm.tags(ns="IMAGE_STRUCTURE")["LAYOUT"]) == (160, 128, "COG")


def test_scoring_flow_fails_on_a_missing_scene_folder(tmp_path, mlflow_server, prefect_harness, monkeypatch):
    from flows.scoring import scoring_flow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params_path = write_params(tmp_path / "params.yaml", {
        "score": {"model_uri": str(tmp_path / "unused"), "scenes": str(tmp_path / "nowhere")},
        "mlflow": {"tracking_uri": mlflow_server, "experiment": "test-flows"}})
    with pytest.raises(GeoclipError, match="nowhere: no such folder"):
        scoring_flow(params_path=params_path)


@pytest.mark.slow
def test_training_flow_runs_the_pipeline_and_registers(tmp_path, mlflow_server, prefect_harness, monkeypatch):
    from flows.training import training_flow
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = f"geoclip-{uuid.uuid4().hex[:8]}"
    params_path = write_params(tmp_path / "params.yaml", {
        "paths": {k: str(tmp_path / k) for k in ("raw", "prepared", "reports", "model", "eval", "scores")},
        "synth": {"tiles_per_class": 8, "scene_size": 128},
        "prepare": {"val_fraction": 0.25, "test_fraction": 0.25},
        "train": {"image_encoder": "test_resnet", "embed_dim": 16, "epochs": 1, "batch_size": 16, "num_threads": 2},
        "register": {"model_name": name},
        "mlflow": {"tracking_uri": mlflow_server, "experiment": "test-flows"},
    })
    registered = training_flow(params_path=params_path)  # ingest.source: synthetic

    assert json.loads((tmp_path / "raw" / "bands.json").read_text())["band_names"][0] == "B01"

    assert (registered["name"], registered["version"], registered["alias"]) == (name, "1", "champion")
    assert json.loads((tmp_path / "model" / "registered.json").read_text()) == registered
    assert "val_top1" in json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert MlflowClient(mlflow_server).get_model_version_by_alias(name, "champion").version == "1"
