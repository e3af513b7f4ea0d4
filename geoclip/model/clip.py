"""The GeoCLIP model: a multispectral timm image encoder, a ground-cover class encoder, a temperature."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models import adapt_input_conv
from torch import nn

from geoclip.bands import ALL_BAND_NAMES, band_indices
from geoclip.config import FREEZE_CHOICES, parse_freeze
from geoclip.errors import GeoclipError
from geoclip.ioutils import atomic_path
from geoclip.model.loss import MAX_LOGIT_SCALE, SIGLIP_INIT_BIAS

WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "model_config.json"
_SET_BY_GEOCLIP = ("in_chans", "num_classes", "pretrained")  # timm kwargs that encoder_args may not override
_WRAPPER_PREFIXES = ("module.", "encoder.", "backbone.", "model.")  # DDP / SSL / Lightning key prefixes
STATS_WIDTH = 128  # width of the spectral-statistics branch (ModelConfig.spectral_stats)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a trained model, stored beside its weights."""

    image_encoder: str
    embed_dim: int
    band_names: list[str]
    class_names: list[str]
    prompts: list[list[str]]  # per class, one prompt per template (ensembled)
    band_mean: list[float]  # per selected band, raw digital numbers
    band_std: list[float]
    text_dim: int = 384
    tile_size: int = 64
    init_temperature: float = 0.07
    # The band order of the files the model is served on (the training data's bands.json); ``band_names``
    # are picked from these by name, so a served model takes whole source files as they are.
    input_band_names: list[str] = field(default_factory=lambda: list(ALL_BAND_NAMES))
    processing_level: str = "L1C"  # of the training tiles (EuroSAT: top of atmosphere); scoring warns on another
    loss: str = "clip"  # "clip" or "siglip": only siglip trains ``logit_bias``
    encoder_args: dict = field(default_factory=dict)  # extra timm.create_model kwargs, e.g. img_size/patch_size
    # Fine-tune the sentence encoder on the prompts' token ids. Training only: save_model stores the
    # fine-tuned encoder's prompt features instead, so served models never need the transformer.
    text_finetune: bool = False
    text_projection: str = "mlp"  # "mlp" or "linear": the class side's projection (train.text_projection)
    # Feed each tile's per-band mean and standard deviation (of the standardised input) through a small MLP
    # beside the convolutional features: spectral statistics alone separate most ground covers, and a CNN
    # trained on a few hundred real tiles does not reliably learn them from pixels.
    spectral_stats: bool = False
    # How the trained classes were worded (classes.templates, classes.descriptions): new class names at inference
    # (geoclip.model.vocab) are worded the same way. Empty in models saved before these were recorded.
    templates: list[str] = field(default_factory=list)
    descriptions: dict[str, str] = field(default_factory=dict)
    # True when the prompt features came from a fine-tuned sentence encoder that is not saved: the frozen one's
    # embeddings of new class names would not match what ``text_proj`` was trained on.
    text_encoder_finetuned: bool = False
    # A pretrained prior (geoclip.model.pretrained): the source's name and what it records of its weights. The
    # encoder is built from its architecture; its bands are standardised the way the weights were trained.
    pretrained: str = ""
    provenance: dict[str, str] = field(default_factory=dict)
    # Tiles are resized to this many pixels a side before the encoder (0: as they are), inside the model, so
    # exports and scene scoring resize the same way.
    input_size: int = 0
    # Also pool these stages (indices into the encoder's timm feature_info) beside its final pooled features:
    # earlier stages carry the texture a photograph-trained network knows best.
    feature_stages: list[int] = field(default_factory=list)
    # Open-set calibration (geoclip.model.openset): the 0..100 % quantiles of validation tiles' cosine similarity to
    # their own class (openset.calibrate, at the end of training), and the wordings of every class and concept trained
    # on (class names, descriptions, caption phrases). Empty in models saved before: novelty is then "not calibrated",
    # and far class prompts are judged against the trained prompts and descriptions.
    open_set_quantiles: list[float] = field(default_factory=list)
    learnt_texts: list[str] = field(default_factory=list)


def create_image_encoder(cfg: ModelConfig) -> nn.Module:
    """The timm backbone (no classifier head) for ``len(band_names)`` input bands and ``tile_size`` tiles."""
    if not timm.is_model(cfg.image_encoder):
        raise GeoclipError(f"train.image_encoder: unknown timm model {cfg.image_encoder!r}; expected a name "
                           "from timm.list_models(), e.g. 'resnet18'")
    clash = sorted(set(cfg.encoder_args) & set(_SET_BY_GEOCLIP))
    if clash:
        raise GeoclipError(f"train.encoder_args: {clash} are set by geoclip (bands, no head, local weights); "
                           "remove them")
    try:
        encoder = timm.create_model(cfg.image_encoder, pretrained=False, in_chans=len(cfg.band_names),
                                    num_classes=0, **cfg.encoder_args)
    except (TypeError, ValueError, AssertionError) as exc:
        raise GeoclipError(f"train.encoder_args: {cfg.encoder_args} rejected by timm model "
                           f"{cfg.image_encoder!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                           ) from exc
    # ViTs fix their input size at build time: fail here, not with a shape error in the first batch.
    patch = getattr(encoder, "patch_embed", None)
    size = getattr(patch, "img_size", None)
    seen = cfg.input_size or cfg.tile_size  # what the encoder is fed (tiles resized inside the model)
    if size is not None and getattr(patch, "strict_img_size", False) and tuple(size) != (seen,) * 2:
        raise GeoclipError(f"train.encoder_args: {cfg.image_encoder} expects {size[0]}x{size[1]} px input but "
                           f"it is fed {seen} px; set encoder_args: {{img_size: {seen}}}")
    if cfg.feature_stages:
        info = getattr(encoder, "feature_info", None) or []
        bad = [i for i in cfg.feature_stages if not 0 <= i < len(info)]
        if bad or not hasattr(encoder, "forward_intermediates"):
            raise GeoclipError(f"train.feature_stages: {list(cfg.feature_stages)}, but {cfg.image_encoder} has "
                               f"{len(info)} stages with intermediate outputs; expected indices 0 to {len(info) - 1}")
    return encoder


def tower_features(encoder: nn.Module, x: torch.Tensor, input_size: int = 0,
                   stages: tuple[int, ...] | list[int] = ()) -> torch.Tensor:
    """The encoder's pooled features of standardised tiles: resized to ``input_size`` first (0: as they are), and
    with the pooled outputs of ``stages`` (timm feature_info indices) before the final pooled features."""
    if input_size:  # unconditionally (no branch on the shape): a traced export resizes any tile size alike
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    if not stages:
        return encoder(x)
    final, inter = encoder.forward_intermediates(x, indices=list(stages))
    return torch.cat([h.mean(dim=(2, 3)) for h in inter] + [encoder.forward_head(final, pre_logits=True)], dim=1)


def tower_width(encoder: nn.Module, stages: tuple[int, ...] | list[int] = ()) -> int:
    """How many features :func:`tower_features` gives per tile."""
    return encoder.num_features + sum(encoder.feature_info[i]["num_chs"] for i in stages)


def image_features(encoder: nn.Module, stats_mlp: nn.Module | None, x: torch.Tensor, input_size: int = 0,
                   stages: tuple[int, ...] | list[int] = (), tower: torch.Tensor | None = None) -> torch.Tensor:
    """The encoder's pooled features of standardised tiles, then (with ``stats_mlp``) the spectral-statistics branch.

    One function for the model and its export, so both compute the same features. ``tower``: the encoder's
    features of these tiles already computed (a frozen encoder's cache), so only the statistics are computed.
    """
    features = tower_features(encoder, x, input_size, stages) if tower is None else tower
    if stats_mlp is None:
        return features
    stats = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1).to(features.dtype)
    return torch.cat([features, stats_mlp(stats)], dim=1)


class GeoCLIP(nn.Module):
    """CLIP-style model: raw multispectral tiles and class prompts in one embedding space.

    The image side takes raw digital numbers (uint16 or float) in ``band_names`` order and
    normalises them itself, so band order and statistics travel with the weights. The class side
    projects sentence embeddings of the prompts with a trainable MLP; prompts of one class are
    ensembled by averaging their projected embeddings. The sentence embeddings are the frozen
    encoder's (``prompt_features``, a buffer) unless ``cfg.text_finetune``, when ``text_encoder`` (a
    trainable copy of the sentence encoder) embeds the prompts' token ids in every forward.
    """

    def __init__(self, cfg: ModelConfig, prompt_features: torch.Tensor | np.ndarray | None = None,
                 text_encoder: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        n_classes = len(cfg.class_names)
        self.image_encoder = create_image_encoder(cfg)
        self.stats_mlp = None
        width = tower_width(self.image_encoder, cfg.feature_stages)
        if cfg.spectral_stats:
            self.stats_mlp = nn.Sequential(nn.Linear(2 * len(cfg.band_names), STATS_WIDTH), nn.GELU(),
                                           nn.Linear(STATS_WIDTH, STATS_WIDTH))
            width += STATS_WIDTH
        self.image_proj = nn.Linear(width, cfg.embed_dim)
        if cfg.text_projection == "linear":
            self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, cfg.embed_dim))
        else:
            self.text_proj = nn.Sequential(
                nn.Linear(cfg.text_dim, cfg.text_dim), nn.GELU(), nn.Linear(cfg.text_dim, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        # Always present (one state-dict layout for every loss) but trained only by siglip: a parameter
        # that never gets a gradient would break DistributedDataParallel.
        self.logit_bias = nn.Parameter(torch.tensor(SIGLIP_INIT_BIAS), requires_grad=cfg.loss == "siglip")
        self.register_buffer("band_mean", torch.tensor(cfg.band_mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("band_std", torch.tensor(cfg.band_std, dtype=torch.float32).view(1, -1, 1, 1))
        n_templates = max(len(p) for p in cfg.prompts)
        if prompt_features is None:
            prompt_features = torch.zeros(n_classes, n_templates, cfg.text_dim)
        self.register_buffer("prompt_features", torch.as_tensor(prompt_features, dtype=torch.float32))
        self.text_encoder = None
        if cfg.text_finetune:
            from geoclip.model.text import tokenize, trainable_encoder

            self.text_encoder = text_encoder if text_encoder is not None else trainable_encoder()
            tok = tokenize([p for prompts in cfg.prompts for p in prompts])
            # Derived from cfg.prompts, so not saved (persistent=False); moved with the model to its device.
            self.register_buffer("prompt_input_ids", tok["input_ids"], persistent=False)
            self.register_buffer("prompt_attention_mask", tok["attention_mask"], persistent=False)

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Raw digital numbers to standardised float input."""
        return (x.float() - self.band_mean) / self.band_std

    def scale(self) -> torch.Tensor:
        """The inverse temperature ``exp(logit_scale)``, capped like the losses cap it."""
        return self.logit_scale.exp().clamp(max=math.exp(MAX_LOGIT_SCALE))

    def tower_features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's features ``(N, F)`` of standardised tiles (what a frozen encoder's cache holds)."""
        return tower_features(self.image_encoder, x, self.cfg.input_size, self.cfg.feature_stages)

    def image_features(self, x: torch.Tensor, tower: torch.Tensor | None = None) -> torch.Tensor:
        """Unprojected features ``(N, F)`` of standardised tiles (:meth:`normalize_input`); ``tower``: the encoder's
        part already computed (:meth:`tower_features`)."""
        return image_features(self.image_encoder, self.stats_mlp, x, self.cfg.input_size, self.cfg.feature_stages,
                              tower)

    def encode_image(self, x: torch.Tensor, normalize: bool = True, tower: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """Embed raw tiles ``(N, bands, H, W)`` into ``(N, embed_dim)``; ``tower``: see :meth:`image_features`."""
        z = self.image_proj(self.image_features(self.normalize_input(x), tower))
        return F.normalize(z, dim=-1) if normalize else z

    def freeze_image(self, spec: str) -> list[str]:
        """Freeze the image encoder (``"all"``), its stem and stages up to ``"stage N"`` (timm feature_info index
        N), or nothing (``"none"``): no gradients, batch-norm statistics kept (eval mode even while training).
        Returns the names of the frozen parameters."""
        names = frozen_parameter_names(self.image_encoder, spec)
        for name, p in self.image_encoder.named_parameters():
            p.requires_grad_(name not in names)
        self._frozen_spec = spec
        self.train(self.training)
        return sorted(names)

    def train(self, mode: bool = True) -> GeoCLIP:
        """Set training mode; frozen encoder parts stay in eval mode, their batch-norm statistics untouched."""
        super().train(mode)
        spec = getattr(self, "_frozen_spec", "none")
        if mode and spec != "none":
            for module in frozen_modules(self.image_encoder, spec):
                module.eval()
        return self

    def encode_text(self, text_features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Project sentence-encoder features ``(..., text_dim)`` into ``(..., embed_dim)``."""
        z = self.text_proj(text_features)
        return F.normalize(z, dim=-1) if normalize else z

    def prompt_text_features(self) -> torch.Tensor:
        """Sentence embeddings of the prompts ``(C, T, text_dim)``: cached, or from the fine-tuned encoder."""
        if self.text_encoder is None:
            return self.prompt_features
        flat = self.text_encoder(self.prompt_input_ids, self.prompt_attention_mask)
        return flat.view(*self.prompt_features.shape[:2], -1).float()

    def class_embeddings(self) -> torch.Tensor:
        """Unit class embeddings ``(C, embed_dim)`` of the trained classes, ensembled over prompt templates."""
        return self.embed_classes(self.prompt_text_features())

    def embed_classes(self, prompt_features: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
        """Unit class embeddings ``(C, embed_dim)``: each class the mean of its projected prompt embeddings.

        ``prompt_features``: sentence embeddings ``(C, T, text_dim)``, or ``(P, text_dim)`` with ``counts`` (prompts
        per class, in order) when classes have different numbers of prompts.
        """
        if counts is None:
            counts = [prompt_features.shape[1]] * prompt_features.shape[0]
            prompt_features = prompt_features.flatten(0, 1)
        per_prompt = self.encode_text(prompt_features, normalize=True)  # (P, D)
        if len(set(counts)) == 1:
            means = per_prompt.view(len(counts), counts[0], -1).mean(dim=1)
        else:
            means = torch.stack([chunk.mean(dim=0) for chunk in per_prompt.split(counts)])
        return F.normalize(means, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, C)`` for raw tiles (a softmax over classes classifies, whatever the loss)."""
        return self.scale() * self.encode_image(x) @ self.class_embeddings().T

    @torch.no_grad()
    def predict(self, x: torch.Tensor, tta: bool = False, classes: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class probabilities ``(N, C)`` and unit image embeddings ``(N, D)`` for raw tiles.

        ``tta``: embed the tile's 8 flips and 90-degree rotations and average them (8x the compute).
        ``classes``: unit class embeddings ``(C, D)`` of another class list (:meth:`embed_classes`); default the
        trained classes.
        """
        if tta:
            img = F.normalize(sum(self.encode_image(v) for v in dihedral_views(x)), dim=-1)
        else:
            img = self.encode_image(x)
        classes = self.class_embeddings() if classes is None else classes.to(img.device, img.dtype)
        return (self.scale() * img @ classes.T).softmax(dim=-1), img


def frozen_modules(encoder: nn.Module, spec: str) -> list[nn.Module]:
    """The encoder's modules ``spec`` freezes (see :meth:`GeoCLIP.freeze_image`), in forward order."""
    stage = parse_freeze(spec)
    named = list(encoder.named_modules())[1:]
    if stage == "none":
        return []
    if stage == "all":
        return [m for _, m in named]
    info = getattr(encoder, "feature_info", None)
    if info is None or stage >= len(info):
        raise GeoclipError(f"train.freeze_image: {spec!r}, but the encoder has {len(info or [])} stages "
                           f"(0 to {len(info or []) - 1}); expected {FREEZE_CHOICES}")
    last = info[stage]["module"]
    # Everything defined up to the end of that stage's module: the stem and the stages before it.
    end = max(i for i, (name, _) in enumerate(named) if name == last or name.startswith(last + "."))
    return [m for _, m in named[:end + 1]]


def frozen_parameter_names(encoder: nn.Module, spec: str) -> set[str]:
    """Names (in ``encoder.named_parameters()``) of the parameters ``spec`` freezes."""
    frozen = {id(m) for m in frozen_modules(encoder, spec)}
    return {f"{mod_name}.{p_name}" if mod_name else p_name
            for mod_name, module in encoder.named_modules() if id(module) in frozen
            for p_name, _ in module.named_parameters(recurse=False)}


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips and 90-degree rotations of ``(N, C, H, W)`` tiles: seen from above, ground cover has no "up"."""
    turns = [torch.rot90(x, k, (2, 3)) for k in range(4)]
    return turns + [t.flip(3) for t in turns]


@torch.no_grad()
def predict_batches(model: GeoCLIP, images: np.ndarray, batch_size: int, device: torch.device | str = "cpu",
                    band_idx: list[int] | None = None, progress=None, tta: bool = False,
                    classes: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities ``(N, C)`` and embeddings ``(N, D)`` (float32) for raw tiles, in bounded batches.

    The one inference loop shared by evaluation and the served pyfunc, so both compute the same numbers.
    ``band_idx`` picks the model's bands from wider input; ``progress`` wraps the batch starts (e.g. tqdm);
    ``tta`` averages the embeddings of each tile's 8 flips/rotations (:func:`dihedral_views`); ``classes``: unit
    class embeddings of another class list (:meth:`GeoCLIP.embed_classes`), default the trained classes.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    model.eval()
    probs, embs = [], []
    starts = range(0, len(images), batch_size)
    for start in (progress(starts) if progress else starts):
        chunk = np.asarray(images[start:start + batch_size])
        x = torch.from_numpy(chunk[:, band_idx] if band_idx is not None else np.array(chunk))
        # uint16 has partial kernel support; channels_last makes oneDNN / cuDNN convolutions faster. On a GPU the
        # batch goes up from pinned memory without blocking this thread (the copy is ordered before the kernels).
        x = x.to(torch.int32).pin_memory().to(device, non_blocking=True) if cuda else x.to(torch.float32)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            p, e = model.predict(x, tta=tta, classes=classes)
        probs.append(p.float().cpu().numpy())
        embs.append(e.float().cpu().numpy())
    if not probs:  # an empty input still answers with the right widths
        n_classes = len(model.cfg.class_names) if classes is None else len(classes)
        return np.zeros((0, n_classes), np.float32), np.zeros((0, model.cfg.embed_dim), np.float32)
    return np.concatenate(probs), np.concatenate(embs)


@dataclass
class InitReport:
    """What :func:`load_encoder_weights` did with each key of a weights file."""

    loaded: list[str]  # copied as they are
    adapted: list[str]  # first-layer kernels adapted to the band count
    skipped: list[str]  # same name, incompatible shape (e.g. a ViT's position embedding for another size)
    unexpected: list[str]  # in the file, not in the encoder (e.g. the classifier head)
    missing: list[str]  # in the encoder, not in the file: keep their seeded random initialisation

    def summary(self) -> str:
        """One line for the log."""
        return (f"{len(self.loaded) + len(self.adapted)} tensors loaded ({len(self.adapted)} adapted: "
                f"{self.adapted}), {len(self.skipped)} skipped {self.skipped[:5]}, {len(self.unexpected)} "
                f"unexpected {self.unexpected[:5]}, {len(self.missing)} missing {self.missing[:5]}")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a local weights file, unwrapped from ``{"state_dict": ...}`` / ``{"model": ...}``."""
    if not path.is_file():
        raise GeoclipError(f"train.init_weights: {path} does not exist; expected a local weights file "
                           "(a state_dict saved with torch.save)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only errors have many types; all mean "not weights"
        raise GeoclipError(f"train.init_weights: {path} is not a readable torch weights file "
                           f"({type(exc).__name__}); expected a state_dict saved with torch.save") from exc
    while isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in ("state_dict", "model")):
        obj = next(obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict))
    if not isinstance(obj, dict):
        raise GeoclipError(f"train.init_weights: {path} holds a {type(obj).__name__}; expected a state_dict")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _target_name(key: str, targets: dict[str, torch.Tensor]) -> str:
    """``key`` with wrapper prefixes stripped one at a time until it names an encoder tensor (else fully stripped)."""
    while key not in targets:
        prefix = next((p for p in _WRAPPER_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            break
        key = key[len(prefix):]
    return key


def _adapt_first_layer(weight: torch.Tensor, in_chans: int, band_idx: list[int] | None) -> torch.Tensor:
    """A first-layer kernel for ``in_chans`` bands from one trained on ``weight.shape[1]`` channels.

    With ``band_idx`` (the weights were trained on the source files' bands, e.g. 13-band Sentinel-2)
    the kernels of the model's bands are picked by position; otherwise (e.g. RGB weights) timm's
    ``adapt_input_conv`` repeats/cuts channels. Both scale by ``source/target`` channels so
    activations keep their size.
    """
    if band_idx is not None:
        return weight[:, band_idx].float() * (weight.shape[1] / in_chans)
    return adapt_input_conv(in_chans, weight.float(), base_chans=weight.shape[1])


def load_encoder_weights(encoder: nn.Module, path: str | Path, band_names: list[str],
                         source_band_names: list[str] | None = None) -> InitReport:
    """Initialise ``encoder`` from a local timm/torchvision-style state dict, adapting the first layer.

    Keys may carry ``module.`` / ``encoder.`` / ``backbone.`` / ``model.`` prefixes. A kernel whose input
    channels differ from the model's bands (the first convolution or patch embedding) is adapted by
    :func:`_adapt_first_layer`. A first layer with one input channel per ``source_band_names`` (the
    files the model is served on) is taken to follow that band order, so the model's ``band_names``
    are picked (and reordered) by name. Tensors with other shape mismatches and the classifier head
    are skipped and reported.
    """
    path = Path(path)
    in_chans, sources = len(band_names), list(source_band_names or [])
    source_idx = band_indices(band_names, tuple(sources)) if sources else None
    source = _read_state_dict(path)
    targets = encoder.state_dict()
    new: dict[str, torch.Tensor] = {}
    report = InitReport([], [], [], [], [])
    for key, value in source.items():
        name = _target_name(key, targets)
        if name not in targets:
            report.unexpected.append(name)
            continue
        want = targets[name]
        first = (value.ndim == 4 and want.ndim == 4 and want.shape[1] == in_chans
                 and value.shape[0] == want.shape[0] and value.shape[2:] == want.shape[2:])
        per_band = source_idx if first and value.shape[1] == len(sources) else None
        if value.shape == want.shape and (per_band is None or per_band == list(range(in_chans))):
            new[name] = value.to(want.dtype)
            report.loaded.append(name)
        elif first:
            new[name] = _adapt_first_layer(value, in_chans, per_band).to(want.dtype)
            report.adapted.append(name)
        else:
            report.skipped.append(name)
    if not new:
        raise GeoclipError(f"train.init_weights: {path} has no tensor matching the image encoder "
                           f"(its first keys: {list(source)[:3]}); expected weights of the same architecture")
    encoder.load_state_dict(new, strict=False)
    report.missing = [k for k in targets if k not in new]
    return report


def build_model(cfg: ModelConfig, seed: int | None = None, init_weights: str | Path = "") -> GeoCLIP:
    """Build a model, fill its prompt features and optionally initialise the image encoder from a file.

    Prompt features come from the text-embedding cache, or the frozen sentence encoder on a miss.
    ``seed`` seeds torch right before the random initialisation: loading the sentence encoder (once
    per process) draws random numbers, so seeding earlier would not make two builds identical.
    ``cfg.pretrained`` loads that source's weights (:func:`geoclip.model.pretrained.load_pretrained`);
    ``init_weights`` (``train.init_weights``) then overwrites the encoder tensors it holds (a first layer
    trained on all of ``input_band_names`` keeps the model's bands); the report of what was loaded is
    printed and kept as ``model.init_report``.
    """
    from geoclip.model.text import embed_prompts, trainable_encoder

    flat = [p for prompts in cfg.prompts for p in prompts]
    feats = embed_prompts(flat).reshape(len(cfg.prompts), -1, cfg.text_dim)
    text_encoder = trainable_encoder() if cfg.text_finetune else None
    if seed is not None:
        torch.manual_seed(seed)
    model = GeoCLIP(cfg, torch.from_numpy(feats), text_encoder=text_encoder)
    model.init_report = None
    if cfg.pretrained:
        from geoclip.model.pretrained import get_source, load_pretrained

        counts = load_pretrained(model.image_encoder, get_source(cfg.pretrained), cfg.band_names)
        print(f"train.pretrained {cfg.pretrained}: {counts['loaded']} tensors loaded, {counts['adapted']} adapted "
              "to the bands", file=sys.stderr)
    if init_weights:
        model.init_report = load_encoder_weights(model.image_encoder, init_weights, cfg.band_names,
                                                 cfg.input_band_names)
        print(f"train.init_weights {init_weights}: {model.init_report.summary()}", file=sys.stderr)
    return model


def _served_state(model: GeoCLIP) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and tensors a saved model carries; a fine-tuned text encoder is baked into ``prompt_features``."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("text_encoder.")}
    if model.text_encoder is None:
        return model.cfg, state
    was_training = model.text_encoder.training
    model.text_encoder.eval()  # no dropout in the stored features
    with torch.no_grad():
        state["prompt_features"] = model.prompt_text_features().detach().float().cpu()
    model.text_encoder.train(was_training)
    return replace(model.cfg, text_finetune=False, text_encoder_finetuned=True), state


def save_model(model: GeoCLIP, directory: str | Path) -> None:
    """Write ``model.pt`` (state dict) and ``model_config.json`` into ``directory``, atomically.

    A model with a fine-tuned text encoder is saved with that encoder's prompt features in place of
    the encoder (the prompts are fixed, so predictions are identical) and ``text_finetune: false``:
    served models stay small and need no transformers. Resumable checkpoints of such a model must
    keep ``model.state_dict()`` whole instead.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg, state = _served_state(model)
    # Saved through a file object: torch names the archive inside after a path's (random temporary) file name, so
    # the same weights would give different bytes, and DVC a different hash, on every run.
    need = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    with atomic_path(directory / WEIGHTS_FILE, "the model weights", need) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
    with atomic_path(directory / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(asdict(cfg), indent=2) + "\n")


def load_model(directory: str | Path, map_location: str = "cpu") -> GeoCLIP:
    """Rebuild a saved model (no sentence encoder needed: prompt features are in the weights)."""
    directory = Path(directory)
    cfg = ModelConfig(**json.loads((directory / CONFIG_FILE).read_text()))
    state = torch.load(directory / WEIGHTS_FILE, map_location=map_location, weights_only=True)
    model = GeoCLIP(cfg, state["prompt_features"])
    state.setdefault("logit_bias", model.logit_bias.detach().clone())  # saved before logit_bias existed
    model.load_state_dict(state)
    return model.eval()
