"""Seeded tensor augmentation for raw multispectral tiles: flips, 90-degree rotations, per-band gain."""

from __future__ import annotations

import torch


def augment(x: torch.Tensor, generator: torch.Generator, gain_std: float = 0.05) -> torch.Tensor:
    """Randomly flip, rotate by a multiple of 90 degrees and scale each band of each tile ``(N, B, H, W)``.

    Random draws come from ``generator`` (a CPU generator, so runs repeat on any device); the
    per-band gain ``1 + N(0, gain_std)`` mimics small radiometric differences between scenes.
    Square tiles are assumed (rotations keep the shape).
    """
    n, bands = x.shape[:2]
    draws = torch.rand(n, 2, generator=generator)
    turns = torch.randint(0, 4, (n,), generator=generator)
    gain = 1.0 + gain_std * torch.randn(n, bands, 1, 1, generator=generator)
    x = x.float()
    flip_w = (draws[:, 0] < 0.5).to(x.device).view(-1, 1, 1, 1)
    flip_h = (draws[:, 1] < 0.5).to(x.device).view(-1, 1, 1, 1)
    x = torch.where(flip_w, x.flip(-1), x)
    x = torch.where(flip_h, x.flip(-2), x)
    out = x.clone()
    for k in (1, 2, 3):
        sel = (turns == k).nonzero().flatten().to(x.device)
        if len(sel):
            out[sel] = torch.rot90(x[sel], k, dims=(-2, -1))
    return out * gain.clamp(min=0.0).to(x.device)
