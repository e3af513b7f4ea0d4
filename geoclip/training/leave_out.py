"""The unseen-class rule: nothing that names a held-out class (its name, wording or a synonym) reaches training."""

from __future__ import annotations

import re
from collections.abc import Iterable

#: Words that name each EuroSAT class, beyond its own name: a concept or caption using one of them would teach the
#: held-out class under another name. Materials are not names: "trees", "water", "roads", "buildings" may appear
#: (a held-out Forest's trees are in parks and orchards; that is what the experiment tests).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "AnnualCrop": ("annual crop", "arable", "cropland", "crop land", "farmland", "farm land", "tillage"),
    "Forest": ("forest", "woodland", "woods", "wood", "timberland", "rainforest"),
    "HerbaceousVegetation": ("herbaceous", "grassland", "scrub", "scrubland", "shrubland", "rangeland"),
    "Highway": ("highway", "motorway", "freeway", "expressway", "interstate", "autobahn"),
    "Industrial": ("industrial", "industry", "factory", "factories", "warehouse", "manufacturing"),
    "Pasture": ("pasture", "meadow", "grazing", "grazed", "paddock"),
    "PermanentCrop": ("permanent crop", "orchard", "vineyard", "plantation"),
    "Residential": ("residential", "housing", "houses", "homes", "suburb", "suburban", "neighbourhood",
                    "neighborhood"),
    "River": ("river", "stream", "creek", "brook"),
    "SeaLake": ("sea", "lake", "ocean", "lagoon"),
}
ARTICLES = ("a ", "an ", "the ")


def spaced(name: str) -> str:
    """``SeaLake`` -> ``sea lake``: a CamelCase class name as words."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).lower()


def held_out_words(holdout: str, description: str = "") -> tuple[str, ...]:
    """Every phrase that names ``holdout``: its synonyms, its name as words and its description (less articles)."""
    if not holdout:
        return ()
    desc = description.strip().lower()
    for article in ARTICLES:
        desc = desc.removeprefix(article)
    return tuple(dict.fromkeys(w for w in (*SYNONYMS.get(holdout, ()), spaced(holdout), desc) if w))


def naming(text: str, words: Iterable[str]) -> str | None:
    """The first of ``words`` that ``text`` contains as whole words (plurals too), else None."""
    for word in words:
        if re.search(rf"\b{re.escape(word)}(s|es)?\b", text, flags=re.IGNORECASE):
            return word
    return None


def kept_concepts(concepts: dict[str, str], words: tuple[str, ...]) -> list[str]:
    """The concepts (name -> wording) whose name and wording name none of ``words``, in order."""
    return [name for name, wording in concepts.items()
            if naming(spaced(name), words) is None and naming(wording, words) is None]


def scrub_captions(captions: Iterable[str], words: tuple[str, ...]) -> list[str]:
    """Captions with those naming one of ``words`` blanked ("": the tile trains on its class prompt only)."""
    return ["" if words and naming(c, words) else c for c in captions]
