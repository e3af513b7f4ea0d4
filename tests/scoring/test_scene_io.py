"""Reading scenes: a stalled S3 endpoint ends in an error within the configured timeouts, never a hang."""

from __future__ import annotations

import socket
import threading
import time

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
