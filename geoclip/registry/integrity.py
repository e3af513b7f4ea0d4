"""Artifact integrity: a digest of a logged model's files, recorded on its registered version at registration and
checked before the model is loaded (``mlflow.pyfunc.load_model`` unpickles ``python_model.pkl``: whoever can write
to the artifact store could otherwise run code in every scoring worker).

Who may write: the registry (the tracking server's database) and its artifact store should be writable only by the
pipeline's own service identity; scoring workers need read access only. The digest catches files changed in the
artifact store after registration; it cannot protect against someone who can also rewrite the version's tags.
"""

from __future__ import annotations

import atexit
import hashlib
import re
import shutil
import sys
import tempfile
from pathlib import Path

from geoclip.errors import GeoclipError

DIGEST_TAG = "artifacts_sha256"
#: Files MLflow itself adds to a local copy of a registered model (not part of what was logged).
ADDED_ON_DOWNLOAD = {"registered_model_meta"}
CHUNK = 1 << 20


def artifacts_digest(folder: str | Path) -> str:
    """sha256 over every file of a model folder: its relative path and the sha256 of its bytes, sorted by path."""
    root = Path(folder)
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in ADDED_ON_DOWNLOAD or "__pycache__" in path.parts:
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(CHUNK):
                digest.update(block)
        lines.append(f"{digest.hexdigest()}  {rel}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def logged_model_digest(model_uri: str) -> str:
    """The digest of a just-logged model's files, as the artifact store holds them."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="geoclip-digest-") as tmp:
        return artifacts_digest(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))


def _local_copies() -> Path:
    """A folder for verified local copies of models, removed when the process exits."""
    folder = Path(tempfile.mkdtemp(prefix="geoclip-models-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def verified_copy(model_uri: str) -> str:
    """A local copy of ``model_uri`` whose files match the digest recorded on its registered version; the URI itself
    when it names no registered version. GeoclipError when the files were changed after registration."""
    m = re.fullmatch(r"models:/([^/@]+)/(\d+)", model_uri)
    if not m:
        return model_uri  # a run or a path: no registration, nothing recorded to check against
    import mlflow
    from mlflow import MlflowClient

    expected = (MlflowClient().get_model_version(m.group(1), m.group(2)).tags or {}).get(DIGEST_TAG)
    if expected is None:
        print(f"warning: {model_uri} has no {DIGEST_TAG} tag (registered before artifact digests); its files "
              "cannot be checked", file=sys.stderr)
        return model_uri
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(_local_copies()))
    actual = artifacts_digest(local)
    if actual != expected:
        raise GeoclipError(f"{model_uri}: its artifacts changed after registration ({DIGEST_TAG} {expected[:12]}... "
                           f"recorded, {actual[:12]}... found); refusing to load it. Re-register the model from its "
                           "run, and check who can write to the artifact store")
    return local
