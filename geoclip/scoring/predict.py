"""Classify single tiles with a logged model; write a CSV of classes, probabilities and open-set scores."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from geoclip.bands import ALL_BAND_NAMES
from geoclip.data.product_reader import ReadOptions, read_tile
from geoclip.data.tiles import discover_tiles
from geoclip.errors import GeoclipError
from geoclip.ioutils import atomic_path


def read_tiles(paths: list[str], band_names: list[str], size: int, read: ReadOptions | None = None) -> np.ndarray:
    """Read tiles of any input form (stacked in any band order, per-band folders, SAFE, STAC; see
    geoclip.data.product_reader.read_tile) into one ``(N, bands, size, size)`` uint16 array in ``band_names``
    order, each tile's header checked before its pixels: memory stays bounded."""
    out = np.empty((len(paths), len(band_names), size, size), np.uint16)
    for i, path in enumerate(paths):
        out[i] = read_tile(path, band_names, size, read)
    return out


def check_class_columns(probs: np.ndarray, names: list[str], model_uri: str) -> np.ndarray:
    """``probs`` when it has one column per requested class; a model logged before class lists ignores them."""
    if probs.ndim != 2 or probs.shape[1] != len(names):
        raise GeoclipError(f"{model_uri}: answered with {probs.shape[-1]} class columns for {len(names)} classes; "
                           "it predates class lists (the classes param): register a model trained with this version")
    return probs


def open_set_warnings(info: dict | None, model_uri: str) -> list[str]:
    """The warnings a served model's open-set report gives (far classes, not calibrated), each printed as one
    ``warning:`` line on stderr."""
    if info is None:
        return []
    from geoclip.model.openset import NOT_CALIBRATED

    texts = [info["warning"]] if info.get("warning") else []
    if not info.get("calibrated"):
        texts.append(f"{model_uri}: open-set scores {NOT_CALIBRATED}")
    for text in texts:
        print(f"warning: {text}", file=sys.stderr)
    return texts


def predict_tiles(source: str | Path, model_uri: str, out_csv: str | Path, batch_size: int = 256,
                  classes: dict[str, list[str]] | None = None, read: ReadOptions | None = None) -> pd.DataFrame:
    """Predict every tile of a folder or manifest; write ``id, path, predicted, confidence, prob_<Class>...,
    max_similarity, novelty, sim_<Class>... [, class]`` as CSV.

    ``sim_<Class>``: the tile embedding's cosine similarity to each class prompt; ``max_similarity`` the best of them;
    ``novelty`` its calibrated open-set score (geoclip.model.openset: ~0 as close to a class as trained tiles are to
    theirs, ~1 farther from every class than almost any trained tile; empty when the model is not calibrated). Models
    that predate them answer without these columns. A class list far from anything the model learnt is warned about
    on stderr. ``classes``: another class list as the served model's params
    (:func:`geoclip.model.vocab.served_params`); ``read``: how to read tiles whose metadata does not say everything
    (the ``score`` params).
    """
    from geoclip.registry.models import load_served_model
    from geoclip.registry.pyfunc import model_metadata, served_open_set

    tiles = discover_tiles(source)
    model = load_served_model(model_uri)
    meta = model_metadata(model)
    names = list(classes["classes"]) if classes else list(meta["class_names"])
    open_set_warnings(served_open_set(model, classes), model_uri)
    # Tiles are read in the model's input band order (its training data's); the model picks its bands itself.
    bands = list(meta.get("input_band_names", ALL_BAND_NAMES))
    size = int(meta.get("tile_size", 64))
    paths = tiles["path"].tolist()
    probs, sims, best, novelty = [], [], [], []
    for start in tqdm(range(0, len(paths), batch_size), desc="predict", unit="batch"):
        batch = read_tiles(paths[start:start + batch_size], bands, size, read)
        out = model.predict(batch, params={"batch_size": batch_size, **(classes or {})})
        probs.append(check_class_columns(np.asarray(out["probabilities"]), names, model_uri))
        if "similarities" in out:  # models that predate open-set scores answer without them
            sims.append(np.asarray(out["similarities"]))
            best.append(np.asarray(out["max_similarity"]))
            novelty.append(np.asarray(out["novelty"]))
    p = np.concatenate(probs)
    df = pd.DataFrame({"id": tiles["id"], "path": paths, "predicted": [names[i] for i in p.argmax(axis=1)],
                       "confidence": p.max(axis=1)})
    for i, name in enumerate(names):
        df[f"prob_{name}"] = p[:, i]
    if sims and len(sims) == len(probs):
        s = np.concatenate(sims)
        df["max_similarity"] = np.concatenate(best)
        df["novelty"] = np.concatenate(novelty)
        for i, name in enumerate(names):
            df[f"sim_{name}"] = s[:, i]
    if tiles["class"].notna().any():
        df["class"] = tiles["class"].to_numpy()
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False)
    return df
