"""One alias move at a time per registered model, across hosts: a lock kept in the tracking database itself.

Creating a registered model is create-if-absent in MLflow's database (the name is unique), whatever the backend
(SQLite, PostgreSQL, MySQL) and whether clients talk to it directly or through ``mlflow server``. So a registered
model named ``<model>.alias-lock`` exists exactly while one process moves the model's aliases; it is deleted when
that process is done. No new store is needed, and the same database already holds the aliases it protects.

A lock older than ``stale_s`` belongs to a process that died mid-move (a gate takes seconds) and is removed by the
next process. The removal reads the lock's token and then deletes it: two processes that both find the same dead
lock at the same instant could both proceed (a window of one round trip, only after a crash); a lock held by a
live process is never removed, as long as its move takes less than ``stale_s``.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from geoclip.errors import GeoclipError

LOCK_SUFFIX = ".alias-lock"


def _lock_holder(client: MlflowClient, lock: str) -> dict[str, str] | None:
    """The lock model's tags (token, host, pid; possibly not yet written: a create sets them after the row) and
    ``created`` (the tracking database's own timestamp, seconds), or None when nobody holds it."""
    try:
        model = client.get_registered_model(lock)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return dict(model.tags or {}) | {"created": str((model.creation_timestamp or 0) / 1000)}


@contextlib.contextmanager
def alias_lock(client: MlflowClient, name: str, timeout_s: float = 120.0, stale_s: float = 300.0) -> Iterator[None]:
    """Hold the alias lock of registered model ``name``; GeoclipError after ``timeout_s`` of waiting for a live
    holder, naming it and how to clear a lock that outlived its process."""
    lock = name + LOCK_SUFFIX
    token = uuid.uuid4().hex
    deadline = time.monotonic() + timeout_s
    while True:
        tags = {"token": token, "host": socket.gethostname(), "pid": str(os.getpid())}
        try:
            client.create_registered_model(lock, tags=tags, description=f"geoclip: {name}'s aliases are being moved")
            break
        except MlflowException as exc:
            # ALREADY_EXISTS: held. DOES_NOT_EXIST: our row was removed before its tags went in (a stale-lock
            # sweep by another process): not ours, so go round again.
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        holder = _lock_holder(client, lock)
        if holder is None:
            continue  # released in between: try again at once
        # Age by the database's creation time, not by a tag: a lock whose tags are not written yet is fresh.
        if time.time() - float(holder["created"]) > stale_s and _lock_holder(client, lock) == holder:
            with contextlib.suppress(MlflowException):  # another process may have removed it first
                client.delete_registered_model(lock)
            continue
        if time.monotonic() > deadline:
            raise GeoclipError(f"registered model {lock!r}: held by host {holder.get('host')} pid {holder.get('pid')} "
                               f"for more than {timeout_s:g} s; if that process is gone, delete {lock!r} in the "
                               "registry and run again")
        time.sleep(random.uniform(0.05, 0.25))  # jitter: waiters do not retry in step
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            if (_lock_holder(client, lock) or {}).get("token") == token:  # never release someone else's
                client.delete_registered_model(lock)
