"""Prefect flow for training: ingest -> validate -> prepare -> train -> evaluate -> register, the same stages as DVC.

With ``train.nnodes`` > 1, training runs on that many nodes: one torchrun agent per node, placed by Dask (a worker
per node, started with ``--resources node=1``, so no node runs two agents), meeting at torchrun's own c10d
rendezvous, restarting the worker group from the last checkpoint after a failure (``train.max_restarts``) and
starting a lost agent again (Prefect retries of its task). Dask rather than a work pool per node: one flow run
places all agents at once and waits for all of them, and the same cluster serves the scoring fan-out.
"""

from __future__ import annotations

from urllib.parse import urlparse

from prefect import flow, task
from prefect.runtime import flow_run

from geoclip import stages
from geoclip.config import TrainConfig, load_params
from geoclip.errors import GeoclipError
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


def node_task_runner(cfg: TrainConfig):
    """Dask for the node agents: the cluster at ``train.dask_address``, else ``train.nnodes`` local processes."""
    from prefect_dask import DaskTaskRunner

    if cfg.dask_address:
        return DaskTaskRunner(address=cfg.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.nnodes, "threads_per_worker": 1, "processes": True,
                                          "host": "127.0.0.1", "resources": {"node": 1}})


@task
def rendezvous_task(nnodes: int) -> str:
    """Check the cluster has ``nnodes`` nodes; return a rendezvous endpoint (host:free port) on this node."""
    from distributed import get_client, get_worker

    workers = get_client().scheduler_info(n_workers=-1)["workers"].values()
    nodes = sum(1 for w in workers if w.get("resources", {}).get("node"))
    if nodes < nnodes:
        raise GeoclipError(f"train.nnodes: {nnodes}, but the Dask cluster has {nodes} worker(s) with resource "
                           "node; start one `dask worker SCHEDULER --nthreads 1 --resources node=1` per node")
    from geoclip.devtools.services import free_port

    host = urlparse(get_worker().address).hostname
    return f"{host}:{free_port(host)}"


def node_lost(task, task_run, state) -> bool:
    """Retry a node's agent that was lost (killed, cut off from its peers), never one whose workers named an error."""
    return isinstance(getattr(state, "data", None), stages.NodeLostError)


@task(retry_condition_fn=node_lost)
def node_task(params_path: str, endpoint: str, launch_id: str, node: int) -> None:
    """Run one node's torchrun agent until training ends on every node."""
    stages.run_node(params_path, endpoint, launch_id, node)


@flow(name="geoclip-training-nodes", log_prints=True)
def train_nodes_flow(params_path: str, launch_id: str | None = None) -> str:
    """Train on ``train.nnodes`` nodes (its task runner is set by :func:`training_flow`); return the MLflow run id.

    ``launch_id`` (default: this flow run's id) names the rendezvous and the checkpoints a restart resumes from.
    """
    import dask

    from geoclip.registry.tracking import read_run_info

    params = load_params(params_path)
    launch_id = launch_id or flow_run.id or "geoclip"
    with dask.annotate(resources={"node": 1}):  # one agent per node
        endpoint = rendezvous_task.submit(params.train.nnodes).result()
        print(f"{params.train.nnodes} nodes x {params.train.nproc_per_node} processes, rendezvous {endpoint}, "
              f"launch {launch_id}")
        node = node_task.with_options(retries=params.train.max_restarts)
        agents = [node.submit(params_path, endpoint, launch_id, i) for i in range(params.train.nnodes)]
    for agent in agents:
        agent.result()
    return read_run_info(params)["run_id"]


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
    params = load_params(params_path)  # fail fast on bad params, before any task
    if ingest:
        ingest_task(params_path)
    validate_task(params_path)
    prepare_task(params_path)
    if params.train.nnodes > 1:
        run_id = train_nodes_flow.with_options(task_runner=node_task_runner(params.train))(params_path)
    else:
        run_id = train_task(params_path)
    metrics = evaluate_task(params_path)
    registered = register_task(params_path)
    print(f"run {run_id}: {registered['metric']}={metrics.get(registered['metric'])} -> "
          f"{registered['name']} v{registered['version']} @{registered['alias']}")
    return registered


if __name__ == "__main__":
    training_flow()
