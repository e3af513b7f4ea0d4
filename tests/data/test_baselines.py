"""Tests for geoclip.data.baselines: the colour-only nearest-centroid baseline, LDA and the realism gap."""

from __future__ import annotations

import numpy as np
import pytest

from geoclip.data.baselines import band_means, nearest_centroid_accuracy


def tiles(rng: np.random.Generator, centres: np.ndarray, labels: np.ndarray, spread: float) -> np.ndarray:
    """Tiles (N, 3, 8, 8) whose band means sit around ``centres[label]`` with ``spread``."""
    means = centres[labels] + rng.normal(0, spread, (len(labels), centres.shape[1]))
    return (means[:, :, None, None] + rng.normal(0, 5, (len(labels), centres.shape[1], 8, 8))).astype(np.uint16)


def test_separable_colours_are_solved_and_overlapping_ones_are_not():
    rng = np.random.default_rng(0)
    centres = np.array([[1000, 3000, 500], [1500, 2000, 900], [900, 900, 900.0]])
    y = np.repeat(np.arange(3), 20)
    assert nearest_centroid_accuracy(tiles(rng, centres, y, 10), y, tiles(rng, centres, y, 10), y) == 1.0
    acc = nearest_centroid_accuracy(tiles(rng, centres, y, 800), y, tiles(rng, centres, y, 800), y)
    assert 1 / 3 < acc < 1.0


def test_standardises_bands_so_a_bright_band_does_not_dominate():
    rng = np.random.default_rng(1)
    # class differs only in a dim band; a bright band carries large irrelevant noise
    y = np.repeat([0, 1], 30)
    x = np.zeros((60, 2, 4, 4), np.float32)
    x[:, 0] = rng.normal(10000, 300, (60, 1, 1))
    x[:, 1] = (100 + 20 * y + rng.normal(0, 2, 60))[:, None, None]
    assert nearest_centroid_accuracy(x[::2], y[::2], x[1::2], y[1::2]) > 0.95


def test_band_means_reads_memmaps_in_chunks(tmp_path):
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint16, shape=(5, 13, 4, 4))
    x[:] = np.arange(5 * 13).reshape(5, 13, 1, 1)
    assert np.array_equal(band_means(x, chunk=2), np.arange(65.0).reshape(5, 13))


def test_bad_inputs_raise():
    x = np.ones((4, 13, 4, 4))
    with pytest.raises(ValueError, match="one label per tile"):
        nearest_centroid_accuracy(x, [0, 1], x, [0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"\(N, bands, H, W\)"):
        band_means(np.ones((4, 13)))


def test_linear_discriminant_separates_separable_classes_and_not_noise():
    from geoclip.data.baselines import linear_discriminant_accuracy

    rng = np.random.default_rng(0)
    f = rng.standard_normal((200, 5))
    y = np.arange(200) % 2
    shifted = f + 4.0 * y[:, None]
    assert linear_discriminant_accuracy(shifted[:100], y[:100], shifted[100:], y[100:]) == 1.0
    assert 0.3 <= linear_discriminant_accuracy(f[:100], y[:100], f[100:], y[100:]) <= 0.7


def test_realism_gap_is_chance_for_one_distribution_and_full_for_another():
    """Tiles drawn alike cannot be told apart (about 50%); a 1.5x brighter set, or a smoother one, can (100%)."""
    from scipy import ndimage

    from geoclip.data.baselines import realism_gap

    rng = np.random.default_rng(1)
    real, synthetic = rng.integers(500, 3000, (80, 4, 16, 16)), rng.integers(500, 3000, (300, 4, 16, 16))
    for texture in (False, True):
        mean, sd = realism_gap(real, synthetic, texture)
        assert 0.25 <= mean <= 0.75 and sd >= 0
        assert realism_gap(real, (synthetic * 1.5).astype(int), texture)[0] == 1.0
    smooth = ndimage.gaussian_filter(synthetic.astype(float), (0, 0, 1.5, 1.5))  # same levels, less detail
    assert realism_gap(real, smooth, texture=True)[0] >= 0.95
