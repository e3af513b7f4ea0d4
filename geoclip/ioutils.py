"""Small I/O helpers: atomic writes so a failed step never leaves a half-written file."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from geoclip.diskspace import size_of, writing


def _read_umask() -> int | None:
    """The process umask from ``/proc/self/status`` (Linux 4.7+), or None where that line is not available."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return None


def _umask_by_setting() -> int:
    """The umask read the only portable way, by setting and restoring it (process-wide: import time only)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Setting the umask to read it is process-wide: a thread doing it would race every other thread's file creation
# (a file made in that instant gets the wrong mode). So it is read from /proc, and only where /proc has no Umask
# line is it read by setting it, once, here at import (the main thread, before any worker exists).
_IMPORT_UMASK = _read_umask()
_IMPORT_UMASK = _umask_by_setting() if _IMPORT_UMASK is None else _IMPORT_UMASK


def _umask() -> int:
    """The process umask, read without changing it."""
    mask = _read_umask()
    return _IMPORT_UMASK if mask is None else mask


@contextlib.contextmanager
def atomic_path(target: str | Path, what: str | None = None, need: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only on success.

    A full volume becomes a :class:`geoclip.diskspace.NoSpaceError` about ``what`` (default the file's name; ``need``:
    its expected size, when known) and the temporary file is removed.
    """
    target = Path(target)
    with writing(target, what, need):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with writing(target, what, need, written=lambda: size_of(tmp_path)):
            yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (a power cut must not undo a completed swap)."""
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory; the rename still happened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _dir_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``target``'s swap (``.<name>.lock`` beside it), removed when released.

    flock is released by the kernel when its holder dies, so a crashed run never blocks the next one. The lock file
    is unlinked before release; a waiter that then locks the unlinked file notices (inode changed) and retries.
    """
    path = target.with_name(f".{target.name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _backup(target: Path) -> Path:
    """Where the previous ``target`` waits during a swap."""
    return target.with_name(f".{target.name}.old")


def _recover(target: Path) -> None:
    """Undo what a crashed swap of ``target`` left (the caller holds the lock, so no other run is writing).

    Killed between ``target -> backup`` and ``temp -> target``: the backup is put back (the crashed run never
    happened, as for any failed run). Killed after the swap: the backup is removed. Temp folders of ``target``
    (``.<name>.<8 chars>.tmp``, as :func:`tempfile.mkdtemp` names them) belong to dead runs: removed.
    """
    old = _backup(target)
    if old.is_dir():
        if target.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, target)
            _fsync_dir(target.parent)
    stale = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.tmp")
    for p in target.parent.iterdir():
        if stale.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path, check: Callable[[Path], None] | None = None, what: str | None = None,
               need: int | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; swap it in for ``target`` only on success.

    Writers of the same ``target`` take turns (a lock beside it); each first repairs what a crashed writer left
    (see :func:`_recover`), then runs ``check(target)`` (e.g. refuse to replace files it did not write). A full
    volume becomes a :class:`geoclip.diskspace.NoSpaceError` about ``what`` (``need``: its expected size) and the
    temporary directory is removed; ``target`` stays as it was.
    """
    target = Path(target)
    with writing(target, what, need):
        target.parent.mkdir(parents=True, exist_ok=True)
    with writing(target, what, need), _dir_lock(target):
        _recover(target)
        if check is not None:
            check(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            with writing(target, what, need, written=lambda: size_of(tmp)):
                yield tmp
            os.chmod(tmp, 0o777 & ~_umask())
            if target.exists():
                old = _backup(target)
                os.replace(target, old)
                os.replace(tmp, target)  # a crash before this line is undone by the next run's _recover
                _fsync_dir(target.parent)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
                _fsync_dir(target.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
