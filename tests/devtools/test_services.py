"""`geoclip services`: moto S3, MLflow (SQLite + S3 artifacts) and Prefect on 127.0.0.1, stopped by Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
from factories import follow
from mlflow import MlflowClient

from geoclip.devtools.services import (
    MLFLOW_BUCKET,
    S3_LOG,
    export_lines,
    exports,
    free_port,
    scrub,
    service_specs,
)

READY = "Ctrl-C stops them all."


def launch(state: Path, ports: dict[str, int], env: dict[str, str] | None = None,
           seen: list[str] | None = None, sigint_ignored: bool = False) -> tuple[subprocess.Popen, dict[str, str]]:
    """Run ``geoclip services`` until it says the services are ready; return it and the exports it printed.

    ``env`` is added to the launcher's environment; ``seen`` collects every line it prints, now and later;
    ``sigint_ignored`` starts it as a script's ``cmd &`` would, with SIGINT inherited ignored.
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from geoclip.cli import main; sys.exit(main())", "services", "--dir",
         str(state), "--s3-port", str(ports["s3"]), "--mlflow-port", str(ports["mlflow"]), "--prefect-port",
         str(ports["prefect"])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=os.environ | (env or {}),
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None)
    lines, seen = follow(proc, seen)
    env = {}
    while True:
        line = lines.get(timeout=400)
        assert line is not None, "geoclip services ended before it was ready:\n" + "".join(seen)
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

    proc, env = launch(state, ports, sigint_ignored=True)  # again, from the same state folder, as `cmd &` starts it
    try:
        s3 = s3_client(env)
        assert s3.get_object(Bucket="svc-data", Key="scenes/a.txt")["Body"].read() == b"kept"
        mlflow = MlflowClient(env["MLFLOW_TRACKING_URI"])
        path = mlflow.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "back"))
        assert Path(path).read_text() == "artifact"
    finally:
        assert stop(proc) == 0
    assert all(closed(p) for p in ports.values())


# What a developer's shell may hold: real credentials, a session, passwords, a URI with a password in it.
USER_SECRETS = {"AWS_ACCESS_KEY_ID": "fake-user-access-key-id", "AWS_SECRET_ACCESS_KEY": "user-secret-key-3f9a0c",
                "AWS_SESSION_TOKEN": "user-session-token-77c1b2", "AWS_SECURITY_TOKEN": "user-security-token-1d2e",
                "GEOCLIP_TEST_DB_PASSWORD": "user-db-password-5e6f",
                "GEOCLIP_TEST_DB_URI": "postgresql://geo:user-uri-password-9b8c@db.example.org/geoclip"}
SECRET_VALUES = [v for k, v in USER_SECRETS.items() if k != "GEOCLIP_TEST_DB_URI"] + ["user-uri-password-9b8c"]


def test_the_users_secrets_reach_neither_the_exports_nor_the_servers(tmp_path, monkeypatch):
    for key, value in USER_SECRETS.items():
        monkeypatch.setenv(key, value)
    ports = {"s3": 1, "mlflow": 2, "prefect": 3}
    shown = exports(ports)
    assert not [s for s in SECRET_VALUES if any(s in v for v in shown.values())], shown
    assert shown["AWS_SECRET_ACCESS_KEY"] == "testing"  # moto accepts any: the services' own dummy credentials
    for srv in service_specs(tmp_path, ports):
        env = srv.environment()
        if srv.name in ("s3", "mlflow"):  # they sign S3 requests, which moto's request log keeps
            aws = [v for k, v in USER_SECRETS.items() if k.startswith("AWS_")]
            assert not [s for s in aws if s in env.values()], srv.name
    assert export_lines(ports)[-1] == "unset AWS_SESSION_TOKEN AWS_SECURITY_TOKEN"
    assert scrub(f"got {USER_SECRETS['GEOCLIP_TEST_DB_PASSWORD']} from {USER_SECRETS['GEOCLIP_TEST_DB_URI']}") == (
        "got **** from postgresql://geo:***@db.example.org/geoclip")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # a TOKEN in its name, but no secret
    assert scrub("export AWS_SECRET_ACCESS_KEY=testing false") == "export AWS_SECRET_ACCESS_KEY=testing false"


@pytest.mark.slow
def test_the_users_secrets_are_never_printed_or_logged(tmp_path):
    state = tmp_path / "services"
    ports = {k: free_port() for k in ("s3", "mlflow", "prefect")}
    printed: list[str] = []
    proc, env = launch(state, ports, env=USER_SECRETS, seen=printed)
    try:
        s3 = s3_client(env)  # a client configured from the printed exports alone
        s3.create_bucket(Bucket="svc-secrets")
        s3.put_object(Bucket="svc-secrets", Key="a.txt", Body=b"data")
        mlflow = MlflowClient(env["MLFLOW_TRACKING_URI"])  # the MLflow server writes the artifact to moto itself
        run = mlflow.create_run(mlflow.create_experiment(f"svc-{uuid.uuid4().hex[:6]}"))
        (tmp_path / "note.txt").write_text("artifact")
        mlflow.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    finally:
        assert stop(proc) == 0
    output = "".join(printed)
    files = [p for p in state.rglob("*") if p.is_file()]
    assert {"s3.log", "mlflow.log", "prefect.log", S3_LOG} <= {p.name for p in files}
    leaked = {str(p.relative_to(state)): s for p in files for s in SECRET_VALUES if s.encode() in p.read_bytes()}
    assert not [s for s in SECRET_VALUES if s in output] and not leaked, (leaked, output)
    # A shell that pastes the exports stops sending its own session token (moto's request log keeps headers).
    assert "export AWS_ENDPOINT_URL=" in output and "unset AWS_SESSION_TOKEN AWS_SECURITY_TOKEN" in output
    # The logs hold request headers and bodies: readable by their owner only.
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in state.iterdir() if p.suffix in (".log", ".jsonl")} == {
        name: "0o600" for name in ("s3.log", "mlflow.log", "prefect.log", S3_LOG)}
