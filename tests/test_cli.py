"""Tests for the geoclip CLI: subcommands, one-line errors and exit codes."""

import subprocess
import sys
from pathlib import Path

from geoclip.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def test_every_pipeline_step_has_a_subcommand():
    choices = build_parser()._subparsers._group_actions[0].choices
    for step in ["ingest", "validate", "prepare", "train", "evaluate", "register", "score", "predict"]:
        assert step in choices


def test_bad_params_give_one_line_error_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  epochs: many\n")
    assert main(["--params", str(bad), "prepare"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err == f"error: {bad}: train.epochs: expected int, got 'many'"


def test_prepare_subcommand_runs_the_library_step(tiny_dataset, tmp_path):
    from dataclasses import asdict

    import yaml

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(asdict(tiny_dataset)))
    assert main(["--params", str(params_file), "prepare"]) == 0
    assert (Path(tiny_dataset.paths.prepared) / "index.csv").exists()


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "geoclip"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "predict" in proc.stdout


def test_diagram_is_generated(tmp_path):
    out = tmp_path / "arch.png"
    assert main(["diagram", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_params_is_accepted_after_the_command_too(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("prepare:\n  split: random\n")
    assert main(["prepare", "--params", str(bad)]) == 2
    assert "prepare.split: 'random'; expected 'stratified' or 'spatial'" in capsys.readouterr().err


def test_priors_lists_each_source_and_whether_its_weights_are_installed(capsys):
    import json

    assert main(["priors"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == "efficientnet_lite0/imagenet" and row["bands"] == "B04 B03 B02"
    assert row["weights"].startswith("ok: ") and row["weights"].endswith(".pth")


def test_train_names_an_unknown_prior_before_starting_any_worker(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  pretrained: vit/laion\n")
    assert main(["--params", str(params), "train"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.pretrained: unknown source 'vit/laion'") and "\n" not in err
