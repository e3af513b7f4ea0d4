"""Tests for geoclip.prepare: stratified seeded splits, train-only statistics, packs."""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from geoclip.errors import GeoclipError
from geoclip.prepare import band_stats, load_split, prepare, stratified_split


def test_prepare_writes_packs_index_and_stats(tiny_dataset):
    out = prepare(tiny_dataset)
    index = pd.read_csv(out / "index.csv")
    assert set(index["split"]) == {"train", "val", "test"}
    # Every class appears in every split, and no tile is in two splits.
    assert index.groupby("split")["class"].nunique().min() == 3
    assert index["id"].is_unique and index["sha256"].str.len().eq(64).all()
    train = load_split(out, "train")
    assert train.images.dtype == np.uint16 and train.images.shape[1:] == (13, 64, 64)
    assert len(train.images) == (index["split"] == "train").sum() == len(train.labels)
    stats = json.loads((out / "stats.json").read_text())
    mean, _ = band_stats(np.asarray(train.images))
    assert np.allclose(stats["mean"], mean)  # computed on the train split only
    first = index[index["split"] == "train"].iloc[0]
    from geoclip.tiles import read_tile
    assert np.array_equal(train.images[0], read_tile(tiny_dataset.paths.raw + "/" + first["path"]))
    assert train.labels[0] == tiny_dataset.classes.names.index(first["class"])


def test_prepare_is_deterministic_and_seeded(tiny_dataset):
    a = pd.read_csv(prepare(tiny_dataset) / "index.csv")
    b = pd.read_csv(prepare(tiny_dataset) / "index.csv")
    assert a.equals(b)
    reseeded = replace(tiny_dataset, prepare=replace(tiny_dataset.prepare, seed=1))
    c = pd.read_csv(prepare(reseeded) / "index.csv")
    assert not a["split"].equals(c["split"])


def test_stratified_split_needs_enough_tiles():
    with pytest.raises(GeoclipError, match="class 'A': 2 tile"):
        stratified_split(pd.Series(["A", "A", "B", "B", "B", "B"]), 0.2, 0.2, seed=0)


def test_unknown_class_fails_without_output(tiny_dataset):
    labels = pd.read_csv(f"{tiny_dataset.paths.raw}/labels.csv")
    labels.loc[0, "class"] = "Glacier"
    labels.to_csv(f"{tiny_dataset.paths.raw}/labels.csv", index=False)
    with pytest.raises(GeoclipError, match=r"class\(es\) \['Glacier'\] not in classes.names"):
        prepare(tiny_dataset)
    from pathlib import Path
    assert not Path(tiny_dataset.paths.prepared).exists()


def test_failed_pack_keeps_previous_output(tiny_dataset):
    out = prepare(tiny_dataset)
    before = (out / "index.csv").read_bytes()
    from pathlib import Path
    victim = Path(tiny_dataset.paths.raw) / "tiles/River/River_3.tif"
    victim.write_bytes(victim.read_bytes()[:200])  # truncated TIFF
    with pytest.raises(GeoclipError, match="River_3.tif"):
        prepare(tiny_dataset)
    assert (out / "index.csv").read_bytes() == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_missing_labels_file(tmp_path):
    from geoclip.config import params_from_dict
    params = params_from_dict({"paths": {"raw": str(tmp_path), "prepared": str(tmp_path / "p")}})
    with pytest.raises(GeoclipError, match="labels.csv: labels manifest not found"):
        prepare(params)
