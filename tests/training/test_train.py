"""Tests for training: runs, MLflow logging, determinism, torchrun launch (1 and 2 processes), failures,
checkpoints and resume (also after SIGKILL), early stopping, the held-out class and the DataLoader path."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest
import torch
import yaml
from factories import PACK_CLASSES as CLASSES
from factories import TINY_ENCODER, make_model_dir, make_packs, own_tracking_store, tiny_params_dict

from geoclip.cli import main as cli_main
from geoclip.config import load_params, params_from_dict
from geoclip.data.storage import data_version
from geoclip.errors import GeoclipError
from geoclip.model.clip import load_model
from geoclip.stages import launch_training, main, torchrun_command, train

# 12 tiles per class: 8 train tiles each, 24 in all, so 4 batches of 6 per epoch and 12 steps in 3 epochs;
# checkpoints at steps 5 and 10 both fall inside an epoch. One thread: bit-exact CPU math across processes.
TINY = {"image_encoder": TINY_ENCODER, "epochs": 3, "batch_size": 6, "num_threads": 1, "checkpoint_every": 5}


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
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch_val_top1")] == [1, 2]
    assert {"train_loss", "epoch_val_top1", "temperature", "lr"} <= set(run.data.metrics)
    assert "val_top1" not in run.data.metrics  # evaluation's alone: one name, one meaning
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


def test_a_scaled_learning_rate_trains_as_that_rate_written_out_and_cpu_runs_skip_compiling(tmp_path, capsys):
    """lr 0.001 at base batch 16, linear, batch 32 == lr 0.002 as is; train.compile is said to be skipped on the CPU."""
    make_packs(tmp_path / "prepared", per_class=12)
    states = []
    for name, opts in (("written", {"lr": 0.002}),
                       ("scaled", {"lr": 0.001, "lr_scaling": "linear", "lr_base_batch": 16,
                                   "compile": "reduce-overhead"})):
        d = tiny_params_dict(tmp_path, epochs=1, batch_size=32, **opts)
        d["paths"]["model"] = str(tmp_path / name)
        with own_tracking_store():
            train(params_from_dict(d))
        states.append(torch.load(tmp_path / name / "model.pt", weights_only=True))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert "train.compile: 'reduce-overhead' is for GPUs; training on the CPU without compiling" in \
        capsys.readouterr().err


def test_real_share_and_sentinel2_augmentation_train_reproducibly(tmp_path):
    """The real-tile recipe (real share of each batch, offsets, noise, crops) is seeded like the rest; it changes
    what training sees (other weights than the plain recipe)."""
    make_packs(tmp_path / "prepared", per_class=12)
    index_path = tmp_path / "prepared" / "index.csv"
    index = pd.read_csv(index_path)
    index["source"] = ["/data/EuroSAT_MS" if i % 4 == 0 else "synthetic" for i in range(len(index))]
    index.to_csv(index_path, index=False)
    recipe = {"real_share": 0.5, "offset_noise": 0.1, "pixel_noise": 0.05, "crop_scale": 0.75, "class_balance": True,
              "spectral_stats": True}
    states = []
    data_side = {k: v for k, v in recipe.items() if k != "spectral_stats"}
    for name, extra in (("a", recipe), ("b", recipe), ("plain", {}), ("data_side", data_side)):
        d = tiny_params_dict(tmp_path, epochs=1, **extra)
        d["paths"]["model"] = str(tmp_path / name)
        train(params_from_dict(d))
        states.append(torch.load(tmp_path / name / "model.pt", weights_only=True))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(k.startswith("stats_mlp.") for k in states[0]) and not any(k.startswith("stats_mlp.") for k in states[2])
    assert load_model(tmp_path / "a").cfg.spectral_stats
    assert states[3].keys() == states[2].keys()  # the sampling and augmentation params change what training sees
    assert not all(torch.equal(states[3][k], states[2][k]) for k in states[2])


@pytest.mark.parametrize("key, value", [("real_share", 1.0), ("crop_scale", 0.0), ("pixel_noise", -0.1)])
def test_recipe_params_out_of_range_are_named(tmp_path, key, value):
    with pytest.raises(GeoclipError, match=f"train.{key}: {value}; expected a number"):
        params_from_dict(tiny_params_dict(tmp_path, **{key: value}))


@pytest.mark.parametrize("key, value, message", [
    ("input_size", -1, "train.input_size: -1; expected a side in pixels"),
    ("freeze_image", "stage two", "train.freeze_image: 'stage two'; expected none, all, or 'stage N'"),
    ("feature_stages", [2.5], r"train.feature_stages\[0\]: expected int")])
def test_prior_params_out_of_range_are_named(tmp_path, key, value, message):
    with pytest.raises(GeoclipError, match=message):
        params_from_dict(tiny_params_dict(tmp_path, **{key: value}))


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


def _write_params(root: Path, **train) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params_dict(root, **train)))
    return path


@pytest.mark.slow
def test_launch_through_torchrun_single_process(tmp_path):
    make_packs(tmp_path / "prepared", per_class=12)
    launch_training(_write_params(tmp_path, epochs=1))
    info = json.loads((tmp_path / "model" / "run.json").read_text())
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(info["run_id"])
    assert run.data.tags["world_size"] == "1" and "epoch_val_top1" in run.data.metrics


@pytest.mark.slow
def test_launch_two_gloo_processes_writes_one_model(tmp_path):
    make_packs(tmp_path / "prepared", per_class=12)
    launch_training(_write_params(tmp_path, epochs=1, nproc_per_node=2, num_threads=1))
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("geoclip-test").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["world_size"] == "2"  # only rank 0 tracks
    assert json.loads((tmp_path / "model" / "run.json").read_text())["run_id"] == runs[0].info.run_id
    assert load_model(tmp_path / "model").cfg.class_names == CLASSES
    rngs = torch.load(tmp_path / "model" / "checkpoint.pt", weights_only=True)["rng"]
    assert len(rngs) == 2  # every rank's random streams, each rank's augmentation its own
    assert not torch.equal(rngs[0]["generators"]["augment"], rngs[1]["generators"]["augment"])


@pytest.mark.slow
def test_launch_failure_raises_with_the_workers_message(tmp_path):
    with pytest.raises(GeoclipError, match="train_images.npy: not found"):
        launch_training(_write_params(tmp_path))


DDP_GRADIENT_CHECK = '''
import copy, torch, torch.distributed as dist
from torch import nn
from geoclip.model.loss import LOSSES
from geoclip.model.clip import GeoCLIP, ModelConfig
from geoclip.training.distributed import gather
from geoclip.training.step import EmbeddingStep
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # the same batch on both ranks
x, y = torch.rand(8, 13, 64, 64) * 3000, torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
mine = slice(rank * 4, rank * 4 + 4)


def close(a, b):
    """float32 sums in another order: equal up to ~1e-5 of the tensor's largest value."""
    return (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-12


for name in ("clip", "siglip"):
    torch.manual_seed(0)
    cfg = ModelConfig("resnet10t", 16, [f"B{i}" for i in range(13)], ["a", "b", "c"], [["x"]] * 3, [1e3] * 13,
                      [5e2] * 13, loss=name)
    model = GeoCLIP(cfg, torch.randn(3, 1, 384)).eval()  # eval: BatchNorm must not depend on the split
    ref = copy.deepcopy(model)
    ddp = nn.parallel.DistributedDataParallel(EmbeddingStep(model))  # keep a reference: its hooks average the gradients
    img, cls, scale, bias = ddp(x[mine])
    loss = LOSSES[name](gather(img, world, True), cls, gather(y[mine], world, False), scale, bias)
    loss.backward()
    img, cls, scale, bias = EmbeddingStep(ref)(x)
    ref_loss = LOSSES[name](img, cls, y, scale, bias)
    ref_loss.backward()
    assert close(loss.detach(), ref_loss.detach()), f"{name}: losses differ"
    for p, q in zip(model.parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None) and (q.grad is None or close(p.grad, q.grad)), f"{name}: grads"
    for m in (model, ref):  # one optimiser step each: the weights stay together
        torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3).step()
    assert all(close(p, q) for p, q in zip(model.parameters(), ref.parameters())), f"{name}: weights differ"
    print("ok", name, rank)

# The caption loss: one step of training_step on two ranks (each half the batch) equals one process on the whole
# batch. Tiles are uniform in space so augmentation's flips, drawn per rank, change nothing.
from geoclip.training.step import training_step
torch.manual_seed(0)
cfg = ModelConfig("resnet10t", 16, [f"B{i}" for i in range(13)], ["a", "b", "c"], [["x"]] * 3, [1e3] * 13,
                  [5e2] * 13)
model = GeoCLIP(cfg, torch.randn(3, 1, 384)).eval()
ref = copy.deepcopy(model)
flat = (torch.rand(8, 13, 1, 1) * 3000).expand(8, 13, 64, 64).contiguous()
features, ids = torch.randn(5, 384), torch.tensor([0, 1, 1, -1, 2, 4, 4, 0])


def one_step(m, module, xs, ys, cs, world):
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return training_step(module, m, opt, sched, xs, ys, torch.arange(3), loss_fn=LOSSES["clip"],
                         generator=torch.Generator().manual_seed(0), gain_noise=0.0, bf16=False, channels_last=False,
                         world=world, caption_ids=cs, caption_features=features, caption_weight=0.5)


ddp = nn.parallel.DistributedDataParallel(EmbeddingStep(model))
loss = one_step(model, ddp, flat[mine], y[mine], ids[mine], world)
ref_loss = one_step(ref, EmbeddingStep(ref), flat, y, ids, 1)
assert close(loss, ref_loss), f"captions: losses differ {loss} {ref_loss}"
assert all(close(p, q) for p, q in zip(model.parameters(), ref.parameters())), "captions: weights differ"
print("ok captions", rank)
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_two_rank_losses_gradients_and_steps_equal_the_single_process_global_batch(tmp_path):
    """DDP + gathered embeddings give the same loss, gradients and updated weights as one process on the batch,
    with the caption loss too."""
    import subprocess
    import sys

    script = tmp_path / "ddp_check.py"
    script.write_text(DDP_GRADIENT_CHECK)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], check=False, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert {f"ok {n} {r}" for n in ("clip", "siglip", "captions") for r in (0, 1)} <= set(out.stdout.splitlines())


def _tiny(root: Path, store: str, **train_opts) -> Path:
    """Tiny packs under ``root`` (made once) and a params file for a TINY run; returns the params path."""
    if not (root / "prepared").exists():
        make_packs(root / "prepared", per_class=12)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params_dict(root, tracking_uri=store, **{**TINY, **train_opts})))
    return path


def _train(path: Path, resume: bool = False) -> dict:
    """Train in this process from a params file, leaving torch's thread count as it was."""
    threads = torch.get_num_threads()
    try:
        return train(load_params(path), resume=resume)
    finally:
        torch.set_num_threads(threads)


def _weights(model_dir: Path) -> dict:
    return torch.load(Path(model_dir) / "model.pt", weights_only=True)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow store for the module's tiny runs (creating a store takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, store):
    """One uninterrupted TINY run: (root, result)."""
    root = tmp_path_factory.mktemp("tiny")
    with own_tracking_store():
        return root, _train(_tiny(root, store))


def _copy_run(src: Path, dst: Path, store: str, **train_opts) -> Path:
    """A copy of a finished run's model folder (checkpoint included) beside fresh identical packs."""
    shutil.copytree(src / "model", dst / "model")
    return _tiny(dst, store, **train_opts)


def test_checkpoint_holds_everything_needed_to_resume(tiny_run):
    root, result = tiny_run
    ck = torch.load(root / "model" / "checkpoint.pt", weights_only=True)
    prog = ck["progress"]
    assert prog["finished"] and (prog["epoch"], prog["batch"], prog["step"]) == (4, 0, 12)
    assert ck["run_id"] == result["run_id"] and ck["fingerprint"]["train.batch_size"] == "6"
    assert {"python", "numpy", "torch", "generators"} <= set(ck["rng"][0])
    assert set(ck["rng"][0]["generators"]) == {"shuffle", "augment"}
    assert ck["scheduler"]["last_epoch"] == 12 and ck["optimizer"]["state"]
    assert [h["epoch"] for h in prog["history"]] == [1, 2, 3] and prog["best_epoch"] == result["best_epoch"]
    assert _same(prog["best_state"], _weights(root / "model"))  # model.pt holds the best epoch's weights


def test_dataloader_path_trains_the_same_weights_as_device_tiles(tiny_run, tmp_path, store, monkeypatch):
    monkeypatch.setattr("geoclip.training.train.fits_on_device", lambda *args: False)
    result = _train(_tiny(tmp_path, store))
    assert _same(_weights(tmp_path / "model"), _weights(tiny_run[0] / "model"))
    run = mlflow.MlflowClient(store).get_run(result["run_id"])
    assert run.data.tags["data_path"] == "loader"
    assert mlflow.MlflowClient(store).get_run(tiny_run[1]["run_id"]).data.tags["data_path"] == "device"


@pytest.mark.parametrize("change, named", [({"batch_size": 4}, "train.batch_size: 6 in the checkpoint, 4 now"),
                                           ({"image_encoder": "resnet10t"}, "train.image_encoder")])
def test_resume_refuses_a_checkpoint_made_with_other_params(tiny_run, tmp_path, store, capsys, change, named):
    path = _copy_run(tiny_run[0], tmp_path, store, **change)
    before = (tmp_path / "model" / "checkpoint.pt").read_bytes()
    if "batch_size" in change:  # the torchrun entry point ...
        with pytest.raises(SystemExit) as exc:
            main(["--params", str(path), "--resume"])
        assert exc.value.code == 2
    else:  # ... and the geoclip command line
        assert cli_main(["train", "--in-process", "--resume", "--params", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {tmp_path / 'model' / 'checkpoint.pt'}: checkpoint was made with other settings")
    assert named in err
    assert (tmp_path / "model" / "checkpoint.pt").read_bytes() == before


def test_resume_names_a_checkpoint_whose_mlflow_run_is_elsewhere(tiny_run, tmp_path):
    path = _copy_run(tiny_run[0], tmp_path, f"sqlite:///{tmp_path}/other.db")
    with pytest.raises(GeoclipError, match=rf"checkpoint\.pt: its MLflow run {tiny_run[1]['run_id']} cannot be "
                                           r"reopened in sqlite:///.*other\.db"):
        _train(path, resume=True)


def test_without_resume_an_old_checkpoint_is_not_reused(tiny_run, tmp_path, store, capsys):
    path = _copy_run(tiny_run[0], tmp_path, store, epochs=1)
    result = _train(path)
    assert "exists but --resume was not given: starting fresh" in capsys.readouterr().err
    ck = torch.load(tmp_path / "model" / "checkpoint.pt", weights_only=True)
    assert result["run_id"] != tiny_run[1]["run_id"] and ck["run_id"] == result["run_id"]
    assert ck["progress"]["step"] == 4 and result["epochs"] == 1 and result["resumed_from_step"] is None


def test_resuming_a_finished_run_reopens_its_mlflow_run_and_trains_no_more(tiny_run, tmp_path, store):
    path = _copy_run(tiny_run[0], tmp_path, store)
    (tmp_path / "model" / "model.pt").unlink()  # e.g. killed after the last checkpoint, before saving
    result = _train(path, resume=True)
    assert result["run_id"] == tiny_run[1]["run_id"] and result["resumed_from_step"] == 12
    assert result["epochs"] == 3 and result["best_val_top1"] == tiny_run[1]["best_val_top1"]
    assert _same(_weights(tmp_path / "model"), _weights(tiny_run[0] / "model"))
    assert mlflow.MlflowClient(store).get_run(result["run_id"]).data.metrics["resumed_from_step"] == 12


def test_early_stopping_keeps_the_best_weights_and_logs_why(tmp_path, store):
    path = _tiny(tmp_path, store, epochs=8, patience=1)
    result = _train(path)
    history = json.loads((tmp_path / "model" / "history.json").read_text())
    tops = [h["val_top1"] for h in history]
    assert result["stopped_early"] and len(history) == result["best_epoch"] + 1 < 8
    assert tops[result["best_epoch"] - 1] == max(tops) == result["best_val_top1"] and tops[-1] <= max(tops)
    run = mlflow.MlflowClient(store).get_run(result["run_id"])
    assert run.data.metrics["stopped_early"] == 1.0 and run.data.metrics["best_epoch"] == result["best_epoch"]
    params = load_params(path)
    val = np.load(Path(params.paths.prepared) / "val_images.npy")
    labels = np.load(Path(params.paths.prepared) / "val_labels.npy")
    probs, _ = load_model(params.paths.model).predict(torch.from_numpy(val))
    assert float((probs.argmax(1).numpy() == labels).mean()) == pytest.approx(result["best_val_top1"])


def _without_class(src: Path, dst: Path, label: int) -> list[str]:
    """Copy packs leaving one class out entirely (tiles and name; the band statistics kept); return the names."""
    dst.mkdir(parents=True)
    stats = json.loads((src / "stats.json").read_text())
    for split in ("train", "val", "test"):
        labels = np.load(src / f"{split}_labels.npy")
        keep = labels != label
        np.save(dst / f"{split}_images.npy", np.load(src / f"{split}_images.npy")[keep])
        np.save(dst / f"{split}_labels.npy", labels[keep])
    names = [n for i, n in enumerate(stats["class_names"]) if i != label]
    (dst / "stats.json").write_text(json.dumps({**stats, "class_names": names}))
    return names


def test_a_held_out_class_is_trained_as_if_it_did_not_exist(tmp_path, store):
    held = _train(_tiny(tmp_path / "held", store, holdout_class="SeaLake"))
    other = tmp_path / "without"
    names = _without_class(tmp_path / "held" / "prepared", other / "prepared", CLASSES.index("SeaLake"))
    path = _tiny(other, store)
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, "classes": {"names": names}}))
    _train(path)
    a, b = _weights(tmp_path / "held" / "model"), _weights(other / "model")
    # Same weights: the class's tiles and its name never took part; only the model's class list is longer.
    assert _same({k: v for k, v in a.items() if k != "prompt_features"},
                 {k: v for k, v in b.items() if k != "prompt_features"})
    assert torch.equal(a["prompt_features"][:2], b["prompt_features"])
    assert load_model(tmp_path / "held" / "model").cfg.class_names == CLASSES  # evaluation scores all classes
    hist = [json.loads((d / "model" / "history.json").read_text()) for d in (tmp_path / "held", other)]
    assert hist[0] == hist[1]
    run = mlflow.MlflowClient(store).get_run(held["run_id"])
    assert run.data.tags["holdout_class"] == "SeaLake" and run.data.params["train.holdout_class"] == "SeaLake"


def _kill_tree(pid: int) -> None:
    """SIGKILL the process groups of ``pid`` and all its descendants, and wait until they are gone.

    torchrun starts each worker in a session of its own, so killing the agent's group alone would leave the
    worker training on (and writing checkpoints) as an orphan.
    """
    descendants = psutil.Process(pid).children(recursive=True)
    for pgid in {os.getpgid(p.pid) for p in [psutil.Process(pid), *descendants] if p.is_running()}:
        os.killpg(pgid, signal.SIGKILL)
    psutil.wait_procs(descendants)  # not ``pid`` itself: the caller reaps its own child (and its exit status)


@pytest.mark.slow
def test_a_sigkilled_run_resumes_to_the_uninterrupted_weights(tiny_run, tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"  # its own store: the killed and resumed run must be one run
    path = _tiny(tmp_path, store)
    ckpt = tmp_path / "model" / "checkpoint.pt"
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(torchrun_command(load_params(path), path), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        while not ckpt.exists() and proc.poll() is None:
            time.sleep(0.01)
        _kill_tree(proc.pid)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    ck = torch.load(ckpt, weights_only=True)
    prog = ck["progress"]
    assert prog["step"] in (5, 10) and 0 < prog["batch"] < 4 and not prog["finished"]  # inside an epoch
    assert not (tmp_path / "model" / "model.pt").exists()

    launch_training(path, resume=True)
    # Bit for bit (torch.equal, no tolerance): same batches, augmentation draws and learning rates.
    assert _same(_weights(tmp_path / "model"), _weights(tiny_run[0] / "model"))
    assert (tmp_path / "model" / "history.json").read_text() == (tiny_run[0] / "model" / "history.json").read_text()
    client = mlflow.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("geoclip-test").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == ck["run_id"] and runs[0].info.status == "FINISHED"
    assert json.loads((tmp_path / "model" / "run.json").read_text())["run_id"] == ck["run_id"]
    assert runs[0].data.metrics["resumed_from_step"] == prog["step"]
    assert {m.step for m in client.get_metric_history(ck["run_id"], "epoch_val_top1")} == {1, 2, 3}


def test_fine_tuned_sentence_encoder_gets_a_hundredth_of_the_learning_rate(tmp_path):
    from torch import nn

    from geoclip.training.step import TEXT_LR_FACTOR, make_optimizer

    model = load_model(make_model_dir(tmp_path / "model"))
    model.text_encoder = nn.Linear(4, 4)  # stands in for the sentence encoder: only its parameters matter here
    params = params_from_dict({"train": {"lr": 0.002}})
    groups = make_optimizer(model, params.train.lr, params.train.weight_decay).param_groups
    text_ids = {id(p) for p in model.text_encoder.parameters()}
    for g in groups:
        in_text = {id(p) in text_ids for p in g["params"]}
        assert len(in_text) == 1  # a group is all text encoder or none of it
        assert g["lr"] == (0.002 * TEXT_LR_FACTOR if in_text == {True} else 0.002)
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])


def _with_captions(prepared: Path, caption_of) -> None:
    """Add a ``caption`` column to the packs' index.csv: ``caption_of(row)`` per row."""
    index = pd.read_csv(prepared / "index.csv")
    index["caption"] = [caption_of(row) for row in index.to_dict("records")]
    index.to_csv(prepared / "index.csv", index=False)


def test_captions_train_the_class_encoder_on_more_than_the_class_names(tmp_path, store):
    plain = _train(_tiny(tmp_path / "plain", store))
    _tiny(tmp_path / "captioned", store)
    _with_captions(tmp_path / "captioned" / "prepared",  # a caption on the training tiles; none elsewhere
                   lambda r: f"{r['class'].lower()} tile {int(r['id'].split('_')[-1]) % 3}" * (r["split"] == "train"))
    one = _train(_tiny(tmp_path / "captioned", store, caption_weight=1.0))
    a, b = _weights(tmp_path / "plain" / "model"), _weights(tmp_path / "captioned" / "model")
    assert not torch.equal(a["text_proj.0.weight"], b["text_proj.0.weight"])  # the captions moved the class encoder
    assert one["best_val_top1"] >= 0.5 and plain["best_val_top1"] >= 0.5
    _train(_tiny(tmp_path / "captioned", store, caption_weight=1.0))  # again: the same weights
    assert _same(b, _weights(tmp_path / "captioned" / "model"))


def test_caption_weight_without_captions_trains_as_without_and_says_so(tmp_path, store, capsys):
    _train(_tiny(tmp_path / "plain", store))
    _train(_tiny(tmp_path / "weighted", store, caption_weight=1.0))  # make_packs writes no caption column
    assert "no training tile has a caption" in capsys.readouterr().err
    assert _same(_weights(tmp_path / "plain" / "model"), _weights(tmp_path / "weighted" / "model"))


@pytest.mark.parametrize("opts", [{"caption_weight": -1.0}, {"caption_weight": 1.5},
                                  {"caption_weight": 0.5, "text_finetune": True}])
def test_bad_caption_weight_is_named(tmp_path, store, opts):
    with pytest.raises(GeoclipError, match="train.caption_weight"):
        _train(_tiny(tmp_path, store, **opts))


def _mark_sources(prepared: Path, real_classes: tuple[str, ...]) -> None:
    """Record each tile's source in index.csv: the tiles of ``real_classes`` real, the rest synthetic."""
    index = pd.read_csv(prepared / "index.csv")
    index["source"] = np.where(index["class"].isin(real_classes), "/data/EuroSAT_MS", "synthetic")
    index.to_csv(prepared / "index.csv", index=False)


def test_a_frozen_prior_trains_from_its_cached_features_reproducibly_and_records_its_provenance(tmp_path, capsys):
    """train.pretrained auto with real tiles: the prior, frozen (its weights unchanged), its features computed once
    and then read from the cache; the same run twice gives the same weights; the MLflow run tags the prior."""
    from geoclip.model.pretrained import DEFAULT_PRIOR, get_source, load_pretrained

    make_packs(tmp_path / "prepared", per_class=8, size=32)
    _mark_sources(tmp_path / "prepared", (CLASSES[0],))
    states = []
    for name in ("a", "b"):
        d = tiny_params_dict(tmp_path, epochs=2, batch_size=8, pretrained="auto", freeze_image="all", input_size=32)
        d["paths"]["model"] = str(tmp_path / name)
        result = train(params_from_dict(d))
        states.append(torch.load(tmp_path / name / "model.pt", weights_only=True))
    err = capsys.readouterr().err
    assert "encoder features of 18 tiles x 8 views, 18 computed" in err
    assert "encoder features of 18 tiles x 8 views, 0 computed, 18 from" in err
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    model = load_model(tmp_path / "a")
    source = get_source(DEFAULT_PRIOR)
    assert model.cfg.pretrained == DEFAULT_PRIOR and model.cfg.image_encoder == source.architecture
    assert model.cfg.spectral_stats and model.cfg.feature_stages == list(source.feature_stages)
    released = load_model(tmp_path / "a").image_encoder
    load_pretrained(released, source, list(model.cfg.band_names))  # the package's weights, adapted to the bands
    trained_encoder = model.image_encoder.state_dict()
    assert all(torch.equal(v, trained_encoder[k]) for k, v in released.state_dict().items())
    tags = mlflow.get_run(result["run_id"]).data.tags
    assert tags["pretrained"] == DEFAULT_PRIOR and tags["pretrained_sha256"] == source.sha256
    # Validation read the cached features: the saved best model, run in full, agrees with what it recorded.
    from geoclip.training.evaluate import predict_probs

    val_x, val_y = np.load(tmp_path / "prepared/val_images.npy"), np.load(tmp_path / "prepared/val_labels.npy")
    assert float((predict_probs(model, val_x, 8).argmax(1) == val_y).mean()) == result["best_val_top1"]


def test_auto_trains_synthetic_only_data_without_a_prior_and_a_random_encoder_is_never_frozen(tmp_path, capsys):
    make_packs(tmp_path / "prepared", per_class=8, size=32)
    _mark_sources(tmp_path / "prepared", ())
    for name, prior in (("auto", "auto"), ("none", "")):
        d = tiny_params_dict(tmp_path, epochs=1, batch_size=8, image_encoder=TINY_ENCODER, pretrained=prior,
                             freeze_image="all")
        d["paths"]["model"] = str(tmp_path / name)
        train(params_from_dict(d))
        model = load_model(tmp_path / name)
        assert model.cfg.pretrained == "" and model.cfg.image_encoder == TINY_ENCODER and not model.cfg.provenance
        err = capsys.readouterr().err
        # auto chose no prior itself: nothing to say; an explicit "" with freeze_image all is told it is ignored
        assert ("train.freeze_image 'all' ignored: the encoder starts from random weights" in err) == (prior == "")
        assert "encoder tensors frozen" not in err


def test_an_unknown_prior_is_named_before_training(tmp_path):
    make_packs(tmp_path / "prepared", per_class=8, size=32)
    with pytest.raises(GeoclipError, match="train.pretrained: unknown source 'vit/laion'"):
        train(params_from_dict(tiny_params_dict(tmp_path, pretrained="vit/laion")))


@pytest.mark.slow
def test_two_gloo_processes_train_a_frozen_prior_from_one_cache(tmp_path):
    """Rank 0 fills the feature cache, rank 1 reads it; the frozen encoder is left out of DDP's gradient buckets."""
    from geoclip.model.pretrained import DEFAULT_PRIOR

    make_packs(tmp_path / "prepared", per_class=8, size=32)
    launch_training(_write_params(tmp_path, epochs=1, nproc_per_node=2, num_threads=1, batch_size=8,
                                  pretrained=DEFAULT_PRIOR, freeze_image="all", input_size=32))
    model = load_model(tmp_path / "model")
    assert model.cfg.pretrained == DEFAULT_PRIOR
    (cache,) = (tmp_path / "feature_cache").glob("*/features.npz")
    assert len(np.load(cache)["keys"]) == 18 + 3  # the train and val tiles, each once
