"""Tests for the losses: label-aware contrastive (softmax) and SigLIP (sigmoid), plus the temperature clamp."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from geoclip.model.loss import LOSSES, MAX_LOGIT_SCALE, clamp_logit_scale, label_aware_clip_loss, siglip_loss


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def test_hand_computed_three_samples():
    """Three images, two classes, scale 2: the value matches the formula written out by hand."""
    cls = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    loss = label_aware_clip_loss(img, cls, labels, torch.tensor(math.log(2.0)))
    e = math.exp
    # logits = 2 * img @ cls.T = [[2, 0], [0, 2], [1.2, 1.6]]
    i2t = (-math.log(e(2) / (e(2) + e(0))) - math.log(e(2) / (e(0) + e(2)))
           - math.log(e(1.6) / (e(1.2) + e(1.6)))) / 3
    z0, z1 = e(2) + e(0) + e(1.2), e(0) + e(2) + e(1.6)  # softmax over images, per class column
    t2i = (-math.log(e(2) / z0) + -(math.log(e(2) / z1) + math.log(e(1.6) / z1)) / 2) / 2
    assert loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)


def test_same_class_images_are_positives_not_negatives():
    """Perfect embeddings at a high scale: each class's text->image floor is log(k), shared by its k tiles."""
    cls = torch.eye(3, 8)
    labels = torch.tensor([0, 1, 1, 2, 2, 2, 2])
    loss = label_aware_clip_loss(cls[labels], cls, labels, torch.tensor(math.log(100.0)))
    expected = (0.0 + (math.log(1) + math.log(2) + math.log(4)) / 3) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-4)


def test_duplicating_the_batch_shifts_the_loss_by_half_log_m():
    """Repeating every tile m times leaves image->text unchanged and adds log(m) to text->image."""
    g = torch.Generator().manual_seed(0)
    cls, img = _unit(torch.randn(4, 16, generator=g)), _unit(torch.randn(10, 16, generator=g))
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0, 2])
    scale = torch.tensor(math.log(10.0))
    base = label_aware_clip_loss(img, cls, labels, scale)
    for m in (2, 3):
        dup = label_aware_clip_loss(img.repeat(m, 1), cls, labels.repeat(m), scale)
        assert dup.item() == pytest.approx(base.item() + math.log(m) / 2, rel=1e-5)


def test_order_of_the_batch_does_not_matter():
    """The loss is a function of the set of (image, label) pairs, not their order (as after a gather)."""
    g = torch.Generator().manual_seed(1)
    cls, img = _unit(torch.randn(3, 8, generator=g)), _unit(torch.randn(9, 8, generator=g))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1])
    perm = torch.randperm(9, generator=g)
    scale = torch.tensor(2.0)
    a = label_aware_clip_loss(img, cls, labels, scale)
    b = label_aware_clip_loss(img[perm], cls, labels[perm], scale)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_aligned_embeddings_beat_shuffled_ones():
    """Images near their own class embedding give a lower loss than the same images with shuffled labels."""
    g = torch.Generator().manual_seed(2)
    cls = _unit(torch.randn(5, 32, generator=g))
    labels = torch.arange(5).repeat(6)
    img = _unit(cls[labels] + 0.1 * torch.randn(30, 32, generator=g))
    scale = torch.tensor(math.log(1 / 0.07))
    aligned = label_aware_clip_loss(img, cls, labels, scale)
    shuffled = label_aware_clip_loss(img[torch.randperm(30, generator=g)], cls, labels, scale)
    assert aligned.item() < shuffled.item()


def test_gradients_reach_embeddings_and_logit_scale():
    """The loss is differentiable in both embeddings and the log temperature."""
    g = torch.Generator().manual_seed(3)
    cls = _unit(torch.randn(3, 8, generator=g)).requires_grad_()
    img = _unit(torch.randn(6, 8, generator=g)).requires_grad_()
    scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    label_aware_clip_loss(img, cls, torch.tensor([0, 1, 2, 0, 1, 1]), scale).backward()
    for t in (img, cls, scale):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def _clip_loss_by_loops(img: list[list[float]], cls: list[list[float]], labels: list[int], scale: float) -> float:
    """The label-aware loss written out term by term from its docstring, in plain Python (no torch reductions)."""
    n = len(labels)
    logits = [[scale * sum(a * b for a, b in zip(img[i], cls[j])) for j in range(len(cls))] for i in range(n)]
    # image -> text: cross-entropy of each image over every class embedding, present in the batch or not
    i2t = sum(math.log(sum(math.exp(v) for v in logits[i])) - logits[i][labels[i]] for i in range(n)) / n
    # text -> image: one softmax over the images per class that HAS images; mean over those classes only
    present = sorted(set(labels))
    t2i = 0.0
    for j in present:
        log_z = math.log(sum(math.exp(logits[i][j]) for i in range(n)))
        positives = [i for i in range(n) if labels[i] == j]
        t2i += sum(log_z - logits[i][j] for i in positives) / len(positives)
    return (i2t + t2i / len(present)) / 2


def test_classes_absent_from_the_batch_only_act_as_image_to_text_negatives():
    """A class with no image in the batch adds no text->image term: that mean runs over the present classes only."""
    cls = torch.eye(4, 4)
    labels = torch.tensor([0, 0, 1])  # classes 2 and 3 have no image
    loss = label_aware_clip_loss(cls[labels], cls, labels, torch.tensor(0.0))
    e = math.e
    # scale 1: the logits rows are [1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]
    i2t = math.log(e + 3) - 1  # every image: its own class at 1, three others at 0
    t2i = ((math.log(2 * e + 1) - 1) + (math.log(e + 2) - 1)) / 2  # classes 0 and 1; divided by 2, not by 4
    assert (i2t + t2i) / 2 == pytest.approx(0.72519, abs=1e-5)  # averaging over all 4 classes would give 0.54851
    assert loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)


def test_absent_classes_between_present_ones_match_the_formula_written_out():
    """Random embeddings, classes 0, 2 and 5 of 6 absent: the loss equals the docstring's formula computed by loops."""
    g = torch.Generator().manual_seed(8)
    cls, img = _unit(torch.randn(6, 5, generator=g)), _unit(torch.randn(7, 5, generator=g))
    labels = [1, 3, 3, 4, 1, 3, 4]
    loss = label_aware_clip_loss(img, cls, torch.tensor(labels), torch.tensor(math.log(5.0)))
    expected = _clip_loss_by_loops(img.double().tolist(), cls.double().tolist(), labels, 5.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# --- SigLIP (pairwise sigmoid) loss, the LOSSES registry and the temperature clamp ---------------------------


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_siglip_hand_computed_two_by_two():
    """Two tiles, two classes, scale 2, bias -1: the value matches the formula written out by hand."""
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cls = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    loss = siglip_loss(img, cls, torch.tensor([0, 1]), torch.tensor(math.log(2.0)), torch.tensor(-1.0))
    # logits = 2 * img @ cls.T - 1 = [[1, 0.2], [-1, 0.6]]; targets +1 on the diagonal, -1 elsewhere
    expected = (-(_logsig(1.0) + _logsig(-0.2)) - (_logsig(1.0) + _logsig(0.6))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_siglip_aligned_embeddings_beat_shuffled_ones():
    """Images near their own class embedding give a lower sigmoid loss than the same images shuffled."""
    g = torch.Generator().manual_seed(4)
    cls = _unit(torch.randn(5, 32, generator=g))
    labels = torch.arange(5).repeat(6)
    img = _unit(cls[labels] + 0.1 * torch.randn(30, 32, generator=g))
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    aligned = siglip_loss(img, cls, labels, scale, bias)
    shuffled = siglip_loss(img[torch.randperm(30, generator=g)], cls, labels, scale, bias)
    assert aligned.item() < shuffled.item()


def test_siglip_is_a_mean_over_tiles_so_repeating_the_batch_changes_nothing():
    """Pairs are independent binary problems: same-class tiles are never negatives, duplicates add nothing."""
    g = torch.Generator().manual_seed(5)
    cls, img = _unit(torch.randn(4, 16, generator=g)), _unit(torch.randn(10, 16, generator=g))
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0, 2])
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-3.0)
    base = siglip_loss(img, cls, labels, scale, bias)
    assert siglip_loss(img.repeat(3, 1), cls, labels.repeat(3), scale, bias).item() == pytest.approx(base.item())


def test_siglip_gradients_reach_embeddings_scale_and_bias():
    """The sigmoid loss is differentiable in both embeddings, the log temperature and the bias."""
    g = torch.Generator().manual_seed(6)
    cls = _unit(torch.randn(3, 8, generator=g)).requires_grad_()
    img = _unit(torch.randn(6, 8, generator=g)).requires_grad_()
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    siglip_loss(img, cls, torch.tensor([0, 1, 2, 0, 1, 1]), scale, bias).backward()
    for t in (img, cls, scale, bias):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_losses_share_one_signature_and_clip_ignores_the_bias():
    """LOSSES maps train.loss names to functions of (img, cls, labels, logit_scale, logit_bias)."""
    assert set(LOSSES) == {"clip", "siglip"}
    g = torch.Generator().manual_seed(7)
    cls, img = _unit(torch.randn(3, 8, generator=g)), _unit(torch.randn(6, 8, generator=g))
    labels, scale = torch.tensor([0, 1, 2, 0, 1, 1]), torch.tensor(2.0)
    for fn in LOSSES.values():
        assert torch.isfinite(fn(img, cls, labels, scale, torch.tensor(-10.0)))
    clip = LOSSES["clip"]
    assert clip(img, cls, labels, scale, torch.tensor(-10.0)).item() == clip(img, cls, labels, scale).item()
    assert clip(img, cls, labels, scale, torch.tensor(5.0)).item() == pytest.approx(
        clip(img, cls, labels, scale, torch.tensor(-10.0)).item(), rel=1e-6)


@pytest.mark.parametrize(("start", "clamped"), [(10.0, MAX_LOGIT_SCALE), (-1.0, 0.0), (2.0, 2.0)])
def test_clamp_logit_scale_keeps_the_temperature_in_range(start, clamped):
    """The learnable log scale is clamped in place to [0, log 100], without touching autograd."""
    module = torch.nn.Module()
    module.logit_scale = torch.nn.Parameter(torch.tensor(start))
    clamp_logit_scale(module)
    assert module.logit_scale.item() == pytest.approx(clamped)
    assert module.logit_scale.requires_grad and module.logit_scale.grad is None


def test_scale_is_capped_at_100_inside_both_losses():
    """A log scale above log 100 (before the clamp runs) acts as 100 in both losses."""
    cls = torch.eye(2, 4)
    img, labels = cls.clone(), torch.tensor([0, 1])
    for fn in LOSSES.values():
        capped = fn(img, cls, labels, torch.tensor(math.log(100.0)), torch.tensor(-10.0))
        assert fn(img, cls, labels, torch.tensor(9.0), torch.tensor(-10.0)).item() == pytest.approx(capped.item())
