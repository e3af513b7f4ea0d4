"""Shared fixtures: real servers on 127.0.0.1 (MLflow with SQLite, moto S3) and small params."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Caches (text embeddings) go to a folder of this test session, not the user's home; subprocesses inherit it.
os.environ["GEOCLIP_CACHE"] = tempfile.mkdtemp(prefix="geoclip-test-cache-")
atexit.register(shutil.rmtree, os.environ["GEOCLIP_CACHE"], ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]
REAL_TILES = REPO.parent / "shared" / "data" / "eurosat_ms_dev"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers 200 or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real ``mlflow server`` process (SQLite backend, local artifacts) on 127.0.0.1; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", timeout=120, proc=proc)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def s3_server():
    """moto's real HTTP S3 server on 127.0.0.1 with dummy credentials in the environment; yields the endpoint."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    server.start()
    endpoint = f"http://127.0.0.1:{server._port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def real_tiles() -> Path:
    """The 100 real EuroSAT_MS dev tiles, or skip."""
    if not REAL_TILES.is_dir():
        pytest.skip(f"real EuroSAT_MS dev tiles not found at {REAL_TILES}")
    return REAL_TILES


def write_tile(path: Path, data, epsg: int | None = 32632, origin=(500000.0, 5600000.0)) -> Path:
    """Write ``data`` (bands, H, W) as a GeoTIFF with a 10 m UTM geotransform (no CRS when ``epsg`` is None)."""
    import rasterio
    from rasterio.transform import from_origin

    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "count": data.shape[0], "height": data.shape[1], "width": data.shape[2],
               "dtype": str(data.dtype), "transform": from_origin(origin[0], origin[1], 10.0, 10.0)}
    if epsg is not None:
        profile["crs"] = f"EPSG:{epsg}"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


@pytest.fixture
def tiny_dataset(tmp_path):
    """A raw dataset in the synth layout: 3 classes x 6 tiles with class-dependent spectra; returns params."""
    import numpy as np
    import pandas as pd

    from geoclip.config import params_from_dict

    classes = ["Forest", "River", "SeaLake"]
    raw = tmp_path / "data" / "raw"
    rng = np.random.default_rng(0)
    rows = []
    for c, name in enumerate(classes):
        for n in range(1, 7):
            rel = f"tiles/{name}/{name}_{n}.tif"
            data = (rng.integers(500, 1500, size=(13, 64, 64)) + 1000 * c).astype("uint16")
            write_tile(raw / rel, data, origin=(500000.0 + 640 * n, 5600000.0 + 640 * c))
            rows.append({"id": f"{name}_{n}", "path": rel, "class": name})
    pd.DataFrame(rows).to_csv(raw / "labels.csv", index=False)
    return params_from_dict({
        "classes": {"names": classes},
        "paths": {k: str(tmp_path / v) for k, v in
                  {"raw": "data/raw", "prepared": "data/prepared", "reports": "reports", "model": "models",
                   "eval": "eval", "scores": "outputs/scores"}.items()},
        "prepare": {"val_fraction": 0.2, "test_fraction": 0.2},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                   "artifact_location": str(tmp_path / "mlartifacts")},
    })
