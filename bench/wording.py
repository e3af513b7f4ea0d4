"""Wording robustness: zero-shot top-1 on the real EuroSAT_MS tiles with the trained class wording and paraphrases.

The same model and tiles; only the words for the ten classes change (synonyms, plain names, longer descriptions),
embedded through the open-vocabulary path (geoclip.model.vocab) as `geoclip predict --classes-file` would.

    python bench/wording.py --model models                  # a model folder, or an MLflow URI
    python bench/wording.py --model models --concepts       # the 38 synthetic concepts, on freshly painted tiles

``--concepts``: the same question over the land-cover concepts the class side trained on (classes.concepts):
``--per-concept`` tiles of each, painted with a seed training never used, classified among all the concepts with
their trained wording (geoclip.data.synth_concepts) and with the paraphrases below.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from geoclip.bands import band_indices  # noqa: E402
from geoclip.config import load_params  # noqa: E402
from geoclip.data.tiles import discover_tiles, read_tile  # noqa: E402
from geoclip.model.clip import predict_batches  # noqa: E402
from geoclip.model.vocab import class_embeddings, vocabulary  # noqa: E402
from geoclip.registry.models import load_geoclip  # noqa: E402

DEFAULT_REAL = [REPO.parent / "shared/data/eurosat_ms_dev", REPO.parent / "shared/data/eurosat_ms_train"]

# Per trained class, each wording's text for it (the class file's descriptions).
WORDINGS: dict[str, dict[str, str]] = {
    "plain names": {"AnnualCrop": "annual crop", "Forest": "forest", "HerbaceousVegetation": "herbaceous vegetation",
                    "Highway": "highway", "Industrial": "industrial", "Pasture": "pasture",
                    "PermanentCrop": "permanent crop", "Residential": "residential", "River": "river",
                    "SeaLake": "sea lake"},
    "synonyms": {"AnnualCrop": "arable farmland", "Forest": "woodland", "HerbaceousVegetation": "grassland and scrub",
                 "Highway": "a motorway", "Industrial": "factories and warehouses", "Pasture": "a grazing meadow",
                 "PermanentCrop": "orchards and vineyards", "Residential": "houses and gardens",
                 "River": "a stream", "SeaLake": "open water"},
    "long descriptions": {
        "AnnualCrop": "ploughed fields of wheat, maize or other crops sown every year",
        "Forest": "a dense canopy of trees covering the whole area",
        "HerbaceousVegetation": "natural grasses, herbs and low shrubs without trees",
        "Highway": "a wide paved road with lanes crossing the countryside",
        "Industrial": "large flat-roofed factory buildings, warehouses and parking lots",
        "Pasture": "green meadows where cattle and sheep graze",
        "PermanentCrop": "rows of fruit trees, olive groves or grape vines",
        "Residential": "a town of houses, streets and small gardens",
        "River": "a river winding through the land with water and banks",
        "SeaLake": "a large body of open water, a lake or the sea"},
}


# Per concept, a paraphrase in other words (no word of its trained wording where avoidable).
CONCEPT_PARAPHRASES: dict[str, str] = {
    "Vineyard": "rows of grape vines", "OliveGrove": "olive trees in a grid", "FruitBlossom": "flowering fruit trees",
    "Greenhouses": "glasshouses and plastic tunnels", "SolarFarm": "rows of photovoltaic panels",
    "Quarry": "an open-pit mine", "Beach": "a sandy shore", "Dunes": "wind-blown sand hills",
    "SaltPan": "a dry salt flat", "SaltWorks": "salt ponds on the coast", "Marsh": "a wet swampy plain",
    "ReedBed": "tall reeds in shallow water", "PeatBog": "a wet moss mire", "Glacier": "a river of ice",
    "SnowField": "snow-covered ground", "BareRock": "exposed stone", "BurntArea": "land scorched by wildfire",
    "ClearCut": "a logged area with stumps", "Airport": "runways and terminals", "Port": "a harbour with quays",
    "RailYard": "railway sidings", "SportsFields": "football pitches", "GolfCourse": "fairways and greens",
    "Park": "an urban green space", "Cemetery": "a graveyard", "Reservoir": "a dammed water body",
    "Canal": "a straight man-made waterway", "FishPonds": "aquaculture ponds", "RicePaddies": "flooded rice fields",
    "Heathland": "heather and gorse", "Moorland": "upland heath and bog", "SparseTrees": "an open savanna",
    "HedgerowFarmland": "bocage fields", "Village": "a small rural settlement", "CityCentre": "a dense downtown",
    "SmallIsland": "an islet", "FloodedFields": "fields under floodwater", "Allotments": "community vegetable plots",
}


def concept_rows(model, per_concept: int, seed: int, tta: bool) -> list[dict]:
    """Top-1 over the concepts on fresh synthetic tiles, with the trained wording and with the paraphrases."""
    from geoclip.data import synth_textures as tx
    from geoclip.data.synth_concepts import CONCEPTS, concept_surface

    learnt = set(model.cfg.learnt_texts)
    names = [c for c in CONCEPTS if any(CONCEPTS[c].wording in t for t in learnt)] or list(CONCEPTS)
    images, truth = [], []
    for k, name in enumerate(names):
        rng = np.random.default_rng([seed, 777, k])
        surfaces = np.stack([concept_surface(rng, name, 64, 64) for _ in range(per_concept)])
        images.append(tx.sensor(rng, surfaces))
        truth += [name] * per_concept
    images, truth = np.concatenate(images), np.array(truth)
    idx = band_indices(model.cfg.band_names, tuple(model.cfg.input_band_names))
    rows = []
    for label, words in [("trained wording", {c: CONCEPTS[c].wording for c in names}),
                         ("paraphrases", {c: CONCEPT_PARAPHRASES[c] for c in names})]:
        vocab = vocabulary(model.cfg, names, words)
        probs, _ = predict_batches(model, images, 128, band_idx=idx, tta=tta, classes=class_embeddings(model, vocab))
        pred = np.array(names)[probs.argmax(1)]
        rows.append({"wording": label, "top1": float((pred == truth).mean()), "concepts": len(names),
                     "example_prompt": vocab.prompts[0][0]})
        print(f"{label:>18}: top-1 {rows[-1]['top1']:.1%} over {len(names)} concepts "
              f"(e.g. {vocab.prompts[0][0]!r})", flush=True)
    return rows


def main() -> None:
    """Score each wording on the real tiles; print a table; write bench/results/wording_<date>.json."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder (geoclip train) or MLflow URI")
    ap.add_argument("--real", nargs="+", type=Path, default=DEFAULT_REAL)
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--no-tta", action="store_true", help="one view per tile instead of the 8 dihedral views")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"wording_{date.today()}.json")
    ap.add_argument("--concepts", action="store_true", help="the synthetic concepts instead of the real tiles")
    ap.add_argument("--per-concept", type=int, default=20)
    ap.add_argument("--seed", type=int, default=12345, help="of the concept tiles (training used synth.seed)")
    args = ap.parse_args()
    model = load_geoclip(args.model, load_params(args.params)).eval()
    if args.concepts:
        rows = concept_rows(model, args.per_concept, args.seed, not args.no_tta)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"date": str(date.today()), "model": str(args.model), "concepts": True,
                                        "per_concept": args.per_concept, "seed": args.seed, "tta": not args.no_tta,
                                        "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.out}")
        return
    tiles = [discover_tiles(folder) for folder in args.real if folder.exists()]
    if not tiles:
        raise SystemExit(f"no real tiles under {[str(f) for f in args.real]}")
    paths = [p for t in tiles for p in t["path"]]
    truth = np.array([c for t in tiles for c in t["class"]])
    images = np.stack([read_tile(p) for p in paths])
    idx = band_indices(model.cfg.band_names, tuple(model.cfg.input_band_names))
    names = list(model.cfg.class_names)
    rows = []
    for label, words in [("trained wording", None), *WORDINGS.items()]:
        vocab = vocabulary(model.cfg, names, words)
        probs, _ = predict_batches(model, images, 128, band_idx=idx, tta=not args.no_tta,
                                   classes=class_embeddings(model, vocab))
        pred = np.array(names)[probs.argmax(1)]
        recall = {c: float((pred[truth == c] == c).mean()) for c in names}
        rows.append({"wording": label, "top1": float((pred == truth).mean()),
                     "macro_recall": float(np.mean(list(recall.values()))), "recall": recall,
                     "example_prompt": vocab.prompts[0][0]})
        print(f"{label:>18}: top-1 {rows[-1]['top1']:.1%}  macro recall {rows[-1]['macro_recall']:.1%}  "
              f"(e.g. {vocab.prompts[0][0]!r})", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": str(date.today()), "model": str(args.model), "tiles": len(paths),
                                    "tta": not args.no_tta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
