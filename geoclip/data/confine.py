"""Confinement: what a manifest, a tile folder or a scenes folder lists stays inside its folder once links are followed.

One rule for the three: a path is judged where it leads (``Path.resolve``), so a symbolic link inside the folder to a
file elsewhere is a path outside, refused like ``../x.tif`` unless the section's ``allow_outside_paths`` is true.
Folders are listed with :func:`geoclip.data.tiles.walk_files`, which follows links to folders so this can judge them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from geoclip.data import s3
from geoclip.errors import GeoclipError


def leaves(path: str | Path, base: str | Path) -> str | None:
    """None when ``path`` lies inside ``base`` once links are followed; else how it leaves, to follow '<path> is ':
    ``outside``, ``a link to <target>, outside`` or ``in <folder>, a link to <target>, outside``.

    ``base`` may be an ``s3://`` prefix (no links there: a key with ``..`` or another bucket or prefix is outside).
    """
    path, base = str(path), str(base)
    if s3.is_s3(base) or s3.is_s3(path):
        return None if s3.is_s3(base) and s3.is_s3(path) and _inside_prefix(path, base) else "outside"
    real_base = Path(base).resolve()
    if Path(path).resolve().is_relative_to(real_base):
        return None
    spelled_base = Path(os.path.normpath(os.path.abspath(base)))
    spelled = Path(os.path.normpath(os.path.abspath(path)))
    if not spelled.is_relative_to(spelled_base):
        return "outside"  # outside as written (``../``, another folder): no link to name
    parts = spelled.relative_to(spelled_base).parts
    for n in range(1, len(parts) + 1):  # the first link on the way that leads out: the tile itself or a folder
        step = spelled_base.joinpath(*parts[:n])
        if step.is_symlink() and not step.resolve().is_relative_to(real_base):
            where = "" if n == len(parts) else f"in {Path(*parts[:n]).as_posix()}, "
            return f"{where}a link to {step.resolve()}, outside"
    return f"led by links to {Path(path).resolve()}, outside"


def _inside_prefix(uri: str, base: str) -> bool:
    """Whether ``uri`` is an object below the ``s3://`` prefix ``base``, judged on the key (``..`` cannot climb)."""
    (bucket, key), (base_bucket, prefix) = s3.split_uri(uri), s3.split_uri(base)
    return bucket == base_bucket and ".." not in key.split("/") and (
        not prefix.strip("/") or key.startswith(prefix.strip("/") + "/"))


def refuse_outside(paths: Iterable[str | Path], base: str | Path, setting: str, allow: bool, *, where: str,
                   place: str, expected: str, label: Callable[[int, str], str] | None = None) -> None:
    """Refuse the first of ``paths`` that lies outside ``base`` once links are followed, unless ``allow``.

    The one line reads ``{where}: {label} is {how it leaves} {place}; expected {expected} inside it (set {setting}:
    true ...)``; ``label`` (row number, path) names the path, by default its path below ``base``.
    """
    if allow:
        return
    for i, path in enumerate(paths):
        how = leaves(path, base)
        if how is not None:
            name = label(i, str(path)) if label else _below(str(path), str(base))
            raise GeoclipError(f"{where}: {name} is {how} {place}; expected {expected} inside it "
                               f"(set {setting}: true to allow other places)")


def _below(path: str, base: str) -> str:
    """``path`` as written below ``base`` (``/``-separated), else whole."""
    spelled, spelled_base = os.path.normpath(os.path.abspath(path)), os.path.normpath(os.path.abspath(base))
    return Path(spelled).relative_to(spelled_base).as_posix() if Path(spelled).is_relative_to(spelled_base) else path
