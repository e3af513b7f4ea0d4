"""Evaluate the trained model on the test split: accuracy, macro-F1, confusion, colour-only baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from geoclip.config import Params
from geoclip.errors import GeoclipError
from geoclip.ioutils import atomic_path, write_json
from geoclip.model import predict_batches

METRICS_FILE = "metrics.json"
PER_CLASS_FILE = "per_class.json"  # kept apart so `dvc metrics show` stays one line of scalars
CONFUSION_CSV = "confusion.csv"
CONFUSION_PNG = "confusion.png"


def predict_probs(model, images: np.ndarray, batch_size: int, device: torch.device | str = "cpu",
                  desc: str | None = None) -> np.ndarray:
    """Class probabilities ``(N, C)`` for raw tiles ``(N, B, H, W)``, in batches (eval mode, bf16 on CUDA)."""
    progress = (lambda it: tqdm(it, desc=desc, unit="batch")) if desc else None
    return predict_batches(model, images, batch_size, device, progress=progress)[0]


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


def write_confusion(directory: Path, y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> None:
    """Write ``confusion.csv`` (actual,predicted per test tile) and a ``confusion.png`` matrix, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = np.asarray(class_names)
    with atomic_path(directory / CONFUSION_CSV) as tmp:
        pd.DataFrame({"actual": names[y_true], "predicted": names[y_pred]}).to_csv(tmp, index=False)
    n = len(class_names)
    matrix = np.zeros((n, n), dtype=int)
    np.add.at(matrix, (y_true, y_pred), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                color="white" if v > matrix.max() / 2 else "black")
    ax.set_xticks(range(n), class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="actual", title="Test confusion matrix")
    fig.tight_layout()
    with atomic_path(directory / CONFUSION_PNG) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _log_to_run(run_id: str, scalars: dict, files: list[Path]) -> None:
    """Add the scalar metrics and files to the training run (MLflow already configured)."""
    import mlflow

    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(scalars)
        for path in files:
            mlflow.log_artifact(str(path), artifact_path="eval")


def evaluate(params: Params) -> dict:
    """Score the saved model on test and val; write metrics.json and confusion files; log them to MLflow."""
    from geoclip.baselines import nearest_centroid_accuracy
    from geoclip.model import load_model
    from geoclip.prepare import load_split
    from geoclip.tracking import read_run_info

    model_dir = Path(params.paths.model)
    if not (model_dir / "model.pt").exists():
        raise GeoclipError(f"{model_dir / 'model.pt'}: not found; run `geoclip train` first")
    run_id = read_run_info(params)["run_id"]  # fail before writing anything
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_dir).to(device)
    train, val, test = (load_split(params.paths.prepared, s) for s in ("train", "val", "test"))
    if list(test.class_names) != list(model.cfg.class_names):
        raise GeoclipError(f"{params.paths.prepared}/stats.json: classes {test.class_names} differ from the "
                           f"model's {model.cfg.class_names}; retrain or re-prepare")
    bs = params.evaluate.batch_size
    test_probs = predict_probs(model, test.images, bs, device, desc="predict test")
    val_probs = predict_probs(model, val.images, bs, device, desc="predict val")
    y_true, y_pred = np.asarray(test.labels), test_probs.argmax(axis=1)
    per_class, macro_f1 = per_class_scores(y_true, y_pred, model.cfg.class_names)
    scalars = {
        "test_top1": topk_accuracy(test_probs, y_true, 1),
        "test_top5": topk_accuracy(test_probs, y_true, 5),
        "test_macro_f1": macro_f1,
        "val_top1": topk_accuracy(val_probs, np.asarray(val.labels), 1),
        "nearest_centroid_top1": float(nearest_centroid_accuracy(train.images, train.labels,
                                                                 test.images, test.labels)),
    }
    out = Path(params.paths.eval)
    out.mkdir(parents=True, exist_ok=True)
    write_confusion(out, y_true, y_pred, model.cfg.class_names)
    write_json(out / METRICS_FILE, scalars)
    write_json(out / PER_CLASS_FILE, per_class)
    _log_to_run(run_id, scalars, [out / METRICS_FILE, out / PER_CLASS_FILE, out / CONFUSION_CSV, out / CONFUSION_PNG])
    return {**scalars, "per_class": per_class}
