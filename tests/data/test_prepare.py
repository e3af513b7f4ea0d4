"""Tests for geoclip.data.prepare: seeded stratified / spatial / given splits, bands by name, split suites, packs."""

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from factories import make_tile

from geoclip.bands import ALL_BAND_NAMES
from geoclip.data.prepare import band_stats, load_split, prepare, split_captions, stratified_split
from geoclip.data.tiles import read_tile
from geoclip.errors import GeoclipError


def with_prepare(params, **changes):
    """``params`` with fields of its ``prepare`` section changed."""
    return replace(params, prepare=replace(params.prepare, **changes))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative name, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_no_output(params, before: dict[str, bytes] | None = None) -> None:
    """After a failure: no prepared folder (or the previous one intact) and no temp folder beside it."""
    out = Path(params.paths.prepared)
    if before is None:
        assert not out.exists()
    else:
        assert snapshot(out) == before
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]


def edit_labels(params, **columns) -> pd.DataFrame:
    """Set columns of labels.csv (values in labels.csv row order) and write it back."""
    path = Path(params.paths.raw) / "labels.csv"
    labels = pd.read_csv(path).assign(**columns)
    labels.to_csv(path, index=False)
    return labels


def test_prepare_writes_packs_index_stats_and_validation(tiny_dataset):
    out = prepare(tiny_dataset)
    index = pd.read_csv(out / "index.csv")
    assert list(index.columns) == ["id", "path", "class", "label", "split", "sha256"]
    assert set(index["split"]) == {"train", "val", "test"}
    assert index.groupby("split")["class"].nunique().min() == 3 and index["id"].is_unique
    train = load_split(out, "train")
    assert train.images.dtype == np.uint16 and train.images.shape[1:] == (13, 64, 64)
    assert len(train.images) == (index["split"] == "train").sum() == len(train.labels)
    stats = json.loads((out / "stats.json").read_text())
    assert np.allclose(stats["mean"], band_stats(np.asarray(train.images))[0])  # train split only
    assert stats["band_names"] == stats["source_band_names"] == list(ALL_BAND_NAMES)
    first = index[index["split"] == "train"].iloc[0]
    tile = read_tile(Path(tiny_dataset.paths.raw) / first["path"])
    assert np.array_equal(train.images[0], tile) and train.labels[0] == tiny_dataset.classes.names.index(first["class"])
    import hashlib
    assert first["sha256"] == hashlib.sha256(tile.tobytes()).hexdigest()
    report = json.loads((out / "validation.json").read_text())
    assert report["success"] and {c["check"] for c in report["checks"]} >= {
        "splits.content_in_one_split", "splits.unique_id", "split_classes.min_tiles_per_split"}


def test_stratified_is_byte_identical_and_seeded(tiny_dataset):
    first = snapshot(prepare(tiny_dataset))
    assert snapshot(prepare(tiny_dataset)) == first
    labels = pd.read_csv(Path(tiny_dataset.paths.raw) / "labels.csv")  # row order of labels.csv does not matter
    labels.sample(frac=1, random_state=3).to_csv(Path(tiny_dataset.paths.raw) / "labels.csv", index=False)
    assert snapshot(prepare(tiny_dataset)) == first
    other = snapshot(prepare(with_prepare(tiny_dataset, seed=1)))
    assert other["index.csv"] != first["index.csv"] and other["train_images.npy"] != first["train_images.npy"]


def test_stratified_split_needs_enough_tiles():
    with pytest.raises(GeoclipError, match="class 'A': 2 tile"):
        stratified_split(pd.Series(["A", "A", "B", "B", "B", "B"]), 0.2, 0.2, seed=0)


def test_split_column_is_honoured_with_metadata(tiny_dataset):
    labels = pd.read_csv(Path(tiny_dataset.paths.raw) / "labels.csv")
    n = labels["id"].str.split("_").str[1].astype(int)
    split = np.where(n == 5, "val", np.where(n == 6, "test", "train"))
    edit_labels(tiny_dataset, split=split, x=n * 10.0, region="north")
    out = prepare(with_prepare(tiny_dataset, seed=7))  # the seed plays no part
    index = pd.read_csv(out / "index.csv").set_index("id")
    assert index.loc["Forest_5", "split"] == "val" and index.loc["SeaLake_6", "split"] == "test"
    assert (index["split"] == "train").sum() == 12
    assert index.loc["River_3", "x"] == 30.0 and set(index["region"]) == {"north"}  # extra columns travel
    assert json.loads((out / "stats.json").read_text())["split_method"] == "labels.csv"


def test_captions_follow_each_split_in_pack_order(tiny_dataset):
    labels = pd.read_csv(Path(tiny_dataset.paths.raw) / "labels.csv")
    words = [f"  tile {i} of {c}  " if i % 3 else None for i, c in enumerate(labels["class"])]
    edit_labels(tiny_dataset, caption=words)
    out = prepare(tiny_dataset)
    index = pd.read_csv(out / "index.csv", keep_default_na=False)
    by_id = dict(zip(labels["id"], (w.strip() if w else "" for w in words)))
    for split in ("train", "val", "test"):
        ids = index.loc[index["split"] == split, "id"]  # the pack's tile order
        assert list(split_captions(out, split)) == [by_id[i] for i in ids]
    assert "" in set(split_captions(out, "train"))
    assert len(split_captions(out, "val")) == len(load_split(out, "val").labels)


def test_no_caption_column_means_no_captions(tiny_dataset):
    out = prepare(tiny_dataset)
    assert split_captions(out, "train") is None


@pytest.mark.parametrize("value, message", [(None, "line 4: no split while other rows have one"),
                                            ("validation", "line 4: split 'validation'; expected one of")])
def test_partial_or_invalid_split_column_names_the_line(tiny_dataset, value, message):
    split = ["train"] * 18
    split[2] = value  # line 4: the header is line 1
    edit_labels(tiny_dataset, split=split)
    with pytest.raises(GeoclipError, match=message):
        prepare(tiny_dataset)
    assert_no_output(tiny_dataset)


def spatial_dataset(tmp_path: Path, params):
    """3 classes x 4 location blocks (5 km apart) x 3 tiles, plus a River tile inside a Forest block."""
    raw = Path(params.paths.raw)
    shutil.rmtree(raw)
    rng, rows = np.random.default_rng(1), []
    for c, name in enumerate(params.classes.names):
        for b in range(4):
            for k in range(3):
                rel = f"tiles/{name}/{name}_{b}{k}.tif"
                origin = (500000.0 + 20000 * b + 640 * k, 5600000.0 + 20000 * c)
                data = (rng.integers(500, 1500, (13, 64, 64)) + 1000 * c).astype("uint16")
                make_tile(raw / rel, data, origin=origin)
                rows.append({"id": f"{name}_{b}{k}", "path": rel, "class": name})
    make_tile(raw / "tiles/River/River_stray.tif", rng.integers(1500, 2500, (13, 64, 64)).astype("uint16"),
              origin=(501280.0 + 640, 5600000.0))
    rows.append({"id": "River_stray", "path": "tiles/River/River_stray.tif", "class": "River"})
    pd.DataFrame(rows).to_csv(raw / "labels.csv", index=False)
    return with_prepare(params, split="spatial", spatial_block_m=5000.0, val_fraction=0.25, test_fraction=0.25)


def test_spatial_split_keeps_location_groups_whole(tmp_path, tiny_dataset):
    params = spatial_dataset(tmp_path, tiny_dataset)
    out = prepare(params)
    index = pd.read_csv(out / "index.csv")
    for path, location in zip(index["path"], index["location"]):  # groups recomputed from each file
        with rasterio.open(Path(params.paths.raw) / path) as src:
            x, y = src.transform * (src.width / 2, src.height / 2)
        assert location == f"EPSG:32632:{math.floor(x / 5000)}:{math.floor(y / 5000)}"
    assert index["location"].nunique() == 12
    assert index.groupby("location")["split"].nunique().max() == 1  # no group in two splits
    stray = index.set_index("id").loc["River_stray"]
    assert stray["split"] == index.set_index("id").loc["Forest_00", "split"]  # goes with its Forest block
    assert index.groupby("split")["class"].nunique().min() == 3 and (index["split"] == "train").sum() >= 12
    assert json.loads((out / "stats.json").read_text())["split_method"] == "spatial"
    assert snapshot(prepare(params)) == snapshot(out)  # deterministic


def test_spatial_split_uses_xy_columns(tmp_path, tiny_dataset):
    params = spatial_dataset(tmp_path, tiny_dataset)
    labels = pd.read_csv(Path(params.paths.raw) / "labels.csv")
    block = labels["id"].str[-2].map({"0": 0, "1": 1, "2": 2, "3": 3, "a": 0})  # River_stray -> block 0
    edit_labels(params, x=700000.0 + 10000 * block, y=4000000.0)
    index = pd.read_csv(prepare(params) / "index.csv")
    assert set(index["location"]) == {f"EPSG:32632:{140 + 2 * b}:800" for b in range(4)}
    assert index.groupby("location")["split"].nunique().max() == 1


def test_spatial_split_needs_a_crs(tiny_dataset):
    victim = Path(tiny_dataset.paths.raw) / "tiles/River/River_2.tif"
    make_tile(victim, read_tile(victim), crs=None)
    with pytest.raises(GeoclipError, match="River_2.tif: no CRS or geotransform; prepare.split: spatial"):
        prepare(with_prepare(tiny_dataset, split="spatial"))
    assert_no_output(tiny_dataset)


def banded_dataset(params, names: list[str]):
    """Rewrite the tiles with bands ``names`` (in bands.json); a band's values // 1000 = its EuroSAT index."""
    raw = Path(params.paths.raw)
    rng = np.random.default_rng(2)
    for path in sorted(raw.glob("tiles/*/*.tif")):
        base = np.array([1000 * ALL_BAND_NAMES.index(n) for n in names])[:, None, None]
        make_tile(path, (base + rng.integers(0, 999, (len(names), 64, 64))).astype("uint16"))
    (raw / "bands.json").write_text(json.dumps({"band_names": names}))


def test_bands_are_selected_by_name_from_the_dataset_order(tiny_dataset):
    source = list(reversed(ALL_BAND_NAMES))  # a dataset whose files store the bands in another order
    banded_dataset(tiny_dataset, source)
    subset = ["B04", "B03", "B02", "B08"]
    out = prepare(replace(tiny_dataset, bands=subset))
    images = load_split(out, "val").images
    assert images.shape[1] == 4
    assert [int(np.unique(images[:, j] // 1000)[0]) for j in range(4)] == [3, 2, 1, 7]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["band_names"] == subset and stats["source_band_names"] == source
    assert stats["band_source"] == "bands.json" and len(stats["mean"]) == 4


def test_band_not_in_the_dataset(tiny_dataset):
    banded_dataset(tiny_dataset, ["B02", "B03", "B04", "B08"])
    with pytest.raises(GeoclipError, match=r"bands: \['B01', .*not among the dataset's bands .*bands.json"):
        prepare(tiny_dataset)
    assert_no_output(tiny_dataset)


def test_tile_with_wrong_band_count_keeps_previous_output(tiny_dataset):
    before = snapshot(prepare(tiny_dataset))
    victim = Path(tiny_dataset.paths.raw) / "tiles/Forest/Forest_4.tif"
    make_tile(victim, read_tile(victim)[:12])
    with pytest.raises(GeoclipError, match=r"Forest_4.tif: 12 band\(s\), expected 13 \['B01'"):
        prepare(tiny_dataset)
    assert_no_output(tiny_dataset, before)


def test_class_with_too_few_tiles_per_split(tiny_dataset):
    before = snapshot(prepare(tiny_dataset))
    with pytest.raises(GeoclipError, match=r"split_classes.min_tiles_per_split \(expected at least 2 tile\(s\).*"
                                           r"failed for class Forest split val \(got 1\)"):
        prepare(with_prepare(tiny_dataset, min_tiles_per_split=2))
    assert_no_output(tiny_dataset, before)


def test_class_missing_from_a_split(tiny_dataset):
    labels = pd.read_csv(Path(tiny_dataset.paths.raw) / "labels.csv")
    n = labels["id"].str.split("_").str[1].astype(int)
    split = np.where(n == 5, "val", np.where(n == 6, "test", "train")).astype(object)
    split[(labels["class"] == "SeaLake") & (n == 6)] = "train"
    edit_labels(tiny_dataset, split=split)
    with pytest.raises(GeoclipError, match=r"class SeaLake split test \(got 0\)"):
        prepare(tiny_dataset)
    assert_no_output(tiny_dataset)


def test_duplicate_content_across_splits(tiny_dataset):
    raw = Path(tiny_dataset.paths.raw)
    shutil.copyfile(raw / "tiles/Forest/Forest_1.tif", raw / "tiles/Forest/Forest_5.tif")
    labels = pd.read_csv(raw / "labels.csv")
    n = labels["id"].str.split("_").str[1].astype(int)
    edit_labels(tiny_dataset, split=np.where(n == 5, "val", np.where(n == 6, "test", "train")))
    with pytest.raises(GeoclipError, match=r"splits.content_in_one_split .* failed for id Forest_1 \(got 2\), "
                                           r"id Forest_5 \(got 2\)"):
        prepare(tiny_dataset)
    assert_no_output(tiny_dataset)


def test_duplicate_ids(tiny_dataset):
    labels = pd.read_csv(Path(tiny_dataset.paths.raw) / "labels.csv")
    edit_labels(tiny_dataset, id=labels["id"].replace({"River_2": "River_1"}))
    with pytest.raises(GeoclipError, match=r"splits.unique_id \(expected unique tile ids\) failed for id River_1"):
        prepare(tiny_dataset)
    assert_no_output(tiny_dataset)


def test_unknown_class_fails_without_output(tiny_dataset):
    edit_labels(tiny_dataset, **{"class": ["Glacier"] + ["Forest"] * 5 + ["River"] * 6 + ["SeaLake"] * 6})
    with pytest.raises(GeoclipError, match=r"class\(es\) \['Glacier'\] not in classes.names"):
        prepare(tiny_dataset)
    assert_no_output(tiny_dataset)


def test_truncated_tile_keeps_previous_output(tiny_dataset):
    before = snapshot(prepare(tiny_dataset))
    victim = Path(tiny_dataset.paths.raw) / "tiles/River/River_3.tif"
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(GeoclipError, match="River_3.tif"):
        prepare(tiny_dataset)
    assert_no_output(tiny_dataset, before)


def test_missing_labels_file(tmp_path):
    from geoclip.config import params_from_dict
    params = params_from_dict({"paths": {"raw": str(tmp_path), "prepared": str(tmp_path / "p")}})
    with pytest.raises(GeoclipError, match="labels.csv: labels manifest not found"):
        prepare(params)


def test_real_tiles_ingest_validate_prepare_spatial_with_band_subset(tmp_path, real_tiles):
    """The whole data path on the 100 real EuroSAT_MS tiles: ingest, GE validation, spatial split, 4 bands."""
    from geoclip.config import params_from_dict
    from geoclip.data.ingest import ingest
    from geoclip.data.validate import validate

    params = params_from_dict({
        "bands": ["B04", "B03", "B02", "B08"],
        "paths": {k: str(tmp_path / k) for k in ("raw", "prepared", "reports", "model", "eval", "scores")},
        "ingest": {"source": str(real_tiles)},
        "prepare": {"split": "spatial", "val_fraction": 0.2, "test_fraction": 0.2},
    })
    ingest(params)
    assert validate(params)["success"]
    prepare(params)

    index = pd.read_csv(tmp_path / "prepared" / "index.csv")
    assert len(index) == 100 and index.groupby("location")["split"].nunique().max() == 1
    assert set(index.groupby("split")["class"].nunique()) == {10}  # every class in every split
    stats = json.loads((tmp_path / "prepared" / "stats.json").read_text())
    assert stats["band_names"] == ["B04", "B03", "B02", "B08"]
    assert stats["source_band_names"] == list(ALL_BAND_NAMES)
    test = load_split(tmp_path / "prepared", "test")
    first = index[index["split"] == "test"].iloc[0]
    source = read_tile(real_tiles / first["class"] / Path(first["path"]).name, [3, 2, 1, 7])
    assert np.array_equal(test.images[0], source)  # the packs hold exactly the selected source bands
    assert (tmp_path / "reports" / "data_docs" / "index.html").exists()
    assert (tmp_path / "reports" / "data_docs_splits" / "index.html").exists()


def test_a_stratified_split_of_several_sources_gives_every_split_its_share_of_each():
    """Real tiles are a small minority beside synthetic ones: each class's real tiles still reach val and test."""
    from geoclip.data.prepare import split_strata, stratified_split

    df = pd.DataFrame({"class": ["Forest"] * 60 + ["River"] * 60,
                       "source": (["synthetic"] * 50 + ["/data/real"] * 10) * 2})
    split = stratified_split(split_strata(df), 0.15, 0.15, seed=0)
    counts = df.assign(split=split).groupby(["class", "source", "split"]).size()
    for cls in ("Forest", "River"):
        assert [counts[(cls, "/data/real", s)] for s in ("train", "val", "test")] == [6, 2, 2]
        assert [counts[(cls, "synthetic", s)] for s in ("train", "val", "test")] == [34, 8, 8]
    one_source = df.assign(source="synthetic")
    assert split_strata(one_source).equals(df["class"])  # one source: the split is exactly as before
