"""Tests for how a torchrun launch fails: a rank's error reaches the user as one line naming the full log; a crash is
one line too, naming the failed rank, its exception and the log, where every traceback and torchrun's ChildFailedError
report go."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from factories import TINY_ENCODER, make_packs, own_tracking_store, tiny_params_dict

from geoclip.config import params_from_dict
from geoclip.errors import GeoclipError
from geoclip.stages import LOGS_KEPT, NodeLostError, _AgentOutput, _pass_through, _run_agent, training_log


@pytest.fixture(autouse=True)
def _own_tracking_store():
    with own_tracking_store():
        yield


def _torchrun(script: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(script)]


@pytest.mark.slow
def test_a_ranks_error_is_one_line_naming_the_log_that_keeps_torchruns_report(tmp_path):
    """`geoclip train --resume` over a damaged checkpoint: the rank's answer, once, and no launcher traceback."""
    make_packs(tmp_path / "prepared", per_class=12)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params_dict(tmp_path, image_encoder=TINY_ENCODER, epochs=1,
                                                      num_threads=1)))
    done = subprocess.run([sys.executable, "-m", "geoclip.cli", "train", "--resume", "--params", str(params)],
                          check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert "checkpoint.pt: not a readable checkpoint" in errors[0] and "delete it to start afresh" in errors[0]
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr
    log = Path(re.search(r"\(full log: (.+)\)$", errors[0])[1])
    assert log.parent == tmp_path / "reports" / "logs" and log.name.startswith("train-")
    text = log.read_text()
    assert "error: " in text and "not a readable checkpoint" in text  # the rank's line, as it printed it
    assert "Traceback" in text and "ChildFailedError" in text and "Root Cause" in text  # torchrun's report


CRASH = '''
import sys
print("epoch 1/2", file=sys.stderr, flush=True)
def step():
    raise RuntimeError("boom in a rank")
step()
'''

KILLED = '''
import os, signal, sys
print("epoch 1/2", file=sys.stderr, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.mark.slow
@pytest.mark.parametrize(("script", "cause"), [(CRASH, "rank 0 exited with code 1 (RuntimeError: boom in a rank)"),
                                               (KILLED, "rank 0 was killed by SIGKILL (out of memory?)")])
def test_a_crashed_rank_is_one_line_naming_its_exception_and_the_log(tmp_path, capsys, script, cause):
    (tmp_path / "rank.py").write_text(script)
    log = tmp_path / "train.log"
    with pytest.raises(NodeLostError) as caught:
        _run_agent(_torchrun(tmp_path / "rank.py"), "training", log)
    assert str(caught.value) == f"training failed: {cause}; details in {log}"
    assert not isinstance(caught.value, GeoclipError)  # worth starting the node again (flows.training.node_lost)
    err = capsys.readouterr().err
    assert err == "epoch 1/2\n"  # the rank's own output; nothing of the failure but the raised line
    text = log.read_text()
    assert text.startswith(f"$ {sys.executable} -m torch.distributed.run") and "ChildFailedError" in text
    if script is CRASH:  # the details: the rank's traceback, in the log
        assert 'rank.py", line 6' in text and "RuntimeError: boom in a rank" in text


@pytest.mark.slow
def test_a_successful_launch_passes_its_output_through_and_logs_it(tmp_path, capsys):
    (tmp_path / "rank.py").write_text('import sys\nfor i in range(3):\n    sys.stderr.write(f"\\rstep {i}")\n'
                                      'sys.stderr.write("\\nerrors: none\\n")\n')
    _run_agent(_torchrun(tmp_path / "rank.py"), "training", tmp_path / "ok.log")
    err = capsys.readouterr().err
    assert "\rstep 0\rstep 1\rstep 2\nerrors: none\n" in err
    assert "\rstep 0\rstep 1\rstep 2\nerrors: none\n" in (tmp_path / "ok.log").read_bytes().decode()  # read_text: \r as \n


def _fed(*chunks: str) -> tuple[_AgentOutput, io.StringIO, list[str]]:
    """An _AgentOutput fed ``chunks``; also what the console held after each chunk."""
    console = io.StringIO()
    out = _AgentOutput(console)
    seen = []
    for chunk in chunks:
        out.feed(chunk)
        seen.append(console.getvalue())
    out.close()
    return out, console, seen


def test_progress_bars_show_as_drawn_and_an_error_line_split_across_reads_is_held():
    out, console, seen = _fed("\r 10%|#", "\r 50%|##", "###\n", "err", "or: packs: not found\n",
                              "W1207 elastic chatter\n", "Traceback (most recent call last):\n")
    assert seen[:3] == ["\r 10%|#", "\r 10%|#\r 50%|##", "\r 10%|#\r 50%|#####\n"]  # no read waits for a line end
    assert out.error == "packs: not found"
    assert console.getvalue() == "\r 10%|#\r 50%|#####\n"  # nothing from the error line on


AGENT_TRACEBACK = '''Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "<frozen runpy>", line 88, in _run_code
  File "/venv/lib/python3.11/site-packages/torch/distributed/run.py", line 1142, in <module>
    main()
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
geoclip.stages FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-07_20:05:14
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -15 (pid: 11) (SIGTERM)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-07_20:05:14
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -9 (pid: 10) (SIGKILL)
  error_file: <N/A>
============================================================
'''


def test_tracebacks_stay_in_the_log_and_the_report_names_the_cause_and_the_ranks_exception():
    worker = ('Traceback (most recent call last):\n  File "<frozen runpy>", line 198, in _run_module_as_main\n'
              '  File "/src/geoclip/stages.py", line 9, in main\n    train()\nValueError: bad\n')
    agent_log = "E1207 21:11:11.345000 29434 torch/distributed/elastic/multiprocessing/api.py:1002] failed\n"
    out, console, _ = _fed("\r 50%|##", "\n", worker[:40], worker[40:], agent_log[:3], agent_log[3:],
                           AGENT_TRACEBACK)
    assert console.getvalue() == "\r 50%|##\n"
    assert out.error is None and out.exceptions == {None: "ValueError: bad"}
    assert out.cause(1) == "rank 0 was killed by SIGKILL (out of memory?)"  # not the other ranks' consequences
    # A rank that raised: its exception, from the traceback torch prefixed with its rank.
    crashed = AGENT_TRACEBACK.replace("exitcode  : -9 (pid: 10) (SIGKILL)", "exitcode  : 1 (pid: 10)")
    ranked = "".join(f"[rank{r}]: {ln}\n" for r in (1, 0) for ln in worker.splitlines())
    out, console, _ = _fed(ranked.replace("ValueError: bad", "RuntimeError: peer gone", 1), "after\n", crashed)
    assert out.cause(1) == "rank 0 exited with code 1 (ValueError: bad)" and console.getvalue() == "after\n"
    # A rank dying mid progress bar: its traceback starts on the bar's unfinished line (seen in the fault bench).
    out, console, _ = _fed("\repoch 3:  40%|####", ranked[:30], ranked[30:])
    assert console.getvalue() == "\repoch 3:  40%|####\n" and out.exceptions[0] == "ValueError: bad"
    # No report (the agent itself was killed): its own exit code.
    assert _fed("Traceback (most recent call last):\n")[0].cause(-9) == "torchrun exited with code -9"


def test_training_logs_go_under_reports_and_only_the_newest_are_kept(tmp_path):
    params = params_from_dict(tiny_params_dict(tmp_path))
    logs = tmp_path / "reports" / "logs"
    logs.mkdir(parents=True)
    old = [logs / f"train-20260101T0000{i:02d}.000Z-1.log" for i in range(LOGS_KEPT + 5)]
    for path in old:
        path.write_text("old")
    (logs / "train-node1-20250101T000000.000Z-1.log").write_text("another launcher's")
    new = training_log(params)
    assert new.parent == logs and re.fullmatch(r"train-\d{8}T\d{6}\.\d{3}Z-\d+\.log", new.name)
    assert sorted(logs.glob("train-2*.log")) == old[-(LOGS_KEPT - 1):]  # with the new one: LOGS_KEPT
    assert (logs / "train-node1-20250101T000000.000Z-1.log").exists()


def test_an_unusable_reports_folder_is_named(tmp_path):
    (tmp_path / "reports").write_text("a file, not a folder")
    with pytest.raises(GeoclipError, match=r"reports/logs: cannot hold the training log .*paths\.reports"):
        training_log(params_from_dict(tiny_params_dict(tmp_path)))


def test_a_full_disk_fails_before_torchrun_starts_and_later_only_ends_the_log(tmp_path, capsys):
    """/dev/full: every write fails with ENOSPC, as on a full disk."""
    log = tmp_path / "train.log"
    log.symlink_to("/dev/full")
    with pytest.raises(GeoclipError, match=r"train\.log: cannot write the training log \(No space left on device\)"):
        _run_agent(["false"], "training", log)
    # A disk filling up mid-run: the pipe is still drained (else the agent and its workers would block on it).
    read, write = os.pipe()
    os.write(write, b"epoch 1/2\nerror: packs: not found\n")
    os.close(write)
    console = io.StringIO()
    output = _AgentOutput(console)
    with open(read, "rb") as stream, open("/dev/full", "wb", buffering=0) as sink:
        _pass_through(stream, sink, output)
    assert console.getvalue() == "epoch 1/2\n" and output.error == "packs: not found"
    assert capsys.readouterr().err == "warning: /dev/full: the log stops here (No space left on device)\n"
