"""Per-tile captions from what the synthetic generator painted: the cover mix in words, the shapes, varied wording.

Ten class names teach the class encoder ten points. A caption per tile ("a narrow winding river: mostly green
crops, some water and a few trees") ties words shared across classes (water, trees, roads, buildings) to what
the tile shows, meant to let a class never trained on but described in those words ("a sea or lake: open water
everywhere") land near its tiles (bench/unseen_classes.py measures whether it does: so far it does not). Captions go in labels.csv's ``caption`` column; training contrasts each
tile with its own caption beside its class (``train.caption_weight``).
"""

from __future__ import annotations

import re

import numpy as np

from geoclip.data.synth_textures import Composition

#: Share of the area -> how it is said ("a little" becomes "a few" for plurals); under the last, not mentioned.
AMOUNTS: tuple[tuple[float, str], ...] = ((0.75, "mostly {}"), (0.4, "{}"), (0.15, "some {}"), (0.04, "a little {}"))
MASS_NOUNS = frozenset({"water", "green grass", "dry grass", "bare soil", "pavement", "land"})
#: Sentence patterns: {shapes} and {cover} are filled in; varied so no single wording is learnt as the class.
PATTERNS: tuple[str, ...] = (
    "a satellite image of {shapes}: {cover}.",
    "{shapes}, with {cover}.",
    "an aerial view of {cover}, {shapes}.",
    "a Sentinel-2 tile showing {shapes} and {cover}.",
)


def said_amount(material: str, share: float) -> str | None:
    """``material`` covering ``share`` of the tile, in words ("some water"); None when too little to mention."""
    pattern = next((pattern for low, pattern in AMOUNTS if share >= low), None)
    if pattern is None:
        return None
    return pattern.replace("a little", "a little" if material in MASS_NOUNS else "a few").format(material)


def join_words(words: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def caption(comp: Composition, rng: np.random.Generator) -> str:
    """One caption for a tile of composition ``comp``; ``rng`` picks the pattern and the order of the shapes."""
    ranked = sorted(comp.shares.items(), key=lambda kv: -kv[1])
    cover = [words for material, share in ranked if (words := said_amount(material, share))]
    shapes = [comp.features[i] for i in rng.permutation(len(comp.features))] if comp.features else []
    pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
    return pattern.format(shapes=join_words(shapes) if shapes else "ground cover",
                          cover=join_words(cover) if cover else "mixed cover")


def caption_phrases(captions: list[str]) -> list[str]:
    """The distinct shape and material phrases of captions ("a winding river", "water", "trees"), amounts dropped:
    what a model trained on them has words for (kept with the model, to tell far class names from known ones)."""
    amounts = sorted({a.split("{}")[0] for _, a in AMOUNTS} | {"a few "}, key=len, reverse=True)
    frames = [part for pattern in PATTERNS for part in re.split(r"\{\w+\}", pattern) if part.strip(" ,.:")]
    out: dict[str, None] = {}
    for text in captions:
        for part in frames:
            text = text.replace(part.strip(), ",")
        for phrase in re.split(r"[,:.]| and ", text):
            phrase = phrase.strip()
            for amount in amounts:
                phrase = phrase.removeprefix(amount)
            if phrase and phrase not in ("ground cover", "mixed cover"):
                out[phrase] = None
    return list(out)
