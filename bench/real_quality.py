"""Model quality on real Sentinel-2 tiles: one table from one run, 5-fold stratified cross-validation (seeded).

Rows, each scored on the same real test folds (mean and spread over folds):
  (a) geoclip trained on synthetic tiles only, zero-shot on the real tiles
  (b) geoclip trained on synthetic tiles plus the real training folds (``train.real_share`` of every batch)
  (c) the same architecture trained from scratch on the real training folds only (as many steps as (b))
  (d) logistic regression on per-band mean and standard deviation (26 numbers a tile)
  (e) logistic regression on spectral indices (NDVI, NDWI, NDBI: mean, std, 10th and 90th percentiles)
  (f) logistic regression on the pretrained prior's frozen features (bench/prior_baselines.py); (f+d) with (d)'s
  (g) geoclip with the prior (train.pretrained, encoder frozen), synthetic tiles only, zero-shot
  (h) geoclip with the prior, synthetic tiles plus the real training folds
  (i) the prior fine-tuned as a plain classifier on the real training folds (the reference geoclip must not lose to)
and per-class recall for (b) and (h). Rows (a)-(c) train without a prior (train.pretrained ""), (g)-(h) with
PRIOR (and the recipe's other keys), whatever params.yaml says. Each geoclip row runs the pipeline's own steps (synth, prepare from a labels.csv
with the fold's splits, train, evaluate); its validation tiles come from the training folds, never the test fold.

    python bench/real_quality.py                       # the real tiles in ../shared/data, the full recipe
    python bench/real_quality.py --folds 0 --epochs 4  # a quick look at one fold
    python bench/real_quality.py --rows dfghi           # the prior's rows beside the baseline
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # geoclip from this checkout, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))  # prior_baselines beside this file

import numpy as np
import pandas as pd
import yaml

from geoclip.bands import ALL_BAND_NAMES, EUROSAT_CLASSES
from geoclip.config import Params, load_params, params_from_dict
from geoclip.data.tiles import discover_tiles, read_tile
from geoclip.errors import GeoclipError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REAL = [REPO.parent / "shared" / "data" / name for name in ("eurosat_ms_dev", "eurosat_ms_train")]
BAND = {name: i for i, name in enumerate(ALL_BAND_NAMES)}
PRIOR = "efficientnet_lite0/imagenet"
CALIBRATION_TILES = "eurosat_ms_dev"  # the folder the synthetic spectra were calibrated on (docs/calibration.md)


def real_tiles(folders: list[Path]) -> pd.DataFrame:
    """Every real tile of the folders: absolute ``path`` and ``class``."""
    frames = [discover_tiles(f)[["path", "class"]] for f in folders]
    df = pd.concat(frames, ignore_index=True)
    df["path"] = [str(Path(p).resolve()) for p in df["path"]]
    return df.sort_values("path", kind="stable").reset_index(drop=True)


def folds(classes: pd.Series, k: int, seed: int) -> np.ndarray:
    """Fold number per tile, stratified by class and seeded."""
    rng, fold = np.random.default_rng(seed), np.empty(len(classes), dtype=int)
    for name in sorted(classes.unique()):
        idx = np.flatnonzero(classes.to_numpy() == name)
        fold[idx[rng.permutation(len(idx))]] = np.arange(len(idx)) % k
    return fold


def val_rows(classes: pd.Series, train: np.ndarray, share: float, seed: int) -> np.ndarray:
    """A stratified ``share`` of the training rows kept for validation (model selection), by class."""
    rng, val = np.random.default_rng(seed + 1), np.zeros(len(classes), dtype=bool)
    for name in sorted(classes.unique()):
        idx = np.flatnonzero((classes.to_numpy() == name) & train)
        val[idx[rng.permutation(len(idx))[:max(1, round(share * len(idx)))]]] = True
    return val


def features_mean_std(x: np.ndarray) -> np.ndarray:
    """Per-band mean and standard deviation of each tile."""
    flat = x.reshape(len(x), x.shape[1], -1).astype(np.float64)
    return np.concatenate([flat.mean(-1), flat.std(-1)], axis=1)


def features_indices(x: np.ndarray) -> np.ndarray:
    """NDVI, NDWI and NDBI per pixel, summarised per tile by mean, std, 10th and 90th percentile."""
    x = x.astype(np.float64)

    def nd(a: str, b: str) -> np.ndarray:
        return (x[:, BAND[a]] - x[:, BAND[b]]) / (x[:, BAND[a]] + x[:, BAND[b]] + 1e-6)

    out = []
    for index in (nd("B08", "B04"), nd("B03", "B08"), nd("B11", "B08")):  # NDVI, NDWI (McFeeters), NDBI
        flat = index.reshape(len(x), -1)
        out += [flat.mean(1), flat.std(1), np.percentile(flat, 10, axis=1), np.percentile(flat, 90, axis=1)]
    return np.stack(out, axis=1)


def logistic(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> np.ndarray:
    """Predictions of a standardised logistic regression (C chosen on the training folds by inner 3-fold CV)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=[0.1, 1, 10, 100], cv=3, max_iter=5000,
                                                                 scoring="accuracy"))
    with warnings.catch_warnings():  # scikit-learn's notices of future defaults; the choices here are explicit
        warnings.simplefilter("ignore", FutureWarning)
        return model.fit(train_x, train_y).predict(test_x)


def write_raw(raw: Path, rows: pd.DataFrame) -> None:
    """A raw folder for prepare: labels.csv (absolute tile paths, given splits, sources) and bands.json."""
    raw.mkdir(parents=True, exist_ok=True)
    rows[["id", "path", "class", "split", "source"]].to_csv(raw / "labels.csv", index=False)
    (raw / "bands.json").write_text(json.dumps({"band_names": list(ALL_BAND_NAMES)}))


def run_geoclip(params: Params, work: Path, rows: pd.DataFrame) -> dict:
    """prepare -> train -> evaluate (the pipeline's functions) on ``rows``; the evaluate metrics."""
    from geoclip.data.prepare import prepare
    from geoclip.training.evaluate import evaluate
    from geoclip.training.train import train

    paths = replace(params.paths, raw=str(work / "raw"), prepared=str(work / "prepared"),
                    reports=str(work / "reports"), model=str(work / "model"), eval=str(work / "eval"))
    p = replace(params, paths=paths)
    write_raw(work / "raw", rows)
    shared = work.parent / "feature_cache"  # one frozen-encoder cache for every run: the synthetic tiles recur
    shared.mkdir(parents=True, exist_ok=True)
    if not (work / "feature_cache").exists():
        (work / "feature_cache").symlink_to(shared.resolve())
    prepare(p)
    train(p)
    return evaluate(p)


def synthetic_rows(params: Params, work: Path) -> pd.DataFrame:
    """Generate the synthetic tiles once (the pipeline's synth) and list them: 15% of each class for validation,
    the rest for training (a synthetic tile is never a test tile here)."""
    from geoclip.data.synth import generate

    p = replace(params, paths=replace(params.paths, raw=str(work / "synthetic_raw"),
                                      synthetic=str(work / "synthetic_scenes")))
    if not (work / "synthetic_raw" / "labels.csv").exists():
        generate(p)
    df = pd.read_csv(work / "synthetic_raw" / "labels.csv")
    df["path"] = [str((work / "synthetic_raw" / q).resolve()) for q in df["path"]]
    val = val_rows(df["class"], np.ones(len(df), dtype=bool), 0.15, params.prepare.seed)
    df["split"] = np.where(val, "val", "train")
    return df.assign(source="synthetic")[["id", "path", "class", "split", "source"]]


def summary(values: list[float]) -> str:
    """Mean +- standard deviation over folds, in percent."""
    return f"{100 * np.mean(values):5.1f} +- {100 * np.std(values):4.1f}"


def main(argv: list[str] | None = None) -> None:
    """Run the cross-validation and print the table (and write it as JSON with ``--out``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", nargs="+", type=Path, default=DEFAULT_REAL, help="folders of real EuroSAT_MS tiles")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml", help="the recipe (train, synth sections)")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folds", type=str, default="", help="comma-separated folds to run (default all)")
    ap.add_argument("--epochs", type=int, default=0, help="override train.epochs (0: params)")
    ap.add_argument("--synthetic-per-class", type=int, default=0, help="override synth.tiles_per_class")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a recipe param (YAML value), e.g. --set train.spectral_stats=true; repeatable")
    ap.add_argument("--rows", default="abcdefghi", help="which rows to run")
    ap.add_argument("--work", type=Path, default=Path("bench/results/real_quality"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    base = load_params(args.params)
    data = asdict(base)
    data["synth"]["n_scenes"] = 0
    if args.synthetic_per_class:
        data["synth"]["tiles_per_class"] = args.synthetic_per_class
    if args.epochs:
        data["train"]["epochs"] = args.epochs
    data["classes"]["names"] = list(EUROSAT_CLASSES)
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if section not in data or name not in data[section]:
            raise SystemExit(f"--set {item}: unknown param {key!r}; expected SECTION.KEY=VALUE from params.yaml")
        data[section][name] = yaml.safe_load(value)
    try:
        params = params_from_dict(data)
    except GeoclipError as exc:  # a bad --set value: one line, not a traceback
        raise SystemExit(f"error: {exc}") from None
    plain = replace(params, train=replace(params.train, pretrained=""))
    prior = replace(params, train=replace(params.train, pretrained=PRIOR))  # freeze_image: the recipe's (all)
    params = plain
    real = real_tiles(args.real)
    fold = folds(real["class"], args.k, args.seed)
    images = np.stack([read_tile(p) for p in real["path"]])
    labels = real["class"].map(EUROSAT_CLASSES.index).to_numpy()
    real = real.assign(id=[f"real-{Path(p).parent.name}-{Path(p).stem}" for p in real["path"]], source="real")
    args.work.mkdir(parents=True, exist_ok=True)
    chosen = [int(f) for f in args.folds.split(",")] if args.folds else list(range(args.k))
    results: dict[str, list] = {r: [] for r in args.rows}
    recall: dict[str, list[dict]] = {"b": [], "h": []}
    start = time.perf_counter()
    synthetic = synthetic_rows(params, args.work) if set("abgh") & set(args.rows) else None
    zero_shot = zero_shot_g = None
    served: dict[str, np.ndarray] = {}  # the synthetic-only models' embeddings of the real tiles, for linear probes
    if "f" in args.rows:
        from prior_baselines import prior_features

        from geoclip.model.pretrained import get_source

        prior_f = prior_features(images, get_source(PRIOR))
        results["f+d"] = []
    if "g" in args.rows:  # the synthetic-only model with the prior, scored on every test fold
        from geoclip.model.clip import load_model, predict_batches

        run_geoclip(prior, args.work / "g", pd.concat([synthetic, real.assign(split="test")], ignore_index=True))
        probs_g, emb_g = predict_batches(load_model(args.work / "g" / "model"), images, 256, tta=params.evaluate.tta)
        zero_shot_g = probs_g.argmax(1)
        served["g-probe"], results["g-probe"] = emb_g, []
    if "a" in args.rows:  # one synthetic-only model, scored on every test fold
        from geoclip.model.clip import load_model, predict_batches

        run_geoclip(params, args.work / "a", pd.concat([synthetic, real.assign(split="test")], ignore_index=True))
        model = load_model(args.work / "a" / "model")
        probs_a, emb_a = predict_batches(model, images, 256, tta=params.evaluate.tta)
        zero_shot = probs_a.argmax(1)
        served["a-probe"], results["a-probe"] = emb_a, []
        # The generator's spectra were calibrated on the dev tiles: the others are the honest zero-shot test.
        held_out = ~real["path"].str.contains(f"{Path(CALIBRATION_TILES).name}/").to_numpy()
        results["a_not_calibrated"] = [float((zero_shot[held_out] == labels[held_out]).mean())]
    bs = params.train.batch_size
    for k in chosen:
        test = fold == k
        val = val_rows(real["class"], ~test, 0.15, args.seed + k)
        split = np.where(test, "test", np.where(val, "val", "train"))
        fold_real = real.assign(split=split)
        train_mask = split == "train"
        fit = train_mask | val  # the baselines tune by inner CV on all training folds

        def probe(f: np.ndarray, fit: np.ndarray = fit, test: np.ndarray = test) -> float:
            return float((logistic(f[fit], labels[fit], f[test]) == labels[test]).mean())

        for row, emb in served.items():
            results[row].append(probe(emb))
        if "a" in args.rows:
            results["a"].append(float((zero_shot[test] == labels[test]).mean()))
        for row, recipe in (("b", params), ("h", prior)):
            if row in args.rows:
                m = run_geoclip(recipe, args.work / f"{row}{k}", pd.concat([synthetic, fold_real], ignore_index=True))
                results[row].append(m["real_test_top1"])
                recall[row].append({c: v["real_recall"] for c, v in m["per_class"].items()})
                if row == "h":  # a linear probe on the served embeddings of this fold's model
                    from geoclip.model.clip import load_model, predict_batches

                    _, emb = predict_batches(load_model(args.work / f"h{k}" / "model"), images, 256,
                                             tta=params.evaluate.tta)
                    results.setdefault("h-probe", []).append(probe(emb, fit, test))
        if "g" in args.rows:
            results["g"].append(float((zero_shot_g[test] == labels[test]).mean()))
        if "c" in args.rows:  # as many optimiser steps as (b) takes: a fair budget for the smaller set
            steps_b = -(-(synthetic["split"] == "train").sum() // round(bs * (1 - params.train.real_share)))
            steps_c_per_epoch = -(-int(train_mask.sum()) // bs)
            epochs_c = max(1, round(params.train.epochs * steps_b / steps_c_per_epoch))
            scratch = replace(params, train=replace(params.train, real_share=0.0, epochs=epochs_c))
            results["c"].append(run_geoclip(scratch, args.work / f"c{k}", fold_real)["real_test_top1"])
        for row, feats in (("d", features_mean_std), ("e", features_indices)):
            if row in args.rows:
                f = feats(images)
                results[row].append(float((logistic(f[fit], labels[fit], f[test]) == labels[test]).mean()))
        if "f" in args.rows:
            results["f"].append(float((logistic(prior_f[fit], labels[fit], prior_f[test]) == labels[test]).mean()))
            both = np.concatenate([prior_f, features_mean_std(images)], axis=1)
            results["f+d"].append(float((logistic(both[fit], labels[fit], both[test]) == labels[test]).mean()))
        if "i" in args.rows:
            from prior_baselines import finetune_classifier

            from geoclip.model.pretrained import get_source

            pred = finetune_classifier(images, labels, np.flatnonzero(fit), np.flatnonzero(test), get_source(PRIOR),
                                       args.seed + k, len(EUROSAT_CLASSES))
            results["i"].append(float((pred == labels[np.flatnonzero(test)]).mean()))
        print(json.dumps({"fold": k, **{r: v[-1] for r, v in results.items() if v},
                          "elapsed_s": round(time.perf_counter() - start)}), flush=True)
    names = {"a": "geoclip, synthetic only, zero-shot", "b": "geoclip, synthetic + real training folds",
             "c": "geoclip architecture, real folds only", "d": "logistic regression, band mean + std",
             "e": "logistic regression, NDVI/NDWI/NDBI", "f": f"logistic regression, frozen {PRIOR} features",
             "f+d": "logistic regression, frozen prior features + band mean/std",
             "g": f"geoclip with {PRIOR}, synthetic only, zero-shot",
             "h": f"geoclip with {PRIOR}, synthetic + real training folds",
             "i": f"{PRIOR} fine-tuned as a plain classifier, real training folds",
             "a-probe": "logistic regression on (a)'s served embeddings", "g-probe": "the same on (g)'s",
             "h-probe": "the same on each fold's (h) model"}
    print(f"\n{len(real)} real tiles, {args.k}-fold stratified CV (seed {args.seed}), folds {chosen}; "
          f"recipe {args.params.name}: epochs {params.train.epochs}, synthetic {params.synth.tiles_per_class}/class, "
          f"real_share {params.train.real_share}, overrides {args.set}\n")
    print("| row | model | real test top-1 % (mean +- sd over folds) |\n|---|---|---|")
    for r in [r for r in results if results[r] and r in names]:
        print(f"| ({r}) | {names[r]} | {summary(results[r])} |")
    if "a_not_calibrated" in results:
        print(f"\n(a) on the {int(held_out.sum())} real tiles outside {CALIBRATION_TILES} (not used to calibrate the "
              f"generator): {100 * results['a_not_calibrated'][0]:.1f}%")
    for row, per_fold in recall.items():
        if per_fold:
            print(f"\nper-class real recall, ({row}), mean over folds:")
            for c in EUROSAT_CLASSES:
                print(f"  {c:22s} {100 * np.mean([r[c] for r in per_fold]):5.1f}")
    if args.out:
        settings = {"epochs": params.train.epochs, "synthetic_per_class": params.synth.tiles_per_class,
                    "real_share": params.train.real_share, "overrides": args.set, "k": args.k, "seed": args.seed}
        args.out.write_text(json.dumps({"folds": chosen, "settings": settings, "results": results,
                                        "recall": recall, "prior": PRIOR}, indent=1))


if __name__ == "__main__":
    main()
