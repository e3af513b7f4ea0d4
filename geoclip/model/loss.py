"""Contrastive losses between tiles and class embeddings: label-aware CLIP (softmax) and SigLIP (sigmoid)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's cap on the inverse temperature
SIGLIP_INIT_BIAS = -10.0  # SigLIP's initial logit bias: starts near "no pair matches", as most pairs don't


def _scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """The inverse temperature ``exp(logit_scale)``, capped at 100 (as in CLIP)."""
    return logit_scale.exp().clamp(max=math.exp(MAX_LOGIT_SCALE))


def label_aware_clip_loss(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor,
                          logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric CLIP loss between images ``(N, D)`` and class embeddings ``(C, D)``, aware of labels.

    ``logit_scale`` is the model's log inverse temperature (a scalar parameter); the scale used is
    ``exp(logit_scale)`` capped at 100. Embeddings are expected unit-norm; pass the embeddings
    gathered from all ranks to get the global-batch loss. ``logit_bias`` is ignored (a softmax is
    shift-invariant); it is accepted so every loss in :data:`LOSSES` has one signature.

    - image -> text: cross-entropy of each image over all ``C`` class embeddings.
    - text -> image: for each class present in the batch, a softmax over the batch's images with
      ALL images of that class as positives; the term is the negative mean log-probability of the
      positives (SupCon "outside" form), averaged over the present classes. Same-class images are
      therefore never pushed apart, and the term's floor for a class with ``k`` images is ``log k``.

    The result is the mean of the two directions.
    """
    logits = _scale(logit_scale) * image_emb @ class_emb.T  # (N, C)
    image_to_text = F.cross_entropy(logits, labels)

    present = torch.unique(labels)  # sorted class ids that occur in the batch
    log_prob = logits[:, present].log_softmax(dim=0)  # (N, P): each column is a softmax over images
    positives = (labels[:, None] == present[None, :]).to(log_prob.dtype)  # (N, P)
    per_class = -(log_prob * positives).sum(dim=0) / positives.sum(dim=0)
    text_to_image = per_class.mean()
    return (image_to_text + text_to_image) / 2


def siglip_loss(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss over every (tile, class) pair, with class targets.

    ``logits = exp(logit_scale) * image_emb @ class_emb.T + logit_bias`` (scale capped at 100); the
    target is +1 for the tile's own class and -1 for every other class. The loss is
    ``-sum_c log sigmoid(target * logit)`` per tile, averaged over tiles (the paper's
    ``1/|B| sum_i sum_j``). Each pair is an independent binary problem, so same-class tiles are never
    negatives of each other and no softmax over the (gathered) batch is needed.
    """
    logits = _scale(logit_scale) * image_emb @ class_emb.T + logit_bias  # (N, C)
    targets = 2.0 * F.one_hot(labels, num_classes=class_emb.shape[0]).to(logits.dtype) - 1.0
    return -F.logsigmoid(targets * logits).sum(dim=1).mean()


#: Every loss takes ``(image_emb, class_emb, labels, logit_scale, logit_bias)`` (``train.loss`` picks one).
LOSSES: dict[str, Callable[..., torch.Tensor]] = {"clip": label_aware_clip_loss, "siglip": siglip_loss}


@torch.no_grad()
def clamp_logit_scale(model: nn.Module) -> None:
    """Clamp the model's learnable log inverse temperature to ``[0, MAX_LOGIT_SCALE]`` in place (after a step)."""
    model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
