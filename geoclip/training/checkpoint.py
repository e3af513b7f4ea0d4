"""Resumable training checkpoints: one atomic ``checkpoint.pt`` with weights, optimiser, position and RNG states.

Everything in it is a tensor, dict, list, number, string or None, so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from geoclip.config import Params
from geoclip.errors import GeoclipError
from geoclip.ioutils import atomic_path

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1
# Settings a resumed run may change: they do not alter the sequence of weights (threads only change speed).
RESUMABLE_CHANGES = {"train.checkpoint_every", "train.num_threads", "train.patience", "train.nproc_per_node",
                     "train.nnodes", "train.max_restarts", "train.join_timeout", "train.dask_address", "train.compile"}


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    """This process's random states (Python, NumPy, torch CPU, CUDA if present, the named generators) as tensors."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device: one per rank
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    """Restore what :func:`rng_state` captured (a CPU checkpoint resumed on a GPU leaves the CUDA state alone)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["mt"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])


def _flatten(prefix: str, value, out: dict[str, str]) -> None:
    """Flatten nested dicts into ``a.b.c`` keys with JSON-encoded values."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(value, sort_keys=True)


def data_identity(prepared_dir: str | Path) -> str:
    """A cheap identity of the packs: stats.json and index.csv (which holds per-tile content hashes) plus pack sizes."""
    root = Path(prepared_dir)
    h = hashlib.md5(usedforsecurity=False)
    for name in ("stats.json", "index.csv"):
        if (root / name).is_file():
            h.update(name.encode() + (root / name).read_bytes())
    for split in ("train", "val"):
        for kind in ("images", "labels"):
            path = root / f"{split}_{kind}.npy"
            h.update(f"{path.name}:{path.stat().st_size if path.exists() else -1}".encode())
    return h.hexdigest()


def fingerprint(params: Params, world_size: int) -> dict[str, str]:
    """What a checkpoint must share with the run resuming it: train/bands/classes params, world size, the packs."""
    p = asdict(params)
    flat: dict[str, str] = {}
    for section in ("train", "classes", "bands"):
        _flatten(section, p[section], flat)
    flat = {k: v for k, v in flat.items() if k not in RESUMABLE_CHANGES}
    flat["world_size"] = str(world_size)
    flat["data"] = data_identity(params.paths.prepared)
    return flat


def check_fingerprint(path: Path, saved: dict[str, str], current: dict[str, str]) -> None:
    """Raise a GeoclipError naming the checkpoint and the first differing settings if they do not match."""
    keys = sorted(set(saved) | set(current))
    diff = [f"{k}: {saved.get(k, '<unset>')} in the checkpoint, {current.get(k, '<unset>')} now"
            for k in keys if saved.get(k) != current.get(k)]
    if diff:
        shown = "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
        raise GeoclipError(f"{path}: checkpoint was made with other settings ({shown}); "
                           "delete it or train without --resume")


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (a kill mid-write leaves the previous checkpoint intact)."""
    need = sum(t.numel() * t.element_size() for t in _tensors(state))
    with atomic_path(path, "the training checkpoint", need) as tmp, open(tmp, "wb") as f:  # a file object: same
        torch.save({"format": FORMAT_VERSION, **state}, f)  # state, same bytes (see save_model)


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor in a nest of dicts, lists and tuples (what a checkpoint's size is made of)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete temporary files a killed writer left beside ``path`` (``.checkpoint.pt.*.tmp``); return them."""
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint with ``weights_only=True`` onto the CPU; a damaged or foreign file is a GeoclipError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # truncated (RuntimeError, EOFError), not a torch file or holding objects that are not plain data (Unpickling)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        raise GeoclipError(f"{path}: not a readable checkpoint ({type(exc).__name__}); delete it to start "
                           "afresh") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise GeoclipError(f"{path}: not a geoclip checkpoint of format {FORMAT_VERSION}; delete it to start afresh")
    return state
