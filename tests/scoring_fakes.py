"""A stand-in scoring model for exactly-once tests: light to import (no torch, no MLflow), counts its loads."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from geoclip.bands import ALL_BAND_NAMES, EUROSAT_CLASSES


class FakeModel:
    """A pyfunc look-alike: band 0 encodes the class (1000 * (class + 1)); ``crash`` kills the process mid-scene."""

    metadata = SimpleNamespace(metadata={"class_names": list(EUROSAT_CLASSES),
                                         "input_band_names": list(ALL_BAND_NAMES)})

    def __init__(self, scene: str, crash: bool = False):
        self.scene, self.crash = scene, crash

    def predict(self, x: np.ndarray, params: dict | None = None) -> dict:
        """Class probabilities from band 0 (a hard exit instead when this is the scene to crash on)."""
        if self.crash:
            os._exit(3)  # killed mid-scene: no cleanup, no release, no done record
        cls = x[:, 0].astype(np.int64) // 1000 - 1
        probs = np.stack([(cls == c).mean(axis=(1, 2)) for c in range(len(EUROSAT_CLASSES))], axis=1) + 1e-6
        return {"probabilities": probs / probs.sum(axis=1, keepdims=True)}


def counting_loader(counters: Path, scene: str, crash_on: str = ""):
    """A model loader for ``scene`` that first appends this process's PID to ``{counters}/{stem}.count``."""
    def load() -> FakeModel:
        counters.mkdir(parents=True, exist_ok=True)
        with open(counters / f"{Path(scene).stem}.count", "a") as f:
            f.write(f"{os.getpid()}\n")
        return FakeModel(scene, crash=Path(scene).stem == crash_on)
    return load
