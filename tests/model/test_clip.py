"""Tests for the GeoCLIP model: encoders, seeded build, weights init, text fine-tuning, save/load, real tiles."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torchvision

from geoclip.bands import ALL_BAND_NAMES
from geoclip.data.tiles import read_tile
from geoclip.errors import GeoclipError
from geoclip.model import text
from geoclip.model.clip import GeoCLIP, ModelConfig, build_model, dihedral_views, load_model, save_model
from geoclip.model.loss import LOSSES, clamp_logit_scale

CLASSES = ["Forest", "Industrial", "SeaLake"]


def _config(**overrides) -> ModelConfig:
    kwargs = {"image_encoder": "test_resnet", "embed_dim": 16, "band_names": list(ALL_BAND_NAMES),
              "class_names": CLASSES, "band_mean": [1500.0] * 13, "band_std": [800.0] * 13,
              "prompts": [[f"a satellite image of {c}.", f"an aerial view of {c}."] for c in CLASSES]}
    return ModelConfig(**{**kwargs, **overrides})


@pytest.fixture(scope="module", autouse=True)
def text_cache(tmp_path_factory):
    """A private prompt-embedding cache (GEOCLIP_CACHE) for this module."""
    root = tmp_path_factory.mktemp("geoclip-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(text.CACHE_ENV, str(root))
        yield root / "text"


@pytest.fixture(scope="module")
def model():
    return build_model(_config(), seed=0).eval()


def _real_batch(root) -> torch.Tensor:
    paths = sorted(root.glob("*/*.tif"))[::7][:8]
    return torch.from_numpy(np.stack([read_tile(p) for p in paths]))


def test_build_with_the_same_seed_gives_the_same_weights(model):
    again = build_model(_config(), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    other = build_model(_config(), seed=1)
    assert not torch.equal(model.image_proj.weight, other.image_proj.weight)


def test_prompt_features_are_sentence_embeddings(model):
    feats = model.prompt_features
    assert feats.shape == (3, 2, 384)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3, 2), atol=1e-4)


def test_the_same_weights_save_to_the_same_bytes(model, tmp_path):
    """Byte-identical files for identical weights: DVC and MLflow see one model version, not one per save."""
    save_model(model, tmp_path / "a")
    save_model(model, tmp_path / "b")
    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()


def test_save_load_round_trip_predicts_the_same_on_a_real_batch(model, tmp_path, real_tiles):
    x = _real_batch(real_tiles)
    assert x.dtype == torch.uint16 and x.shape[1:] == (13, 64, 64)
    save_model(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "model_config.json").read_text())["class_names"] == CLASSES
    loaded = load_model(tmp_path / "m")
    probs, emb = loaded.predict(x)
    ref_probs, ref_emb = model.predict(x)
    assert probs.shape == (len(x), 3) and emb.shape == (len(x), 16)
    assert torch.allclose(probs, ref_probs, atol=1e-6) and torch.allclose(emb, ref_emb, atol=1e-6)
    assert torch.allclose(probs.sum(1), torch.ones(len(x)), atol=1e-5)
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(x)), atol=1e-5)


def test_forward_logits_match_predict(model, real_tiles):
    x = _real_batch(real_tiles)
    with torch.no_grad():
        logits = model(x)
    probs, _ = model.predict(x)
    assert torch.allclose(logits.softmax(-1), probs, atol=1e-6)


def test_tta_is_invariant_to_flips_and_rotations_and_averages_the_views(model):
    x = _batch(3)
    probs, emb = model.predict(x, tta=True)
    for view in dihedral_views(x)[1:]:  # any flip/rotation of the input gives the same answer with tta
        p2, e2 = model.predict(view, tta=True)
        assert torch.allclose(e2, emb, atol=1e-5) and torch.allclose(p2, probs, atol=1e-5)
    with torch.no_grad():
        mean = torch.stack([model.encode_image(v) for v in dihedral_views(x)]).mean(0)
    assert torch.allclose(emb, mean / mean.norm(dim=-1, keepdim=True), atol=1e-6)
    plain, _ = model.predict(dihedral_views(x)[1])  # without tta a rotated tile is a different input
    assert not torch.allclose(plain, probs, atol=1e-4)
    assert len({tuple(v.shape) for v in dihedral_views(x)}) == 1 and len(dihedral_views(x)) == 8


def _batch(n: int = 2, bands: int = 13) -> torch.Tensor:
    return torch.randint(200, 4000, (n, bands, 64, 64), generator=torch.Generator().manual_seed(0)).float()


# --- image encoders ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "args"), [
    ("resnet18", {}), ("resnet50", {}), ("convnext_atto", {}),
    ("vit_tiny_patch16_224", {"img_size": 64, "patch_size": 8}),  # 8x8 patches: 64 tokens for a 64 px tile
])
def test_timm_encoders_give_unit_embeddings_for_13_band_tiles(name, args):
    m = GeoCLIP(_config(image_encoder=name, encoder_args=args)).eval()
    with torch.no_grad():
        emb = m.encode_image(_batch())
    assert emb.shape == (2, 16) and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)


def test_a_vit_built_for_another_size_is_refused_with_the_fix():
    with pytest.raises(GeoclipError, match=r"train.encoder_args: test_vit expects 160x160 .*img_size: 64"):
        GeoCLIP(_config(image_encoder="test_vit", encoder_args={"dynamic_img_size": False}))


@pytest.mark.parametrize(("args", "match"), [({"in_chans": 3}, r"\['in_chans'\] are set by geoclip"),
                                             ({"no_such_kwarg": 1}, r"train.encoder_args: .*rejected by timm")])
def test_bad_encoder_args_are_one_line_errors(args, match):
    with pytest.raises(GeoclipError, match=match):
        GeoCLIP(_config(encoder_args=args))


def test_unknown_encoder_name_is_refused():
    with pytest.raises(GeoclipError, match=r"train.image_encoder: unknown timm model 'resnet_nope'"):
        GeoCLIP(_config(image_encoder="resnet_nope"))


# --- temperature and SigLIP bias -----------------------------------------------------------------------------


def test_logit_bias_is_always_present_but_trained_only_by_siglip():
    clip, sig = GeoCLIP(_config()), GeoCLIP(_config(loss="siglip"))
    for m in (clip, sig):
        assert m.logit_bias.item() == -10.0 and "logit_bias" in m.state_dict()
    assert not clip.logit_bias.requires_grad and sig.logit_bias.requires_grad
    with torch.no_grad():
        sig.logit_scale.fill_(7.0)
    clamp_logit_scale(sig)
    assert sig.logit_scale.item() == pytest.approx(np.log(100.0))


def test_siglip_step_moves_bias_and_temperature(model):
    m = GeoCLIP(_config(loss="siglip"), model.prompt_features)
    loss = LOSSES["siglip"](m.encode_image(_batch(4)), m.class_embeddings(), torch.tensor([0, 1, 2, 0]),
                            m.logit_scale, m.logit_bias)
    loss.backward()
    assert m.logit_bias.grad is not None and m.logit_bias.grad.abs() > 0
    assert m.logit_scale.grad is not None and m.image_proj.weight.grad is not None


def test_a_model_saved_before_the_new_fields_still_loads(model, tmp_path):
    """model_config.json without loss/encoder_args/text_finetune and model.pt without logit_bias (older saves)."""
    save_model(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "model_config.json").read_text())
    for key in ("loss", "encoder_args", "text_finetune"):
        del cfg[key]
    (tmp_path / "m" / "model_config.json").write_text(json.dumps(cfg))
    state = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    del state["logit_bias"]
    torch.save(state, tmp_path / "m" / "model.pt")
    loaded = load_model(tmp_path / "m")
    assert loaded.cfg.loss == "clip" and loaded.cfg.encoder_args == {} and loaded.logit_bias.item() == -10.0
    assert torch.equal(loaded.image_proj.weight, model.image_proj.weight)


def test_a_linear_text_projection_is_one_matrix_and_survives_save_and_load(tmp_path):
    linear = build_model(_config(text_projection="linear"), seed=0).eval()
    layers = [m for m in linear.text_proj.modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == 1 and tuple(layers[0].weight.shape) == (16, 384)
    assert len([m for m in build_model(_config(), seed=0).text_proj.modules() if isinstance(m, torch.nn.Linear)]) == 2
    save_model(linear, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.cfg.text_projection == "linear"
    assert torch.allclose(loaded.class_embeddings(), linear.class_embeddings())


def test_an_unknown_text_projection_is_refused():
    from geoclip.config import params_from_dict

    with pytest.raises(GeoclipError, match=r"train.text_projection: 'deep'; expected 'mlp' or 'linear'"):
        params_from_dict({"train": {"text_projection": "deep"}})


# --- text embedding cache and text fine-tuning ---------------------------------------------------------------


def test_a_second_build_does_not_touch_the_sentence_encoder(model, text_cache):
    """The module fixture filled the cache: building again (new prompts aside) never asks for the encoder."""
    assert len(list(text_cache.glob("*.npy"))) >= 1
    info = text._encoder.cache_info()
    calls = info.hits + info.misses
    again = build_model(_config(), seed=0)
    info = text._encoder.cache_info()
    assert info.hits + info.misses == calls
    assert torch.equal(again.prompt_features, model.prompt_features)


def test_text_finetune_trains_the_encoder_and_saves_only_its_features(model, tmp_path):
    ft = build_model(_config(text_finetune=True), seed=0)
    assert ft.text_encoder is not None
    ft.eval()
    with torch.no_grad():  # at start the fine-tuned path equals the cached frozen features
        assert torch.allclose(ft.prompt_text_features(), model.prompt_features, atol=1e-5)
    ft.train()
    loss = LOSSES["clip"](ft.encode_image(_batch(3)), ft.class_embeddings(), torch.tensor([0, 1, 2]),
                          ft.logit_scale, ft.logit_bias)
    loss.backward()
    assert all(p.grad is not None for p in ft.text_encoder.parameters())
    with torch.no_grad():  # a "fine-tuning step": the class embeddings must follow the encoder
        ft.text_encoder.transformer.embeddings.word_embeddings.weight.mul_(1.5).add_(0.01)
    ft.eval()
    save_model(ft, tmp_path / "ft")
    saved = torch.load(tmp_path / "ft" / "model.pt", weights_only=True)
    assert not any(k.startswith("text_encoder.") for k in saved)
    assert json.loads((tmp_path / "ft" / "model_config.json").read_text())["text_finetune"] is False
    loaded = load_model(tmp_path / "ft")
    assert loaded.text_encoder is None and ft.cfg.text_finetune  # the live model keeps its own config
    with torch.no_grad():
        tuned = ft.prompt_text_features()
        assert not torch.allclose(tuned, model.prompt_features, atol=1e-3)
        assert torch.allclose(loaded.prompt_features, tuned, atol=1e-6)
        x = _batch(2)
        assert torch.allclose(loaded(x), ft(x), atol=1e-4)  # same logits, without the transformer


# --- initialisation from a local weights file ----------------------------------------------------------------


def _resnet18_rgb_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    return torchvision.models.resnet18(weights=None).state_dict()  # torchvision keys = timm resnet18 keys


def test_init_from_rgb_resnet18_adapts_the_first_layer(tmp_path):
    src = _resnet18_rgb_state()
    path = tmp_path / "rgb.pt"
    # nested and prefixed as SSL / Lightning checkpoints are
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in src.items()}, "epoch": 3}, path)
    m = build_model(_config(image_encoder="resnet18"), seed=0, init_weights=str(path))
    enc = m.image_encoder.state_dict()
    w = enc["conv1.weight"]
    assert w.shape == (64, 13, 7, 7)
    # timm's adapt_input_conv: RGB kernels repeated over the 13 bands, scaled by 3/13
    expected = src["conv1.weight"].repeat(1, 5, 1, 1)[:, :13] * (3 / 13)
    assert torch.allclose(w, expected)
    for key, value in src.items():
        if key in enc and key != "conv1.weight":
            assert torch.equal(enc[key], value), key
    report = m.init_report
    assert report.adapted == ["conv1.weight"] and set(report.unexpected) == {"fc.weight", "fc.bias"}
    assert report.missing == [] and report.skipped == []


def test_init_from_13_band_weights_picks_the_model_bands_by_name(tmp_path):
    """Weights trained on the source files' 13 bands (e.g. Sentinel-2 pretrained) keep each used band's kernel."""
    src = {f"module.{k}": v for k, v in build_model(_config(image_encoder="resnet18"), seed=5)
           .image_encoder.state_dict().items()}
    torch.save({"model": src}, tmp_path / "s2.pt")
    bands = ["B04", "B03", "B02", "B08"]  # a subset, reordered
    cfg = _config(image_encoder="resnet18", band_names=bands, band_mean=[1.0] * 4, band_std=[1.0] * 4)
    m = build_model(cfg, seed=0, init_weights=tmp_path / "s2.pt")
    assert m.image_encoder.conv1.weight.shape == (64, 4, 7, 7)
    assert torch.allclose(m.image_encoder.conv1.weight, src["module.conv1.weight"][:, [3, 2, 1, 7]] * (13 / 4))
    assert torch.equal(m.image_encoder.layer4[1].conv2.weight, src["module.layer4.1.conv2.weight"])
    assert m.init_report.adapted == ["conv1.weight"] and m.init_report.missing == []


def test_bad_weights_files_are_one_line_errors(tmp_path):
    cfg = _config(image_encoder="resnet18")
    missing = tmp_path / "nope.pt"
    with pytest.raises(GeoclipError, match=rf"train.init_weights: {missing} does not exist"):
        build_model(cfg, seed=0, init_weights=str(missing))
    torch.save({"head.proj.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(GeoclipError, match=r"train.init_weights: .*other.pt has no tensor matching"):
        build_model(cfg, seed=0, init_weights=str(tmp_path / "other.pt"))
    (tmp_path / "text.pt").write_text("not weights")
    with pytest.raises(GeoclipError, match=r"train.init_weights: .*text.pt is not a readable torch weights"):
        build_model(cfg, seed=0, init_weights=str(tmp_path / "text.pt"))


def test_config_round_trips_the_new_fields(tmp_path):
    cfg = _config(image_encoder="test_vit", encoder_args={"img_size": 64, "patch_size": 8}, loss="siglip")
    save_model(GeoCLIP(cfg), tmp_path / "vit")
    loaded = load_model(tmp_path / "vit")
    assert asdict(loaded.cfg) == asdict(cfg) and loaded.logit_bias.requires_grad


# --- spectral-statistics branch --------------------------------------------------------------------------------


def test_spectral_stats_branch_sits_beside_the_encoder_features_and_moves_with_band_level():
    """The branch's output is the last features; a brighter, more contrasted band changes it."""
    model = build_model(_config(spectral_stats=True), seed=0).eval()
    assert model.image_proj.in_features == model.image_encoder.num_features + 128
    x = _batch(2)
    brighter = x.clone()
    brighter[:, 3] = brighter[:, 3] * 1.5 + 300  # one band (B04) brighter and more contrasted
    with torch.no_grad():
        xn, bn = model.normalize_input(x), model.normalize_input(brighter)
        stats_in = torch.cat([xn.mean(dim=(2, 3)), xn.std(dim=(2, 3))], 1)
        branch = model.stats_mlp(stats_in)
        features = model.image_features(xn)
        assert torch.equal(features[:, -128:], branch)  # the branch's output rides beside the encoder's
        assert not torch.allclose(model.image_features(bn)[:, -128:], branch)
    _, emb = model.predict(x, tta=True)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    for view in dihedral_views(x)[1:]:  # means and stds do not change under flips: tta stays exact
        assert torch.allclose(model.predict(view, tta=True)[1], emb, atol=1e-5)


def test_spectral_stats_model_saves_loads_and_fewshot_features_include_the_branch(tmp_path):
    from geoclip.training.fewshot import backbone_features, zero_shot_logits

    model = build_model(_config(spectral_stats=True), seed=0).eval()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.cfg.spectral_stats and loaded.stats_mlp is not None
    x = _batch(3)
    assert torch.allclose(loaded.predict(x)[0], model.predict(x)[0], atol=1e-6)
    feats = backbone_features(loaded, x.numpy().astype(np.uint16))
    assert feats.shape == (3, loaded.image_proj.in_features)
    with torch.no_grad():  # the few-shot head starts from exactly the zero-shot classifier
        assert torch.allclose(zero_shot_logits(loaded, feats).softmax(-1),
                              loaded.predict(torch.from_numpy(x.numpy().astype(np.uint16)))[0], atol=1e-5)
    plain = build_model(_config(), seed=0)
    assert plain.stats_mlp is None and plain.image_proj.in_features == plain.image_encoder.num_features
