"""Training data paths: the whole split on the device when it fits, else a DataLoader over the memory-mapped pack."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from geoclip.config import Params
from geoclip.training.leave_out import held_out_words, kept_concepts, spaced

DEVICE_SHARE = 0.5  # keep tiles on the device only when they take under half its free memory


def held_out(params: Params) -> tuple[str, ...]:
    """The phrases that name ``train.holdout_class`` (none without one): :mod:`geoclip.training.leave_out`."""
    holdout = params.train.holdout_class
    return held_out_words(holdout, params.classes.descriptions.get(holdout, "")) if holdout else ()


def concept_wording(params: Params, name: str) -> str:
    """How a concept is worded in its prompts: ``classes.descriptions``, else the synthetic catalogue's words."""
    from geoclip.data.synth_concepts import CONCEPTS

    fallback = CONCEPTS[name].wording if name in CONCEPTS else spaced(name)
    return params.classes.descriptions.get(name, fallback)


def training_classes(params: Params, concepts: list[str] | tuple[str, ...] = ()) -> list[int]:
    """Indices (into ``classes.names`` followed by ``concepts``) of what training contrasts: every class but
    ``train.holdout_class``, and every concept but those whose name or wording names the held-out class."""
    names, words = params.classes.names, held_out(params)
    kept = set(kept_concepts({c: concept_wording(params, c) for c in concepts}, words))
    return ([i for i, name in enumerate(names) if name != params.train.holdout_class]
            + [len(names) + k for k, c in enumerate(concepts) if c in kept])


def kept_rows(labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """Row numbers of the tiles whose label is one of ``classes``."""
    return np.flatnonzero(np.isin(np.asarray(labels), classes))


def remap_labels(labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """Labels as positions in ``classes`` (the loss contrasts only the trained classes)."""
    lookup = np.full(max(classes) + 1 if classes else 0, -1, dtype=np.int64)
    lookup[classes] = np.arange(len(classes))
    return lookup[np.asarray(labels)]


def balanced_draw(pool: torch.Tensor, labels: np.ndarray, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` indices from ``pool`` with every class of the pool drawn equally often, in shuffled order.

    Each class cycles through fresh shuffles of its own tiles, so a rare class's tiles are each seen several
    times (augmented anew each time) and a common class's tiles are seen at most once or twice.
    """
    pool_labels = np.asarray(labels)[pool.numpy()]
    classes = np.unique(pool_labels)
    if len(classes) == 0:
        return pool[:0]
    per_class = -(-n // len(classes))
    parts = []
    for c in classes:
        members = pool[torch.from_numpy(pool_labels == c)]
        rounds = -(-per_class // len(members))
        parts.append(torch.cat([members[torch.randperm(len(members), generator=gen)] for _ in range(rounds)])[:per_class])
    drawn = torch.cat(parts)
    return drawn[torch.randperm(len(drawn), generator=gen)][:n]


def rank_batches(n: int, batch_size: int, rank: int, world: int, gen: torch.Generator,
                 labels: np.ndarray | None = None) -> list[torch.Tensor]:
    """This rank's index batches for one epoch: a shared shuffle, equal shards, ``batch_size`` global.

    With ``labels`` (``train.class_balance``) the epoch's ``n`` draws are class-balanced (:func:`balanced_draw`).
    """
    # The same draws on every rank: gen is seeded alike.
    perm = torch.randperm(n, generator=gen) if labels is None else balanced_draw(torch.arange(n), labels, n, gen)
    per_rank = n // world
    mine = perm[rank * per_rank:(rank + 1) * per_rank]
    local = max(1, batch_size // world)
    batches = [mine[i:i + local] for i in range(0, per_rank, local)]
    # A lone last sample would make a degenerate contrastive batch; the next shuffle covers it.
    return [b for b in batches if len(b) * world >= 2]


def mixed_batches(is_real: np.ndarray, share: float, batch_size: int, rank: int, world: int,
                  gen: torch.Generator, labels: np.ndarray | None = None) -> list[torch.Tensor]:
    """This rank's index batches for one epoch with ``share`` of every global batch drawn from the real tiles.

    An epoch is one pass over the other (synthetic) tiles; the real ones are drawn from successive shuffles of
    them, as many as the epoch needs (a few real tiles are seen many times, each time augmented anew). Without
    both kinds of tiles, or at share 0, this is :func:`rank_batches`. The draws are the same on every rank (``gen``
    is seeded alike); each global batch is shuffled, then split into equal shards (a short last batch loses its
    remainder: every rank must contribute as many embeddings to the gathered loss). With ``labels``
    (``train.class_balance``) the real and the other tiles are each drawn class-balanced (:func:`balanced_draw`).
    """
    real = torch.from_numpy(np.flatnonzero(is_real))
    other = torch.from_numpy(np.flatnonzero(~np.asarray(is_real, dtype=bool)))
    if share <= 0 or len(real) == 0 or len(other) == 0:
        return rank_batches(len(is_real), batch_size, rank, world, gen, labels)
    n_real = max(1, round(batch_size * share))
    n_other = max(1, batch_size - n_real)
    steps = -(-len(other) // n_other)
    if labels is None:
        other = other[torch.randperm(len(other), generator=gen)]
        rounds = -(-steps * n_real // len(real))
        real = torch.cat([real[torch.randperm(len(real), generator=gen)] for _ in range(rounds)])
    else:
        other = balanced_draw(other, labels, len(other), gen)
        real = balanced_draw(real, labels, steps * n_real, gen)
    batches = []
    for i in range(steps):
        both = torch.cat([real[i * n_real:(i + 1) * n_real], other[i * n_other:(i + 1) * n_other]])
        both = both[torch.randperm(len(both), generator=gen)]
        local = min(len(both), batch_size) // world
        mine = both[rank * local:(rank + 1) * local]
        if len(mine) * world >= 2:
            batches.append(mine)
    return batches


def widen(x: torch.Tensor) -> torch.Tensor:
    """uint16 tiles stored bit-for-bit as int16 back to their int32 values (CUDA has few uint16 kernels)."""
    return x.to(torch.int32) & 0xFFFF


def fits_on_device(nbytes: int, device: torch.device, local_world: int = 1) -> bool:
    """Whether ``nbytes`` of tiles take under DEVICE_SHARE of the device's free memory (host RAM on the CPU).

    Every rank holds the whole split (the shared shuffle reshards it each epoch); on the CPU the ranks of one
    node share the RAM, so each gets its part of it.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // max(1, local_world)
    return nbytes < DEVICE_SHARE * free


class _PackRows(Dataset):
    """Batches of rows of a memory-mapped ``(N, B, H, W)`` uint16 pack, as int16 bit-views; one item = one batch."""

    def __init__(self, path: Path, rows: np.ndarray):
        self.path, self.rows, self._images = path, rows, None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, positions: torch.Tensor) -> torch.Tensor:
        if self._images is None:  # opened lazily so each worker maps the file itself
            self._images = np.load(self.path, mmap_mode="r")
        return torch.from_numpy(self._images[self.rows[positions.numpy()]]).view(torch.int16)


class TrainTiles:
    """The training tiles, served batch by batch on ``device`` as int32 raw values.

    On the device: one int16 tensor (the uint16 bits; half the size of int32) sliced per batch. Otherwise:
    a DataLoader whose workers read the batches from the memory-mapped pack into pinned memory.
    """

    def __init__(self, pack: Path, images: np.ndarray, rows: np.ndarray, device: torch.device, seed: int,
                 on_device: bool, workers: int = 2):
        self.device, self.seed, self.workers = device, seed, workers
        self.n = len(rows)
        self.on_device = on_device
        if on_device:
            self.tiles = torch.from_numpy(np.ascontiguousarray(images[rows])).view(torch.int16).to(device)
        else:
            self.dataset = _PackRows(pack, rows)

    def batches(self, index_batches: list[torch.Tensor], epoch: int) -> Iterator[torch.Tensor]:
        """Raw tiles for each batch of positions, in order."""
        if self.on_device:
            for idx in index_batches:
                yield widen(self.tiles[idx.to(self.device, non_blocking=True)])
            return
        if not index_batches:
            return
        cuda = self.device.type == "cuda"
        # The loader draws its worker seeds from this generator, not from torch's global RNG (which a resumed
        # run restores): workers draw nothing random, but the global stream must not depend on the data path.
        loader = DataLoader(self.dataset, sampler=index_batches, batch_size=None, num_workers=self.workers,
                            pin_memory=cuda, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        for x in loader:
            yield widen(x.to(self.device, non_blocking=True))

    @property
    def nbytes(self) -> int:
        """Bytes the tiles take on the device (0 when they stay in the pack)."""
        return self.tiles.numel() * self.tiles.element_size() if self.on_device else 0


def loader_workers(local_world: int) -> int:
    """DataLoader workers per rank: the node's cores shared by its ranks, at most 4, at least 1."""
    return max(1, min(4, (os.cpu_count() or 2) // max(1, local_world) - 1))
