"""MLflow plumbing shared by the train, evaluate and register steps (never used by model code)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import mlflow

from geoclip.config import Params
from geoclip.data.s3 import redact
from geoclip.errors import GeoclipError

RUN_INFO_FILE = "run.json"


def configure(params: Params) -> str:
    """Point MLflow at the configured tracking URI and experiment; return the experiment id."""
    uri = params.mlflow.resolved_tracking_uri()
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    # mlflow also exports the URI to the environment; undo that so the next configure() sees only the user's choice.
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    try:
        experiment = mlflow.get_experiment_by_name(params.mlflow.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
            if not uri.startswith(("http://", "https://", "databricks")):
                from geoclip.registry.relocate import check_location

                check_location(params, experiment.artifact_location)  # not a moved project's old artifacts
        else:
            # A local artifact folder only makes sense for a local (sqlite/file) store; a server proxies its own.
            location = None
            if not uri.startswith(("http://", "https://", "databricks")):
                location = Path(params.mlflow.artifact_location).resolve().as_uri()
            experiment_id = mlflow.create_experiment(params.mlflow.experiment, artifact_location=location)
        mlflow.set_experiment(experiment_id=experiment_id)
    except mlflow.exceptions.MlflowException as exc:  # the store did not answer: say which one and what to set
        where = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "mlflow.tracking_uri"
        detail = redact((str(exc).splitlines() or [type(exc).__name__])[0])[:200]
        raise GeoclipError(f"MLflow tracking store {redact(uri)} ({where}) cannot be used ({detail}); start it, or "
                           f"set {where} to one that answers") from exc
    return experiment_id


def flat_params(params: Params) -> dict[str, str]:
    """Flatten params into ``section.key`` strings for ``mlflow.log_params``."""
    out: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = str(value)[:500]

    walk("", asdict(params))
    return out


def pipeline_outputs(dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    """What ``dvc repro`` itself writes: ``dvc.lock`` and every stage's outs, metrics and plots (paths as listed)."""
    import yaml

    written = ["dvc.lock"]
    try:
        stages = (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return written
    for stage in stages.values():
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key) or []:
                written.append(next(iter(entry)) if isinstance(entry, dict) else str(entry))
    return written


def git_changes() -> list[str]:
    """Tracked files that differ from the commit, less what the pipeline writes itself (so a run under
    ``dvc repro``, which rewrites dvc.lock before training, still traces to a clean commit)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                             check=True).stdout
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return []
    written = [w.rstrip("/") for w in pipeline_outputs(Path(top) / "dvc.yaml")]  # porcelain paths: from the top
    changed = [line[3:].split(" -> ")[-1].strip('"') for line in out.splitlines() if line.strip()]
    return [f for f in changed if not any(f == w or f.startswith(w + "/") for w in written)]


def git_revision() -> str:
    """The current git commit (with ``-dirty`` when files other than the pipeline's own outputs differ from it),
    or ``unknown``."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("-dirty" if git_changes() else "")


def git_tags() -> dict[str, str]:
    """``git_revision`` and ``git_changes`` (the differing files, ``none``, or the first 20 and a count)."""
    changes = git_changes()
    shown = ", ".join(changes[:20]) + (f" (+{len(changes) - 20} more)" if len(changes) > 20 else "")
    return {"git_revision": git_revision(), "git_changes": shown or "none"}


def write_run_info(params: Params, run_id: str, experiment_id: str) -> Path:
    """Record which MLflow run the current model belongs to, for the later stages."""
    from geoclip.ioutils import write_json

    path = Path(params.paths.model) / RUN_INFO_FILE
    write_json(path, {"run_id": run_id, "experiment_id": experiment_id,
                      "tracking_uri": params.mlflow.resolved_tracking_uri()})
    return path


def read_run_info(params: Params) -> dict:
    """Read ``run.json`` written by training; configure MLflow to the same store."""
    path = Path(params.paths.model) / RUN_INFO_FILE
    if not path.exists():
        raise GeoclipError(f"{path}: not found; run `geoclip train` first")
    info = json.loads(path.read_text())
    configure(params)
    return info


VALIDATION_ARTIFACTS = "validation"


def log_validation(params: Params) -> list[str]:
    """Attach the data-validation results (JSON, Data Docs, split checks) to the active run; return what was logged.

    A model then leads back not only to its data version but to the proof that this data passed its checks.
    """
    reports, prepared = Path(params.paths.reports), Path(params.paths.prepared)
    logged = []
    for path in (reports / "validation.json", reports / "validation.html"):
        if path.is_file():
            mlflow.log_artifact(str(path), artifact_path=VALIDATION_ARTIFACTS)
            logged.append(path.name)
    for site in ("data_docs", "data_docs_splits"):  # Great Expectations Data Docs of validate and prepare
        if (reports / site).is_dir():
            mlflow.log_artifacts(str(reports / site), artifact_path=f"{VALIDATION_ARTIFACTS}/{site}")
            logged.append(site)
    splits = prepared / "validation.json"
    if splits.is_file():
        mlflow.log_artifact(str(splits), artifact_path=f"{VALIDATION_ARTIFACTS}/splits")
        logged.append("splits/validation.json")
    summary = reports / "validation.json"
    if summary.is_file():
        mlflow.set_tag("validation_success", str(json.loads(summary.read_text()).get("success", False)).lower())
    return logged


class MlflowRunLog:
    """The training run log (``geoclip.training.train.RunLog``) backed by the active MLflow run."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log scalar metrics to the MLflow run."""
        mlflow.log_metrics(metrics, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set tags on the MLflow run."""
        mlflow.set_tags(tags)


def training_run_opener(params: Params, checkpoint: Path):
    """An ``OpenRunLog`` for training: start the MLflow run (params, git revision, data version, encoder, world size
    and holdout tags), or reopen the one a checkpoint names; the run ends FAILED if training raises."""

    @contextlib.contextmanager
    def open_run(resumed_run_id: str | None) -> Iterator[MlflowRunLog]:
        from geoclip.data.storage import data_version

        data_ver = data_version(params.paths.prepared)  # DVC's hash of the packs, as in dvc.lock
        experiment_id = configure(params)
        if resumed_run_id:
            try:
                run = mlflow.start_run(run_id=resumed_run_id)
            except mlflow.exceptions.MlflowException as exc:
                raise GeoclipError(f"{checkpoint}: its MLflow run {resumed_run_id} cannot be reopened in "
                                   f"{params.mlflow.resolved_tracking_uri()} ({str(exc).splitlines()[0]})") from None
        else:
            run = mlflow.start_run(experiment_id=experiment_id)
        with run:  # ends the run, FAILED when training raises
            if not resumed_run_id:  # params were logged when the run began; MLflow refuses to change them
                mlflow.log_params(flat_params(params))
            mlflow.set_tags({**git_tags(), "image_encoder": params.train.image_encoder,
                             "data_version": data_ver, "world_size": os.environ.get("WORLD_SIZE", "1"),
                             "holdout_class": params.train.holdout_class or "none"})
            yield MlflowRunLog(run.info.run_id)

    return open_run


def log_training_results(params: Params, run_id: str, files: list[Path], model_files: list[Path]) -> Path:
    """Attach a finished training's files (history, curve; ``model_files`` under ``model/``) and the data-validation
    reports to its MLflow run; write ``run.json`` for the later stages and return its path."""
    configure(params)
    with mlflow.start_run(run_id=run_id) as run:
        for path in files:
            mlflow.log_artifact(str(path))
        for path in model_files:
            mlflow.log_artifact(str(path), artifact_path="model")
        log_validation(params)
    return write_run_info(params, run_id, run.info.experiment_id)


def log_evaluation(params: Params, run_id: str, scalars: dict[str, float], files: list[Path]) -> None:
    """Add evaluation metrics, the holdout tag and the evaluation files (under ``eval/``) to the training run."""
    configure(params)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(scalars)
        mlflow.set_tags({"holdout_class": params.train.holdout_class or "none"})  # as training tags it
        for path in files:
            mlflow.log_artifact(str(path), artifact_path="eval")
