"""Tests for the unseen-class rule: no name or synonym of the held-out class reaches training; concepts train the
class side and leave the served class list alone."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from geoclip.config import params_from_dict
from geoclip.data.captions import caption_phrases
from geoclip.data.prepare import prepare
from geoclip.data.synth import generate
from geoclip.data.synth_concepts import CONCEPTS
from geoclip.errors import GeoclipError
from geoclip.model.clip import load_model
from geoclip.training.leave_out import SYNONYMS, held_out_words, kept_concepts, naming, scrub_captions
from geoclip.training.train import train
from geoclip.training.train_data import training_classes


def test_held_out_words_cover_name_synonyms_and_description():
    words = held_out_words("SeaLake", "a sea or lake")
    assert {"sea", "lake", "ocean", "sea lake", "sea or lake"} <= set(words)
    assert held_out_words("") == ()
    assert "my class" in held_out_words("MyClass", "")  # a class of the user's own: its name as words


@pytest.mark.parametrize("text, word", [
    ("two Woodlands and a lake", "woodland"), ("open water of the sea.", "sea"), ("Forests", "forest"),
    ("some water and a few trees", None), ("a woodpecker", None), ("seaweed farms", None)])
def test_naming_matches_whole_words_and_plurals(text, word):
    assert naming(text, held_out_words("Forest", "forest") + held_out_words("SeaLake", "a sea or lake")) == word


def test_concepts_and_captions_naming_the_held_out_class_are_left_out():
    words = held_out_words("Forest", "forest")
    concepts = {"ScatteredTrees": "scattered trees on grass", "ForestPark": "a park", "Fen": "a wet woodland"}
    assert kept_concepts(concepts, words) == ["ScatteredTrees"]
    assert scrub_captions(["mostly trees.", "a wood of oaks", "water"], words) == ["mostly trees.", "", "water"]
    assert scrub_captions(["a wood of oaks"], ()) == ["a wood of oaks"]


def test_the_rule_drops_exactly_the_catalogue_concepts_that_name_a_class():
    """Listed here, so a new concept that names a class (and would leave training with it) is seen."""
    wordings = {k: v.wording for k, v in CONCEPTS.items()}
    dropped = {c: [n for n in CONCEPTS if n not in kept_concepts(wordings, held_out_words(c, ""))] for c in SYNONYMS}
    assert {c: v for c, v in dropped.items() if v} == {
        "AnnualCrop": ["HedgerowFarmland", "FloodedFields"], "HerbaceousVegetation": ["SparseTrees"],
        "PermanentCrop": ["Vineyard"]}


def test_caption_phrases_drop_amounts_and_frames():
    river = "a satellite image of a narrow winding river: mostly green crops, some water and a few trees."
    phrases = caption_phrases([river, "an aerial view of mostly trees, a closed canopy."])
    assert phrases == ["a narrow winding river", "green crops", "water", "trees", "a closed canopy"]


@pytest.fixture(scope="module")
def held_out_forest(tmp_path_factory):
    """Synthetic classes and three concepts (one worded to name forest), prepared, trained without Forest."""
    root = tmp_path_factory.mktemp("leave_out")
    concepts = list(CONCEPTS)[:3]
    data = {
        "classes": {"names": ["Forest", "Pasture", "SeaLake"], "concepts": concepts,
                    "descriptions": {"Forest": "forest", "Pasture": "pasture land", "SeaLake": "a sea or lake",
                                     concepts[0]: "trees of a forest park"}},
        "paths": {"raw": str(root / "raw"), "synthetic": str(root / "synthetic"), "prepared": str(root / "prepared"),
                  "model": str(root / "model"), "eval": str(root / "eval"), "reports": str(root / "reports")},
        "synth": {"tiles_per_class": 10, "tiles_per_concept": 6, "n_scenes": 0},
        "validate": {"min_tiles_per_class": 2},
        "prepare": {"val_fraction": 0.2, "test_fraction": 0.2},
        "train": {"image_encoder": "resnet10t", "embed_dim": 16, "epochs": 1, "batch_size": 16, "num_threads": 2,
                  "holdout_class": "Forest", "caption_weight": 0.3, "pretrained": ""},
        "evaluate": {"batch_size": 32},
    }
    params = params_from_dict(data)
    generate(params)
    prepare(params)
    train(params)
    return params, concepts


def test_concept_tiles_all_train_and_the_served_model_keeps_the_class_list(held_out_forest):
    params, concepts = held_out_forest
    index = pd.read_csv(Path(params.paths.prepared) / "index.csv")
    assert set(index.loc[index["class"].isin(concepts), "split"]) == {"train"}
    assert (index["class"].isin(concepts)).sum() == 3 * 6
    assert set(index.loc[~index["class"].isin(concepts), "split"]) == {"train", "val", "test"}
    stats = json.loads((Path(params.paths.prepared) / "stats.json").read_text())
    assert stats["class_names"] == ["Forest", "Pasture", "SeaLake"] and stats["concept_names"] == concepts
    model = load_model(params.paths.model)
    assert model.cfg.class_names == ["Forest", "Pasture", "SeaLake"]
    assert model.prompt_features.shape[0] == 3 and len(model.cfg.prompts) == 3
    quantiles = model.cfg.open_set_quantiles  # calibrated on the seen classes' validation tiles, for novelty
    assert len(quantiles) == 101 and quantiles == sorted(quantiles) and -1 <= quantiles[0] < quantiles[-1] <= 1


def test_nothing_naming_the_held_out_class_reached_training(held_out_forest):
    params, concepts = held_out_forest
    assert training_classes(params, concepts) == [1, 2, 4, 5]  # Forest and the concept worded "forest park" out
    learnt = load_model(params.paths.model).cfg.learnt_texts
    words = held_out_words("Forest", "forest")
    assert learnt and [t for t in learnt if naming(t, words)] == []
    assert any(CONCEPTS[concepts[1]].wording in t for t in learnt)  # the other concepts did train
    assert not any("forest park" in t for t in learnt)
    assert "trees" in learnt  # captions' materials are words the model has
    # Forest's own tiles never trained: their shapes are not words the model has (only Forest paints this one).
    assert "a closed canopy" not in learnt


def test_a_concept_synth_cannot_paint_is_one_line(tmp_path):
    params = params_from_dict({"classes": {"concepts": ["Moonscape"]},
                               "paths": {"raw": str(tmp_path / "raw"), "synthetic": str(tmp_path / "syn")},
                               "synth": {"tiles_per_class": 1, "n_scenes": 0}})
    with pytest.raises(GeoclipError, match=r"classes.concepts: \['Moonscape'\] are not concepts synth can paint"):
        generate(params)
    assert not (tmp_path / "raw").exists()


def test_concepts_must_differ_from_the_class_names(tmp_path):
    with pytest.raises(GeoclipError, match="classes.concepts"):
        params_from_dict({"classes": {"concepts": ["Forest"]}})

