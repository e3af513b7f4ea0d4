"""Tests for geoclip.ioutils: atomic writes never leave half-written or lost files."""

import json
import stat

import pytest

from geoclip.ioutils import atomic_dir, atomic_path, write_json


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temporary left behind
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) & 0o044  # readable by others, unlike mkstemp's 0600


def test_atomic_dir_swaps_whole_folder(tmp_path):
    target = tmp_path / "packs"
    target.mkdir()
    (target / "a.npy").write_text("old")
    with pytest.raises(ValueError):
        with atomic_dir(target) as tmp:
            (tmp / "b.npy").write_text("partial")
            raise ValueError("bad tile")
    assert sorted(p.name for p in target.iterdir()) == ["a.npy"]
    with atomic_dir(target) as tmp:
        (tmp / "b.npy").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b.npy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packs"]


def test_write_json_is_sorted_and_parseable(tmp_path):
    write_json(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text) == {"a": [1, 2], "b": 1} and text.index('"a"') < text.index('"b"')
