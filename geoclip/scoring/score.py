"""Sliding-window scoring of large scenes: blended class maps as Cloud-Optimised GeoTIFFs, area summaries.

Scenes are read in block-aligned strips (geoclip.scoring.scene_io), local or on S3 through GDAL's /vsis3/; blended rows
are written as soon as no later window can change them, so memory follows the strip and the batch, not the scene.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import posixpath
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path, PurePosixPath

import numpy as np

from geoclip.bands import ALL_BAND_NAMES, canonical_band
from geoclip.config import Params, ScoreConfig
from geoclip.data import s3
from geoclip.data.confine import refuse_outside
from geoclip.data.product_reader import ProductReader, ReadOptions, open_product
from geoclip.data.products import MTD_NAMES, discover_inputs, input_files, input_stem
from geoclip.data.tiles import walk_files
from geoclip.diskspace import require_free, writing
from geoclip.errors import GeoclipError
from geoclip.ioutils import write_json

# Re-exported, part of this module's API: window_starts, PROB_SCALE, blend_rows.
from geoclip.scoring.blend import NODATA_CLASS, PROB_SCALE, PredictFn, blend_rows, class_colors, write_outputs  # noqa: F401
from geoclip.scoring.embeddings import SUFFIX as EMBEDDINGS_SUFFIX
from geoclip.scoring.embeddings import EmbeddingWriter
from geoclip.scoring.pipeline import available_cores, in_background, read_ahead
from geoclip.scoring.quicklook import MAX_SIZE as QUICKLOOK_SIZE
from geoclip.scoring.quicklook import TrueColour, tapped, write_quicklook
from geoclip.scoring.scene_io import gdal_path, scene_env, scene_envs, strip_rows, window_starts  # noqa: F401

SCENE_DTYPE = "uint16"  # what every input is read as: EuroSAT-like digital numbers (the scenes suite's dtype rule)
SUMMARY_FILE = "summary.json"
# Per-scene outputs; the summary names the others (and goes last).
OUTPUT_KEYS = ("classmap", "probabilities", "novelty", "quicklook", "embeddings", "summary")
# Novelty at or above this is "unlike anything trained": farther from every class than 95% of validation tiles
# (geoclip.model.openset); the summaries' unfamiliar share and predict's count use it.
NOVELTY_THRESHOLD = 0.95


def row_areas_m2(src, scene: Path | str) -> np.ndarray:
    """Area of one pixel in each row, in m²: the pixel's area in a projected CRS in metres; on the WGS84 ellipsoid
    (pyproj.Geod) in a geographic CRS, where it shrinks with latitude."""
    crs, t = src.crs, src.transform
    if crs is None:
        raise GeoclipError(f"{scene}: no CRS; expected a georeferenced scene")
    if crs.is_projected:
        factor = crs.linear_units_factor[1]
        return np.full(src.height, abs(t.a * t.e - t.b * t.d) * factor * factor)
    if not crs.is_geographic or t.b or t.d:
        raise GeoclipError(f"{scene}: CRS {crs.to_string()} with transform {tuple(t)[:6]}; expected a projected CRS "
                           "or a north-up geographic one")
    from pyproj import Geod

    geod = Geod(ellps="WGS84")
    x0, x1 = t.c, t.c + t.a
    tops = t.f + t.e * np.arange(src.height + 1)
    return np.array([abs(geod.polygon_area_perimeter([x0, x1, x1, x0], [a, a, b, b])[0])
                     for a, b in itertools.pairwise(tops)])


def asset_uris(scene: str | Path) -> list[str]:
    """The asset hrefs of a local STAC item (they may be on S3 though the item is not: GDAL needs S3 settings)."""
    scene = str(scene)
    if s3.is_s3(scene) or not scene.lower().endswith(".json"):
        return []
    try:
        return input_files(scene)
    except GeoclipError:
        return []  # reading it will say what is wrong


def read_options(cfg: ScoreConfig) -> ReadOptions:
    """How scoring reads its inputs, from the score params."""
    return ReadOptions(band_names=tuple(cfg.band_names), reflectance_scale=cfg.reflectance_scale,
                       dn_offset=cfg.dn_offset, level=cfg.processing_level.upper(), mask=cfg.mask,
                       mask_classes=tuple(cfg.mask_classes), nodata=cfg.nodata,
                       band_fill={canonical_band(b): v for b, v in cfg.band_fill.items()})


def _open_scene(scene: Path | str, bands: Sequence[str], window: int, read: ReadOptions) -> ProductReader:
    """Open any input form in the model's band order and check its size against one window (a guard for direct
    callers of score_scene; score_one and score_scenes first run the scenes suite, :func:`check_scenes`)."""
    src = open_product(str(scene), bands, read)
    if src.height < window or src.width < window:
        src.close()
        raise GeoclipError(f"{scene}: {src.width}x{src.height} pixels is smaller than one {window}x{window} window")
    return src


def level_warnings(src: ProductReader, model_level: str, mismatch: str) -> list[str]:
    """A warning when the input's processing level is not the model's (an error with ``mismatch`` "error")."""
    level = src.describe()["processing_level"]
    if not model_level or not level or level == model_level:
        return []
    text = (f"{src.product.uri}: processing level {level}, but the model was trained on {model_level}: "
            f"{'bottom' if level == 'L2A' else 'top'}-of-atmosphere values differ, so classes may shift")
    if mismatch == "error":
        raise GeoclipError(text + " (score.level_mismatch: error; set it to warn to score anyway)")
    return [text]


def _find_truth(scene: Path | str, truth: Path | str | None) -> str | None:
    """The truth map to judge a scene by: ``truth``, else ``truth/{stem}_truth.tif`` beside the scenes folder;
    None when it does not exist."""
    if truth is None:
        stem = input_stem(str(scene))
        truth = truth_uri(str(scene)) if s3.is_s3(scene) else Path(scene).parent.parent / "truth" / f"{stem}_truth.tif"
    if s3.is_s3(truth):
        return str(truth) if s3.exists(str(truth)) else None
    return str(truth) if Path(truth).exists() else None


def scene_output_bytes(height: int, width: int, n_classes: int, window: int, stride: int, probabilities: bool,
                       embeddings: bool, embed_dim: int, novelty: bool = False) -> tuple[int, int]:
    """Bytes a scene's outputs take: (an estimate of the peak, uncompressed: each COG beside the plain GeoTIFF it is
    copied from and GDAL's overview file, float32 embeddings, the quick-look; the least they can take at the best
    compression seen: class maps, probabilities and novelty 64:1, embeddings 2:1, a smooth quick-look)."""
    pixels = height * width
    rasters = pixels * (1 + (n_classes if probabilities else 0) + (1 if novelty else 0))
    windows = ((height - window) // stride + 1) * ((width - window) // stride + 1)
    vectors = windows * (4 * embed_dim + 100) if embeddings else 0  # + footprint and row id, per window
    scale = max(1, -(-max(height, width) // QUICKLOOK_SIZE))
    panels = 2 * -(-height // scale) * -(-width // scale)  # true colour beside the class map
    estimate = int(rasters * 2.5 + vectors + panels * 4 + (64 << 10))
    return estimate, int(rasters / 64 + vectors / 2 + panels / 4)


def score_scene(predict_fn: PredictFn, scene: Path | str, out_dir: Path, class_names: list[str], window: int = 64,
                stride: int = 32, batch_size: int = 256, nodata: int = 0,
                bands: Sequence[str] = ALL_BAND_NAMES, model_uri: str | None = None, scene_name: str | None = None,
                quicklook: bool = True, truth: Path | str | None = None, probabilities: bool = False,
                embeddings: bool = False, read: ReadOptions | None = None, model_level: str = "",
                level_mismatch: str = "warn", full_resolution: bool = True, read_workers: int = 0,
                embed_dim: int = 0, output_stem: str | None = None, open_set: dict | None = None) -> dict:
    """Score one local or ``s3://`` input of any form (stacked raster, per-band folder, SAFE, STAC Item; see
    geoclip.data.products) read in the model's ``bands``: class map COG with its colour table, optional per-class
    probability COG, per-class areas, if a truth map exists pixel accuracy and, with ``embeddings``, each window's
    embedding and footprint (GeoParquet, see geoclip.scoring.embeddings).

    Reading (``read_workers`` threads, 0: the cores available), inference and writing overlap
    (geoclip.scoring.pipeline); the outputs are the bytes a sequential run writes. A volume that clearly cannot
    hold the outputs (:func:`scene_output_bytes`) is refused before the first window; one that fills up meanwhile
    is a :class:`geoclip.diskspace.NoSpaceError` (``embed_dim``: for the estimate only). Outputs are named
    ``{output_stem}_classmap.tif`` ... (default: the input's stem; see :func:`scene_keys`).

    ``open_set``: the served model's open-set report (geoclip.registry.pyfunc.served_open_set). Calibrated,
    ``predict_fn`` returns each window's ``novelty`` too: blended like the probabilities into
    ``{stem}_novelty.tif`` (uint8 0-254 = novelty 0-1, 255 nodata; the summary's ``novelty``) and summarised in its
    ``open_set`` (share of scored area at or above :data:`NOVELTY_THRESHOLD`, far classes); the far-class warning joins
    the scene's warnings."""
    out_dir, stem = Path(out_dir), output_stem or input_stem(str(scene))
    read = replace(read or ReadOptions(), nodata=nodata)
    if stride <= 0 or stride > window or window % stride:
        raise GeoclipError(f"stride {stride}: must be positive and divide the window ({window})")
    if not 2 <= len(class_names) < NODATA_CLASS:
        raise GeoclipError(f"class_names: {len(class_names)} classes; a uint8 class map holds 2 to {NODATA_CLASS - 1}")
    truth = _find_truth(scene, truth)
    started = time.perf_counter()
    uris = (scene, truth, *asset_uris(scene))
    envs = scene_envs(*uris)  # one S3 session for the scene, whichever thread reads
    with envs(), _open_scene(scene, bands, window, read) as src, contextlib.ExitStack() as guard:
        row_area = row_areas_m2(src, scene)  # fail before the long part
        what = f"the outputs of {scene_name or scene}"
        novelty = bool(open_set and open_set.get("calibrated"))
        need, least = scene_output_bytes(src.height, src.width, len(class_names), window, stride, probabilities,
                                         embeddings, embed_dim, novelty)
        require_free(out_dir, what, need, least)  # refuse now only what clearly cannot fit; nearer the edge, a volume
        # that fills up mid-scene is still said in one line
        guard.enter_context(writing(out_dir, what, need))
        warnings_ = level_warnings(src, model_level, level_mismatch)
        if open_set and open_set.get("warning"):
            warnings_.append(open_set["warning"])
        for text in warnings_:
            print(f"warning: {text}", file=sys.stderr)
        out_dir.mkdir(parents=True, exist_ok=True)
        outs = {"classmap": out_dir / f"{stem}_classmap.tif"}
        if probabilities:
            outs["probabilities"] = out_dir / f"{stem}_probabilities.tif"
        if novelty:
            outs["novelty"] = out_dir / f"{stem}_novelty.tif"
        tally = NoveltyTally(row_area)
        writer: list[EmbeddingWriter] = []  # made at the first batch, when the embedding width is known

        def sink(where: list[tuple[int, int]], emb: np.ndarray) -> None:
            if not writer:
                writer.append(EmbeddingWriter(out_dir / f"{stem}{EMBEDDINGS_SUFFIX}", scene_name or str(scene),
                                              src.transform, src.crs, window, emb.shape[1], model_uri))
            writer[0].add(where, emb)

        colour = TrueColour(src, nodata) if quicklook else None
        strips = read_ahead(src.reopen, src.height, src.width, strip_rows(src, window),
                            read_workers or available_cores(), env=envs)
        if colour is not None:
            strips = tapped(strips, colour.add)
        rows = in_background(blend_rows(predict_fn, src, len(class_names), window, stride, batch_size, nodata,
                                        probabilities, sink if embeddings else None, full_resolution, strips, novelty))
        try:
            with contextlib.closing(rows):  # inference runs ahead of the writing here, a bounded queue apart
                counts, areas, correct, judged = write_outputs(
                    tally.rows(rows) if novelty else rows, src, outs, list(class_names),
                    {"model_uri": str(model_uri), "scene": scene_name or str(scene)}, truth, row_area)
        except BaseException:
            for part in writer:
                part.abort()
            raise
        for part in writer:
            outs["embeddings"] = part.close()
        h, w, crs, described = src.height, src.width, src.crs.to_string(), src.describe()
        rgb = colour.image() if colour is not None else None
    seconds = time.perf_counter() - started
    summary = {
        "scene": scene_name or str(scene), "model_uri": model_uri, **{k: str(p) for k, p in outs.items()},
        "width": w, "height": h, "crs": crs, "pixel_area_m2": float(row_area.mean()),
        "area_method": "planar" if src.crs.is_projected else "geodesic (WGS84 ellipsoid)",
        "window": window, "stride": stride, "full_resolution": full_resolution, "input": described,
        "class_names": list(class_names),
        "classes": {c: {"pixels": int(counts[i]), "area_km2": float(areas[i]) / 1e6}
                    for i, c in enumerate(class_names)},
        "nodata_pixels": int(counts[NODATA_CLASS]), "valid_pixels": int(h * w - counts[NODATA_CLASS]),
        "area_km2": float(areas[:NODATA_CLASS].sum()) / 1e6, "warnings": warnings_,
        "seconds": round(seconds, 3), "megapixels_per_s": round(h * w / 1e6 / max(seconds, 1e-9), 3),
    }
    if open_set is not None:  # the raster is summary["novelty"], like the other outputs; its figures go here
        summary["open_set"] = ({"calibrated": True, **tally.figures()} if novelty
                               else {"calibrated": False, "note": _not_calibrated()})
        summary["open_set"]["far_classes"] = list(open_set.get("far_classes") or [])
    if truth is not None:
        summary |= {"truth": truth, "truth_pixels": judged, "accuracy": correct / judged if judged else None}
    with writing(out_dir, what, need):
        if quicklook:
            summary["quicklook"] = str(write_quicklook(outs["classmap"], out_dir / f"{stem}_quicklook.png",
                                                       list(class_names), rgb, summary))
        summary["summary"] = str(out_dir / f"{stem}_summary.json")
        write_json(summary["summary"], summary)
    return summary



class NoveltyTally:
    """Area-weighted novelty figures of a scene's blended rows, counted as they pass to the writer."""

    def __init__(self, row_area: np.ndarray):
        self.row_area = np.asarray(row_area, np.float64)
        self.scored = self.unfamiliar = self.weighted = 0.0

    def rows(self, rows):
        """Pass ``rows`` (BlendedRows) through, counting their novelty."""
        for part in rows:
            self.add(part.row, part.novelty)
            yield part

    def add(self, row: int, novelty: np.ndarray) -> None:
        """Count one block of novelty rows (uint8 0..PROB_SCALE, NODATA_CLASS where not scored) from scene ``row``."""
        area = np.broadcast_to(self.row_area[row:row + novelty.shape[0], None], novelty.shape)
        scored = novelty != NODATA_CLASS
        value = novelty.astype(np.float64) / PROB_SCALE
        self.scored += float(area[scored].sum())
        self.unfamiliar += float(area[scored & (value >= NOVELTY_THRESHOLD - 0.5 / PROB_SCALE)].sum())
        self.weighted += float((area * value)[scored].sum())

    def figures(self) -> dict:
        """The summary's novelty figures: threshold, unfamiliar share and area, mean novelty (None: nothing scored)."""
        share = self.unfamiliar / self.scored if self.scored else None
        return {"threshold": NOVELTY_THRESHOLD, "unfamiliar_share": share, "unfamiliar_km2": self.unfamiliar / 1e6,
                "scored_km2": self.scored / 1e6, "mean": self.weighted / self.scored if self.scored else None}


def _not_calibrated() -> str:
    """Why a scene has no novelty raster (geoclip.model.openset.NOT_CALIBRATED, imported only when needed)."""
    from geoclip.model.openset import NOT_CALIBRATED

    return NOT_CALIBRATED


def list_scenes(source: str | Path, allow_outside: bool = False) -> list[str]:
    """The inputs in a local folder or under an ``s3://bucket/prefix``, at any depth (sorted): stacked ``*.tif``
    scenes, folders of per-band files, SAFE products and STAC Item JSONs (geoclip.data.products.discover_inputs);
    folders whose names start with ``.`` or ``_`` (staging, the ledger) are skipped. Links to folders are followed;
    a file that a link leads outside the folder is refused unless ``allow_outside`` (score.allow_outside_paths)."""
    if s3.is_s3(source):
        root = str(source).rstrip("/")
        files = [u for u in s3.list_uris(root) if not _hidden(u[len(root) + 1:])]
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise GeoclipError(f"{folder}: no such folder; expected a folder of scenes or an s3:// prefix")
        root = str(folder)
        files = [str(p) for p in walk_files(folder) if p.is_file() and not _hidden(p.relative_to(folder).as_posix())]
        refuse_outside(files, folder, "score.allow_outside_paths", allow_outside, where=str(source),
                       place="this folder", expected="scenes")
        files = _once_each(files, folder)
    found = discover_inputs(root, files)
    if not found:
        raise GeoclipError(f"{source}: no scenes found (expected .tif scenes, per-band folders, SAFE products or "
                           "STAC Item JSONs)")
    return found


def _once_each(files: list[str], folder: Path) -> list[str]:
    """``files`` less the links to a file also listed (``latest.tif`` -> ``2024/T32UQD.tif``): one scene is scored
    once, under its own path, not again under each name a link gives it."""
    base = folder.resolve()
    target = {f: Path(f).resolve() for f in files}
    own = {f for f in files if target[f] == base / Path(f).relative_to(folder)}  # no link on the way
    listed = {target[f] for f in own}
    return [f for f in files if f in own or target[f] not in listed]


def _hidden(relative: str) -> bool:
    """True for a path (relative to the scenes root) inside a ``.``/``_`` folder or naming a hidden file."""
    *folders, name = relative.split("/")
    return name.startswith(".") or any(part.startswith((".", "_")) for part in folders)


def scene_key(scene_uri: str, root: str | Path) -> str:
    """A scene's identity: its path below the scenes root without the suffix (``2023/T32UQD``; a product folder's
    path, less ``.SAFE``).

    Outputs (``{out}/2023/T32UQD_classmap.tif``) and ledger entries are keyed by it, so two scenes with one file
    name in different folders stay two scenes; a scene directly in the root keeps its plain stem.
    """
    scene, base = str(scene_uri).rstrip("/"), str(root).rstrip("/")
    if not s3.is_s3(scene):
        scene, base = Path(scene).resolve().as_posix(), Path(base).resolve().as_posix()
    if not scene.startswith(base + "/"):
        return input_stem(scene)
    relative = scene[len(base) + 1:]
    folder = relative.rsplit("/", 1)[0] + "/" if "/" in relative else ""
    if folder and input_stem(scene) != input_stem(relative.rsplit("/", 1)[-1]):  # an MTD: its SAFE folder
        folder = folder.rsplit("/", 2)[0] + "/" if folder.count("/") > 1 else ""
    return folder + input_stem(scene)


def _unit_name(scene_uri: str) -> str:
    """The file or folder name a scene's stem comes from, suffix and all (a SAFE folder's for its MTD)."""
    path = PurePosixPath(str(scene_uri).rstrip("/"))
    return path.parent.name if path.name in MTD_NAMES else path.name


def scene_keys(scenes: list[str], root: str | Path, recorded: Callable[[str], set[str]] | None = None
               ) -> dict[str, str]:
    """Every scene's identity (:func:`scene_key`), kept apart where stems collide in one folder.

    ``T32.tif`` and ``T32.tiff`` would both be ``T32``: each then keeps its suffix (``T32.tif``, ``T32.tiff``), so
    neither overwrites the other's outputs or ledger entry, except the one whose file name the ledger already
    recorded under the plain stem (``recorded(key)``: the inputs its done records name), which keeps it and is not
    scored again. GeoclipError, naming the files, if two scenes still share an identity.
    """
    keys = {s: scene_key(s, root) for s in scenes}
    groups: dict[str, list[str]] = {}
    for s, k in keys.items():
        groups.setdefault(k, []).append(s)
    for key, group in groups.items():
        if len(group) < 2:
            continue
        known = {_unit_name(u) for u in (recorded(key) if recorded else set())}
        holders = [s for s in group if _unit_name(s) in known]
        for s in group:
            if s not in holders[:1]:
                keys[s] = posixpath.join(posixpath.dirname(key), _unit_name(s))
    seen: dict[str, str] = {}
    for s, k in keys.items():
        if k in seen:
            raise GeoclipError(f"{seen[k]} and {s}: both would be scored as {k!r} (their outputs would overwrite "
                               "each other); rename one of them")
        seen[k] = s
    return keys


def truth_uri(scene_uri: str) -> str:
    """Where a scene's truth map lives: ``truth/{stem}_truth.tif`` beside the scenes folder."""
    parent = scene_uri.rsplit("/", 2)[0]
    return f"{parent}/truth/{input_stem(scene_uri)}_truth.tif"


def check_scenes(params: Params, scenes: list[str | Path], bands: Sequence[str], names: list[str] | None = None,
                 report: bool = False) -> None:
    """Run the scenes suite on local or ``s3://`` inputs of any form, as the model will read them (headers and a
    small sample only; S3 through /vsis3/, nothing downloaded); GeoclipError before any scoring. ``names``: what to
    call them (default: as given).

    ``report`` also writes ``scenes_validation.json`` and the scenes Data Docs under ``paths.reports``.
    """
    from geoclip.data.validate import validate_scenes

    read = read_options(params.score)
    reports = Path(params.paths.reports) if report else None
    with scene_env(*scenes, *(a for s in scenes for a in asset_uris(s))):
        validate_scenes([str(s) for s in scenes], len(bands), params.score.window, reports,
                        names=names or [str(s) for s in scenes], dtype=SCENE_DTYPE,
                        opener=lambda uri: open_product(uri, bands, read))


def class_request(cfg: ScoreConfig) -> dict[str, list[str]] | None:
    """The served model's class params for ``score.classes`` / ``score.classes_file`` (None: the trained classes)."""
    from geoclip.model.vocab import requested_classes

    request = requested_classes(cfg.classes, cfg.classes_file, "score.classes")
    if request and len(request["classes"]) >= NODATA_CLASS:
        where = "score.classes" if cfg.classes else cfg.classes_file
        raise GeoclipError(f"{where}: {len(request['classes'])} classes; a uint8 class map holds at most "
                           f"{NODATA_CLASS - 1} (predict tiles with `geoclip predict` for longer lists)")
    return request


def scoring_identity(model_uri: str, classes: dict[str, list[str]] | None) -> str:
    """What a scene is scored once with: the model, and the class list when it is not the trained one."""
    if not classes:
        return model_uri
    digest = hashlib.sha256(json.dumps(classes, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]
    return f"{model_uri}#classes={digest}"


def score_one(params: Params, model, scene_uri: str, out_uri: str, model_uri: str | None = None,
              checked: bool = False, publishing: Callable[[], AbstractContextManager] = contextlib.nullcontext,
              progress: Callable[[], None] = lambda: None, output_stem: str | None = None) -> dict:
    """Score one local or S3 scene with a loaded pyfunc; write outputs to a local folder or S3 prefix.

    An S3 scene and its truth map are read in place through GDAL's /vsis3/, never downloaded. The scene first
    passes the scenes suite, unless ``checked`` says it already did. S3 outputs are written to a temporary
    folder, then uploaded, the summary last, each upload inside ``publishing()`` (the exactly-once fence).
    """
    from geoclip.registry.pyfunc import model_metadata, served_open_set
    from geoclip.scoring.predict import check_class_columns

    meta = model_metadata(model)
    cfg = params.score
    classes = class_request(cfg)
    open_set = served_open_set(model, classes)  # None: a model that predates open-set scores
    novelty = bool(open_set and open_set.get("calibrated"))

    def predict_fn(x: np.ndarray) -> np.ndarray:
        progress()  # a batch was read: the exactly-once claim may be renewed
        # score.tta, not the pyfunc default (tiles are served with the evaluated TTA; scenes rarely want 8x the work).
        served = {"batch_size": cfg.batch_size, "tta": cfg.tta, **(classes or {})}
        out = model.predict(x, params=served)
        probs = out["probabilities"]
        if classes:
            probs = check_class_columns(np.asarray(probs), classes["classes"], str(model_uri))
        if not cfg.embeddings and not novelty:
            return probs
        return ({"probabilities": probs} | ({"embeddings": out["embeddings"]} if cfg.embeddings else {})
                | ({"novelty": out["novelty"]} if novelty else {}))

    kwargs = {"class_names": classes["classes"] if classes else meta["class_names"], "window": cfg.window,
              "stride": cfg.stride, "batch_size": cfg.batch_size, "nodata": cfg.nodata,
              "bands": list(meta["input_band_names"]), "model_uri": model_uri, "scene_name": str(scene_uri),
              "quicklook": cfg.quicklook, "probabilities": cfg.probabilities, "embeddings": cfg.embeddings,
              "read": read_options(cfg), "model_level": meta.get("processing_level") or "",
              "level_mismatch": cfg.level_mismatch, "full_resolution": cfg.full_resolution,
              "read_workers": cfg.read_workers, "embed_dim": int(meta.get("embed_dim") or 0),
              "output_stem": output_stem, "open_set": open_set}
    if not checked:
        check_scenes(params, [scene_uri], kwargs["bands"])
    if not s3.is_s3(out_uri):
        return score_scene(predict_fn, scene_uri, Path(out_uri), **kwargs)
    with tempfile.TemporaryDirectory(prefix="geoclip-score-") as tmp:
        summary = score_scene(predict_fn, scene_uri, Path(tmp), **kwargs)
        keys = [k for k in OUTPUT_KEYS if k in summary]
        local = {k: Path(summary[k]) for k in keys}
        summary |= {k: s3.join(out_uri, p.name) for k, p in local.items()}
        write_json(local["summary"], summary)
        for key in keys:  # the summary last: it names the others
            with publishing():  # each upload fenced: nothing goes up once the scene's claim was taken over
                s3.upload(local[key], summary[key])
    return summary


def _overall_novelty(results: list[dict]) -> dict | None:
    """The unfamiliar share over every scene with a novelty raster (None: none has one)."""
    figures = [r["open_set"] for r in results if (r.get("open_set") or {}).get("calibrated")]
    if not figures:
        return None
    scored = sum(f.get("scored_km2") or 0.0 for f in figures)
    unfamiliar = sum(f.get("unfamiliar_km2") or 0.0 for f in figures)
    return {"threshold": NOVELTY_THRESHOLD, "scenes": len(figures), "unfamiliar_km2": unfamiliar,
            "unfamiliar_share": unfamiliar / scored if scored else None}


def write_summary(results: list[dict], out_uri: str, model_uri: str | None = None) -> str:
    """Aggregate per-scene summaries (areas, nodata, accuracy) into ``{out}/summary.json``; return its location.

    Scenes skipped as already done count with the summary recorded when they were scored.
    """
    names = results[0]["class_names"] if results else []
    total = {c: {"pixels": sum(r["classes"][c]["pixels"] for r in results),
                 "area_km2": sum(r["classes"][c]["area_km2"] for r in results)} for c in names}
    judged = sum(r.get("truth_pixels", 0) for r in results)
    correct = sum(r["accuracy"] * r["truth_pixels"] for r in results if r.get("accuracy") is not None)
    agg = {"model_uri": model_uri, "n_scenes": len(results), "scenes": [r["scene"] for r in results],
           "n_scored": sum(r.get("status") == "scored" for r in results),
           "n_skipped": sum(r.get("status") == "skipped" for r in results),
           "classes": total, "nodata_pixels": sum(r["nodata_pixels"] for r in results),
           "area_km2": sum(r["area_km2"] for r in results), "accuracy": correct / judged if judged else None,
           "open_set": _overall_novelty(results), "per_scene": results}
    if s3.is_s3(out_uri):
        target = s3.join(out_uri, SUMMARY_FILE)
        with tempfile.TemporaryDirectory(prefix="geoclip-summary-") as tmp:
            write_json(Path(tmp, SUMMARY_FILE), agg)
            s3.upload(Path(tmp, SUMMARY_FILE), target)
        return target
    target = str(Path(out_uri) / SUMMARY_FILE)
    write_json(target, agg)
    return target
