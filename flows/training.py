"""Prefect flow for training: ingest -> validate -> prepare -> train -> evaluate -> register, the same stages as DVC."""

from __future__ import annotations

from prefect import flow, task

from geoclip import stages
from geoclip.config import load_params
from geoclip.retries import retry_condition

IO_RETRIES = {"retries": 2, "retry_delay_seconds": [5, 30], "retry_condition_fn": retry_condition}


@task(**IO_RETRIES)
def ingest_task(params_path: str) -> dict:
    """Bring the tiles from ingest.source (synthetic, folder, manifest, s3://) into the raw folder."""
    return stages.ingest(load_params(params_path))


@task(**IO_RETRIES)
def validate_task(params_path: str) -> dict:
    """Run the Great Expectations suites on the raw data."""
    return stages.validate(load_params(params_path))


@task(**IO_RETRIES)
def prepare_task(params_path: str) -> str:
    """Split, compute band statistics and pack the tiles; return the prepared folder."""
    return str(stages.prepare(load_params(params_path)))


@task
def train_task(params_path: str) -> str:
    """Train through torchrun (no retries: a failed run is worth a look); return the MLflow run id."""
    from geoclip.registry.tracking import read_run_info

    stages.launch_training(params_path)
    return read_run_info(load_params(params_path))["run_id"]


@task(**IO_RETRIES)
def evaluate_task(params_path: str) -> dict:
    """Evaluate the trained model on the test split; return the metrics."""
    return stages.evaluate(load_params(params_path))


@task(retries=3, retry_delay_seconds=[5, 30, 120], retry_condition_fn=retry_condition)
def register_task(params_path: str) -> dict:
    """Log and register the model; move the champion alias only on a better metric."""
    return stages.register(load_params(params_path))


@flow(name="geoclip-training", log_prints=True)
def training_flow(params_path: str = "params.yaml", ingest: bool = True) -> dict:
    """Ingest (unless ``ingest`` is false: raw data already in place), validate, prepare, train, evaluate, register."""
    load_params(params_path)  # fail fast on bad params, before any task
    if ingest:
        ingest_task(params_path)
    validate_task(params_path)
    prepare_task(params_path)
    run_id = train_task(params_path)
    metrics = evaluate_task(params_path)
    registered = register_task(params_path)
    print(f"run {run_id}: {registered['metric']}={metrics.get(registered['metric'])} -> "
          f"{registered['name']} v{registered['version']} @{registered['alias']}")
    return registered


if __name__ == "__main__":
    training_flow()
