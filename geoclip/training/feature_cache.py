"""A frozen image encoder's features, computed once per tile and view and cached beside the packs.

With ``train.freeze_image: all`` the encoder never changes during training, so its features of every training
tile's 8 flips and rotations are computed once; training then draws one view per tile and step from the cache
and trains everything after the encoder (projection, spectral branch, class side) in minutes on a CPU. The cache
is keyed by the encoder's weights and input (a digest of its tensors, band standardisation, input size and
pooled stages); inside that, each tile by a digest of its pixels, so a changed tile is recomputed and the rest
reused.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from geoclip.ioutils import atomic_path
from geoclip.model.clip import GeoCLIP, dihedral_views

N_VIEWS = 8  # the dihedral views of a tile (geoclip.model.clip.dihedral_views)
# One file, replaced atomically: "features" (tiles, views, features) float16 and "keys" (tiles,), the tiles' pixel
# digests in the same order.
CACHE_FILE = "features.npz"
KEEP_ENCODERS = 3  # cached encoders kept; older ones are removed


def encoder_key(model: GeoCLIP) -> str:
    """Digest of what the encoder's features depend on: its tensors, the band standardisation, size and stages."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.image_encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    spec = {"encoder": model.cfg.image_encoder, "input_size": model.cfg.input_size,
            "stages": list(model.cfg.feature_stages), "views": N_VIEWS}
    digest.update(json.dumps(spec, sort_keys=True).encode())
    # Only the bands the encoder reads: a prior's zero kernels ignore the others, whose training statistics change
    # with every split (so every fold of a cross-validation shares one cache).
    read = read_bands(model)
    digest.update(model.band_mean.flatten()[read].cpu().numpy().tobytes())
    digest.update(model.band_std.flatten()[read].cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


def read_bands(model: GeoCLIP) -> list[int]:
    """Indices of the bands whose first-layer kernels are not all zero (all bands when that layer is not found)."""
    n = len(model.cfg.band_names)
    first = next((p for p in model.image_encoder.parameters() if p.ndim == 4 and p.shape[1] == n), None)
    if first is None:
        return list(range(n))
    return [i for i in range(n) if bool(first[:, i].detach().abs().sum() > 0)]


def tile_keys(images: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per tile of ``images[rows]``, a digest of its pixels (shape, dtype and bytes)."""
    keys = []
    for r in rows:
        tile = np.ascontiguousarray(images[r])
        keys.append(hashlib.sha1(f"{tile.shape}{tile.dtype}".encode() + tile.tobytes()).hexdigest())
    return np.array(keys, dtype="S40")


@torch.no_grad()
def compute_features(model: GeoCLIP, images: np.ndarray, rows: np.ndarray, batch_size: int,
                     device: torch.device) -> np.ndarray:
    """The encoder's features ``(len(rows), 8, F)`` (float16) of every view of ``images[rows]``."""
    was_training = model.training
    model.eval()
    out = []
    for start in tqdm(range(0, len(rows), batch_size), desc="frozen encoder features", unit="batch",
                      file=sys.stderr, disable=len(rows) <= batch_size):
        x = torch.from_numpy(np.asarray(images[rows[start:start + batch_size]]).astype(np.float32)).to(device)
        x = model.normalize_input(x)
        views = [model.tower_features(v).float() for v in dihedral_views(x)]
        out.append(torch.stack(views, dim=1).half().cpu().numpy())
    model.train(was_training)
    if not out:
        return np.zeros((0, N_VIEWS, 0), np.float16)
    return np.concatenate(out)


def cached_features(model: GeoCLIP, images: np.ndarray, rows: np.ndarray, cache_dir: str | Path,
                    batch_size: int, device: torch.device) -> tuple[np.ndarray, int]:
    """Features ``(len(rows), 8, F)`` of ``images[rows]`` from the cache, computing (and caching) the missing ones.

    Returns the features and how many tiles had to be computed.
    """
    folder = Path(cache_dir) / encoder_key(model)
    keys = tile_keys(images, rows)
    known: dict[bytes, int] = {}
    stored, stored_keys = np.zeros((0, N_VIEWS, 0), np.float16), np.zeros(0, "S40")
    if (folder / CACHE_FILE).exists():
        try:
            with np.load(folder / CACHE_FILE) as cache:
                stored, stored_keys = cache["features"], cache["keys"]
            known = {k: i for i, k in enumerate(stored_keys)} if len(stored_keys) == len(stored) else {}
        except (ValueError, OSError, KeyError, EOFError):  # a damaged cache is only a cache: recompute
            known, stored_keys = {}, np.zeros(0, "S40")
    todo = np.array([i for i, k in enumerate(keys) if k not in known], dtype=np.int64)
    hits = np.array([i for i, k in enumerate(keys) if k in known], dtype=np.int64)
    fresh = compute_features(model, images, rows[todo], batch_size, device)
    width = fresh.shape[-1] if len(todo) else stored.shape[-1]
    features = np.empty((len(rows), N_VIEWS, width), np.float16)
    if len(todo):
        features[todo] = fresh
    if len(hits):
        features[hits] = stored[[known[keys[i]] for i in hits]]
    if len(todo):
        # Tiles cached before and not asked for now stay (another split, a held-out class's run, another fold).
        asked = set(keys)
        others = np.array([i for i in known.values() if stored_keys[i] not in asked], dtype=np.int64)
        all_keys = np.concatenate([keys, stored_keys[others]]) if len(others) else keys
        all_features = np.concatenate([features, stored[others]]) if len(others) else features
        try:
            with atomic_path(folder / CACHE_FILE) as tmp, open(tmp, "wb") as f:
                np.savez(f, features=all_features, keys=all_keys)
            _prune(Path(cache_dir), keep=folder)
        except OSError as exc:  # only a cache: training goes on with the features in memory (nothing half-written)
            print(f"note: {folder / CACHE_FILE}: not written ({exc.strerror or exc}); the next run computes the "
                  "frozen encoder's features again", file=sys.stderr)
    return features, len(todo)


def _prune(cache_dir: Path, keep: Path) -> None:
    """Remove all but the :data:`KEEP_ENCODERS` most recently written encoder folders (``keep`` always stays)."""
    folders = sorted((p for p in cache_dir.iterdir() if p.is_dir() and (p / CACHE_FILE).exists()),
                     key=lambda p: (p / CACHE_FILE).stat().st_mtime, reverse=True)
    for old in [p for p in folders if p != keep][KEEP_ENCODERS - 1:]:
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
