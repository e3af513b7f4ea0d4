"""The pipeline's stages, one function each: what dvc.yaml (through ``geoclip <stage>``), the Prefect flows and the
tests call. Each hands its params to the library function that does the work; train and evaluate also record the
run in MLflow, which the training code itself never imports.

``python -m geoclip.stages --params params.yaml [--resume]`` is one training rank: what torchrun starts.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from geoclip.config import Params, load_params
from geoclip.errors import GeoclipError


def ingest(params: Params) -> dict:
    """Bring tiles from ``ingest.source`` (synthetic, folder, manifest, s3://) into ``paths.raw``."""
    from geoclip.data.ingest import ingest as run

    return run(params)


def validate(params: Params) -> dict:
    """Run the Great Expectations suites on the raw tiles and labels; write the reports and Data Docs."""
    from geoclip.data.validate import validate as run

    return run(params)


def prepare(params: Params) -> Path:
    """Split, check the splits, compute train-only band statistics and pack the tiles; return the prepared folder."""
    from geoclip.data.prepare import prepare as run

    return run(params)


def train(params: Params, resume: bool = False, launch_id: str = "") -> dict:
    """Train in this process (one rank of torchrun, or alone): rank 0 tracks the run in MLflow, then logs the model
    files, curves and validation reports to it and writes ``run.json``. ``launch_id``: one elastic multi-node launch
    (see geoclip.training.train.train)."""
    from geoclip.registry.tracking import log_training_results, training_run_opener
    from geoclip.training.checkpoint import CHECKPOINT_FILE
    from geoclip.training.train import CURVE_FILE, HISTORY_FILE
    from geoclip.training.train import train as run

    model_dir = Path(params.paths.model)
    result = run(params, resume=resume, open_log=training_run_opener(params, model_dir / CHECKPOINT_FILE),
                 launch_id=launch_id)
    if result["run_id"]:  # rank 0
        from geoclip.model.clip import CONFIG_FILE, WEIGHTS_FILE

        log_training_results(params, result["run_id"], [model_dir / HISTORY_FILE, model_dir / CURVE_FILE],
                             [model_dir / WEIGHTS_FILE, model_dir / CONFIG_FILE])
    return result


def torchrun_command(params: Params, params_path: str | Path, resume: bool = False) -> list[str]:
    """The torchrun command line that runs :func:`train` on ``train.nproc_per_node`` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={params.train.nproc_per_node}", "-m", "geoclip.stages", "--params", str(params_path),
            *(["--resume"] if resume else [])]


def launch_training(params_path: str | Path = "params.yaml", resume: bool = False) -> None:
    """Run :func:`train` through torchrun (the train stage of dvc.yaml and the flow); raise on failure."""
    params = load_params(params_path)
    _run_agent(torchrun_command(params, params_path, resume), "training (torchrun")


def node_command(params: Params, params_path: str | Path, endpoint: str, launch_id: str) -> list[str]:
    """The torchrun agent of one node of a ``train.nnodes`` run: c10d rendezvous at ``endpoint`` (host:port; the
    agent on that host serves it), ``train.max_restarts`` restarts of the whole worker group after a failure, each
    resuming from the checkpoint of ``launch_id`` (see geoclip.training.train.train)."""
    t = params.train
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={t.nnodes}",
            f"--nproc_per_node={t.nproc_per_node}", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}",
            f"--rdzv_id={launch_id}", f"--rdzv_conf=join_timeout={t.join_timeout}", f"--max_restarts={t.max_restarts}",
            "-m", "geoclip.stages", "--params", str(params_path), "--launch-id", launch_id]


class NodeLostError(RuntimeError):
    """A node's torchrun agent ended without a worker naming an error (killed, lost its peers, out of restarts):
    worth starting the node again, unlike a GeoclipError about the input."""


def run_node(params_path: str | Path, endpoint: str, launch_id: str, node: int = 0) -> None:
    """Run one node's torchrun agent of a multi-node training (:func:`node_command`) until the run ends.

    Every node must see ``paths.prepared`` and ``paths.model`` at the same paths (a shared file system): rank 0,
    wherever the rendezvous puts it, reads and writes the checkpoint and the model there.
    """
    params = load_params(params_path)
    if not endpoint or ":" not in endpoint:
        raise GeoclipError(f"rendezvous endpoint {endpoint!r}: expected host:port")
    # Workers keep their own TCP store rather than sharing the rendezvous one: under the shared store each worker's
    # keys are prefixed by its agent's restart count, which differs between nodes after a failure (one agent counts
    # the failure, the other restarts for the new round), and a restarted group then hangs in init_process_group
    # (pytorch/pytorch#135712; seen here with torch 2.14).
    # GEOCLIP_NODE: which flow task started a process (torchrun's own GROUP_RANK changes with every rendezvous).
    env = {**os.environ, "GEOCLIP_NODE": str(node), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    _run_agent(node_command(params, params_path, endpoint, launch_id), f"training node {node} (torchrun", env)


def _run_agent(command: list[str], what: str, env: dict | None = None) -> None:
    """Run a torchrun agent, passing its workers' stderr through; GeoclipError with a worker's ``error:`` line,
    NodeLostError on any other failure. Workers an agent leaves behind when it dies are killed with it."""
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, env=env)
    workers = _Descendants(proc.pid)
    tail: list[str] = [""]
    pump = threading.Thread(target=_pass_through, args=(proc.stderr, tail), daemon=True)
    pump.start()
    try:
        rc = proc.wait()
    finally:
        workers.stop()
        if proc.poll() is None:  # interrupted here: the agent stops its workers on SIGTERM
            proc.terminate()
            proc.wait()
        # torchrun starts each worker in a session of its own: an agent killed outright leaves them training on (and
        # holding the stderr pipe open), and a restarted node would meet its own orphans in the collectives.
        workers.kill()
        pump.join()
    if rc == 0:
        return
    errors = [ln for ln in tail[0].splitlines() if ln.startswith("error: ")]
    if errors:
        raise GeoclipError(f"{what}, exit code {rc}) failed: {errors[-1][len('error: '):]}")
    raise NodeLostError(f"{what}, exit code {rc}) failed: see the log above")


def _pass_through(stream, tail: list[str]) -> None:
    """Copy a child's stderr (progress bars, errors) to ours, keeping its last 64 KiB in ``tail[0]``."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in iter(lambda: stream.read1(65536), b""):
        text = decoder.decode(chunk)
        sys.stderr.write(text)
        sys.stderr.flush()
        tail[0] = (tail[0] + text)[-65536:]


class _Descendants:
    """The processes under ``pid``, noted every half second while it runs (to kill orphans once it is gone)."""

    def __init__(self, pid: int):
        import psutil

        self._root, self._seen, self._stop = psutil.Process(pid), {}, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        import psutil

        while not self._stop.wait(0.5):
            try:
                for child in self._root.children(recursive=True):
                    self._seen.setdefault(child.pid, child)
            except psutil.Error:
                return  # the agent is gone

    def stop(self) -> None:
        """Stop watching."""
        self._stop.set()
        self._thread.join()

    def kill(self) -> None:
        """SIGKILL every process seen that still runs (the same process: psutil checks its start time)."""
        import psutil

        for child in self._seen.values():
            with contextlib.suppress(psutil.Error):
                child.kill()


def evaluate(params: Params) -> dict:
    """Evaluate the trained model on the test split and add the metrics and figures to its MLflow run."""
    from geoclip.registry.tracking import log_evaluation, read_run_info
    from geoclip.training.evaluate import OUTPUT_FILES, check_inputs
    from geoclip.training.evaluate import evaluate as run

    check_inputs(params)
    run_id = read_run_info(params)["run_id"]  # fail before writing anything
    result = run(params)
    scalars = {k: v for k, v in result.items() if k != "per_class"}
    log_evaluation(params, run_id, scalars, [Path(params.paths.eval) / f for f in OUTPUT_FILES])
    return result


def register(params: Params) -> dict:
    """Log the model as an MLflow pyfunc, register it and move the aliases through the champion gate."""
    from geoclip.registry.register import register as run

    return run(params)


def score(params: Params, model_uri: str | None = None, source: str | None = None,
          out_dir: str | None = None) -> list[dict]:
    """Score every scene (default ``score.scenes``) exactly once with the registered model (default the champion)."""
    from geoclip.scoring.runs import score_scenes

    return score_scenes(params, model_uri=model_uri, source=source, out_dir=out_dir)


def fewshot(params: Params, tiles: str | Path, model_uri_or_dir: str | Path, out_json: str | Path) -> dict:
    """Adapt a model folder or registered model with ``fewshot.shots`` tiles per class; report accuracy on the rest."""
    from geoclip.registry.models import load_geoclip
    from geoclip.training.fewshot import fewshot as run

    return run(params, tiles, load_geoclip(model_uri_or_dir, params), out_json, model_name=str(model_uri_or_dir))


def main(argv: list[str] | None = None) -> None:
    """torchrun entry point, one training rank: ``python -m geoclip.stages --params params.yaml [--resume]``."""
    ap = argparse.ArgumentParser(prog="python -m geoclip.stages", description=main.__doc__)
    ap.add_argument("--params", default="params.yaml", help="path to params.yaml")
    ap.add_argument("--resume", action="store_true", help="continue from {paths.model}/checkpoint.pt")
    ap.add_argument("--launch-id", default="", help="an elastic launch's id: resume from its own checkpoint, if any")
    args = ap.parse_args(argv)
    try:
        result = train(load_params(args.params), resume=args.resume, launch_id=args.launch_id)
    except GeoclipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if result["run_id"]:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
