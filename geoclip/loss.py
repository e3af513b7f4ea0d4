"""Label-aware contrastive loss: tiles of the same class are never each other's negatives."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's cap on the inverse temperature


def label_aware_clip_loss(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor,
                          logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss between images ``(N, D)`` and class embeddings ``(C, D)``, aware of labels.

    ``logit_scale`` is the model's log inverse temperature (a scalar parameter); the scale used is
    ``exp(logit_scale)`` capped at 100. Embeddings are expected unit-norm; pass the embeddings
    gathered from all ranks to get the global-batch loss.

    - image -> text: cross-entropy of each image over all ``C`` class embeddings.
    - text -> image: for each class present in the batch, a softmax over the batch's images with
      ALL images of that class as positives; the term is the negative mean log-probability of the
      positives (SupCon "outside" form), averaged over the present classes. Same-class images are
      therefore never pushed apart, and the term's floor for a class with ``k`` images is ``log k``.

    The result is the mean of the two directions.
    """
    scale = logit_scale.exp().clamp(max=100.0)
    logits = scale * image_emb @ class_emb.T  # (N, C)
    image_to_text = F.cross_entropy(logits, labels)

    present = torch.unique(labels)  # sorted class ids that occur in the batch
    log_prob = logits[:, present].log_softmax(dim=0)  # (N, P): each column is a softmax over images
    positives = (labels[:, None] == present[None, :]).to(log_prob.dtype)  # (N, P)
    per_class = -(log_prob * positives).sum(dim=0) / positives.sum(dim=0)
    text_to_image = per_class.mean()
    return (image_to_text + text_to_image) / 2
