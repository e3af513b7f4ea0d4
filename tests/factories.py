"""Shared test factories: tiny models, packs, scenes and registered champions (imported by several test files)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import rasterio
import torch
import yaml
from mlflow import MlflowClient
from rasterio.transform import from_origin

from geoclip.bands import ALL_BAND_NAMES, EUROSAT_CLASSES
from geoclip.data.tiles import discover_tiles, read_tile
from geoclip.model.clip import GeoCLIP, ModelConfig, load_model, save_model
from geoclip.registry.pyfunc import log_pyfunc

REPO = Path(__file__).resolve().parents[1]


def make_tile(path: Path, data: np.ndarray | None = None, *, bands: int = 13, size: int = 64,
              dtype: str = "uint16", crs: str | None = "EPSG:32632", origin: tuple[float, float] = (500000, 5000000),
              seed: int = 0, descriptions: list[str] | None = None) -> Path:
    """Write a GeoTIFF tile: ``data`` (bands, H, W) or random DNs, 10 m pixels from ``origin``, CRS optional."""
    if data is None:
        data = np.random.default_rng(seed).integers(100, 5000, (bands, size, size)).astype(dtype)
    profile = {"driver": "GTiff", "count": data.shape[0], "height": data.shape[1], "width": data.shape[2],
               "dtype": data.dtype.name, "transform": from_origin(*origin, 10, 10)}
    if crs:
        profile["crs"] = crs
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, name in enumerate(descriptions or []):
            dst.set_band_description(i + 1, name)
    return path


TINY_ENCODER = "test_resnet"  # timm's 0.4M-parameter test net: fast to build, log and run


def make_model_dir(path: Path, seed: int = 0, embed_dim: int = 32, spectral_stats: bool = False,
                   input_size: int = 0, feature_stages: tuple[int, ...] = ()) -> Path:
    """Save a tiny untrained GeoCLIP (random prompt features, no sentence encoder) into ``path``; ``input_size`` and
    ``feature_stages`` as a pretrained prior's model has them (tiles resized inside, stages pooled)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(image_encoder=TINY_ENCODER, embed_dim=embed_dim, band_names=list(ALL_BAND_NAMES),
                      class_names=list(EUROSAT_CLASSES), prompts=[[f"an image of {c}."] for c in EUROSAT_CLASSES],
                      band_mean=[1500.0] * 13, band_std=[800.0] * 13, spectral_stats=spectral_stats,
                      input_size=input_size, feature_stages=list(feature_stages))
    save_model(GeoCLIP(cfg, prompt_features=torch.randn(len(EUROSAT_CLASSES), 1, 384)), path)
    return path


def synthetic_tiles(n: int, seed: int = 0) -> np.ndarray:
    """``n`` random uint16 tiles ``(n, 13, 64, 64)`` in a Sentinel-2-like value range."""
    return np.random.default_rng(seed).integers(200, 4000, size=(n, 13, 64, 64)).astype(np.uint16)


def real_batch(folder: Path, n: int) -> np.ndarray:
    """The first ``n`` real EuroSAT_MS tiles, one per class in turn."""
    df = discover_tiles(folder).groupby("class").head(1).head(n)
    return np.stack([read_tile(p) for p in df["path"]]).astype(np.uint16)


def torch_predict(model_dir: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The torch model's own probabilities and embeddings for raw tiles."""
    probs, emb = load_model(model_dir).predict(torch.from_numpy(x.astype(np.float32)))
    return probs.numpy(), emb.numpy()


PACK_CLASSES = ["Forest", "Industrial", "SeaLake"]  # classes of the tiny packs


def make_packs(prepared: Path, per_class: int = 30, size: int = 64, seed: int = 0) -> Path:
    """Write tiny packs in the prepare format: per-class band means plus a per-class texture."""
    rng = np.random.default_rng(seed)
    spectra = rng.uniform(500, 4000, size=(len(PACK_CLASSES), 13))
    yy, xx = np.mgrid[0:size, 0:size]
    textures = [np.zeros((size, size)), np.sin(xx / 2.0) * 400, (yy // 8 + xx // 8) % 2 * 600.0]
    n_val = n_test = max(1, per_class // 6)
    prepared.mkdir(parents=True, exist_ok=True)
    rows, packs = [], {"train": ([], []), "val": ([], []), "test": ([], [])}
    for c, name in enumerate(PACK_CLASSES):
        for i in range(per_class):
            noise = rng.normal(0, 150, (13, size, size))
            tile = spectra[c][:, None, None] * rng.uniform(0.8, 1.2) + textures[c] + noise
            split = "val" if i < n_val else "test" if i < n_val + n_test else "train"
            packs[split][0].append(np.clip(tile, 1, 20000).astype(np.uint16))
            packs[split][1].append(c)
            rows.append({"id": f"{name}_{i}", "path": f"tiles/{name}/{name}_{i}.tif", "class": name,
                         "label": c, "split": split})
    for split, (imgs, labels) in packs.items():
        np.save(prepared / f"{split}_images.npy", np.stack(imgs))
        np.save(prepared / f"{split}_labels.npy", np.asarray(labels, dtype=np.int64))
    pd.DataFrame(rows).to_csv(prepared / "index.csv", index=False)
    train_imgs = np.stack(packs["train"][0]).astype(np.float64)
    bands = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"]
    (prepared / "stats.json").write_text(json.dumps({
        "band_names": bands, "class_names": PACK_CLASSES, "mean": train_imgs.mean(axis=(0, 2, 3)).tolist(),
        "std": train_imgs.std(axis=(0, 2, 3)).tolist()}))
    return prepared


def tiny_params_dict(root: Path, tracking_uri: str | None = None, **train) -> dict:
    """Params for a seconds-long run on the tiny packs, everything under ``root``."""
    return {
        "classes": {"names": PACK_CLASSES},
        "paths": {"prepared": str(root / "prepared"), "model": str(root / "model"), "eval": str(root / "eval"),
                  "reports": str(root / "reports")},  # training logs too
        "train": {"image_encoder": "resnet10t", "embed_dim": 32, "epochs": 2, "batch_size": 32, "lr": 3e-3,
                  "num_threads": 2, **train},
        "evaluate": {"batch_size": 64},
        "mlflow": {"tracking_uri": tracking_uri or f"sqlite:///{root}/mlflow.db",
                   "artifact_location": str(root / "mlartifacts"), "experiment": "geoclip-test"},
    }


@contextlib.contextmanager
def own_tracking_store():
    """Let params choose the MLflow store, and leave no trace for later tests.

    ``mlflow.set_tracking_uri`` exports ``MLFLOW_TRACKING_URI``, which then wins over params in
    ``MlflowConfig.resolved_tracking_uri``: clear it before, and restore the environment after.
    """
    old = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # also unsets the exported variable
        if old is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old


BLOCK = 64  # class blocks aligned to the stride grid


GEO = {"crs": "EPSG:32632", "transform": from_origin(500000, 5000000, 10, 10)}


def block_classes(h: int, w: int) -> np.ndarray:
    """Ground truth: 64-pixel blocks whose classes differ from every neighbour's (``(i + 2j) % 10``)."""
    i, j = np.meshgrid(np.arange(h) // BLOCK, np.arange(w) // BLOCK, indexing="ij")
    return ((i + 2 * j) % len(EUROSAT_CLASSES)).astype(np.uint8)


def write_scene(path: Path, h: int = 256, w: int = 240, count: int = 13, crs: str = "EPSG:32632",
                nodata_box: int = 40) -> np.ndarray:
    """A georeferenced uint16 scene whose band 0 encodes the block class (1000 * (class + 1)); return the truth."""
    truth = block_classes(h, w)
    data = np.random.default_rng(0).integers(200, 4000, size=(count, h, w)).astype(np.uint16)
    data[0] = 1000 * (truth.astype(np.uint16) + 1)
    data[:, :nodata_box, :nodata_box] = 0  # nodata in every band
    truth[:nodata_box, :nodata_box] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=count, dtype="uint16",
                       **(GEO | {"crs": crs}), tiled=True) as dst:
        dst.write(data)
    return truth


def register_champion(tmp_path: Path, tracking_uri: str, name: str) -> str:
    """Log a tiny pyfunc to the server, register it as ``name`` and give it the champion alias."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("test-score")
    with mlflow.start_run():
        info = log_pyfunc(make_model_dir(tmp_path / "model"), synthetic_tiles(2))
    version = mlflow.register_model(info.model_uri, name)
    MlflowClient(tracking_uri).set_registered_model_alias(name, "champion", version.version)
    return version.version


def scoring_project(root: Path, tracking_uri: str, model: str) -> Path:
    """A project folder as a clone has it for scheduled scoring: prefect.yaml, flows/, a .venv, and params.yaml
    naming two scenes under ``root``, outputs in ``root/scores`` and the champion ``model`` of ``tracking_uri``."""
    project = root / "project"
    project.mkdir()
    shutil.copy(REPO / "prefect.yaml", project)
    shutil.copytree(REPO / "flows", project / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    (project / ".venv").symlink_to(sys.prefix)  # the venv this test runs in, where `source .venv/bin/activate` finds it
    register_champion(root, tracking_uri, model)
    for k in range(2):
        write_scene(root / "scenes" / f"scene_{k}.tif", h=128, w=128)
    (project / "params.yaml").write_text(yaml.safe_dump({
        "paths": {"scores": str(root / "scores"), "reports": str(root / "reports")},
        "score": {"model_uri": f"models:/{model}@champion", "scenes": str(root / "scenes"), "batch_size": 64},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "test-doors"}}))
    return project


def prefect_api(api_url: str, path: str, body: dict | None = None, method: str | None = None) -> object:
    """GET (or, with ``body``, POST or ``method``) one route of a Prefect server's REST API; the decoded JSON.

    A 503 is retried, as Prefect's own client does: a SQLite-backed server answers it when its database is locked
    by another writer (the worker, a finishing run)."""
    data = None if body is None else json.dumps(body).encode()
    tries = 6
    for attempt in range(tries):
        req = urllib.request.Request(f"{api_url}/{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
            return json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == tries - 1:
                raise
            time.sleep(0.5 * 2**attempt)
    return None


FINAL = ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"]


def wait_for_final_run(api_url: str, deployment: str, timeout: float) -> dict:
    """The first run of ``deployment`` (flow/deployment) to reach a final state; AssertionError after ``timeout`` s."""
    deployment_id = prefect_api(api_url, f"deployments/name/{deployment}")["id"]
    query = {"flow_runs": {"state": {"type": {"any_": FINAL}}, "deployment_id": {"any_": [deployment_id]}}}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = prefect_api(api_url, "flow_runs/filter", query)
        if runs:
            return runs[0]
        time.sleep(2)
    raise AssertionError(f"no run of {deployment} on {api_url} finished within {timeout:g} s")


def follow(proc: subprocess.Popen, seen: list[str] | None = None) -> tuple[queue.Queue, list[str]]:
    """Every line ``proc`` prints (text stdout), as it prints it: a queue ending with None, and ``seen``, the list
    of all lines so far (a new one when not given)."""
    seen = [] if seen is None else seen
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            seen.append(line)  # before the queue: a line taken from the queue is already in ``seen``
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines, seen


PACK_TEMPLATES = ["a satellite image of {}.", "a Sentinel-2 multispectral tile of {}.", "an aerial view of {}."]
PACK_DESCRIPTIONS = {"Forest": "forest", "Industrial": "industrial buildings", "SeaLake": "a sea or lake"}


def make_trained_model_dir(root: Path, calibrated: bool = True, steps: int = 80) -> tuple[Path, Path]:
    """A tiny model trained for seconds on the tiny packs (cross-entropy at a fixed temperature, spectral statistics
    on), worded like params.yaml's classes and, with ``calibrated``, open-set calibrated on their validation split.
    Returns the model folder and the packs folder."""
    from geoclip.model.clip import build_model
    from geoclip.model.openset import calibrate

    prepared = make_packs(root / "prepared", per_class=60)
    stats = json.loads((prepared / "stats.json").read_text())
    cfg = ModelConfig(image_encoder=TINY_ENCODER, embed_dim=32, band_names=list(ALL_BAND_NAMES),
                      class_names=list(PACK_CLASSES), band_mean=stats["mean"], band_std=stats["std"],
                      prompts=[[t.format(PACK_DESCRIPTIONS[c]) for t in PACK_TEMPLATES] for c in PACK_CLASSES],
                      spectral_stats=True, templates=list(PACK_TEMPLATES), descriptions=dict(PACK_DESCRIPTIONS))
    model = build_model(cfg, seed=0)
    model.logit_scale.requires_grad_(False)  # a fixed temperature: own-class cosines, not only margins, grow
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, y = np.load(prepared / "train_images.npy"), np.load(prepared / "train_labels.npy")
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(steps):
        idx = rng.choice(len(x), 32, replace=False)
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x[idx].astype(np.float32))),
                                                 torch.from_numpy(y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    if calibrated:
        model.cfg.open_set_quantiles = calibrate(model, np.load(prepared / "val_images.npy"),
                                                 np.load(prepared / "val_labels.npy"), batch_size=16)
    save_model(model, root / "model")
    return root / "model", prepared
