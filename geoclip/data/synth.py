"""Synthetic EuroSAT-like data: labelled 13-band tiles and large scenes with a ground-truth class map.

Spectra are calibrated on real EuroSAT_MS tiles (see ``geoclip.data.synth_textures``); textures follow each
cover type (field parcels, orchard rows, canopy, roads, rivers, roofs), so colour alone does not separate
the classes but shape does. :func:`calibrate` writes the synthetic-versus-real comparison (docs/calibration.md).
"""

from __future__ import annotations

import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from rasterio.transform import from_origin
from scipy import ndimage
from tqdm import tqdm

from geoclip.bands import ALL_BAND_NAMES, EUROSAT_CLASSES
from geoclip.config import Params
from geoclip.data import synth_textures as tx
from geoclip.data.captions import caption
from geoclip.data.tiles import (
    BANDS_FILE,
    LABELS_FILE,
    discover_tiles,
    read_tile,
    record_written,
    refuse_unwritten,
)
from geoclip.errors import GeoclipError
from geoclip.ioutils import atomic_dir, atomic_path, write_json

LINEAR_CLASSES = ("Highway", "River")  # drawn across a scene's regions rather than as regions
TRUTH_NODATA = 255
PIXEL_M = 10.0
ROW_TILES = 400  # tiles per row of the layout grid that keeps every tile at its own place
CONCEPT_SEED_BASE = 1 << 32  # concepts' seed keys start past any class index
CAPTION_STREAM = 7  # the caption's random stream beside a tile's own ([seed, class, n]): wording never moves pixels


def _check(params: Params) -> list[str]:
    """Return the class names to generate, or raise GeoclipError on params synth cannot honour."""
    names, s = list(params.classes.names), params.synth
    bad = [c for c in names if c not in EUROSAT_CLASSES]
    if bad:
        raise GeoclipError(f"classes.names: {bad} are not EuroSAT classes; synth can generate {list(EUROSAT_CLASSES)}")
    if not (32601 <= s.epsg <= 32660 or 32701 <= s.epsg <= 32760):
        raise GeoclipError(f"synth.epsg: {s.epsg} is not a WGS 84 / UTM zone (expected 32601-32660 or 32701-32760)")
    for key, low in [("tiles_per_class", 1), ("tiles_per_concept", 0), ("tile_size", 16), ("n_scenes", 0),
                     ("scene_size", 64)]:
        if getattr(s, key) < low:
            raise GeoclipError(f"synth.{key}: {getattr(s, key)} is too small (expected at least {low})")
    return names


def _profile(size: int, count: int, dtype: str, epsg: int, x0: float, y0: float, **extra) -> dict:
    """GeoTIFF profile for a square raster with a 10 m north-up geotransform."""
    return {"driver": "GTiff", "width": size, "height": size, "count": count, "dtype": dtype,
            "crs": f"EPSG:{epsg}", "transform": from_origin(x0, y0, PIXEL_M, PIXEL_M), **extra}


def _write(path: Path, data: np.ndarray, profile: dict, descriptions: tuple[str, ...] | None = None) -> None:
    """Write ``data`` (bands, H, W) with ``profile``; name the bands when given."""
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, name in enumerate(descriptions or ()):
            dst.set_band_description(i + 1, name)


def _tile_origin(index: int, size: int) -> tuple[float, float]:
    """Upper-left corner of tile number ``index`` on a grid wide enough that no two tiles overlap."""
    step = 1000.0 * np.ceil((size * PIXEL_M + 100) / 1000)
    return 200_000.0 + (index % ROW_TILES) * step, 5_900_000.0 - (index // ROW_TILES) * step


def synth_concepts(params: Params) -> list[str]:
    """The ``classes.concepts`` synth paints (those of its catalogue); a name it cannot paint is an error when
    synthetic tiles are the only source (with another source, that source brings its tiles)."""
    from geoclip.data.synth_concepts import CONCEPTS

    unknown = [c for c in params.classes.concepts if c not in CONCEPTS]
    if unknown and params.ingest.sources() == ["synthetic"]:
        raise GeoclipError(f"classes.concepts: {unknown} are not concepts synth can paint; expected names from "
                           f"geoclip.data.synth_concepts.CONCEPTS ({', '.join(CONCEPTS)})")
    return [c for c in params.classes.concepts if c in CONCEPTS]


def _tile_jobs(names: list[str], concepts: list[str], params: Params) -> list[tuple[str, int, int, int, Callable]]:
    """Per class then concept: (name, seed key, tiles, first layout index, surface painter)."""
    from geoclip.data.synth_concepts import concept_surface

    s = params.synth
    # Seeds by EuroSAT index and by the concept's name: a tile does not depend on the class or concept list.
    jobs = [(n, EUROSAT_CLASSES.index(n), s.tiles_per_class, EUROSAT_CLASSES.index(n) * s.tiles_per_class,
             tx.surface) for n in names]
    first = len(EUROSAT_CLASSES) * s.tiles_per_class
    for k, name in enumerate(concepts):
        key = CONCEPT_SEED_BASE + zlib.crc32(name.encode("utf-8"))
        jobs.append((name, key, s.tiles_per_concept, first + k * s.tiles_per_concept, concept_surface))
    return jobs


def _write_tiles(root: Path, names: list[str], params: Params, bar: tqdm, id_prefix: str = "",
                 concepts: list[str] = ()) -> pd.DataFrame:
    """Write ``tiles/<Class>/<id_prefix><Class>_<n>.tif`` for every class and concept; return the labels table
    (with each tile's caption: :mod:`geoclip.data.captions`)."""
    s, rows = params.synth, []
    for name, ci, count, first, paint in _tile_jobs(names, list(concepts), params):
        (root / "tiles" / name).mkdir(parents=True, exist_ok=True)
        comps = [tx.Composition() for _ in range(count)]
        surfaces = np.stack([paint(np.random.default_rng([s.seed, ci, n]), name, s.tile_size, s.tile_size, comp)
                             for n, comp in enumerate(comps, start=1)])
        data_all = tx.sensor(np.random.default_rng([s.seed, ci, 0]), surfaces)  # one batched call: much faster
        for n, data in enumerate(data_all, start=1):
            x0, y0 = _tile_origin(first + n - 1, s.tile_size)
            tile_id = f"{id_prefix}{name}_{n}"
            rel = f"tiles/{name}/{tile_id}.tif"
            _write(root / rel, data, _profile(s.tile_size, len(ALL_BAND_NAMES), "uint16", s.epsg, x0, y0,
                                              interleave="pixel"), ALL_BAND_NAMES)
            half = s.tile_size * PIXEL_M / 2
            words = caption(comps[n - 1], np.random.default_rng([s.seed, ci, n, CAPTION_STREAM]))
            rows.append({"id": tile_id, "path": rel, "class": name, "x": x0 + half, "y": y0 - half, "caption": words})
            bar.update(1)
    return pd.DataFrame(rows, columns=["id", "path", "class", "x", "y", "caption"])


def render_scene(rng: np.random.Generator, size: int, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A ``size``-square scene: warped Voronoi regions of area classes, a river and a highway across them.

    Returns the uint16 image ``(13, size, size)`` (0 = nodata in one corner) and the uint8 truth map
    (index into ``names``, 255 = nodata). Highway/River label a band around the road or channel, as wide
    as the context a 64 px tile of that class would show.
    """
    area = [c for c in names if c not in LINEAR_CLASSES]
    if not set(area) - {"SeaLake"}:  # no land to carry a road or river: every class becomes a region
        area = list(names)
    n = max(len(area), int(round((size / 360) ** 2)))
    regions = tx.voronoi(rng, size, size, n, warp=size / 40)
    region_class = np.concatenate([rng.permutation(len(area)), rng.integers(0, len(area), n - len(area))])
    img = np.empty((len(ALL_BAND_NAMES), size, size), np.float32)
    for r, box in enumerate(ndimage.find_objects(regions + 1)):
        if box is not None:
            patch = tx.surface(rng, area[region_class[r]], box[0].stop - box[0].start, box[1].stop - box[1].start)
            np.copyto(img[:, box[0], box[1]], patch, where=(regions[box] == r)[None])
    truth = np.array([names.index(c) for c in area], np.uint8)[region_class[regions]]
    land = truth != names.index("SeaLake") if "SeaLake" in names else np.ones_like(truth, bool)
    if "Highway" in names and "Highway" not in area:
        hw = tx.spectra("Highway")
        cover, verge, dist = tx.roads(rng, size, size, 1, ramps=False, with_distance=True)
        tx.blend(img, hw["green"], verge * 0.6 * land)
        tx.blend(img, hw["road"], cover * land)
        truth[(dist <= 24) & land] = names.index("Highway")
    if "River" in names and "River" not in area:
        rv, width = tx.spectra("River"), rng.uniform(12, 24)
        water, bank, dist = tx.channel(rng, size, size, width, with_distance=True)
        tx.blend(img, rv["green"], bank * 0.7 * land)
        tx.blend(img, rv["water"], water)
        truth[(np.abs(dist) <= width / 2 + 16) & land] = names.index("River")
    haze = 1 + 0.04 * tx.noise(rng, size, size, size / 3)  # slowly varying haze and water vapour
    img[[0, 1, 2]] *= haze[None]
    img[8] *= 1 + 0.1 * tx.noise(rng, size, size, size / 3)
    data = tx.sensor(rng, img)
    y, x = np.mgrid[0:size, 0:size]
    flip_y, flip_x = rng.integers(0, 2, 2)  # a nodata corner, as at the edge of a satellite swath
    corner = (np.where(flip_y, size - 1 - y, y) + np.where(flip_x, size - 1 - x, x)) < size * rng.uniform(0.06, 0.12)
    data[:, corner], truth[corner] = 0, TRUTH_NODATA
    return data, truth


def generate(params: Params) -> dict:
    """Write synthetic tiles, ``labels.csv`` and ``bands.json`` under ``paths.raw``, and scenes with their truth maps
    under ``paths.synthetic`` (``scenes/``, ``truth/``), each folder swapped in whole and only over ingest's own files.

    Scenes are kept out of ``paths.raw`` so a later ingest of real tiles, which replaces that folder, leaves them
    (and scoring's default ``score.scenes``) alone; scoring finds each truth map in ``truth/`` beside ``scenes/``.
    """
    raw, synthetic, start = Path(params.paths.raw), params.paths.synthetic_dir(), time.perf_counter()
    _check(params)
    # Both folders are checked (nothing of the user's inside) before any work; the scenes are swapped in first.
    with atomic_dir(raw, check=refuse_unwritten) as tmp, atomic_dir(synthetic, check=refuse_unwritten) as tmp_scenes:
        labels, scenes = write_synthetic(tmp, tmp_scenes, params)
        labels = labels.assign(source="synthetic")
        labels.to_csv(tmp / LABELS_FILE, index=False)
        write_json(tmp / BANDS_FILE, {"band_names": list(ALL_BAND_NAMES)})  # the order _write_tiles uses
        record_written(tmp)
        record_written(tmp_scenes)
    seconds = round(time.perf_counter() - start, 1)
    print(f"synth: {len(labels)} tiles written to {raw} and {len(scenes)} scene(s) to {synthetic} in {seconds} s",
          file=sys.stderr)  # stderr, beside the progress bars: stdout stays for the CLI's JSON summary
    return {"raw": str(raw), "tiles": len(labels), "classes": list(params.classes.names),
            "tiles_per_class": params.synth.tiles_per_class, "labels": LABELS_FILE, "synthetic": str(synthetic),
            "scenes": [str(synthetic / "scenes" / Path(p).name) for p in scenes],
            "truth": [str(synthetic / "truth" / f"{Path(p).stem}_truth.tif") for p in scenes], "seconds": seconds}


def write_synthetic(raw_tmp: Path, scenes_tmp: Path, params: Params, id_prefix: str = ""
                    ) -> tuple[pd.DataFrame, list[Path]]:
    """Write the synthetic tiles under ``raw_tmp`` and the scenes with truth maps under ``scenes_tmp``.

    Returns the tiles' labels (``id, path, class, x, y, caption``) and the scene files written. Callers own the folders
    (ingest writes them into temporary folders it swaps in whole).
    """
    names, s = _check(params), params.synth
    concepts = synth_concepts(params)
    raw_tmp.chmod(0o755)  # a temp dir is private; the data folder it becomes should not be
    total = len(names) * s.tiles_per_class + len(concepts) * s.tiles_per_concept
    with tqdm(total=total, desc="synth tiles", unit="tile") as bar:
        labels = _write_tiles(raw_tmp, names, params, bar, id_prefix, concepts)
    (scenes_tmp / "scenes").mkdir()
    (scenes_tmp / "truth").mkdir()
    scenes = []
    for k in tqdm(range(1, s.n_scenes + 1), desc="synth scenes", unit="scene"):
        data, truth = render_scene(np.random.default_rng([s.seed, 1000 + k]), s.scene_size, names)
        x0, y0 = 300_000.0 + (k - 1) * (s.scene_size * PIXEL_M + 5000), 5_000_000.0
        opts = {"tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate", "zlevel": 1}
        scene = scenes_tmp / "scenes" / f"scene_{k}.tif"
        _write(scene, data, _profile(s.scene_size, data.shape[0], "uint16", s.epsg, x0, y0, nodata=0, predictor=2,
                                     interleave="pixel", **opts), ALL_BAND_NAMES)
        _write(scenes_tmp / "truth" / f"scene_{k}_truth.tif", truth[None],
               _profile(s.scene_size, 1, "uint8", s.epsg, x0, y0, nodata=TRUTH_NODATA, **opts), ("class",))
        scenes.append(scene)
    return labels, scenes


# ---------------------------------------------------------------- calibration against real tiles
def _class_arrays(root: Path) -> dict[str, np.ndarray]:
    """All tiles under ``root/<Class>/`` as float32 ``(N, 13, H, W)`` arrays, by class."""
    df = discover_tiles(root)
    return {c: np.stack([read_tile(p) for p in g["path"]]).astype(np.float32)
            for c, g in df.groupby("class", sort=False) if c in EUROSAT_CLASSES}


def _index(px: np.ndarray, key: str) -> np.ndarray:
    """A spectral index over pixels ``(n, 13)``: ndvi, nir (B08) or vis (B02+B03+B04)."""
    b4, b8 = px[:, 3], px[:, 7]
    return {"ndvi": lambda: (b8 - b4) / (b8 + b4 + 1), "nir": lambda: b8,
            "vis": lambda: px[:, 1] + px[:, 2] + px[:, 3]}[key]()


def derive_calibration(real_dir: str | Path) -> dict:
    """Recompute ``ENDMEMBERS`` and ``TILE_PCS`` (as hard-coded in synth_calib) from real tiles."""
    endmembers, pcs = {}, {}
    for cls, arr in _class_arrays(Path(real_dir)).items():
        px = arr.astype(np.float64).transpose(0, 2, 3, 1).reshape(-1, arr.shape[1])
        free, groups = np.ones(len(px), bool), {}
        for rule in tx.MATERIAL_RULES[cls]:
            take = free.copy()
            if len(rule) > 1:  # the share of all pixels at the low/high end of the index, among those left
                _, key, share, end = rule
                idx = np.flatnonzero(free)
                val = _index(px[idx], key)
                take = np.zeros(len(px), bool)
                take[idx[np.argsort(val if end == "low" else -val, kind="stable")[:round(share * len(px))]]] = True
            groups[rule[0]] = [int(round(v)) for v in px[take].mean(0)]
            free &= ~take
        endmembers[cls] = groups
        pcs[cls] = _tile_pcs(arr)
    return {"endmembers": endmembers, "tile_pcs": pcs}


def _tile_pcs(arr: np.ndarray, k: int = 3) -> list[list[float]]:
    """The ``k`` principal components (each scaled by its standard deviation) of log tile-mean spectra: the
    directions in which a class's tiles differ (season, haze, cover mix), largest loading of each made positive."""
    log = np.log(arr.mean(axis=(2, 3), dtype=np.float64))
    _, s, vt = np.linalg.svd((log - log.mean(0)) / np.sqrt(len(log) - 1), full_matrices=False)
    pcs = s[:k, None] * vt[:k]
    pcs *= np.sign(pcs[np.arange(len(pcs)), np.abs(pcs).argmax(1)])[:, None]
    return [[round(float(v), 3) for v in pc] for pc in pcs]


def _stats(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-band pixel mean, pixel std and std of tile means of ``(N, 13, H, W)``."""
    means = arr.mean(axis=(2, 3), dtype=np.float64)
    return means.mean(0), arr.std(axis=(0, 2, 3), dtype=np.float64), means.std(0)


def _table(real: dict[str, np.ndarray], synth: dict[str, np.ndarray]) -> pd.DataFrame:
    """The calibration table from per-class arrays."""
    rows = []
    for cls in [c for c in EUROSAT_CLASSES if c in real and c in synth]:
        (rm, rs, rt), (sm, ss, st) = _stats(real[cls]), _stats(synth[cls])
        for b, band in enumerate(ALL_BAND_NAMES):
            rows.append({"class": cls, "band": band, "real_mean": rm[b], "real_std": rs[b], "real_tile_std": rt[b],
                         "synth_mean": sm[b], "synth_std": ss[b], "synth_tile_std": st[b],
                         "mean_ratio": sm[b] / rm[b], "std_ratio": ss[b] / rs[b]})
    if not rows:
        raise GeoclipError("no EuroSAT class has tiles in both folders; expected <Class>/<Class>_<n>.tif in each")
    return pd.DataFrame(rows)


def calibration_table(real_dir: str | Path, synth_tiles_dir: str | Path) -> pd.DataFrame:
    """Per-class, per-band mean and std of real and synthetic tiles, side by side."""
    return _table(_class_arrays(Path(real_dir)), _class_arrays(Path(synth_tiles_dir)))


HISTORY = "## Before and after"  # a hand-kept section at the end of the doc, carried over when it is rewritten


def write_calibration_doc(table: pd.DataFrame, path: str | Path, notes: list[str] | None = None) -> None:
    """Write the calibration table as markdown: a summary, then one table per class, then the ``HISTORY`` section
    of the file being replaced, if any."""
    dev = (table["mean_ratio"] - 1).abs()
    lines = ["# Calibration: synthetic versus real Sentinel-2 spectra", "",
             "Generated by `geoclip calibrate` (`geoclip.data.synth.calibrate`): per class and band, the mean and",
             "standard deviation of digital numbers (L1C, reflectance x 10000) over all pixels of all tiles,",
             "and the standard deviation of tile means (between-tile spread, which is what a colour-only",
             "classifier has to overcome). Real = the EuroSAT_MS dev sample (10 tiles per class), which is",
             "also what the synthetic class spectra were calibrated on: each class's real pixels were split",
             "into materials along a spectral index (`MATERIAL_RULES` in `geoclip/data/synth_textures.py`; e.g.",
             "water / fields / trees for River), and the textures give each material its real share of area.",
             "The generator's other constants (between-tile spectral directions, pixel-scale texture, noise, blur,",
             "atmospheric bands) are in `geoclip/data/synth_calib.py` and `synth_textures.py`, also measured on the",
             "dev tiles only. The 216 tiles of `../shared/data/eurosat_ms_train` are held out: never used to set a",
             "constant, only to measure the gap (`--held-out`) and zero-shot accuracy.",
             "Regenerate with `geoclip synth && geoclip calibrate --real ../shared/data/eurosat_ms_dev",
             "--held-out ../shared/data/eurosat_ms_train`.", "",
             f"- mean ratio synth/real: median |ratio - 1| = {dev.median():.3f}, 90th percentile = "
             f"{dev.quantile(0.9):.3f}, worst = {dev.max():.3f} "
             f"({table.loc[dev.idxmax(), 'class']} {table.loc[dev.idxmax(), 'band']})",
             f"- pixel std ratio synth/real: median {table['std_ratio'].median():.2f}, "
             f"range {table['std_ratio'].min():.2f} to {table['std_ratio'].max():.2f}",
             *[f"- {n}" for n in notes or []], ""]
    for cls, g in table.groupby("class", sort=False):
        lines += [f"## {cls}", "", "| band | real mean | synth mean | ratio | real std | synth std "
                  "| real tile std | synth tile std |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r.band} | {r.real_mean:.0f} | {r.synth_mean:.0f} | {r.mean_ratio:.2f} | {r.real_std:.0f} "
                  f"| {r.synth_std:.0f} | {r.real_tile_std:.0f} | {r.synth_tile_std:.0f} |" for r in g.itertuples()]
        lines.append("")
    old = Path(path).read_text() if Path(path).is_file() else ""
    history = old[old.index(HISTORY):] if HISTORY in old else ""
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + ("\n" + history if history else ""))


def calibrate(real_dir: str | Path, synth_tiles_dir: str | Path, out_md: str | Path,
              held_out_dir: str | Path | None = None) -> pd.DataFrame:
    """Compare synthetic tiles with real ones, write the markdown report to ``out_md``; return the table. With
    ``held_out_dir`` (real tiles never used to calibrate), report the realism gap on those too."""
    from geoclip.data.baselines import nearest_centroid_accuracy, realism_gap

    real, synth = _class_arrays(Path(real_dir)), _class_arrays(Path(synth_tiles_dir))
    table = _table(real, synth)
    notes = []
    classes = [c for c in EUROSAT_CLASSES if c in synth]
    x = np.concatenate([synth[c] for c in classes])
    y = np.concatenate([np.full(len(synth[c]), i) for i, c in enumerate(classes)])
    half = np.arange(len(y)) % 2 == 0  # even tiles train, odd tiles test
    if half.sum() and (~half).sum():
        acc = nearest_centroid_accuracy(x[half], y[half], x[~half], y[~half])
        notes.append(f"colour-only baseline (nearest centroid on standardised band means, half the synthetic "
                     f"tiles to train, half to test): {acc:.1%} on {len(classes)} classes")
    for which, reals in (("", real), (" (held-out real tiles)", _class_arrays(Path(held_out_dir)) if held_out_dir
                                       else {})):
        common = [c for c in classes if c in reals]
        if not common:
            continue
        real_all, synth_all = np.concatenate([reals[c] for c in common]), np.concatenate([synth[c] for c in common])
        if len(real_all) >= 10:
            texture_features = "band mean + std, spatial frequency, band correlations"
            for texture, what in ((False, "band mean + std"), (True, texture_features)):
                mean, sd = realism_gap(real_all, synth_all, texture)
                notes.append(f"real-vs-synthetic gap{which}: linear discriminant on {what}, 5-fold CV, "
                             f"{len(real_all)} real and as many synthetic tiles: {mean:.1%} +- {sd:.1%} "
                             "(50% = indistinguishable)")
    write_calibration_doc(table, out_md, notes)
    return table
