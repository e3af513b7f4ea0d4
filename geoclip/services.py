"""Local services on 127.0.0.1 for development: moto S3, an MLflow server (SQLite + S3 artifacts), a Prefect server.

``geoclip services`` starts the three as child processes, waits until each answers, prints the environment to
export, and stops them all on Ctrl-C. State lives in one folder (default ``.services``): the MLflow and Prefect
SQLite databases, the servers' logs, and moto's request log, replayed at the next start because moto keeps
objects in memory only. Production uses real S3 and PostgreSQL instead (see the README).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from geoclip.errors import GeoclipError

HOST = "127.0.0.1"
DEFAULT_PORTS = {"s3": 9000, "mlflow": 5000, "prefect": 4200}
MLFLOW_BUCKET = "geoclip-mlflow"
S3_LOG = "s3-requests.jsonl"  # moto's recorder: every request, replayed on the next start to restore the objects
DUMMY_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


@dataclass
class Service:
    """One server process: its command, extra environment, and the URL that answers 200 once it is ready."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    health: str
    proc: subprocess.Popen | None = None


def aws_env() -> dict[str, str]:
    """AWS credentials and region from the environment, with dummy values where unset (moto accepts any)."""
    return {k: os.environ.get(k) or v for k, v in DUMMY_AWS.items()}


def exports(ports: dict[str, int], host: str = HOST) -> dict[str, str]:
    """The environment clients need to use the services."""
    s3 = f"http://{host}:{ports['s3']}"
    return {"AWS_ENDPOINT_URL": s3, **aws_env(), "MLFLOW_TRACKING_URI": f"http://{host}:{ports['mlflow']}",
            "PREFECT_API_URL": f"http://{host}:{ports['prefect']}/api"}


def service_specs(state: Path, ports: dict[str, int], host: str = HOST) -> list[Service]:
    """The three services with their state under ``state``."""
    s3 = f"http://{host}:{ports['s3']}"
    py = sys.executable
    return [
        Service("s3", [py, "-m", "moto.server", "-H", host, "-p", str(ports["s3"])],
                {"MOTO_ENABLE_RECORDING": "1", "MOTO_RECORDER_FILEPATH": str(state / S3_LOG)},
                f"{s3}/moto-api/data.json"),
        # Proxied artifacts: only this server talks to S3, clients need no S3 settings to log models.
        Service("mlflow", [py, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{state}/mlflow.db",
                           "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/", "--host", host,
                           "--port", str(ports["mlflow"]), "--workers", "1"],
                {"MLFLOW_S3_ENDPOINT_URL": s3, "AWS_ENDPOINT_URL": s3, **aws_env()},
                f"http://{host}:{ports['mlflow']}/health"),
        Service("prefect", [py, "-m", "prefect", "server", "start", "--host", host, "--port", str(ports["prefect"])],
                {"PREFECT_HOME": str(state / "prefect"), **QUIET}, f"http://{host}:{ports['prefect']}/api/health"),
    ]


def _answers(url: str) -> bool:
    """True when ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _wait(services: list[Service], timeout: float) -> None:
    """Wait until every service answers; GeoclipError naming the one that exited or never answered."""
    deadline = time.monotonic() + timeout
    pending = list(services)
    while pending:
        for svc in list(pending):
            if svc.proc is not None and svc.proc.poll() is not None:
                raise GeoclipError(f"services: {svc.name} exited with code {svc.proc.returncode}; "
                                   f"see its log {svc.name}.log in the state folder")
            if _answers(svc.health):
                pending.remove(svc)
        if pending and time.monotonic() > deadline:
            raise GeoclipError(f"services: {', '.join(s.name for s in pending)} did not answer within {timeout:g} s")
        time.sleep(0.5)


def _restore_s3(s3_url: str, state: Path) -> None:
    """Replay moto's request log of earlier sessions (objects live in memory only), then make the MLflow bucket."""
    import boto3

    if (state / S3_LOG).exists() and (state / S3_LOG).stat().st_size:
        req = urllib.request.Request(f"{s3_url}/moto-api/recorder/replay-recording", method="POST")
        with urllib.request.urlopen(req, timeout=600):
            pass
    client = boto3.client("s3", endpoint_url=s3_url, **{k.lower(): v for k, v in aws_env().items()
                                                        if k != "AWS_DEFAULT_REGION"},
                          region_name=aws_env()["AWS_DEFAULT_REGION"])
    if MLFLOW_BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=MLFLOW_BUCKET)


def _stop(svc: Service, timeout: float = 30) -> None:
    """Stop a service and every process it started (its own session): SIGTERM, then SIGKILL after ``timeout``."""
    if svc.proc is None or svc.proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(svc.proc.pid, signal.SIGTERM)
    try:
        svc.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(svc.proc.pid, signal.SIGKILL)
        svc.proc.wait()
    with contextlib.suppress(ProcessLookupError):  # workers the server left behind (uvicorn's children)
        os.killpg(svc.proc.pid, signal.SIGKILL)


def start_services(state: str | Path, ports: dict[str, int] | None = None, timeout: float = 300) -> list[Service]:
    """Start moto S3, then MLflow and Prefect, and wait until all answer; stop them all if any fails."""
    state = Path(state).resolve()
    state.mkdir(parents=True, exist_ok=True)
    ports = DEFAULT_PORTS | (ports or {})
    specs = service_specs(state, ports)
    started: list[Service] = []
    try:
        for group in (specs[:1], specs[1:]):  # S3 first: MLflow's artifact bucket must exist before it is used
            for svc in group:
                with open(state / f"{svc.name}.log", "ab") as log:
                    # Own session: Ctrl-C reaches only this launcher, which then stops each service and its children.
                    svc.proc = subprocess.Popen(svc.cmd, env=os.environ | svc.env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=state)
                started.append(svc)
            _wait(group, timeout)
            if group[0].name == "s3":
                _restore_s3(f"http://{HOST}:{ports['s3']}", state)
    except BaseException:
        stop_services(started)
        raise
    return started


def stop_services(services: list[Service]) -> None:
    """Stop the services in reverse order of starting."""
    for svc in reversed(services):
        _stop(svc)


def run_services(state: str | Path = ".services", ports: dict[str, int] | None = None, timeout: float = 300) -> None:
    """Start the services, print the environment to export, and wait for Ctrl-C or SIGTERM, then stop them all.

    A service that fails to start or exits raises GeoclipError (after the others are stopped).
    """
    ports = DEFAULT_PORTS | (ports or {})

    def terminate(signum, frame):  # SIGTERM ends the launcher like Ctrl-C, so the services are stopped too
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    services: list[Service] = []
    try:
        print(f"starting moto S3, MLflow and Prefect on {HOST} (state and logs in {Path(state).resolve()}) ...",
              flush=True)
        services = start_services(state, ports, timeout)
        print("services ready; in another shell run:")
        for key, value in exports(ports).items():
            print(f"export {key}={value}")
        print("Ctrl-C stops them all.", flush=True)
        while True:
            for svc in services:
                if svc.proc is not None and svc.proc.poll() is not None:
                    raise GeoclipError(f"services: {svc.name} exited with code {svc.proc.returncode} (see "
                                       f"{Path(state).resolve() / (svc.name + '.log')}); stopped the others")
            time.sleep(1)
    except KeyboardInterrupt:
        print("stopping services ...", flush=True)
    finally:
        stop_services(services)
        signal.signal(signal.SIGTERM, previous)
