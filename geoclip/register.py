"""Log the trained model as a pyfunc, register it, and gate the ``champion`` alias on the metric."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from geoclip.bands import ALL_BAND_NAMES
from geoclip.config import Params
from geoclip.errors import GeoclipError
from geoclip.ioutils import write_json
from geoclip.prepare import load_split
from geoclip.storage import data_version
from geoclip.tiles import read_tile
from geoclip.tracking import git_revision, read_run_info

REGISTERED_FILE = "registered.json"
METRICS_FILE = "metrics.json"


def read_metric(params: Params) -> float:
    """The promotion metric (``register.metric``) from ``{paths.eval}/metrics.json``."""
    path = Path(params.paths.eval) / METRICS_FILE
    if not path.exists():
        raise GeoclipError(f"{path}: not found; run `geoclip evaluate` before `geoclip register`")
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise GeoclipError(f"{path}: not valid JSON ({exc})") from exc
    name = params.register.metric
    value = metrics.get(name) if isinstance(metrics, dict) else None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        keys = sorted(metrics) if isinstance(metrics, dict) else []
        raise GeoclipError(f"{path}: register.metric {name!r} is {value!r}; expected a finite number (keys: {keys})")
    return float(value)


def input_example(params: Params, n: int = 2) -> np.ndarray:
    """``n`` real test tiles as the pyfunc takes them: uint16, all 13 bands in EuroSAT order."""
    test = load_split(params.paths.prepared, "test")
    if len(test.images) < n:
        raise GeoclipError(f"{params.paths.prepared}: test split has {len(test.images)} tile(s), need {n}")
    if list(test.band_names) == list(ALL_BAND_NAMES):
        return np.array(test.images[:n], dtype=np.uint16)
    # The packs hold only the selected bands; the pyfunc takes whole files, so read the raw tiles.
    index = Path(params.paths.prepared) / "index.csv"
    import pandas as pd

    rows = pd.read_csv(index, dtype=str)
    paths = rows.loc[rows["split"] == "test", "path"].head(n)
    return np.stack([read_tile(Path(params.paths.raw) / p) for p in paths]).astype(np.uint16)


def _alias_version(client: MlflowClient, name: str, alias: str):
    """The model version holding ``alias``, or None."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _tag_value(version, metric: str) -> float:
    """A version's metric from its tag; -inf when missing (registered outside this gate)."""
    try:
        return float(version.tags[metric])
    except (KeyError, TypeError, ValueError):
        return -math.inf


def register(params: Params) -> dict:
    """Log, register and tag the model of the training run; move ``champion`` only on a strictly better metric."""
    import mlflow

    from geoclip.pyfunc import log_pyfunc

    cfg = params.register
    value = read_metric(params)  # before touching MLflow: nothing is logged for a run without metrics
    info = read_run_info(params)
    example = input_example(params)
    with mlflow.start_run(run_id=info["run_id"]):
        model_info = log_pyfunc(params.paths.model, example, name="model")
    tags = {cfg.metric: repr(value), "metric": cfg.metric, "git_revision": git_revision(), "run_id": info["run_id"]}
    if (Path(params.paths.prepared) / "index.csv").exists():
        tags["data_version"] = data_version(params.paths.prepared)
    # Tags go in with the version: the gate never sees a version without its metric.
    version = mlflow.register_model(model_info.model_uri, cfg.model_name, tags=tags)
    client = MlflowClient()

    champion = _alias_version(client, cfg.model_name, cfg.champion_alias)
    best = _tag_value(champion, cfg.metric) if champion is not None else None
    if champion is None or value > best:
        alias, champion_version = cfg.champion_alias, str(version.version)
    else:
        alias, champion_version = cfg.challenger_alias, str(champion.version)
    client.set_registered_model_alias(cfg.model_name, alias, version.version)
    previous = best if best is not None and math.isfinite(best) else None  # JSON has no -Infinity
    result = {"name": cfg.model_name, "version": str(version.version), "alias": alias, "metric": cfg.metric,
              "value": value, "champion_version": champion_version, "previous_champion_value": previous,
              "run_id": info["run_id"], "model_uri": f"models:/{cfg.model_name}/{version.version}"}
    write_json(Path(params.paths.model) / REGISTERED_FILE, result)
    return result
