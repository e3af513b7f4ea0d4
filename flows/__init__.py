"""Prefect 3 flows around the geoclip library (geoclip never imports this package)."""

from __future__ import annotations

from geoclip.errors import GeoclipError


def transient(task, task_run, state) -> bool:
    """Retry condition: retry I/O failures, never a plain input error (a GeoclipError raised without a cause)."""
    exc = getattr(state, "data", None)
    return not (isinstance(exc, GeoclipError) and exc.__cause__ is None)
