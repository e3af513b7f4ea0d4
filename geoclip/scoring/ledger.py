"""Exactly-once scoring: a manifest of done (scene content, model) pairs and atomic claims, on local disk or S3.

Layout beside the outputs (``{out}`` is a folder or an ``s3://`` prefix)::

    {out}/_manifest/{scene}/claim-{gen:08d}.json         a run holds the scene while it scores it
    {out}/_manifest/{scene}/done-{model}-{hash16}.json   this content was scored with this model

A claim is created only if absent (local: ``os.link`` of a written, fsynced temp file; S3: ``PutObject`` with
``If-None-Match: *``), so two runs can never both hold a scene. The claim with the highest generation is the
live one; a holder renews it every ``timeout / 4`` seconds, and a claim not renewed for ``timeout`` seconds (or whose
process on this host is gone) is stale: a run takes it over by creating the next generation, again only-if-absent.
The done record is written after every output is in place and before the claim is released, and every holder
re-reads it after claiming, so a scene is scored once per (content, model) however runs interleave.

Fencing: the generation is the fencing token. A renewal is a compare-and-set (local: under the scene's lock, only
while the claim is still this run's and the highest generation; S3: ``PutObject`` with ``If-Match`` on the ETag of
the run's own last write), so a run that was paused past the timeout cannot bring its claim back to life. Every
publish step (each output's rename or upload, the done record, dropping older records) runs inside
:meth:`Ledger.publishing`, which first proves ownership: locally it holds the scene's ``flock`` across the check and
the renames, and a takeover needs the same lock, so nobody can take the scene over between the check and the
publish; on S3 the check is a conditional renewal right before each upload (S3 has no lock to hold across the
upload: a run paused inside that one request is the remaining window, bounded by the request's duration).

Clocks: staleness compares a claim's ``renewed`` time, written by its holder's clock, with the reader's clock, so
``score.claim_timeout_s`` must exceed the largest clock skew between hosts plus the longest pause to tolerate
(NTP keeps skew in milliseconds; the default timeout is an hour).
"""

from __future__ import annotations

import contextlib
import fcntl
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from geoclip.data import s3
from geoclip.data.products import input_files, input_stem
from geoclip.diskspace import writing
from geoclip.errors import GeoclipError

MANIFEST = "_manifest"
CHUNK = 8 << 20  # bytes per read while hashing a local scene


def _file_hash(uri: str, s3_client=None) -> str:
    """``sha256:<hex>`` of a local file, ``s3etag:<etag>:<size>`` of an S3 object, ``url:<url>`` of a web one."""
    if uri.startswith(("http://", "https://")):
        return f"url:{uri}"  # not ours to read whole; a changed URL is a changed input
    if s3.is_s3(uri):
        bucket, key = s3.split_uri(uri)
        with s3._errors(uri, "read the object's ETag", s3.MISSING_OBJECT, "no such object"):
            head = (s3_client or s3.client()).head_object(Bucket=bucket, Key=key)
        return f"s3etag:{head['ETag'].strip(chr(34))}:{head['ContentLength']}"
    digest = hashlib.sha256()
    try:
        with open(uri, "rb") as f:
            while block := f.read(CHUNK):
                digest.update(block)
    except OSError as exc:
        raise GeoclipError(f"{uri}: cannot be read to hash it ({exc.strerror})") from exc
    return f"sha256:{digest.hexdigest()}"


def content_hash(scene_uri: str, s3_client=None) -> str:
    """A stable content id of a scene: its file's (see :func:`_file_hash`), or for an input of several files (a
    product's bands, a scene and its mask) ``files:<sha256>`` over each file's name and id."""
    files = input_files(str(scene_uri))
    if len(files) == 1:
        return _file_hash(files[0], s3_client)
    lines = "\n".join(f"{f.rstrip('/').rsplit('/', 1)[-1]}={_file_hash(f, s3_client)}" for f in files)
    return "files:" + hashlib.sha256(lines.encode()).hexdigest()


def model_key(model_uri: str) -> str:
    """A file-name-safe id of a model: ``<name>-v<version>`` for ``models:/name/version``, else a hash of the URI."""
    m = re.fullmatch(r"models:/([^/@]+)/(\d+)", model_uri)
    if m:
        return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', m.group(1))}-v{m.group(2)}"
    return "uri_" + hashlib.sha256(model_uri.encode()).hexdigest()[:12]


def scene_name(scene_uri: str) -> str:
    """The name that identifies a scene's outputs (its stem: outputs are ``{stem}_classmap.tif`` ...)."""
    return input_stem(str(scene_uri))


#: What a store returns for a manifest object that exists but is not JSON (``renewed``: when it was last written).
UNREADABLE = {"unreadable": True}


def _fsync_dir(folder: Path) -> None:
    """Make a rename or link in ``folder`` durable (the directory entry itself)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- stores: the operations the ledger needs, on a folder or an S3 prefix ----

class _LocalStore:
    """Manifest objects as files under a local folder."""

    def __init__(self, root: Path):
        self.root = root

    def read(self, name: str) -> dict | None:
        """The JSON object ``name``; None when absent; :data:`UNREADABLE` when it exists but is not JSON."""
        try:
            text = (self.root / name).read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:  # e.g. empty after a power cut
            return UNREADABLE | {"renewed": (self.root / name).stat().st_mtime}

    def create(self, name: str, obj: dict) -> bool:
        """Create ``name`` only if absent; False when it exists. Written first, then linked: never seen half-written."""
        path = self.root / name
        with writing(path, "a claim of the scoring ledger"):
            return self._create(path, obj)

    @staticmethod
    def _create(path: Path, obj: dict) -> bool:
        """The body of :meth:`create`."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(obj, f)
                f.flush()
                os.fsync(f.fileno())  # a claim that survives a power cut says who held the scene
            os.link(tmp, path)  # atomic create-if-absent, like O_CREAT|O_EXCL, also on NFS
            _fsync_dir(path.parent)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def put(self, name: str, obj: dict) -> None:
        """Write ``name`` (replacing it) atomically and durably (fsynced before the rename)."""
        path = self.root / name
        with writing(path, "a record of the scoring ledger"):
            self._put(path, obj)

    @staticmethod
    def _put(path: Path, obj: dict) -> None:
        """The body of :meth:`put`."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(obj, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def renew(self, name: str, token: str, obj: dict) -> bool:
        """Compare-and-set: replace claim ``name`` with ``obj`` only while it is still ``token``'s (caller holds
        the scene's lock, so no takeover runs meanwhile); False when it was taken over or removed."""
        if (self.read(name) or {}).get("token") != token:
            return False
        self.put(name, obj)
        return True

    @contextlib.contextmanager
    def lock(self, scene: str, timeout: float) -> Iterator[None]:
        """Hold the scene's exclusive ``flock`` (released by the kernel if the holder dies); GeoclipError when a
        live holder keeps it longer than ``timeout`` seconds (a process stopped while publishing)."""
        path = self.root / scene / ".lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise GeoclipError(f"{path}: locked by another run for more than {timeout:g} s "
                                           "(a process stopped while publishing?); try again later") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # closing releases the lock

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
        self.etags: dict[str, str] = {}  # ETag of this process's last write of each claim (for If-Match renewals)

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
        except json.JSONDecodeError:  # not written by this code (S3 writes are atomic): old enough, it is stale
            return UNREADABLE | {"renewed": 0.0}

    def create(self, name: str, obj: dict) -> bool:
        """Create ``name`` only if absent (``If-None-Match: *``, atomic on S3); False when it exists."""
        from botocore.exceptions import ClientError

        with s3._errors(s3.join(self.root, name), "create"):
            try:
                put = self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=json.dumps(obj).encode(),
                                             IfNoneMatch="*", ContentType="application/json")
                self.etags[name] = put["ETag"]
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

    def renew(self, name: str, token: str, obj: dict) -> bool:
        """Compare-and-set: replace claim ``name`` only if it is unchanged since this process last wrote it
        (``If-Match`` on that ETag); False when it was taken over or removed meanwhile."""
        from botocore.exceptions import ClientError

        etag = self.etags.get(name)
        if etag is None:  # created by a retried request whose answer was lost: adopt it if it is ours
            head = self.read(name) or {}
            if head.get("token") != token:
                return False
            etag = self.client.head_object(Bucket=self.bucket, Key=self._key(name))["ETag"]
        with s3._errors(s3.join(self.root, name), "renew"):
            try:
                put = self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=json.dumps(obj).encode(),
                                             IfMatch=etag, ContentType="application/json")
            except ClientError as exc:
                if s3._client_error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409",
                                                  *s3.MISSING_OBJECT):
                    self.etags.pop(name, None)
                    return False
                raise
        self.etags[name] = put["ETag"]
        return True

    @contextlib.contextmanager
    def lock(self, scene: str, timeout: float) -> Iterator[None]:
        """No lock on S3: conditional writes order the claims (see the module docstring for the window left)."""
        yield

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


def _boot_id() -> str:
    """This kernel's boot id: two containers can share a host name and PID numbers, never a boot and a PID
    namespace and a process start time."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22), or '' when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name, which may hold spaces


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
    lost: threading.Event = field(default_factory=threading.Event)  # set once a renewal finds it taken over
    thread: threading.Thread | None = None
    progressed: float = field(default_factory=time.time)  # when the work last reported progress

    def progress(self) -> None:
        """The work moved on (a batch scored): the heartbeat may keep renewing the claim."""
        self.progressed = time.time()


@dataclass(frozen=True)
class Fence:
    """What the work gets: ``publishing()`` wraps each publish step, ``progress()`` reports that it moves on."""

    publishing: Callable[[], contextlib.AbstractContextManager]
    progress: Callable[[], None]


class ClaimLostError(GeoclipError):
    """This run's claim was taken over (it went stale while the run was paused or stalled): publish nothing."""


class Ledger:
    """The manifest under ``{out}/_manifest``: done records and claims for exactly-once scoring."""

    def __init__(self, out_uri: str | Path, claim_timeout_s: float = 3600.0, poll_s: float | None = None,
                 wait_timeout_s: float = 21600.0):
        out = str(out_uri)
        self.root = s3.join(out, MANIFEST) if s3.is_s3(out) else str(Path(out) / MANIFEST)
        self.store = _S3Store(self.root) if s3.is_s3(out) else _LocalStore(Path(self.root))
        if claim_timeout_s <= 0:
            raise GeoclipError(f"score.claim_timeout_s: {claim_timeout_s}; expected a number of seconds > 0")
        self.timeout = float(claim_timeout_s)
        if wait_timeout_s <= 0:
            raise GeoclipError(f"score.wait_timeout_s: {wait_timeout_s}; expected a number of seconds > 0")
        self.wait_timeout = float(wait_timeout_s)
        self.poll = poll_s if poll_s is not None else min(2.0, self.timeout / 4)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "pidns": _pid_namespace(),
                   "boot_id": _boot_id(), "started": _start_ticks(os.getpid())}

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

    def recorded_inputs(self, scene: str) -> set[str]:
        """The inputs the done records of ``scene`` (a name in the manifest) were scored from."""
        found = (self.store.read(n) for n in self.store.names(f"{scene}/done-"))
        return {str(r["scene"]) for r in found if r and r.get("scene")}

    def records(self) -> list[dict]:
        """Every done record (for reports and tests)."""
        names = []
        if isinstance(self.store, _LocalStore):
            root = Path(self.root)
            names = [p.relative_to(root).as_posix() for p in root.rglob("done-*.json")] if root.is_dir() else []
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
        """True when a claim's holder is gone: not renewed within its timeout, or its process here has exited.

        "Here" means the same boot and PID namespace (host names and PIDs alone repeat across containers); a
        PID is the holder only while the process with it started at the recorded time. An unreadable claim
        (empty after a power cut) counts as renewed when it was last written, so it cannot block a scene forever.
        """
        try:
            if time.time() - float(body["renewed"]) > float(body.get("timeout_s", self.timeout)):
                return True
            if body.get("unreadable"):
                return False  # fresh but unreadable: possibly being written; stale after the timeout
            same_process_space = (body["host"] == self.me["host"] and body["pidns"] == self.me["pidns"] != ""
                                  and body.get("boot_id") == self.me["boot_id"] != "")
            if not same_process_space:
                return False
            pid = int(body["pid"])
            if pid == os.getpid() and body.get("started") == self.me["started"]:
                return body["token"] not in _ACTIVE  # ours, but its release failed (e.g. S3 was down): an orphan
            return not _pid_alive(pid) or _start_ticks(pid) != body.get("started")  # gone, or the PID reused
        except (KeyError, TypeError, ValueError):
            return True  # not a claim this code wrote: do not let it block the scene forever

    def acquire(self, scene: str) -> Claim | None:
        """Claim ``scene`` for this run; None while another live run holds it.

        Under the scene's lock (local), so a takeover never interleaves with the holder's renewal or publish.
        """
        with self.store.lock(scene, self.timeout):
            return self._acquire_locked(scene)

    def _acquire_locked(self, scene: str) -> Claim | None:
        """The body of :meth:`acquire`."""
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

    def _renew(self, claim: Claim) -> bool:
        """Compare-and-set renewal: extend ``claim`` only while it is still this run's and the highest generation.

        False (and ``claim.lost`` set) once it was taken over; the caller must hold the scene's lock (local).
        """
        if claim.lost.is_set():
            return False
        claims = self._claims(claim.scene)
        if claims and claims[-1][1] == claim.name and \
                self.store.renew(claim.name, claim.token, claim.body | {"renewed": time.time()}):
            return True
        claim.lost.set()
        return False

    def _heartbeat(self, claim: Claim) -> None:
        """Renew the claim every timeout/4 s until released or lost (a failed request is retried at the next beat),
        but only while the work progresses: a run stuck for a whole timeout (a hung read) lets its claim go stale."""
        while not claim.stop.wait(self.timeout / 4):
            if time.time() - claim.progressed > self.timeout:
                continue  # stuck: no renewal; it resumes if the work moves on before someone takes the scene over
            try:
                with self.store.lock(claim.scene, self.timeout):
                    if not self._renew(claim):
                        print(f"ledger: {claim.name} was taken over by another run; this run publishes nothing",
                              file=sys.stderr)
                        return
            except (GeoclipError, OSError) as exc:
                print(f"ledger: cannot renew {claim.name} ({exc}); retrying", file=sys.stderr)

    def holds(self, claim: Claim) -> bool:
        """True while ``claim`` is still the scene's live claim (nobody took it over as stale)."""
        if claim.lost.is_set():
            return False
        claims = self._claims(claim.scene)
        return bool(claims) and claims[-1][1] == claim.name and \
            (self.store.read(claim.name) or {}).get("token") == claim.token

    @contextlib.contextmanager
    def publishing(self, claim: Claim) -> Iterator[None]:
        """Fence one publish step: prove (by a compare-and-set renewal) that ``claim`` is still the live one, then
        run the step; :class:`ClaimLostError` instead once it was taken over. Locally the scene's lock is held
        across the check and the step, so no takeover can slip in between."""
        with self.store.lock(claim.scene, self.timeout):
            if not self._renew(claim):
                raise ClaimLostError(f"{claim.name}: taken over by another run while this one was paused or "
                                     f"stalled (longer than score.claim_timeout_s={self.timeout:g} s); not publishing")
            yield

    def release(self, claim: Claim) -> None:
        """Stop renewing and delete the claim (the heartbeat stops first so it cannot renew it again)."""
        claim.stop.set()
        _ACTIVE.discard(claim.token)
        if claim.thread is not None:
            claim.thread.join()
        with self.store.lock(claim.scene, self.timeout):
            if (self.store.read(claim.name) or {}).get("token") == claim.token:  # ours, live or below the live one
                self.store.delete(claim.name)

    # -- the exactly-once step --

    def run_once(self, scene_uri: str, model_uri: str, work: Callable[[Fence], dict], wait: bool = True,
                 scene: str | None = None) -> dict:
        """Run ``work`` (which writes the scene's outputs and returns its summary) once per (content, model).

        ``work`` gets a :class:`Fence`: ``publishing()`` to wrap each publish step in (see :meth:`publishing`) and
        ``progress()`` to call as it moves on (the claim is renewed only then). ``scene`` names the scene in the
        manifest (default: its file stem). Returns the summary with ``status``: ``scored`` (by this call),
        ``skipped`` (done before: the summary recorded then) or, with ``wait=False``, ``busy`` (another run holds
        the scene; nothing else in the dict but ``scene``). With ``wait=True`` a busy scene is waited for until it
        is done or its claim goes stale, at most ``wait_timeout_s`` (then a GeoclipError: try again later).
        """
        scene = scene or scene_name(scene_uri)
        chash = content_hash(scene_uri)
        said_wait = False
        give_up = time.monotonic() + self.wait_timeout
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
                if time.monotonic() > give_up:
                    raise GeoclipError(f"{scene_uri}: still being scored by another run after "
                                       f"score.wait_timeout_s={self.wait_timeout:g} s; score it again later")
                time.sleep(self.poll * random.uniform(0.5, 1.5))  # jitter: racing runs do not poll in step
                continue
            try:
                result = self._score_claimed(claim, scene_uri, chash, model_uri, work)
                if result is not None:
                    return result
                # Our claim went stale while we worked and another run took the scene over; nothing of ours was
                # published. Start again: its done record may be the one we want, else the scene is scored anew.
                print(f"ledger: {scene_uri}: claim {claim.name} was taken over while scoring (longer than "
                      f"score.claim_timeout_s={self.timeout:g} s without renewal); nothing published, checking again",
                      file=sys.stderr)
            finally:
                with contextlib.suppress(GeoclipError):  # a lost release only delays others until the claim is stale
                    self.release(claim)

    def _score_claimed(self, claim: Claim, scene_uri: str, chash: str, model_uri: str,
                       work: Callable[[Fence], dict]) -> dict | None:
        """Under a held claim: re-check done, drop the scene's other records, run the work, record it done.

        None when the claim was lost meanwhile: every publish step (the work's, and the records here) is fenced.
        """
        rec = self.done(claim.scene, chash, model_uri)
        if rec is not None:  # another run finished it between our check and our claim
            return rec["summary"] | {"status": "skipped"}
        keep = self.done_name(claim.scene, chash, model_uri)
        started = time.time()
        try:
            with self.publishing(claim):
                for name in self.store.names(f"{claim.scene}/done-"):
                    if name != keep:  # the outputs are about to be replaced: older ones will no longer be on disk
                        self.store.delete(name)
            summary = work(Fence(publishing=lambda: self.publishing(claim), progress=claim.progress))
            summary = {k: v for k, v in summary.items() if k != "status"}
            with self.publishing(claim):
                self.store.put(keep, {
                    "scene": str(scene_uri), "name": claim.scene, "content_hash": chash, "model_uri": model_uri,
                    "model_key": model_key(model_uri), "claim": claim.token, **self.me,
                    "started": _iso(started), "finished": _iso(time.time()), "summary": summary})
        except ClaimLostError:
            return None
        except Exception:
            # A run that lost its claim can fail in odd ways (the new holder clears its staging folder): that
            # is the takeover, not an error of its own.
            lost = claim.lost.is_set()
            with contextlib.suppress(Exception):
                lost = lost or not self.holds(claim)
            if lost:
                return None
            raise
        return summary | {"status": "scored"}


def _iso(t: float) -> str:
    """An ISO-8601 UTC timestamp."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")
