"""Tests for geoclip.data.captions and the compositions the synthetic generators report."""

from __future__ import annotations

import numpy as np
import pytest

from geoclip.bands import EUROSAT_CLASSES
from geoclip.data import synth_textures as tx
from geoclip.data.captions import caption, join_words, said_amount

#: What each class's tiles are mostly made of, as the generator paints them.
MAIN_MATERIAL = {"Forest": "trees", "SeaLake": "water", "Residential": "gardens", "Highway": None, "River": None}


def composition(cls: str, n: int = 1) -> tuple[tx.Composition, np.ndarray]:
    """The composition and surface of synthetic tile ``n`` of ``cls`` (seeded as synth seeds its tiles)."""
    comp = tx.Composition()
    img = tx.surface(np.random.default_rng([0, EUROSAT_CLASSES.index(cls), n]), cls, 64, 64, comp)
    return comp, img


@pytest.mark.parametrize("share, said", [(0.9, "mostly water"), (0.5, "water"), (0.2, "some water"),
                                         (0.05, "a little water"), (0.01, None)])
def test_amounts_are_said_in_words(share, said):
    assert said_amount("water", share) == said


def test_plurals_get_a_few_and_mass_nouns_a_little():
    assert said_amount("trees", 0.05) == "a few trees"
    assert said_amount("green grass", 0.05) == "a little green grass"


def test_join_words():
    assert [join_words(w) for w in (["a"], ["a", "b"], ["a", "b", "c"])] == ["a", "a and b", "a, b and c"]


@pytest.mark.parametrize("cls", EUROSAT_CLASSES)
def test_every_generator_reports_what_it_painted(cls):
    comp, _ = composition(cls)
    assert comp.features, f"{cls}: no shape named"
    assert sum(comp.shares.values()) == pytest.approx(1.0, abs=0.02)  # the shares cover the tile once
    assert all(0.0 <= v <= 1.0 for v in comp.shares.values())
    if main := MAIN_MATERIAL.get(cls):
        assert max(comp.shares, key=comp.shares.get) == main


def test_linear_classes_report_their_line_and_the_farmland_around_it():
    river, _ = composition("River")
    road, _ = composition("Highway")
    assert 0.02 < river.shares["water"] < 0.6 and "river" in " ".join(river.features)
    assert 0.02 < road.shares["roads"] < 0.4 and "road" in " ".join(road.features)
    assert {"green crops", "bare fields"} <= set(river.shares) & set(road.shares)


def test_reporting_draws_no_random_numbers():
    """Asking for the composition leaves the pixels exactly as they were."""
    for cls in EUROSAT_CLASSES:
        plain = tx.surface(np.random.default_rng([0, EUROSAT_CLASSES.index(cls), 1]), cls, 64, 64)
        assert np.array_equal(composition(cls)[1], plain)


def test_caption_names_the_main_cover_and_a_shape_and_omits_traces():
    comp = tx.Composition({"water": 0.9, "land": 0.08, "trees": 0.02}, ["open water", "a strip of shore"])
    words = caption(comp, np.random.default_rng(0))
    assert "mostly water" in words and "a little land" in words and "trees" not in words
    assert "open water" in words and "a strip of shore" in words


def test_captions_are_seeded_and_their_wording_varies():
    comp, _ = composition("Residential")
    assert caption(comp, np.random.default_rng(1)) == caption(comp, np.random.default_rng(1))
    assert len({caption(comp, np.random.default_rng(k)) for k in range(20)}) > 2
