"""Tests for training: runs, MLflow logging, determinism, torchrun launch (1 and 2 processes), failures."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from geoclip.augment import augment
from geoclip.config import params_from_dict
from geoclip.errors import GeoclipError
from geoclip.model import load_model
from geoclip.storage import data_version
from geoclip.train import launch, main, train
from factories import PACK_CLASSES as CLASSES
from factories import make_packs, own_tracking_store, tiny_params_dict


@pytest.fixture(autouse=True)
def _own_tracking_store():
    with own_tracking_store():
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run shared by the tests below: (params, result)."""
    root = tmp_path_factory.mktemp("train")
    make_packs(root / "prepared")
    params = params_from_dict(tiny_params_dict(root))
    with own_tracking_store():
        return params, train(params)


def test_train_writes_model_run_info_and_history(trained):
    params, result = trained
    model_dir = Path(params.paths.model)
    assert result["epochs"] == 2 and 0.0 <= result["best_val_top1"] <= 1.0
    for name in ("model.pt", "model_config.json", "run.json", "history.json", "training_curve.png"):
        assert (model_dir / name).is_file(), name
    info = json.loads((model_dir / "run.json").read_text())
    assert info["run_id"] == result["run_id"]
    history = json.loads((model_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert max(h["val_top1"] for h in history) == result["best_val_top1"]
    assert all(np.isfinite(h["train_loss"]) and h["temperature"] > 0 for h in history)


def test_train_logs_params_metrics_tags_and_artifacts(trained):
    params, result = trained
    client = mlflow.MlflowClient(params.mlflow.tracking_uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.image_encoder"] == "resnet10t"
    assert run.data.tags["image_encoder"] == "resnet10t"
    assert run.data.tags["data_version"] == data_version(params.paths.prepared)  # DVC's hash of the packs
    assert run.data.tags["data_version"].endswith(".dir") and "data_hash" not in run.data.tags
    assert run.data.tags["git_revision"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")] == [1, 2]
    assert {"train_loss", "val_top1", "temperature", "lr"} <= set(run.data.metrics)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"history.json", "training_curve.png", "model"} <= names


def test_best_model_loads_and_reproduces_best_val_top1(trained):
    params, result = trained
    model = load_model(params.paths.model)
    val_x = np.load(Path(params.paths.prepared) / "val_images.npy")
    val_y = np.load(Path(params.paths.prepared) / "val_labels.npy")
    probs, emb = model.predict(torch.from_numpy(val_x))
    assert probs.shape == (len(val_y), 3) and emb.shape == (len(val_y), 32)
    assert float((probs.argmax(1).numpy() == val_y).mean()) == pytest.approx(result["best_val_top1"])


def test_same_seed_same_weights(tmp_path):
    """Two CPU runs with the same params and data end with identical state dicts."""
    make_packs(tmp_path / "prepared", per_class=12)
    states = []
    for name in ("a", "b"):
        d = tiny_params_dict(tmp_path, epochs=1)
        d["paths"]["model"] = str(tmp_path / name)
        train(params_from_dict(d))
        states.append(torch.load(tmp_path / name / "model.pt", weights_only=True))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_missing_packs_raise_geoclip_error(tmp_path):
    params = params_from_dict(tiny_params_dict(tmp_path))
    with pytest.raises(GeoclipError, match="train_images.npy: not found"):
        train(params)


def test_unknown_image_encoder_is_named(tmp_path):
    make_packs(tmp_path / "prepared", per_class=12)
    params = params_from_dict(tiny_params_dict(tmp_path, image_encoder="resnet9000"))
    with pytest.raises(GeoclipError, match="train.image_encoder: unknown timm model 'resnet9000'"):
        train(params)
    assert not (tmp_path / "model").exists()


def test_main_prints_one_error_line_and_exits_2(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params_dict(tmp_path)))
    with pytest.raises(SystemExit) as exc:
        main(["--params", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "train_images.npy: not found" in err and "\n" not in err


def test_augment_is_seeded_and_only_moves_pixels_without_gain():
    x = torch.randint(0, 10000, (8, 13, 16, 16), dtype=torch.int32).to(torch.uint16)
    a = augment(x, torch.Generator().manual_seed(5), gain_std=0.05)
    b = augment(x, torch.Generator().manual_seed(5), gain_std=0.05)
    assert torch.equal(a, b) and a.shape == x.shape and a.dtype == torch.float32
    plain = augment(x, torch.Generator().manual_seed(5), gain_std=0.0)
    # Flips and 90-degree turns permute each band's pixels: the sorted values do not change.
    assert torch.equal(plain.flatten(2).sort(-1).values, x.float().flatten(2).sort(-1).values)


def _write_params(root: Path, **train) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params_dict(root, **train)))
    return path


@pytest.mark.slow
def test_launch_through_torchrun_single_process(tmp_path):
    make_packs(tmp_path / "prepared", per_class=12)
    launch(_write_params(tmp_path, epochs=1))
    info = json.loads((tmp_path / "model" / "run.json").read_text())
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(info["run_id"])
    assert run.data.tags["world_size"] == "1" and "val_top1" in run.data.metrics


@pytest.mark.slow
def test_launch_two_gloo_processes_writes_one_model(tmp_path):
    make_packs(tmp_path / "prepared", per_class=12)
    launch(_write_params(tmp_path, epochs=1, nproc_per_node=2, num_threads=1))
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("geoclip-test").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["world_size"] == "2"  # only rank 0 tracks
    assert json.loads((tmp_path / "model" / "run.json").read_text())["run_id"] == runs[0].info.run_id
    assert load_model(tmp_path / "model").cfg.class_names == CLASSES


@pytest.mark.slow
def test_launch_failure_raises_with_the_workers_message(tmp_path):
    with pytest.raises(GeoclipError, match="train_images.npy: not found"):
        launch(_write_params(tmp_path))


DDP_GRADIENT_CHECK = '''
import copy, torch, torch.distributed as dist
from torch import nn
from geoclip.loss import label_aware_clip_loss
from geoclip.model import GeoCLIP, ModelConfig
from geoclip.train import _Step, _gather
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
cfg = ModelConfig("resnet10t", 16, [f"B{i}" for i in range(13)], ["a", "b", "c"], [["x"]] * 3, [1e3] * 13, [5e2] * 13)
model = GeoCLIP(cfg, torch.randn(3, 1, 384)).eval()  # eval: BatchNorm must not depend on the split
ref = copy.deepcopy(model)
x, y = torch.rand(8, 13, 64, 64) * 3000, torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
mine = slice(rank * 4, rank * 4 + 4)
ddp = nn.parallel.DistributedDataParallel(_Step(model))  # keep a reference: its hooks average the gradients
img, cls, scale = ddp(x[mine])
label_aware_clip_loss(_gather(img, world, True), cls, _gather(y[mine], world, False), scale).backward()
img, cls, scale = _Step(ref)(x)
label_aware_clip_loss(img, cls, y, scale).backward()
for p, q in zip(model.parameters(), ref.parameters()):
    # float32 sums in another order: equal up to ~1e-5 of each tensor's largest gradient
    assert (p.grad - q.grad).abs().max() <= 1e-4 * q.grad.abs().max() + 1e-12, "gradients differ"
print("ok", rank)
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_two_rank_gradients_equal_the_single_process_global_batch(tmp_path):
    """DDP + gathered embeddings give the same gradients as one process on the whole batch."""
    import subprocess
    import sys

    script = tmp_path / "ddp_check.py"
    script.write_text(DDP_GRADIENT_CHECK)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, env={**__import__("os").environ,
                                                                              "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok 0" in out.stdout and "ok 1" in out.stdout
