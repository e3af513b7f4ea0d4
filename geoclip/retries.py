"""Which failures are worth a retry: network and S3 service failures are, anything about the input is not.

The Prefect flows pass :func:`retry_condition` to their tasks as ``retry_condition_fn``; the library itself uses
:func:`is_transient` and :data:`GDAL_NETWORK_TEXT` to tell an S3 outage from a bad scene.
"""

from __future__ import annotations

import re

# S3/HTTP error codes that say "try again later", not "your request is wrong".
RETRY_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeoutException",
               "Throttling", "ThrottlingException", "TooManyRequestsException", "OperationAborted", "500", "502",
               "503", "504"}

# How GDAL (curl under /vsis3/) words a network failure: it reaches Python only as text.
GDAL_NETWORK_TEXT = re.compile(r"CURL error|Could not connect|Connection (refused|reset|timed out)|Could not resolve|"
                               r"Operation timed out|HTTP response code: (5\d\d|429)", re.IGNORECASE)

_HTTP_TRANSIENT = {"ConnectionError", "Timeout", "ConnectTimeout", "ReadTimeout", "ProtocolError",
                   "NewConnectionError", "MaxRetryError", "ChunkedEncodingError"}


def _transient_one(exc: BaseException) -> bool:
    """True for one exception (not its causes) that a retry may cure: a network or service-side failure."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return True
    if isinstance(exc, ClientError):
        err = getattr(exc, "response", {}) or {}
        status = int(err.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return err.get("Error", {}).get("Code") in RETRY_CODES or status >= 500 or status == 429
    if type(exc).__module__.startswith(("requests.", "urllib3.")):
        return type(exc).__name__ in _HTTP_TRANSIENT
    if type(exc).__name__ == "RasterioIOError":
        return bool(GDAL_NETWORK_TEXT.search(str(exc)))
    return False


def is_transient(exc: BaseException | None) -> bool:
    """True when ``exc`` or anything in its cause/context chain is a network or S3 service failure.

    A GeoclipError about the input (wrong bands, missing object, bad params) is not, even when it wraps a
    botocore or rasterio error: retrying cannot fix the input.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _transient_one(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry_condition(task, task_run, state) -> bool:
    """Prefect's ``retry_condition_fn``: retry a failed task run only on a transient failure (:func:`is_transient`)."""
    exc = getattr(state, "data", None)
    return isinstance(exc, BaseException) and is_transient(exc)
