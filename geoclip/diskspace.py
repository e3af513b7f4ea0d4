"""Full volumes said plainly: a write that meets ENOSPC or EDQUOT becomes one line naming the volume, what was being
written and about how much it needed, instead of a traceback from deep inside a writer (Pillow, GDAL, torch)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from geoclip.errors import GeoclipError

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# Writers that keep no errno (GDAL, libtiff, torch's zip writer, pyarrow) say it in words: these words are conclusive,
_NO_SPACE_TEXT = re.compile(r"No space left on device|Disk quota exceeded", re.IGNORECASE)
# these only on a volume that is (nearly) full.
_WRITE_FAILED_TEXT = re.compile(r"Write error|Failed to write|TIFFAppendToStrip|TIFFFlushData|write failed|"
                                r"short write|Error writing|requested and \d+ written", re.IGNORECASE)
# A writer that failed ("write error") on a volume with less than this left is taken to have failed for want of
# space: libtiff reports a full disk only on stderr, and the block it could not write can be a few MB (a 512 x 512
# COG tile of 11 bands is 2.9 MB before compression).
NEARLY_FULL_BYTES = 16 << 20


class NoSpaceError(GeoclipError):
    """A volume (or the user's quota on it) filled up while geoclip was writing to it."""


def human(n: float) -> str:
    """A byte count for people: ``1.5 MB`` (powers of 1000, as ``df -H`` and file managers show)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _existing(path: str | Path) -> Path:
    """``path`` or its nearest ancestor that exists (a target is often not written yet)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def volume(path: str | Path) -> str:
    """The mount point that holds ``path`` (``/`` when nothing nearer is mounted)."""
    p = _existing(path).resolve()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return str(p)


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged writer may still put on ``path``'s volume."""
    return shutil.disk_usage(_existing(path)).free


def size_of(path: str | Path) -> int:
    """Bytes of a file, or of every file under a folder (0 when it is gone)."""
    p = Path(path)
    with contextlib.suppress(OSError):
        if p.is_file():
            return p.stat().st_size
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
    return 0


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and every exception it was raised from or during."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_no_space(exc: BaseException, where: str | Path | None = None) -> bool:
    """True when ``exc`` (or its chain) is a full volume or quota: ENOSPC/EDQUOT, or, from writers that keep no
    errno (GDAL, libtiff), a write failure on a volume (``where``) with almost nothing left."""
    chain = list(_chain(exc))
    if any(isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS for e in chain):
        return True
    if any(isinstance(e, GeoclipError) for e in chain):
        return False  # about the input, even if written near a full disk
    if any(_NO_SPACE_TEXT.search(str(e)) for e in chain):
        return True
    if where is None or free_bytes(where) >= NEARLY_FULL_BYTES:
        return False
    # On a (nearly) full volume: a writer's failure in words, or libtiff failing on a file it was writing there
    # (a GeoTIFF closed when its last write could not be made reads back as "Failed to read directory").
    return any(_WRITE_FAILED_TEXT.search(str(e)) or _gdal(e) and ("TIFF" in str(e) or Path(where).name in str(e))
               for e in chain)


def _gdal(exc: BaseException) -> bool:
    """True for an error GDAL raised through rasterio (it carries text, no errno)."""
    return type(exc).__name__.startswith("CPLE_") or type(exc).__name__ == "RasterioIOError"


def is_quota(exc: BaseException) -> bool:
    """True when the chain says the user's quota, not the volume, is what filled."""
    return any(isinstance(e, OSError) and e.errno == errno.EDQUOT or "quota" in str(e).lower() for e in _chain(exc))


def no_space_message(where: str | Path, what: str, need: int | None = None, written: int | None = None,
                     quota: bool = False) -> str:
    """One line: which volume is full, what was being written there and about how much it needs."""
    full = "your disk quota is used up" if quota else "no space left"
    if need:
        amount = f"needs about {human(need)}"
    elif written:
        amount = f"needs more than the {human(written)} written when it filled"
    else:
        amount = "needs more than is left"
    return (f"{full} on {volume(where)} while writing {what} ({where}): {amount}, {human(free_bytes(where))} free "
            "there; free some space (or write elsewhere) and run again")


@contextlib.contextmanager
def writing(where: str | Path, what: str | None = None, need: int | None = None,
            written: Callable[[], int] | None = None) -> Iterator[None]:
    """Turn a full volume met inside the block into a :class:`NoSpaceError` about ``what`` going to ``where``.

    ``need``: the bytes the block needs, when known; else ``written()`` (what the block had written when the
    volume filled) tells the user at least how much it is. Any other exception passes unchanged, and so does a
    NoSpaceError of an inner block, unless this one knows ``need`` (the whole, which tells the user more).
    """
    try:
        yield
    except NoSpaceError as exc:
        if need is None:
            raise
        raise NoSpaceError(no_space_message(where, what or Path(where).name, need, None, is_quota(exc))) from exc.__cause__
    except Exception as exc:
        if not is_no_space(exc, where):
            raise
        done = None
        with contextlib.suppress(Exception):
            done = written() if written is not None else None
        # The file the system refused, where it says so: a writer may stage elsewhere (a temp folder) than ``where``.
        refused = next((e.filename for e in _chain(exc) if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS
                        and isinstance(e.filename, str)), None)
        if refused and volume(refused) != volume(where):
            where = refused
        raise NoSpaceError(no_space_message(where, what or Path(where).name, need, done, is_quota(exc))) from exc


def require_free(where: str | Path, what: str, need: int, at_least: int) -> None:
    """Refuse before writing when ``where``'s volume has less than ``at_least`` bytes free (the least ``what`` can
    take; ``need`` is the estimate the message gives)."""
    free = free_bytes(where)
    if free < at_least:
        raise NoSpaceError(f"{volume(where)} has {human(free)} free, too little for {what} ({where}): it needs "
                           f"about {human(need)} (at least {human(at_least)}); free some space (or write elsewhere) "
                           "and run again")
