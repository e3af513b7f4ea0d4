"""`geoclip services`: moto S3, MLflow (SQLite + S3 artifacts) and Prefect on 127.0.0.1, stopped by Ctrl-C."""

from __future__ import annotations

import queue
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
from mlflow import MlflowClient

from geoclip.devtools.services import MLFLOW_BUCKET, free_port

READY = "Ctrl-C stops them all."


def launch(state: Path, ports: dict[str, int]) -> tuple[subprocess.Popen, dict[str, str]]:
    """Run ``geoclip services`` until it says the services are ready; return it and the exports it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from geoclip.cli import main; sys.exit(main())", "services", "--dir",
         str(state), "--s3-port", str(ports["s3"]), "--mlflow-port", str(ports["mlflow"]), "--prefect-port",
         str(ports["prefect"])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)], daemon=True).start()
    env, seen = {}, []
    while True:
        line = lines.get(timeout=400)
        assert line is not None, "geoclip services ended before it was ready:\n" + "".join(seen)
        seen.append(line)
        if line.startswith("export "):
            key, _, value = line[len("export "):].strip().partition("=")
            env[key] = value
        if line.strip() == READY:
            return proc, env


def stop(proc: subprocess.Popen) -> int:
    """Ctrl-C, as from a terminal; return the exit code."""
    proc.send_signal(signal.SIGINT)
    return proc.wait(timeout=120)


def closed(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:port."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def s3_client(env: dict[str, str]):
    """A boto3 S3 client for the services' endpoint."""
    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])


@pytest.mark.slow
def test_services_start_answer_stop_and_keep_their_state(tmp_path):
    state = tmp_path / "services"
    ports = {k: free_port() for k in ("s3", "mlflow", "prefect")}
    proc, env = launch(state, ports)
    try:
        assert env["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{ports['s3']}"
        assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['mlflow']}"
        assert env["PREFECT_API_URL"] == f"http://127.0.0.1:{ports['prefect']}/api"
        s3 = s3_client(env)
        s3.create_bucket(Bucket="svc-data")
        s3.put_object(Bucket="svc-data", Key="scenes/a.txt", Body=b"kept")
        mlflow = MlflowClient(env["MLFLOW_TRACKING_URI"])
        experiment = mlflow.create_experiment(f"svc-{uuid.uuid4().hex[:6]}")
        run = mlflow.create_run(experiment)
        (tmp_path / "note.txt").write_text("artifact")
        mlflow.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=MLFLOW_BUCKET).get("Contents", [])]
        assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys  # landed in moto
        with urllib.request.urlopen(env["PREFECT_API_URL"] + "/health", timeout=10) as r:
            assert r.status == 200
    finally:
        code = stop(proc)
    assert code == 0
    assert all(closed(p) for p in ports.values())  # every server and its workers stopped

    proc, env = launch(state, ports)  # again, from the same state folder
    try:
        s3 = s3_client(env)
        assert s3.get_object(Bucket="svc-data", Key="scenes/a.txt")["Body"].read() == b"kept"
        mlflow = MlflowClient(env["MLFLOW_TRACKING_URI"])
        path = mlflow.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "back"))
        assert Path(path).read_text() == "artifact"
    finally:
        assert stop(proc) == 0
    assert all(closed(p) for p in ports.values())
