"""Classify single tiles with a logged model; write a CSV of classes and probabilities."""

from __future__ import annotations

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


def predict_tiles(source: str | Path, model_uri: str, out_csv: str | Path, batch_size: int = 256,
                  classes: dict[str, list[str]] | None = None, read: ReadOptions | None = None) -> pd.DataFrame:
    """Predict every tile of a folder or manifest; write ``path, predicted, prob_<Class>... [, class]`` as CSV.

    ``classes``: another class list as the served model's params (:func:`geoclip.model.vocab.served_params`);
    ``read``: how to read tiles whose metadata does not say everything (the ``score`` params).
    """
    from geoclip.registry.models import load_served_model
    from geoclip.registry.pyfunc import model_metadata

    tiles = discover_tiles(source)
    model = load_served_model(model_uri)
    meta = model_metadata(model)
    names = list(classes["classes"]) if classes else list(meta["class_names"])
    # Tiles are read in the model's input band order (its training data's); the model picks its bands itself.
    bands = list(meta.get("input_band_names", ALL_BAND_NAMES))
    size = int(meta.get("tile_size", 64))
    paths = tiles["path"].tolist()
    probs = []
    for start in tqdm(range(0, len(paths), batch_size), desc="predict", unit="batch"):
        batch = read_tiles(paths[start:start + batch_size], bands, size, read)
        out = np.asarray(model.predict(batch, params={"batch_size": batch_size, **(classes or {})})["probabilities"])
        probs.append(check_class_columns(out, names, model_uri))
    p = np.concatenate(probs)
    df = pd.DataFrame({"id": tiles["id"], "path": paths, "predicted": [names[i] for i in p.argmax(axis=1)],
                       "confidence": p.max(axis=1)})
    for i, name in enumerate(names):
        df[f"prob_{name}"] = p[:, i]
    if tiles["class"].notna().any():
        df["class"] = tiles["class"].to_numpy()
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False)
    return df
