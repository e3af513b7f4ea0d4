"""Few-shot adaptation: k labelled tiles per class adapt a trained model; accuracy is measured on the rest.

Two methods, both against the zero-shot baseline on the same held-back tiles:

- ``linear_probe``: logistic regression on the frozen unit image embeddings, initialised from the
  zero-shot head (class embeddings x logit scale), so with no shots or no steps it IS zero-shot.
- ``projection``: fine-tunes the image and text projections (backbone and sentence features frozen)
  with the model's own contrastive loss, then classifies zero-shot with the adapted class embeddings.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from geoclip.config import Params
from geoclip.errors import GeoclipError
from geoclip.ioutils import write_json

METHODS = ("linear_probe", "projection")
ZERO_SHOT = "zero_shot"



def read_labelled_tiles(source: str | Path, model) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Tiles ``(N, input bands, H, W)``, labels (model class indices) and ids of a labelled folder or manifest.

    Rows are ordered by (class, id), so the split below does not depend on listing or manifest order.
    """
    from geoclip.data.tiles import discover_tiles, read_tile

    tiles = discover_tiles(source)
    if tiles["class"].isna().any():
        first = tiles.loc[tiles["class"].isna(), "path"].iloc[0]
        raise GeoclipError(f"{first}: no class; few-shot needs labelled tiles (<Class>/<id>.tif or a manifest "
                           f"with a 'class' column)")
    names = list(model.cfg.class_names)
    unknown = sorted(set(tiles["class"]) - set(names))
    if unknown:
        raise GeoclipError(f"{source}: class(es) {unknown} are not among the model's classes {names}")
    tiles = tiles.assign(label=[names.index(c) for c in tiles["class"]]).sort_values(["label", "id"])
    expected = (len(model.cfg.input_band_names), model.cfg.tile_size, model.cfg.tile_size)
    images = np.empty((len(tiles), *expected), np.float32)
    for i, path in enumerate(tqdm(tiles["path"], desc="read tiles", unit="tile")):
        tile = read_tile(path)
        if tile.shape != expected:
            raise GeoclipError(f"{path}: tile shape {tile.shape}, the model expects {expected} "
                               f"(bands {list(model.cfg.input_band_names)})")
        if not np.isfinite(tile).all():
            raise GeoclipError(f"{path}: contains NaN or infinite values; expected finite digital numbers")
        images[i] = tile
    return images, tiles["label"].to_numpy(np.int64), tiles["id"].astype(str).tolist()


def split_shots(labels: np.ndarray, shots: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``shots`` tiles per class (drawn with ``seed``) and of the rest, each sorted."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):  # ascending class order: the draws do not depend on row order
        members = np.flatnonzero(labels == c)
        if len(members) <= shots:
            raise GeoclipError(f"fewshot.shots: {shots}, but a class (index {c}) has only {len(members)} tiles; "
                               f"each class needs more than the shots so that some are left to test")
        chosen.append(rng.permutation(members)[:shots])
    shot_idx = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    return shot_idx, np.setdiff1d(np.arange(len(labels)), shot_idx)


@torch.no_grad()
def backbone_features(model, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Frozen image-encoder features ``(N, F)`` (before the projection) of tiles in the input band order."""
    from geoclip.bands import band_indices

    idx = band_indices(model.cfg.band_names, tuple(model.cfg.input_band_names))
    model.eval()
    out = [model.image_features(model.normalize_input(torch.from_numpy(images[s:s + batch_size][:, idx])))
           for s in tqdm(range(0, len(images), batch_size), desc="embed tiles", unit="batch", leave=False)]
    return torch.cat(out) if out else torch.zeros(0, model.image_proj.in_features)


@torch.no_grad()
def zero_shot_logits(model, features: torch.Tensor) -> torch.Tensor:
    """Class logits ``(N, C)`` from backbone features: scaled cosine to the (ensembled) class embeddings."""
    return model.scale().detach() * F.normalize(model.image_proj(features), dim=-1) @ model.class_embeddings().T


def linear_probe(model, features: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float, seed: int):
    """Fit a zero-shot-initialised logistic regression on the frozen unit embeddings; return a logits function.

    Logits are ``s * e @ W.T + b`` with ``s`` the model's logit scale, ``W`` initialised to the class
    embeddings and ``b`` to 0: the effective weights start at class embeddings x scale (the zero-shot
    head). Keeping ``s`` outside ``W`` makes one learning rate act alike for any temperature. Full-batch
    Adam for ``epochs`` steps; no shots or no epochs leaves the zero-shot classifier unchanged.
    """
    torch.manual_seed(seed)
    with torch.no_grad():
        emb = F.normalize(model.image_proj(features), dim=-1)
        weight = model.class_embeddings().clone().requires_grad_(True)
    scale = model.scale().detach()
    bias = torch.zeros(weight.shape[0], requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr)
    for _ in tqdm(range(epochs if len(labels) else 0), desc="linear probe", unit="epoch", leave=False):
        opt.zero_grad()
        F.cross_entropy(scale * emb @ weight.T + bias, labels).backward()
        opt.step()

    @torch.no_grad()
    def logits(test_features: torch.Tensor) -> torch.Tensor:
        """Probe logits for backbone features."""
        return scale * F.normalize(model.image_proj(test_features), dim=-1) @ weight.T + bias

    return logits


def _contrastive_loss(model):
    """The model's own training loss (``cfg.loss`` in geoclip.model.loss.LOSSES) as ``fn(img_emb, cls_emb, labels)``."""
    from geoclip.model.loss import LOSSES

    fn = LOSSES[model.cfg.loss]
    return lambda img, cls, y: fn(img, cls, y, model.logit_scale, model.logit_bias)


def projection_finetune(model, features: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float, seed: int):
    """Fine-tune a copy's image and text projections on the shots (contrastive loss, full batch); return the copy."""
    torch.manual_seed(seed)
    tuned = copy.deepcopy(model).eval()  # eval: the frozen backbone is not run again, projections have no dropout
    tuned.requires_grad_(False)
    trainable = [*tuned.image_proj.parameters(), *tuned.text_proj.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    loss_fn = _contrastive_loss(tuned)
    opt = torch.optim.Adam(trainable, lr=lr)
    for _ in tqdm(range(epochs if len(labels) else 0), desc="projection fine-tune", unit="epoch", leave=False):
        opt.zero_grad()
        loss_fn(F.normalize(tuned.image_proj(features), dim=-1), tuned.class_embeddings(), labels).backward()
        opt.step()
    return tuned


def _accuracies(pred: np.ndarray, labels: np.ndarray) -> tuple[float, dict[int, float]]:
    """Overall accuracy and per-class accuracy (recall) keyed by class index."""
    per = {int(c): float((pred[labels == c] == c).mean()) for c in np.unique(labels)}
    return float((pred == labels).mean()), per


def _check(params: Params, methods: list[str]) -> None:
    """Refuse few-shot settings that cannot run, naming the field."""
    f = params.fewshot
    if f.shots < 0 or f.epochs < 0 or not f.lr > 0:
        raise GeoclipError(f"fewshot: shots {f.shots}, epochs {f.epochs}, lr {f.lr}; expected shots >= 0, "
                           f"epochs >= 0 and lr > 0")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise GeoclipError(f"fewshot.method: {bad[0]!r}; expected one of {list(METHODS)} or 'both'")


def fewshot(params: Params, tiles_source: str | Path, model, out_json: str | Path, model_name: str = "") -> dict:
    """Split labelled tiles into ``fewshot.shots`` per class and the rest; adapt the model; report accuracy on the rest.

    ``fewshot.method`` is ``linear_probe``, ``projection`` or ``both``. Writes ``out_json`` with overall and
    per-class accuracy for zero-shot and each method, and the ids of the shots and of the test tiles. ``model`` is
    a loaded GeoCLIP (see ``geoclip.registry.models.load_geoclip``); ``model_name`` says where it came from.
    """
    f = params.fewshot
    methods = list(METHODS) if f.method == "both" else [f.method]
    _check(params, methods)
    model = model.eval()
    images, labels, ids = read_labelled_tiles(tiles_source, model)
    shot_idx, test_idx = split_shots(labels, f.shots, f.seed)
    feats = backbone_features(model, images)
    x_shot, x_test = feats[shot_idx], feats[test_idx]
    y_shot, y_test = torch.from_numpy(labels[shot_idx]), labels[test_idx]
    preds = {ZERO_SHOT: zero_shot_logits(model, x_test).argmax(1).numpy()}
    if "linear_probe" in methods:
        probe = linear_probe(model, x_shot, y_shot, f.epochs, f.lr, f.seed)
        preds["linear_probe"] = probe(x_test).argmax(1).numpy()
    if "projection" in methods:
        tuned = projection_finetune(model, x_shot, y_shot, f.epochs, f.lr, f.seed)
        preds["projection"] = zero_shot_logits(tuned, x_test).argmax(1).numpy()
    names = list(model.cfg.class_names)
    present = [int(c) for c in np.unique(labels)]
    result = {"source": str(tiles_source), "model": model_name, "shots": f.shots, "seed": f.seed,
              "epochs": f.epochs, "lr": f.lr, "methods": methods, "classes": [names[c] for c in present],
              "n_shots": len(shot_idx), "n_test": len(test_idx), "accuracy": {},
              "per_class": {names[c]: {"n_test": int((y_test == c).sum())} for c in present},
              "shot_ids": {names[c]: [ids[i] for i in shot_idx if labels[i] == c] for c in present},
              "test_ids": {names[c]: [ids[i] for i in test_idx if labels[i] == c] for c in present}}
    for method, pred in preds.items():
        overall, per = _accuracies(pred, y_test)
        result["accuracy"][method] = overall
        for c, acc in per.items():
            result["per_class"][names[c]][method] = acc
    write_json(out_json, result)
    return result


def format_table(result: dict) -> str:
    """The per-class accuracy table of a few-shot result as aligned text, with the overall row last."""
    methods = list(result["accuracy"])
    rows = [{"class": name, "n_test": row["n_test"], **{m: row[m] for m in methods}}
            for name, row in result["per_class"].items()]
    rows.append({"class": "overall", "n_test": result["n_test"], **result["accuracy"]})
    header = f"{result['shots']}-shot, accuracy on the {result['n_test']} tiles left"
    return header + "\n" + pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}")
