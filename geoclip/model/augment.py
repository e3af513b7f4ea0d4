"""Seeded tensor augmentation for raw multispectral tiles: flips, 90-degree rotations, per-band gain noise."""

from __future__ import annotations

import torch


def augment(x: torch.Tensor, generator: torch.Generator, gain_std: float = 0.05) -> torch.Tensor:
    """Apply a random symmetry of the square and a random per-band gain to each tile ``(N, B, H, W)``; float32 out.

    The symmetry is a random transpose followed by random horizontal and vertical flips: the 8 equally likely
    outcomes are exactly the 4 rotations by multiples of 90 degrees, each with or without a mirror. The band
    noise is a gain ``1 + N(0, gain_std)`` per tile and band, mimicking radiometric differences between scenes.

    The few draws (``N * (3 + B)`` numbers) come from ``generator``, a CPU generator, so a run repeats on any
    device and a checkpoint needs only CPU generator states; the pixel work runs on ``x``'s device with
    ``torch.where`` (no data-dependent indexing, so no host synchronisation on a GPU). Square tiles are assumed.
    """
    n, bands = x.shape[:2]
    flips = torch.rand(n, 3, generator=generator) < 0.5
    gain = (1.0 + gain_std * torch.randn(n, bands, 1, 1, generator=generator)).clamp(min=0.0)
    flips, gain = flips.to(x.device, non_blocking=True), gain.to(x.device, non_blocking=True)
    x = x.float()
    x = torch.where(flips[:, 0].view(-1, 1, 1, 1), x.transpose(-1, -2), x)
    x = torch.where(flips[:, 1].view(-1, 1, 1, 1), x.flip(-1), x)
    x = torch.where(flips[:, 2].view(-1, 1, 1, 1), x.flip(-2), x)
    return x * gain
