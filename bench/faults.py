"""Fault injection for exactly-once scoring: workers score the same scenes while they are paused, killed and
restarted and the S3 endpoint goes away and comes back, at random (seeded); then every scene is checked.

Workers are processes running the library's exactly-once step (``geoclip.scoring.exactly_once.score_scene_once``,
what the Prefect flow's scoring task runs) with a light stand-in model, so faults are many and fast; outputs and
the ledger go to S3 (moto) behind a proxy that the injector stops and starts (moto's state survives). Printed:

- scenes scored: scenes whose done record and published outputs exist at the end;
- duplicates: (scene, content, model) recorded done more than once (a second complete scoring after the first);
- lost: scenes recorded done at some point whose done record or outputs are gone at the end;
- unfinished: scenes never recorded done, even after the workers had ``--settle`` seconds without faults;
- stale: scenes whose published summary names another model or claim than the done record.

Goal: zero duplicates, lost, stale and unfinished over at least 200 faults:
``python bench/faults.py --faults 200 --seed 0``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # geoclip from this checkout, installed or not

import boto3
import numpy as np
import rasterio
from rasterio.transform import from_origin

from geoclip.devtools.services import HOST, TCP_PROXY, Server, free_port, running
from geoclip.scoring.ledger import MANIFEST

WORKER = r"""
import json, os, sys, time
from pathlib import Path
import numpy as np
from geoclip.bands import ALL_BAND_NAMES, EUROSAT_CLASSES
from geoclip.config import params_from_dict
from geoclip.scoring import ledger as ledger_module
from geoclip.scoring.exactly_once import score_scene_once

events, out, model_uri, timeout, *scenes = sys.argv[1:]


class Model:
    metadata = type("M", (), {"metadata": {"class_names": list(EUROSAT_CLASSES),
                                            "input_band_names": list(ALL_BAND_NAMES)}})()

    def predict(self, x, params=None):
        time.sleep(0.3)  # slow enough that pauses and kills land mid-scene
        probs = np.full((len(x), len(EUROSAT_CLASSES)), 1e-3)
        probs[:, 0] = 1.0
        return {"probabilities": probs / probs.sum(axis=1, keepdims=True)}


def log(**event):
    with open(events, "a") as f:  # one small append per line: atomic
        f.write(json.dumps(event | {"pid": os.getpid(), "t": time.time()}) + "\n")


put = ledger_module._S3Store.put


def put_logged(self, name, obj):  # every done record written: a second one for the same scene is a duplicate
    put(self, name, obj)
    if "/done-" in name:
        log(kind="done", name=obj["name"], model=obj["model_uri"], content=obj["content_hash"], claim=obj["claim"])


ledger_module._S3Store.put = put_logged
params = params_from_dict({"score": {"batch_size": 64, "claim_timeout_s": int(timeout), "quicklook": False}})
while True:  # score every scene, again and again: a restarted or woken worker finds what is left
    for scene in scenes:
        try:
            score_scene_once(params, Model, scene, out, model_uri, checked=True)
        except Exception as exc:
            log(kind="error", scene=scene, error=f"{type(exc).__name__}: {str(exc)[:200]}")
            time.sleep(0.2)
"""


def write_scenes(folder: Path, sizes: list[int]) -> list[Path]:
    """Small 13-band uint16 scenes with different content, one per entry of ``sizes`` (its side in pixels)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, size in enumerate(sizes):
        data = np.random.default_rng(k).integers(500, 3000, size=(13, size, size), dtype=np.uint16)
        path = folder / f"scene_{k:03d}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=13, dtype="uint16",
                           crs="EPSG:32632", transform=from_origin(500000, 5000000, 10, 10), tiled=True) as dst:
            dst.write(data)
        paths.append(path)
    return paths


def start_worker(args, env: dict, events: Path, out: str, scenes: list[Path]) -> subprocess.Popen:
    """One scoring worker process."""
    return subprocess.Popen([sys.executable, "-c", WORKER, str(events), out, args.model, str(args.claim_timeout),
                             *map(str, scenes)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def inject(args, rng: random.Random, workers: list[subprocess.Popen], proxy: Server, spawn) -> Counter:
    """Pause, kill (and restart) workers and take S3 away, ``args.faults`` times; returns the faults by kind."""
    faults: Counter = Counter()
    paused: dict[int, float] = {}
    s3_back_at = 0.0
    while sum(faults.values()) < args.faults:
        time.sleep(rng.uniform(0.05, args.interval))
        now = time.time()
        for i, until in list(paused.items()):
            if now >= until:
                os.kill(workers[i].pid, signal.SIGCONT)
                del paused[i]
        if s3_back_at and now >= s3_back_at:
            proxy.start()
            s3_back_at = 0.0
        kind = rng.choice(["pause_short", "pause_long", "kill", "s3_outage"])
        i = rng.randrange(len(workers))
        if kind.startswith("pause") and i not in paused:
            os.kill(workers[i].pid, signal.SIGSTOP)
            # long: past the claim timeout, so the claim is taken over while the worker sleeps
            paused[i] = now + (rng.uniform(args.claim_timeout + 0.5, args.claim_timeout * 2) if kind == "pause_long"
                               else rng.uniform(0.1, 1.0))
        elif kind == "kill" and i not in paused:
            workers[i].kill()
            workers[i].wait()
            workers[i] = spawn()
        elif kind == "s3_outage" and not s3_back_at:
            proxy.stop()
            s3_back_at = now + rng.uniform(0.3, 1.5)
        else:
            continue
        faults[kind] += 1
    for i in paused:
        os.kill(workers[i].pid, signal.SIGCONT)
    if s3_back_at:
        proxy.start()
    return faults


def check(bucket: str, prefix: str, scenes: list[Path], events: list[dict]) -> dict:
    """Scenes scored, duplicates, lost and stale outputs, from the bucket and the workers' event log."""
    s3 = boto3.client("s3")
    keys = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
            for o in page.get("Contents", [])}
    done_writes = Counter((e["name"], e["content"], e["model"]) for e in events if e["kind"] == "done")
    ever_done = {name for name, _, _ in done_writes}
    scored = lost = stale = unfinished = 0
    for scene in scenes:
        stem = scene.stem
        records = [k for k in keys if k.startswith(f"{prefix}/{MANIFEST}/{stem}/done-")]
        summary_key = f"{prefix}/{stem}_summary.json"
        if not records or summary_key not in keys or f"{prefix}/{stem}_classmap.tif" not in keys:
            lost += stem in ever_done
            unfinished += stem not in ever_done
            continue
        record = json.loads(s3.get_object(Bucket=bucket, Key=records[0])["Body"].read())
        summary = json.loads(s3.get_object(Bucket=bucket, Key=summary_key)["Body"].read())
        if len(records) > 1 or summary.get("model_uri") != record["model_uri"] or summary != record["summary"]:
            stale += 1
            continue
        scored += 1
    return {"scenes": len(scenes), "scored": scored, "duplicates": sum(n - 1 for n in done_writes.values() if n > 1),
            "lost": lost, "stale": stale, "unfinished": unfinished,
            "worker_errors": sum(e["kind"] == "error" for e in events)}


def main(argv: list[str] | None = None) -> dict:
    """Run the workers under faults, let them finish, check every scene; print and return the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faults", type=int, default=200, help="faults to inject (default 200)")
    ap.add_argument("--scenes", type=int, default=60, help="enough to keep the workers busy while faults come")
    ap.add_argument("--size", type=int, default=96, help="scene width and height in pixels")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--claim-timeout", type=int, default=2, help="score.claim_timeout_s (seconds)")
    ap.add_argument("--interval", type=float, default=2.0, help="largest gap between faults (seconds)")
    ap.add_argument("--settle", type=float, default=900, help="seconds allowed to finish once the faults stop")
    ap.add_argument("--model", default="models:/fake/1")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="geoclip-faults-") as tmp:
        tmp = Path(tmp)
        scenes = write_scenes(tmp / "scenes", [args.size] * args.scenes)
        backend, port = free_port(), free_port()
        creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        moto = Server("moto", [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(backend)],
                      f"http://{HOST}:{backend}/moto-api/data.json", log=tmp / "moto.log")
        proxy = Server("s3-proxy", [sys.executable, "-c", TCP_PROXY, str(port), str(backend)],
                       f"http://{HOST}:{port}/moto-api/data.json", log=tmp / "proxy.log")
        os.environ.update(creds | {"AWS_ENDPOINT_URL": f"http://{HOST}:{port}"})
        env = os.environ | {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "AWS_MAX_ATTEMPTS": "2"}
        with running(moto, proxy, timeout=120):
            boto3.client("s3").create_bucket(Bucket="faults")
            out, events = "s3://faults/scores", tmp / "events.jsonl"
            events.touch()

            def spawn() -> subprocess.Popen:
                return start_worker(args, env, events, out, scenes)

            workers = [spawn() for _ in range(args.workers)]
            started = time.time()
            try:
                faults = inject(args, rng, workers, proxy, spawn)
                injected_s = time.time() - started
                done_under_faults = len({json.loads(line)["name"] for line in events.read_text().splitlines()
                                         if '"kind": "done"' in line})
                deadline = time.time() + args.settle
                while time.time() < deadline:  # no more faults: let the workers finish every scene
                    done = {json.loads(line)["name"] for line in events.read_text().splitlines()
                            if '"kind": "done"' in line}
                    if len(done) >= len(scenes):
                        break
                    time.sleep(1)
                time.sleep(args.claim_timeout + 1)  # a worker still publishing finishes (or is fenced off)
            finally:
                for w in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(w.pid, signal.SIGCONT)
                    w.kill()
                    w.wait()
            result = check("faults", "scores", scenes,
                           [json.loads(line) for line in events.read_text().splitlines() if line])
    result |= {"faults": dict(faults), "faults_total": sum(faults.values()), "seconds_under_faults": round(injected_s),
               "scored_while_faults_ran": done_under_faults,
               "seed": args.seed, "workers": args.workers, "claim_timeout_s": args.claim_timeout}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
