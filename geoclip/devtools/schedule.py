"""``geoclip schedule``: scoring on its cron schedule on this machine, in one command, stopped by Ctrl-C.

It does what the README's Prefect block does by hand, through Prefect's own command line (geoclip never imports
Prefect): a Prefect server on 127.0.0.1 unless ``PREFECT_API_URL`` names one that answers, the process work pool
``local``, ``prefect deploy --all`` of the project's ``prefect.yaml`` (scheduled scoring, training on demand), and
one process worker on that pool. Ctrl-C or SIGTERM stops the worker, then the server if it was started here; the
deployments and their schedule stay on the server, so a later ``geoclip schedule`` carries on where this one stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from geoclip.config import Params, load_params
from geoclip.devtools.services import HOST, QUIET, Server, answers, free_port, running, scrub, watch
from geoclip.errors import GeoclipError

POOL = "local"  # the work pool prefect.yaml's deployments name
SCORING = "geoclip-scoring/scheduled-scoring"
PARAMS = "params.yaml"  # prefect.yaml's deployments read this file, relative to the project folder


def scheduled_cron(prefect_yaml: Path, deployment: str = SCORING.split("/")[1]) -> str:
    """The cron of ``deployment`` in ``prefect_yaml``; GeoclipError naming the file when it has none."""
    try:
        spec = yaml.safe_load(prefect_yaml.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise GeoclipError(f"{prefect_yaml}: cannot read it ({exc.__class__.__name__}); "
                           "run geoclip schedule from the project folder, or give --project") from None
    entries = spec.get("deployments") if isinstance(spec, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and entry.get("name") == deployment:
            crons = [s.get("cron") for s in entry.get("schedules") or [] if s.get("cron")]
            if crons:
                return crons[0]
    raise GeoclipError(f"{prefect_yaml}: no deployment {deployment!r} with a cron schedule")


def check_project(project: Path) -> Params:
    """The project's params, after checking that prefect.yaml's schedule is their ``score.cron``."""
    cron = scheduled_cron(project / "prefect.yaml")
    params = load_params(project / PARAMS)
    if cron != params.score.cron:
        raise GeoclipError(f"{project / 'prefect.yaml'}: scheduled-scoring's cron {cron!r} differs from "
                           f"{project / PARAMS} score.cron {params.score.cron!r}; make them the same")
    return params


def _under(project: Path, path: str) -> str:
    """``path`` as the deployment's runs see it: relative paths are read from the project folder."""
    return path if "://" in path else str(project / path)


def prefect_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> str:
    """Run ``prefect ARGS`` to its end; its output, or GeoclipError with its last lines."""
    try:
        done = subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise GeoclipError(f"`prefect {' '.join(args)}` did not finish within {timeout:g} s") from None
    if done.returncode != 0:
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
        raise GeoclipError(f"`prefect {' '.join(args)}` failed (exit {done.returncode}): {scrub(tail)}")
    return done.stdout


def ensure_pool(api_url: str, env: dict[str, str], project: Path, pool: str = POOL) -> None:
    """Create the process work pool ``pool`` unless it exists; one of another type is an error, and an existing
    process pool is kept as its owner configured it (never overwritten)."""
    # Through Prefect's client (its CLI): a busy SQLite server answers 503 "database is locked", which it retries.
    try:
        shown = prefect_cli(["work-pool", "inspect", pool, "--output", "json"], env, project)
    except GeoclipError as exc:
        if f"Work pool {pool!r} not found" not in str(exc):
            raise
        prefect_cli(["work-pool", "create", pool, "--type", "process"], env, project)
        return
    try:
        pool_type = json.loads(shown)["type"]
    except (ValueError, KeyError, TypeError):
        raise GeoclipError(f"`prefect work-pool inspect {pool} --output json` printed no work pool: "
                           f"{scrub(shown.strip()[:200])!r}") from None
    if pool_type != "process":
        raise GeoclipError(f"work pool {pool!r} on {api_url} is of type {pool_type!r}; prefect.yaml's deployments "
                           f"need a process pool of that name: delete it (`prefect work-pool delete {pool}`) or use "
                           "another server")


def server_for(api_url: str | None, state: Path, port: int) -> tuple[str, Server | None]:
    """The API URL to use and the server to start for it (None: the one ``PREFECT_API_URL`` names answers)."""
    if api_url:
        if not answers(f"{api_url.rstrip('/')}/health"):
            raise GeoclipError(f"PREFECT_API_URL={api_url} does not answer; start that server, "
                               "or unset PREFECT_API_URL to let geoclip schedule start one")
        return api_url, None
    api_url = f"http://{HOST}:{port}/api"
    if answers(f"{api_url}/health"):
        raise GeoclipError(f"a Prefect server already answers on {HOST}:{port}: export PREFECT_API_URL={api_url} to "
                           "schedule on it, or give --prefect-port for a server of its own")
    server = Server("prefect", [sys.executable, "-m", "prefect", "server", "start", "--host", HOST,
                                "--port", str(port)], f"{api_url}/health",
                    {"PREFECT_HOME": str(state / "prefect"), **QUIET}, log=state / "prefect.log", cwd=state)
    return api_url, server


def worker_for(env: dict[str, str], project: Path, state: Path) -> Server:
    """One process worker on the ``local`` pool, with its health check on a free port of 127.0.0.1."""
    port = free_port()
    return Server("prefect worker", [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL,
                                     "--with-healthcheck"], f"http://{HOST}:{port}/health",
                  env | {"PREFECT_WORKER_WEBSERVER_HOST": HOST, "PREFECT_WORKER_WEBSERVER_PORT": str(port)},
                  log=state / "prefect-worker.log", cwd=project)


def run_schedule(project: str | Path = ".", state: str | Path = ".services", port: int = 4200,
                 timeout: float = 300) -> None:
    """Deploy the project's flows to a Prefect server, run a worker, and wait for Ctrl-C or SIGTERM."""
    project = Path(project).resolve()
    params = check_project(project)
    state = Path(state).resolve()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    api_url, server = server_for(os.environ.get("PREFECT_API_URL"), state, port)
    env = {**os.environ, **QUIET, "PREFECT_API_URL": api_url}

    def terminate(signum, frame):  # SIGTERM (and a SIGINT inherited ignored) stop everything, as Ctrl-C does
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, terminate) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with running(*([server] if server else []), timeout=timeout):
            where = f"started on {api_url}, log {state / 'prefect.log'}" if server else f"at {api_url}"
            print(f"Prefect server {where}", flush=True)
            ensure_pool(api_url, env, project)
            prefect_cli(["--no-prompt", "deploy", "--all"], env, project)
            print(f"deployed {project / 'prefect.yaml'}: {SCORING} on cron {params.score.cron!r} (UTC), "
                  "geoclip-training/training on demand", flush=True)
            worker = worker_for(env, project, state)
            with running(worker, timeout=timeout):
                print(f"worker on pool {POOL!r} (log {worker.log}); the UI: {api_url.removesuffix('/api')}")
                print(f"score now: PREFECT_API_URL={api_url} prefect deployment run {SCORING}; scenes from "
                      f"{params.score.scenes}, outputs to {_under(project, params.paths.scores)}")
                print("Ctrl-C stops the worker" + (" and the server." if server else "."), flush=True)
                watch([s for s in (server, worker) if s], "stopping ...")
    except KeyboardInterrupt:  # during start-up: running() has already stopped what had started
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

