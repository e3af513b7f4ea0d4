"""Classes never trained on: leave-one-class-out over the ten classes, the same short recipe for each.

For each class: train on synthetic tiles of the other nine (``train.holdout_class``; the pipeline's own prepare,
train and evaluate), then classify the test tiles over all ten class prompts. Prints per held-out class the unseen
top-1 (its test tiles called by its own name), the seen top-1 (the other nine) and what the unseen class was called
instead, plus the means; and the same recipe trained on all ten classes for the seen-class reference.

    python bench/unseen_classes.py --epochs 4 --synthetic-per-class 100      # about 3 min a run on 2 CPU cores
    python bench/unseen_classes.py --classes SeaLake,Forest
    python bench/unseen_classes.py --descriptions bench/attribute_descriptions.yaml --caption-weight 0.5
    python bench/unseen_classes.py --pretrained efficientnet_lite0/imagenet --work bench/results/unseen_prior
    python bench/unseen_classes.py --pretrained efficientnet_lite0/imagenet --concepts none   # the ten only

Training also learns the land-cover concepts of params.yaml's ``classes.concepts`` (synthetic, ``--per-concept``
tiles each), less any whose name or wording names the held-out class (geoclip.training.leave_out). With real
EuroSAT_MS tiles at hand (``--real``, default ../shared/data's), the model of each held-out class also classifies
every real tile of that class among the ten prompts: none of them was trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from datetime import date
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from geoclip.bands import EUROSAT_CLASSES
from geoclip.config import Params, load_params, params_from_dict

DEFAULT_REAL = [REPO.parent / "shared/data/eurosat_ms_dev", REPO.parent / "shared/data/eurosat_ms_train"]


def run(params: Params, work: Path, holdout: str, real_tiles: pd.DataFrame | None = None) -> dict:
    """prepare -> train -> evaluate with ``holdout`` left out of training ('' for all classes)."""
    from geoclip.data.prepare import prepare
    from geoclip.training.evaluate import evaluate
    from geoclip.training.train import train

    paths = replace(params.paths, prepared=str(work / "prepared"), reports=str(work / "reports"),
                    model=str(work / "model"), eval=str(work / "eval"))
    p = replace(params, paths=paths, train=replace(params.train, holdout_class=holdout))
    shared = work.parent / "feature_cache"  # one frozen-encoder cache for every run: the tiles recur
    shared.mkdir(parents=True, exist_ok=True)
    if not (work / "feature_cache").exists():
        work.mkdir(parents=True, exist_ok=True)
        (work / "feature_cache").symlink_to(shared.resolve())
    prepare(p)
    train(p)
    metrics = evaluate(p)
    real = real_unseen(p, holdout, real_tiles) if holdout and real_tiles is not None else {}
    confusion = pd.read_csv(work / "eval" / "confusion.csv")
    row = {"holdout": holdout or None, "test_top1": metrics["test_top1"]}
    if holdout:
        called = confusion.loc[confusion["actual"] == holdout, "predicted"].value_counts(normalize=True)
        row |= {"unseen_top1": metrics["holdout_top1"], "seen_top1": metrics.get("seen_top1"),
                "called": {k: round(float(v), 3) for k, v in called.items()}, **real}
    return row


def real_unseen(params: Params, holdout: str, real_tiles: pd.DataFrame) -> dict:
    """The trained model on every real tile of the held-out class: share called by its name, and what instead."""
    import numpy as np

    from geoclip.bands import band_indices
    from geoclip.data.tiles import read_tile
    from geoclip.model.clip import load_model, predict_batches

    mine = real_tiles[real_tiles["class"] == holdout]
    if mine.empty:
        return {}
    model = load_model(params.paths.model)
    images = np.stack([read_tile(p) for p in mine["path"]])
    idx = band_indices(model.cfg.band_names, tuple(model.cfg.input_band_names))
    probs, _ = predict_batches(model, images, 128, band_idx=idx, tta=params.evaluate.tta)
    pred = np.array(model.cfg.class_names)[probs.argmax(1)]
    called = pd.Series(pred).value_counts(normalize=True)
    return {"real_unseen_top1": float((pred == holdout).mean()), "real_tiles": len(mine),
            "real_called": {k: round(float(v), 3) for k, v in called.items()}}


def main() -> None:
    """Run the leave-one-out runs asked for; print the table; write bench/results/unseen_classes_<date>.json."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--classes", default=",".join(EUROSAT_CLASSES), help="comma-separated classes to hold out")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--synthetic-per-class", type=int, default=100)
    ap.add_argument("--caption-weight", type=float, default=None,
                    help="train.caption_weight for every run (default: params.yaml's)")
    ap.add_argument("--text-projection", choices=("mlp", "linear"), default=None,
                    help="train.text_projection for every run (default: params.yaml's)")
    ap.add_argument("--descriptions", type=Path, default=None,
                    help="a YAML file whose 'descriptions' replace classes.descriptions (e.g. "
                         "bench/attribute_descriptions.yaml)")
    ap.add_argument("--pretrained", default="",
                    help="train with this pretrained prior, encoder frozen (e.g. efficientnet_lite0/imagenet)")
    ap.add_argument("--concepts", default="params",
                    help="'params' (params.yaml's classes.concepts), 'none', or a comma-separated list")
    ap.add_argument("--per-concept", type=int, default=30, help="synthetic tiles per concept")
    ap.add_argument("--real", nargs="*", type=Path, default=DEFAULT_REAL,
                    help="real EuroSAT_MS folders whose tiles of the held-out class are classified too")
    ap.add_argument("--train-real", action="store_true",
                    help="train on the --real tiles too (all but the held-out class's), beside the synthetic ones")
    ap.add_argument("--no-reference", action="store_true", help="skip the run trained on all ten classes")
    ap.add_argument("--work", type=Path, default=Path("bench/results/unseen_classes"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"unseen_classes_{date.today()}.json")
    args = ap.parse_args()
    data = asdict(load_params(args.params))
    data["synth"] |= {"n_scenes": 0, "tiles_per_class": args.synthetic_per_class}
    data["train"] |= {"epochs": args.epochs, "nproc_per_node": 1}
    if args.caption_weight is not None:
        data["train"]["caption_weight"] = args.caption_weight
    if args.text_projection is not None:
        data["train"]["text_projection"] = args.text_projection
    if args.descriptions is not None:
        data["classes"]["descriptions"] = yaml.safe_load(args.descriptions.read_text())["descriptions"]
    # Synthetic tiles only: "auto" would train without a prior; --pretrained names one, frozen (its features cached).
    data["train"] |= {"pretrained": args.pretrained, "freeze_image": "all"}
    folders = [f for f in args.real if f.exists()]
    # --train-real: the real tiles train too (the held-out class's never: train.holdout_class drops its tiles).
    data["ingest"]["source"] = ["synthetic", *map(str, folders)] if args.train_real and folders else "synthetic"
    data["classes"]["names"] = list(EUROSAT_CLASSES)
    if args.concepts != "params":
        data["classes"]["concepts"] = [] if args.concepts == "none" else [c.strip() for c in args.concepts.split(",")]
    data["synth"]["tiles_per_concept"] = args.per_concept
    data["paths"] |= {"raw": str(args.work / "raw"), "synthetic": str(args.work / "synthetic")}
    params = params_from_dict(data)
    labels = args.work / "raw" / "labels.csv"
    old = pd.read_csv(labels) if labels.exists() else pd.DataFrame()
    from geoclip.data.tiles import discover_tiles

    real_tiles = pd.concat([discover_tiles(f) for f in folders]) if folders else None
    wanted = 10 * args.synthetic_per_class + len(params.classes.concepts) * args.per_concept
    wanted += len(real_tiles) if args.train_real and real_tiles is not None else 0
    fresh = "caption" in old.columns and len(old) == wanted and set(params.classes.concepts) <= set(old["class"])
    if not fresh:  # made by this recipe and with captions, else made again
        from geoclip.data.ingest import ingest

        ingest(params)
    real_tiles = pd.concat([discover_tiles(f) for f in folders]) if folders else None
    rows = []
    reference = [] if args.no_reference else [""]
    for holdout in [*reference, *[c.strip() for c in args.classes.split(",") if c.strip()]]:
        row = run(params, args.work / (holdout or "all"), holdout, real_tiles)
        rows.append(row)
        if holdout:
            top = ", ".join(f"{k} {v:.0%}" for k, v in list(row["called"].items())[:3])
            real = (f"  real {row['real_unseen_top1']:6.1%} of {row['real_tiles']}" if "real_unseen_top1" in row
                    else "")
            print(f"{holdout:>21}: unseen {row['unseen_top1']:6.1%}  seen {row['seen_top1']:6.1%}{real}  called {top}",
                  flush=True)
        else:
            print(f"{'(all ten trained)':>21}: test top-1 {row['test_top1']:6.1%}", flush=True)
    unseen = [r for r in rows if r["holdout"]]
    mean = {"unseen_top1": sum(r["unseen_top1"] for r in unseen) / max(1, len(unseen)),
            "seen_top1": sum(r["seen_top1"] for r in unseen) / max(1, len(unseen))}
    with_real = [r["real_unseen_top1"] for r in unseen if "real_unseen_top1" in r]
    if with_real:
        mean["real_unseen_top1"] = sum(with_real) / len(with_real)
    ref = f"(all-ten reference {rows[0]['test_top1']:.1%})" if reference else ""
    print(f"{'mean':>21}: unseen {mean['unseen_top1']:6.1%}  seen {mean['seen_top1']:6.1%}  {ref}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": str(date.today()), "epochs": args.epochs,
                                    "caption_weight": params.train.caption_weight,
                                    "text_projection": params.train.text_projection,
                                    "pretrained": params.train.pretrained,
                                    "descriptions": params.classes.descriptions,
                                    "synthetic_per_class": args.synthetic_per_class,
                                    "concepts": list(params.classes.concepts), "per_concept": args.per_concept,
                                    "train_real": args.train_real, "sources": params.ingest.sources(),
                                    "mean": mean, "rows": rows},
                                   indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
