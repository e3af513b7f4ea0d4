"""Classify single tiles with a logged model; write a CSV of classes and probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from geoclip.bands import ALL_BAND_NAMES
from geoclip.data.tiles import discover_tiles, read_tile
from geoclip.errors import GeoclipError
from geoclip.ioutils import atomic_path


def _read_batch(paths: list[str], bands: list[int], shape: tuple[int, ...]) -> np.ndarray:
    """Read tiles into one ``(N, bands, H, W)`` uint16 array, checking each tile's shape."""
    out = np.empty((len(paths), *shape), np.uint16)
    for i, path in enumerate(paths):
        tile = read_tile(path, bands)
        if tile.shape != shape:
            raise GeoclipError(f"{path}: tile shape {tile.shape}, the model expects {shape}")
        out[i] = tile
    return out


def predict_tiles(source: str | Path, model_uri: str, out_csv: str | Path, batch_size: int = 256) -> pd.DataFrame:
    """Predict every tile of a folder or manifest; write ``path, predicted, prob_<Class>... [, class]`` as CSV."""
    from geoclip.registry.models import load_served_model
    from geoclip.registry.pyfunc import model_metadata

    tiles = discover_tiles(source)
    model = load_served_model(model_uri)
    meta = model_metadata(model)
    names = list(meta["class_names"])
    # Files come in the model's input band order (its training data's); the model picks its bands itself.
    bands = list(range(len(meta.get("input_band_names", ALL_BAND_NAMES))))
    size = int(meta.get("tile_size", 64))
    paths = tiles["path"].tolist()
    probs = []
    for start in tqdm(range(0, len(paths), batch_size), desc="predict", unit="batch"):
        batch = _read_batch(paths[start:start + batch_size], bands, (len(bands), size, size))
        probs.append(np.asarray(model.predict(batch, params={"batch_size": batch_size})["probabilities"]))
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
