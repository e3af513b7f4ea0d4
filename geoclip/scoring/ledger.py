"""Exactly-once scoring: a manifest of done (scene content, model) pairs and atomic claims, on local disk or S3.

Layout beside the outputs (``{out}`` is a folder or an ``s3://`` prefix)::

    {out}/_manifest/{scene}/claim-{gen:08d}.json         a run holds the scene while it scores it
    {out}/_manifest/{scene}/done-{model}-{hash16}.json   this content was scored with this model

A claim is created only if absent (local: ``os.link`` of a written temp file; S3: ``PutObject`` with
``If-None-Match: *``), so two runs can never both hold a scene. The claim with the highest generation is the
live one; a holder renews it every ``timeout / 4`` seconds, and a claim not renewed for ``timeout`` seconds (or whose
process on this host is gone) is stale: a run takes it over by creating the next generation, again only-if-absent.
The done record is written after every output is in place and before the claim is released, and every holder
re-reads it after claiming, so a scene is scored once per (content, model) however runs interleave.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from geoclip.data import s3
from geoclip.errors import GeoclipError

MANIFEST = "_manifest"
CHUNK = 8 << 20  # bytes per read while hashing a local scene


def content_hash(scene_uri: str, s3_client=None) -> str:
    """A stable content id: ``sha256:<hex>`` of a local file, or ``s3etag:<etag>:<size>`` of an S3 object."""
    if s3.is_s3(scene_uri):
        bucket, key = s3.split_uri(scene_uri)
        with s3._errors(scene_uri, "read the object's ETag", s3.MISSING_OBJECT, "no such object"):
            head = (s3_client or s3.client()).head_object(Bucket=bucket, Key=key)
        return f"s3etag:{head['ETag'].strip(chr(34))}:{head['ContentLength']}"
    digest = hashlib.sha256()
    try:
        with open(scene_uri, "rb") as f:
            while block := f.read(CHUNK):
                digest.update(block)
    except OSError as exc:
        raise GeoclipError(f"{scene_uri}: cannot be read to hash it ({exc.strerror})") from exc
    return f"sha256:{digest.hexdigest()}"


def model_key(model_uri: str) -> str:
    """A file-name-safe id of a model: ``<name>-v<version>`` for ``models:/name/version``, else a hash of the URI."""
    m = re.fullmatch(r"models:/([^/@]+)/(\d+)", model_uri)
    if m:
        return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', m.group(1))}-v{m.group(2)}"
    return "uri_" + hashlib.sha256(model_uri.encode()).hexdigest()[:12]


def scene_name(scene_uri: str) -> str:
    """The name that identifies a scene's outputs (its file stem: outputs are ``{stem}_classmap.tif`` ...)."""
    return Path(str(scene_uri)).stem


# ---- stores: the four operations the ledger needs, on a folder or an S3 prefix ----

class _LocalStore:
    """Manifest objects as files under a local folder."""

    def __init__(self, root: Path):
        self.root = root

    def read(self, name: str) -> dict | None:
        """The JSON object ``name``, or None when absent (or unreadable: treated as absent)."""
        try:
            return json.loads((self.root / name).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def create(self, name: str, obj: dict) -> bool:
        """Create ``name`` only if absent; False when it exists. Written first, then linked: never seen half-written."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(obj, f)
            os.link(tmp, path)  # atomic create-if-absent, like O_CREAT|O_EXCL, also on NFS
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def put(self, name: str, obj: dict) -> None:
        """Write ``name`` (replacing it) atomically."""
        from geoclip.ioutils import write_json

        write_json(self.root / name, obj)

    def delete(self, name: str) -> None:
        """Remove ``name`` if present."""
        (self.root / name).unlink(missing_ok=True)

    def names(self, prefix: str) -> list[str]:
        """Names starting with ``prefix`` (``scene/claim-``) in the prefix's folder."""
        folder, _, start = prefix.rpartition("/")
        try:
            return [f"{folder}/{p.name}" for p in (self.root / folder).iterdir()
                    if p.name.startswith(start) and p.name.endswith(".json")]
        except FileNotFoundError:
            return []


class _S3Store:
    """Manifest objects under an S3 prefix (one boto3 client, shared by threads)."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.bucket, self.prefix = s3.split_uri(self.root)
        self.client = s3.client()

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def read(self, name: str) -> dict | None:
        """The JSON object ``name``, or None when absent."""
        from botocore.exceptions import ClientError

        with s3._errors(s3.join(self.root, name), "read"):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
            except ClientError as exc:
                if s3._client_error_code(exc) in s3.MISSING_OBJECT:
                    return None
                raise
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return None

    def create(self, name: str, obj: dict) -> bool:
        """Create ``name`` only if absent (``If-None-Match: *``, atomic on S3); False when it exists."""
        from botocore.exceptions import ClientError

        with s3._errors(s3.join(self.root, name), "create"):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=json.dumps(obj).encode(),
                                       IfNoneMatch="*", ContentType="application/json")
            except ClientError as exc:
                # 412: it exists; 409: a concurrent conditional write to the same key won
                if s3._client_error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    return False
                raise
        return True

    def put(self, name: str, obj: dict) -> None:
        """Write ``name`` (replacing it); S3 puts are atomic."""
        with s3._errors(s3.join(self.root, name), "write"):
            self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=json.dumps(obj, indent=1).encode(),
                                   ContentType="application/json")

    def delete(self, name: str) -> None:
        """Remove ``name`` (no error when absent)."""
        with s3._errors(s3.join(self.root, name), "delete"):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(name))

    def names(self, prefix: str) -> list[str]:
        """Names starting with ``prefix``."""
        out = []
        with s3._errors(s3.join(self.root, prefix), "list"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                              Prefix=self._key(prefix)):
                out += [o["Key"][len(self._key("")):] for o in page.get("Contents", []) if o["Key"].endswith(".json")]
        return out


# ---- the ledger ----

_ACTIVE: set[str] = set()  # tokens of the claims this process holds now (a claim of ours not in it is an orphan)


def _pid_namespace() -> str:
    """This process's PID namespace (a PID is only meaningful inside it), or '' where /proc does not say."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    """True when a process with this PID exists here."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Claim:
    """A held claim: which scene, which generation, and the heartbeat that keeps it fresh."""

    scene: str
    name: str
    token: str
    body: dict
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class Ledger:
    """The manifest under ``{out}/_manifest``: done records and claims for exactly-once scoring."""

    def __init__(self, out_uri: str | Path, claim_timeout_s: float = 3600.0, poll_s: float | None = None):
        out = str(out_uri)
        self.root = s3.join(out, MANIFEST) if s3.is_s3(out) else str(Path(out) / MANIFEST)
        self.store = _S3Store(self.root) if s3.is_s3(out) else _LocalStore(Path(self.root))
        if claim_timeout_s <= 0:
            raise GeoclipError(f"score.claim_timeout_s: {claim_timeout_s}; expected a number of seconds > 0")
        self.timeout = float(claim_timeout_s)
        self.poll = poll_s if poll_s is not None else min(2.0, self.timeout / 4)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "pidns": _pid_namespace()}

    # -- done records --

    def done_name(self, scene: str, chash: str, model_uri: str) -> str:
        """The done record's name for this scene content and model."""
        return f"{scene}/done-{model_key(model_uri)}-{hashlib.sha256(chash.encode()).hexdigest()[:16]}.json"

    def done(self, scene: str, chash: str, model_uri: str) -> dict | None:
        """The done record of (scene content, model), or None when it has not been scored."""
        rec = self.store.read(self.done_name(scene, chash, model_uri))
        if rec and rec.get("content_hash") == chash and rec.get("model_uri") == model_uri:
            return rec
        return None

    def records(self) -> list[dict]:
        """Every done record (for reports and tests)."""
        names = []
        if isinstance(self.store, _LocalStore):
            root = Path(self.root)
            names = [str(p.relative_to(root)) for p in root.glob("*/done-*.json")] if root.is_dir() else []
        else:
            names = [n for n in self.store.names("") if "/done-" in n]
        return [r for r in (self.store.read(n) for n in sorted(names)) if r]

    # -- claims --

    def _claims(self, scene: str) -> list[tuple[int, str]]:
        """(generation, name) of the scene's claims, lowest first."""
        out = []
        for name in self.store.names(f"{scene}/claim-"):
            m = re.search(r"/claim-(\d+)\.json$", name)
            if m:
                out.append((int(m.group(1)), name))
        return sorted(out)

    def stale(self, body: dict) -> bool:
        """True when a claim's holder is gone: not renewed within its timeout, or its process here has exited."""
        try:
            if time.time() - float(body["renewed"]) > float(body["timeout_s"]):
                return True
            same_process_space = body["host"] == self.me["host"] and body["pidns"] == self.me["pidns"] != ""
            if same_process_space and int(body["pid"]) == os.getpid():
                return body["token"] not in _ACTIVE  # ours, but its release failed (e.g. S3 was down): an orphan
            return same_process_space and not _pid_alive(int(body["pid"]))
        except (KeyError, TypeError, ValueError):
            return True  # not a claim this code wrote: do not let it block the scene forever

    def acquire(self, scene: str) -> Claim | None:
        """Claim ``scene`` for this run; None while another live run holds it."""
        for _ in range(20):  # each pass either decides or saw another run move; give up (None = busy) after many
            claims = self._claims(scene)
            gen = 0
            if claims:
                top_gen, top = claims[-1]
                body = self.store.read(top)
                if body is None:
                    continue  # released between listing and reading: look again
                if not self.stale(body):
                    return None
                gen = top_gen + 1
                print(f"ledger: taking over stale claim {top} (host {body.get('host')}, pid {body.get('pid')})",
                      file=sys.stderr)
            token = uuid.uuid4().hex
            now = time.time()
            body = self.me | {"token": token, "created": now, "renewed": now, "timeout_s": self.timeout}
            name = f"{scene}/claim-{gen:08d}.json"
            _ACTIVE.add(token)  # before it exists: other threads of this process must never take it for an orphan
            won = False
            try:
                # Lost the create? A retried request may have created it for us: the token says whose it is.
                won = self.store.create(name, body) or (self.store.read(name) or {}).get("token") == token
            finally:
                if not won:
                    _ACTIVE.discard(token)
            if won:
                for _, older in claims:
                    self.store.delete(older)  # stale generations below ours
                claim = Claim(scene, name, token, body)
                claim.thread = threading.Thread(target=self._heartbeat, args=(claim,), daemon=True,
                                                name=f"ledger-heartbeat-{scene}")
                claim.thread.start()
                return claim
        return None

    def _heartbeat(self, claim: Claim) -> None:
        """Renew the claim every timeout/4 s until released (a failed renewal is retried at the next beat)."""
        while not claim.stop.wait(self.timeout / 4):
            try:
                self.store.put(claim.name, claim.body | {"renewed": time.time()})
            except (GeoclipError, OSError) as exc:
                print(f"ledger: cannot renew {claim.name} ({exc}); retrying", file=sys.stderr)

    def holds(self, claim: Claim) -> bool:
        """True while ``claim`` is still the scene's live claim (nobody took it over as stale)."""
        claims = self._claims(claim.scene)
        return bool(claims) and claims[-1][1] == claim.name and \
            (self.store.read(claim.name) or {}).get("token") == claim.token

    def release(self, claim: Claim) -> None:
        """Stop renewing and delete the claim (the heartbeat stops first so it cannot re-create it)."""
        claim.stop.set()
        _ACTIVE.discard(claim.token)
        if claim.thread is not None:
            claim.thread.join()
        if (self.store.read(claim.name) or {}).get("token") == claim.token:
            self.store.delete(claim.name)

    # -- the exactly-once step --

    def run_once(self, scene_uri: str, model_uri: str, work: Callable[[], dict], wait: bool = True) -> dict:
        """Run ``work`` (which writes the scene's outputs and returns its summary) once per (content, model).

        Returns the summary with ``status``: ``scored`` (by this call), ``skipped`` (done before: the summary
        recorded then) or, with ``wait=False``, ``busy`` (another run holds the scene; nothing else in the dict
        but ``scene``). With ``wait=True`` a busy scene is waited for until it is done or its claim goes stale.
        """
        scene = scene_name(scene_uri)
        chash = content_hash(scene_uri)
        said_wait = False
        while True:
            rec = self.done(scene, chash, model_uri)
            if rec is not None:
                return rec["summary"] | {"status": "skipped"}
            claim = self.acquire(scene)
            if claim is None:
                if not wait:
                    return {"scene": str(scene_uri), "status": "busy"}
                if not said_wait:
                    print(f"ledger: {scene_uri} is being scored by another run; waiting", file=sys.stderr)
                    said_wait = True
                time.sleep(self.poll * random.uniform(0.5, 1.5))  # jitter: racing runs do not poll in step
                continue
            try:
                result = self._score_claimed(claim, scene_uri, chash, model_uri, work)
                if result is not None:
                    return result
                # Our claim went stale while we worked and another run took the scene over: its done record
                # will be the scene's one (same content, same model: the same outputs), so wait for it.
                print(f"ledger: {scene_uri}: claim {claim.name} was taken over while scoring (longer than "
                      f"score.claim_timeout_s={self.timeout:g} s without renewal); waiting for the other run",
                      file=sys.stderr)
            finally:
                with contextlib.suppress(GeoclipError):  # a lost release only delays others until the claim is stale
                    self.release(claim)

    def _score_claimed(self, claim: Claim, scene_uri: str, chash: str, model_uri: str,
                       work: Callable[[], dict]) -> dict | None:
        """Under a held claim: re-check done, drop other records of the scene, run the work, record it done.

        None when the claim was lost meanwhile (fencing: only the live holder writes the done record).
        """
        rec = self.done(claim.scene, chash, model_uri)
        if rec is not None:  # another run finished it between our check and our claim
            return rec["summary"] | {"status": "skipped"}
        keep = self.done_name(claim.scene, chash, model_uri)
        for name in self.store.names(f"{claim.scene}/done-"):
            if name != keep:  # the outputs are about to be replaced: older contents/models are no longer on disk
                self.store.delete(name)
        started = time.time()
        summary = work()
        if not self.holds(claim):
            return None
        summary = {k: v for k, v in summary.items() if k != "status"}
        self.store.put(keep, {
            "scene": str(scene_uri), "name": claim.scene, "content_hash": chash, "model_uri": model_uri,
            "model_key": model_key(model_uri), "claim": claim.token, **self.me,
            "started": _iso(started), "finished": _iso(time.time()), "summary": summary})
        return summary | {"status": "scored"}


def _iso(t: float) -> str:
    """An ISO-8601 UTC timestamp."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")
