"""The GeoCLIP model: a multispectral timm image encoder, a ground-cover class encoder, a temperature."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from geoclip.bands import ALL_BAND_NAMES
from geoclip.ioutils import atomic_path

WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "model_config.json"


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


class GeoCLIP(nn.Module):
    """CLIP-style model: raw multispectral tiles and class prompts in one embedding space.

    The image side takes raw digital numbers (uint16 or float) in ``band_names`` order and
    normalises them itself, so band order and statistics travel with the weights. The class side
    projects frozen sentence embeddings of the prompts (``prompt_features``, a buffer) with a
    trainable MLP; prompts of one class are ensembled by averaging their projected embeddings.
    """

    def __init__(self, cfg: ModelConfig, prompt_features: torch.Tensor | np.ndarray | None = None):
        super().__init__()
        self.cfg = cfg
        n_bands, n_classes = len(cfg.band_names), len(cfg.class_names)
        self.image_encoder = timm.create_model(cfg.image_encoder, pretrained=False, in_chans=n_bands, num_classes=0)
        self.image_proj = nn.Linear(self.image_encoder.num_features, cfg.embed_dim)
        self.text_proj = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.text_dim), nn.GELU(), nn.Linear(cfg.text_dim, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        self.register_buffer("band_mean", torch.tensor(cfg.band_mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("band_std", torch.tensor(cfg.band_std, dtype=torch.float32).view(1, -1, 1, 1))
        n_templates = max(len(p) for p in cfg.prompts)
        if prompt_features is None:
            prompt_features = torch.zeros(n_classes, n_templates, cfg.text_dim)
        self.register_buffer("prompt_features", torch.as_tensor(prompt_features, dtype=torch.float32))

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Raw digital numbers to standardised float input."""
        return (x.float() - self.band_mean) / self.band_std

    def encode_image(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed raw tiles ``(N, bands, H, W)`` into ``(N, embed_dim)``."""
        z = self.image_proj(self.image_encoder(self.normalize_input(x)))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, text_features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Project sentence-encoder features ``(..., text_dim)`` into ``(..., embed_dim)``."""
        z = self.text_proj(text_features)
        return F.normalize(z, dim=-1) if normalize else z

    def class_embeddings(self) -> torch.Tensor:
        """Unit class embeddings ``(C, embed_dim)``, ensembled over prompt templates."""
        per_prompt = self.encode_text(self.prompt_features, normalize=True)  # (C, T, D)
        return F.normalize(per_prompt.mean(dim=1), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, C)`` for raw tiles."""
        scale = self.logit_scale.exp().clamp(max=100.0)
        return scale * self.encode_image(x) @ self.class_embeddings().T

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class probabilities ``(N, C)`` and unit image embeddings ``(N, D)`` for raw tiles."""
        img = self.encode_image(x)
        scale = self.logit_scale.exp().clamp(max=100.0)
        return (scale * img @ self.class_embeddings().T).softmax(dim=-1), img


@torch.no_grad()
def predict_batches(model: GeoCLIP, images: np.ndarray, batch_size: int, device: torch.device | str = "cpu",
                    band_idx: list[int] | None = None, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities ``(N, C)`` and embeddings ``(N, D)`` (float32) for raw tiles, in bounded batches.

    The one inference loop shared by evaluation and the served pyfunc, so both compute the same numbers.
    ``band_idx`` picks the model's bands from wider input; ``progress`` wraps the batch starts (e.g. tqdm).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    model.eval()
    probs, embs = [], []
    starts = range(0, len(images), batch_size)
    for start in (progress(starts) if progress else starts):
        chunk = np.asarray(images[start:start + batch_size])
        x = torch.from_numpy(chunk[:, band_idx] if band_idx is not None else np.array(chunk))
        # uint16 has partial kernel support; channels_last makes oneDNN / cuDNN convolutions faster.
        x = x.to(torch.int32 if cuda else torch.float32).to(device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            p, e = model.predict(x)
        probs.append(p.float().cpu().numpy())
        embs.append(e.float().cpu().numpy())
    if not probs:  # an empty input still answers with the right widths
        return (np.zeros((0, len(model.cfg.class_names)), np.float32), np.zeros((0, model.cfg.embed_dim), np.float32))
    return np.concatenate(probs), np.concatenate(embs)


def build_model(cfg: ModelConfig, seed: int | None = None) -> GeoCLIP:
    """Build a model and fill its prompt features from the frozen sentence encoder.

    ``seed`` seeds torch right before the random initialisation: loading the sentence encoder (once
    per process) draws random numbers, so seeding earlier would not make two builds identical.
    """
    from geoclip.text import embed_prompts

    flat = [p for prompts in cfg.prompts for p in prompts]
    feats = embed_prompts(flat).reshape(len(cfg.prompts), -1, cfg.text_dim)
    if seed is not None:
        torch.manual_seed(seed)
    return GeoCLIP(cfg, torch.from_numpy(feats))


def save_model(model: GeoCLIP, directory: str | Path) -> None:
    """Write ``model.pt`` (state dict) and ``model_config.json`` into ``directory``, atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        torch.save(state, tmp)
    with atomic_path(directory / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(asdict(model.cfg), indent=2) + "\n")


def load_model(directory: str | Path, map_location: str = "cpu") -> GeoCLIP:
    """Rebuild a saved model (no sentence encoder needed: prompt features are in the weights)."""
    directory = Path(directory)
    cfg = ModelConfig(**json.loads((directory / CONFIG_FILE).read_text()))
    state = torch.load(directory / WEIGHTS_FILE, map_location=map_location, weights_only=True)
    model = GeoCLIP(cfg, state["prompt_features"])
    model.load_state_dict(state)
    return model.eval()
