"""Tests for geoclip.data.synth_concepts: the concepts beyond EuroSAT, their words, and that they paint what they say."""

from __future__ import annotations

import re

import numpy as np
import pytest
from scipy.optimize import nnls

from geoclip.bands import EUROSAT_CLASSES
from geoclip.data import synth_concepts as sc
from geoclip.data import synth_textures as tx
from geoclip.data.captions import caption

NAMES = list(sc.CONCEPTS)


def painted(name: str, seed: int = 0, size: int = 96) -> tuple[tx.Composition, np.ndarray]:
    """The composition and the bare painted surface (before texture and variation) of one concept patch."""
    comp = tx.Composition()
    return comp, sc.CONCEPTS[name].paint(np.random.default_rng([7, seed]), size, size, comp)


def words(text: str) -> str:
    """Lower-case words of ``text`` (CamelCase split), space separated, padded for whole-word search."""
    text = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", text).lower()
    return " " + " ".join(re.findall(r"[a-z]+", text)) + " "


def painted_shares(img: np.ndarray, materials: list[str], step: int = 2) -> dict[str, float]:
    """Each material's share of ``img`` by unmixing every ``step``-th pixel into the materials' spectra
    (non-negative least squares, abundances normalised per pixel, so shading and brightness jitter cancel)."""
    ends = np.stack([sc.MATERIALS[m] for m in materials], axis=1).astype(np.float64)  # (13, k)
    scale = ends.mean(axis=1, keepdims=True)  # every band counts about equally
    pixels = img[:, ::step, ::step].reshape(13, -1).T.astype(np.float64) / scale.T
    a = np.array([nnls(ends / scale, p)[0] for p in pixels])
    a /= np.maximum(a.sum(axis=1, keepdims=True), 1e-9)
    return dict(zip(materials, a.mean(axis=0)))


def mismatches(comp: tx.Composition, img: np.ndarray, tol: float = 0.12) -> list[str]:
    """Where the painted surface disagrees with what the composition says: shares off by more than ``tol``, or a
    material said to cover 15 % or more hardly there."""
    found = painted_shares(img, list(comp.shares))
    out = [f"{m}: said {s:.2f}, painted {found[m]:.2f}" for m, s in comp.shares.items() if abs(found[m] - s) > tol]
    out += [f"{m}: said {s:.2f} but hardly painted ({found[m]:.2f})" for m, s in comp.shares.items()
            if s >= 0.15 and found[m] < 0.5 * s]
    return out


def test_at_least_32_concepts_outside_eurosat():
    assert len(NAMES) >= 32 and len(set(NAMES)) == len(NAMES)
    assert not set(NAMES) & set(EUROSAT_CLASSES)
    assert len({c.wording for c in sc.CONCEPTS.values()}) == len(NAMES)
    for name, c in sc.CONCEPTS.items():
        assert c.name == name and re.fullmatch(r"[A-Z][A-Za-z]+", name)
        assert c.variation in tx.TILE_PCS and len(c.texture) == 3 and all(0 <= t < 0.2 for t in c.texture)


def test_no_concept_words_name_a_eurosat_class():
    """Names, wordings and every shape phrase a painter writes stay clear of the ten classes' words."""
    texts = [c.name for c in sc.CONCEPTS.values()] + [c.wording for c in sc.CONCEPTS.values()]
    for name in NAMES:
        for seed in range(3):
            comp, _ = painted(name, seed, 64)
            texts += comp.features + list(comp.shares)
    bad = [(t, f) for t in texts for f in sc.FORBIDDEN_WORDS if f" {f} " in words(t)]
    assert not bad
    assert words("HighwayRamp") == " highway ramp "  # the check sees CamelCase words
    assert {"forest", "river", "sea", "pasture", "orchard", "woodland"} <= sc.FORBIDDEN_WORDS


def test_materials_are_spectra_with_a_source():
    assert set(sc.MATERIALS) == set(sc.MATERIAL_SOURCES)
    for m, s in sc.MATERIALS.items():
        assert s.shape == (13,) and s.dtype == np.float32 and (s > 0).all(), m
        assert re.match(r"(calibrated: EuroSAT \w+/|published|assumed)", sc.MATERIAL_SOURCES[m]), m
    # The path-radiance rule puts published dark water where the calibrated one is.
    assert np.allclose(sc.toa(list(sc.WATER_REFLECTANCE)), sc.MATERIALS["water"], atol=1)
    assert sc.MATERIALS["snow"][2] > 8000 and sc.MATERIALS["snow"][10] < 2000  # bright, dark in SWIR


@pytest.mark.parametrize("name", NAMES)
def test_tiles_are_valid_and_seeded(name):
    def tile(seed):
        return sc.concept_surface(np.random.default_rng([3, seed]), name, 64, 64)

    img = tile(0)
    assert img.shape == (13, 64, 64) and img.dtype == np.float32
    assert np.isfinite(img).all() and img.min() > 0
    assert np.array_equal(img, tile(0)) and not np.array_equal(img, tile(1))


@pytest.mark.parametrize("name", NAMES)
def test_painter_paints_what_its_caption_says(name):
    for seed in range(2):
        comp, img = painted(name, seed)
        assert img.shape == (13, 96, 96) and comp.features
        assert set(comp.shares) <= set(sc.MATERIALS)
        assert sum(comp.shares.values()) == pytest.approx(1.0, abs=0.01)
        assert not mismatches(comp, img), f"{name} seed {seed}"


def test_the_check_catches_a_lying_painter():
    comp, img = painted("SparseTrees")
    assert not mismatches(comp, img)
    # Says snow it never painted.
    liar = tx.Composition({m: 0.7 * s for m, s in comp.shares.items()} | {"snow": 0.3}, comp.features)
    assert any(m.startswith("snow") for m in mismatches(liar, img))
    # Paints water over half the patch and never says so.
    comp, img = painted("Cemetery")
    assert not mismatches(comp, img)
    img[:, :48] = sc.MATERIALS["water"][:, None, None]
    assert mismatches(comp, img)


@pytest.mark.parametrize("name", NAMES)
def test_caption_mentions_the_top_material(name):
    comp, _ = painted(name, 1, 64)
    top = max(comp.shares, key=comp.shares.get)
    text = caption(comp, np.random.default_rng(0))
    assert text and top in text


def test_painters_work_at_region_size():
    for name in ("Port", "Village", "Glacier", "HedgerowFarmland"):
        comp = tx.Composition()
        img = sc.concept_surface(np.random.default_rng(0), name, 300, 260, comp)
        assert img.shape == (13, 300, 260) and np.isfinite(img).all()
        assert sum(comp.shares.values()) == pytest.approx(1.0, abs=0.01)
