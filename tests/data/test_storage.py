"""Storage: data_version equals DVC's own hash; dvc push/pull through the committed S3 remote against moto."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pytest
import yaml
from conftest import REPO
from factories import make_tile

from geoclip.cli import main
from geoclip.config import params_from_dict
from geoclip.data.storage import configure_remote, data_version, endpoint_url
from geoclip.errors import GeoclipError

BUCKET, PREFIX = "geoclip-data", "dvcstore"  # as in the committed .dvc/config
SECRETS = ("testing", "aws_access_key_id", "aws_secret_access_key", "secret", "credential", "profile")


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the real DVC CLI in ``repo`` (the AWS_* settings come from the current environment)."""
    return subprocess.run([sys.executable, "-m", "dvc", *args], check=False, cwd=repo, capture_output=True,
                          text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})


def make_repo(root: Path) -> Path:
    """A git + DVC repository whose .dvc/config is the project's committed one."""
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    assert dvc(root, "init", "-q").returncode == 0
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    return root


def make_data(folder: Path) -> dict[str, bytes]:
    """A few real GeoTIFF tiles in class folders plus a CRLF text file; returns relpath -> bytes."""
    rng = np.random.default_rng(0)
    for i, name in enumerate(["Forest", "River", "Forest"]):
        make_tile(folder / "tiles" / name / f"{name}_{i}.tif",
                  rng.integers(0, 4000, size=(13, 64, 64)).astype("uint16"), origin=(500000.0 + 640 * i, 5.6e6))
    (folder / "labels.csv").write_bytes(b"id,path,class\r\nForest_0,tiles/Forest/Forest_0.tif,Forest\r\n")
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def s3_keys(bucket: str) -> set[str]:
    """All object keys in ``bucket`` (endpoint from AWS_ENDPOINT_URL, as the fixture sets it)."""
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def storage_params(**storage) -> object:
    """Params with only the storage section set."""
    return params_from_dict({"storage": storage})


def test_data_version_equals_the_md5_dvc_records(tmp_path):
    repo = make_repo(tmp_path / "repo")
    make_data(repo / "data")
    mine = data_version(repo / "data")
    assert dvc(repo, "add", "-q", "data").returncode == 0
    recorded = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    assert mine == recorded and mine.endswith(".dir")
    # Any byte changes the version; DVC agrees again after re-adding.
    with open(repo / "data" / "tiles" / "River" / "River_1.tif", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
    changed = data_version(repo / "data")
    assert changed != mine
    assert dvc(repo, "add", "-q", "data").returncode == 0
    assert changed == yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]


def test_data_version_refuses_missing_or_empty_folders(tmp_path):
    with pytest.raises(GeoclipError, match="not a folder"):
        data_version(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(GeoclipError, match="no files"):
        data_version(tmp_path / "empty")


def test_push_and_pull_through_the_committed_s3_remote(s3_server, tmp_path):
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    repo = make_repo(tmp_path / "repo")
    files = make_data(repo / "data")
    assert dvc(repo, "add", "-q", "data").returncode == 0
    # Only the url is configured: the endpoint comes from AWS_ENDPOINT_URL, read by dvc-s3 itself.
    assert "endpointurl" not in (repo / ".dvc" / "config").read_text()
    pushed = dvc(repo, "push", "-r", "s3")
    assert pushed.returncode == 0, pushed.stderr
    expected = {hashlib.md5(b).hexdigest() for b in files.values()} | {data_version(repo / "data")}
    keys = s3_keys(BUCKET)
    assert {f"{PREFIX}/files/md5/{h[:2]}/{h[2:]}" for h in expected} <= keys

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data")
    pulled = dvc(repo, "pull", "-r", "s3")
    assert pulled.returncode == 0, pulled.stderr
    back = {p.relative_to(repo / "data").as_posix(): p.read_bytes() for p in (repo / "data").rglob("*")
            if p.is_file()}
    assert back == files


def test_configure_remote_writes_only_config_local_and_no_credentials(s3_server, tmp_path, monkeypatch):
    boto3.client("s3").create_bucket(Bucket="geoclip-cfg")
    repo = make_repo(tmp_path / "repo")
    committed = (repo / ".dvc" / "config").read_bytes()
    params = storage_params(url="s3://geoclip-cfg/store", endpoint_url=s3_server)
    result = configure_remote(params, repo)
    local = (repo / ".dvc" / "config.local").read_text()
    assert result == {"remote": "s3", "url": "s3://geoclip-cfg/store", "endpoint_url": s3_server,
                      "config": str(repo / ".dvc" / "config.local")}
    assert (repo / ".dvc" / "config").read_bytes() == committed
    assert f"endpointurl = {s3_server}" in local and "url = s3://geoclip-cfg/store" in local
    for text in (local, committed.decode()):
        assert not any(s in text.lower() for s in SECRETS), text
    # The endpoint in config.local is enough: push with no endpoint in the environment.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    make_data(repo / "data")
    assert dvc(repo, "add", "-q", "data").returncode == 0
    pushed = dvc(repo, "push", "-r", "s3")
    assert pushed.returncode == 0, pushed.stderr
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert any(k.startswith("store/files/md5/") for k in s3_keys("geoclip-cfg"))


def test_endpoint_comes_from_params_else_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert endpoint_url(storage_params(endpoint_url="http://127.0.0.1:1")) == "http://127.0.0.1:1"
    assert endpoint_url(storage_params()) == "http://127.0.0.1:9"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert endpoint_url(storage_params()) == ""


@pytest.mark.parametrize("url", ["http://bucket/x", "s3://bucket", "s3://bucket/", "s3://Bad_Bucket/x", "bucket/x"])
def test_configure_remote_refuses_a_url_that_is_not_s3_bucket_prefix(tmp_path, url):
    (tmp_path / ".dvc").mkdir()
    with pytest.raises(GeoclipError, match=r"storage.url .*expected s3://bucket/prefix"):
        configure_remote(storage_params(url=url), tmp_path)
    assert not (tmp_path / ".dvc" / "config.local").exists()


def test_configure_remote_refuses_credentials_in_the_endpoint_and_non_dvc_folders(tmp_path):
    (tmp_path / ".dvc").mkdir()
    with pytest.raises(GeoclipError, match="storage.endpoint_url .*without credentials"):
        configure_remote(storage_params(endpoint_url="http://key:secret@127.0.0.1:9000"), tmp_path)
    assert not (tmp_path / ".dvc" / "config.local").exists()
    with pytest.raises(GeoclipError, match="no .dvc folder"):
        configure_remote(storage_params(), tmp_path / "elsewhere")


def test_push_to_a_missing_bucket_fails(s3_server, tmp_path):
    repo = make_repo(tmp_path / "repo")
    configure_remote(storage_params(url="s3://no-such-bucket/dvc"), repo)
    make_data(repo / "data")
    assert dvc(repo, "add", "-q", "data").returncode == 0
    pushed = dvc(repo, "push", "-r", "s3")
    assert pushed.returncode != 0
    assert "no-such-bucket" in pushed.stderr or "NoSuchBucket" in pushed.stderr, pushed.stderr


def test_cli_storage_version_and_configure(tmp_path, capsys):
    make_data(tmp_path / "prepared")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"paths": {"prepared": str(tmp_path / "prepared")},
                                      "storage": {"url": "s3:/wrong"}}))
    assert main(["--params", str(params), "storage", "version"]) == 0
    assert capsys.readouterr().out.strip() == data_version(tmp_path / "prepared")
    assert main(["--params", str(params), "storage", "configure", "--repo", str(tmp_path)]) == 2
    assert "storage.url 's3:/wrong': expected s3://bucket/prefix" in capsys.readouterr().err
