"""Tests for the sentence encoder: the prompt-embedding cache and the trainable copy used for fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geoclip.model import text
from geoclip.model.text import TEXT_DIM, cache_dir, cache_key, embed_prompts, tokenize, trainable_encoder

PROMPTS = ["a satellite image of forest.", "an aerial view of a river.", "a Sentinel-2 multispectral tile of a sea."]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache folder through GEOCLIP_CACHE."""
    monkeypatch.setenv(text.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "text"


def _encoder_calls() -> int:
    info = text._encoder.cache_info()
    return info.hits + info.misses


def test_cache_folder_comes_from_the_environment(cache, monkeypatch):
    assert cache_dir() == cache
    monkeypatch.delenv(text.CACHE_ENV)
    assert cache_dir().parts[-3:] == (".cache", "geoclip", "text")


def test_key_depends_on_every_prompt_and_their_order():
    key = cache_key(PROMPTS)
    assert len(key) == 64 and key == cache_key(list(PROMPTS))
    assert key != cache_key(PROMPTS[::-1]) and key != cache_key(PROMPTS[:2])
    assert key != cache_key([*PROMPTS[:2], PROMPTS[2] + " "])


def test_second_call_reads_the_cache_without_the_encoder(cache):
    first = embed_prompts(PROMPTS)
    assert first.shape == (3, TEXT_DIM) and first.dtype == np.float32
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    files = list(cache.iterdir())
    assert [f.name for f in files] == [f"{cache_key(PROMPTS)}.npy"]  # one file, no temp leftovers
    calls = _encoder_calls()
    again = embed_prompts(PROMPTS)
    assert _encoder_calls() == calls  # the sentence encoder was not even asked for
    assert np.array_equal(first, again)
    assert np.allclose(embed_prompts(PROMPTS, use_cache=False), first, atol=1e-6)


def test_a_damaged_cache_file_is_recomputed_and_replaced(cache):
    ref = embed_prompts(PROMPTS)
    path = cache / f"{cache_key(PROMPTS)}.npy"
    path.write_bytes(b"not a numpy file")
    assert np.array_equal(embed_prompts(PROMPTS), ref)
    assert np.array_equal(np.load(path), ref)


def test_an_unwritable_cache_only_costs_the_speed_up(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv(text.CACHE_ENV, str(blocker))
    out = embed_prompts(PROMPTS)
    assert out.shape == (3, TEXT_DIM)
    assert "not cached" in capsys.readouterr().err


def test_trainable_copy_reproduces_the_frozen_embeddings_and_learns():
    """Token ids through the trainable copy give the frozen encoder's embeddings; gradients reach it."""
    enc = trainable_encoder()
    assert enc.transformer is not text._encoder()[0].auto_model  # a copy: fine-tuning leaves the cache intact
    tok = tokenize(PROMPTS)
    assert tok["input_ids"].dtype == torch.int64 and tok["input_ids"].shape == tok["attention_mask"].shape
    enc.eval()
    with torch.no_grad():
        feats = enc(tok["input_ids"], tok["attention_mask"])
    assert torch.allclose(feats, torch.from_numpy(embed_prompts(PROMPTS)), atol=1e-5)
    enc.train()
    enc(tok["input_ids"], tok["attention_mask"]).sum().backward()
    grads = [p.grad for p in enc.parameters()]
    assert all(g is not None for g in grads)  # no unused parameter (the BERT pooler is dropped)
    assert all(p.requires_grad for p in enc.parameters())
