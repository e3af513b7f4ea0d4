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
import re
import shlex
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime
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
    """Run :func:`train` through torchrun (the train stage of dvc.yaml and the flow); raise on failure.

    Everything torchrun and the ranks print goes to a log file (:func:`training_log`); a failure is one GeoclipError
    naming it.
    """
    params = load_params(params_path)
    try:
        _run_agent(torchrun_command(params, params_path, resume), "training", training_log(params, "train"))
    except NodeLostError as exc:  # one node: nothing to start again, just a failed run for the CLI's one line
        raise GeoclipError(str(exc)) from None


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
    _run_agent(node_command(params, params_path, endpoint, launch_id), f"training node {node}",
               training_log(params, f"train-node{node}"), env)


LOGS_KEPT = 20  # training logs kept in {paths.reports}/logs (the newest; older ones are deleted)


def training_log(params: Params, name: str = "train") -> Path:
    """A new log file for one launch, ``{paths.reports}/logs/{name}-{UTC time}-{pid}.log``; older ones beyond the
    newest :data:`LOGS_KEPT` are deleted. Under reports/ rather than models/: no DVC stage caches it."""
    folder = Path(params.paths.reports) / "logs"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GeoclipError(f"{folder}: cannot hold the training log ({exc.strerror}); point paths.reports at a "
                           "writable folder") from None
    # Names sort by time (the prefix is fixed); another node sharing the folder may delete the same files.
    logs = sorted(folder.glob(f"{name}-[0-9]*.log"))
    for old in logs[:max(0, len(logs) - (LOGS_KEPT - 1))]:
        old.unlink(missing_ok=True)
    now = datetime.now(UTC)
    return folder / f"{name}-{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{os.getpid()}.log"


def _run_agent(command: list[str], what: str, log: Path, env: dict | None = None) -> None:
    """Run a torchrun agent, writing all it and its workers print to stderr into ``log`` and passing it through to
    ours up to a worker's ``error:`` line or the agent's own failure report (:class:`_AgentOutput`). GeoclipError
    with that worker's message, NodeLostError on any other failure; either names ``log``. Workers an agent leaves
    behind when it dies are killed with it."""
    try:
        sink = open(log, "wb", buffering=0)  # noqa: SIM115 (closed below, once the pump has drained the pipe)
    except OSError as exc:
        raise GeoclipError(f"{log}: cannot write the training log ({exc.strerror})") from None
    with sink:
        try:
            sink.write(f"$ {shlex.join(command)}\n".encode())  # unbuffered, as all below: on disk as it comes
        except OSError as exc:  # a full disk: say so before training starts
            raise GeoclipError(f"{log}: cannot write the training log ({exc.strerror})") from None
        output = _AgentOutput(sys.stderr)
        proc = subprocess.Popen(command, stderr=subprocess.PIPE, env=env)
        workers = _Descendants(proc.pid)
        pump = threading.Thread(target=_pass_through, args=(proc.stderr, sink, output), daemon=True)
        pump.start()
        try:
            rc = proc.wait()
        finally:
            workers.stop()
            if proc.poll() is None:  # interrupted here: the agent stops its workers on SIGTERM
                proc.terminate()
                proc.wait()
            # torchrun starts each worker in a session of its own: an agent killed outright leaves them training on
            # (and holding the stderr pipe open), and a restarted node would meet its own orphans in the collectives.
            workers.kill()
            pump.join()
    if rc == 0:
        return
    if output.error is not None:
        raise GeoclipError(f"{what} failed: {output.error} (full log: {log})")
    raise NodeLostError(f"{what} failed: {output.cause(rc)}; details in {log}")


def _pass_through(stream, sink, output: _AgentOutput) -> None:
    """Copy a child's stderr to ``sink`` as it comes (a killed run keeps its log) and through ``output`` to ours."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in iter(lambda: stream.read1(65536), b""):
        if sink is not None:
            try:
                sink.write(chunk)
            except OSError as exc:  # a full disk: keep draining the pipe, or the agent and its workers block on it
                print(f"warning: {sink.name}: the log stops here ({exc.strerror})", file=sys.stderr)
                sink = None
        output.feed(decoder.decode(chunk))
    output.feed(decoder.decode(b"", final=True))
    output.close()


class _AgentOutput:
    """What of a torchrun agent's stderr reaches the console: workers' output (progress bars, notes) as it comes; not a
    worker's ``error:`` line (the launcher raises it, once) nor anything after it; not a traceback, a worker's or the
    agent's (the log has them; a crash's message names the failed rank's exception); not the agent's own log lines
    and ChildFailedError report. A line that may become one of those is held until it ends."""

    _HELD = ("error: ", "Traceback (most recent call last):", "[rank")
    # torch prefixes each line of a rank's traceback with "[rankN]:" when several ranks share the stream.
    _PREFIX = re.compile(r"^(\[rank(\d+)\]:\s?)?(.*)$", re.DOTALL)
    # A frame of the agent itself: workers run geoclip.stages, never torch.distributed.run.
    _AGENT_FRAME = re.compile(r'^\s*File ".*torch[/\\]distributed[/\\]run\.py"')
    # Where a traceback begins, also on a line a progress bar left unfinished ("...40%|##[rank1]: Traceback ...").
    _TRACEBACK_START = re.compile(r"(\[rank\d+\]:\s?)?Traceback \(most recent call last\):|\[rank\d")
    # The agent's own log lines ("E1207 21:11:11.345000 29434 torch/distributed/elastic/...] failed ...").
    _AGENT_LOG = re.compile(r"^[EWI]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ .*torch/distributed/")

    def __init__(self, console):
        self.error: str | None = None  # the first worker error, without "error: "
        self._console = console
        self._line, self._shown = "", 0  # the segment being read (up to \n or \r) and how much of it is shown
        self._in_traceback: set[str] = set()  # prefixes ("" or "[rank1]:") whose traceback is being read
        self.exceptions: dict[int | None, str] = {}  # each rank's last traceback's exception line (None: no prefix)
        self._muted = False
        self._report = ""  # the agent's report and log lines: its root cause names the failed rank

    def feed(self, text: str) -> None:
        """Take the next piece of the stream."""
        for piece in re.findall(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+", text):
            self._line += piece
            if piece[-1] in "\r\n":
                line, shown = self._line, self._shown
                self._line, self._shown = "", 0
                self._segment(line, shown)
            elif not self._muted and not self._in_traceback and not self._may_hold(self._line) \
                    and not self._TRACEBACK_START.search(self._line, self._shown):
                self._show(self._line[self._shown:])  # a progress bar: shown as it is drawn
                self._shown = len(self._line)
        self._console.flush()

    def close(self) -> None:
        """The stream ended."""
        if self._line:
            self._segment(self._line, self._shown)
            self._line, self._shown = "", 0
        self._console.flush()

    def cause(self, rc: int) -> str:
        """Why the run failed, from the agent's report (the first failed rank, and the exception it raised), else
        from its exit code ``rc``."""
        root = self._report.partition("Root Cause")[2]
        rank, code = re.search(r"rank\s*:\s*(\d+)", root), re.search(r"exitcode\s*:\s*(-?\d+)", root)
        if not (rank and code):
            return f"torchrun exited with code {rc}"
        rank, code = int(rank[1]), int(code[1])
        if code >= 0:
            raised = self.exceptions.get(rank) or self.exceptions.get(None)
            return f"rank {rank} exited with code {code}" + (f" ({raised})" if raised else "")
        with contextlib.suppress(ValueError):  # killed: what the other ranks raised then is a consequence
            name = signal.Signals(-code).name
            return f"rank {rank} was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
        return f"rank {rank} was killed by signal {-code}"

    def _may_hold(self, line: str) -> bool:
        # An agent log line may arrive in pieces: anything that starts like one ("E1207 ...") waits for its end.
        return any(p.startswith(line[:len(p)]) for p in self._HELD) or bool(re.match(r"[EWI](\d|$)", line))

    def _segment(self, line: str, shown: int) -> None:
        start = None if self._muted else self._TRACEBACK_START.search(line, shown)
        if start and start.start() > 0:  # a traceback right after a progress bar, on the bar's line
            self._show(line[shown:start.start()] + "\n")
            line, shown = line[start.start():], 0
        if self._muted or self._AGENT_LOG.match(line):
            self._report = (self._report + line)[-65536:]
            return
        prefix, rank, body = self._PREFIX.match(line).groups()
        prefix = prefix or ""
        if prefix in self._in_traceback:
            if self._AGENT_FRAME.match(body):  # the agent's own traceback: its report follows, all for the log
                self._mute(line)
            elif body[:1].isspace() or not body.strip() or body.startswith(("Traceback", "The above exception",
                                                                            "During handling")):
                pass  # a frame: in the log only
            else:
                self.exceptions[int(rank) if rank else None] = body.strip()
                self._in_traceback.discard(prefix)
            return
        if shown == 0 and body.startswith("error: "):
            self.error = body[len("error: "):].strip()
            self._mute(line)
        elif shown == 0 and body.rstrip("\r\n") == self._HELD[1]:
            self._in_traceback.add(prefix)
        else:
            self._show(line[shown:])

    def _mute(self, text: str) -> None:
        self._muted, self._report = True, text

    def _show(self, text: str) -> None:
        self._console.write(text)


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
