"""Colour-only baselines: how far per-band means alone get, to set the model's accuracy in context."""

from __future__ import annotations

import numpy as np


def band_means(x: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Per-tile, per-band mean of ``x`` (N, bands, H, W) as float64 ``(N, bands)``; reads in chunks (memmaps)."""
    x = np.asarray(x)  # a memmap stays on disk: only each chunk is read
    if x.ndim != 4:
        raise ValueError(f"expected tiles shaped (N, bands, H, W), got {x.shape}")
    return np.concatenate([x[i:i + chunk].mean(axis=(2, 3), dtype=np.float64) for i in range(0, len(x), chunk)]
                          or [np.zeros((0, x.shape[1]))])


def nearest_centroid_accuracy(train_x: np.ndarray, train_y: np.ndarray,
                              test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Top-1 accuracy of a nearest-centroid classifier on standardised per-band tile means (colour only)."""
    ftr, fte = band_means(train_x), band_means(test_x)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if len(ftr) == 0 or len(fte) == 0 or len(ftr) != len(train_y) or len(fte) != len(test_y):
        raise ValueError(f"need non-empty train/test sets with one label per tile; got {len(ftr)}/{len(train_y)} "
                         f"train and {len(fte)}/{len(test_y)} test")
    # Standardise with train statistics so bright NIR bands do not drown the visible and SWIR ones.
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-9
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    classes = np.unique(train_y)
    centroids = np.stack([ftr[train_y == c].mean(0) for c in classes])
    dist = ((fte[:, None, :] - centroids[None]) ** 2).sum(-1)
    return float((classes[dist.argmin(1)] == test_y).mean())
