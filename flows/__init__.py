"""Prefect 3 flows around the geoclip library (geoclip never imports this package)."""

from __future__ import annotations

# S3/HTTP error codes that say "try again later", not "your request is wrong".
RETRY_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeoutException",
               "Throttling", "ThrottlingException", "TooManyRequestsException", "OperationAborted", "500", "502",
               "503", "504"}


def _transient_one(exc: BaseException) -> bool:
    """True for one exception (not its causes) that a retry may cure: a network or service-side failure."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        from botocore.exceptions import ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError
    except ImportError:  # pragma: no cover - botocore is a dependency
        return False
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return True
    if isinstance(exc, ClientError):
        err = getattr(exc, "response", {}) or {}
        status = int(err.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return err.get("Error", {}).get("Code") in RETRY_CODES or status >= 500 or status == 429
    module = type(exc).__module__
    if module.startswith(("requests.", "urllib3.")):
        return type(exc).__name__ in {"ConnectionError", "Timeout", "ConnectTimeout", "ReadTimeout",
                                      "ProtocolError", "NewConnectionError", "MaxRetryError", "ChunkedEncodingError"}
    if type(exc).__name__ == "RasterioIOError":  # GDAL's /vsis3/ network failures come only as text
        from geoclip.batch import GDAL_NETWORK_TEXT

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


def transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry only network and S3 service failures (see :func:`is_transient`)."""
    exc = getattr(state, "data", None)
    return isinstance(exc, BaseException) and is_transient(exc)
