"""Contrastive training, one process per rank (torchrun), with MLflow tracking on rank 0."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import math
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import mlflow
import numpy as np
import timm
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from geoclip.augment import augment
from geoclip.config import Params, load_params
from geoclip.errors import GeoclipError
from geoclip.evaluate import predict_probs
from geoclip.ioutils import atomic_path, write_json
from geoclip.loss import MAX_LOGIT_SCALE, label_aware_clip_loss
from geoclip.model import GeoCLIP, ModelConfig, build_model, save_model
from geoclip.prepare import PreparedData, load_split
from geoclip.storage import data_version
from geoclip.tracking import configure, flat_params, git_revision, log_validation, write_run_info

HISTORY_FILE = "history.json"
CURVE_FILE = "training_curve.png"


class _Step(nn.Module):
    """What DDP wraps: one forward that yields everything the loss needs (DDP only hooks ``forward``)."""

    def __init__(self, model: GeoCLIP):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unit image embeddings, unit class embeddings and the log inverse temperature."""
        return self.model.encode_image(x), self.model.class_embeddings(), self.model.logit_scale


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_config(params: Params, data: PreparedData) -> ModelConfig:
    """The model's configuration from params, checked against the packs' band and class order."""
    name = params.train.image_encoder
    if not timm.is_model(name):
        raise GeoclipError(f"train.image_encoder: unknown timm model {name!r}; expected a name from "
                           "timm.list_models(), e.g. 'resnet18'")
    if list(data.band_names) != list(params.bands) or list(data.class_names) != list(params.classes.names):
        raise GeoclipError(f"{params.paths.prepared}/stats.json: bands/classes differ from params.yaml "
                           f"({data.band_names}, {data.class_names}); rerun `geoclip prepare`")
    names = params.classes.names
    return ModelConfig(image_encoder=name, embed_dim=params.train.embed_dim, band_names=list(params.bands),
                       class_names=list(names), prompts=[params.classes.prompts(c) for c in names],
                       band_mean=list(data.mean), band_std=list(data.std), tile_size=data.images.shape[-1],
                       init_temperature=params.train.init_temperature,
                       input_band_names=list(data.source_band_names))


def _init_distributed() -> tuple[int, int, torch.device]:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; join the process group when there are several ranks."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


def _device_tiles(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """The whole split as one tensor on ``device``; batches are sliced from it without a data loader.

    uint16 on the CPU (~150 MB for 1400 tiles); int32 on CUDA, where uint16 has only partial kernel
    support (EuroSAT's 27k tiles are ~5.8 GB as int32: still small next to GPU memory).
    """
    x = torch.from_numpy(np.array(images))
    return (x.to(torch.int32) if device.type == "cuda" else x).to(device)


def _rank_batches(n: int, batch_size: int, rank: int, world: int, gen: torch.Generator) -> list[torch.Tensor]:
    """This rank's index batches for one epoch: a shared shuffle, equal shards, ``batch_size`` global."""
    perm = torch.randperm(n, generator=gen)  # same draw on every rank: gen is seeded alike
    per_rank = n // world
    mine = perm[rank * per_rank:(rank + 1) * per_rank]
    local = max(1, batch_size // world)
    batches = [mine[i:i + local] for i in range(0, per_rank, local)]
    # A lone last sample would make a degenerate contrastive batch; the next shuffle covers it.
    return [b for b in batches if len(b) * world >= 2]


def _gather(x: torch.Tensor, world: int, grad: bool) -> torch.Tensor:
    """Concatenate ``x`` from all ranks (with gradients through ``torch.distributed.nn`` when ``grad``)."""
    if world == 1:
        return x
    if grad:
        import torch.distributed.nn.functional as dist_fn

        with warnings.catch_warnings():  # deprecated in torch 2.14 for a private API, still correct
            warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
            return torch.cat(dist_fn.all_gather(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _optimizer(model: GeoCLIP, params: Params) -> torch.optim.Optimizer:
    """AdamW with weight decay on weight matrices and kernels only (not biases, norms or the temperature)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": params.train.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=params.train.lr)


def write_history(directory: Path, history: list[dict]) -> tuple[Path, Path]:
    """Write ``history.json`` and a training-curve PNG (loss, val top-1) into ``directory``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_json(directory / HISTORY_FILE, history)
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax1.set(xlabel="epoch", ylabel="train loss", title="Training loss")
    ax2.plot(epochs, [h["val_top1"] for h in history], marker="o", color="tab:green")
    ax2.set(xlabel="epoch", ylabel="val top-1", title="Validation zero-shot top-1", ylim=(0, 1))
    fig.tight_layout()
    with atomic_path(directory / CURVE_FILE) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return directory / HISTORY_FILE, directory / CURVE_FILE


def _start_run(params: Params):
    """Start the MLflow run (rank 0) and log params and tags; returns the active-run context manager."""
    data_ver = data_version(params.paths.prepared)  # DVC's hash of the packs, as in dvc.lock; rank 0 only
    run = mlflow.start_run(experiment_id=configure(params))
    try:
        mlflow.log_params(flat_params(params))
        mlflow.set_tags({"git_revision": git_revision(), "image_encoder": params.train.image_encoder,
                         "data_version": data_ver, "world_size": os.environ.get("WORLD_SIZE", "1")})
    except Exception:
        mlflow.end_run("FAILED")
        raise
    return run


def _log_results(params: Params, run, history: list[dict]) -> None:
    """Rank 0: write and log history/curve and the best model; record run.json."""
    model_dir = Path(params.paths.model)
    for path in write_history(model_dir, history):
        mlflow.log_artifact(str(path))
    for name in ("model.pt", "model_config.json"):
        mlflow.log_artifact(str(model_dir / name), artifact_path="model")
    log_validation(params)
    write_run_info(params, run.info.run_id, run.info.experiment_id)


def _train_epoch(step_module: nn.Module, model: GeoCLIP, images: torch.Tensor, labels: torch.Tensor,
                 batches: list[torch.Tensor], aug_gen: torch.Generator, opt: torch.optim.Optimizer,
                 sched, gain_noise: float, world: int, desc: str, show: bool) -> float:
    """One pass over this rank's batches; returns the mean (global-batch) loss."""
    device = images.device
    cuda = device.type == "cuda"
    model.train()
    losses = []
    bar = tqdm(batches, desc=desc, unit="batch", disable=not show)
    for idx in bar:
        idx = idx.to(device)
        x = augment(images[idx], aug_gen, gain_noise)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            img_emb, cls_emb, scale = step_module(x)
        # The loss sees every rank's images, so each class is contrasted against the global batch.
        loss = label_aware_clip_loss(_gather(img_emb.float(), world, grad=True), cls_emb.float(),
                                     _gather(labels[idx], world, grad=False), scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():  # CLIP caps the inverse temperature at 100
            model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return float(np.mean(losses))


def _load_data(params: Params) -> tuple[PreparedData, PreparedData]:
    """The train and val packs, checked to be usable."""
    train_data = load_split(params.paths.prepared, "train")
    val_data = load_split(params.paths.prepared, "val")
    if len(train_data.labels) < 2 or len(val_data.labels) < 1:
        raise GeoclipError(f"{params.paths.prepared}: need at least 2 train and 1 val tiles, got "
                           f"{len(train_data.labels)} and {len(val_data.labels)}")
    return train_data, val_data


def train(params: Params) -> dict:
    """Train on the prepared packs (one call per rank); return ``{"run_id", "best_val_top1", "epochs"}``."""
    cfg = params.train
    if cfg.epochs < 1 or cfg.batch_size < 2:
        raise GeoclipError(f"train.epochs/batch_size: expected >= 1 and >= 2, got {cfg.epochs}/{cfg.batch_size}")
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    train_data, val_data = _load_data(params)
    mcfg = model_config(params, train_data)
    rank, world, device = _init_distributed()
    try:
        seed_everything(cfg.seed)
        model = build_model(mcfg, seed=cfg.seed).to(device)
        if device.type == "cuda":  # channels_last + bf16 autocast: the fast path for convolutions on GPUs
            model = model.to(memory_format=torch.channels_last)
        step_module: nn.Module = _Step(model)
        if world > 1:
            step_module = nn.parallel.DistributedDataParallel(
                step_module, device_ids=[device] if device.type == "cuda" else None)
        images = _device_tiles(train_data.images, device)
        labels = torch.from_numpy(np.asarray(train_data.labels)).to(device)
        shuffle_gen = torch.Generator().manual_seed(cfg.seed)  # identical on all ranks: disjoint shards
        aug_gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 1)
        total = len(_rank_batches(len(images), cfg.batch_size, rank, world, torch.Generator())) * cfg.epochs
        warmup = max(1, round(cfg.warmup_fraction * total))
        opt = _optimizer(model, params)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, warmup))
        run_ctx = _start_run(params) if rank == 0 else contextlib.nullcontext()
        with run_ctx as run:
            history, best_state, best = [], None, -1.0
            for epoch in range(1, cfg.epochs + 1):
                batches = _rank_batches(len(images), cfg.batch_size, rank, world, shuffle_gen)
                loss = _train_epoch(step_module, model, images, labels, batches, aug_gen, opt, sched,
                                    cfg.gain_noise, world, f"epoch {epoch}/{cfg.epochs}", rank == 0)
                if rank != 0:
                    continue
                probs = predict_probs(model, val_data.images, params.evaluate.batch_size, device)
                top1 = float((probs.argmax(1) == val_data.labels).mean())
                row = {"epoch": epoch, "train_loss": loss, "val_top1": top1,
                       "temperature": float(1.0 / model.logit_scale.detach().exp()), "lr": sched.get_last_lr()[0]}
                history.append(row)
                mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
                tqdm.write(json.dumps(row))
                if row["val_top1"] > best:  # keep the best-validation weights, not the last ones
                    best = row["val_top1"]
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if rank != 0:
                return {"run_id": None, "best_val_top1": None, "epochs": cfg.epochs}
            model.load_state_dict(best_state)
            save_model(model, params.paths.model)
            _log_results(params, run, history)
            return {"run_id": run.info.run_id, "best_val_top1": best, "epochs": cfg.epochs}
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def torchrun_command(params: Params, params_path: str | Path) -> list[str]:
    """The torchrun command line that runs :func:`main` on ``train.nproc_per_node`` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={params.train.nproc_per_node}", "-m", "geoclip.train", "--params", str(params_path)]


def launch(params_path: str | Path = "params.yaml") -> None:
    """Run training through torchrun (what the DVC stage, CLI and Prefect flow call); raise on failure."""
    params = load_params(params_path)
    if params.train.nproc_per_node < 1:
        raise GeoclipError(f"train.nproc_per_node: expected at least 1, got {params.train.nproc_per_node}")
    proc = subprocess.Popen(torchrun_command(params, params_path), stderr=subprocess.PIPE)
    decoder, tail = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
    # Pass the workers' stderr (progress bars, errors) through, remembering the end to name the failure.
    for chunk in iter(lambda: proc.stderr.read1(65536), b""):
        text = decoder.decode(chunk)
        sys.stderr.write(text)
        sys.stderr.flush()
        tail = (tail + text)[-65536:]
    rc = proc.wait()
    if rc != 0:
        errors = [ln for ln in tail.splitlines() if ln.startswith("error: ")]
        reason = errors[-1][len("error: "):] if errors else "see the log above"
        raise GeoclipError(f"training (torchrun, exit code {rc}) failed: {reason}")


def main(argv: list[str] | None = None) -> None:
    """torchrun entry point: ``python -m geoclip.train --params params.yaml``."""
    ap = argparse.ArgumentParser(prog="python -m geoclip.train", description=__doc__)
    ap.add_argument("--params", default="params.yaml", help="path to params.yaml")
    args = ap.parse_args(argv)
    try:
        result = train(load_params(args.params))
    except GeoclipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if result["run_id"]:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
