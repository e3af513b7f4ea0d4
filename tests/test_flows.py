"""Prefect flows on a temporary Prefect server: scoring with a registered champion, training end to end."""

from __future__ import annotations

import contextvars
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import pytest
import rasterio
import yaml
from factories import register_champion, write_scene
from mlflow import MlflowClient

from geoclip.devtools.services import HOST, QUIET, Server, free_port, running, wait_ready
from geoclip.devtools.services import TCP_PROXY as PROXY
from geoclip.errors import GeoclipError

REPO = Path(__file__).resolve().parents[1]


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
    assert [r["status"] for r in result["scenes"]] == ["scored", "scored"]
    summary = json.loads(Path(result["summary"]).read_text())
    assert summary["n_scenes"] == 2 and summary["model_uri"] == result["model_uri"]
    for k in (1, 2):
        with rasterio.open(tmp_path / "scores" / f"scene_{k}_classmap.tif") as cm:
            assert (cm.width, cm.height, cm.tags(ns="IMAGE_STRUCTURE")["LAYOUT"]) == (160, 128, "COG")

    write_scene(tmp_path / "raw" / "scenes" / "scene_3.tif", h=128, w=128)  # a new scene arrives
    again = scoring_flow(params_path=params_path)

    assert [r["status"] for r in again["scenes"]] == ["skipped", "skipped", "scored"]
    summary = json.loads(Path(again["summary"]).read_text())
    assert (summary["n_scenes"], summary["n_scored"], summary["n_skipped"]) == (3, 1, 2)
    assert summary["per_scene"][0]["classes"] == result["scenes"][0]["classes"]  # the recorded summary counts


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


# ---- retries: which failures are worth another try ----

def test_network_and_s3_service_failures_are_transient_input_errors_are_not():
    from botocore.exceptions import ClientError, EndpointConnectionError
    from rasterio.errors import RasterioIOError

    from geoclip.retries import is_transient

    def wrapped(cause: Exception) -> GeoclipError:
        try:
            raise GeoclipError("s3://b/k: cannot download") from cause
        except GeoclipError as exc:
            return exc

    down = EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
    assert is_transient(down) and is_transient(wrapped(down))
    assert is_transient(wrapped(ClientError({"Error": {"Code": "SlowDown"}}, "PutObject")))
    assert is_transient(ClientError({"Error": {"Code": "X"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "Get"))
    assert is_transient(RasterioIOError("/vsis3/b/k.tif: HTTP response code: 503"))
    assert not is_transient(GeoclipError("scene.tif: has 4 band(s), the model expects 13"))
    assert not is_transient(wrapped(ClientError({"Error": {"Code": "NoSuchKey"}}, "GetObject")))
    assert not is_transient(wrapped(RasterioIOError("k.tif: not recognized as a supported file format")))
    assert not is_transient(KeyError("class_names"))


# ---- Dask ----

def _flow_params(tmp_path: Path, tracking_uri: str, name: str, **score) -> str:
    """Params for scoring the scenes under tmp_path/raw/scenes with the champion ``name``."""
    return write_params(tmp_path / "params.yaml", {
        "paths": {"scores": str(tmp_path / "scores"), "reports": str(tmp_path / "reports")},
        "score": {"model_uri": f"models:/{name}@champion", "scenes": str(tmp_path / "raw" / "scenes"),
                  "batch_size": 64, **score},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "test-flows"},
    })


def test_task_runner_follows_params():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.scoring import make_task_runner
    from geoclip.config import params_from_dict

    assert isinstance(make_task_runner(params_from_dict({}).score), ThreadPoolTaskRunner)
    remote = make_task_runner(params_from_dict({"score": {"task_runner": "dask",
                                                          "dask_address": "tcp://10.0.0.5:8786"}}).score)
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://10.0.0.5:8786"
    local = make_task_runner(params_from_dict({"score": {"task_runner": "dask", "dask_workers": 3}}).score)
    assert local.address is None and local.cluster_kwargs["n_workers"] == 3
    with pytest.raises(GeoclipError, match="score.task_runner: 'ray'"):
        params_from_dict({"score": {"task_runner": "ray"}})


def test_scoring_fans_out_over_a_dask_cluster(tmp_path, mlflow_server, prefect_harness, monkeypatch):
    from distributed import Client, LocalCluster, get_task_stream

    from flows.scoring import scoring_flow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = f"geoclip-{uuid.uuid4().hex[:8]}"
    register_champion(tmp_path, mlflow_server, name)
    for k in range(3):
        write_scene(tmp_path / "raw" / "scenes" / f"scene_{k}.tif", h=128, w=128)
    # In-process workers (threads): worker processes would each import torch, MLflow and Prefect and load the
    # model (tens of seconds on 2 cores); the scheduler, workers and task protocol are Dask's all the same.
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        params_path = _flow_params(tmp_path, mlflow_server, name, task_runner="dask",
                                   dask_address=cluster.scheduler_address)
        with get_task_stream(client) as stream:
            result = scoring_flow(params_path=params_path)
        workers = set(client.scheduler_info()["workers"])

    assert [r["status"] for r in result["scenes"]] == ["scored"] * 3
    ran = [t for t in stream.data if str(t["key"]).startswith("score_scene_task")]
    assert len(ran) == 3  # each scene's task ran on a Dask worker
    assert {t["worker"] for t in ran} <= workers and len(workers) == 2
    assert json.loads((tmp_path / "scores" / "summary.json").read_text())["n_scenes"] == 3


# ---- S3 outage mid-run: retried, nothing lost or duplicated ----

# A TCP forwarder in its own process: killing it is an S3 outage (connection refused), starting it again ends it.



class RestartableS3:
    """moto's S3 server in its own process behind a proxy process that a test stops and starts (state is kept).

    Both run outside the test process: an S3 server thread inside it would need the GIL, which GDAL can hold
    while it waits for the server's answer (a deadlock no real deployment has).
    """

    def __init__(self, port: int, logs: Path):
        backend = free_port()
        self.port = port
        self.moto = Server("moto", [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(backend)],
                           f"http://{HOST}:{backend}/moto-api/data.json", log=logs / "moto.log")
        # Ready when moto answers through it.
        self.proxy = Server("s3-proxy", [sys.executable, "-c", PROXY, str(port), str(backend)],
                            f"http://{HOST}:{port}/moto-api/data.json", log=logs / "s3-proxy.log")

    def start(self) -> None:
        """Open the port again (the proxy): requests reach the same S3 state."""
        self.proxy.start()
        wait_ready([self.proxy], timeout=60)

    def stop(self) -> None:
        """Close the port: clients get connection refused."""
        self.proxy.stop()


@pytest.fixture
def restartable_s3(tmp_path, monkeypatch):
    """A RestartableS3 with the AWS settings pointing at it; botocore retries once only, so Prefect's retries act."""
    s3 = RestartableS3(free_port(), tmp_path)
    with running(s3.moto, timeout=120):
        try:
            s3.start()
            endpoint = f"http://{HOST}:{s3.port}"
            for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                               "AWS_ENDPOINT_URL_S3": endpoint, "AWS_RETRY_MODE": "standard",
                               "AWS_MAX_ATTEMPTS": "2"}.items():
                monkeypatch.setenv(key, value)
            yield s3
        finally:
            s3.stop()


def _outage(s3: RestartableS3, bucket: str, seen: dict, done: threading.Event) -> None:
    """Stop S3 when the first scene is claimed; start it again once Prefect shows a task run awaiting a retry."""
    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterState, TaskRunFilterStateName

    client = boto3.client("s3")
    deadline = time.monotonic() + 300
    try:
        while not done.is_set() and time.monotonic() < deadline:
            keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="scores/_manifest/")
                    .get("Contents", [])]
            if any("/claim-" in k for k in keys):
                break
            time.sleep(0.05)
        s3.stop()
        seen["stopped"] = True
        waiting = TaskRunFilter(state=TaskRunFilterState(name=TaskRunFilterStateName(any_=["AwaitingRetry"])))
        with get_client(sync_client=True) as prefect:
            while not done.is_set() and time.monotonic() < deadline:
                runs = [r for r in prefect.read_task_runs(task_run_filter=waiting) if "score_scene" in r.name]
                if runs:
                    seen["retried"] = runs[0].id
                    break
                time.sleep(0.1)
    finally:
        s3.start()


def test_a_vsis3_read_failing_in_an_outage_is_transient_a_bad_scene_is_not(tmp_path, restartable_s3):
    from scoring_fakes import counting_loader

    from geoclip.config import params_from_dict
    from geoclip.retries import is_transient
    from geoclip.scoring.exactly_once import score_scene_once
    from geoclip.scoring.ledger import Ledger

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="vsis3-outage")
    write_scene(tmp_path / "scene_0.tif", h=128, w=128)
    s3.upload_file(str(tmp_path / "scene_0.tif"), "vsis3-outage", "scenes/scene_0.tif")
    s3.put_object(Bucket="vsis3-outage", Key="scenes/broken.tif", Body=b"not a tiff")
    params = params_from_dict({"score": {"batch_size": 64}})
    out = "s3://vsis3-outage/scores"

    with pytest.raises(GeoclipError) as bad:  # S3 is up: the scene itself is wrong, no retry
        score_scene_once(params, counting_loader(tmp_path / "n", "broken"), "s3://vsis3-outage/scenes/broken.tif",
                         out, "models:/fake/1")
    assert not is_transient(bad.value)

    load = counting_loader(tmp_path / "n", "scene_0")

    def load_then_lose_s3():  # S3 goes away after the scene was hashed and claimed, before GDAL reads it
        restartable_s3.stop()
        return load()

    with pytest.raises(GeoclipError, match="S3 cannot be reached") as down:
        score_scene_once(params, load_then_lose_s3, "s3://vsis3-outage/scenes/scene_0.tif", out, "models:/fake/1")
    assert is_transient(down.value)
    restartable_s3.start()
    retried = score_scene_once(params, load, "s3://vsis3-outage/scenes/scene_0.tif", out, "models:/fake/1")
    assert retried["status"] == "scored" and [r["name"] for r in Ledger(out).records()] == ["scene_0"]


def test_a_wordless_read_failure_is_judged_by_asking_s3(restartable_s3):
    from rasterio.errors import RasterioIOError

    from geoclip.retries import is_transient
    from geoclip.scoring.exactly_once import _raise_if_s3_down

    boto3.client("s3").create_bucket(Bucket="probe-bucket")
    failure = RasterioIOError("Read failed. See previous exception for details.")
    assert _raise_if_s3_down(failure, "s3://probe-bucket/scenes/a.tif", "/tmp/out") is None  # S3 answers
    restartable_s3.stop()
    try:
        with pytest.raises(GeoclipError, match="S3 cannot be reached") as down:
            _raise_if_s3_down(failure, "s3://probe-bucket/scenes/a.tif", "/tmp/out")
        assert is_transient(down.value)
    finally:
        restartable_s3.start()


def test_s3_outage_mid_run_is_retried_and_nothing_is_lost_or_duplicated(tmp_path, mlflow_server, prefect_harness,
                                                                       restartable_s3, monkeypatch):
    from prefect import get_client

    import flows.scoring
    from geoclip.scoring.ledger import Ledger

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = f"geoclip-{uuid.uuid4().hex[:8]}"
    register_champion(tmp_path, mlflow_server, name)
    bucket = f"outage-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    for k in range(3):
        write_scene(tmp_path / f"scene_{k}.tif", h=128, w=128)
        s3.upload_file(str(tmp_path / f"scene_{k}.tif"), bucket, f"scenes/scene_{k}.tif")
    params_path = _flow_params(tmp_path, mlflow_server, name, scenes=f"s3://{bucket}/scenes")
    # Short backoff for the test (production: 5, 30, 120 s); the retry condition is the real one.
    monkeypatch.setattr(flows.scoring, "score_scene_task",
                        flows.scoring.score_scene_task.with_options(retry_delay_seconds=[2, 4, 8]))
    seen: dict = {}
    done = threading.Event()
    watcher = threading.Thread(target=contextvars.copy_context().run,  # the thread needs the harness's API settings
                               args=(_outage, restartable_s3, bucket, seen, done))
    watcher.start()
    try:
        result = flows.scoring.scoring_flow(params_path=params_path, out_dir=f"s3://{bucket}/scores")
    finally:
        done.set()
        watcher.join()

    assert seen.get("stopped") and seen.get("retried"), seen  # the outage hit a scene task and it was retried
    with get_client(sync_client=True) as prefect:
        retried = prefect.read_task_run(seen["retried"])
    assert retried.state.is_completed() and retried.run_count >= 2
    assert [r["status"] for r in result["scenes"]] == ["scored"] * 3
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="scores/")["Contents"]}
    outputs = {k for k in keys if "/_manifest/" not in k}
    assert outputs == {"scores/summary.json"} | {f"scores/scene_{k}_{kind}" for k in range(3)
                                                   for kind in ("classmap.tif", "quicklook.png", "summary.json")}
    assert not [k for k in keys if "/claim-" in k]  # every claim released, the failed attempts' ones included
    records = Ledger(f"s3://{bucket}/scores").records()
    assert sorted(r["name"] for r in records) == ["scene_0", "scene_1", "scene_2"]  # one done record per scene
    summary = json.loads(s3.get_object(Bucket=bucket, Key="scores/summary.json")["Body"].read())
    assert sorted(summary["scenes"]) == [f"s3://{bucket}/scenes/scene_{k}.tif" for k in range(3)]


# ---- a real Prefect server, a process work pool, the deployment on its cron schedule ----

@pytest.fixture
def prefect_server(tmp_path):
    """``prefect server start`` on 127.0.0.1 (SQLite under a temp PREFECT_HOME); yields the env for its clients."""
    port = free_port()
    home = tmp_path / "prefect-home"
    env = {"PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://{HOST}:{port}/api", **QUIET,
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db"}
    server = Server("prefect", [sys.executable, "-m", "prefect", "server", "start", "--host", HOST,
                                "--port", str(port)], f"http://{HOST}:{port}/api/health", env,
                    log=tmp_path / "prefect-server.log")
    with running(server, timeout=240):
        clients = os.environ | env
        clients.pop("MLFLOW_TRACKING_URI", None)  # the flows take the tracking URI from their params
        yield clients


@pytest.mark.slow
def test_deploy_registers_the_scheduled_deployment_on_a_real_server(tmp_path, prefect_server):
    """`python -m flows.scoring --deploy POOL`: the cron from params, the pool, the params file.

    Runs of a deployment on a process worker: tests/test_readme_doors.py (the README's block) and
    tests/devtools/test_schedule.py (`geoclip schedule`).
    """
    import subprocess
    import sys

    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = prefect_server
    params_path = _flow_params(tmp_path, "sqlite:///unused.db", "geoclip", cron="17 4 * * *")

    def prefect(*args: str, timeout: int = 300) -> str:
        done = subprocess.run([sys.executable, "-m", *args], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    prefect("prefect", "work-pool", "create", "geoclip-test", "--type", "process")
    prefect("flows.scoring", "--params", params_path, "--deploy", "geoclip-test")
    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}), \
            get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("geoclip-scoring/scheduled-scoring")
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules] == \
        [("17 4 * * *", "UTC", True)]
    assert deployment.work_pool_name == "geoclip-test" and deployment.parameters == {"params_path": params_path}
    assert deployment.entrypoint == "flows/scoring.py:scoring_flow"


@pytest.mark.slow
def test_scoring_on_a_local_dask_cluster_of_worker_processes(tmp_path, mlflow_server, prefect_harness, monkeypatch):
    from flows.scoring import scoring_flow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = f"geoclip-{uuid.uuid4().hex[:8]}"
    register_champion(tmp_path, mlflow_server, name)
    for k in range(2):
        write_scene(tmp_path / "raw" / "scenes" / f"scene_{k}.tif", h=128, w=128)
    params_path = _flow_params(tmp_path, mlflow_server, name, task_runner="dask", dask_workers=2)

    result = scoring_flow(params_path=params_path)  # the runner starts and stops its own LocalCluster

    assert [r["status"] for r in result["scenes"]] == ["scored", "scored"]
    summary = json.loads((tmp_path / "scores" / "summary.json").read_text())
    assert (summary["n_scenes"], summary["n_scored"]) == (2, 2)


def test_serving_refuses_the_ephemeral_server_and_keeps_its_own_deployment_name():
    from flows.scoring import SERVED_NAME, require_server

    with pytest.raises(SystemExit, match="PREFECT_API_URL is not set; a schedule needs a Prefect server"):
        require_server(None)
    require_server("http://127.0.0.1:4200/api")  # a real server: serving goes ahead
    deployments = yaml.safe_load((Path(__file__).resolve().parents[1] / "prefect.yaml").read_text())["deployments"]
    assert SERVED_NAME not in {d["name"] for d in deployments}  # never overwrites what `prefect deploy` made
