"""One optimisation step of contrastive training, its optimiser and its learning-rate schedule.

Kept apart from the training loop (``geoclip.training.train``) and light on imports, so the throughput bench
(``bench/train_throughput.py``) times this very step without loading the data pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from geoclip.model.augment import augment
from geoclip.model.clip import GeoCLIP
from geoclip.model.loss import MAX_LOGIT_SCALE
from geoclip.training.distributed import gather

TEXT_LR_FACTOR = 0.01  # a fine-tuned pretrained sentence encoder needs a far smaller step than the fresh parts


class EmbeddingStep(nn.Module):
    """What DDP wraps (and torch.compile compiles): one forward that yields everything the loss needs.

    DDP only hooks ``forward``, so the image and class embeddings, the logit scale and the logit bias all come
    out of this one call.
    """

    def __init__(self, model: GeoCLIP):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, caption_features: torch.Tensor | None = None, tower: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Unit image embeddings, unit class embeddings, the log inverse temperature and the logit bias.

        With ``caption_features`` (sentence embeddings ``(K, text_dim)``), their unit embeddings follow the classes'
        rows: the caption loss's gradients then pass through this one forward too. ``tower``: a frozen encoder's
        cached features of these tiles (:meth:`GeoCLIP.encode_image`).
        """
        m = self.model
        texts = m.class_embeddings()
        if caption_features is not None:
            texts = torch.cat([texts, m.encode_text(caption_features, normalize=True).to(texts.dtype)])
        return m.encode_image(x, tower=tower), texts, m.logit_scale, getattr(m, "logit_bias", None)


def make_optimizer(model: GeoCLIP, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; weight decay on weight matrices and kernels only; the sentence encoder (if fine-tuned) at lr x 0.01."""
    text = getattr(model, "text_encoder", None)
    text_ids = {id(p) for p in text.parameters()} if isinstance(text, nn.Module) else set()
    groups = []
    for ids_wanted, group_lr in ((False, lr), (True, lr * TEXT_LR_FACTOR)):
        trainable = [p for p in model.parameters() if p.requires_grad and (id(p) in text_ids) == ids_wanted]
        groups += [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay, "lr": group_lr},
                   {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0, "lr": group_lr}]
    # fused: one kernel for the whole update on CUDA (the foreach default launches several per parameter group).
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def lr_schedule(opt: torch.optim.Optimizer, total_steps: int, warmup_fraction: float
                ) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule over ``total_steps``: linear warmup for ``warmup_fraction`` of them, then cosine."""
    warmup = max(1, round(warmup_fraction * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, warmup))


def training_step(step_module: nn.Module, model: GeoCLIP, opt: torch.optim.Optimizer,
                  sched: torch.optim.lr_scheduler.LRScheduler, raw: torch.Tensor, labels: torch.Tensor,
                  cls_idx: torch.Tensor, *, loss_fn: Callable[..., torch.Tensor], generator: torch.Generator,
                  gain_noise: float, bf16: bool, channels_last: bool, world: int = 1, offset_noise: float = 0.0,
                  pixel_noise: float = 0.0, crop_scale: float = 1.0, caption_ids: torch.Tensor | None = None,
                  caption_features: torch.Tensor | None = None, caption_weight: float = 0.0,
                  tower: torch.Tensor | None = None) -> torch.Tensor:
    """One optimisation step on raw tiles ``raw`` (labels: positions in ``cls_idx``); returns the detached loss.

    ``step_module`` is ``EmbeddingStep(model)``, possibly DDP-wrapped or compiled; ``generator`` is the CPU
    generator augmentation draws from; ``cls_idx`` picks the trained classes from the class embeddings; ``world``
    ranks contribute to the loss; ``offset_noise``, ``pixel_noise`` and ``crop_scale`` are :func:`augment`'s. With
    ``caption_weight`` > 0, ``caption_ids`` (per tile, a row of ``caption_features``, -1 for none) bring in the caption
    loss (the batch's tiles against the batch's distinct captions, tiles sharing a caption all positives) with that
    share of the total, the class loss the rest. ``tower``: a frozen encoder's features of these tiles, in place of
    running it (the spectral statistics still come from the augmented tiles). The loss
    stays on the device (reading it would wait for the GPU).
    """
    x = augment(raw, generator, gain_noise, offset_noise, pixel_noise, model.band_std, crop_scale)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    captioned = None
    if caption_weight > 0 and caption_ids is not None and caption_features is not None:
        ids = gather(caption_ids, world, grad=False)  # the global batch's, so every rank embeds the same captions
        have = ids >= 0
        if bool(have.any()):
            distinct, positions = torch.unique(ids[have], return_inverse=True)
            captioned = (have, positions, caption_features[distinct])
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        img_emb, text_emb, scale, bias = step_module(x, None if captioned is None else captioned[2], tower)
    n_classes = text_emb.shape[0] - (0 if captioned is None else len(captioned[2]))
    bias = None if bias is None else bias.float()
    # The loss sees every rank's images, so each class is contrasted against the global batch, and only
    # the trained classes: a held-out class is never even a negative (its name stays unseen).
    images = gather(img_emb.float(), world, grad=True)
    loss = loss_fn(images, text_emb[:n_classes].float()[cls_idx], gather(labels, world, grad=False), scale, bias)
    if captioned is not None:
        have, positions, _ = captioned
        caption_loss = loss_fn(images[have], text_emb[n_classes:].float(), positions, scale, bias)
        loss = (1 - caption_weight) * loss + caption_weight * caption_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    with torch.no_grad():  # CLIP caps the inverse temperature at 100
        model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
    return loss.detach()
