"""Reading scenes: a stalled S3 endpoint ends in an error within the configured timeouts, never a hang; reader threads
share one S3 session."""

from __future__ import annotations

import socket
import threading
import time

import boto3
import pytest
import rasterio
from rasterio.errors import RasterioIOError

from geoclip.scoring import scene_io


@pytest.fixture
def stalled_endpoint(monkeypatch):
    """An 'S3 endpoint' that accepts connections and then never answers (a hung proxy, a stalled network)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])  # keep it open, say nothing
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    for key in scene_io.HTTP_STALL_OPTIONS:
        monkeypatch.delenv(key, raising=False)
    yield endpoint
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_a_stalled_s3_read_gives_up_within_the_timeouts(stalled_endpoint, monkeypatch):
    monkeypatch.setattr(scene_io, "HTTP_STALL_OPTIONS", {
        "GDAL_HTTP_CONNECTTIMEOUT": "2", "GDAL_HTTP_TIMEOUT": "3", "GDAL_HTTP_LOW_SPEED_TIME": "2",
        "GDAL_HTTP_LOW_SPEED_LIMIT": "1", "GDAL_HTTP_MAX_RETRY": "1", "GDAL_HTTP_RETRY_DELAY": "0.5"})
    outcome: dict = {}

    def read() -> None:
        started = time.monotonic()
        try:
            with scene_io.scene_env("s3://bucket/scene.tif"), rasterio.open(scene_io.gdal_path("s3://bucket/scene.tif")):
                outcome["opened"] = True
        except RasterioIOError as exc:
            outcome["error"] = str(exc)
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=read, daemon=True)  # daemon: a hang must not keep the test session alive
    thread.start()
    thread.join(timeout=90)
    assert not thread.is_alive(), "the read of a stalled endpoint hung"
    assert "error" in outcome and outcome["seconds"] < 60, outcome


def test_the_environment_wins_over_the_stall_defaults(monkeypatch):
    monkeypatch.setenv("GDAL_HTTP_TIMEOUT", "42")
    assert "GDAL_HTTP_TIMEOUT" not in scene_io.http_stall_options()
    assert scene_io.http_stall_options()["GDAL_HTTP_LOW_SPEED_TIME"] == scene_io.HTTP_STALL_OPTIONS[
        "GDAL_HTTP_LOW_SPEED_TIME"]


def test_reader_threads_share_one_s3_session_each_in_its_own_environment(monkeypatch):
    for key, value in {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    made = []
    real_session = boto3.Session
    monkeypatch.setattr(boto3, "Session", lambda *a, **k: made.append(1) or real_session(*a, **k))  # a counting spy
    envs = scene_io.scene_envs("s3://bucket/scene.tif", None)
    seen: list[dict] = []

    def read_strips() -> None:
        for _ in range(3):  # as a reader thread enters it for every strip
            with envs():
                seen.append(dict(rasterio.env.getenv()))

    threads = [threading.Thread(target=read_strips) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and len(seen) == 12  # one boto3 session for the scene, not one per strip
    for options in seen:  # every thread's GDAL sees the endpoint, the credentials and the stall timeouts
        assert options["AWS_S3_ENDPOINT"] == "127.0.0.1:9000" and options["AWS_HTTPS"] == "NO"
        assert options["AWS_ACCESS_KEY_ID"] == "testing" and "GDAL_HTTP_LOW_SPEED_TIME" in options
    with scene_io.scene_envs("scene.tif")():  # a local scene: none of the S3 settings
        assert "AWS_S3_ENDPOINT" not in rasterio.env.getenv()
