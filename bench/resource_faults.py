"""Fault injection for resources: scoring onto a volume that fills up at random, and a training rank that dies at a
random step. Nothing may be lost or duplicated, and every error the user sees must be one line.

**Full volume** (``--runs``): a small tmpfs (mounting needs root; without it this part says so and is skipped) holds
the scoring outputs and the ledger. Each run is what ``geoclip score`` does (the exactly-once step of every scene in
turn, a GeoclipError printed as one ``error:`` line, exit 2) in a process of its own, new scenes arriving before
each run, while another writer on the volume fills it at a random moment (in most runs), leaving a random few hundred
kB. After a failed run the space is freed, as a user would, and the next run goes on; a last run has no faults. At the
end every scene must be recorded done exactly once, its class map byte-identical to a run on a roomy disk, and the
volume must hold no staging folder, temp file or claim.

**Dead rank** (``--kills``): a 2-rank torchrun training (gloo, CPU) on tiny synthetic data; a rank is SIGKILLed at a
random moment; ``geoclip train --resume`` is run again until the training completes. Each failure must be one
``error:`` line naming the log file; the finished history must hold every epoch once; the checkpoint must load; the
weights must equal those of the same training never interrupted.

``python bench/resource_faults.py --runs 30 --kills 3 --seed 0``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # geoclip from this checkout, installed or not

from faults import write_scenes  # bench/ is this script's folder, first on sys.path

# One `geoclip score` run over the scenes with a light stand-in model (the full model is not what is under test).
SCORER = r"""
import json, sys
import numpy as np
from geoclip.bands import ALL_BAND_NAMES, EUROSAT_CLASSES
from geoclip.config import params_from_dict
from geoclip.errors import GeoclipError
from geoclip.scoring import ledger as ledger_module
from geoclip.scoring.exactly_once import score_scene_once

events, out, *scenes = sys.argv[1:]


class Model:
    metadata = type("M", (), {"metadata": {"class_names": list(EUROSAT_CLASSES),
                                            "input_band_names": list(ALL_BAND_NAMES)}})()

    def predict(self, x, params=None):
        probs = np.full((len(x), len(EUROSAT_CLASSES)), 1e-3)
        probs[np.arange(len(x)), (x[:, 0, 0, 0] // 300).astype(int) % len(EUROSAT_CLASSES)] = 1.0
        return {"probabilities": probs / probs.sum(axis=1, keepdims=True)}


put = ledger_module._LocalStore.put


def put_logged(self, name, obj):  # every done record written: a second one for the same scene is a duplicate
    put(self, name, obj)
    if "/done-" in name:
        with open(events, "a") as f:
            f.write(json.dumps({"name": obj["name"], "content": obj["content_hash"]}) + "\n")


ledger_module._LocalStore.put = put_logged
params = params_from_dict({"score": {"batch_size": 64, "probabilities": True}})
try:
    for scene in scenes:
        score_scene_once(params, Model, scene, out, "models:/fake/1", checked=True)
except GeoclipError as exc:  # what geoclip.cli.main does
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def score_run(out: Path, scenes: list[Path], events: Path) -> subprocess.CompletedProcess:
    """One scoring run in a process of its own."""
    return subprocess.run([sys.executable, "-c", SCORER, str(events), str(out), *map(str, scenes)],
                          capture_output=True, text=True, check=False)


def one_line(stderr: str) -> bool:
    """True when the run's error reached the user as exactly one ``error:`` line and no traceback."""
    return "Traceback" not in stderr and sum(ln.startswith("error:") for ln in stderr.splitlines()) == 1


def mount_tmpfs(where: Path, mb: int) -> bool:
    """Mount a tmpfs of ``mb`` MB at ``where``; False where that is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(where)],
                          capture_output=True, check=False).returncode == 0


def full_volume(args, rng: random.Random, tmp: Path) -> dict:
    """Score onto a volume that fills up at random while new scenes keep arriving; check what is left."""
    vol = tmp / "vol"
    if not mount_tmpfs(vol, args.volume_mb):
        return {"skipped": "mounting a tmpfs needs root (run as root, e.g. in CI's container)"}
    try:
        total = args.scenes + args.new_per_run * args.runs
        every = write_scenes(tmp / "scenes", [rng.choice([256, 320, 384]) for _ in range(total)])
        reference, events = tmp / "reference", tmp / "events.jsonl"
        done = score_run(reference, every, tmp / "reference-events.jsonl")
        if done.returncode:
            raise SystemExit(f"the reference run failed: {done.stderr[-2000:]}")
        out, filler = vol / "scores", vol / ".other-writer"
        outcomes, messy = Counter(), []
        for run in range(args.runs + 1):  # the last run has no faults: it must finish what is left
            scenes = every[:args.scenes + args.new_per_run * run]  # new acquisitions arrive with every run
            stop = threading.Event()

            def fill(delay: float = rng.uniform(0.0, args.fill_within), leave: int = rng.randrange(0, 600_000),
                     fills: bool = run < args.runs and rng.random() < args.fill_share,
                     stop: threading.Event = stop) -> None:
                if not fills or stop.wait(delay):
                    return
                room = shutil.disk_usage(vol).free - leave
                if room > 0:
                    with contextlib.suppress(OSError), open(filler, "wb") as f:  # another program takes the space
                        f.write(b"\0" * room)  # (and may itself meet a full volume: the scorer wrote meanwhile)

            other = threading.Thread(target=fill)
            other.start()
            result = score_run(out, scenes, events)
            stop.set()
            other.join()
            filler.unlink(missing_ok=True)  # the user frees space before running again
            if result.returncode == 0:
                outcomes["completed"] += 1
                continue
            kind = ("refused_before_writing" if "too little for" in result.stderr else
                    "volume_filled_while_writing" if "no space left" in result.stderr else "other_error")
            outcomes[kind] += 1
            if not one_line(result.stderr):
                messy.append(result.stderr[-3000:])
        writes = Counter(json.loads(line)["name"] for line in events.read_text().splitlines()) if events.exists() \
            else Counter()
        same = sum((out / f"{s.stem}_classmap.tif").is_file() and (out / f"{s.stem}_classmap.tif").read_bytes()
                   == (reference / f"{s.stem}_classmap.tif").read_bytes() for s in every)
        leftovers = [str(p.relative_to(vol)) for p in vol.rglob("*") if ".staging-" in p.name or p.name.endswith(
            ".tmp") or p.name.startswith("claim-")]
        failed = args.runs + 1 - outcomes["completed"]
        return {"scenes": total, "volume_mb": args.volume_mb, "runs": args.runs + 1, "outcomes": dict(outcomes),
                "last_run_completed": result.returncode == 0, "errors_one_line": failed - len(messy),
                "errors_not_one_line": len(messy), "scenes_done": len(writes),
                "duplicates": sum(n - 1 for n in writes.values() if n > 1), "lost_or_different": total - same,
                "leftovers": leftovers, "messy_examples": messy[:2]}
    finally:
        subprocess.run(["umount", "-l", str(vol)], check=False)


def dead_rank(args, rng: random.Random, tmp: Path) -> dict:
    """Kill a training rank at random moments and resume until the training completes; check the result."""
    import yaml

    from geoclip.training.checkpoint import CHECKPOINT_FILE

    root = tmp / "train"
    params = {"classes": {"names": ["Forest", "River", "SeaLake"]},
              "paths": {k: str(root / v) for k, v in {"raw": "data/raw", "synthetic": "data/synthetic",
                                                      "prepared": "data/prepared", "reports": "reports",
                                                      "model": "models", "eval": "eval"}.items()},
              "synth": {"tiles_per_class": 24, "n_scenes": 0},
              "train": {"image_encoder": "resnet10t", "pretrained": "", "embed_dim": 32, "epochs": args.epochs,
                        "batch_size": 16, "nproc_per_node": 2, "num_threads": 1},
              "mlflow": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "artifact_location": str(root / "mlartifacts"),
                         "experiment": "resource-faults"}}
    root.mkdir(parents=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    geoclip = [sys.executable, "-m", "geoclip.cli", "--params", str(path)]
    for stage in ("ingest", "validate", "prepare"):
        subprocess.run([*geoclip, stage], check=True, capture_output=True, cwd=root)
    kills, errors, messy, attempts = 0, [], [], 0
    while attempts < args.kills + 5:
        attempts += 1
        resume = (root / "models" / CHECKPOINT_FILE).exists()
        proc = subprocess.Popen([*geoclip, "train", *(["--resume"] if resume else [])], cwd=root,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        killed = False
        if kills < args.kills:
            ranks = []
            while not ranks and proc.poll() is None:  # the ranks start a few seconds after torchrun
                time.sleep(0.2)
                ranks = _ranks(proc.pid)
            time.sleep(rng.uniform(0.5, args.kill_within))  # somewhere in the run: loading, an epoch, a checkpoint
            if ranks and proc.poll() is None:
                try:
                    os.kill(rng.choice(ranks), signal.SIGKILL)
                    kills, killed = kills + 1, True
                except ProcessLookupError:  # that rank had just finished
                    pass
        _, err = proc.communicate()
        if proc.returncode == 0 and not killed:
            break
        if proc.returncode:
            errors.append(err.strip().splitlines()[-1] if err.strip() else "")
            if not one_line(err) or "log" not in errors[-1]:
                messy.append(err[-3000:])
    history = json.loads((root / "models" / "history.json").read_text()) if (root / "models" / "history.json").exists() \
        else []
    epochs = [h.get("epoch") for h in history] if isinstance(history, list) else []
    import torch

    loads = False
    try:
        torch.load(root / "models" / CHECKPOINT_FILE, weights_only=True)
        loads = True
    except Exception:  # noqa: BLE001 - any failure to load is what is counted
        loads = False
    # The same training, never interrupted: the killed and resumed one must end at the same weights.
    params["paths"]["model"] = str(root / "models-uninterrupted")
    path.write_text(yaml.safe_dump(params))
    subprocess.run([*geoclip, "train"], check=True, capture_output=True, cwd=root)
    same = False
    if (root / "models" / "model.pt").is_file():
        ours = torch.load(root / "models" / "model.pt", weights_only=True)
        theirs = torch.load(root / "models-uninterrupted" / "model.pt", weights_only=True)
        same = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    return {"kills": kills, "attempts": attempts, "errors_one_line": len(errors) - len(messy),
            "errors_not_one_line": len(messy), "error_lines": errors,
            "completed": (root / "models" / "model.pt").is_file(), "epochs_in_history": epochs,
            "duplicated_epochs": len(epochs) - len(set(epochs)), "checkpoint_loads": loads,
            "weights_equal_uninterrupted": same, "messy_examples": messy[:2]}


def _ranks(agent: int) -> list[int]:
    """PIDs of the training ranks under a ``geoclip train`` process."""
    import psutil

    try:
        children = psutil.Process(agent).children(recursive=True)
    except psutil.Error:
        return []
    return [c.pid for c in children if "geoclip.stages" in " ".join(c.cmdline()) and "torch.distributed.run"
            not in " ".join(c.cmdline())]


def main(argv: list[str] | None = None) -> dict:
    """Run both parts; print and return the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30, help="scoring runs onto the filling volume, then one without "
                    "faults (default 30)")
    ap.add_argument("--scenes", type=int, default=6, help="scenes at the first run (default 6)")
    ap.add_argument("--new-per-run", type=int, default=2, help="new scenes arriving before each run (default 2)")
    ap.add_argument("--volume-mb", type=int, default=256)
    ap.add_argument("--fill-within", type=float, default=6.0, help="the other writer fills the volume within "
                    "this many seconds of a run's start (default 6)")
    ap.add_argument("--fill-share", type=float, default=0.8, help="share of runs during which it does (default 0.8)")
    ap.add_argument("--kills", type=int, default=3, help="training ranks to kill (0: skip that part)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--kill-within", type=float, default=20.0, help="a rank dies within this many seconds of "
                    "the ranks' start (default 20)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="geoclip-resource-faults-") as tmp:
        result = {"full_volume": full_volume(args, rng, Path(tmp)) if args.runs else {"skipped": "--runs 0"},
                  "dead_rank": dead_rank(args, rng, Path(tmp)) if args.kills else {"skipped": "--kills 0"},
                  "seed": args.seed}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
