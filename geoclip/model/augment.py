"""Seeded tensor augmentation for raw Sentinel-2 tiles: dihedral views, per-band gain and offset, sensor noise,
random resized crops."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, generator: torch.Generator, gain_std: float = 0.05, offset_std: float = 0.0,
            noise_std: float = 0.0, band_std: torch.Tensor | None = None, crop_scale: float = 1.0) -> torch.Tensor:
    """Apply a random symmetry of the square and a random per-band gain to each tile ``(N, B, H, W)``; float32 out.

    The symmetry is a random transpose followed by random horizontal and vertical flips: the 8 equally likely
    outcomes are exactly the 4 rotations by multiples of 90 degrees, each with or without a mirror. The band
    noise is a gain ``1 + N(0, gain_std)`` per tile and band, mimicking radiometric differences between scenes.
    Optional, each off at 0 (or ``crop_scale`` 1): a per-tile, per-band offset ``N(0, offset_std)`` and per-pixel
    noise ``N(0, noise_std)``, both in units of the band's standard deviation ``band_std`` (``(1, B, 1, 1)``;
    haze and atmospheric residue shift a band's level, the sensor adds noise), and a random square crop of
    ``crop_scale`` to 1 of the side, resized back (one crop per batch: objects appear at other scales).

    The few draws come from ``generator``, a CPU generator, so a run repeats on any device and a checkpoint needs
    only CPU generator states; per-pixel noise draws from a device generator seeded from it. The pixel work runs
    on ``x``'s device with ``torch.where`` (no data-dependent indexing, so no host synchronisation on a GPU).
    Square tiles are assumed.
    """
    n, bands, size = x.shape[0], x.shape[1], x.shape[-1]
    flips = torch.rand(n, 3, generator=generator) < 0.5
    gain = (1.0 + gain_std * torch.randn(n, bands, 1, 1, generator=generator)).clamp(min=0.0)
    flips, gain = flips.to(x.device, non_blocking=True), gain.to(x.device, non_blocking=True)
    x = x.float()
    x = torch.where(flips[:, 0].view(-1, 1, 1, 1), x.transpose(-1, -2), x)
    x = torch.where(flips[:, 1].view(-1, 1, 1, 1), x.flip(-1), x)
    x = torch.where(flips[:, 2].view(-1, 1, 1, 1), x.flip(-2), x)
    x = x * gain
    if (offset_std > 0 or noise_std > 0) and band_std is None:
        raise ValueError("augment: offset_std and noise_std need band_std")
    if offset_std > 0:
        offset = offset_std * torch.randn(n, bands, 1, 1, generator=generator)
        x = x + offset.to(x.device, non_blocking=True) * band_std
    if noise_std > 0:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        device_gen = torch.Generator(device=x.device).manual_seed(seed)
        x = x + noise_std * band_std * torch.randn(x.shape, generator=device_gen, device=x.device)
    if crop_scale < 1.0:
        side = int(torch.randint(max(1, round(crop_scale * size)), size + 1, (1,), generator=generator))
        top, left = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=generator))
        if side < size:
            x = F.interpolate(x[..., top:top + side, left:left + side], size=(size, size), mode="bilinear",
                              align_corners=False)
    return x.clamp(min=0.0) if offset_std > 0 or noise_std > 0 else x
