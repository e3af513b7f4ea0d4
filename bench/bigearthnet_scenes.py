"""Scenes, real: score the BigEarthNet-S2 example patches and check each patch's dominant predicted class against
its CORINE labels mapped to the EuroSAT classes (docs/bigearthnet.md has the mapping and the caveats).

Each patch folder (12 band files, L2A) is read as ``geoclip score`` reads per-band products (geoclip.data.
product_reader: 20/60 m bands upsampled bilinearly to 10 m, B10 filled with the model's B10 training mean), passes
the scenes suite, and is scored by geoclip.scoring.score.score_scene, the function ``geoclip score`` runs, with
params.yaml's ``score``
section (window, stride, batch size, nodata, TTA). From the class map: the dominant class (most pixels) and the
class shares. "agrees": the dominant class is among the patch's mapped classes; "any >= 20%": some class with at
least 20% of the pixels is. Patches with no mappable label are left out of both counts, and counted. The summary
also gives the constant baseline: how many patches a model that answers the most often mapped class everywhere
would get right (the labels are unbalanced: most of these patches hold forest). The "snow" column is the share of
pixels with NDSI above 0.4 and NIR reflectance above 0.11: a snow-covered patch has no EuroSAT class to agree with,
whatever CORINE says.

    python bench/bigearthnet_scenes.py --model models --out bench/results/bigearthnet_scenes.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # geoclip from this checkout, installed or not

import numpy as np

from geoclip.bands import ALL_BAND_NAMES, EUROSAT_CLASSES
from geoclip.config import Params, load_params
from geoclip.data.bigearthnet import (
    B10_FILL,
    MISSING_BAND,
    mapped_labels,
    read_labels,
    read_patch,
)
from geoclip.errors import GeoclipError
from geoclip.ioutils import write_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "bigearthnet_s2_examples"
ANY_SHARE = 0.2  # "any agreement": a predicted class with at least this share of the patch's pixels
# Snow: NDSI = (B03 - B11) / (B03 + B11) above 0.4 and NIR (B08) reflectance above 0.11, which water, also high
# in NDSI, never reaches (the MODIS SNOMAP rule).
SNOW_NDSI, SNOW_MIN_NIR = 0.4, 1100


@dataclass(frozen=True)
class Scorer:
    """A saved model ready to score scenes: what score_scene needs, and the files it must be given."""

    predict_fn: Callable[[np.ndarray], np.ndarray]
    class_names: list[str]
    input_band_names: list[str]  # the band order of the scenes the model reads
    b10_fill: int
    model_dir: str


def load_scorer(model_dir: str | Path, params: Params, device: str | None = None) -> Scorer:
    """Load a save_model folder and predict as the served pyfunc does (its bands picked by name, raw DNs in)."""
    import torch

    from geoclip.bands import band_indices
    from geoclip.model.clip import load_model, predict_batches

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(model_dir).to(device, memory_format=torch.channels_last)
    cfg = model.cfg
    band_idx = band_indices(cfg.band_names, tuple(cfg.input_band_names))
    # B10 filled with the model's own training mean (standardised: 0), else the EuroSAT dev tiles' mean.
    b10 = round(cfg.band_mean[cfg.band_names.index(MISSING_BAND)]) if MISSING_BAND in cfg.band_names else B10_FILL

    def predict_fn(x: np.ndarray) -> np.ndarray:
        return predict_batches(model, x, params.score.batch_size, device, band_idx=band_idx, tta=params.score.tta)[0]

    return Scorer(predict_fn, list(cfg.class_names), list(cfg.input_band_names), b10, str(model_dir))


def snow_share(folder: str | Path) -> float:
    """Share of a patch's pixels that look like snow (NDSI and NIR rule above): EuroSAT has no snow class."""
    pixels = read_patch(folder).pixels.astype(np.float64)
    green, nir, swir = (pixels[ALL_BAND_NAMES.index(b)] for b in ("B03", "B08", "B11"))
    ndsi = (green - swir) / np.maximum(green + swir, 1.0)
    return float(((ndsi > SNOW_NDSI) & (nir > SNOW_MIN_NIR)).mean())


def score_patch(folder: str | Path, scorer: Scorer, work: str | Path, params: Params) -> dict:
    """Check and score one patch folder as `geoclip score` reads per-band products (B10 filled); its CORINE
    labels, mapped classes, dominant class, shares and agreement."""
    from dataclasses import replace

    import rasterio

    from geoclip.scoring.score import NODATA_CLASS, check_scenes, read_options, score_scene

    folder = Path(folder)
    params = replace(params, score=replace(params.score, band_fill={MISSING_BAND: scorer.b10_fill}))
    cfg, out, scene = params.score, Path(work) / folder.name, str(folder)
    check_scenes(params, [scene], scorer.input_band_names)  # the scenes suite, as score_one runs it
    summary = score_scene(scorer.predict_fn, scene, out / "scored", scorer.class_names, window=cfg.window,
                          stride=cfg.stride, batch_size=cfg.batch_size, nodata=cfg.nodata,
                          bands=scorer.input_band_names, model_uri=scorer.model_dir, scene_name=folder.name,
                          quicklook=cfg.quicklook, read=read_options(cfg), full_resolution=cfg.full_resolution)
    with rasterio.open(summary["classmap"]) as src:
        classes = src.read(1)
    counts = np.bincount(classes[classes != NODATA_CLASS], minlength=len(scorer.class_names))
    if counts.sum() == 0:
        raise GeoclipError(f"{scene}: every pixel is nodata ({cfg.nodata} in all bands); nothing was classified")
    shares = {name: float(counts[i] / counts.sum()) for i, name in enumerate(scorer.class_names)}
    dominant = scorer.class_names[int(counts.argmax())]
    labels = read_labels(folder)
    mapped = sorted(mapped_labels(labels))
    return {
        "patch": folder.name, "labels": labels, "mapped": mapped, "dominant": dominant, "share": shares[dominant],
        "shares": shares, "agrees": dominant in mapped if mapped else None,
        "any_agreement": any(shares.get(c, 0.0) >= ANY_SHARE for c in mapped) if mapped else None,
        "snow_share": snow_share(folder), "scene": str(scene), "classmap": summary["classmap"],
        "valid_pixels": int(counts.sum()),
    }


def summarise(rows: list[dict]) -> dict:
    """Agreement counts over the patches with at least one mappable label."""
    judged = [r for r in rows if r["mapped"]]
    # What a model answering one class everywhere would score: the bar a real model must clear on these patches.
    per_class = {c: sum(c in r["mapped"] for r in judged) for c in sorted({c for r in judged for c in r["mapped"]})}
    best = max(per_class, key=per_class.get, default=None)
    return {"patches": len(rows), "judged": len(judged), "excluded_no_mappable_label": len(rows) - len(judged),
            "agrees": sum(r["agrees"] for r in judged), "any_agreement": sum(r["any_agreement"] for r in judged),
            "any_share": ANY_SHARE, "constant_baseline": {"class": best, "agrees": per_class.get(best, 0)}}


def markdown_table(rows: list[dict]) -> str:
    """One row per patch: labels, mapped classes, dominant class and its share, agreement, snow share."""
    def yes(value: bool | None) -> str:
        return "n/a" if value is None else "yes" if value else "no"

    lines = ["| patch | CORINE labels | mapped classes | dominant predicted | share | agrees | any >= 20% | snow |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['patch']} | {'; '.join(r['labels'])} | {', '.join(r['mapped']) or 'none'} | "
                     f"{r['dominant']} | {r['share']:.0%} | {yes(r['agrees'])} | {yes(r['any_agreement'])} | "
                     f"{r['snow_share']:.0%} |")
    return "\n".join(lines)


def summary_line(s: dict) -> str:
    """The figures in one line."""
    return (f"dominant class among the mapped CORINE classes: {s['agrees']}/{s['judged']}; "
            f"any class with >= {s['any_share']:.0%} of pixels among them: {s['any_agreement']}/{s['judged']}; "
            f"excluded (no mappable label): {s['excluded_no_mappable_label']} of {s['patches']} patches; "
            f"answering {s['constant_baseline']['class']} everywhere would agree on "
            f"{s['constant_baseline']['agrees']}/{s['judged']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a saved model folder (geoclip.model.clip.save_model)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder of BigEarthNet-S2 patch folders")
    p.add_argument("--work", help="keep stacked scenes and class maps here (default: a temporary folder, removed)")
    p.add_argument("--out", help="write the rows and the summary here as JSON")
    p.add_argument("--params", default=str(REPO / "params.yaml"), help="params.yaml (its score section is used)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Score every patch, print the table and the summary line, optionally write them as JSON."""
    args = parse_args(argv)
    params = load_params(args.params)
    folders = sorted(p for p in Path(args.data).iterdir() if p.is_dir()) if Path(args.data).is_dir() else []
    if not folders:
        raise GeoclipError(f"{args.data}: no patch folders; expected BigEarthNet-S2 patches, one folder each")
    scorer = load_scorer(args.model, params, args.device)
    missing = sorted(set(EUROSAT_CLASSES) - set(scorer.class_names))
    with tempfile.TemporaryDirectory(prefix="geoclip-bigearthnet-") as tmp:
        rows = [score_patch(f, scorer, args.work or tmp, params) for f in folders]
    if not args.work:  # the stacked scenes and class maps went with the temporary folder
        rows = [{k: v for k, v in r.items() if k not in ("scene", "classmap")} for r in rows]
    summary = summarise(rows)
    print(markdown_table(rows))
    print()
    print(summary_line(summary))
    if missing:
        print(f"note: the model has no class {missing}: patches mapped only to those cannot agree")
    result = {"model": str(args.model), "data": str(args.data), "window": params.score.window,
              "stride": params.score.stride, "tta": params.score.tta, "b10_fill": scorer.b10_fill,
              "class_names": scorer.class_names, "patches": rows, "summary": summary}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
