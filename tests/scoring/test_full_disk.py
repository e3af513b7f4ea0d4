"""Scoring onto a volume that fills up: one line, nothing half-written, nothing in the ledger, and the run after
space is freed completes as if nothing had happened (a real tmpfs: the ``small_volume`` fixture)."""

import json

import pytest
from factories import make_model_dir, write_scene

from geoclip.cli import main as cli_main
from geoclip.config import params_from_dict
from geoclip.diskspace import NoSpaceError
from geoclip.scoring.exactly_once import score_scene_once
from geoclip.scoring.ledger import Ledger
from geoclip.scoring.score import scene_output_bytes

PARAMS = params_from_dict({"score": {"probabilities": True, "batch_size": 64}})


def _score(model, scene, out):
    return score_scene_once(PARAMS, lambda: model, str(scene), str(out), "models:/geoclip/1")


def test_a_volume_that_fills_mid_scene_is_one_line_and_the_rerun_completes(tmp_path, small_volume, pyfunc_model):
    scene = tmp_path / "scenes" / "T32.tif"
    write_scene(scene, h=512, w=512)
    reference = _score(pyfunc_model, scene, tmp_path / "reference")  # the same scene on a disk with room
    _, least = scene_output_bytes(512, 512, 10, 64, 32, True, False, 0)
    out = small_volume.path / "scores"
    small_volume.leave(least + 100_000)  # passes the early check, cannot hold the outputs (about 0.8 MB)

    with pytest.raises(NoSpaceError) as info:
        _score(pyfunc_model, scene, out)

    line = str(info.value)
    assert "\n" not in line and line.startswith(f"no space left on {small_volume.path} while writing the outputs "
                                                f"of {scene}")
    assert f"({out})" in line and ".staging" not in line  # the folder the user chose, not the hidden staging one
    assert Ledger(str(out)).records() == []  # the ledger records nothing
    assert sorted(p.name for p in out.iterdir()) == ["_manifest"]  # no output, no staging folder
    assert not [p for p in (out / "_manifest").rglob("*") if p.is_file() and p.name != ".lock"]  # claim released

    small_volume.free_up()
    again = _score(pyfunc_model, scene, out)
    assert again["status"] == "scored"
    assert (out / "T32_classmap.tif").read_bytes() == (tmp_path / "reference" / "T32_classmap.tif").read_bytes()
    assert again["classes"] == reference["classes"]
    assert [r["name"] for r in Ledger(str(out)).records()] == ["T32"]


def test_a_volume_that_clearly_cannot_hold_the_outputs_is_refused_before_scoring(tmp_path, small_volume,
                                                                                 pyfunc_model):
    scene = tmp_path / "scenes" / "T32.tif"
    write_scene(scene, h=1024, w=1024)
    out = small_volume.path / "scores"
    small_volume.leave(100_000)

    with pytest.raises(NoSpaceError, match=rf"^{small_volume.path} has .* free, too little for the outputs of "
                                           rf"{scene} .*: it needs about .* MB"):
        _score(pyfunc_model, scene, out)
    assert Ledger(str(out)).records() == []
    assert sorted(p.name for p in out.iterdir()) == ["_manifest"]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_the_command_line_says_a_full_volume_in_one_line(tmp_path, small_volume, capsys, fmt):
    """`geoclip export` onto a full volume: exit 2, one `error:` line, no traceback, no half-written folder (torch's
    own TorchScript writer aborted the process on a full disk)."""
    model = make_model_dir(tmp_path / "model")
    small_volume.leave(20_000)
    out = small_volume.path / "export"
    assert cli_main(["export", "--model", str(model), "--out", str(out), "--format", fmt]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: no space left on {small_volume.path}")
    assert not out.exists() and [p.name for p in small_volume.path.iterdir()] == [".filler"]
    small_volume.free_up()
    assert cli_main(["export", "--model", str(model), "--out", str(out), "--format", fmt]) == 0
    assert json.loads((out / "export.json").read_text())
