"""Evaluate the trained model on the test split: accuracy, macro-F1, confusion, retrieval, calibration, baselines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from geoclip.config import Params
from geoclip.errors import GeoclipError
from geoclip.ioutils import atomic_path, write_json
from geoclip.model.clip import predict_batches
from geoclip.plots import pyplot, save_png

METRICS_FILE = "metrics.json"
PER_CLASS_FILE = "per_class.json"  # kept apart so `dvc metrics show` stays one line of scalars
CONFUSION_CSV = "confusion.csv"
CONFUSION_PNG = "confusion.png"
CALIBRATION_CSV = "calibration.csv"  # reliability-diagram data (a DVC plot: x=confidence, y=accuracy)
CALIBRATION_PNG = "calibration.png"
RETRIEVAL_KS = (1, 5, 10)
#: What evaluate writes into ``paths.eval``.
OUTPUT_FILES = (METRICS_FILE, PER_CLASS_FILE, CONFUSION_CSV, CONFUSION_PNG, CALIBRATION_CSV, CALIBRATION_PNG)


def predict_probs(model, images: np.ndarray, batch_size: int, device: torch.device | str = "cpu",
                  desc: str | None = None, tta: bool = False) -> np.ndarray:
    """Class probabilities ``(N, C)`` for raw tiles ``(N, B, H, W)``, in batches (eval mode, bf16 on CUDA)."""
    progress = (lambda it: tqdm(it, desc=desc, unit="batch")) if desc else None
    return predict_batches(model, images, batch_size, device, progress=progress, tta=tta)[0]


def topk_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose true label is among the ``k`` most probable classes."""
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def per_class_scores(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> tuple[dict, float]:
    """Per-class precision/recall and the macro-F1 over all classes (0 where undefined)."""
    per_class, f1s = {}, []
    for c, name in enumerate(class_names):
        tp = int(((y_pred == c) & (y_true == c)).sum())
        predicted, actual = int((y_pred == c).sum()), int((y_true == c).sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        per_class[name] = {"precision": precision, "recall": recall}
    return per_class, float(np.mean(f1s))


def retrieval_scores(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray,
                     ks: tuple[int, ...] = RETRIEVAL_KS) -> dict[str, float]:
    """Text-to-tile retrieval: each class embedding queries the test tiles, ranked by cosine similarity.

    Every class with at least one test tile is one query; its relevant items are ALL tiles of that
    class (many per query, unlike caption retrieval's one image per caption). Averaged over queries:

    - ``retrieval_precision_at_k``: share of the top-``k`` tiles that are of the query's class — how
      clean a "show me k tiles of <class>" answer is; the informative figure here.
    - ``retrieval_hit_at_k``: 1 when at least one of the top-``k`` is of the class. This is exactly the
      "text-to-image recall@k" of CLIP/COCO benchmarks (share of queries whose relevant item is in the
      top k), generalised to several relevant items; with few classes and many tiles it saturates fast.
    - ``retrieval_map``: mean average precision over the whole ranking (uses every relevant tile).

    The literal recall ``|relevant in top k| / |relevant|`` is not reported: with hundreds of tiles per
    class it is bounded by ``k / n_class`` and says little. ``k`` larger than the tile count is cut to it.
    """
    labels = np.asarray(labels)
    sims = np.asarray(image_emb, np.float64) @ np.asarray(class_emb, np.float64).T  # (N, C)
    queries = [c for c in range(sims.shape[1]) if (labels == c).any()]
    if not queries:
        raise ValueError("retrieval needs at least one tile with a label")
    precision = {k: [] for k in ks}
    hit = {k: [] for k in ks}
    aps = []
    for c in queries:
        relevant = labels[np.argsort(-sims[:, c], kind="stable")] == c
        for k in ks:
            top = relevant[:min(k, len(relevant))]
            precision[k].append(top.mean())
            hit[k].append(float(top.any()))
        ranks = np.flatnonzero(relevant) + 1
        aps.append(float(np.mean(np.arange(1, len(ranks) + 1) / ranks)))
    out = {f"retrieval_precision_at_{k}": float(np.mean(precision[k])) for k in ks}
    out.update({f"retrieval_hit_at_{k}": float(np.mean(hit[k])) for k in ks})
    out["retrieval_map"] = float(np.mean(aps))
    return out


def calibration_table(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> pd.DataFrame:
    """Reliability-diagram data: per equal-width confidence bin, its bounds, count, mean confidence and accuracy.

    Confidence is the top class probability; bins are ``(lower, upper]`` (the first also takes 0).
    Empty bins have count 0 and NaN confidence/accuracy.
    """
    conf = probs.max(axis=1).astype(np.float64)
    correct = (probs.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(idx, weights=correct, minlength=n_bins) / count
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return pd.DataFrame({"bin": np.arange(n_bins), "lower": edges[:-1], "upper": edges[1:], "count": count,
                         "confidence": mean_conf, "accuracy": accuracy})


def expected_calibration_error(table: pd.DataFrame) -> float:
    """ECE: the count-weighted mean gap ``|accuracy - confidence|`` over the non-empty bins of ``table``."""
    full = table[table["count"] > 0]
    if full.empty:
        raise ValueError("calibration needs at least one prediction")
    return float((full["count"] * (full["accuracy"] - full["confidence"]).abs()).sum() / full["count"].sum())




def origin_scores(y_true: np.ndarray, y_pred: np.ndarray, origin: np.ndarray, val_true: np.ndarray,
                  val_pred: np.ndarray, val_origin: np.ndarray, class_names: list[str]) -> dict:
    """Test and val scores of the synthetic and the real tiles apart: ``{origin}_test_top1``, ``_test_macro_f1``,
    ``_test_n`` and ``_val_top1`` for each origin present, and per-class precision/recall per origin."""
    scalars, per_class = {}, {}
    for name in ("synthetic", "real"):
        test, val = origin == name, val_origin == name
        if not test.any():
            continue
        per_class[name], macro_f1 = per_class_scores(y_true[test], y_pred[test], class_names)
        scalars |= {f"{name}_test_top1": float((y_true[test] == y_pred[test]).mean()),
                    f"{name}_test_macro_f1": macro_f1, f"{name}_test_n": int(test.sum())}
        if val.any():
            scalars[f"{name}_val_top1"] = float((val_true[val] == val_pred[val]).mean())
    return {"scalars": scalars, "per_class": per_class}


def _matrix(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    """Counts of (actual, predicted) pairs."""
    matrix = np.zeros((n, n), dtype=int)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def write_confusion(directory: Path, y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str],
                    origin: np.ndarray | None = None) -> None:
    """Write ``confusion.csv`` (actual, predicted and, when known, synthetic/real origin per test tile) and a
    ``confusion.png`` matrix (a second panel for the real tiles when the test split has both), atomically."""
    plt = pyplot()
    names = np.asarray(class_names)
    table = pd.DataFrame({"actual": names[y_true], "predicted": names[y_pred]})
    if origin is not None:
        table["origin"] = origin
    with atomic_path(directory / CONFUSION_CSV) as tmp:
        table.to_csv(tmp, index=False)
    n = len(class_names)
    panels = [("Test confusion matrix", _matrix(y_true, y_pred, n))]
    if origin is not None and len(set(origin)) > 1:
        real = origin == "real"
        panels = [("All test tiles", panels[0][1]), (f"Real test tiles ({int(real.sum())})",
                                                     _matrix(y_true[real], y_pred[real], n))]
    fig, axes = plt.subplots(1, len(panels), figsize=((1.0 + 0.6 * n) * len(panels), 0.8 + 0.6 * n), squeeze=False)
    for ax, (title, matrix) in zip(axes[0], panels):
        ax.imshow(matrix, cmap="Blues")
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                    color="white" if v > matrix.max() / 2 else "black")
        ax.set_xticks(range(n), class_names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), class_names, fontsize=8)
        ax.set(xlabel="predicted", ylabel="actual", title=title)
    fig.tight_layout()
    save_png(fig, directory / CONFUSION_PNG)


def write_calibration(directory: Path, table: pd.DataFrame, ece: float) -> None:
    """Write ``calibration.csv`` (non-empty bins) and a reliability diagram ``calibration.png``, atomically."""
    plt = pyplot()
    full = table[table["count"] > 0]
    with atomic_path(directory / CALIBRATION_CSV) as tmp:
        full.to_csv(tmp, index=False)
    width = float(table["upper"].iloc[0] - table["lower"].iloc[0])
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True, height_ratios=[3, 1])
    ax.bar(full["lower"], full["accuracy"], width=width, align="edge", edgecolor="black", label="accuracy")
    ax.bar(full["lower"], full["confidence"] - full["accuracy"], bottom=full["accuracy"], width=width,
           align="edge", color="tab:red", alpha=0.3, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set(ylim=(0, 1), ylabel="accuracy", title=f"Test reliability diagram (ECE {ece:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    hist.bar(table["lower"], table["count"], width=width, align="edge", color="grey")
    hist.set(xlim=(0, 1), xlabel="confidence (top class probability)", ylabel="tiles")
    fig.tight_layout()
    save_png(fig, directory / CALIBRATION_PNG)


def holdout_scores(probs: np.ndarray, labels: np.ndarray, class_names: list[str], holdout: str) -> dict[str, float]:
    """Unseen-class figures: ``holdout_top1`` on the held-out class's tiles (over ALL classes), ``seen_top1`` else."""
    if holdout not in class_names:
        raise GeoclipError(f"train.holdout_class: {holdout!r} is not among the model's classes {class_names}")
    labels = np.asarray(labels)
    mine = labels == class_names.index(holdout)
    if not mine.any():
        raise GeoclipError(f"train.holdout_class: no test tiles of {holdout!r}; the unseen class needs test tiles")
    pred = probs.argmax(axis=1)
    out = {"holdout_top1": float((pred[mine] == labels[mine]).mean())}
    if (~mine).any():  # JSON has no NaN: leave the key out when every test tile is of the held-out class
        out["seen_top1"] = float((pred[~mine] == labels[~mine]).mean())
    return out



def check_inputs(params: Params) -> None:
    """Fail early, before anything is written: the trained model exists and the params make sense."""
    model_dir = Path(params.paths.model)
    if not (model_dir / "model.pt").exists():
        raise GeoclipError(f"{model_dir / 'model.pt'}: not found; run `geoclip train` first")
    if params.evaluate.ece_bins < 1:
        raise GeoclipError(f"evaluate.ece_bins: {params.evaluate.ece_bins}; expected a whole number >= 1")


def evaluate(params: Params) -> dict:
    """Score the saved model on test and val; write metrics, confusion and calibration files (:data:`OUTPUT_FILES`).

    With ``train.holdout_class`` set (the class the model never trained on), also the zero-shot accuracy
    on that class's test tiles, classified over all classes from its name and description alone. Returns the
    scalar metrics and ``per_class``; the evaluate stage logs them to the training's MLflow run.
    """
    from geoclip.data.baselines import nearest_centroid_accuracy
    from geoclip.data.prepare import load_split, split_origins
    from geoclip.model.clip import load_model

    check_inputs(params)
    model_dir = Path(params.paths.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_dir).to(device)
    names = list(model.cfg.class_names)
    train, val, test = (load_split(params.paths.prepared, s) for s in ("train", "val", "test"))
    if list(test.class_names) != names:
        raise GeoclipError(f"{params.paths.prepared}/stats.json: classes {test.class_names} differ from the "
                           f"model's {names}; retrain or re-prepare")
    bs, tta = params.evaluate.batch_size, params.evaluate.tta
    test_probs, test_emb = predict_batches(model, test.images, bs, device, tta=tta,
                                           progress=lambda it: tqdm(it, desc="predict test", unit="batch"))
    val_probs = predict_probs(model, val.images, bs, device, desc="predict val", tta=tta)
    with torch.no_grad():
        class_emb = model.class_embeddings().float().cpu().numpy()
    y_true, y_pred = np.asarray(test.labels), test_probs.argmax(axis=1)
    per_class, macro_f1 = per_class_scores(y_true, y_pred, names)
    calibration = calibration_table(test_probs, y_true, params.evaluate.ece_bins)
    scalars = {
        "test_top1": topk_accuracy(test_probs, y_true, 1),
        "test_top5": topk_accuracy(test_probs, y_true, 5),
        "test_macro_f1": macro_f1,
        "test_ece": expected_calibration_error(calibration),
        "val_top1": topk_accuracy(val_probs, np.asarray(val.labels), 1),
        "nearest_centroid_top1": float(nearest_centroid_accuracy(train.images, train.labels,
                                                                 test.images, test.labels)),
        **retrieval_scores(test_emb, class_emb, y_true),
    }
    test_origin = split_origins(params.paths.prepared, "test")
    val_origin = split_origins(params.paths.prepared, "val")
    if test_origin is not None and val_origin is not None:
        by_origin = origin_scores(y_true, y_pred, test_origin, np.asarray(val.labels), val_probs.argmax(axis=1),
                                  val_origin, names)
        scalars.update(by_origin["scalars"])
        per_class = {c: {**v, **{f"{o}_{k}": x for o, table in by_origin["per_class"].items()
                                  for k, x in table[c].items()}} for c, v in per_class.items()}
    holdout = params.train.holdout_class
    if holdout:
        scalars.update(holdout_scores(test_probs, y_true, names, holdout))
    out = Path(params.paths.eval)
    out.mkdir(parents=True, exist_ok=True)
    write_confusion(out, y_true, y_pred, names, test_origin)
    write_calibration(out, calibration, scalars["test_ece"])
    write_json(out / METRICS_FILE, scalars)
    write_json(out / PER_CLASS_FILE, per_class)
    return {**scalars, "per_class": per_class}
