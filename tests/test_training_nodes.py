"""Multi-node training through Prefect (flows/training.py): two "nodes" on 127.0.0.1, each a Dask worker process
running one torchrun agent with one gloo process, against one node with two processes; a killed worker resumed."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
import yaml
from factories import TINY_ENCODER, make_packs, own_tracking_store, tiny_params_dict

from geoclip.errors import GeoclipError
from geoclip.stages import launch_training

pytestmark = pytest.mark.slow

# 12 tiles per class, batches of 6 over two ranks: 16 steps in 8 epochs, a checkpoint every 3 (inside the run, so a
# kill after one leaves most of the run to resume). One thread: bit-exact CPU math across processes.
TRAIN = {"image_encoder": TINY_ENCODER, "epochs": 8, "batch_size": 6, "num_threads": 1, "checkpoint_every": 3,
         "nproc_per_node": 1, "nnodes": 2, "max_restarts": 2, "join_timeout": 120}
STEPS = 16


@pytest.fixture(autouse=True)
def _own_tracking_store():
    with own_tracking_store():
        yield


def _params(root: Path, **train) -> str:
    """Tiny packs under ``root`` and a params file for a two-node run; returns its path."""
    make_packs(root / "prepared", per_class=12)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params_dict(root, **{**TRAIN, **train})))
    return str(path)


def _weights(root: Path) -> dict:
    return torch.load(root / "model" / "model.pt", weights_only=True)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _runs(root: Path) -> list:
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    return client.search_runs([client.get_experiment_by_name("geoclip-test").experiment_id])


@pytest.fixture(scope="module")
def one_node(tmp_path_factory) -> Path:
    """The reference: one node, two gloo processes (torchrun --standalone), same params otherwise."""
    root = tmp_path_factory.mktemp("one-node")
    with own_tracking_store():
        launch_training(_params(root, nnodes=1, nproc_per_node=2))
    return root


def _train_on_nodes(params_path: str) -> str:
    from flows.training import node_task_runner, train_nodes_flow
    from geoclip.config import load_params

    runner = node_task_runner(load_params(params_path).train)
    return train_nodes_flow.with_options(task_runner=runner)(params_path)


def test_two_nodes_train_to_the_weights_of_one_node_with_two_processes(prefect_harness, one_node, tmp_path):
    run_id = _train_on_nodes(_params(tmp_path))
    assert _same(_weights(tmp_path), _weights(one_node))  # bit for bit: same ranks, shards and all-reduce
    runs = _runs(tmp_path)
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].data.tags["world_size"] == "2"
    assert json.loads((tmp_path / "model" / "run.json").read_text())["run_id"] == run_id
    assert "resumed_from_step" not in runs[0].data.metrics


def _node_process(node: int, launch_id: str, agent: bool) -> psutil.Process | None:
    """Node ``node``'s torchrun agent for ``launch_id``, or (``agent`` false) the training process it started."""
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "geoclip.stages" in cmd and launch_id in cmd and ("torch.distributed.run" in cmd) == agent:
            try:
                if proc.environ().get("GEOCLIP_NODE") == str(node):
                    return proc
            except psutil.Error:
                continue
    return None


def test_a_node_that_loses_its_worker_then_its_agent_resumes_to_the_same_weights(prefect_harness, one_node,
                                                                                  tmp_path):
    """Node 1's training process is SIGKILLed: its torchrun agent restarts the group on both nodes. Later node 1's
    agent itself is SIGKILLed (its worker with it, as when a node goes down): Prefect starts the node's task again
    and the new agent rejoins the rendezvous. Each time the run resumes from the checkpoint, to the weights of an
    uninterrupted run."""
    from flows.training import node_task_runner, train_nodes_flow
    from geoclip.config import load_params

    params_path = _params(tmp_path)
    ckpt, launch_id, killed = tmp_path / "model" / "checkpoint.pt", "kill-test", []

    def step() -> int:
        try:
            return torch.load(ckpt, weights_only=True)["progress"]["step"]
        except (OSError, RuntimeError, EOFError):
            return -1  # not written yet (or being replaced)

    def kill_at_checkpoints() -> None:
        deadline = time.monotonic() + 300
        for victim in ("worker", "agent"):
            after = killed[-1] if killed else 0
            while step() <= after and time.monotonic() < deadline:
                time.sleep(0.01)
            target = _node_process(1, launch_id, agent=victim == "agent")
            if target is None:
                return
            killed.append(step())
            os.kill(target.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_at_checkpoints, daemon=True)
    killer.start()
    runner = node_task_runner(load_params(params_path).train)
    run_id = train_nodes_flow.with_options(task_runner=runner)(params_path, launch_id=launch_id)
    killer.join(timeout=10)
    assert len(killed) == 2 and killed[0] < killed[1] < STEPS, f"node 1 was not killed twice mid-run: {killed}"
    assert _same(_weights(tmp_path), _weights(one_node))  # resumed from the checkpoints, not retrained differently
    (run,) = _runs(tmp_path)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    resumed = [m.value for m in client.get_metric_history(run_id, "resumed_from_step")]
    assert len(resumed) == 2 and resumed[0] >= killed[0] and resumed[1] >= killed[1], (resumed, killed)


def test_a_cluster_with_too_few_nodes_is_named(prefect_harness, tmp_path):
    from distributed import LocalCluster

    from flows.training import node_task_runner, train_nodes_flow
    from geoclip.config import load_params

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
                      resources={"node": 1}) as cluster:
        params_path = _params(tmp_path, dask_address=cluster.scheduler_address)
        runner = node_task_runner(load_params(params_path).train)
        with pytest.raises(GeoclipError, match=r"train.nnodes: 2, but the Dask cluster has 1 worker"):
            train_nodes_flow.with_options(task_runner=runner)(params_path)
    assert not (tmp_path / "model").exists()
