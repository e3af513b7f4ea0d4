"""Moving or copying a project: its local MLflow store (SQLite) records artifact locations as absolute paths.

A copied project would otherwise read and write the original's artifacts. :func:`check_location` refuses that with
the fix named; :func:`relocate` rewrites the store's locations from the old project folder to this one.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from geoclip.config import Params
from geoclip.errors import GeoclipError

# Every column of MLflow 3's SQLite schema that holds an artifact location.
LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                    ("model_versions", "source"), ("model_versions", "storage_location"),
                    ("logged_models", "artifact_location"))


def _local_path(location: str) -> Path | None:
    """The folder a ``file:`` URI or plain path names; None for anything remote (s3:, mlflow-artifacts:, ...)."""
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if not parsed.scheme and location.startswith("/"):
        return Path(location)
    return None


def moved_from(params: Params, recorded: str) -> Path | None:
    """The old project folder when the store's ``recorded`` location is ``mlflow.artifact_location`` (relative) of
    another folder than this one; None when it is this project's or not a relative local location."""
    relative = Path(params.mlflow.artifact_location)
    old = _local_path(recorded)
    if relative.is_absolute() or ".." in relative.parts or old is None or old == relative.resolve():
        return None
    parts = relative.parts
    if old.parts[-len(parts):] != parts:
        return None  # mlflow.artifact_location was changed, not the project moved: MLflow keeps the recorded one
    return Path(*old.parts[:-len(parts)])


def check_location(params: Params, recorded: str) -> None:
    """Raise when the store's experiment keeps its artifacts in another project folder (this one was moved or
    copied), naming both folders and the fix."""
    old = moved_from(params, recorded)
    if old is not None:
        raise GeoclipError(
            f"{params.mlflow.resolved_tracking_uri()}: experiment {params.mlflow.experiment!r} keeps its artifacts in "
            f"{old}/{params.mlflow.artifact_location}, not in this project ({Path.cwd()}): the project was moved or "
            "copied; run `geoclip relocate` here to point the store at this folder")


def _sqlite_file(params: Params) -> Path:
    uri = params.mlflow.resolved_tracking_uri()
    if not uri.startswith("sqlite:///"):
        raise GeoclipError(f"mlflow.tracking_uri: {uri}; relocate rewrites a local SQLite store (sqlite:///...), a "
                           "server keeps its own artifact locations")
    path = Path(uri[len("sqlite:///"):])
    if not path.is_file():
        raise GeoclipError(f"{path}: no MLflow store here (mlflow.tracking_uri {uri})")
    return path


def relocate(params: Params) -> dict:
    """Rewrite the local store's artifact locations from the project folder it was made in to this one; return the
    old and new folders and the rows changed per column. The store is rewritten in a copy and renamed over."""
    db = _sqlite_file(params)
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            row = con.execute("SELECT artifact_location FROM experiments WHERE name = ?",
                              (params.mlflow.experiment,)).fetchone()
    except sqlite3.Error as exc:
        raise GeoclipError(f"{db}: not an MLflow SQLite store ({exc})") from None
    if row is None:
        raise GeoclipError(f"{db}: no experiment {params.mlflow.experiment!r} (mlflow.experiment)")
    old = moved_from(params, row[0])
    if old is None:
        return {"store": str(db), "from": None, "to": str(Path.cwd()), "changed": {}}
    relative = Path(params.mlflow.artifact_location)
    new = Path(*relative.resolve().parts[:-len(relative.parts)])  # this project's folder
    changed: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix=".geoclip-relocate-", dir=db.parent) as tmp:
        work = Path(tmp) / db.name
        shutil.copy2(db, work)
        con = sqlite3.connect(work)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            for table, column in LOCATION_COLUMNS:
                if table not in tables:
                    continue
                n = 0
                for before, after in ((old.as_uri(), new.as_uri()), (str(old), str(new))):
                    n += con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                                     f"WHERE {column} = ? OR {column} LIKE ? ESCAPE '\\'",
                                     (after, len(before) + 1, before, _like_prefix(before + "/"))).rowcount
                if n:
                    changed[f"{table}.{column}"] = n
            con.commit()
        finally:
            con.close()
        work.replace(db)
    return {"store": str(db), "from": str(old), "to": str(new), "changed": changed}


def _like_prefix(text: str) -> str:
    """A LIKE pattern for values starting with ``text`` (its own % and _ escaped)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
