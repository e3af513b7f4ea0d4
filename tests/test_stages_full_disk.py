"""Every stage that writes, on a volume that fills up (a real tmpfs: the ``small_volume`` fixture): one line naming
the volume, what was being written and about how much, nothing half-written, and the run after space is freed
completes as if nothing had happened. Scoring and export: tests/scoring/test_full_disk.py."""

import dataclasses
import json

import numpy as np
import pytest
from factories import make_model_dir, make_packs, make_tile, synthetic_tiles, tiny_params_dict

from geoclip import stages
from geoclip.cli import main as cli_main
from geoclip.config import params_from_dict
from geoclip.diskspace import NoSpaceError


def _one_line(exc: BaseException, volume) -> str:
    line = str(exc)
    assert "\n" not in line and str(volume.path) in line
    return line


def test_ingest_onto_a_full_volume(tmp_path, small_volume, capsys):
    raw = small_volume.path / "raw"
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"paths": {"raw": str(raw), "synthetic": str(tmp_path / "synthetic")},
                                  "classes": {"names": ["Forest", "River"]},
                                  "synth": {"tiles_per_class": 20, "n_scenes": 0}}))
    small_volume.leave(200_000)  # 40 tiles of 13 x 64 x 64 uint16 need about 4.3 MB
    assert cli_main(["ingest", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]  # the rest is the progress bar
    assert len(errors) == 1 and errors[0].startswith(f"error: no space left on {small_volume.path} while writing raw")
    assert "Traceback" not in err
    assert sorted(p.name for p in small_volume.path.iterdir()) == [".filler"]  # no staging folder, no lock
    small_volume.free_up()
    small_volume.leave(7_000_000)
    assert cli_main(["ingest", "--params", str(params)]) == 0
    assert len(list((raw / "tiles").rglob("*.tif"))) == 40


def test_prepare_refuses_a_volume_too_small_for_its_packs_before_writing(tiny_dataset, small_volume):
    params = dataclasses.replace(tiny_dataset, paths=dataclasses.replace(
        tiny_dataset.paths, prepared=str(small_volume.path / "prepared"), reports=str(small_volume.path / "reports")))
    stages.validate(tiny_dataset)  # prepare reads the validation report of the raw data
    params = dataclasses.replace(params, paths=dataclasses.replace(params.paths, reports=tiny_dataset.paths.reports))
    small_volume.leave(500_000)  # 18 tiles x 13 x 64 x 64 x 2 bytes = 1.9 MB of packs
    with pytest.raises(NoSpaceError) as info:
        stages.prepare(params)
    line = _one_line(info.value, small_volume)
    assert "too little for the prepared packs" in line and "needs about 1.9 MB" in line
    assert sorted(p.name for p in small_volume.path.iterdir()) == [".filler"]
    small_volume.free_up()
    out = stages.prepare(params)
    assert np.load(out / "train_images.npy").shape[1:] == (13, 64, 64)


def test_training_checkpoint_onto_a_full_volume(tmp_path, small_volume):
    make_packs(tmp_path / "prepared", per_class=12)
    data = tiny_params_dict(tmp_path, epochs=1)
    data["paths"]["model"] = str(small_volume.path / "model")
    params = params_from_dict(data)
    small_volume.leave(300_000)  # the weights and optimiser state of resnet10t are about 20 MB
    with pytest.raises(NoSpaceError) as info:
        stages.train(params)
    line = _one_line(info.value, small_volume)
    assert "while writing the training checkpoint" in line and "needs about" in line
    model_dir = small_volume.path / "model"
    assert not any(p.name.endswith(".tmp") for p in model_dir.rglob("*"))  # no half-written checkpoint
    assert not (model_dir / "model.pt").exists()
    small_volume.free_up()
    # Too little for the checkpoint, not for the run as a whole: tmpfs of 8 MB; train on another volume then.
    data["paths"]["model"] = str(tmp_path / "model")
    result = stages.train(params_from_dict(data))
    assert result["run_id"] and (tmp_path / "model" / "model.pt").is_file()


def test_search_onto_a_full_volume_keeps_the_previous_hits_whole(tmp_path, small_volume, capsys):
    model_dir = make_model_dir(tmp_path / "model")
    for i, tile in enumerate(synthetic_tiles(6)):
        make_tile(tmp_path / "tiles" / f"tile_{i}.tif", tile, origin=(500000 + 640 * i, 5000000))
    out = small_volume.path / "hits"
    search = ["search", "a lake", "--tiles", str(tmp_path / "tiles"), "--model", str(model_dir), "--out", str(out)]
    assert cli_main(search) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["hits.csv", "hits.geojson", "hits.png"]
    small_volume.leave(30_000)  # room for the GeoJSON and the CSV, not for the mosaic
    capsys.readouterr()
    assert cli_main(["search", "a river", *search[2:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: no space left on {small_volume.path}")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous set, whole; no temporaries
