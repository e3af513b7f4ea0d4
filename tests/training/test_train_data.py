"""Tests for the training data paths: holdout rows, label remapping, shards, device tiles vs the pack loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import make_packs, tiny_params_dict

from geoclip.config import params_from_dict
from geoclip.training.train_data import (
    TrainTiles,
    balanced_draw,
    fits_on_device,
    kept_rows,
    mixed_batches,
    rank_batches,
    remap_labels,
    training_classes,
    widen,
)


def test_training_classes_leave_out_the_holdout_class(tmp_path):
    params = params_from_dict(tiny_params_dict(tmp_path, holdout_class="Industrial"))
    assert training_classes(params) == [0, 2]
    assert training_classes(params_from_dict(tiny_params_dict(tmp_path))) == [0, 1, 2]
    labels = np.array([2, 1, 0, 2, 1])
    rows = kept_rows(labels, [0, 2])
    assert rows.tolist() == [0, 2, 3]
    assert remap_labels(labels[rows], [0, 2]).tolist() == [1, 0, 1]


def test_rank_shards_are_disjoint_and_the_global_batch_is_kept():
    shards = [rank_batches(20, 8, r, 2, torch.Generator().manual_seed(0)) for r in range(2)]
    assert [len(b) for b in shards[0]] == [4, 4, 2] == [len(b) for b in shards[1]]
    seen = [set(torch.cat(s).tolist()) for s in shards]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(20))


def test_widen_restores_uint16_values_stored_as_int16():
    raw = np.array([0, 1, 32767, 32768, 40000, 65535], dtype=np.uint16)
    assert widen(torch.from_numpy(raw).view(torch.int16)).tolist() == raw.tolist()


def test_fits_on_device_keeps_to_half_the_free_memory():
    cpu = torch.device("cpu")
    assert fits_on_device(1 << 20, cpu)
    assert not fits_on_device(1 << 60, cpu)


@pytest.mark.parametrize("workers", [0, 1])
def test_pack_loader_serves_the_same_batches_as_device_tiles(tmp_path, workers):
    prepared = make_packs(tmp_path / "prepared", per_class=8)
    pack = prepared / "train_images.npy"
    raw = np.load(pack)
    raw[:, :, 0, 0] = 50000  # values above int16's range must come back intact
    np.save(pack, raw)
    images = np.load(pack, mmap_mode="r")  # memory-mapped, as load_split gives it
    rows = np.array([0, 2, 3, 5, 7, 8, 11])
    batches = rank_batches(len(rows), 3, 0, 1, torch.Generator().manual_seed(1))
    on_dev = TrainTiles(pack, images, rows, torch.device("cpu"), 0, on_device=True)
    loader = TrainTiles(pack, images, rows, torch.device("cpu"), 0, on_device=False, workers=workers)
    a, b = list(on_dev.batches(batches, 1)), list(loader.batches(batches, 1))
    assert len(a) == len(b) == len(batches)
    for idx, x, y in zip(batches, a, b):
        assert x.dtype == torch.int32 and torch.equal(x, y)
        assert torch.equal(x, torch.from_numpy(raw[rows[idx.numpy()]].astype(np.int32)))
    assert on_dev.nbytes == len(rows) * raw[0].nbytes and loader.nbytes == 0


def test_mixed_batches_give_every_batch_its_real_share_and_each_synthetic_tile_once():
    is_real = np.array([True] * 6 + [False] * 40)
    shards = [mixed_batches(is_real, 0.25, 16, r, 2, torch.Generator().manual_seed(3)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 4  # 40 synthetic tiles, 12 a batch
    synthetic = [i for s in shards for b in s for i in b.tolist() if i >= 6]
    assert sorted(synthetic) == list(range(6, 46))  # each synthetic tile exactly once an epoch
    for step in range(3):  # full batches: 4 real of 16, whatever rank holds them
        both = torch.cat([shards[0][step], shards[1][step]]).tolist()
        assert len(both) == 16 and sum(i < 6 for i in both) == 4
    real = [i for s in shards for b in s for i in b.tolist() if i < 6]
    counts = [real.count(i) for i in range(6)]
    assert set(real) == set(range(6)) and max(counts) - min(counts) <= 1  # successive shuffles: drawn evenly
    again = mixed_batches(is_real, 0.25, 16, 0, 2, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(again, shards[0]))  # seeded: a resume replays the epoch


def test_mixed_batches_without_both_kinds_or_share_are_the_plain_shuffle():
    for is_real, share in ((np.zeros(20, bool), 0.5), (np.ones(20, bool), 0.5), (np.arange(20) < 5, 0.0)):
        plain = rank_batches(20, 8, 0, 1, torch.Generator().manual_seed(0))
        mixed = mixed_batches(is_real, share, 8, 0, 1, torch.Generator().manual_seed(0))
        assert all(torch.equal(a, b) for a, b in zip(plain, mixed)) and len(plain) == len(mixed)


def test_mixed_batches_shard_a_short_last_batch_equally_over_ranks():
    """Every rank must add as many embeddings to the gathered loss: an odd last batch loses its remainder."""
    is_real = np.arange(20) < 3  # 3 real, 17 synthetic; batch 8 at share 0.25 = 2 real + 6 synthetic
    shards = [mixed_batches(is_real, 0.25, 8, r, 2, torch.Generator().manual_seed(0)) for r in range(2)]
    assert [len(b) for b in shards[0]] == [len(b) for b in shards[1]] == [4, 4, 3]
    for a, b in zip(*shards):
        assert not set(a.tolist()) & set(b.tolist())


def test_class_balance_draws_a_rare_class_as_often_as_a_common_one():
    labels = np.array([0] * 90 + [1] * 10)  # 9:1 imbalance
    plain = torch.cat(rank_batches(100, 20, 0, 1, torch.Generator().manual_seed(0))).numpy()
    balanced = torch.cat(rank_batches(100, 20, 0, 1, torch.Generator().manual_seed(0), labels)).numpy()
    assert np.bincount(labels[plain]).tolist() == [90, 10]
    assert np.bincount(labels[balanced]).tolist() == [50, 50] and len(balanced) == 100
    assert sorted(set(balanced[labels[balanced] == 1].tolist())) == list(range(90, 100))  # each rare tile, 5 times
    again = torch.cat(rank_batches(100, 20, 0, 1, torch.Generator().manual_seed(0), labels)).numpy()
    assert np.array_equal(again, balanced)  # seeded: a resume replays the epoch


def test_class_balance_with_a_real_share_balances_real_and_synthetic_tiles_apart():
    labels = np.array([0] * 8 + [1] * 2 + [0] * 20 + [1] * 20)  # real: 8 + 2; synthetic: 20 + 20
    is_real = np.arange(50) < 10
    batches = mixed_batches(is_real, 0.5, 8, 0, 1, torch.Generator().manual_seed(1), labels)
    drawn = torch.cat(batches).numpy()
    real, synthetic = drawn[is_real[drawn]], drawn[~is_real[drawn]]
    assert len(batches) == 10 and all(is_real[b.numpy()].sum() == 4 for b in batches)  # the share is kept
    assert np.bincount(labels[real]).tolist() == [20, 20]  # 2 rare real tiles drawn as often as 8 common ones
    assert np.bincount(labels[synthetic]).tolist() == [20, 20] and sorted(synthetic.tolist()) == list(range(10, 50))


def test_balanced_draw_of_an_empty_pool_is_empty():
    assert len(balanced_draw(torch.arange(0), np.zeros(0, int), 0, torch.Generator())) == 0
