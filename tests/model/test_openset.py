"""Open-set scores: calibration quantiles, calibrated novelty per tile, and class prompts far from anything learnt."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from factories import PACK_CLASSES, make_model_dir, make_trained_model_dir

from geoclip.errors import GeoclipError
from geoclip.model.clip import CONFIG_FILE, GeoCLIP, ModelConfig, load_model
from geoclip.model.openset import (
    calibrate,
    far_classes,
    far_report,
    far_threshold,
    far_warning,
    learnt_set,
    open_set_score,
    own_class_similarity,
    similarity_outputs,
)
from geoclip.model.vocab import class_embeddings, vocabulary
from geoclip.scoring.score import NOVELTY_THRESHOLD


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[GeoCLIP, dict[str, np.ndarray]]:
    """The tiny trained, calibrated model and its packs (train/val/test images and labels)."""
    model_dir, prepared = make_trained_model_dir(tmp_path_factory.mktemp("openset"))
    packs = {f"{s}_{k}": np.load(prepared / f"{s}_{k}.npy") for s in ("val", "test") for k in ("images", "labels")}
    return load_model(model_dir), packs


def novelty(model: GeoCLIP, images: np.ndarray, classes: torch.Tensor | None = None) -> np.ndarray:
    """The calibrated novelty of raw tiles over the trained classes (or ``classes``' embeddings)."""
    _, emb = model.predict(torch.from_numpy(images.astype(np.float32)))
    units = (model.class_embeddings() if classes is None else classes).detach().numpy()
    return similarity_outputs(emb.numpy(), units, model.cfg.open_set_quantiles)["novelty"]


def test_calibration_is_101_ascending_quantiles_of_own_class_similarity(trained):
    model, packs = trained
    q = model.cfg.open_set_quantiles
    assert len(q) == 101 and q == sorted(q) and -1 <= q[0] < q[-1] <= 1
    sims = own_class_similarity(model, packs["val_images"], packs["val_labels"], batch_size=7)
    assert q[0] == pytest.approx(sims.min(), abs=1e-5) and q[-1] == pytest.approx(sims.max(), abs=1e-5)
    assert q[50] == pytest.approx(float(np.median(sims)), abs=1e-5)
    # Own class, not any class: shuffled labels give lower similarities.
    wrong = (packs["val_labels"] + 1) % len(PACK_CLASSES)
    assert np.median(own_class_similarity(model, packs["val_images"], wrong, 16)) < q[50] - 0.3


def test_calibration_refuses_mismatched_or_empty_input(trained):
    model, packs = trained
    with pytest.raises(GeoclipError, match="30 tiles but 29 labels"):
        calibrate(model, packs["val_images"], packs["val_labels"][:-1], 16)
    with pytest.raises(GeoclipError, match=r"labels 3\.\.3, none a class of the model \(0\.\.2\)"):
        calibrate(model, packs["val_images"], np.full(len(packs["val_images"]), 3), 16)
    # Tiles of labels beyond the model's classes (concepts dropped from the served list) are left out.
    extra = np.concatenate([packs["val_labels"], [3, 4]])
    images = np.concatenate([packs["val_images"], packs["val_images"][:2]])
    assert calibrate(model, images, extra, 16) == pytest.approx(model.cfg.open_set_quantiles, abs=1e-5)
    with pytest.raises(GeoclipError, match="no tiles"):
        calibrate(model, packs["val_images"][:0], packs["val_labels"][:0], 16)


def test_open_set_score_is_the_share_of_calibration_tiles_at_least_as_similar():
    q = list(np.linspace(0.2, 0.8, 101))  # own-class similarities spread evenly over 0.2..0.8
    got = open_set_score(np.array([0.9, 0.8, 0.5, 0.35, 0.2, 0.1, np.nan]), q)
    np.testing.assert_allclose(got[:6], [0.0, 0.0, 0.5, 0.75, 1.0, 1.0], atol=1e-6)
    assert np.isnan(got[6]) and got.dtype == np.float32
    assert np.isnan(open_set_score(np.array([0.5, 0.9]), [])).all()  # saved before calibration: not calibrated
    tied = open_set_score(np.array([0.5]), [0.5] * 101)  # every calibration tile exactly as similar
    assert tied[0] == pytest.approx(0.0)


def test_tiles_of_trained_classes_score_familiar(trained):
    model, packs = trained
    got = novelty(model, packs["test_images"])
    assert (got >= NOVELTY_THRESHOLD).mean() <= 0.1 and got.mean() < 0.6


def test_noise_and_constant_tiles_score_unfamiliar(trained):
    model, _ = trained
    noise = np.random.default_rng(1).integers(0, 10000, (8, 13, 64, 64)).astype(np.uint16)
    constant = np.stack([np.full((13, 64, 64), v, np.uint16) for v in (0, 1, 500, 3000, 8000)])
    assert (novelty(model, noise) >= NOVELTY_THRESHOLD).all()
    assert np.median(novelty(model, constant)) >= NOVELTY_THRESHOLD


def test_a_class_list_without_the_tiles_class_scores_unfamiliar(trained):
    model, packs = trained
    images, labels = packs["test_images"], packs["test_labels"]
    for c, name in enumerate(PACK_CLASSES):
        mine = images[labels == c]
        others = class_embeddings(model, vocabulary(model.cfg, [n for n in PACK_CLASSES if n != name]))
        assert (novelty(model, mine, others) >= NOVELTY_THRESHOLD).mean() >= 0.9, name
        assert (novelty(model, mine) >= NOVELTY_THRESHOLD).mean() <= 0.2, name  # with its class: familiar


def test_far_prompts_are_warned_and_trained_ones_and_paraphrases_not(trained):
    model, _ = trained
    names = ["spaceship interior", "Forest", "woodland", "a cat on a sofa", "lake", "factories"]
    far = far_report(model, vocabulary(model.cfg, names))
    assert [f.name for f in far] == ["spaceship interior", "a cat on a sofa"]
    assert all(f.similarity < f.threshold == far_threshold(model.cfg) for f in far)
    assert far_classes(model, vocabulary(model.cfg, names)) == [(f.name, f.similarity) for f in far]
    text = far_warning(far)
    assert "\n" not in text and text.startswith("classes 'spaceship interior', 'a cat on a sofa' are far from")
    assert text.endswith("their scores are guesses") and "nearest: 'spaceship interior' ~ '" in text
    assert far_report(model, vocabulary(model.cfg, list(PACK_CLASSES))) == []  # the trained list: never warned
    # The trained names reworded by the request (new templates) are still what was learnt.
    assert far_report(model, vocabulary(model.cfg, list(PACK_CLASSES), templates=["{} seen from orbit"]),
                      ["{} seen from orbit"]) == []
    assert far_warning([]) == ""


def test_described_classes_are_judged_by_their_wording(trained):
    model, _ = trained
    vocab = vocabulary(model.cfg, ["thing A", "thing B"], {"thing A": "dense woodland", "thing B": "a cat on a sofa"})
    assert [f.name for f in far_report(model, vocab)] == ["thing B"]
    assert far_warning(far_report(model, vocab)).startswith("class 'thing B' is far from")


def test_learnt_texts_widen_what_was_learnt(trained):
    model, _ = trained
    vocab = vocabulary(model.cfg, ["spaceship interior", "lake"])
    assert [f.name for f in far_report(model, vocab)] == ["spaceship interior"]
    learnt = replace(model.cfg, learnt_texts=["an aerial view of the interior of a spaceship.", "a rocket launch pad",
                                              "a cat asleep"])
    wider = GeoCLIP(learnt, model.prompt_features)
    assert "the interior of a spaceship" in learnt_set(learnt)  # worded by a template: the wording inside
    assert far_report(wider, vocab) == []


def test_far_threshold_is_calibrated_on_the_learnt_set_itself(trained):
    model, _ = trained
    few = far_threshold(model.cfg)
    related = replace(model.cfg, learnt_texts=["pine forest", "oak forest", "birch forest", "spruce forest"])
    assert far_threshold(related) > few  # a denser learnt set: a stricter limit
    lone = replace(model.cfg, class_names=["x", "y"], prompts=[["x"], ["x"]], descriptions={}, templates=[])
    assert learnt_set(lone) == ["x", "y"]
    assert far_threshold(replace(lone, class_names=["x", "X"])) is None  # one text: nothing to calibrate on


def test_old_model_config_without_the_new_fields_loads_uncalibrated(tmp_path):
    folder = make_model_dir(tmp_path / "model")
    doc = json.loads((folder / CONFIG_FILE).read_text())
    doc.pop("open_set_quantiles")
    doc.pop("learnt_texts")
    (folder / CONFIG_FILE).write_text(json.dumps(doc))
    model = load_model(folder)
    assert model.cfg.open_set_quantiles == [] and model.cfg.learnt_texts == []
    _, emb = model.predict(torch.zeros(2, 13, 64, 64))
    out = similarity_outputs(emb.numpy(), model.class_embeddings().detach().numpy(),
                             model.cfg.open_set_quantiles)
    assert out["similarities"].shape == (2, 10) and np.isnan(out["novelty"]).all()
    np.testing.assert_allclose(out["max_similarity"], out["similarities"].max(axis=1))


def test_calibrated_quantiles_survive_save_and_load(trained, tmp_path):
    from geoclip.model.clip import save_model

    model, _ = trained
    save_model(model, tmp_path / "again")
    again = load_model(tmp_path / "again").cfg
    assert again.open_set_quantiles == model.cfg.open_set_quantiles
    assert isinstance(again, ModelConfig)
