"""The README's Prefect and MLflow instructions, run as written against real servers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import rasterio
from factories import prefect_api, register_champion, scoring_project, wait_for_final_run
from test_readme import README

from geoclip.config import params_from_dict
from geoclip.devtools.services import answers, free_port

BACKGROUND = "(runs until Ctrl-C)"  # the README's mark on a line that keeps a terminal busy


def fenced_block(text: str, containing: str) -> str:
    """The README's fenced bash block that contains ``containing``."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"README.md: expected one bash block with {containing!r}, found {len(found)}"
    return found[0]


def commands(block: str) -> list[str]:
    """The block's command lines, each as written (comments included), blank and comment-only lines left out."""
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


class Shell:
    """One bash fed the README's lines as a terminal is: the venv and exports carry from line to line."""

    def __init__(self, cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log, self.n = log, 0
        with open(log, "w") as out:
            self.proc = subprocess.Popen(["bash"], stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                         text=True, cwd=cwd, env=env, start_new_session=True)

    def send(self, text: str) -> None:
        """Write ``text`` to the shell's input."""
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def run(self, line: str, timeout: float = 300) -> int:
        """Run ``line`` in the foreground; its exit status."""
        self.n += 1
        status = self.log.with_name(f"status-{self.n}")
        self.send(f"{line}\necho $? > {status}")
        deadline = time.monotonic() + timeout
        while not status.exists() or not status.read_text().strip():
            assert self.proc.poll() is None and time.monotonic() < deadline, f"{line!r} did not end:\n{self.output()}"
            time.sleep(0.5)
        return int(status.read_text())

    def start(self, line: str) -> None:
        """Run ``line`` in the background, as a terminal of its own would (its comment dropped: `&` must end it)."""
        self.send(line.split(" #")[0].rstrip() + " &")

    def output(self) -> str:
        """What the shell and its commands printed."""
        return self.log.read_text()

    def stop(self) -> None:
        """Ctrl-C to the shell and everything it started (one process group), then SIGKILL what is left."""
        for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                try:
                    os.killpg(self.proc.pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.5)


def test_the_prefect_block_schedules_scoring_that_writes_class_maps(tmp_path, mlflow_server):
    model = f"geoclip-{uuid.uuid4().hex[:8]}"
    project = scoring_project(tmp_path, mlflow_server, model)
    port = free_port()
    block = fenced_block(README.read_text(), "prefect server start")
    lines = [line.replace("4200", str(port)) for line in commands(block)]  # a free port: 4200 may be in use here
    # The test's own settings, not the README's: a private server database, and a worker that polls every second.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_WORKER_QUERY_SECONDS": "1"}
    shell = Shell(project, env, tmp_path / "shell.log")
    api = f"http://127.0.0.1:{port}/api"
    try:
        for line in lines:
            if BACKGROUND in line:
                shell.start(line)
                if "prefect server start" in line:
                    deadline = time.monotonic() + 180
                    while not answers(f"{api}/health"):
                        assert time.monotonic() < deadline, f"the server did not answer:\n{shell.output()}"
                        time.sleep(1)
            else:
                assert shell.run(line) == 0, f"README line failed: {line}\n{shell.output()}"
        run = wait_for_final_run(api, "geoclip-scoring/scheduled-scoring", timeout=420)
        deployment = prefect_api(api, "deployments/name/geoclip-scoring/scheduled-scoring")
    finally:
        shell.stop()

    assert run["state_type"] == "COMPLETED", shell.output()
    assert run["deployment_id"] == deployment["id"]
    cron = params_from_dict({}).score.cron  # prefect.yaml's schedule is params.yaml's (tests/test_flows.py)
    assert [(s["schedule"]["cron"], s["active"]) for s in deployment["schedules"]] == [(cron, True)]
    assert deployment["work_pool_name"] == "local"
    for k in range(2):
        with rasterio.open(tmp_path / "scores" / f"scene_{k}_classmap.tif") as src:
            assert src.crs.to_epsg() == 32632 and src.shape == (128, 128)


def test_the_mlflow_instructions_name_the_page_model_alias_and_menus(tmp_path, monkeypatch):
    block = fenced_block(README.read_text(), "mlflow ui")
    (ui,) = [line for line in commands(block) if "mlflow ui" in line]
    url = re.search(r"open (http://127\.0\.0\.1:\d+)", block).group(1)
    menus = re.findall(r'"([^"]+)"', block)
    model = re.search(r"-> (\w+):", block).group(1)
    aliases = re.search(r"the aliases (\w+) and (\w+)", block).groups()
    defaults = params_from_dict({})
    # What the README names is what the project uses.
    assert (model, aliases[0]) == (defaults.register.model_name, "champion")
    assert defaults.score.model_uri == f"models:/{model}@champion" and menus == ["Model training", "Model registry"]

    project = tmp_path / "project"
    project.mkdir()
    (project / ".venv").symlink_to(sys.prefix)
    monkeypatch.chdir(project)
    # The project's default store, ./mlflow.db, named by its absolute path here: MLflow keeps one engine per URI in a
    # process, so a relative sqlite:///mlflow.db would stay bound to this folder for later tests in this process.
    register_champion(tmp_path, f"sqlite:///{project / 'mlflow.db'}", model)
    port = str(free_port())
    ui_cmd, url = ui.replace("5000", port), url.replace("5000", port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with open(tmp_path / "ui.log", "w") as log:
        proc = subprocess.Popen(["bash", "-c", ui_cmd], cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not answers(f"{url}/health"):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "ui.log").read_text()
            time.sleep(1)
        with urllib.request.urlopen(url, timeout=30) as r:
            page = r.read().decode()
        registered = read_json(f"{url}/api/2.0/mlflow/registered-models/get?name={model}")["registered_model"]
        bundles = re.findall(r'src="([^"]+\.js)"', page)
        ui_text = "".join(read_text(f"{url}/{src.removeprefix('./')}") for src in bundles)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)

    assert "<title>MLflow</title>" in page
    assert {a["alias"] for a in registered["aliases"]} == {"champion"}
    for menu in menus:  # the labels the README tells a newcomer to click exist in the pinned MLflow's UI
        assert f'defaultMessage:"{menu}"' in ui_text, f"MLflow's UI has no menu entry {menu!r}"


def read_text(url: str) -> str:
    """The body of ``url``."""
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.read().decode()


def read_json(url: str) -> dict:
    """The JSON body of ``url``."""
    return json.loads(read_text(url))

