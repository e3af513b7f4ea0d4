"""Tests for the GeoCLIP model: seeded build, save/load round trip, prediction on real EuroSAT_MS tiles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from geoclip.bands import ALL_BAND_NAMES
from geoclip.model import ModelConfig, build_model, load_model, save_model
from geoclip.tiles import read_tile

CLASSES = ["Forest", "Industrial", "SeaLake"]


def _config(**overrides) -> ModelConfig:
    kwargs = dict(image_encoder="resnet10t", embed_dim=16, band_names=list(ALL_BAND_NAMES), class_names=CLASSES,
                  prompts=[[f"a satellite image of {c}.", f"an aerial view of {c}."] for c in CLASSES],
                  band_mean=[1500.0] * 13, band_std=[800.0] * 13)
    return ModelConfig(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def model():
    return build_model(_config(), seed=0).eval()


def _real_batch(root) -> torch.Tensor:
    paths = sorted(root.glob("*/*.tif"))[::7][:8]
    return torch.from_numpy(np.stack([read_tile(p) for p in paths]))


def test_build_with_the_same_seed_gives_the_same_weights(model):
    again = build_model(_config(), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    other = build_model(_config(), seed=1)
    assert not torch.equal(model.image_proj.weight, other.image_proj.weight)


def test_prompt_features_are_sentence_embeddings(model):
    feats = model.prompt_features
    assert feats.shape == (3, 2, 384)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3, 2), atol=1e-4)


def test_save_load_round_trip_predicts_the_same_on_a_real_batch(model, tmp_path, real_tiles):
    x = _real_batch(real_tiles)
    assert x.dtype == torch.uint16 and x.shape[1:] == (13, 64, 64)
    save_model(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "model_config.json").read_text())["class_names"] == CLASSES
    loaded = load_model(tmp_path / "m")
    probs, emb = loaded.predict(x)
    ref_probs, ref_emb = model.predict(x)
    assert probs.shape == (len(x), 3) and emb.shape == (len(x), 16)
    assert torch.allclose(probs, ref_probs, atol=1e-6) and torch.allclose(emb, ref_emb, atol=1e-6)
    assert torch.allclose(probs.sum(1), torch.ones(len(x)), atol=1e-5)
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(x)), atol=1e-5)


def test_forward_logits_match_predict(model, real_tiles):
    x = _real_batch(real_tiles)
    with torch.no_grad():
        logits = model(x)
    probs, _ = model.predict(x)
    assert torch.allclose(logits.softmax(-1), probs, atol=1e-6)
