"""Open vocabulary: class lists parsed and checked, worded like training, embedded through the sentence encoder."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from factories import make_model_dir, synthetic_tiles

from geoclip.bands import EUROSAT_CLASSES
from geoclip.errors import GeoclipError
from geoclip.model.clip import GeoCLIP, load_model
from geoclip.model.text import embed_prompts
from geoclip.model.vocab import (
    DEFAULT_TEMPLATES,
    MAX_CLASSES,
    class_embeddings,
    parse_class_list,
    read_class_file,
    served_params,
    vocabulary,
)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> GeoCLIP:
    """A tiny untrained model whose stored prompt features are random (not the sentence encoder's)."""
    return load_model(make_model_dir(tmp_path_factory.mktemp("vocab") / "model"))


def probs(model: GeoCLIP, classes: torch.Tensor | None = None) -> np.ndarray:
    """Class probabilities of a fixed batch of tiles."""
    return model.predict(torch.from_numpy(synthetic_tiles(6).astype(np.float32)), classes=classes)[0].numpy()


def test_class_list_is_split_on_commas_and_lines_and_spaces_are_tidied():
    assert parse_class_list(" lake,  pine forest ,\nvineyard\n") == ["lake", "pine forest", "vineyard"]
    assert parse_class_list("forêt, 湖, Weinberg") == ["forêt", "湖", "Weinberg"]


@pytest.mark.parametrize("text, message", [
    ("", "0 class"),
    (" , ,", "0 class"),
    ("lake", "1 class"),
    ("Lake, forest, lake ", "'lake' repeats 'Lake'"),
    ("pine  forest, Pine forest", "repeats"),
    ("x" * 201 + ", lake", "at most 200"),
])
def test_bad_class_lists_are_one_line_errors(text, message):
    with pytest.raises(GeoclipError, match=message) as err:
        parse_class_list(text)
    assert "\n" not in str(err.value)


def test_a_thousand_classes_are_fine_and_too_many_are_refused():
    assert len(parse_class_list(", ".join(f"class {i}" for i in range(1000)))) == 1000
    with pytest.raises(GeoclipError, match=f"at most {MAX_CLASSES}"):
        parse_class_list(", ".join(f"class {i}" for i in range(MAX_CLASSES + 1)))


def test_class_file_like_params_yaml_or_a_bare_list(tmp_path):
    path = tmp_path / "classes.yaml"
    path.write_text("names: [lake, vineyard]\ndescriptions: {vineyard: rows of grape vines}\n"
                    "templates: ['a satellite image of {}.', 'a photo of {} from orbit.']\n", encoding="utf-8")
    assert read_class_file(path) == (["lake", "vineyard"], {"vineyard": "rows of grape vines"},
                                     ["a satellite image of {}.", "a photo of {} from orbit."])
    path.write_text("- lac\n- forêt\n", encoding="utf-8")
    assert read_class_file(path) == (["lac", "forêt"], {}, None)


@pytest.mark.parametrize("text, message", [
    ("names: [lake, forest\n", "not valid YAML"),
    ("lake: 1\n", "expected a list of class names or a mapping with names"),
    ("names: [lake, forest]\ncolours: {}\n", r"unknown key\(s\) \['colours'\]"),
    ("names: [lake, forest]\ntemplates: ['a lake']\n", "must contain '{}' exactly once"),
    ("names: [lake, forest]\ndescriptions: {river: running water}\n", r"classes not in names: \['river'\]"),
    ("names: [lake, lake]\n", "repeats"),
])
def test_bad_class_files_name_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "classes.yaml"
    path.write_text(text)
    with pytest.raises(GeoclipError, match=message) as err:
        read_class_file(path)
    assert str(path) in str(err.value)
    with pytest.raises(GeoclipError, match="cannot read the class file"):
        read_class_file(tmp_path / "missing.yaml")


def test_trained_names_keep_their_prompts_and_new_names_use_the_trained_templates(model):
    cfg = replace(model.cfg, templates=["an image of {}."], descriptions={"lake": "a lake"})
    vocab = vocabulary(cfg, ["SeaLake", "lake", "vineyard"])
    assert vocab.prompts == (("an image of SeaLake.",), ("an image of a lake.",), ("an image of vineyard.",))
    old = vocabulary(model.cfg, ["Forest", "vineyard"])  # saved before templates were recorded
    assert old.prompts[1] == tuple(t.format("vineyard") for t in DEFAULT_TEMPLATES)
    custom = vocabulary(cfg, ["SeaLake", "Forest"], templates=["a {} seen from above."])  # the user's wording wins
    assert custom.prompts == (("a SeaLake seen from above.",), ("a Forest seen from above.",))


def test_the_trained_list_in_any_order_gives_the_trained_answers_permuted(model):
    np.testing.assert_array_equal(probs(model, class_embeddings(model, vocabulary(model.cfg, EUROSAT_CLASSES))),
                                  probs(model))
    order = [9, 3, 0, 5, 1, 8, 2, 7, 4, 6]
    shuffled = class_embeddings(model, vocabulary(model.cfg, [EUROSAT_CLASSES[i] for i in order]))
    np.testing.assert_allclose(probs(model, shuffled), probs(model)[:, order], atol=1e-6)
    # A subset is the softmax over those classes' logits alone.
    subset = probs(model, class_embeddings(model, vocabulary(model.cfg, ["Forest", "SeaLake"])))
    full = probs(model)[:, [1, 9]]
    np.testing.assert_allclose(subset, full / full.sum(axis=1, keepdims=True), atol=1e-6)


def test_new_names_go_through_the_sentence_encoder_like_the_trained_prompts_did(model):
    # A model whose stored features are the encoder's own: rewording a class in new words that produce the same
    # prompt must give the same class embedding through the encoder as through the stored features.
    prompts = [[f"a satellite image of {c}."] for c in EUROSAT_CLASSES]
    stored = torch.from_numpy(embed_prompts([p[0] for p in prompts])).view(10, 1, -1)
    real = GeoCLIP(replace(model.cfg, prompts=prompts), prompt_features=stored)
    real.load_state_dict({**model.state_dict(), "prompt_features": stored})
    fresh = GeoCLIP(replace(model.cfg, prompts=[["unused"]] * 10), prompt_features=torch.zeros(10, 1, 384))
    fresh.load_state_dict({**model.state_dict(), "prompt_features": torch.zeros(10, 1, 384)})
    vocab = vocabulary(fresh.cfg, ["water", "trees"], {"water": "SeaLake", "trees": "Forest"},
                       ["a satellite image of {}."])
    np.testing.assert_allclose(class_embeddings(fresh.eval(), vocab).numpy(),
                               real.class_embeddings()[[9, 1]].detach().numpy(), atol=1e-5)


def test_classes_with_different_prompt_counts_average_their_own_prompts(model):
    vocab = vocabulary(model.cfg, ["Forest", "lake"], templates=None)  # Forest: 1 stored prompt, lake: 3 templates
    assert [len(p) for p in vocab.prompts] == [1, len(DEFAULT_TEMPLATES)]
    emb = class_embeddings(model, vocab)
    assert emb.shape == (2, model.cfg.embed_dim)
    np.testing.assert_allclose(emb.norm(dim=1).numpy(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(emb[0].numpy(), model.class_embeddings()[1].detach().numpy(), atol=1e-6)


def test_a_model_with_a_fine_tuned_text_encoder_answers_only_over_its_classes(model):
    tuned = GeoCLIP(replace(model.cfg, text_encoder_finetuned=True), prompt_features=model.prompt_features)
    tuned.load_state_dict(model.state_dict())
    assert class_embeddings(tuned, vocabulary(tuned.cfg, ["SeaLake", "Forest"])).shape == (2, model.cfg.embed_dim)
    with pytest.raises(GeoclipError, match="text_finetune"):
        class_embeddings(tuned, vocabulary(tuned.cfg, ["lake", "forest"]))


def test_served_params_carry_descriptions_in_class_order():
    assert served_params(["lake", "vineyard"], {"vineyard": "grape vines"}, ["a {}."]) == {
        "classes": ["lake", "vineyard"], "descriptions": ["", "grape vines"], "templates": ["a {}."]}
    with pytest.raises(GeoclipError, match="repeats"):
        served_params(["lake", "Lake"])
