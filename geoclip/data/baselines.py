"""Simple baselines: how far per-band means alone get (the model's accuracy in context), and how far a linear
classifier on tile statistics tells real tiles from synthetic ones (the generator's realism gap)."""

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


def tile_features(x: np.ndarray, texture: bool = True) -> np.ndarray:
    """Per-tile features ``(N, F)``: per-band mean and std of log digital numbers; with ``texture`` also per-band
    spatial-frequency content (mean absolute difference of neighbouring pixels, over the band's std) and the
    correlations between bands over pixels (the band covariance structure, whatever the brightness)."""
    x = np.log1p(np.asarray(x, dtype=np.float64))
    n, b = x.shape[:2]
    flat = x.reshape(n, b, -1)
    mean, std = flat.mean(-1), flat.std(-1) + 1e-9
    parts = [mean, std]
    if texture:
        grad = (np.abs(np.diff(x, axis=-1)).mean((-2, -1)) + np.abs(np.diff(x, axis=-2)).mean((-2, -1))) / 2
        z = (flat - mean[..., None]) / std[..., None]
        corr = np.einsum("npk,nqk->npq", z, z) / flat.shape[-1]
        upper = np.triu_indices(b, k=1)
        parts += [grad / std, corr[:, upper[0], upper[1]]]
    return np.concatenate(parts, axis=1)


def linear_discriminant_accuracy(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray,
                                 test_y: np.ndarray, shrinkage: float = 0.1) -> float:
    """Top-1 accuracy of linear discriminant analysis (class means, one shrunk pooled covariance) on features."""
    mu, sd = train_f.mean(0), train_f.std(0) + 1e-9
    train_f, test_f = (train_f - mu) / sd, (test_f - mu) / sd
    classes = np.unique(train_y)
    means = np.stack([train_f[train_y == c].mean(0) for c in classes])
    centred = train_f - means[np.searchsorted(classes, train_y)]
    cov = np.cov(centred, rowvar=False)
    cov = (1 - shrinkage) * cov + shrinkage * np.eye(len(cov))  # few tiles, many features: keep it invertible
    w = np.linalg.solve(cov, means.T)
    scores = test_f @ w - 0.5 * np.sum(means.T * w, axis=0)
    return float((classes[scores.argmax(1)] == test_y).mean())


def realism_gap(real: np.ndarray, synthetic: np.ndarray, texture: bool, folds: int = 5, seed: int = 0
                ) -> tuple[float, float]:
    """How well a linear classifier tells real tiles from synthetic ones (``folds``-fold CV, as many synthetic
    tiles drawn as there are real ones): mean and std of its accuracy. 50% = indistinguishable."""
    rng = np.random.default_rng(seed)
    synthetic = np.asarray(synthetic)[np.sort(rng.permutation(len(synthetic))[:len(real)])]
    f = np.concatenate([tile_features(real, texture), tile_features(synthetic, texture)])
    y = np.r_[np.ones(len(real), int), np.zeros(len(synthetic), int)]
    fold = np.empty(len(y), int)
    for label in (0, 1):
        idx = np.flatnonzero(y == label)
        fold[idx[rng.permutation(len(idx))]] = np.arange(len(idx)) % folds
    acc = [linear_discriminant_accuracy(f[fold != k], y[fold != k], f[fold == k], y[fold == k])
           for k in range(folds)]
    return float(np.mean(acc)), float(np.std(acc))
