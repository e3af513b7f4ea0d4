"""Exactly-once scoring: content hashes, atomic claims, stale takeover, crash recovery and racing processes."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import pytest
from factories import write_scene
from scoring_fakes import counting_loader

from geoclip.config import params_from_dict
from geoclip.errors import GeoclipError
from geoclip.scoring.exactly_once import score_scene_once
from geoclip.scoring.ledger import ClaimLostError, Ledger, content_hash, model_key

# A scoring run in its own process (so it can die mid-scene): the fake model, a counter of scoring attempts.
WORKER = r'''
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from scoring_fakes import counting_loader
from geoclip.config import params_from_dict
from geoclip.scoring.exactly_once import score_scene_once

_, tests, counters, out, crash, *scenes = sys.argv
params = params_from_dict({"score": {"batch_size": 64}})
results = [score_scene_once(params, counting_loader(Path(counters), s, crash), s, out, "models:/fake/1", checked=True)
           for s in scenes]
print(json.dumps([r["status"] for r in results]))
'''
PARAMS = params_from_dict({"score": {"batch_size": 64}})


def run_worker(tmp_path: Path, out: str, scenes: list[Path], crash: str = "") -> subprocess.CompletedProcess:
    """Score ``scenes`` in a separate process (crashing on the scene named ``crash``)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.run([sys.executable, str(script), str(Path(__file__).parents[1]), str(tmp_path / "counts"), out,
                           crash, *map(str, scenes)], check=False, capture_output=True, text=True, timeout=300)


def score_here(tmp_path: Path, out: str, scenes: list[Path]) -> list[str]:
    """Score ``scenes`` in this process; return their statuses."""
    return [score_scene_once(PARAMS, counting_loader(tmp_path / "counts", str(s)), str(s), out, "models:/fake/1",
                             checked=True)["status"] for s in scenes]


def attempts(tmp_path: Path) -> dict[str, int]:
    """Scoring attempts per scene, from the workers' counter files."""
    return {p.stem: len(p.read_text().split()) for p in sorted((tmp_path / "counts").glob("*.count"))}


def make_scenes(folder: Path, n: int) -> list[Path]:
    """``n`` small georeferenced scenes."""
    paths = [folder / f"scene_{k}.tif" for k in range(n)]
    for p in paths:
        write_scene(p, h=128, w=160)
    return paths


@pytest.fixture(params=["local", "s3"])
def out_uri(request, tmp_path):
    """An output location: a local folder, or a fresh bucket prefix on the moto server."""
    if request.param == "local":
        return str(tmp_path / "scores")
    request.getfixturevalue("s3_server")
    bucket = f"ledger-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/scores"


def visible_outputs(out: str) -> set[str]:
    """Output names a reader sees (hidden staging folders and the manifest excluded)."""
    if out.startswith("s3://"):
        bucket, _, prefix = out[5:].partition("/")
        objs = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
        names = [o["Key"][len(prefix) + 1:] for o in objs]
    else:
        names = [p.name for p in Path(out).iterdir()] if Path(out).is_dir() else []
    return {n for n in names if not n.startswith(("_manifest", "."))}


# ---- keys ----

def test_local_content_hash_is_the_sha256_of_the_bytes(tmp_path):
    path = tmp_path / "a.tif"
    path.write_bytes(b"x" * 10_000_000)
    assert content_hash(str(path)) == "sha256:" + hashlib.sha256(b"x" * 10_000_000).hexdigest()
    path.write_bytes(b"x" * 9_999_999 + b"y")  # same size, one byte changed
    assert content_hash(str(path)) != "sha256:" + hashlib.sha256(b"x" * 10_000_000).hexdigest()
    with pytest.raises(GeoclipError, match="missing.tif: cannot be read"):
        content_hash(str(tmp_path / "missing.tif"))


def test_s3_content_hash_follows_the_object(s3_server):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="hash-bucket")
    s3.put_object(Bucket="hash-bucket", Key="scenes/a.tif", Body=b"one")
    first = content_hash("s3://hash-bucket/scenes/a.tif")
    assert first.startswith("s3etag:") and first.endswith(":3")
    assert content_hash("s3://hash-bucket/scenes/a.tif") == first  # stable
    s3.put_object(Bucket="hash-bucket", Key="scenes/a.tif", Body=b"two")
    assert content_hash("s3://hash-bucket/scenes/a.tif") != first
    with pytest.raises(GeoclipError, match="s3://hash-bucket/scenes/b.tif: no such object"):
        content_hash("s3://hash-bucket/scenes/b.tif")


def test_model_key_names_registered_versions():
    assert model_key("models:/geoclip/12") == "geoclip-v12"
    assert model_key("runs:/abc/model").startswith("uri_") and model_key("/a/b") != model_key("/a/c")


# ---- claims ----

def test_only_one_of_many_racing_claims_wins(out_uri):
    ledgers = [Ledger(out_uri) for _ in range(8)]
    for round_ in range(10):  # several rounds: a race window is not always hit
        scene = f"scene_{round_}"
        barrier = threading.Barrier(len(ledgers))
        won = []

        def go(ledger, scene=scene, barrier=barrier, won=won):
            barrier.wait()
            if (claim := ledger.acquire(scene)) is not None:
                won.append(claim)

        threads = [threading.Thread(target=go, args=(lg,)) for lg in ledgers]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(won) == 1, [c.name for c in won]
        assert Ledger(out_uri).acquire(scene) is None  # held: busy for everyone else
        ledgers[0].release(won[0])
        again = Ledger(out_uri).acquire(scene)
        assert again is not None
        Ledger(out_uri).release(again)


def test_a_claim_another_thread_here_is_still_making_is_not_an_orphan(tmp_path):
    mine, other = Ledger(tmp_path), Ledger(tmp_path)
    created, proceed = threading.Event(), threading.Event()
    create = mine.store.create

    def slow_create(name, obj):  # the claim exists, but acquire() has not returned yet
        made = create(name, obj)
        created.set()
        proceed.wait(30)
        return made

    mine.store.create = slow_create
    got = {}
    thread = threading.Thread(target=lambda: got.update(mine=mine.acquire("scene_0")))
    thread.start()
    assert created.wait(30)
    got["other"] = other.acquire("scene_0")  # same process, same PID: must see a live claim, not an orphan
    proceed.set()
    thread.join()
    assert got["other"] is None and got["mine"] is not None
    mine.release(got["mine"])


def _claim_from_elsewhere(ledger: Ledger, scene: str, age_s: float, timeout_s: float) -> None:
    """Plant a claim of a run on another host, last renewed ``age_s`` ago."""
    then = time.time() - age_s
    ledger.store.create(f"{scene}/claim-00000000.json", {
        "host": "other-host", "pid": 1, "pidns": "x", "token": "theirs", "created": then, "renewed": then,
        "timeout_s": timeout_s})


def test_stale_claim_is_taken_over_by_exactly_one_run(out_uri):
    ledger = Ledger(out_uri)
    _claim_from_elsewhere(ledger, "fresh", age_s=1, timeout_s=3600)
    assert ledger.acquire("fresh") is None  # alive somewhere else
    _claim_from_elsewhere(ledger, "stale", age_s=7200, timeout_s=3600)
    ledgers = [Ledger(out_uri) for _ in range(6)]
    barrier = threading.Barrier(len(ledgers))
    won = []

    def go(lg):
        barrier.wait()
        if (claim := lg.acquire("stale")) is not None:
            won.append(claim)

    threads = [threading.Thread(target=go, args=(lg,)) for lg in ledgers]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(won) == 1 and won[0].name == "stale/claim-00000001.json"
    assert [n for _, n in ledger._claims("stale")] == ["stale/claim-00000001.json"]  # the stale one is gone
    ledger.release(won[0])


def test_a_live_claim_is_renewed_and_never_looks_stale(tmp_path):
    holder = Ledger(tmp_path, claim_timeout_s=2)
    other = Ledger(tmp_path, claim_timeout_s=2)
    other.me = other.me | {"host": "another-host"}  # judge by the clock only, as a run elsewhere would
    claim = holder.acquire("scene_0")
    deadline = time.monotonic() + 30
    while holder.store.read(claim.name)["renewed"] == claim.body["renewed"]:  # wait for one heartbeat
        assert time.monotonic() < deadline, "the claim was never renewed"
        time.sleep(0.05)
    assert other.acquire("scene_0") is None
    holder.release(claim)
    assert not (tmp_path / "_manifest" / "scene_0" / "claim-00000000.json").exists()
    assert claim.thread is not None and not claim.thread.is_alive()


def test_the_claim_of_a_dead_process_is_taken_over_at_once(tmp_path):
    code = ("import os, sys; from geoclip.scoring.ledger import Ledger; "
            "assert Ledger(sys.argv[1]).acquire('scene_0') is not None; os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    assert (tmp_path / "_manifest" / "scene_0" / "claim-00000000.json").exists()  # left behind
    claim = Ledger(tmp_path, claim_timeout_s=3600).acquire("scene_0")  # same host, its PID is gone: stale now
    assert claim is not None and claim.name.endswith("claim-00000001.json")
    Ledger(tmp_path).release(claim)


# ---- run_once ----

def test_rerun_skips_done_and_rescores_new_content_or_model(tmp_path):
    scene = tmp_path / "scene_0.tif"
    scene.write_bytes(b"first")
    ledger = Ledger(tmp_path / "out")
    calls = []

    def work(publishing):
        calls.append(1)
        return {"scene": str(scene), "value": len(calls)}

    assert ledger.run_once(str(scene), "models:/m/1", work) == {"scene": str(scene), "value": 1, "status": "scored"}
    assert ledger.run_once(str(scene), "models:/m/1", work) == {"scene": str(scene), "value": 1, "status": "skipped"}
    scene.write_bytes(b"second")  # new content under the same name
    assert ledger.run_once(str(scene), "models:/m/1", work)["status"] == "scored"
    assert ledger.run_once(str(scene), "models:/m/2", work)["status"] == "scored"  # new model
    (rec,) = ledger.records()  # the outputs now belong to model 2 only
    assert (rec["model_uri"], rec["summary"]["value"], len(calls)) == ("models:/m/2", 3, 3)
    assert ledger.run_once(str(scene), "models:/m/1", work)["status"] == "scored"  # rollback rescores
    assert not list((tmp_path / "out" / "_manifest" / "scene_0").glob("claim-*"))


def test_failed_work_releases_the_claim_and_records_nothing(tmp_path):
    scene = tmp_path / "scene_0.tif"
    scene.write_bytes(b"x")
    ledger = Ledger(tmp_path / "out")

    def boom(publishing):
        raise GeoclipError("model output: bad shape")

    with pytest.raises(GeoclipError, match="bad shape"):
        ledger.run_once(str(scene), "models:/m/1", boom)
    assert ledger.records() == [] and not list((tmp_path / "out" / "_manifest").rglob("claim-*"))


def test_a_run_whose_claim_was_taken_over_does_not_record_it_done(tmp_path):
    scene = tmp_path / "scene_0.tif"
    scene.write_bytes(b"x")
    ledger = Ledger(tmp_path / "out")
    chash = content_hash(str(scene))

    def slow_work(publishing):  # meanwhile our claim was judged stale and another run scored the scene and recorded it
        then = time.time()
        ledger.store.create("scene_0/claim-00000001.json", {"host": "other-host", "pid": 1, "pidns": "x",
                                                            "token": "theirs", "created": then, "renewed": then,
                                                            "timeout_s": 3600})
        ledger.store.put(ledger.done_name("scene_0", chash, "models:/m/1"), {
            "content_hash": chash, "model_uri": "models:/m/1", "name": "scene_0", "summary": {"by": "them"}})
        return {"by": "us"}

    assert ledger.run_once(str(scene), "models:/m/1", slow_work) == {"by": "them", "status": "skipped"}
    assert [r["summary"] for r in ledger.records()] == [{"by": "them"}]  # no second record, not overwritten
    assert [n for _, n in ledger._claims("scene_0")] == ["scene_0/claim-00000001.json"]  # theirs left alone


def test_busy_scene_is_reported_without_waiting(tmp_path):
    scene = tmp_path / "scene_0.tif"
    scene.write_bytes(b"x")
    ledger = Ledger(tmp_path / "out")
    _claim_from_elsewhere(ledger, "scene_0", age_s=0, timeout_s=3600)
    assert ledger.run_once(str(scene), "models:/m/1", dict, wait=False) == {"scene": str(scene), "status": "busy"}


# ---- whole scenes, several processes ----

def test_racing_runs_score_each_scene_exactly_once(tmp_path, out_uri):
    scenes = make_scenes(tmp_path / "scenes", 4)
    statuses: list[list[str]] = []
    barrier = threading.Barrier(2)

    def run(order):
        barrier.wait()
        statuses.append(score_here(tmp_path, out_uri, order))

    runs = [threading.Thread(target=run, args=(order,)) for order in (scenes, scenes[::-1])]  # meet in the middle
    [t.start() for t in runs]
    [t.join() for t in runs]
    assert len(statuses) == 2  # both runs finished
    assert attempts(tmp_path) == {f"scene_{k}": 1 for k in range(4)}  # nobody scored a scene twice
    assert sum(s == "scored" for run in statuses for s in run) == 4  # the other run waited for the rest
    assert all(set(run) <= {"scored", "skipped"} for run in statuses)
    assert sorted(r["name"] for r in Ledger(out_uri).records()) == [f"scene_{k}" for k in range(4)]
    assert visible_outputs(out_uri) == {f"scene_{k}_{kind}" for k in range(4)
                                        for kind in ("classmap.tif", "quicklook.png", "summary.json")}


def test_crash_mid_scene_leaves_nothing_visible_and_the_rerun_completes_it(tmp_path, out_uri):
    scenes = make_scenes(tmp_path / "scenes", 2)
    crashed = run_worker(tmp_path, out_uri, scenes, crash="scene_1")
    assert crashed.returncode == 3, crashed.stderr
    assert visible_outputs(out_uri) == {f"scene_0_{k}" for k in ("classmap.tif", "quicklook.png", "summary.json")}
    assert [r["name"] for r in Ledger(out_uri).records()] == ["scene_0"]

    # The default claim timeout (an hour): the dead run's claim is stale at once because its process is gone.
    assert score_here(tmp_path, out_uri, scenes) == ["skipped", "scored"]
    assert attempts(tmp_path) == {"scene_0": 1, "scene_1": 2}  # the crashed attempt and the completing one
    assert sorted(r["name"] for r in Ledger(out_uri).records()) == ["scene_0", "scene_1"]
    assert visible_outputs(out_uri) == {f"scene_{n}_{k}" for n in (0, 1)
                                        for k in ("classmap.tif", "quicklook.png", "summary.json")}
    if not out_uri.startswith("s3://"):
        assert not [p for p in Path(out_uri).iterdir() if ".staging-" in p.name]  # the crash's leftovers cleaned


def test_a_loaded_models_copy_of_geoclip_does_not_stay_on_sys_path(tmp_path):
    from geoclip.scoring.exactly_once import load_model_keeping_sys_path

    copy = tmp_path / "model" / "code"
    (copy / "geoclip").mkdir(parents=True)
    (copy / "geoclip" / "__init__.py").write_text("")

    def load():  # what mlflow.pyfunc.load_model does with a model's code_paths
        sys.path.insert(0, str(copy))
        return "model"

    before = list(sys.path)
    assert load_model_keeping_sys_path(load) == "model"
    assert str(copy) not in sys.path and set(sys.path) <= set(before)


# ---- fencing and crash states ----

PAUSABLE = r'''
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from scoring_fakes import FakeModel
from geoclip.config import params_from_dict
from geoclip.scoring.exactly_once import score_scene_once

_, tests, ready, out, scene, model_uri, timeout = sys.argv


class Slow(FakeModel):
    def predict(self, x, params=None):
        Path(ready).touch()  # the claim is held and scoring has begun: the test may pause this process now
        time.sleep(1.0)
        return super().predict(x, params)


params = params_from_dict({"score": {"batch_size": 64, "claim_timeout_s": int(timeout)}})
print(json.dumps(score_scene_once(params, lambda: Slow(scene), scene, out, model_uri, checked=True)["status"]))
'''


def published_model(out: str, stem: str) -> str:
    """The model the scene's published summary names."""
    if out.startswith("s3://"):
        bucket, _, prefix = out[5:].partition("/")
        body = boto3.client("s3").get_object(Bucket=bucket, Key=f"{prefix}/{stem}_summary.json")["Body"].read()
        return json.loads(body)["model_uri"]
    return json.loads((Path(out) / f"{stem}_summary.json").read_text())["model_uri"]


def pause_outside_the_scene_lock(proc: subprocess.Popen, out: str) -> None:
    """SIGSTOP ``proc``, but not in the milliseconds its heartbeat holds the scene's lock (local ledgers): a process
    stopped inside that lock rightly blocks every takeover until it wakes, which is not the case under test."""
    lock = Path(out) / "_manifest" / "scene_0" / ".lock"
    while True:
        os.kill(proc.pid, signal.SIGSTOP)
        if out.startswith("s3://") or not lock.exists():
            return
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: the stopped process does not hold it
            fcntl.flock(fd, fcntl.LOCK_UN)
            return
        except BlockingIOError:
            os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.05)
        finally:
            os.close(fd)


def test_a_paused_run_whose_claim_was_taken_over_publishes_nothing(tmp_path, out_uri):
    (scene,) = make_scenes(tmp_path / "scenes", 1)
    script, ready = tmp_path / "pausable.py", tmp_path / "ready"
    script.write_text(PAUSABLE)
    paused = subprocess.Popen([sys.executable, str(script), str(Path(__file__).parents[1]), str(ready), out_uri,
                               str(scene), "models:/fake/1", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():  # wait until it holds the claim and is scoring
            assert paused.poll() is None and time.monotonic() < deadline, paused.communicate()
            time.sleep(0.02)
        pause_outside_the_scene_lock(paused, out_uri)  # a GC pause, a suspended VM: no heartbeat, no progress
        time.sleep(3)  # longer than score.claim_timeout_s = 2
        newer = params_from_dict({"score": {"batch_size": 64, "claim_timeout_s": 2}})
        from scoring_fakes import FakeModel

        result = score_scene_once(newer, lambda: FakeModel(str(scene)), str(scene), out_uri, "models:/fake/2",
                                  checked=True)
        assert result["status"] == "scored" and published_model(out_uri, "scene_0") == "models:/fake/2"
    finally:
        if paused.poll() is None:
            os.kill(paused.pid, signal.SIGCONT)
    stdout, stderr = paused.communicate(timeout=300)
    assert paused.returncode == 0, stderr
    # It woke with its claim taken over: it published nothing then, started again and scored under a new claim.
    assert "nothing published" in stderr
    # Whatever happened in between, the ledger and the outputs agree: one done record, for the published model.
    (rec,) = Ledger(out_uri).records()
    assert rec["model_uri"] == published_model(out_uri, "scene_0") == "models:/fake/1"


def test_a_renewal_never_brings_back_a_claim_that_was_taken_over(tmp_path):
    holder = Ledger(tmp_path, claim_timeout_s=1)
    claim = holder.acquire("scene_0")
    claim.stop.set()  # the holder is paused: its heartbeat stops...
    claim.thread.join()
    claim.stop.clear()
    time.sleep(1.2)  # ...for longer than the timeout
    taker = Ledger(tmp_path, claim_timeout_s=1)
    taker.me = taker.me | {"host": "another-host"}  # judges by the clock, as a run elsewhere would
    taken = taker.acquire("scene_0")
    assert taken is not None and taken.name.endswith("claim-00000001.json")
    taker.release(taken)  # the newer run is done: no claim left at all
    claim.progress()  # the holder wakes up, its work goes on...
    claim.thread = threading.Thread(target=holder._heartbeat, args=(claim,), daemon=True)
    claim.thread.start()  # ...and its heartbeat beats again
    claim.thread.join(timeout=10)
    assert not claim.thread.is_alive() and claim.lost.is_set()  # it found out, and stopped renewing
    assert not list((tmp_path / "_manifest" / "scene_0").glob("claim-*"))  # nothing came back to life
    assert not holder.holds(claim)
    with pytest.raises(ClaimLostError, match="taken over"):
        with holder.publishing(claim):
            pass
    holder.release(claim)


def test_an_unreadable_claim_blocks_a_scene_only_until_its_timeout(tmp_path):
    ledger = Ledger(tmp_path, claim_timeout_s=60)
    path = tmp_path / "_manifest" / "scene_0" / "claim-00000000.json"
    path.parent.mkdir(parents=True)
    path.write_text("")  # what a power cut can leave
    assert ledger.acquire("scene_0") is None  # fresh: perhaps being written
    os.utime(path, (time.time() - 120, time.time() - 120))
    claim = ledger.acquire("scene_0")
    assert claim is not None and claim.name.endswith("claim-00000001.json")
    ledger.release(claim)


def test_a_reused_pid_on_this_host_does_not_keep_a_dead_runs_claim_alive(tmp_path):
    ledger = Ledger(tmp_path, claim_timeout_s=3600)
    now = time.time()
    # The claim's process died and its PID now belongs to another process (here: our parent), as happens after a
    # restart or in a container sharing the host name and PID numbers.
    ledger.store.create("scene_0/claim-00000000.json", ledger.me | {
        "pid": os.getppid(), "started": "1", "token": "dead", "created": now, "renewed": now, "timeout_s": 3600})
    claim = ledger.acquire("scene_0")
    assert claim is not None and claim.name.endswith("claim-00000001.json")
    ledger.release(claim)


def test_claim_files_are_written_durably(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    ledger = Ledger(tmp_path)
    claim = ledger.acquire("scene_0")
    assert len(synced) >= 2  # the claim's bytes, then its directory entry
    ledger.release(claim)


def test_a_stuck_run_stops_renewing_and_its_claim_goes_stale(tmp_path):
    holder = Ledger(tmp_path, claim_timeout_s=1)
    claim = holder.acquire("scene_0")  # the work never reports progress (a read hung), but the process lives
    other = Ledger(tmp_path, claim_timeout_s=1)
    other.me = other.me | {"host": "another-host"}
    deadline = time.monotonic() + 15
    while (taken := other.acquire("scene_0")) is None:
        assert time.monotonic() < deadline, "a run that made no progress kept its claim alive"
        time.sleep(0.1)
    assert taken.name.endswith("claim-00000001.json")
    other.release(taken)
    holder.release(claim)


def test_a_progressing_run_keeps_its_claim(tmp_path):
    # 2 s, not 1: a loaded full run once left the heartbeat thread (a beat every timeout/4) unrun for a whole second.
    holder = Ledger(tmp_path, claim_timeout_s=2)
    claim = holder.acquire("scene_0")
    other = Ledger(tmp_path, claim_timeout_s=2)
    other.me = other.me | {"host": "another-host"}
    for _ in range(45):  # 4.5 s, well past the timeout, reporting progress all along
        claim.progress()
        time.sleep(0.1)
        assert other.acquire("scene_0") is None
    holder.release(claim)


def test_waiting_for_another_runs_scene_has_a_deadline(tmp_path):
    scene = tmp_path / "scene_0.tif"
    scene.write_bytes(b"x")
    ledger = Ledger(tmp_path / "out", poll_s=0.1, wait_timeout_s=1)
    _claim_from_elsewhere(ledger, "scene_0", age_s=0, timeout_s=3600)  # alive, somewhere else, for an hour
    outcome: dict = {}

    def wait() -> None:
        try:
            ledger.run_once(str(scene), "models:/m/1", dict)
        except GeoclipError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "waited for the other run without a deadline"
    assert "still being scored by another run" in outcome["error"] and "wait_timeout_s" in outcome["error"]


def test_gdal_s3_cache_is_cleared_in_every_loaded_libgdal(monkeypatch):
    """Wheels bundle their own libgdal (rasterio's, pyogrio's): the copy rasterio reads through must be cleared even
    when another is mapped first, or a retry after an S3 outage keeps reading the cached failure. ctypes.CDLL is
    wrapped only to record which libraries were called; the real clear runs."""
    import ctypes

    import pyogrio.raw  # noqa: F401 - maps pyogrio's own libgdal into this process, as a geopandas user's would
    import rasterio  # noqa: F401

    from geoclip.scoring.exactly_once import _forget_gdal_s3_cache

    called, real = [], ctypes.CDLL
    monkeypatch.setattr(ctypes, "CDLL", lambda name, *a, **k: called.append(name) or real(name, *a, **k))
    _forget_gdal_s3_cache("s3://bucket/scenes/scene_0.tif", "/local/truth.tif")
    assert any("rasterio" in name for name in called) and any("pyogrio" in name for name in called)
