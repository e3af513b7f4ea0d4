"""Tests for geoclip.registry.export: TorchScript export served without geoclip, checked against PyTorch, written atomically."""

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import make_model_dir, make_packs, real_batch, synthetic_tiles

from geoclip.cli import main
from geoclip.errors import GeoclipError
from geoclip.model.clip import load_model
from geoclip.registry.export import (
    ENCODER_FILES,
    ONNX_PACKAGES,
    TEXT_FILES,
    check_export,
    check_text_export,
    export_model,
)

REAL = Path(__file__).resolve().parents[3] / "shared/data/eurosat_ms_dev"
HAS_ONNX = all(importlib.util.find_spec(p) for p in ("onnx", "onnxruntime", "onnxscript"))

# Runs in a fresh interpreter with geoclip and timm made unimportable: the export must serve on torch alone.
SERVE = """
import json, sys
sys.modules["geoclip"] = None
sys.modules["timm"] = None
import numpy as np, torch
export, tiles, out = sys.argv[1:4]
meta = json.load(open(f"{export}/export.json"))
module = torch.jit.load(f"{export}/{meta['encoder_file']}")
cls = torch.from_numpy(np.load(f"{export}/{meta['class_embeddings_file']}"))
assert torch.equal(module.class_embeddings, cls)
x = torch.from_numpy(np.load(tiles).astype(np.float32))
with torch.no_grad():
    logits = {f"b{n}": (meta["logit_scale"] * module(x[:n]) @ cls.T).numpy() for n in (1, 5)}
np.savez(out, **logits)
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model and its TorchScript export."""
    root = tmp_path_factory.mktemp("export")
    model_dir = make_model_dir(root / "model")
    return model_dir, root / "export", export_model(model_dir, root / "export")


def tiles5() -> np.ndarray:
    """Five real EuroSAT_MS tiles (one per class) when the data is here, else synthetic tiles."""
    return real_batch(REAL, 5) if REAL.exists() else synthetic_tiles(5)


def test_torchscript_serves_without_geoclip_and_matches_pytorch(exported, tmp_path):
    model_dir, out, _ = exported
    x = tiles5()
    np.save(tmp_path / "tiles.npy", x)
    proc = subprocess.run([sys.executable, "-c", SERVE, str(out), str(tmp_path / "tiles.npy"),
                           str(tmp_path / "logits.npz")], check=False, capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    served = np.load(tmp_path / "logits.npz")
    with torch.no_grad():
        ref = load_model(model_dir)(torch.from_numpy(x.astype(np.float32))).numpy()
    for n in (1, 5):  # dynamic batch: one tile and five
        np.testing.assert_allclose(served[f"b{n}"], ref[:n], atol=2e-3)
        assert (served[f"b{n}"].argmax(1) == ref[:n].argmax(1)).all()


def test_metadata_records_what_a_server_needs(exported):
    model_dir, out, meta = exported
    model = load_model(model_dir)
    on_disk = json.loads((out / "export.json").read_text())
    assert {k: on_disk[k] for k in on_disk} == {k: meta[k] for k in on_disk}
    assert meta["class_names"] == model.cfg.class_names and meta["band_names"] == model.cfg.band_names
    assert meta["tile_size"] == 64 and meta["format"] == "torchscript"
    assert meta["logit_scale"] == pytest.approx(float(model.logit_scale.detach().exp()), rel=1e-6)
    assert meta["max_abs_diff"] <= 1e-4 and meta["checked_batch_sizes"][-1] == 1
    cls = np.load(out / "class_embeddings.npy")
    np.testing.assert_allclose(cls, model.class_embeddings().detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(cls, axis=1), 1.0, atol=1e-5)
    assert sorted(p.name for p in out.iterdir()) == ["class_embeddings.npy", "export.json", "image_encoder.pt",
                                                     "text_projection.pt"]
    assert meta["text_max_abs_diff"] <= 1e-4 and meta["new_classes"] is True
    assert meta["class_prompts"] == model.cfg.prompts


# The text side, served the same way: sentence embeddings of new prompts in, class embeddings out.
SERVE_TEXT = """
import json, sys
sys.modules["geoclip"] = None
import numpy as np, torch
export, sentences, out = sys.argv[1:4]
meta = json.load(open(f"{export}/export.json"))
text = torch.jit.load(f"{export}/{meta['text_projection_file']}")
with torch.no_grad():
    prompts = text(torch.from_numpy(np.load(sentences))).view(3, 2, -1).mean(dim=1)
np.save(out, torch.nn.functional.normalize(prompts, dim=-1).numpy())
"""


def test_exported_text_projection_embeds_new_classes_like_the_served_model(exported, tmp_path):
    from geoclip.model.text import embed_prompts
    from geoclip.model.vocab import class_embeddings, vocabulary

    model_dir, out, _ = exported
    model = load_model(model_dir)
    vocab = vocabulary(model.cfg, ["lake", "vineyard", "solar farm"], templates=["a satellite image of {}.",
                                                                                 "an aerial view of {}."])
    np.save(tmp_path / "sentences.npy", embed_prompts([p for prompts in vocab.prompts for p in prompts]))
    proc = subprocess.run([sys.executable, "-c", SERVE_TEXT, str(out), str(tmp_path / "sentences.npy"),
                           str(tmp_path / "classes.npy")], check=False, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "classes.npy"), class_embeddings(model, vocab).numpy(), atol=1e-5)


def test_check_refuses_an_encoder_that_does_not_match(exported, tmp_path):
    _, out, _ = exported
    other = load_model(make_model_dir(tmp_path / "other", seed=1))
    x = torch.from_numpy(synthetic_tiles(4).astype(np.float32))
    with pytest.raises(GeoclipError, match="differ from PyTorch .* export refused"):
        check_export(other, out / ENCODER_FILES["torchscript"], "torchscript", x)
    with pytest.raises(GeoclipError, match="text projection differs from PyTorch .* export refused"):
        check_text_export(other, out / TEXT_FILES["torchscript"], "torchscript")


def test_failed_export_leaves_existing_output_untouched(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    with pytest.raises(GeoclipError, match="expected a folder written by save_model"):
        export_model(tmp_path / "no_model", out)
    bad_sample = synthetic_tiles(4)[:, :3]  # a 3-band RGB batch for a 13-band model
    with pytest.raises(GeoclipError, match=r"expected \(N>=2, 13, H, W\)"):
        export_model(make_model_dir(tmp_path / "model"), out, sample=bad_sample)
    with pytest.raises(GeoclipError, match="export format 'tflite'"):
        export_model(tmp_path / "model", out, fmt="tflite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]  # no temp dirs left


def test_a_spectral_stats_model_exports_its_branch_and_matches_pytorch(tmp_path):
    model_dir = make_model_dir(tmp_path / "model", spectral_stats=True)
    meta = export_model(model_dir, tmp_path / "export")
    assert meta["max_abs_diff"] <= 1e-4
    module = torch.jit.load(str(tmp_path / "export" / ENCODER_FILES["torchscript"]))
    x = torch.from_numpy(tiles5().astype(np.float32))
    brighter = x.clone()
    brighter[:, 3] *= 1.5  # the branch sees band levels: a brighter B04 moves the exported embedding
    with torch.no_grad():
        assert not torch.allclose(module(x), module(brighter), atol=1e-3)
        _, emb = load_model(model_dir).predict(x)
        assert torch.allclose(module(x), emb, atol=1e-4)


def _hide(monkeypatch: pytest.MonkeyPatch, packages: tuple[str, ...]) -> None:
    """Make ``packages`` look uninstalled: a None entry in sys.modules makes importlib.util.find_spec return None."""
    for name in packages:
        monkeypatch.setitem(sys.modules, name, None)


def test_onnx_without_packages_says_what_to_install(tmp_path, monkeypatch, capsys):
    """Without the ONNX packages (hidden here, whatever is installed) export refuses in one line, writing nothing."""
    _hide(monkeypatch, ONNX_PACKAGES)
    want = ("--format onnx needs the package(s) onnx, onnxruntime, onnxscript: pip install onnx onnxruntime "
            "onnxscript (or use --format torchscript)")
    with pytest.raises(GeoclipError) as refused:
        export_model(make_model_dir(tmp_path / "model"), tmp_path / "export", fmt="onnx")
    assert str(refused.value) == want
    assert not (tmp_path / "export").exists()
    params = tmp_path / "params.yaml"
    params.write_text(f"paths:\n  model: {tmp_path / 'model'}\n")
    assert main(["--params", str(params), "export", "--format", "onnx"]) == 2
    assert capsys.readouterr().err == f"error: {want}\n"  # the CLI's whole answer: one line
    assert not (tmp_path / "model/export").exists()


def test_onnx_refusal_names_only_the_missing_package(tmp_path, monkeypatch):
    """One package missing (onnxscript, which torch's ONNX exporter needs): the refusal names that one alone."""
    if not HAS_ONNX:
        pytest.skip("needs onnx and onnxruntime installed, to hide onnxscript alone")
    _hide(monkeypatch, ("onnxscript",))
    with pytest.raises(GeoclipError) as refused:
        export_model(make_model_dir(tmp_path / "model"), tmp_path / "export", fmt="onnx")
    assert str(refused.value) == ("--format onnx needs the package(s) onnxscript: pip install onnxscript "
                                  "(or use --format torchscript)")
    assert not (tmp_path / "export").exists()


@pytest.mark.skipif(not HAS_ONNX, reason="onnx, onnxruntime, onnxscript not installed")
def test_onnx_export_matches_pytorch(tmp_path):
    meta = export_model(make_model_dir(tmp_path / "model"), tmp_path / "export", fmt="onnx")
    assert meta["max_abs_diff"] <= 1e-4 and (tmp_path / "export/image_encoder.onnx").exists()
    assert meta["text_max_abs_diff"] <= 1e-4 and (tmp_path / "export/text_projection.onnx").exists()


def test_cli_exports_checked_on_the_test_pack(tmp_path, capsys):
    make_packs(tmp_path / "prepared", per_class=6)
    params = tmp_path / "params.yaml"
    params.write_text(f"paths:\n  prepared: {tmp_path / 'prepared'}\n  model: {tmp_path / 'model'}\n")
    make_model_dir(tmp_path / "model")
    assert main(["--params", str(params), "export"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["out_dir"] == str(tmp_path / "model/export") and meta["checked_batch_sizes"] == [3, 1]
    assert main(["--params", str(params), "export", "--model", str(tmp_path / "none")]) == 2
    assert "expected a folder written by save_model" in capsys.readouterr().err



@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_a_model_that_resizes_tiles_and_pools_stages_exports_the_same_embeddings(tmp_path, fmt):
    """A prior's model resizes 64 px tiles to its input size inside the model: the export does the same."""
    if fmt == "onnx" and not HAS_ONNX:
        pytest.skip("onnx, onnxruntime, onnxscript not installed")
    model_dir = make_model_dir(tmp_path / "model", spectral_stats=True, input_size=96, feature_stages=(1, 2))
    meta = export_model(model_dir, tmp_path / "export", fmt=fmt)
    assert meta["max_abs_diff"] <= 1e-4 and meta["input_size"] == 96  # checked against the resizing model
    model = load_model(model_dir)
    x = torch.from_numpy(tiles5().astype(np.float32))
    with torch.no_grad():
        resized = model.encode_image(x)
        model.cfg = dataclasses.replace(model.cfg, input_size=0)
        assert not torch.allclose(resized, model.encode_image(x), atol=1e-3)  # the resize is part of the model
