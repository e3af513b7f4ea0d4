"""Contrastive training, one process per rank (torchrun): resumable checkpoints, early stopping, MLflow on rank 0."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import timm
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from geoclip.augment import augment
from geoclip.checkpoint import (
    CHECKPOINT_FILE,
    check_fingerprint,
    fingerprint,
    load_checkpoint,
    remove_stale_temps,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from geoclip.config import Params, load_params
from geoclip.distributed import all_gather, broadcast, gather, init_distributed
from geoclip.errors import GeoclipError
from geoclip.evaluate import predict_probs
from geoclip.ioutils import atomic_path, write_json
from geoclip.loss import LOSSES, MAX_LOGIT_SCALE
from geoclip.model import GeoCLIP, ModelConfig, build_model, save_model
from geoclip.prepare import PreparedData, load_split
from geoclip.storage import data_version
from geoclip.tracking import configure, flat_params, git_revision, log_validation, write_run_info
from geoclip.train_data import (
    TrainTiles,
    fits_on_device,
    kept_rows,
    loader_workers,
    rank_batches,
    remap_labels,
    training_classes,
)

HISTORY_FILE = "history.json"
CURVE_FILE = "training_curve.png"


class _Step(nn.Module):
    """What DDP wraps: one forward that yields everything the loss needs (DDP only hooks ``forward``)."""

    def __init__(self, model: GeoCLIP):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Unit image embeddings, unit class embeddings, the log inverse temperature and the logit bias."""
        m = self.model
        return m.encode_image(x), m.class_embeddings(), m.logit_scale, getattr(m, "logit_bias", None)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_config(params: Params, data: PreparedData) -> ModelConfig:
    """The model's configuration from params, checked against the packs' band and class order.

    The class list is always the full ``classes.names``, also with ``train.holdout_class``: the held-out
    class is left out of training only, so evaluation can still score it zero-shot.
    """
    name = params.train.image_encoder
    if not timm.is_model(name):
        raise GeoclipError(f"train.image_encoder: unknown timm model {name!r}; expected a name from "
                           "timm.list_models(), e.g. 'resnet18'")
    if list(data.band_names) != list(params.bands) or list(data.class_names) != list(params.classes.names):
        raise GeoclipError(f"{params.paths.prepared}/stats.json: bands/classes differ from params.yaml "
                           f"({data.band_names}, {data.class_names}); rerun `geoclip prepare`")
    names = params.classes.names
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    extra = {"loss": params.train.loss, "encoder_args": dict(params.train.encoder_args),
             "text_finetune": params.train.text_finetune}
    return ModelConfig(image_encoder=name, embed_dim=params.train.embed_dim, band_names=list(params.bands),
                       class_names=list(names), prompts=[params.classes.prompts(c) for c in names],
                       band_mean=list(data.mean), band_std=list(data.std), tile_size=data.images.shape[-1],
                       init_temperature=params.train.init_temperature,
                       input_band_names=list(data.source_band_names),
                       **{k: v for k, v in extra.items() if k in known})


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


TEXT_LR_FACTOR = 0.01  # a fine-tuned pretrained sentence encoder needs a far smaller step than the fresh parts


def _optimizer(model: GeoCLIP, params: Params) -> torch.optim.Optimizer:
    """AdamW; weight decay on weight matrices and kernels only; the sentence encoder (if fine-tuned) at lr x 0.01."""
    text = getattr(model, "text_encoder", None)
    text_ids = {id(p) for p in text.parameters()} if isinstance(text, nn.Module) else set()
    groups = []
    for ids_wanted, lr in ((False, params.train.lr), (True, params.train.lr * TEXT_LR_FACTOR)):
        trainable = [p for p in model.parameters() if p.requires_grad and (id(p) in text_ids) == ids_wanted]
        groups += [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": params.train.weight_decay,
                    "lr": lr},
                   {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0, "lr": lr}]
    # fused: one kernel for the whole update on CUDA (the foreach default launches several per parameter group).
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=params.train.lr, fused=fused)


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


@dataclass
class _Progress:
    """Where training stands; saved in every checkpoint and restored on resume (rank 0's is the one kept)."""

    epoch: int = 1  # the epoch in progress (1-based); epochs + 1 once all are done
    batch: int = 0  # batches of that epoch already done (may equal the epoch's count: validation pending)
    step: int = 0  # optimiser steps so far
    shuffle_state: torch.Tensor | None = None  # the shuffle generator at the start of ``epoch``
    epoch_losses: list[float] = field(default_factory=list)  # losses of the epoch's done batches
    history: list[dict] = field(default_factory=list)
    best: float = -1.0  # best val_top1 so far
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best one (early stopping)
    best_state: dict | None = None  # the best epoch's weights (CPU)
    stopped_early: bool = False
    finished: bool = False


@dataclass
class _Run:
    """What stays fixed during one training process: params, ranks, model, optimiser, data, generators."""

    params: Params
    rank: int
    world: int
    device: torch.device
    model: GeoCLIP
    step_module: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    tiles: TrainTiles
    labels: torch.Tensor  # positions in ``classes`` of the kept training tiles, on the device
    classes: list[int]  # the classes training contrasts (all but the held-out one)
    val_x: np.ndarray
    val_y: np.ndarray  # original class indices
    generators: dict[str, torch.Generator]
    ckpt_path: Path
    fingerprint: dict | None  # rank 0 only
    run_id: str | None = None


def _save(run: _Run, prog: _Progress) -> None:
    """Write the checkpoint (collective: every rank contributes its RNG states; rank 0 writes)."""
    rngs = all_gather(rng_state(run.generators), run.world)
    if run.rank != 0:
        return
    state = {f.name: getattr(prog, f.name) for f in dataclasses.fields(prog)}
    save_checkpoint(run.ckpt_path, {
        "progress": state, "model": run.model.state_dict(), "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict(), "rng": rngs, "fingerprint": run.fingerprint,
        "mlflow_run_id": run.run_id})


def _read_resume(path: Path, fp: dict | None, resume: bool, rank: int, world: int) -> dict | None:
    """The checkpoint to resume from (read by rank 0, sent to all), or None to start fresh."""
    payload = None
    if rank == 0:
        remove_stale_temps(path)  # a run killed while writing a checkpoint leaves its temp file
    if rank == 0 and path.exists() and not resume:
        # Not reused silently; kept (in case --resume was forgotten) until this run's first checkpoint replaces it.
        tqdm.write(f"note: {path} exists but --resume was not given: starting fresh (it is replaced at this "
                   "run's first checkpoint)", file=sys.stderr)
    elif rank == 0 and resume and not path.exists():
        tqdm.write(f"note: --resume: no checkpoint at {path}; starting fresh", file=sys.stderr)
    elif rank == 0 and resume:
        try:
            payload = load_checkpoint(path)
            check_fingerprint(path, payload["fingerprint"], fp)
        except GeoclipError as exc:
            payload = str(exc)  # sent to every rank so all of them stop with the same message
    payload = broadcast(payload, world)
    if isinstance(payload, str):
        raise GeoclipError(payload)
    return payload


def _start_mlflow(params: Params, run_id: str | None, ckpt_path: Path):
    """Start (or, resuming, reopen) the MLflow run on rank 0 and log params and tags; returns the active run."""
    data_ver = data_version(params.paths.prepared)  # DVC's hash of the packs, as in dvc.lock; rank 0 only
    experiment_id = configure(params)
    if run_id:
        try:
            run = mlflow.start_run(run_id=run_id)
        except mlflow.exceptions.MlflowException as exc:
            raise GeoclipError(f"{ckpt_path}: its MLflow run {run_id} cannot be reopened in "
                               f"{params.mlflow.resolved_tracking_uri()} ({str(exc).splitlines()[0]})") from None
    else:
        run = mlflow.start_run(experiment_id=experiment_id)
    try:
        if not run_id:  # params were logged when the run began; MLflow refuses to change them
            mlflow.log_params(flat_params(params))
        mlflow.set_tags({"git_revision": git_revision(), "image_encoder": params.train.image_encoder,
                         "data_version": data_ver, "world_size": os.environ.get("WORLD_SIZE", "1"),
                         "holdout_class": params.train.holdout_class or "none"})
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


def _train_batches(run: _Run, prog: _Progress, batches: list[torch.Tensor]) -> None:
    """Run this epoch's remaining batches (from ``prog.batch``), checkpointing every ``checkpoint_every`` steps."""
    cfg, device = run.params.train, run.device
    cuda = device.type == "cuda"
    cls_idx = torch.tensor(run.classes, device=device)
    loss_fn = LOSSES[cfg.loss]
    run.model.train()
    todo = batches[prog.batch:]
    bar = tqdm(total=len(batches), initial=prog.batch, desc=f"epoch {prog.epoch}/{cfg.epochs}", unit="batch",
               disable=run.rank != 0)
    pending: list[torch.Tensor] = []  # losses kept on the device; read back in bulk (no sync per step)
    for idx, raw in zip(todo, run.tiles.batches(todo, prog.epoch)):
        x = augment(raw, run.generators["augment"], cfg.gain_noise)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            img_emb, cls_emb, scale, bias = run.step_module(x)
        # The loss sees every rank's images, so each class is contrasted against the global batch, and only
        # the trained classes: a held-out class is never even a negative (its name stays unseen).
        loss = loss_fn(gather(img_emb.float(), run.world, grad=True), cls_emb.float()[cls_idx],
                       gather(run.labels[idx.to(device)], run.world, grad=False), scale,
                       None if bias is None else bias.float())
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        run.opt.step()
        run.sched.step()
        with torch.no_grad():  # CLIP caps the inverse temperature at 100
            run.model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        pending.append(loss.detach())
        prog.batch, prog.step = prog.batch + 1, prog.step + 1
        bar.update(1)
        if prog.batch % 10 == 0:  # reading the loss waits for the GPU: only now and then
            bar.set_postfix(loss=f"{pending[-1].item():.3f}")
        if cfg.checkpoint_every and prog.step % cfg.checkpoint_every == 0:
            prog.epoch_losses += torch.stack(pending).tolist()
            pending = []
            _save(run, prog)
    if pending:
        prog.epoch_losses += torch.stack(pending).tolist()
    bar.close()


def _val_top1(run: _Run) -> float:
    """Zero-shot top-1 on the validation tiles, choosing among the trained classes only."""
    probs = predict_probs(run.model, run.val_x, run.params.evaluate.batch_size, run.device)
    pred = np.asarray(run.classes)[probs[:, run.classes].argmax(axis=1)]
    return float((pred == run.val_y).mean())


def _end_epoch(run: _Run, prog: _Progress, next_shuffle: torch.Tensor) -> bool:
    """Validate and log on rank 0, track the best weights; return whether to stop early (same on all ranks)."""
    patience, stop = run.params.train.patience, False
    if run.rank == 0:
        top1 = _val_top1(run)
        row = {"epoch": prog.epoch, "train_loss": float(np.mean(prog.epoch_losses)), "val_top1": top1,
               "temperature": float(1.0 / run.model.logit_scale.detach().exp()), "lr": run.sched.get_last_lr()[0]}
        if run.params.train.loss == "siglip":
            row["logit_bias"] = float(run.model.logit_bias.detach())
        prog.history.append(row)
        mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=prog.epoch)
        tqdm.write(json.dumps(row))
        if top1 > prog.best:  # keep the best-validation weights, not the last ones
            prog.best, prog.best_epoch, prog.bad_epochs = top1, prog.epoch, 0
            prog.best_state = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}
        else:
            prog.bad_epochs += 1
        stop = patience > 0 and prog.bad_epochs >= patience
    stop = broadcast(stop, run.world)
    prog.epoch, prog.batch, prog.epoch_losses, prog.shuffle_state = prog.epoch + 1, 0, [], next_shuffle
    return stop


def _loop(run: _Run, prog: _Progress) -> None:
    """Train epoch by epoch from wherever ``prog`` stands until the last epoch or early stopping."""
    cfg = run.params.train
    shuffle = run.generators["shuffle"]
    while not prog.finished and prog.epoch <= cfg.epochs:
        shuffle.set_state(prog.shuffle_state)  # replaying the epoch's shuffle lets a resume skip the done batches
        batches = rank_batches(run.tiles.n, cfg.batch_size, run.rank, run.world, shuffle)
        next_shuffle = shuffle.get_state()
        _train_batches(run, prog, batches)
        if _end_epoch(run, prog, next_shuffle):
            prog.stopped_early = True
            if run.rank == 0:
                tqdm.write(f"early stopping: no better val_top1 for {cfg.patience} epochs (best: epoch "
                           f"{prog.best_epoch})", file=sys.stderr)
            break
        if cfg.checkpoint_every == 0:
            _save(run, prog)
    prog.finished = True
    _save(run, prog)  # a resume after this point only re-saves the best model


def _check_data(params: Params, train_data: PreparedData, val_data: PreparedData, classes: list[int]) -> None:
    """Enough tiles left to train and validate on (after leaving out a held-out class)."""
    n_train = len(kept_rows(train_data.labels, classes))
    n_val = len(kept_rows(val_data.labels, classes))
    if n_train < 2 or n_val < 1:
        held = f" without {params.train.holdout_class!r}" if params.train.holdout_class else ""
        raise GeoclipError(f"{params.paths.prepared}: need at least 2 train and 1 val tiles{held}, got "
                           f"{n_train} and {n_val}")


def _build(params: Params, mcfg: ModelConfig, device: torch.device) -> GeoCLIP:
    """The seeded model on ``device`` (channels_last on GPUs); the logit bias trains only with the sigmoid loss."""
    cfg = params.train
    model = build_model(mcfg, seed=cfg.seed, **({"init_weights": cfg.init_weights} if cfg.init_weights else {}))
    if cfg.loss != "siglip" and getattr(model, "logit_bias", None) is not None:
        model.logit_bias.requires_grad_(False)  # DDP fails on parameters that never get a gradient
    model = model.to(device)
    if device.type == "cuda":  # channels_last + bf16 autocast: the fast path for convolutions on GPUs
        model = model.to(memory_format=torch.channels_last)
    return model


def _tiles(params: Params, data: PreparedData, rows: np.ndarray, device: torch.device) -> TrainTiles:
    """Training tiles on the device when they fit there, else served from the pack by a DataLoader."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    nbytes = len(rows) * data.images[0].nbytes
    on_device = fits_on_device(nbytes, device, local_world)
    return TrainTiles(Path(params.paths.prepared) / "train_images.npy", data.images, rows, device,
                      params.train.seed, on_device, loader_workers(local_world))


def train(params: Params, resume: bool = False) -> dict:
    """Train on the prepared packs (one call per rank); ``resume`` continues from ``{paths.model}/checkpoint.pt``.

    Returns ``{"run_id", "best_val_top1", "best_epoch", "epochs", "stopped_early", "resumed_from_step"}``
    (``epochs``: epochs actually run; ``run_id`` None on ranks other than 0).
    """
    cfg = params.train
    if cfg.epochs < 1 or cfg.batch_size < 2:
        raise GeoclipError(f"train.epochs/batch_size: expected >= 1 and >= 2, got {cfg.epochs}/{cfg.batch_size}")
    if cfg.checkpoint_every < 0 or cfg.patience < 0:
        raise GeoclipError(f"train.checkpoint_every/patience: expected >= 0, got {cfg.checkpoint_every}/"
                           f"{cfg.patience}")
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    train_data = load_split(params.paths.prepared, "train")
    val_data = load_split(params.paths.prepared, "val")
    mcfg = model_config(params, train_data)
    classes = training_classes(params)
    _check_data(params, train_data, val_data, classes)
    rank, world, device = init_distributed()
    try:
        return _train(params, resume, train_data, val_data, mcfg, classes, rank, world, device)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(params: Params, resume: bool, train_data: PreparedData, val_data: PreparedData, mcfg: ModelConfig,
           classes: list[int], rank: int, world: int, device: torch.device) -> dict:
    """The body of :func:`train` once the process group is up."""
    cfg = params.train
    ckpt_path = Path(params.paths.model) / CHECKPOINT_FILE
    fp = fingerprint(params, world) if rank == 0 else None
    ckpt = _read_resume(ckpt_path, fp, resume, rank, world)
    seed_everything(cfg.seed)
    model = _build(params, mcfg, device)
    opt = _optimizer(model, params)
    rows, val_rows = kept_rows(train_data.labels, classes), kept_rows(val_data.labels, classes)
    per_epoch = len(rank_batches(len(rows), cfg.batch_size, rank, world, torch.Generator()))
    total = per_epoch * cfg.epochs
    warmup = max(1, round(cfg.warmup_fraction * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, warmup))
    generators = {"shuffle": torch.Generator().manual_seed(cfg.seed),  # identical on all ranks: disjoint shards
                  "augment": torch.Generator().manual_seed(cfg.seed * 1000 + rank + 1)}
    prog = _Progress(shuffle_state=generators["shuffle"].get_state())
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        prog = _Progress(**ckpt["progress"])
    step_module: nn.Module = _Step(model)
    if world > 1:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device] if device.type == "cuda" else None)
    tiles = _tiles(params, train_data, rows, device)
    labels = torch.from_numpy(remap_labels(train_data.labels[rows], classes)).to(device)
    run = _Run(params, rank, world, device, model, step_module, opt, sched, tiles, labels, classes,
               np.asarray(val_data.images[val_rows]), np.asarray(val_data.labels)[val_rows], generators,
               ckpt_path, fp)
    run_ctx = _start_mlflow(params, ckpt and ckpt["mlflow_run_id"], ckpt_path) if rank == 0 \
        else contextlib.nullcontext()
    with run_ctx as active:
        run.run_id = active.info.run_id if rank == 0 else None
        if rank == 0:
            mlflow.set_tag("data_path", "device" if tiles.on_device else "loader")
            if ckpt is not None:
                mlflow.log_metric("resumed_from_step", prog.step, step=prog.step)
        if ckpt is not None:  # last, so nothing above draws from the restored streams
            set_rng_state(ckpt["rng"][rank], generators)
        _loop(run, prog)
        if rank != 0:
            return {"run_id": None, "best_val_top1": None, "best_epoch": None, "epochs": len(prog.history),
                    "stopped_early": prog.stopped_early, "resumed_from_step": ckpt and ckpt["progress"]["step"]}
        model.load_state_dict(prog.best_state)
        save_model(model, params.paths.model)
        mlflow.log_metrics({"best_epoch": prog.best_epoch, "stopped_early": float(prog.stopped_early)})
        _log_results(params, active, prog.history)
        return {"run_id": active.info.run_id, "best_val_top1": prog.best, "best_epoch": prog.best_epoch,
                "epochs": len(prog.history), "stopped_early": prog.stopped_early,
                "resumed_from_step": ckpt and ckpt["progress"]["step"]}


def torchrun_command(params: Params, params_path: str | Path, resume: bool = False) -> list[str]:
    """The torchrun command line that runs :func:`main` on ``train.nproc_per_node`` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={params.train.nproc_per_node}", "-m", "geoclip.train", "--params", str(params_path),
            *(["--resume"] if resume else [])]


def launch(params_path: str | Path = "params.yaml", resume: bool = False) -> None:
    """Run training through torchrun (what the DVC stage, CLI and Prefect flow call); raise on failure."""
    params = load_params(params_path)
    if params.train.nproc_per_node < 1:
        raise GeoclipError(f"train.nproc_per_node: expected at least 1, got {params.train.nproc_per_node}")
    proc = subprocess.Popen(torchrun_command(params, params_path, resume), stderr=subprocess.PIPE)
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
    """torchrun entry point: ``python -m geoclip.train --params params.yaml [--resume]``."""
    ap = argparse.ArgumentParser(prog="python -m geoclip.train", description=__doc__)
    ap.add_argument("--params", default="params.yaml", help="path to params.yaml")
    ap.add_argument("--resume", action="store_true", help="continue from {paths.model}/checkpoint.pt")
    args = ap.parse_args(argv)
    try:
        result = train(load_params(args.params), resume=args.resume)
    except GeoclipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if result["run_id"]:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
