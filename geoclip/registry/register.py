"""Log the trained model as a pyfunc, register it with tags and a description, and gate the ``champion`` alias.

The alias moves (gate, history, promote, rollback) live in ``geoclip.registry.aliases``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import tempfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from geoclip.bands import ALL_BAND_NAMES
from geoclip.config import Params
from geoclip.data.prepare import load_split
from geoclip.data.storage import data_version
from geoclip.data.tiles import read_tile
from geoclip.diskspace import size_of, writing
from geoclip.errors import GeoclipError
from geoclip.ioutils import write_json
from geoclip.registry.aliases import HOLDOUT_TAG, gate_version
from geoclip.registry.integrity import DIGEST_TAG, logged_model_digest
from geoclip.registry.tracking import flat_params, git_revision, read_run_info

REGISTERED_FILE = "registered.json"
METRICS_FILE = "metrics.json"
# The params that make the model from the data (DVC's train stage params): what ``params_hash`` covers.
MODEL_SECTIONS = ("bands", "classes", "train")


def read_metrics(params: Params) -> dict:
    """All of ``{paths.eval}/metrics.json``."""
    path = Path(params.paths.eval) / METRICS_FILE
    if not path.exists():
        raise GeoclipError(f"{path}: not found; run `geoclip evaluate` before `geoclip register`")
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise GeoclipError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(metrics, dict):
        raise GeoclipError(f"{path}: a JSON {type(metrics).__name__}; expected an object of metric: value")
    return metrics


def _finite(value) -> bool:
    """Whether ``value`` is a finite number (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def finite_metrics(metrics: dict) -> dict[str, float]:
    """The metrics that are finite numbers (lists, strings, NaN and infinities left out)."""
    return {k: float(v) for k, v in sorted(metrics.items()) if _finite(v)}


def read_metric(params: Params) -> float:
    """The promotion metric (``register.metric``) from ``{paths.eval}/metrics.json``."""
    path = Path(params.paths.eval) / METRICS_FILE
    metrics = read_metrics(params)
    name = params.register.metric
    value = metrics.get(name)
    if not _finite(value):
        raise GeoclipError(f"{path}: register.metric {name!r} is {value!r}; expected a finite number "
                           f"(keys: {sorted(metrics)})")
    return float(value)


def params_hash(params: Params) -> str:
    """sha256 of the canonical JSON of the params that make the model (``MODEL_SECTIONS``)."""
    full = asdict(params)
    blob = json.dumps({k: full[k] for k in MODEL_SECTIONS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def check_run_params(params: Params, logged: dict[str, str], run_id: str) -> None:
    """Refuse params that differ from those the training run logged: the version's params hash would lie."""
    for key, value in flat_params(params).items():
        if key.split(".")[0] in MODEL_SECTIONS and key in logged and logged[key] != value:
            raise GeoclipError(f"params {key}: {value[:60]!r} but training run {run_id} logged {logged[key][:60]!r}; "
                               "register with the params the model was trained with, or retrain")


def holdout_of(params: Params, run_params: dict[str, str], run_tags: dict[str, str]) -> str:
    """The class held out of training: params' ``train.holdout_class``, else what the run logged; "" if none."""
    for value in (params.train.holdout_class, run_params.get("train.holdout_class", ""),
                  run_tags.get(HOLDOUT_TAG, "")):
        if value and value != "none":  # training and evaluation tag "none" when no class is held out
            return value
    return ""


def split_counts(prepared: str | Path) -> dict[str, int]:
    """Tiles per split from ``index.csv`` (empty when there is none)."""
    index = Path(prepared) / "index.csv"
    if not index.exists():
        return {}
    with open(index, newline="") as f:
        return dict(Counter(row.get("split") or "all" for row in csv.DictReader(f)))


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


def prior_provenance(model_dir: str | Path) -> dict[str, str]:
    """What the saved model records of its pretrained prior (empty without one)."""
    path = Path(model_dir) / "model_config.json"
    return dict(json.loads(path.read_text()).get("provenance") or {}) if path.exists() else {}


def prior_tags(model_dir: str | Path) -> dict[str, str]:
    """The version tag of the model's prior, its name (none without one); its package release, licence, digest and
    training data go into the description (few tags: the registry page shows them all)."""
    provenance = prior_provenance(model_dir)
    return {"pretrained": provenance["pretrained"]} if provenance else {}


def prior_line(model_dir: str | Path) -> str:
    """The description's line on the prior."""
    p = prior_provenance(model_dir)
    if not p:
        return "Prior: none (image encoder trained from random weights)."
    return (f"Prior: {p['pretrained']} ({p.get('pretrained_architecture', '')}, {p.get('pretrained_package', '')}, "
            f"licence {p.get('pretrained_licence', '')}, sha256 {p.get('pretrained_sha256', '')[:12]}; trained on "
            f"{p.get('pretrained_trained_on', '')}).")


def describe(params: Params, tags: dict[str, str], metrics: dict[str, float], counts: dict[str, int],
             gate: dict) -> str:
    """The version's description: what data, params and metrics made it, and the gate's decision."""
    t = params.train
    tiles = " / ".join(f"{split} {n}" for split, n in sorted(counts.items())) or "unknown (no index.csv)"
    metric = params.register.metric
    value = tags.get(metric)
    lines = [  # the decision first: the registry UI shows the description above the (long) tag list
        (f"**{gate['alias']}** - {metric} **{float(value):.4g}**" if value is not None else f"**{gate['alias']}**")
        + f"; {gate['reason']}; git {tags['git_revision'][:12]}; data {tags.get('data_version', 'unknown')[:12]}.",
        (f"Data: data_version {tags.get('data_version', 'unknown')}; tiles {tiles}; "
         f"{len(params.bands)} bands {' '.join(params.bands)}."),
        prior_line(params.paths.model),
        (f"Params: encoder {prior_provenance(params.paths.model).get('pretrained_architecture') or t.image_encoder}, "
         f"loss {t.loss}, epochs {t.epochs}, batch {t.batch_size}, "
         f"lr {lr_text(t)}, embed_dim {t.embed_dim}, holdout_class {tags.get(HOLDOUT_TAG, 'none')}; "
         f"params_hash {tags['params_hash'][:12]} (sha256 of {'/'.join(MODEL_SECTIONS)})."),
        "Metrics: " + (", ".join(f"{k} {v:.4g}" for k, v in metrics.items()) or "none") + ".",
        f"Gate: {gate['alias']}: {gate['reason']}.",
        f"Run {tags['run_id']}, git {tags['git_revision']}.",
    ]
    return "\n\n".join(lines)  # blank lines: the registry UI renders the description as markdown


def version_of_run(client: MlflowClient, name: str, run_id: str):
    """The version of ``name`` already registered from training run ``run_id``, or None."""
    try:
        found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return max(found, key=lambda v: int(v.version)) if found else None


def earlier_result(params: Params, version) -> dict:
    """What ``register`` returned when it registered ``version`` (``registered.json``), else rebuilt from the
    version's tags and aliases (the earlier attempt stopped before writing it)."""
    path = Path(params.paths.model) / REGISTERED_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if str(saved.get("version")) == str(version.version) and saved.get("run_id") == version.tags.get("run_id"):
            return saved
    cfg = params.register
    alias, _, reason = version.tags["gate"].partition(": ")
    metric = version.tags.get(cfg.metric)
    result = {"name": cfg.model_name, "version": str(version.version), "alias": alias, "reason": reason,
              "metric": cfg.metric, "value": None if metric is None else float(metric), "margin": cfg.margin,
              "champion_version": None, "previous_champion_version": None, "previous_champion_value": None,
              "holdout_class": version.tags.get(HOLDOUT_TAG) or None, "params_hash": version.tags.get("params_hash"),
              "data_version": version.tags.get("data_version"), "run_id": version.tags.get("run_id"),
              "model_uri": f"models:/{cfg.model_name}/{version.version}"}
    write_json(path, result)
    return result


def lr_text(train) -> str:
    """The learning rate the run trained at, and where it came from when it was scaled to the batch."""
    if train.lr_scaling == "none":
        return f"{train.lr:g}"
    return f"{train.scaled_lr():g} ({train.lr_scaling} from {train.lr:g} at batch {train.lr_base_batch})"


def _log_and_register(params: Params, client: MlflowClient, run_id: str, value: float,
                      holdout: str) -> tuple[str, dict[str, str]]:
    """Log the pyfunc into the training run and register it with its tags; return the version and the tags."""
    import mlflow

    from geoclip.registry.pyfunc import log_pyfunc

    cfg = params.register
    example = input_example(params)
    # MLflow stages the model in a temp folder, then copies it to the artifact store: either may fill up.
    with mlflow.start_run(run_id=run_id), writing(tempfile.gettempdir(), "the model's MLflow artifacts",
                                                  size_of(params.paths.model)):
        model_info = log_pyfunc(params.paths.model, example, name="model", tta=params.evaluate.tta)
    # Few tags, the ones a reviewer and the gate need: every metric is in the description and on the run (a tag
    # per metric made the registry UI show 3 of 22 tags, the deciding ones scrolled away).
    tags = {cfg.metric: repr(value), "metric": cfg.metric, "git_revision": git_revision(), "run_id": run_id,
            "params_hash": params_hash(params),
            DIGEST_TAG: logged_model_digest(model_info.model_uri)}  # checked before every load for scoring
    if holdout:
        tags[HOLDOUT_TAG] = holdout
    tags |= prior_tags(params.paths.model)
    if (Path(params.paths.prepared) / "index.csv").exists():
        tags["data_version"] = data_version(params.paths.prepared)
    # Tags go in with the version: the gate never sees a version without its metric.
    return str(mlflow.register_model(model_info.model_uri, cfg.model_name, tags=tags).version), tags


def register(params: Params) -> dict:
    """Log, register, tag and describe the model of the training run; the gate picks ``champion`` or ``challenger``.

    Idempotent for a training run: run again (a retried Prefect task), it finds the version it registered and
    returns the same answer, or finishes that version's gate if the earlier attempt stopped before it.
    """
    import mlflow

    cfg = params.register
    value = read_metric(params)  # before touching MLflow: nothing is logged for a run without metrics
    metrics = finite_metrics(read_metrics(params))
    info = read_run_info(params)
    client = MlflowClient()
    try:
        run = client.get_run(info["run_id"])
    except MlflowException as exc:
        raise GeoclipError(f"{Path(params.paths.model) / 'run.json'}: run {info['run_id']} not found in "
                           f"{mlflow.get_tracking_uri()} ({str(exc).splitlines()[0]})") from None
    check_run_params(params, run.data.params, info["run_id"])
    holdout = holdout_of(params, run.data.params, run.data.tags)
    counts = split_counts(params.paths.prepared)
    earlier = version_of_run(client, cfg.model_name, info["run_id"])  # a retried task: no second version
    if earlier is not None and "gate" in earlier.tags:
        return earlier_result(params, earlier)
    if earlier is not None:  # registered, then interrupted before the gate: finish that version
        version, tags = str(earlier.version), dict(earlier.tags)
    else:
        version, tags = _log_and_register(params, client, info["run_id"], value, holdout)
    gate = gate_version(client, cfg, version, value, holdout)
    client.update_model_version(cfg.model_name, version, description=describe(params, tags, metrics, counts, gate))
    result = {"name": cfg.model_name, "version": version, "alias": gate["alias"], "reason": gate["reason"],
              "metric": cfg.metric, "value": value, "margin": cfg.margin, "champion_version": gate["champion_version"],
              "previous_champion_version": gate["previous_champion_version"],
              "previous_champion_value": gate["previous_champion_value"], "holdout_class": holdout or None,
              "params_hash": tags["params_hash"], "data_version": tags.get("data_version"),
              "run_id": info["run_id"], "model_uri": f"models:/{cfg.model_name}/{version}"}
    write_json(Path(params.paths.model) / REGISTERED_FILE, result)
    return result
