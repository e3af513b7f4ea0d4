"""Contrastive training, one process per rank (torchrun): resumable checkpoints, early stopping, a run log on rank 0.

Training reports to a :class:`RunLog` it is handed (the train stage hands it an MLflow run) and never talks to a
tracking server itself; it returns its result and leaves the model, history and curve in ``paths.model``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import timm
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from geoclip.config import Params
from geoclip.data.captions import caption_phrases
from geoclip.data.prepare import PreparedData, load_split, split_captions, split_origins
from geoclip.errors import GeoclipError
from geoclip.ioutils import write_json
from geoclip.model.clip import GeoCLIP, ModelConfig, build_model, save_model
from geoclip.model.loss import LOSSES
from geoclip.model.openset import calibrate
from geoclip.model.pretrained import DEFAULT_PRIOR, get_source, prior_normalisation
from geoclip.model.text import embed_prompts
from geoclip.plots import pyplot, save_png
from geoclip.training.checkpoint import (
    CHECKPOINT_FILE,
    check_fingerprint,
    fingerprint,
    load_checkpoint,
    remove_stale_temps,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from geoclip.training.distributed import all_gather, broadcast, init_distributed
from geoclip.training.evaluate import predict_probs
from geoclip.training.feature_cache import N_VIEWS, cached_features
from geoclip.training.leave_out import scrub_captions
from geoclip.training.step import EmbeddingStep, lr_schedule, make_optimizer, training_step
from geoclip.training.train_data import (
    TrainTiles,
    concept_wording,
    fits_on_device,
    held_out,
    kept_rows,
    loader_workers,
    mixed_batches,
    remap_labels,
    training_classes,
)

HISTORY_FILE = "history.json"
FEATURE_CACHE_DIR = "feature_cache"  # beside the packs: a frozen encoder's features (geoclip.training.feature_cache)
CURVE_FILE = "training_curve.png"


class RunLog(Protocol):
    """Where rank 0 reports while training: per-epoch metrics and a few tags (the train stage passes an MLflow run)."""

    run_id: str | None  # kept in checkpoints, so a resumed training reports to the same run

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Record scalar metrics (at an epoch, when ``step`` is given)."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """Record string tags."""


class NoRunLog:
    """A run log that keeps nothing (training with nobody tracking it)."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Drop the metrics."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """Drop the tags."""


#: Opens (or, given the run id a checkpoint recorded, reopens) the run log; called on rank 0 only.
OpenRunLog = Callable[[str | None], AbstractContextManager[RunLog]]


@contextlib.contextmanager
def no_run_log(resumed_run_id: str | None = None) -> Iterator[RunLog]:
    """The :data:`OpenRunLog` that tracks nothing."""
    yield NoRunLog()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def chosen_prior(params: Params, has_real: bool) -> str:
    """The pretrained source training uses: ``train.pretrained``, with "auto" the default prior when real tiles are
    among the training tiles (``has_real``) and none otherwise."""
    if params.train.pretrained == "auto":
        return DEFAULT_PRIOR if has_real else ""
    return params.train.pretrained


def effective_freeze(params: Params, mcfg: ModelConfig, rank: int = 1) -> str:
    """``train.freeze_image`` for an encoder that starts from weights (a prior or ``init_weights``); "none" for a
    randomly initialised one, which has nothing to keep (said once, on rank 0)."""
    spec = params.train.freeze_image.strip().lower()
    if spec != "none" and not (mcfg.pretrained or params.train.init_weights):
        if rank == 0 and params.train.pretrained != "auto":  # auto without real tiles: no prior, nothing to say
            tqdm.write(f"note: train.freeze_image {spec!r} ignored: the encoder starts from random weights (no "
                       "train.pretrained or init_weights)", file=sys.stderr)
        return "none"
    return spec


def model_config(params: Params, data: PreparedData, prior: str = "") -> ModelConfig:
    """The model's configuration from params, checked against the packs' band and class order.

    The class list is always the full ``classes.names``, also with ``train.holdout_class``: the held-out
    class is left out of training only, so evaluation can still score it zero-shot. With a pretrained ``prior``
    (:func:`chosen_prior`) the encoder is its architecture, its bands are standardised as its weights expect,
    and its provenance is recorded.
    """
    name = params.train.image_encoder
    source = get_source(prior) if prior else None
    if source is not None:
        name = source.architecture
    if not timm.is_model(name):
        raise GeoclipError(f"train.image_encoder: unknown timm model {name!r}; expected a name from "
                           "timm.list_models(), e.g. 'resnet18'")
    if (list(data.band_names) != list(params.bands) or list(data.class_names) != list(params.classes.names)
            or list(data.concept_names) != list(params.classes.concepts)):
        raise GeoclipError(f"{params.paths.prepared}/stats.json: bands/classes/concepts differ from params.yaml "
                           f"({data.band_names}, {data.class_names}, {data.concept_names}); rerun `geoclip prepare`")
    # Training contrasts the concepts too (their prompts follow the classes'); the saved model keeps the classes.
    names = [*params.classes.names, *data.concept_names]
    prompts = [params.classes.prompts(c) for c in params.classes.names]
    prompts += [params.classes.prompts(c, concept_wording(params, c)) for c in data.concept_names]
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    extra = {"loss": params.train.loss, "encoder_args": dict(params.train.encoder_args),
             "text_finetune": params.train.text_finetune, "text_projection": params.train.text_projection,
             "spectral_stats": params.train.spectral_stats,
             "templates": list(params.classes.templates), "descriptions": dict(params.classes.descriptions),
             "processing_level": params.ingest.processing_level.upper()}
    mean, std = list(data.mean), list(data.std)
    input_size, stages = params.train.input_size, list(params.train.feature_stages)
    if source is not None:
        mean, std = prior_normalisation(source, list(params.bands), mean, std)
        input_size, stages = input_size or source.input_size, stages or list(source.feature_stages)
        extra["provenance"] = source.provenance()
        extra["spectral_stats"] = True  # the only way in for the bands the prior does not read, when it is frozen
    extra |= {"pretrained": prior, "input_size": input_size, "feature_stages": stages}
    return ModelConfig(image_encoder=name, embed_dim=params.train.embed_dim, band_names=list(params.bands),
                       class_names=list(names), prompts=prompts,
                       band_mean=mean, band_std=std, tile_size=data.images.shape[-1],
                       init_temperature=params.train.init_temperature,
                       input_band_names=list(data.source_band_names),
                       **{k: v for k, v in extra.items() if k in known})


def write_history(directory: Path, history: list[dict]) -> tuple[Path, Path]:
    """Write ``history.json`` and a training-curve PNG (loss, val top-1) into ``directory``."""
    plt = pyplot()
    write_json(directory / HISTORY_FILE, history)
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax1.set(xlabel="epoch", ylabel="train loss", title="Training loss")
    ax2.plot(epochs, [h["val_top1"] for h in history], marker="o", color="tab:green")
    ax2.set(xlabel="epoch", ylabel="val top-1", title="Validation zero-shot top-1", ylim=(0, 1))
    fig.tight_layout()
    save_png(fig, directory / CURVE_FILE)
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
    is_real: np.ndarray  # per kept training tile: from a real source (train.real_share draws from these)
    balance_labels: np.ndarray | None  # per kept training tile, its class when train.class_balance, else None
    caption_ids: torch.Tensor | None  # per kept training tile, its row of caption_features (-1: none); None: off
    caption_features: torch.Tensor | None  # sentence embeddings of the distinct captions, on the device
    generators: dict[str, torch.Generator]
    ckpt_path: Path
    fingerprint: dict | None  # rank 0 only
    log: RunLog = field(default_factory=NoRunLog)  # rank 0's run log
    launch_id: str = ""  # an elastic launch's identity, kept in its checkpoints (see train)
    # A frozen encoder's features (kept training tiles, 8 views, features), float16 on the device; None: computed
    tower_cache: torch.Tensor | None = None
    val_tower: torch.Tensor | None = None  # the same for the validation tiles, view 0 (rank 0 only)
    caption_texts: list[str] = field(default_factory=list)  # the distinct captions training contrasts


def _save(run: _Run, prog: _Progress) -> None:
    """Write the checkpoint (collective: every rank contributes its RNG states; rank 0 writes)."""
    rngs = all_gather(rng_state(run.generators), run.world)
    if run.rank != 0:
        return
    state = {f.name: getattr(prog, f.name) for f in dataclasses.fields(prog)}
    save_checkpoint(run.ckpt_path, {
        "progress": state, "model": run.model.state_dict(), "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict(), "rng": rngs, "fingerprint": run.fingerprint,
        "run_id": run.log.run_id, "launch_id": run.launch_id})


def _read_resume(path: Path, fp: dict | None, resume: bool, rank: int, world: int,
                 launch_id: str = "") -> dict | None:
    """The checkpoint to resume from (read by rank 0, sent to all), or None to start fresh."""
    payload = None
    if rank == 0:
        remove_stale_temps(path)  # a run killed while writing a checkpoint leaves its temp file
    if rank == 0 and launch_id:
        resume = path.exists() and _launch_of(path) == launch_id
        if path.exists() and not resume:
            tqdm.write(f"note: {path} is not from launch {launch_id}: starting fresh", file=sys.stderr)
    if rank == 0 and path.exists() and not resume and not launch_id:
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


def _launch_of(path: Path) -> str | None:
    """The launch id a checkpoint was written under (None: unreadable, or from a run without one)."""
    try:
        return load_checkpoint(path).get("launch_id")
    except GeoclipError:
        return None




def compiled(step_module: nn.Module, mode: str, device: torch.device, rank: int = 0) -> nn.Module:
    """``step_module`` compiled in ``mode`` (train.compile) on a GPU; as it is when off, or on the CPU (said once)."""
    if mode == "off":
        return step_module
    if device.type != "cuda":
        if rank == 0:
            print(f"train.compile: {mode!r} is for GPUs; training on the CPU without compiling", file=sys.stderr)
        return step_module
    # dynamic=False: one graph per batch shape (the full batch, and at most one short last batch per epoch).
    return torch.compile(step_module, mode=mode, dynamic=False)


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
        tower = None
        if run.tower_cache is not None:  # one random view of each tile (what augment's flips do to pixels)
            view = torch.randint(0, N_VIEWS, (len(idx),), generator=run.generators["augment"])
            tower = run.tower_cache[idx.to(device), view.to(device)].float()
        pending.append(training_step(run.step_module, run.model, run.opt, run.sched, raw,
                                     run.labels[idx.to(device)], cls_idx, loss_fn=loss_fn,
                                     generator=run.generators["augment"], gain_noise=cfg.gain_noise,
                                     bf16=cuda, channels_last=cuda, world=run.world, offset_noise=cfg.offset_noise,
                                     pixel_noise=cfg.pixel_noise, crop_scale=cfg.crop_scale,
                                     caption_ids=None if run.caption_ids is None else run.caption_ids[idx.to(device)],
                                     caption_features=run.caption_features, caption_weight=cfg.caption_weight,
                                     tower=tower))
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


@torch.no_grad()
def _val_probs_from_cache(run: _Run) -> np.ndarray:
    """Validation probabilities with a frozen encoder: its cached features of each tile as it is (view 0)."""
    model, bs = run.model, run.params.evaluate.batch_size
    model.eval()
    classes, out = model.class_embeddings(), []
    for s in range(0, len(run.val_x), bs):
        x = torch.from_numpy(np.asarray(run.val_x[s:s + bs]).astype(np.float32)).to(run.device)
        emb = model.encode_image(x, tower=run.val_tower[s:s + bs].float())
        out.append((model.scale() * emb @ classes.T).softmax(dim=-1).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(model.cfg.class_names)), np.float32)


def _val_top1(run: _Run) -> float:
    """Zero-shot top-1 on the validation tiles, choosing among the trained classes only."""
    if run.val_tower is not None:
        probs = _val_probs_from_cache(run)
    else:
        probs = predict_probs(run.model, run.val_x, run.params.evaluate.batch_size, run.device)
    among = [c for c in run.classes if c < len(run.params.classes.names)]  # concepts are not answers
    pred = np.asarray(among)[probs[:, among].argmax(axis=1)]
    return float((pred == run.val_y).mean())


#: history.json keys logged to MLflow under another name.
EPOCH_METRICS = {"val_top1": "epoch_val_top1"}


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
        # In MLflow "val_top1" is evaluation's (the promotion gate's, with test-time augmentation), logged to this
        # run later: the per-epoch figure gets a name of its own. One name, one meaning.
        run.log.log_metrics({EPOCH_METRICS.get(k, k): v for k, v in row.items() if k != "epoch"}, step=prog.epoch)
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


def _run_epochs(run: _Run, prog: _Progress) -> None:
    """Train epoch by epoch from wherever ``prog`` stands until the last epoch or early stopping."""
    cfg = run.params.train
    shuffle = run.generators["shuffle"]
    while not prog.finished and prog.epoch <= cfg.epochs:
        shuffle.set_state(prog.shuffle_state)  # replaying the epoch's shuffle lets a resume skip the done batches
        batches = mixed_batches(run.is_real, cfg.real_share, cfg.batch_size, run.rank, run.world, shuffle,
                                run.balance_labels)
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


def default_classes_only(model: GeoCLIP, n: int) -> GeoCLIP:
    """The model with only its first ``n`` classes (``classes.names``): the concepts it trained on are dropped from
    its class list, so prediction and scoring answer among the default classes unless asked otherwise."""
    if len(model.cfg.class_names) == n:
        return model
    cfg = replace(model.cfg, class_names=model.cfg.class_names[:n], prompts=model.cfg.prompts[:n])
    with torch.no_grad():
        features = model.prompt_text_features()[:n].detach().float().cpu()
    out = GeoCLIP(cfg, features, text_encoder=model.text_encoder)
    state = {k: v for k, v in model.state_dict().items() if k != "prompt_features"}
    out.load_state_dict(state, strict=False)
    return out.to(next(model.parameters()).device).eval()


def learnt_texts(run: _Run) -> list[str]:
    """What the class side learnt from: the trained classes' and concepts' wordings and the phrases of the captions
    it contrasted (those of the kept training tiles, none naming the held-out class)."""
    cfg = run.model.cfg
    texts = [cfg.prompts[c][0] for c in run.classes]
    return list(dict.fromkeys(texts + caption_phrases(run.caption_texts)))


def served_model(run: _Run) -> GeoCLIP:
    """The best model as saved: the default classes only, what it learnt and its open-set calibration recorded."""
    model = default_classes_only(run.model, len(run.params.classes.names))
    quantiles = []
    if len(run.val_y):  # with the views the served model averages (evaluate.tta), so novelty means the same there
        quantiles = calibrate(model, run.val_x, run.val_y, run.params.evaluate.batch_size, run.device,
                              tta=run.params.evaluate.tta)
    model.cfg = replace(model.cfg, learnt_texts=learnt_texts(run), open_set_quantiles=quantiles)
    return model


def _check_data(params: Params, train_data: PreparedData, val_data: PreparedData, classes: list[int]) -> None:
    """Enough tiles left to train and validate on (after leaving out a held-out class)."""
    n_train = len(kept_rows(train_data.labels, classes))
    n_val = len(kept_rows(val_data.labels, classes))
    if n_train < 2 or n_val < 1:
        held = f" without {params.train.holdout_class!r}" if params.train.holdout_class else ""
        raise GeoclipError(f"{params.paths.prepared}: need at least 2 train and 1 val tiles{held}, got "
                           f"{n_train} and {n_val}")


def _seeded_model(params: Params, mcfg: ModelConfig, device: torch.device) -> GeoCLIP:
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


def _tower_cache(params: Params, model: GeoCLIP, data: PreparedData, rows: np.ndarray, rank: int, world: int,
                 device: torch.device) -> torch.Tensor | None:
    """With the whole encoder frozen, its cached features of the kept training tiles (rank 0 fills the cache first,
    the other ranks then read it); else None."""
    if effective_freeze(params, model.cfg) != "all":
        return None
    cache_dir = Path(params.paths.prepared).parent / FEATURE_CACHE_DIR
    batch = params.evaluate.batch_size
    if rank == 0:
        features, computed = cached_features(model, data.images, rows, cache_dir, batch, device)
        tqdm.write(f"train.freeze_image 'all': encoder features of {len(rows)} tiles x {N_VIEWS} views, "
                   f"{computed} computed, {len(rows) - computed} from {cache_dir}", file=sys.stderr)
    broadcast(None, world)  # the others wait for rank 0's cache
    if rank != 0:
        features, _ = cached_features(model, data.images, rows, cache_dir, batch, device)
    return torch.from_numpy(features).to(device)


def _captions(params: Params, rows: np.ndarray, device: torch.device
              ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str]]:
    """Per kept training tile, the row of its caption among the distinct captions, their sentence embeddings, and
    the distinct captions themselves.

    ``(None, None, [])`` when ``train.caption_weight`` is 0 or no training tile has a caption (then said once).
    """
    if params.train.caption_weight <= 0:
        return None, None, []
    captions = split_captions(params.paths.prepared, "train")
    if captions is not None:  # a caption naming the held-out class would teach it under another name
        captions = np.array(scrub_captions(captions, held_out(params)), dtype=object)
    distinct = sorted({c for c in captions[rows] if c}) if captions is not None else []
    if not distinct:
        tqdm.write(f"note: train.caption_weight {params.train.caption_weight}: no training tile has a caption "
                   "(labels.csv column 'caption'); training on the class prompts only", file=sys.stderr)
        return None, None, []
    position = {c: i for i, c in enumerate(distinct)}
    ids = np.array([position.get(c, -1) for c in captions[rows]], dtype=np.int64)
    features = torch.from_numpy(embed_prompts(distinct))
    return torch.from_numpy(ids).to(device), features.to(device), distinct


def train(params: Params, resume: bool = False, open_log: OpenRunLog = no_run_log, launch_id: str = "") -> dict:
    """Train on the prepared packs (one call per rank); ``resume`` continues from ``{paths.model}/checkpoint.pt``.

    ``launch_id`` (an elastic multi-node launch, whose torchrun agents restart the worker group after a failure)
    decides instead of ``resume``: continue from the checkpoint when this same launch wrote it, else start fresh.

    Rank 0 reports per-epoch metrics to the run log ``open_log`` opens (reopened on resume) and writes the best
    model, ``history.json`` and the training curve into ``paths.model``. Returns ``{"run_id", "best_val_top1",
    "best_epoch", "epochs", "stopped_early", "resumed_from_step"}`` (``epochs``: epochs actually run; ``run_id``:
    the run log's, None on ranks other than 0).
    """
    cfg = params.train
    if cfg.epochs < 1 or cfg.batch_size < 2:
        raise GeoclipError(f"train.epochs/batch_size: expected >= 1 and >= 2, got {cfg.epochs}/{cfg.batch_size}")
    if not 0 <= cfg.caption_weight <= 1 or (cfg.caption_weight > 0 and cfg.text_finetune):
        raise GeoclipError(f"train.caption_weight: {cfg.caption_weight}; expected 0 to 1, and 0 with "
                           "train.text_finetune (captions are embedded by the frozen sentence encoder)")
    if cfg.checkpoint_every < 0 or cfg.patience < 0:
        raise GeoclipError(f"train.checkpoint_every/patience: expected >= 0, got {cfg.checkpoint_every}/"
                           f"{cfg.patience}")
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    train_data = load_split(params.paths.prepared, "train")
    val_data = load_split(params.paths.prepared, "val")
    origins = split_origins(params.paths.prepared, "train")
    has_real = origins is not None and bool((origins == "real").any())
    mcfg = model_config(params, train_data, chosen_prior(params, has_real))
    classes = training_classes(params, train_data.concept_names)
    _check_data(params, train_data, val_data, classes)
    rank, world, device = init_distributed()
    try:
        return _train_rank(params, resume, open_log, train_data, val_data, mcfg, classes, rank, world, device,
                           launch_id)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train_rank(params: Params, resume: bool, open_log: OpenRunLog, train_data: PreparedData,
                val_data: PreparedData, mcfg: ModelConfig, classes: list[int], rank: int, world: int,
                device: torch.device, launch_id: str = "") -> dict:
    """The body of :func:`train` on one rank, once the process group is up."""
    cfg = params.train
    ckpt_path = Path(params.paths.model) / CHECKPOINT_FILE
    fp = fingerprint(params, world) if rank == 0 else None
    ckpt = _read_resume(ckpt_path, fp, resume, rank, world, launch_id)
    seed_everything(cfg.seed)
    model = _seeded_model(params, mcfg, device)
    frozen = model.freeze_image(effective_freeze(params, mcfg, rank))
    if rank == 0 and frozen:
        tqdm.write(f"train.freeze_image {cfg.freeze_image!r}: {len(frozen)} encoder tensors frozen", file=sys.stderr)
    opt = make_optimizer(model, cfg.scaled_lr(), cfg.weight_decay)
    rows, val_rows = kept_rows(train_data.labels, classes), kept_rows(val_data.labels, classes)
    origins = split_origins(params.paths.prepared, "train")
    is_real = np.zeros(len(rows), dtype=bool) if origins is None else origins[rows] == "real"
    train_labels = remap_labels(train_data.labels[rows], classes)
    balance_labels = train_labels if cfg.class_balance else None
    per_epoch = len(mixed_batches(is_real, cfg.real_share, cfg.batch_size, rank, world, torch.Generator(),
                                  balance_labels))
    total = per_epoch * cfg.epochs
    sched = lr_schedule(opt, total, cfg.warmup_fraction)
    generators = {"shuffle": torch.Generator().manual_seed(cfg.seed),  # identical on all ranks: disjoint shards
                  "augment": torch.Generator().manual_seed(cfg.seed * 1000 + rank + 1)}
    prog = _Progress(shuffle_state=generators["shuffle"].get_state())
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        prog = _Progress(**ckpt["progress"])
    step_module: nn.Module = EmbeddingStep(model)
    if world > 1:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device] if device.type == "cuda" else None)
    step_module = compiled(step_module, cfg.compile, device, rank)
    tiles = _tiles(params, train_data, rows, device)
    labels = torch.from_numpy(train_labels).to(device)
    caption_ids, caption_features, caption_texts = _captions(params, rows, device)
    run = _Run(params, rank, world, device, model, step_module, opt, sched, tiles, labels, classes,
               np.asarray(val_data.images[val_rows]), np.asarray(val_data.labels)[val_rows], is_real, balance_labels,
               caption_ids, caption_features, generators, ckpt_path, fp, launch_id=launch_id,
               tower_cache=_tower_cache(params, model, train_data, rows, rank, world, device),
               caption_texts=caption_texts)
    if run.tower_cache is not None and rank == 0:  # validation reads the cache too (the same tiles every epoch)
        run.val_tower = _tower_cache(params, model, val_data, val_rows, 0, 1, device)[:, 0]
    # Checkpoints from before the run log was generic name it mlflow_run_id.
    resumed_run_id = ckpt and (ckpt.get("run_id") or ckpt.get("mlflow_run_id"))
    with open_log(resumed_run_id) if rank == 0 else contextlib.nullcontext(NoRunLog()) as log:
        run.log = log
        if rank == 0:
            log.set_tags({"data_path": "device" if tiles.on_device else "loader",
                          "image_encoder": model.cfg.image_encoder,  # a prior's architecture replaces the param's
                          **(model.cfg.provenance or {"pretrained": "none"})})
            if ckpt is not None:
                log.log_metrics({"resumed_from_step": prog.step}, step=prog.step)
        if ckpt is not None:  # last, so nothing above draws from the restored streams
            set_rng_state(ckpt["rng"][rank], generators)
        _run_epochs(run, prog)
        resumed_from = ckpt and ckpt["progress"]["step"]
        if rank != 0:
            return {"run_id": None, "best_val_top1": None, "best_epoch": None, "epochs": len(prog.history),
                    "stopped_early": prog.stopped_early, "resumed_from_step": resumed_from}
        model.load_state_dict(prog.best_state)
        save_model(served_model(run), params.paths.model)
        write_history(Path(params.paths.model), prog.history)
        log.log_metrics({"best_epoch": prog.best_epoch, "stopped_early": float(prog.stopped_early)})
        return {"run_id": log.run_id, "best_val_top1": prog.best, "best_epoch": prog.best_epoch,
                "epochs": len(prog.history), "stopped_early": prog.stopped_early, "resumed_from_step": resumed_from}
