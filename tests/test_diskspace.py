"""Tests for geoclip.diskspace: a full volume is one line naming the volume, the file and the size, nothing left."""

import errno

import numpy as np
import pytest
import torch

from geoclip.diskspace import NoSpaceError, human, is_no_space, writing
from geoclip.errors import GeoclipError
from geoclip.ioutils import atomic_dir, atomic_path


def test_full_volume_under_atomic_path_is_one_line_and_leaves_nothing(small_volume):
    target = small_volume.path / "models" / "weights.pt"
    target.parent.mkdir()
    target.write_bytes(b"the user's previous weights")
    small_volume.leave(200_000)
    with pytest.raises(NoSpaceError) as info, \
            atomic_path(target, "the model weights", need=2_000_000) as tmp, open(tmp, "wb") as f:
        torch.save({"w": torch.zeros(500_000)}, f)
    line = str(info.value)
    assert "\n" not in line
    assert f"no space left on {small_volume.path}" in line
    assert "the model weights" in line and str(target) in line and "needs about 2.0 MB" in line
    assert target.read_bytes() == b"the user's previous weights"  # nothing the user had is lost
    assert sorted(p.name for p in target.parent.iterdir()) == ["weights.pt"]  # no temporary left


def test_full_volume_under_atomic_dir_says_what_was_written(small_volume):
    target = small_volume.path / "prepared"
    small_volume.leave(300_000)
    with pytest.raises(NoSpaceError, match=r"while writing prepared .*needs more than the .* written when it filled"), \
            atomic_dir(target) as tmp:
        for k in range(10):
            np.save(tmp / f"part{k}.npy", np.ones(100_000))
    assert not target.exists()
    assert [p.name for p in small_volume.path.iterdir()] == [".filler"]  # temp folder and lock gone
    small_volume.free_up()
    with atomic_dir(target) as tmp:  # once space is freed the same write completes
        np.save(tmp / "part0.npy", np.ones(100_000))
    assert (target / "part0.npy").is_file()


def test_other_errors_pass_unchanged(tmp_path):
    with pytest.raises(GeoclipError, match="bad input"), writing(tmp_path, "x"):
        raise GeoclipError("bad input")
    with pytest.raises(OSError) as info, writing(tmp_path, "x"):
        raise OSError(errno.EACCES, "Permission denied")
    assert not isinstance(info.value, NoSpaceError)
    # write failures in words count as a full volume only when the volume is (nearly) full: not here
    assert not is_no_space(RuntimeError("file write failed"), tmp_path)


def test_quota_and_chained_errors_are_recognised(tmp_path):
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as inner:
            raise OSError("could not write the PNG") from inner  # Pillow chains its own error
    except OSError as exc:
        assert is_no_space(exc)
    with pytest.raises(NoSpaceError, match="disk quota is used up"), writing(tmp_path, "x"):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")


def test_human_sizes():
    assert [human(n) for n in (512, 1500, 2_500_000, 3e9)] == ["512 B", "1.5 kB", "2.5 MB", "3.0 GB"]


def test_the_command_line_backstop_says_a_full_volume_a_writer_outside_geoclip_met(tmp_path, monkeypatch, capsys):
    """An errno-28 OSError no geoclip writer wrapped (e.g. inside MLflow) still ends as one line, exit 2."""
    from geoclip import cli

    def full(args):
        raise OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp_path / "artifacts" / "model.pt"))

    monkeypatch.setattr(cli, "cmd_priors", full)  # the real parser and main(); only the command's work replaced
    assert cli.main(["priors"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: your disk quota is used up on ")
    assert "while writing model.pt (" in err
