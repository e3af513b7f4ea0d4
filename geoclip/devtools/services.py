"""Local services on 127.0.0.1 for development: moto S3, an MLflow server (SQLite + S3 artifacts), a Prefect server.

``geoclip services`` starts the three as child processes, waits until each answers, prints the environment to
export, and stops them all on Ctrl-C. State lives in one folder (default ``.services``): the MLflow and Prefect
SQLite databases, the servers' logs, and moto's request log, replayed at the next start because moto keeps
objects in memory only. Production uses real S3 and PostgreSQL instead (see the README).

``Server``, ``running``, ``wait_ready``, ``watch`` and ``free_port`` are the one way to run a local server process; the test
fixtures use them too.

Secrets: the services run with moto's dummy credentials (it accepts any), never the user's, and without the
user's AWS session token, so neither reaches the servers, their logs or moto's request log (which keeps every
request's headers); the logs are readable by their owner only. What is printed is what the services created;
anything that still matches a secret of the user's environment is masked (:func:`scrub`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from geoclip.data.s3 import redact
from geoclip.errors import GeoclipError

HOST = "127.0.0.1"
DEFAULT_PORTS = {"s3": 9000, "mlflow": 5000, "prefect": 4200}
MLFLOW_BUCKET = "geoclip-mlflow"
S3_LOG = "s3-requests.jsonl"  # moto's recorder: every request, replayed on the next start to restore the objects
DUMMY_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
#: The user's session credentials: botocore would send the token as a header with every request to moto.
SESSION_VARIABLES = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
#: Variable names whose values are secrets: masked wherever they would be printed.
SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|PRIVATE_KEY|API_KEY|CREDENTIAL|TOKEN(?!IZER)", re.IGNORECASE)
MASK = "****"
LOG_MODE = 0o600  # logs keep request headers and bodies: their owner's only
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
POLL_S = 0.25  # between health checks: short enough that a restart is noticed at once, cheap for the server


def private_log(path: Path) -> IO[bytes]:
    """``path`` opened for appending, created or narrowed to ``LOG_MODE`` first (a log of an earlier start too)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, LOG_MODE)
    os.fchmod(fd, LOG_MODE)
    return os.fdopen(fd, "ab")


def scrub(text: str) -> str:
    """``text`` safe to print: URI passwords and the values of the environment's secret variables masked.

    The services' own dummy credentials are not secrets (printing them is the point of the exports).
    """
    text = redact(text)
    for key, value in os.environ.items():
        if SECRET_NAME.search(key) and len(value) >= 4 and value not in DUMMY_AWS.values():
            text = text.replace(value, MASK)
    return text


def free_port(host: str = HOST) -> int:
    """A TCP port free on ``host`` now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    """True when ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:  # refused, reset, timed out, or an HTTP error status
        return False


@dataclass
class Server:
    """One server process: its command, extra environment, the URL that answers 200 once it is ready, its log."""

    name: str
    cmd: list[str]
    health: str
    env: dict[str, str] = field(default_factory=dict)  # on top of os.environ
    log: Path | None = None  # stdout and stderr, appended, readable by the owner only; None discards them
    cwd: Path | None = None
    proc: subprocess.Popen | None = None
    drop: tuple[str, ...] = ()  # variables of os.environ the process must not see

    def environment(self) -> dict[str, str]:
        """The process's environment: os.environ without ``drop``, then ``env``."""
        return {k: v for k, v in os.environ.items() if k not in self.drop} | self.env

    def start(self) -> None:
        """Spawn the process unless it runs already; do not wait for it to answer."""
        if self.proc is not None and self.proc.poll() is None:
            return
        # The child keeps its own copy of the log file, so ours is closed at once.
        with private_log(self.log) if self.log is not None else contextlib.nullcontext(subprocess.DEVNULL) as out:
            # Own session: a terminal's Ctrl-C reaches only the launcher, and stop() reaches the server's children.
            self.proc = subprocess.Popen(self.cmd, env=self.environment(), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.cwd)

    def check(self) -> None:
        """GeoclipError when the process has exited: a server runs until it is stopped."""
        if self.proc is not None and self.proc.poll() is not None:
            see = f"; see its log {self.log}" if self.log is not None else ""
            raise GeoclipError(f"{self.name} exited with code {self.proc.returncode}{see}")

    def stop(self, timeout: float = 30) -> None:
        """Stop the process and every process it started: SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):  # workers it left behind (uvicorn's)
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None


def wait_ready(servers: Sequence[Server], timeout: float) -> None:
    """Wait until every server answers; GeoclipError naming one that exited or did not answer in ``timeout`` s."""
    deadline = time.monotonic() + timeout
    pending = list(servers)
    while True:
        for srv in list(pending):
            srv.check()
            if answers(srv.health):
                pending.remove(srv)
        if not pending:
            return
        if time.monotonic() > deadline:
            logs = ", ".join(str(s.log) for s in pending if s.log is not None)
            raise GeoclipError(f"{', '.join(s.name for s in pending)} did not answer within {timeout:g} s"
                               + (f"; see {logs}" if logs else ""))
        time.sleep(POLL_S)


@contextlib.contextmanager
def running(*servers: Server, timeout: float) -> Iterator[tuple[Server, ...]]:
    """Start the servers together, wait until all answer, and stop them all (last first) however the block ends."""
    try:
        for srv in servers:
            srv.start()
        wait_ready(servers, timeout)
        yield servers
    finally:
        for srv in reversed(servers):
            srv.stop()


def aws_env() -> dict[str, str]:
    """The services' AWS settings: moto's dummy credentials, never the user's (moto accepts any), and the region."""
    return {**DUMMY_AWS, "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION") or DUMMY_AWS["AWS_DEFAULT_REGION"]}


def exports(ports: dict[str, int], host: str = HOST) -> dict[str, str]:
    """The environment clients need to use the services."""
    s3 = f"http://{host}:{ports['s3']}"
    return {"AWS_ENDPOINT_URL": s3, **aws_env(), "MLFLOW_TRACKING_URI": f"http://{host}:{ports['mlflow']}",
            "PREFECT_API_URL": f"http://{host}:{ports['prefect']}/api"}


def export_lines(ports: dict[str, int], host: str = HOST) -> list[str]:
    """The shell lines to print: ``export`` for what the services created, ``unset`` for the user's session token.

    A pasted session token would go, as a header, with every request to moto, whose request log keeps it.
    """
    lines = [scrub(f"export {key}={value}") for key, value in exports(ports, host).items()]
    session = [k for k in SESSION_VARIABLES if k in os.environ]
    return lines + ([f"unset {' '.join(session)}"] if session else [])


def service_specs(state: Path, ports: dict[str, int], host: str = HOST) -> list[Server]:
    """The three services (S3 first), with their state and logs under ``state``."""
    s3 = f"http://{host}:{ports['s3']}"
    py = sys.executable

    def server(name: str, cmd: list[str], env: dict[str, str], health: str) -> Server:
        # No service sees the user's AWS session token; the two S3 parties get moto's dummy credentials (below).
        return Server(name, cmd, health, env, log=state / f"{name}.log", cwd=state, drop=SESSION_VARIABLES)

    return [
        server("s3", [py, "-m", "moto.server", "-H", host, "-p", str(ports["s3"])],
               {"MOTO_ENABLE_RECORDING": "1", "MOTO_RECORDER_FILEPATH": str(state / S3_LOG), **aws_env()},
               f"{s3}/moto-api/data.json"),
        # Proxied artifacts: only this server talks to S3, clients need no S3 settings to log models.
        server("mlflow", [py, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{state}/mlflow.db",
                          "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/", "--host", host,
                          "--port", str(ports["mlflow"]), "--workers", "1"],
               {"MLFLOW_S3_ENDPOINT_URL": s3, "AWS_ENDPOINT_URL": s3, **aws_env()},
               f"http://{host}:{ports['mlflow']}/health"),
        server("prefect", [py, "-m", "prefect", "server", "start", "--host", host, "--port", str(ports["prefect"])],
               {"PREFECT_HOME": str(state / "prefect"), **QUIET}, f"http://{host}:{ports['prefect']}/api/health"),
    ]


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


def watch(servers: Sequence[Server], stopping: str = "stopping services ...") -> None:
    """Return on Ctrl-C or SIGTERM, printing ``stopping``; GeoclipError when a server exits."""
    try:
        while True:
            for srv in servers:
                srv.check()
            time.sleep(1)
    except KeyboardInterrupt:
        print(stopping, flush=True)


def run_services(state: str | Path = ".services", ports: dict[str, int] | None = None, timeout: float = 300) -> None:
    """Start the services, print the environment to export, and wait for Ctrl-C or SIGTERM, then stop them all.

    A service that fails to start or exits raises GeoclipError (after all of them are stopped).
    """
    state = Path(state).resolve()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_log(state / S3_LOG).close()  # moto appends to it: created (or narrowed) private first
    ports = DEFAULT_PORTS | (ports or {})

    def terminate(signum, frame):  # SIGTERM ends the launcher like Ctrl-C, so the services are stopped too
        raise KeyboardInterrupt

    # SIGINT too: started by a script in the background (or under nohup, or a CI runner), Python inherits SIGINT
    # ignored, and Ctrl-C or ``kill -INT`` would leave every server running.
    previous = {sig: signal.signal(sig, terminate) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(scrub(f"starting moto S3, MLflow and Prefect on {HOST} (state and logs in {state}) ..."), flush=True)
        s3, *others = service_specs(state, ports)
        with running(s3, timeout=timeout):
            _restore_s3(f"http://{HOST}:{ports['s3']}", state)  # MLflow's artifact bucket must exist before use
            with running(*others, timeout=timeout):
                print("services ready; in another shell run:")
                for line in export_lines(ports):
                    print(line)
                print("Ctrl-C stops them all.", flush=True)
                watch([s3, *others])
    except KeyboardInterrupt:  # during start-up: running() has already stopped what had started
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


#: A TCP proxy (``python -c TCP_PROXY LISTEN_PORT TARGET_PORT``) that tests and bench/faults.py stop and start to
#: take a server away and bring it back with its state intact.
TCP_PROXY = r"""
import asyncio, sys

async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()

async def handle(client_r, client_w):
    server_r, server_w = await asyncio.open_connection("127.0.0.1", int(sys.argv[2]))
    await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w), return_exceptions=True)

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()

asyncio.run(main())
"""
