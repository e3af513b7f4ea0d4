"""Tests for augmentation: seeded, only symmetries of the square plus a per-band gain, all 8 symmetries drawn."""

from __future__ import annotations

import torch

from geoclip.model.augment import augment


def _symmetries(tile: torch.Tensor) -> list[torch.Tensor]:
    """The 8 symmetries of a square tile ``(B, H, W)``: 4 rotations, each with and without a mirror."""
    turns = [torch.rot90(tile, k, dims=(-2, -1)) for k in range(4)]
    return turns + [t.flip(-1) for t in turns]


def test_augment_is_seeded_and_only_moves_pixels_without_gain():
    x = torch.randint(0, 10000, (8, 13, 16, 16), dtype=torch.int32).to(torch.uint16)
    a = augment(x, torch.Generator().manual_seed(5), gain_std=0.05)
    b = augment(x, torch.Generator().manual_seed(5), gain_std=0.05)
    assert torch.equal(a, b) and a.shape == x.shape and a.dtype == torch.float32
    plain = augment(x, torch.Generator().manual_seed(5), gain_std=0.0)
    # Flips and 90-degree turns permute each band's pixels: the sorted values do not change.
    assert torch.equal(plain.flatten(2).sort(-1).values, x.float().flatten(2).sort(-1).values)


def test_each_tile_gets_one_symmetry_for_all_bands_and_all_eight_occur():
    x = torch.randint(0, 10000, (64, 3, 8, 8)).float()
    out = augment(x, torch.Generator().manual_seed(0), gain_std=0.0)
    seen = set()
    for tile, result in zip(x, out):
        matches = [k for k, s in enumerate(_symmetries(tile)) if torch.equal(s, result)]
        assert len(matches) == 1  # one symmetry moved every band of the tile alike
        seen.add(matches[0])
    assert seen == set(range(8))


def test_band_noise_is_one_gain_per_tile_and_band():
    x = torch.randint(100, 10000, (16, 13, 8, 8)).float()
    gen_state = torch.Generator().manual_seed(1).get_state()
    moved = augment(x, torch.Generator().manual_seed(1), gain_std=0.0)
    noisy = augment(x, torch.Generator().set_state(gen_state), gain_std=0.1)  # same draws, now with gain
    ratio = noisy / moved
    per_band = ratio.flatten(2)
    assert torch.allclose(per_band, per_band[..., :1].expand_as(per_band), rtol=1e-5)  # constant within a band
    gains = per_band[..., 0]
    assert 0.0 < gains.std() < 0.2 and (gains - 1).abs().mean() < 0.2
    assert not torch.allclose(gains[:, 0], gains[:, 1])  # bands get their own gains


def test_augment_runs_where_the_tiles_are():
    x = torch.zeros(2, 13, 8, 8, device="meta")  # shape/device propagation without a GPU
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.device.type == "meta" and out.shape == x.shape


def test_offset_is_one_shift_per_tile_and_band_in_band_std_units():
    x = torch.full((32, 3, 8, 8), 5000.0)
    band_std = torch.tensor([100.0, 1000.0, 10.0]).view(1, -1, 1, 1)
    out = augment(x, torch.Generator().manual_seed(2), gain_std=0.0, offset_std=0.5, band_std=band_std)
    shift = (out - x).flatten(2)
    assert torch.allclose(shift, shift[..., :1].expand_as(shift))  # constant within a tile's band
    per_band_std = shift[..., 0].std(dim=0)
    assert torch.allclose(per_band_std / band_std.flatten(), torch.full((3,), 0.5), rtol=0.35)


def test_pixel_noise_varies_within_a_band_and_is_seeded():
    x = torch.full((4, 2, 16, 16), 3000.0)
    band_std = torch.tensor([200.0, 20.0]).view(1, -1, 1, 1)
    a = augment(x, torch.Generator().manual_seed(4), gain_std=0.0, noise_std=0.1, band_std=band_std)
    b = augment(x, torch.Generator().manual_seed(4), gain_std=0.0, noise_std=0.1, band_std=band_std)
    assert torch.equal(a, b)
    spread = (a - x).std(dim=(0, 2, 3))
    assert torch.allclose(spread, torch.tensor([20.0, 2.0]), rtol=0.2)


def test_random_crops_zoom_in_and_keep_the_shape():
    ramp = torch.arange(32.0).view(1, 1, 1, 32).expand(4, 1, 32, 32).contiguous()
    out = augment(ramp, torch.Generator().manual_seed(0), gain_std=0.0, crop_scale=0.5)
    assert out.shape == ramp.shape
    same = augment(ramp, torch.Generator().manual_seed(0), gain_std=0.0, crop_scale=1.0)
    assert not torch.equal(out, same)  # a crop (seed 0 draws one smaller than the tile) changes what is seen
    assert out.max() - out.min() < 32  # a zoomed-in view spans less of the ramp


def test_offset_and_noise_without_band_std_are_refused():
    import pytest

    with pytest.raises(ValueError, match="band_std"):
        augment(torch.zeros(1, 2, 4, 4), torch.Generator(), offset_std=0.1)
