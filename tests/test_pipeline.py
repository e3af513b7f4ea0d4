"""End to end: `dvc repro` of the real dvc.yaml in a temporary copy, tiny params, real MLflow server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COPY = ["geoclip", "flows", "expectations", "dvc.yaml", "params.yaml", ".dvcignore", ".dvc/config", ".gitignore"]

pytestmark = pytest.mark.slow


def tiny_params(path: Path) -> None:
    """Shrink the repo's params.yaml so the whole pipeline runs in a minute or two on 2 cores."""
    params = yaml.safe_load(path.read_text())
    params["synth"].update(tiles_per_class=12, tiles_per_concept=2, scene_size=256)
    params["train"].update(image_encoder="resnet10t", epochs=2, batch_size=32, embed_dim=32)
    params["prepare"].update(val_fraction=0.25, test_fraction=0.25)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """Run a command, failing the test with its output when it fails."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, mlflow_server):
    """Run `dvc repro` once in a fresh copy of the project; yield (copy dir, env)."""
    work = tmp_path_factory.mktemp("project")
    for item in COPY:
        src, dst = REPO / item, work / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    tiny_params(work / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": mlflow_server, "DVC_NO_ANALYTICS": "1"}
    run(["git", "init", "-q"], work, env)
    repro = run(["dvc", "repro"], work, env)
    return work, env, repro


def test_every_stage_ran_and_metrics_exist(pipeline):
    work, _, repro = pipeline
    for stage in ["ingest", "validate", "prepare", "train", "evaluate", "register", "score"]:
        assert f"Running stage '{stage}'" in repro.stdout
    metrics = json.loads((work / "eval/metrics.json").read_text())
    for key in ["test_top1", "val_top1", "nearest_centroid_top1"]:
        assert 0.0 <= metrics[key] <= 1.0
    assert (work / "eval/confusion.csv").read_text().startswith("actual,predicted")
    assert (work / "reports/validation.html").exists()
    assert (work / "reports/data_docs/index.html").exists()
    assert json.loads((work / "data/raw/bands.json").read_text())["band_names"][0] == "B01"


def test_run_leads_back_to_the_exact_data_and_its_validation(pipeline, mlflow_server):
    from mlflow import MlflowClient

    work, _, _ = pipeline
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    packed = next(o for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/prepared")
    run_id = json.loads((work / "models/run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(run_id)
    assert run.data.tags["data_version"] == packed["md5"]  # DVC's own hash of the packs
    assert run.data.tags["git_revision"]
    assert run.data.tags["validation_success"] == "true"
    logged = {a.path for a in client.list_artifacts(run_id, "validation")}
    assert {"validation/validation.json", "validation/data_docs", "validation/splits"} <= logged
    registered = json.loads((work / "models/registered.json").read_text())
    version = client.get_model_version(registered["name"], registered["version"])
    assert version.tags["data_version"] == packed["md5"]


def test_model_is_registered_with_an_alias(pipeline, mlflow_server):
    from mlflow import MlflowClient

    work, _, _ = pipeline
    registered = json.loads((work / "models/registered.json").read_text())
    client = MlflowClient(tracking_uri=mlflow_server)
    version = client.get_model_version(registered["name"], registered["version"])
    assert registered["alias"] in version.aliases
    champion = client.get_model_version_by_alias(registered["name"], "champion")
    assert champion.version is not None


def test_class_map_keeps_scene_georeferencing(pipeline):
    import rasterio

    work, _, _ = pipeline
    scene = work / "data/synthetic/scenes/scene_1.tif"  # outside data/raw, which ingest replaces
    classmap = work / "outputs/scores/scene_1_classmap.tif"
    with rasterio.open(scene) as src, rasterio.open(classmap) as out:
        assert out.crs == src.crs and out.transform == src.transform
        assert (out.width, out.height) == (src.width, src.height)
    summary = json.loads((work / "outputs/scores/scene_1_summary.json").read_text())
    assert summary["area_km2"]


def test_second_repro_has_nothing_to_do(pipeline):
    work, env, _ = pipeline
    status = run(["dvc", "status"], work, env)
    assert "changed" not in status.stdout, status.stdout
    again = run(["dvc", "repro"], work, env)
    assert "Running stage" not in again.stdout


def test_how_training_runs_is_not_what_it_trains(pipeline):
    work, env, _ = pipeline
    path = work / "params.yaml"
    before = path.read_text()
    params = yaml.safe_load(before)
    try:
        params["train"].update(num_threads=1, compile="default", checkpoint_every=3, max_restarts=1)
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        assert "changed" not in run(["dvc", "status", "train"], work, env).stdout  # nothing to retrain
        params["train"]["gain_noise"] = 0.1  # the recipe
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        status = run(["dvc", "status", "train"], work, env).stdout
        assert "modified:" in status and "train.gain_noise" in status, status
    finally:
        path.write_text(before)


def repro_with(pipeline, section: str, key: str, value) -> str:
    """Change one param in the copy's params.yaml, run `dvc repro`, return its output."""
    work, env, _ = pipeline
    params = yaml.safe_load((work / "params.yaml").read_text())
    params[section][key] = value
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return run(["dvc", "repro"], work, env).stdout


def test_repro_keeps_the_scoring_ledger_and_scheduled_runs_outputs(pipeline):
    work, _, _ = pipeline
    scores = work / "outputs/scores"
    ledger = sorted(p.relative_to(scores) for p in (scores / "_manifest").rglob("done-*.json"))
    assert ledger  # the score stage recorded its scene as done
    scheduled = scores / "scheduled_scene_classmap.tif"  # what a Prefect run scoring another scene put here
    shutil.copy(scores / "scene_1_classmap.tif", scheduled)
    out = repro_with(pipeline, "score", "batch_size", 128)
    assert "Running stage 'score'" in out
    assert scheduled.is_file()
    assert sorted(p.relative_to(scores) for p in (scores / "_manifest").rglob("done-*.json")) == ledger


def test_changing_score_params_reruns_only_score(pipeline):
    out = repro_with(pipeline, "score", "stride", 64)
    assert "Running stage 'score'" in out
    assert "Running stage 'train'" not in out and "Running stage 'ingest'" not in out


def test_changing_a_validation_threshold_does_not_retrain(pipeline):
    out = repro_with(pipeline, "validate", "max_nodata_fraction", 0.06)
    assert "Running stage 'validate'" in out
    # prepare re-checks the data, but the packs come out identical (same DVC hash), so nothing downstream reruns
    assert "Running stage 'train'" not in out and "Running stage 'ingest'" not in out


def test_repro_refuses_rather_than_deletes_a_users_file_in_raw(pipeline):
    work, env, _ = pipeline
    mine = work / "data/raw/notes.txt"  # e.g. scenes put where the old default score.scenes pointed
    mine.write_text("mine")
    proc = subprocess.run(["dvc", "repro"], cwd=work, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "holds 1 file(s) ingest did not write (notes.txt)" in proc.stdout + proc.stderr
    assert mine.read_text() == "mine"
