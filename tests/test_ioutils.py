"""Tests for geoclip.ioutils: atomic writes never leave half-written or lost files."""

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time

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


def test_crash_between_the_two_renames_is_undone_by_the_next_run(tmp_path):
    """The state a kill between ``target -> .target.old`` and ``tmp -> target`` leaves: no target, a backup."""
    target = tmp_path / "raw"
    old = tmp_path / ".raw.old"
    old.mkdir()
    (old / "labels.csv").write_text("previous")
    stale = tmp_path / ".raw.k3j9x0ab.tmp"  # the crashed run's complete-but-unswapped temp folder
    stale.mkdir()
    (stale / "labels.csv").write_text("never swapped in")
    with pytest.raises(ValueError):
        with atomic_dir(target):
            raise ValueError("this run fails too")
    assert (target / "labels.csv").read_text() == "previous"  # restored, although this run failed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # backup and stale temp folder gone


def test_crash_after_the_swap_leaves_only_the_new_folder(tmp_path):
    target = tmp_path / "raw"
    target.mkdir()
    (target / "a").write_text("new")
    (tmp_path / ".raw.old").mkdir()  # killed before the backup was removed
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"] and (target / "b").exists()


def test_stale_temp_folder_of_a_killed_process_is_removed(tmp_path):
    script = ("import os, signal, sys\nfrom geoclip.ioutils import atomic_dir\n"
              "with atomic_dir(sys.argv[1]) as tmp:\n"
              "    (tmp / 'half').write_text('x')\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "packs")])
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the kill left its temp folder
    with atomic_dir(tmp_path / "packs") as tmp:
        (tmp / "whole").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packs"]


def test_a_live_writer_is_waited_for_not_swept(tmp_path):
    """A second writer of the same folder waits; it never removes the first one's temp folder as stale."""
    target, inside, release, order = tmp_path / "packs", threading.Event(), threading.Event(), []

    def first() -> None:
        with atomic_dir(target) as tmp:
            (tmp / "first").write_text("1")
            inside.set()
            release.wait(10)
            order.append(("first sees its temp", tmp.is_dir()))

    def second() -> None:
        with atomic_dir(target) as tmp:
            order.append(("second", None))
            (tmp / "second").write_text("2")

    a = threading.Thread(target=first)
    a.start()
    assert inside.wait(10)
    b = threading.Thread(target=second)
    b.start()
    time.sleep(0.5)
    release.set()
    a.join(10)
    b.join(10)
    assert order == [("first sees its temp", True), ("second", None)]
    assert sorted(p.name for p in target.iterdir()) == ["second"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packs"]


def test_umask_is_read_not_set_and_files_get_it(tmp_path, monkeypatch):
    """Setting the umask is process-wide: a thread doing it races every other thread's file creation."""
    previous = os.umask(0o027)
    try:
        calls = []
        monkeypatch.setattr(os, "umask", lambda *a: calls.append(a) or 0o027)

        def work() -> None:
            write_json(tmp_path / "m.json", {"a": 1})
            with atomic_dir(tmp_path / "d") as tmp:
                (tmp / "x").write_text("x")

        worker = threading.Thread(target=work)
        worker.start()
        worker.join(30)
        assert calls == []
        assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o640
        assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750
    finally:
        monkeypatch.undo()
        os.umask(previous)
