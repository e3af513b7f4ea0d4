"""Data storage under DVC: the data version (DVC's own directory hash) and the S3 remote's local settings.

``data_version`` re-implements DVC 3's directory hash with hashlib (dvc_data/hashfile/build.py + tree.py):
md5 of each file's bytes, a JSON list of ``{"md5", "relpath"}`` sorted by relpath, and the md5 of that
JSON plus ``.dir``. It therefore equals the ``md5`` DVC records for the folder in ``dvc.lock`` or a ``.dvc``
file, without importing DVC. The S3 endpoint needs no code: dvc-s3 (through botocore) reads
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` itself; ``configure_remote`` only pins params' values in
the git-ignored ``.dvc/config.local``. Credentials always come from the environment or an AWS profile.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from geoclip.config import Params
from geoclip.errors import GeoclipError

CHUNK = 1 << 20
IGNORED = {".git", ".hg"}  # DVC's default ignore patterns inside a tracked folder
S3_URL = re.compile(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]/[^\s]+$")
ENDPOINT = re.compile(r"^https?://[^\s/@]+(/[^\s@]*)?$")  # no user:password@ in the endpoint


def _files(root: Path) -> list[Path]:
    """Every file under ``root`` that DVC would track (skipping .git/.hg), in any order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in IGNORED]
        out.extend(Path(dirpath) / f for f in filenames if f not in IGNORED)
    return out


def _md5(path: Path, bar: tqdm) -> str:
    """md5 of a file's bytes (DVC 3's ``md5``; no dos2unix), advancing ``bar``."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def data_version(prepared_dir: str | Path) -> str:
    """DVC 3's ``md5`` of the folder ``prepared_dir`` (e.g. ``"3f...a1.dir"``), as dvc.lock records it."""
    root = Path(prepared_dir)
    if not root.is_dir():
        raise GeoclipError(f"{root}: not a folder; run `geoclip prepare` first")
    files = _files(root)
    if not files:
        raise GeoclipError(f"{root}: no files to version; run `geoclip prepare` first")
    total = sum(p.stat().st_size for p in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="data version", disable=total < (256 << 20)) as bar:
        entries = [{"md5": _md5(p, bar), "relpath": p.relative_to(root).as_posix()} for p in files]
    entries.sort(key=lambda e: e["relpath"])
    # Exactly Tree.as_bytes(): json.dumps with default separators and sorted keys.
    blob = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(blob, usedforsecurity=False).hexdigest() + ".dir"


def endpoint_url(params: Params) -> str:
    """The S3 endpoint: params.storage.endpoint_url, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else ''."""
    return (params.storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or "")


def _dvc(repo_dir: Path, *args: str) -> None:
    """Run one ``dvc`` command (this interpreter's DVC) in ``repo_dir``; a failure becomes a GeoclipError."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], check=False, cwd=repo_dir, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        raise GeoclipError(f"{repo_dir}: `dvc {' '.join(args[:3])}` failed: {lines[-1]}")


def configure_remote(params: Params, repo_dir: str | Path = ".") -> dict:
    """Write the S3 remote's url and endpoint (params, else env) into ``.dvc/config.local``; never credentials."""
    cfg = params.storage
    repo = Path(repo_dir)
    if not S3_URL.match(cfg.url):
        raise GeoclipError(f"storage.url {cfg.url!r}: expected s3://bucket/prefix")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", cfg.remote):
        raise GeoclipError(f"storage.remote {cfg.remote!r}: expected a plain name such as 's3'")
    if not (repo / ".dvc").is_dir():
        raise GeoclipError(f"{repo}: no .dvc folder; expected a DVC repository (run `dvc init`)")
    endpoint = endpoint_url(params)
    if endpoint and not ENDPOINT.match(endpoint):
        raise GeoclipError(f"storage.endpoint_url {endpoint!r}: expected http(s)://host[:port] without credentials")
    _dvc(repo, "remote", "add", "--local", "--force", cfg.remote, cfg.url)
    if endpoint:
        _dvc(repo, "remote", "modify", "--local", cfg.remote, "endpointurl", endpoint)
    return {"remote": cfg.remote, "url": cfg.url, "endpoint_url": endpoint,
            "config": str(repo / ".dvc" / "config.local")}
