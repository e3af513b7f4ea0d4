"""Exactly-once scoring of one scene: manifest claim, staged outputs, and S3 failures told apart from bad input.

``score_scene_once`` wraps :func:`geoclip.scoring.score.score_one` in a :class:`geoclip.scoring.ledger.Ledger` run:
a scene is scored once per (content, model) however many runs, retries or workers overlap; local outputs appear only
by rename at the end; a /vsis3/ failure while S3 is unreachable becomes a retryable network error (see
``geoclip.retries``).
"""

from __future__ import annotations

import os
import posixpath
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from geoclip.config import Params
from geoclip.data import s3
from geoclip.data.products import input_stem
from geoclip.diskspace import NoSpaceError, writing
from geoclip.errors import GeoclipError
from geoclip.ioutils import write_json
from geoclip.retries import GDAL_NETWORK_TEXT
from geoclip.scoring.score import score_one, truth_uri


def _rebase(obj, old: str, new: str):
    """``obj`` with every string path under the folder ``old`` moved to the folder ``new``."""
    if isinstance(obj, dict):
        return {k: _rebase(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rebase(v, old, new) for v in obj]
    if isinstance(obj, str) and (obj == old or obj.startswith(old + os.sep)):
        return new + obj[len(old):]
    return obj


def _score_staged(params: Params, model, scene_uri: str, out: Path, model_uri: str, checked: bool, fence,
                  stem: str) -> dict:
    """Score into a hidden staging folder inside ``out``, then rename the outputs into place, the summary last,
    all inside one fenced publish step (``fence.publishing``: nothing is renamed once the claim was taken over)."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    mine = re.compile(rf"\.{re.escape(stem)}\.staging-[a-z0-9_]+")
    for old in out.iterdir():  # a crashed run's leftovers for this scene (the caller holds the scene's claim)
        if mine.fullmatch(old.name):
            shutil.rmtree(old, ignore_errors=True)
    with writing(out, f"the outputs of {scene_uri}"):
        staging = Path(tempfile.mkdtemp(prefix=f".{stem}.staging-", dir=out))
    try:
        try:
            summary = score_one(params, model, scene_uri, str(staging), model_uri=model_uri, checked=checked,
                                progress=fence.progress, output_stem=stem)
        except NoSpaceError as exc:  # say where the outputs go, not the hidden staging folder they were written in
            raise NoSpaceError(str(exc).replace(str(staging), str(out))) from exc.__cause__
        summary = _rebase(summary, str(staging), str(out))
        with fence.publishing():
            for f in staging.iterdir():
                if f.is_file() and not f.name.startswith(".") and str(out / f.name) != summary["summary"]:
                    os.replace(f, out / f.name)
            write_json(summary["summary"], summary)  # last: it names the others
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def load_model_keeping_sys_path(load_model: Callable[[], object]):
    """Call ``load_model`` and undo what it adds to ``sys.path``.

    MLflow puts the model's own copy of geoclip (its code_paths) first on sys.path; processes started later (Dask
    workers) inherit sys.path and would import that copy, which lacks the project's expectations/ folder.
    Here geoclip is installed, so the copy is not needed.
    """
    import contextlib
    import sys

    import geoclip

    home = Path(geoclip.__file__).resolve().parents[1]
    try:
        return load_model()
    finally:  # drop every other folder that holds a geoclip package (even one a concurrent load added)
        # Decide on a copy, then remove by value: other threads (Prefect, MLflow) change sys.path meanwhile,
        # and rebuilding the list from a live iteration would drop entries they moved.
        for p in [p for p in list(sys.path) if Path(p or ".", "geoclip", "__init__.py").is_file()
                  and Path(p or ".").resolve() != home]:
            with contextlib.suppress(ValueError):
                while True:
                    sys.path.remove(p)


def _forget_gdal_s3_cache(*uris: str) -> None:
    """Make GDAL forget what it cached about these S3 objects (local paths are ignored).

    GDAL caches a /vsis3/ read that failed during an outage as an empty file: without this, every retry in the
    same process fails with "not recognized as being in a supported file format". Only these objects: datasets
    other threads hold open keep their cache. rasterio has no binding for VSICurlPartialClearCache, so call the
    libgdal this process already loaded.
    """
    import ctypes
    import ctypes.util

    remote = [u for u in uris if s3.is_s3(u)]
    if not remote:
        return
    try:
        with open("/proc/self/maps") as maps:
            loaded = [line.split()[-1] for line in maps if "libgdal" in line and "/" in line]
    except OSError:
        loaded = []
    # Every copy: wheels bundle their own libgdal (rasterio's, pyogrio's, ...), each with its own cache, and the
    # one rasterio reads through is not necessarily the first mapped.
    names = list(dict.fromkeys(loaded)) or [n for n in [ctypes.util.find_library("gdal")] if n]
    if names:
        from geoclip.scoring.scene_io import gdal_path, scene_env

        with scene_env(*remote):  # GDAL maps the path to a URL: it needs the same endpoint settings as the reads
            for name in names:
                clear = ctypes.CDLL(name).VSICurlPartialClearCache
                clear.argtypes = [ctypes.c_char_p]
                for uri in remote:
                    clear(gdal_path(uri).encode())




def _raise_if_s3_down(exc: Exception, *uris: str) -> None:
    """Raise a network error (retryable) instead of ``exc`` when it came from S3 being unreachable.

    A /vsis3/ read or check that fails mid-outage says "CURL error ..." (then it is a network failure) or only
    "read failed": then ask S3 directly whether it answers.
    """
    from botocore.exceptions import BotoCoreError

    if not any(s3.is_s3(u) for u in uris):
        return
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if GDAL_NETWORK_TEXT.search(str(exc)):
        raise GeoclipError(f"{text} (S3 cannot be reached)") from ConnectionError(text)
    for uri in uris:
        if s3.is_s3(uri):
            try:
                s3.require_bucket(uri)
            except GeoclipError as down:
                if isinstance(down.__cause__, BotoCoreError):  # connection-level, not "no such bucket"
                    raise GeoclipError(f"{uri}: S3 cannot be reached ({down.__cause__}) after: {text}") from down


def score_scene_once(params: Params, load_model: Callable[[], object], scene_uri: str, out_uri: str,
                     model_uri: str, checked: bool = False, wait: bool = True, name: str | None = None) -> dict:
    """Score one scene unless the manifest shows this content already scored with this model (exactly once).

    ``name`` is the scene's identity below ``out_uri`` (default its file stem; see ``score.scene_keys``): outputs go
    to its folder there, named after its last part, and the ledger keys it by name. ``load_model`` is called only when the scene needs scoring.
    Returns the scene's summary with ``status``: ``scored``, ``skipped`` or, with ``wait=False``, ``busy`` while
    another run holds it (see geoclip.scoring.ledger).
    """
    name = name or input_stem(str(scene_uri))
    folder, stem = posixpath.dirname(name), posixpath.basename(name)
    scene_out = out_uri
    if folder:
        scene_out = s3.join(out_uri, folder) if s3.is_s3(out_uri) else str(Path(out_uri) / folder)
    from geoclip.scoring.ledger import ClaimLostError, Fence, Ledger

    def work(fence: Fence) -> dict:
        model = load_model_keeping_sys_path(load_model)
        _forget_gdal_s3_cache(scene_uri, truth_uri(scene_uri))  # a retry must not see an earlier failed read
        try:
            if s3.is_s3(out_uri):  # score_one scores into a temp folder and uploads at the end, the summary last
                return score_one(params, model, scene_uri, scene_out, model_uri=model_uri, checked=checked,
                                 publishing=fence.publishing, progress=fence.progress, output_stem=stem)
            return _score_staged(params, model, scene_uri, Path(scene_out), model_uri, checked, fence, stem)
        except ClaimLostError:
            raise
        except Exception as exc:
            _raise_if_s3_down(exc, scene_uri, out_uri)
            raise

    ledger = Ledger(out_uri, params.score.claim_timeout_s, wait_timeout_s=params.score.wait_timeout_s)
    return ledger.run_once(scene_uri, model_uri, work, wait=wait, scene=name)
