"""Small S3 helpers (boto3): list, fetch and put objects named by ``s3://bucket/key`` URIs.

The endpoint comes from the standard ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` variables and the
credentials from the usual environment or profile, so a local S3 (moto, MinIO) needs no code change.
Missing credentials and an unreachable endpoint are one-line errors naming the endpoint and what to set.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from geoclip.errors import GeoclipError

SCHEME = "s3://"
#: Where botocore takes the S3 endpoint from, the first set winning (the S3-specific one before the general one).
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
#: Error codes with which S3 refuses the credentials themselves (not a missing object or a policy).
REFUSED_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                       "TokenRefreshRequired")
# scheme://user:password@ -- the password matched greedily, so one with an unescaped @ is masked whole.
_URI_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s:/@]*):[^\s/]*@", re.IGNORECASE)
_ERRNO = re.compile(r"\[Errno [^\]]*\] [^'\")]*")


def redact(text: str) -> str:
    """``text`` with the password of every URI in it masked: ``postgresql://user:***@host/db``."""
    return _URI_PASSWORD.sub(r"\1:***@", text)


def is_s3(uri: str | Path) -> bool:
    """True when ``uri`` is an ``s3://`` URI."""
    return str(uri).startswith(SCHEME)


def split_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``."""
    if not is_s3(uri):
        raise GeoclipError(f"{uri}: expected an s3://bucket/prefix URI")
    bucket, _, key = uri[len(SCHEME):].partition("/")
    if not bucket:
        raise GeoclipError(f"{uri}: no bucket name; expected s3://bucket/prefix")
    return bucket, key


def gdal_path(uri: str | Path) -> str:
    """What GDAL opens: ``s3://bucket/key`` -> ``/vsis3/bucket/key`` (read in ranges, never downloaded); a local
    path as it is."""
    if is_s3(uri):
        bucket, key = split_uri(str(uri))
        return f"/vsis3/{bucket}/{key}"
    return str(uri)


def join(uri: str, *parts: str) -> str:
    """Join key parts onto an ``s3://`` URI with single slashes."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def client():
    """A boto3 S3 client (endpoint and credentials from the standard AWS settings)."""
    import boto3

    return boto3.client("s3")


def _client_error_code(exc: Exception) -> str:
    """The AWS error code of a botocore ``ClientError`` (empty when there is none)."""
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


MISSING_OBJECT = ("404", "NoSuchKey", "NotFound")
MISSING_BUCKET = ("404", "NoSuchBucket", "NotFound")


def endpoint(s3_client=None) -> tuple[str, str]:
    """The S3 endpoint requests go to (its password masked) and the variable to set to change it."""
    from botocore.exceptions import BotoCoreError

    variable = next((v for v in ENDPOINT_VARIABLES if os.environ.get(v)), ENDPOINT_VARIABLES[1])
    try:
        url = (s3_client or client()).meta.endpoint_url
    except (BotoCoreError, ValueError):  # an endpoint botocore refuses: name it as the user wrote it
        url = os.environ.get(variable) or "the default AWS S3 endpoint"
    return redact(url), variable


def _unreachable_reason(exc: Exception) -> str:
    """A few words on why a connection failed: the OS error when there is one (refused, unknown host)."""
    found = _ERRNO.search(str(getattr(exc, "kwargs", {}).get("error", "")) or str(exc))
    if found:
        return found.group(0).strip()
    return {"ConnectTimeoutError": "connect timed out", "ReadTimeoutError": "read timed out",
            "ConnectionClosedError": "connection closed", "ProxyConnectionError": "proxy unreachable"}.get(
        type(exc).__name__, "cannot connect")


@contextlib.contextmanager
def _errors(uri: str, action: str, missing: tuple[str, ...] = (), missing_text: str = "",
            s3_client=None) -> Iterator[None]:
    """Turn botocore errors into one-line GeoclipErrors naming ``uri``; error codes in ``missing`` say ``missing_text``.

    Missing or refused credentials and an unreachable endpoint name the endpoint and what to set. The botocore
    error stays the cause, which marks an outage as I/O (retryable) for the Prefect flows.
    """
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        CredentialRetrievalError,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError

    try:
        yield
    except ClientError as exc:
        code = _client_error_code(exc)
        if code in missing:
            raise GeoclipError(f"{uri}: {missing_text}") from exc
        if code in REFUSED_CREDENTIALS:
            url, _ = endpoint(s3_client)
            raise GeoclipError(f"{uri}: cannot {action}: the S3 endpoint {url} refused the credentials ({code}); "
                               "check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN "
                               "(or AWS_PROFILE)") from exc
        raise GeoclipError(f"{uri}: cannot {action} ({code or exc})") from exc
    except (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError) as exc:
        url, _ = endpoint(s3_client)
        detail = "" if isinstance(exc, NoCredentialsError) else f" ({redact(str(exc))})"
        raise GeoclipError(f"{uri}: cannot {action}: no AWS credentials for the S3 endpoint {url}{detail}; "
                           "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)") from exc
    except (BotoConnectionError, HTTPClientError) as exc:
        url, variable = endpoint(s3_client)
        raise GeoclipError(f"{uri}: cannot {action}: S3 endpoint {url} is unreachable ({_unreachable_reason(exc)}); "
                           f"start it, or set {variable} to an S3 endpoint that answers") from exc
    except BotoCoreError as exc:
        raise GeoclipError(f"{uri}: cannot {action} ({redact(str(exc))})") from exc


def list_uris(uri: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    """All object URIs under the prefix ``uri`` whose names end with one of ``suffixes`` (sorted)."""
    bucket, prefix = split_uri(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"  # a folder-like prefix: scenes/ must not also match scenes_old/
    out = []
    with _errors(uri, "list", ("NoSuchBucket",), f"bucket {bucket!r} does not exist"):
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [f"{SCHEME}{bucket}/{o['Key']}" for o in page.get("Contents", [])
                    if not suffixes or o["Key"].lower().endswith(suffixes)]
    return sorted(out)


def exists(uri: str) -> bool:
    """True when the object ``uri`` exists."""
    from botocore.exceptions import ClientError

    bucket, key = split_uri(uri)
    with _errors(uri, "check"):
        try:
            client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if _client_error_code(exc) in MISSING_OBJECT + MISSING_BUCKET:
                return False
            raise  # told by _errors, like every other failure


def require_bucket(uri: str, s3_client=None) -> None:
    """Raise a GeoclipError unless the bucket of ``uri`` exists and can be reached."""
    bucket, _ = split_uri(uri)
    with _errors(uri, f"reach bucket {bucket!r}", MISSING_BUCKET, f"bucket {bucket!r} does not exist", s3_client):
        (s3_client or client()).head_bucket(Bucket=bucket)


def download(uri: str, path: str | Path, s3_client=None) -> Path:
    """Fetch the object ``uri`` into the local file ``path`` (pass one ``s3_client`` to share it across threads)."""
    bucket, key = split_uri(uri)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _errors(uri, "download", MISSING_OBJECT, "no such object", s3_client):
        (s3_client or client()).download_file(bucket, key, str(path))
    return path


def download_small(uri: str, path: str | Path, s3_client=None) -> Path:
    """Fetch a small object (a tile) with one GET: about 1.6x faster than ``download`` for 100 kB tiles."""
    bucket, key = split_uri(uri)
    with _errors(uri, "download", MISSING_OBJECT, "no such object", s3_client):
        body = (s3_client or client()).get_object(Bucket=bucket, Key=key)["Body"]
        with open(path, "wb") as f:
            shutil.copyfileobj(body, f)
    return Path(path)


def read_text(uri: str, s3_client=None) -> str:
    """The UTF-8 text of a small object (a STAC item, a product's metadata XML)."""
    bucket, key = split_uri(uri)
    with _errors(uri, "read", MISSING_OBJECT, "no such object", s3_client):
        return (s3_client or client()).get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")


def upload(path: str | Path, uri: str) -> str:
    """Put the local file ``path`` at ``uri`` (S3 puts are atomic: readers never see half an object)."""
    bucket, key = split_uri(uri)
    with _errors(uri, f"upload {path}"):
        client().upload_file(str(path), bucket, key)
    return uri
