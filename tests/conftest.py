"""Shared fixtures: real servers on 127.0.0.1 (MLflow with SQLite, moto S3) and small params."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from geoclip.devtools.services import HOST, Server, free_port, running

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


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real ``mlflow server`` process (SQLite backend, local artifacts) on 127.0.0.1; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    uri = f"http://{HOST}:{port}"
    server = Server("mlflow", [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
                               "--host", HOST, "--port", str(port), "--workers", "1"],
                    f"{uri}/health", log=root / "server.log", cwd=root)
    with running(server, timeout=120):  # about 20 s on 2 busy cores
        yield uri


@pytest.fixture(scope="session")
def s3_server():
    """moto's real HTTP S3 server on 127.0.0.1 with dummy credentials in the environment; yields the endpoint."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=HOST, port=free_port())
    server.start()
    endpoint = f"http://{HOST}:{server._port}"
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


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server for the whole session (120 s start timeout: slow on 2 busy cores)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def pyfunc_model(tmp_path_factory):
    """A tiny geoclip pyfunc saved to a local folder and loaded back (one per test module)."""
    import mlflow
    from factories import make_model_dir, synthetic_tiles

    from geoclip.registry.pyfunc import save_pyfunc

    root = tmp_path_factory.mktemp("pyfunc")
    return mlflow.pyfunc.load_model(str(save_pyfunc(make_model_dir(root / "model"), synthetic_tiles(2), root / "pf")))


@pytest.fixture
def real_tiles() -> Path:
    """The 100 real EuroSAT_MS dev tiles, or skip."""
    if not REAL_TILES.is_dir():
        pytest.skip(f"real EuroSAT_MS dev tiles not found at {REAL_TILES}")
    return REAL_TILES


@pytest.fixture
def tiny_dataset(tmp_path):
    """A raw dataset in the synth layout: 3 classes x 6 tiles with class-dependent spectra; returns params."""
    import numpy as np
    import pandas as pd
    from factories import make_tile

    from geoclip.config import params_from_dict

    classes = ["Forest", "River", "SeaLake"]
    raw = tmp_path / "data" / "raw"
    rng = np.random.default_rng(0)
    rows = []
    for c, name in enumerate(classes):
        for n in range(1, 7):
            rel = f"tiles/{name}/{name}_{n}.tif"
            data = (rng.integers(500, 1500, size=(13, 64, 64)) + 1000 * c).astype("uint16")
            make_tile(raw / rel, data, origin=(500000.0 + 640 * n, 5600000.0 + 640 * c))
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


class SmallVolume:
    """A tmpfs of a few MB mounted at ``path``; ``leave(n)`` fills it so that about ``n`` bytes stay free."""

    def __init__(self, path: Path):
        self.path = path
        self.filler = path / ".filler"

    def leave(self, free: int) -> None:
        """Fill the volume until about ``free`` bytes are left (the filler file is hidden from every stage)."""
        self.filler.unlink(missing_ok=True)
        room = shutil.disk_usage(self.path).free - free
        if room > 0:
            with open(self.filler, "wb") as f:
                f.write(b"\0" * room)

    def free_up(self) -> None:
        """Remove the filler: the space a user frees before running again."""
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def small_volume(tmp_path):
    """A real, small volume that fills up (tmpfs, 8 MB); skipped where mounting is not allowed (not root)."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the full-disk cases run where the tests run as root (CI)")
    mount = tmp_path / "vol"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the full-disk cases need one")
    try:
        yield SmallVolume(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
