"""Draw the architecture diagram (docs/architecture.png) with matplotlib, so the project makes its own docs."""

from __future__ import annotations

from pathlib import Path

from geoclip.plots import pyplot, save_png

STAGES = ["ingest\n(synthetic, folder,\nmanifest, s3://)", "validate\n(Great Expectations)", "prepare\n(split, stats, pack)",
          "train\n(torchrun DDP)", "evaluate", "register\n(gate: champion)", "score\n(sliding window)"]
ARTIFACTS = ["data/raw, synthetic/\nGeoTIFF tiles,\nlabels; scenes", "reports/\nvalidation JSON,\nGE Data Docs",
             "data/prepared\nuint16 packs,\nstats, index", "models/\nweights,\nrun.json", "eval/\nmetrics.json,\nconfusion",
             "MLflow registry\ngeoclip@champion", "outputs/scores\nCOG class maps,\narea JSON"]


def _box(ax, x, y, w, h, text, color):
    """A rounded box with centred text."""
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=color, ec="#333", lw=1))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=8)


def _arrow(ax, a, b, style="-|>", color="#333"):
    """An arrow from point ``a`` to point ``b``."""
    from matplotlib.patches import FancyArrowPatch

    ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=10, color=color, lw=1))


def draw_architecture(out: Path) -> Path:
    """Render the pipeline, the model and the orchestration layers to ``out`` (PNG)."""
    fig, ax = pyplot().subplots(figsize=(14, 7.5))
    ax.set_xlim(0, 14); ax.set_ylim(0, 7.5); ax.axis("off")
    ax.text(7, 7.2, "geoclip: Sentinel-2 tiles <-> ground-cover classes (CLIP-style)", ha="center",
            fontsize=13, weight="bold")
    # Pipeline row (DVC stages) and their outputs.
    w, h, gap = 1.7, 0.9, 0.25
    for i, (stage, art) in enumerate(zip(STAGES, ARTIFACTS)):
        x = 0.3 + i * (w + gap)
        _box(ax, x, 5.4, w, h, stage, "#cfe2ff")
        _box(ax, x, 3.9, w, 1.0, art, "#fff3cd")
        _arrow(ax, (x + w / 2, 5.4), (x + w / 2, 4.9))
        if i:
            _arrow(ax, (x - gap, 5.85), (x, 5.85))
    ax.text(0.3, 6.5, "dvc repro  (stages in dvc.yaml, params in params.yaml, data cached by DVC, remote: local dir or S3)",
            fontsize=9, style="italic")
    # Orchestration and tracking.
    _box(ax, 0.3, 2.3, 4.2, 1.0, "Prefect 3\ntraining.py: ingest > validate > prepare > train\n> evaluate > register (on demand)\n"
         "scoring.py: cron, champion, map over scenes", "#d1e7dd")
    _box(ax, 4.9, 2.3, 4.2, 1.0, "MLflow (SQLite + artifacts)\nparams, metrics, plots, pyfunc model\n"
         "registry: geoclip@champion / @challenger", "#f8d7da")
    _box(ax, 9.5, 2.3, 4.2, 1.0, "Storage\nlocal disk or S3 (boto3; DVC remote via dvc-s3)\n"
         "GeoTIFF / COG in and out, CRS kept", "#e2e3e5")
    # The model: two encoders feed one similarity, trained with the label-aware loss.
    _box(ax, 0.3, 1.0, 4.2, 0.8, "image encoder: raw uint16 (N, 13, 64, 64) -> normalise\n-> timm CNN (in_chans=13) -> projection",
         "#e0cffc")
    _box(ax, 0.3, 0.05, 4.2, 0.8, "class encoder: prompts -> frozen MiniLM-L6\n-> trainable projection (template ensemble)",
         "#e0cffc")
    _box(ax, 5.2, 0.3, 4.0, 1.3, "cosine similarity x exp(logit_scale)\nlabel-aware contrastive loss\n"
         "(same-class tiles are not negatives)", "#e0cffc")
    _box(ax, 9.9, 0.3, 3.8, 1.3, "zero-shot class probabilities\n+ embeddings (tile retrieval)", "#e0cffc")
    _arrow(ax, (4.5, 1.4), (5.2, 1.15)); _arrow(ax, (4.5, 0.45), (5.2, 0.75)); _arrow(ax, (9.2, 0.95), (9.9, 0.95))
    save_png(fig, out, dpi=110, bbox_inches="tight")
    return out


def _rgb(path: Path):
    """A tile's true-colour composite, stretched between its 2nd and 98th percentiles."""
    import numpy as np

    from geoclip.bands import ALL_BAND_NAMES, RGB_BANDS
    from geoclip.data.tiles import read_tile

    rgb = read_tile(path, [ALL_BAND_NAMES.index(b) for b in RGB_BANDS]).astype(float).transpose(1, 2, 0)
    lo, hi = np.percentile(rgb, 2), np.percentile(rgb, 98)
    return np.clip((rgb - lo) / (hi - lo + 1e-6), 0, 1)


def draw_samples(real_dir: Path, synth_tiles_dir: Path, out: Path, per_class: int = 2) -> Path:
    """Real EuroSAT_MS tiles above synthetic ones, per class, in true colour (docs/samples.png)."""
    classes = sorted(d.name for d in Path(synth_tiles_dir).iterdir() if d.is_dir())
    fig, axes = pyplot().subplots(2 * per_class, len(classes), figsize=(1.5 * len(classes), 3.2 * per_class), squeeze=False)
    for j, name in enumerate(classes):
        for i in range(per_class):
            for row, root in ((i, real_dir), (per_class + i, synth_tiles_dir)):
                ax = axes[row, j]
                tile = Path(root) / name / f"{name}_{i + 1}.tif"
                if tile.exists():
                    ax.imshow(_rgb(tile))
                ax.set_xticks([]); ax.set_yticks([])
        axes[0, j].set_title(name, fontsize=7)
    axes[0, 0].set_ylabel("real", fontsize=9)
    axes[per_class, 0].set_ylabel("synthetic", fontsize=9)
    fig.tight_layout()
    save_png(fig, out, dpi=80)
    return out
