"""geoclip.data.s3 against moto's real HTTP S3 server, a port where nothing listens, and no credentials at all."""

from __future__ import annotations

import uuid
from pathlib import Path

import boto3
import pytest

from geoclip.data import s3
from geoclip.devtools.services import HOST, free_port
from geoclip.errors import GeoclipError
from geoclip.retries import is_transient

CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                        "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                        "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN")


def every_call(tmp_path: Path, bucket: str) -> dict:
    """Each public S3 helper, called on ``bucket``: what it raises (or returns)."""
    local = tmp_path / "local.txt"
    local.write_text("x")
    calls = {
        "list_uris": lambda: s3.list_uris(f"s3://{bucket}/scenes/"),
        "exists": lambda: s3.exists(f"s3://{bucket}/a.txt"),
        "require_bucket": lambda: s3.require_bucket(f"s3://{bucket}/scenes/"),
        "download": lambda: s3.download(f"s3://{bucket}/a.txt", tmp_path / "a.txt"),
        "download_small": lambda: s3.download_small(f"s3://{bucket}/a.txt", tmp_path / "b.txt"),
        "upload": lambda: s3.upload(local, f"s3://{bucket}/up.txt"),
    }
    out = {}
    for name, call in calls.items():
        try:
            out[name] = call()
        except Exception as exc:  # noqa: BLE001 - the test reports what each helper raised
            out[name] = exc
    return out


def test_missing_credentials_name_the_endpoint_and_what_to_set(s3_server, tmp_path, monkeypatch):
    bucket = f"creds-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)  # with the fixture's credentials, before they go
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # a fresh process: the session caches what it resolved
    for name in CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup on a developer machine
    for name, result in every_call(tmp_path, bucket).items():
        assert isinstance(result, GeoclipError), (name, result)
        msg = str(result)
        assert "\n" not in msg and f"s3://{bucket}/" in msg, (name, msg)
        assert s3_server in msg and "AWS_ACCESS_KEY_ID" in msg and "AWS_SECRET_ACCESS_KEY" in msg, (name, msg)
        assert not is_transient(result), name  # a retry cannot conjure credentials


def test_unreachable_endpoint_is_named_with_what_to_set(tmp_path, monkeypatch):
    endpoint = f"http://{HOST}:{free_port()}"  # nothing listens there
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(name, value)
    for name, result in every_call(tmp_path, "any-bucket").items():
        assert isinstance(result, GeoclipError), (name, result)
        msg = str(result)
        assert "\n" not in msg and "s3://any-bucket/" in msg, (name, msg)
        assert f"S3 endpoint {endpoint} is unreachable" in msg and "AWS_ENDPOINT_URL" in msg, (name, msg)
        assert is_transient(result), name  # an outage is worth a retry: the flows still retry it


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
def test_the_message_names_the_variable_that_set_the_endpoint(tmp_path, monkeypatch, variable):
    endpoint = f"http://{HOST}:{free_port()}"
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv(variable, endpoint)
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(GeoclipError) as err:
        s3.list_uris("s3://any-bucket/")
    assert f"S3 endpoint {endpoint} is unreachable" in str(err.value)
    assert f"set {variable}" in str(err.value)
