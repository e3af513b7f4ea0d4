"""`geoclip schedule`: one command schedules scoring on this machine, scores on demand, and stops cleanly."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import psutil
import pytest
import rasterio
import yaml
from factories import REPO, follow, prefect_api, scoring_project, wait_for_final_run

from geoclip.cli import main
from geoclip.devtools.schedule import ensure_pool, prefect_cli
from geoclip.devtools.services import answers, free_port
from geoclip.errors import GeoclipError

READY = "Ctrl-C stops the worker"


def test_schedule_deploys_runs_a_worker_scores_and_stops_everything(tmp_path, mlflow_server):
    project = scoring_project(tmp_path, mlflow_server, f"geoclip-{uuid.uuid4().hex[:8]}")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env["PREFECT_WORKER_QUERY_SECONDS"] = "1"  # the test's, not the command's: a worker that polls every second
    proc = subprocess.Popen([sys.executable, "-m", "geoclip.cli", "schedule", "--dir", str(tmp_path / "state"),
                             "--prefect-port", str(port)], cwd=project, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines, seen = follow(proc)
    api = f"http://127.0.0.1:{port}/api"
    try:
        while (line := lines.get(timeout=400)) is None or READY not in line:
            assert line is not None, "geoclip schedule ended before it was ready:\n" + "".join(seen)
        started = psutil.Process(proc.pid).children(recursive=True)
        done = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run",
                               "geoclip-scoring/scheduled-scoring"], env=env | {"PREFECT_API_URL": api},
                              capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        run = wait_for_final_run(api, "geoclip-scoring/scheduled-scoring", timeout=420)
        deployments = {d["name"]: d for d in prefect_api(api, "deployments/filter", {})}
        pools_kept_or_refused(api, project, env | {"PREFECT_API_URL": api})
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)

    printed = "".join(seen)
    assert run["state_type"] == "COMPLETED", printed
    assert set(deployments) == {"scheduled-scoring", "training"}  # prefect.yaml's two, both on the local pool
    assert {d["work_pool_name"] for d in deployments.values()} == {"local"}
    assert [s["schedule"]["cron"] for s in deployments["scheduled-scoring"]["schedules"]] == ["0 3 * * *"]
    for k in range(2):
        with rasterio.open(tmp_path / "scores" / f"scene_{k}_classmap.tif") as src:
            assert src.crs.to_epsg() == 32632
    assert f"outputs to {tmp_path / 'scores'}" in printed and "prefect deployment run" in printed
    # Ctrl-C: exit 0, the server gone, and no process it started left running.
    assert code == 0 and printed.rstrip().endswith("stopped"), printed
    assert not answers(f"{api}/health")
    assert started and not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def pools_kept_or_refused(api: str, project: Path, env: dict[str, str]) -> None:
    """On the live server: a configured process pool is kept, a missing one made, one of another type refused."""
    prefect_api(api, "work_pools/local", {"concurrency_limit": 3}, method="PATCH")
    ensure_pool(api, env, project)
    assert prefect_api(api, "work_pools/local")["concurrency_limit"] == 3  # the owner's setting, not overwritten
    ensure_pool(api, env, project, "fresh")
    assert prefect_api(api, "work_pools/fresh")["type"] == "process"
    prefect_api(api, "work_pools/", {"name": "elsewhere", "type": "kubernetes", "base_job_template": {}})
    with pytest.raises(GeoclipError, match="work pool 'elsewhere' on .* is of type 'kubernetes'; prefect.yaml"):
        ensure_pool(api, env, project, "elsewhere")


def project_copy(tmp_path: Path, cron: str) -> Path:
    """prefect.yaml and a params.yaml whose score.cron is ``cron``, in a folder of their own."""
    (tmp_path / "prefect.yaml").write_bytes((REPO / "prefect.yaml").read_bytes())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"score": {"cron": cron}}))
    return tmp_path


def test_schedule_refuses_a_cron_that_differs_from_params(tmp_path, capsys):
    project = project_copy(tmp_path, "0 4 * * *")
    assert main(["schedule", "--project", str(project), "--dir", str(tmp_path / "state")]) == 2
    err = capsys.readouterr().err
    assert "prefect.yaml: scheduled-scoring's cron '0 3 * * *' differs from" in err and "'0 4 * * *'" in err
    assert not (tmp_path / "state").exists()  # refused before starting anything
    assert main(["schedule", "--project", str(project)]) == 2  # without --dir: nothing made in the project either
    assert not (project / ".services").exists()


def test_schedule_refuses_a_server_that_does_not_answer_and_a_port_taken(tmp_path, capsys, monkeypatch):
    project = project_copy(tmp_path, "0 3 * * *")
    dead = f"http://127.0.0.1:{free_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", dead)
    assert main(["schedule", "--project", str(project), "--dir", str(tmp_path / "state")]) == 2
    assert f"PREFECT_API_URL={dead} does not answer" in capsys.readouterr().err

    # A server (any HTTP server answering 200) already on the port: named, with the two ways out.
    monkeypatch.delenv("PREFECT_API_URL")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert main(["schedule", "--project", str(project), "--prefect-port", str(port)]) == 2
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert f"already answers on 127.0.0.1:{port}" in err and "--prefect-port" in err


def test_schedule_refuses_another_params_file(tmp_path, capsys):
    assert main(["schedule", "--params", str(tmp_path / "other.yaml")]) == 2
    assert "prefect.yaml's deployments read params.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["deployments: []\n", "deployments: [unclosed\n", None])
def test_schedule_names_a_prefect_yaml_without_the_scoring_schedule(tmp_path, capsys, text):
    if text is not None:  # None: no prefect.yaml at all
        (tmp_path / "prefect.yaml").write_text(text)
    assert main(["schedule", "--project", str(tmp_path)]) == 2
    assert f"{tmp_path / 'prefect.yaml'}:" in capsys.readouterr().err


class _Healthy(http.server.BaseHTTPRequestHandler):
    """Answers 200 to every GET."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        """Quiet."""


def test_a_prefect_command_that_hangs_is_a_one_line_error(tmp_path):
    with pytest.raises(GeoclipError, match=r"`prefect version` did not finish within 0.01 s"):
        prefect_cli(["version"], dict(os.environ), tmp_path, timeout=0.01)


def test_a_pool_listing_that_is_not_json_is_one_line(tmp_path):
    # A stand-in `prefect` (first on PYTHONPATH) whose inspect prints a banner instead of JSON, as a plugin or a
    # changed CLI might: no real Prefect prints that, so this is the one fake in this file.
    fake = tmp_path / "fake" / "prefect"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text("print('Welcome to Prefect! Upgrade available.')\n")
    env = {**os.environ, "PYTHONPATH": str(fake.parent)}
    with pytest.raises(GeoclipError, match=r"`prefect work-pool inspect local --output json` printed no work pool: "
                                           r"'Welcome to Prefect! Upgrade available.'"):
        ensure_pool("http://127.0.0.1:9/api", env, tmp_path)
