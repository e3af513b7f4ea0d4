"""Open-set scores: how far a tile is from every class prompt (calibrated), and class prompts far from anything learnt."""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch

from geoclip.errors import GeoclipError
from geoclip.model.clip import GeoCLIP, ModelConfig, predict_batches
from geoclip.model.vocab import DEFAULT_TEMPLATES, Vocabulary, text_key

QUANTILE_LEVELS = np.linspace(0.0, 1.0, 101)  # open_set_quantiles: the own-class similarity at 0, 1, ..., 100 %
FAR_QUANTILE = 0.9  # far: no closer to anything learnt than 9 in 10 pairs of learnt texts are to each other
NOT_CALIBRATED = ("not calibrated (the model was saved without open_set_quantiles): novelty is empty; retrain to "
                  "get it")


class FarClass(NamedTuple):
    """A requested class whose wording is far from anything the model learnt."""

    name: str
    similarity: float  # cosine (sentence encoder) to the nearest learnt text
    nearest: str  # that learnt text
    threshold: float  # the calibrated limit it fell below


@torch.no_grad()
def own_class_similarity(model: GeoCLIP, images: np.ndarray, labels: np.ndarray, batch_size: int,
                         device: torch.device | str = "cpu", tta: bool = False,
                         band_idx: list[int] | None = None) -> np.ndarray:
    """Cosine similarity between each tile's unit embedding and its own class's embedding, for the tiles whose label is
    one of the model's classes (``0..C-1``; others, e.g. concepts dropped from the served class list, are left out)."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(images):
        raise GeoclipError(f"open-set calibration: {len(images)} tiles but {len(labels)} labels")
    n_classes = len(model.cfg.class_names)
    mine = np.flatnonzero((labels >= 0) & (labels < n_classes))
    if len(labels) and not len(mine):
        raise GeoclipError(f"open-set calibration: labels {labels.min()}..{labels.max()}, none a class of the model "
                           f"(0..{n_classes - 1})")
    images, labels = (images, labels) if len(mine) == len(labels) else (np.asarray(images)[mine], labels[mine])
    _, emb = predict_batches(model, images, batch_size, device, band_idx=band_idx, tta=tta)
    classes = model.class_embeddings().float().cpu().numpy()
    return np.einsum("nd,nd->n", emb.astype(np.float32), classes[labels])


def calibrate(model: GeoCLIP, images: np.ndarray, labels: np.ndarray, batch_size: int,
              device: torch.device | str = "cpu", tta: bool = False, band_idx: list[int] | None = None) -> list[float]:
    """The 0, 1, ..., 100 % quantiles (101 floats) of calibration tiles' similarity to their own class: store them in
    ``ModelConfig.open_set_quantiles``. ``images``: raw DN tiles (the validation split), ``labels``: class indices
    (tiles of other labels are left out)."""
    sims = own_class_similarity(model, images, labels, batch_size, device, tta, band_idx)
    if not len(sims):
        raise GeoclipError("open-set calibration: no tiles; expected the validation split")
    return [float(q) for q in np.quantile(sims.astype(np.float64), QUANTILE_LEVELS)]


def open_set_score(max_similarity: np.ndarray, quantiles: list[float]) -> np.ndarray:
    """Novelty in [0, 1] per tile: the share of calibration tiles whose own-class similarity was at least this tile's
    best similarity over the requested classes (1 - conformal p-value), interpolated in ``quantiles``.

    ~0: as close to a class as trained tiles are to their own; ~1: farther from every class prompt than almost every
    validation tile from its own (for tiles like the calibration ones it is uniform on [0, 1]). NaN without quantiles
    (a model saved before calibration) or for a NaN similarity.
    """
    best = np.asarray(max_similarity, dtype=np.float64)
    if len(quantiles) < 2:
        return np.full(best.shape, np.nan, np.float32)
    q = np.maximum.accumulate(np.asarray(quantiles, dtype=np.float64))  # monotone even if rounded
    levels = np.linspace(0.0, 1.0, len(q))
    # np.interp takes the last of tied quantiles: a tile exactly at a flat spot counts the tied tiles as at least it.
    below = np.interp(best, q, levels, left=0.0, right=1.0)  # share of calibration tiles below this similarity
    out = 1.0 - below
    out[np.isnan(best)] = np.nan
    return out.astype(np.float32)


def similarity_outputs(embeddings: np.ndarray, classes: np.ndarray, quantiles: list[float]) -> dict[str, np.ndarray]:
    """Per tile: cosine ``similarities`` (N, C) to each class, the best one (``max_similarity``) and its ``novelty``."""
    emb = np.asarray(embeddings, np.float32)
    sims = emb @ np.asarray(classes, np.float32).T
    best = sims.max(axis=1) if sims.shape[1] else np.full(len(emb), np.nan, np.float32)
    return {"similarities": sims.astype(np.float32), "max_similarity": best.astype(np.float32),
            "novelty": open_set_score(best, quantiles)}


def _wording(prompt: str, templates: list[str]) -> str:
    """A prompt less the template around it (``a satellite image of {}.`` -> the class wording); else as it is."""
    for t in templates:
        pre, post = t.split("{}", 1)
        if prompt.startswith(pre) and prompt.endswith(post) and len(prompt) > len(pre) + len(post):
            return prompt[len(pre):len(prompt) - len(post)]
    return prompt


def _templates(cfg: ModelConfig, extra: list[str] | None = None) -> list[str]:
    """The templates a prompt may have been worded with: the request's, the model's, then the defaults."""
    return [t for t in [*(extra or []), *cfg.templates, *DEFAULT_TEMPLATES] if isinstance(t, str) and t.count("{}") == 1]


def learnt_set(cfg: ModelConfig) -> list[str]:
    """What the model learnt, as texts: ``learnt_texts`` (filled by training) plus the trained classes' wordings (their
    prompts, descriptions and names), each less a template around it; duplicates (case, spacing) dropped."""
    templates = _templates(cfg)
    texts = [*(_wording(t, templates) for t in cfg.learnt_texts if isinstance(t, str)),
             *(_wording(p, templates) for prompts in cfg.prompts for p in prompts), *cfg.descriptions.values(),
             *cfg.class_names]
    seen: dict[str, str] = {}
    for text in texts:
        if isinstance(text, str) and text.strip():
            seen.setdefault(text_key(text), " ".join(text.split()))
    return list(seen.values())


@functools.lru_cache(maxsize=8)
def _learnt_space(texts: tuple[str, ...]) -> tuple[np.ndarray, float]:
    """Unit sentence embeddings of the learnt texts and the far threshold calibrated on them (see :func:`far_report`)."""
    from geoclip.model.text import embed_prompts

    emb = embed_prompts(list(texts))
    pairs = (emb @ emb.T)[np.triu_indices(len(texts), 1)]  # every pair of distinct learnt texts
    return emb, float(np.quantile(pairs, FAR_QUANTILE))


def far_threshold(cfg: ModelConfig) -> float | None:
    """The calibrated far limit for ``cfg`` (None: fewer than two learnt texts, nothing to calibrate on)."""
    texts = learnt_set(cfg)
    return _learnt_space(tuple(texts))[1] if len(texts) >= 2 else None


def far_report(model: GeoCLIP, vocab: Vocabulary, templates: list[str] | None = None) -> list[FarClass]:
    """The requested classes whose wording is far from anything the model learnt, in the vocabulary's order.

    Rule (in the frozen sentence encoder's space, unit vectors, cosine): a class's wording is its prompts less the
    template (``templates``: the request's, if any). It is far when its similarity to the nearest learnt text
    (:func:`learnt_set`) is below the 90th percentile of the similarities between pairs of learnt texts: most such
    pairs are different concepts (forest / a sea or lake), so a wording no closer to anything learnt than they are to
    each other names nothing the model learnt, while paraphrases (woodland / forest) sit well above. Trained classes
    in their trained wording are never far; with fewer than two learnt texts nothing is.
    """
    cfg = model.cfg
    texts = learnt_set(cfg)
    trained = {tuple(p) for p in cfg.prompts}
    asked = [(n, p) for n, p in zip(vocab.names, vocab.prompts, strict=True) if tuple(p) not in trained]
    if len(texts) < 2 or not asked:
        return []
    from geoclip.model.text import embed_prompts

    learnt, threshold = _learnt_space(tuple(texts))
    allowed = _templates(cfg, templates)
    wordings = [sorted({_wording(p, allowed) for p in prompts}) for _, prompts in asked]
    flat = [w for ws in wordings for w in ws]
    sims = embed_prompts(flat) @ learnt.T
    far, row = [], 0
    for (name, _), ws in zip(asked, wordings, strict=True):
        block = sims[row:row + len(ws)]
        row += len(ws)
        i, j = np.unravel_index(int(block.argmax()), block.shape)
        best = float(block[i, j])
        if best < threshold:
            far.append(FarClass(name, best, texts[j], threshold))
    return far


def far_classes(model: GeoCLIP, vocab: Vocabulary, templates: list[str] | None = None) -> list[tuple[str, float]]:
    """``(name, similarity to the nearest learnt text)`` of the requested classes far from anything learnt
    (:func:`far_report` says the rule)."""
    return [(f.name, f.similarity) for f in far_report(model, vocab, templates)]


def far_warning(far: list[FarClass]) -> str:
    """One line naming the far classes and their nearest learnt texts ('' when there are none)."""
    if not far:
        return ""
    names = ", ".join(repr(f.name) for f in far)
    nearest = "; ".join(f"{f.name!r} ~ {f.nearest!r} {f.similarity:.2f}" for f in far)
    noun = "classes" if len(far) > 1 else "class"
    verb = "are" if len(far) > 1 else "is"
    return (f"{noun} {names} {verb} far from anything the model learnt (nearest: {nearest}; limit "
            f"{far[0].threshold:.2f}); {'their' if len(far) > 1 else 'its'} scores are guesses")
