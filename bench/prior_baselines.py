"""Reference rows for a pretrained prior on real tiles (bench/real_quality.py rows (f) and (i)).

(f) a linear probe on the prior's frozen features (what a frozen geoclip encoder computes: the prior's bands
    standardised as its weights expect, resized to its input size, final and stage features pooled, averaged over
    the tile's 8 flips and rotations);
(i) the prior fine-tuned as a plain classifier on its own bands at 128 px: 12 epochs, AdamW 1e-3 one-cycle, flips
    and 90-degree turns, label smoothing 0.1, batch 32 (settings fixed in advance, as issue 26's reference row;
    no validation, no synthetic tiles, no text side): the classifier a user could train in minutes.
"""

from __future__ import annotations

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from geoclip.bands import ALL_BAND_NAMES
from geoclip.model.clip import dihedral_views, tower_features
from geoclip.model.pretrained import PretrainedSource, load_pretrained, prior_normalisation


def prior_tower(source: PretrainedSource, band_names: list[str]) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The prior's encoder for ``band_names`` input and its per-band standardisation (mean, std as (1, B, 1, 1))."""
    encoder = timm.create_model(source.architecture, pretrained=False, in_chans=len(band_names), num_classes=0)
    load_pretrained(encoder, source, band_names)
    ones = [1.0] * len(band_names)
    mean, std = prior_normalisation(source, band_names, [0.0] * len(band_names), ones)
    return encoder.eval(), torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)


@torch.no_grad()
def prior_features(images: np.ndarray, source: PretrainedSource, batch: int = 64) -> np.ndarray:
    """Row (f)'s features: the frozen prior's pooled features of each tile, averaged over its 8 views."""
    bands = list(source.band_names)
    encoder, mean, std = prior_tower(source, bands)
    idx = [ALL_BAND_NAMES.index(b) for b in bands]
    out = []
    for start in range(0, len(images), batch):
        x = (torch.from_numpy(images[start:start + batch][:, idx].astype(np.float32)) - mean) / std
        views = [tower_features(encoder, v, source.input_size, source.feature_stages) for v in dihedral_views(x)]
        out.append(torch.stack(views).mean(0).numpy())
    return np.concatenate(out)


def finetune_classifier(images: np.ndarray, labels: np.ndarray, train_rows: np.ndarray, test_rows: np.ndarray,
                        source: PretrainedSource, seed: int, n_classes: int, epochs: int = 12, size: int = 128,
                        batch: int = 32, lr: float = 1e-3) -> np.ndarray:
    """Row (i): predictions for ``test_rows`` of the prior fine-tuned end to end as a classifier on ``train_rows``."""
    torch.manual_seed(seed)
    bands = list(source.band_names)
    encoder, mean, std = prior_tower(source, bands)
    model = nn.Sequential(encoder, nn.Linear(encoder.num_features, n_classes))
    idx = [ALL_BAND_NAMES.index(b) for b in bands]

    def batch_x(rows: np.ndarray) -> torch.Tensor:
        x = (torch.from_numpy(images[rows][:, idx].astype(np.float32)) - mean) / std
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)

    steps = epochs * -(-len(train_rows) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    y = torch.from_numpy(labels).long()
    model.train()
    for _ in range(epochs):
        order = train_rows[torch.randperm(len(train_rows), generator=gen).numpy()]
        for start in range(0, len(order), batch):
            rows = order[start:start + batch]
            x = batch_x(rows)
            k = int(torch.randint(0, 8, (1,), generator=gen))  # one of the 8 flips/turns per batch
            x = dihedral_views(x)[k]
            loss = F.cross_entropy(model(x), y[rows], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(batch_x(test_rows[s:s + 64])) for s in range(0, len(test_rows), 64)])
    return logits.argmax(1).numpy()
