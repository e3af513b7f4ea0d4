"""Tests for checkpoints: RNG capture/restore, the params fingerprint, atomic writes, damaged files."""

from __future__ import annotations

import dataclasses
import random
import threading

import numpy as np
import pytest
import torch
from factories import make_packs, tiny_params_dict

from geoclip.config import params_from_dict
from geoclip.errors import GeoclipError
from geoclip.training.checkpoint import (
    check_fingerprint,
    fingerprint,
    load_checkpoint,
    remove_stale_temps,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _draws(gen: torch.Generator) -> tuple:
    """One draw from every random stream a training run uses."""
    return random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, generator=gen))


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(3)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    np.random.standard_normal()  # a cached Gaussian is part of NumPy's state
    save_checkpoint(tmp_path / "c.pt", {"rng": [rng_state({"aug": gen})]})
    expected = _draws(gen)
    random.seed(99), np.random.seed(99), torch.manual_seed(99), gen.manual_seed(99)
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"][0], {"aug": gen})
    assert _draws(gen) == expected


def test_fingerprint_ignores_speed_settings_and_names_what_changed(tmp_path):
    make_packs(tmp_path / "prepared", per_class=6)
    base = params_from_dict(tiny_params_dict(tmp_path))
    same = dataclasses.replace(base, train=dataclasses.replace(base.train, num_threads=7, checkpoint_every=3,
                                                               patience=2))
    check_fingerprint(tmp_path / "checkpoint.pt", fingerprint(base, 1), fingerprint(same, 1))  # no error
    other = dataclasses.replace(base, train=dataclasses.replace(base.train, batch_size=4))
    with pytest.raises(GeoclipError, match=r"checkpoint\.pt: checkpoint was made with other settings "
                                           r"\(train\.batch_size: 32 in the checkpoint, 4 now\)"):
        check_fingerprint(tmp_path / "checkpoint.pt", fingerprint(base, 1), fingerprint(other, 1))
    with pytest.raises(GeoclipError, match="world_size: 1 in the checkpoint, 2 now"):
        check_fingerprint(tmp_path / "checkpoint.pt", fingerprint(base, 1), fingerprint(base, 2))


def test_fingerprint_changes_with_the_packs(tmp_path):
    make_packs(tmp_path / "prepared", per_class=6)
    params = params_from_dict(tiny_params_dict(tmp_path))
    before = fingerprint(params, 1)
    make_packs(tmp_path / "prepared", per_class=7)
    with pytest.raises(GeoclipError, match=r"data: \w+ in the checkpoint"):
        check_fingerprint(tmp_path / "checkpoint.pt", before, fingerprint(params, 1))


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})
    with pytest.raises(TypeError, match="pickle"):
        save_checkpoint(path, {"step": 2, "bad": threading.Lock()})  # not picklable: fails mid-write
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


def test_temp_files_of_a_killed_writer_are_removed(tmp_path):
    (tmp_path / ".checkpoint.pt.ab12.tmp").write_bytes(b"half")
    (tmp_path / "other.tmp").write_bytes(b"not ours")
    assert [p.name for p in remove_stale_temps(tmp_path / "checkpoint.pt")] == [".checkpoint.pt.ab12.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.tmp"]
    assert remove_stale_temps(tmp_path / "missing" / "checkpoint.pt") == []


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04truncated", None])
def test_damaged_or_foreign_files_are_named(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    if content is None:
        torch.save({"some": "dict"}, path)  # readable, but not ours
    else:
        path.write_bytes(content)
    with pytest.raises(GeoclipError, match=r"checkpoint\.pt: not a (readable|geoclip) checkpoint"):
        load_checkpoint(path)
