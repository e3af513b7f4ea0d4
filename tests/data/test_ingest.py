"""Tests for geoclip.data.ingest: every source layout into the canonical raw layout, and every refusal."""

import filecmp
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from factories import make_tile

from geoclip.bands import ALL_BAND_NAMES
from geoclip.cli import main
from geoclip.config import load_params, params_from_dict
from geoclip.data.ingest import ingest
from geoclip.errors import GeoclipError
from geoclip.scoring.score import _find_truth

REPO = Path(__file__).resolve().parents[2]

CLASSES = ["Forest", "River", "SeaLake"]
NESTED = "EuroSATallBands/ds/images/remote_sensing/otherDatasets/sentinel_2/tif"
BUCKET = "ingest-test"


def params_for(tmp_path, source, classes=CLASSES, **extra):
    """Params that ingest ``source`` into ``tmp_path/data/raw``."""
    return params_from_dict({"classes": {"names": classes}, "paths": {"raw": str(tmp_path / "data" / "raw")},
                             "ingest": {"source": str(source), "workers": 2}, **extra})


def tile(path, value=1, descriptions=None):
    """A small 13-band uint16 tile, with band names stored when ``descriptions`` is given."""
    return make_tile(path, np.full((13, 8, 8), value, "uint16"), descriptions=descriptions)


def raw_of(params):
    """The raw folder, its labels table and its recorded band names."""
    raw = Path(params.paths.raw)
    return raw, pd.read_csv(raw / "labels.csv"), json.loads((raw / "bands.json").read_text())["band_names"]


def test_real_eurosat_ms_folder(tmp_path, real_tiles):
    params = params_from_dict({"paths": {"raw": str(tmp_path / "raw")}, "ingest": {"source": str(real_tiles)}})
    summary = ingest(params)
    assert summary["n_tiles"] == 100 and summary["n_classes"] == 10 and summary["missing_classes"] == []
    raw, labels, bands = raw_of(params)
    assert list(labels.columns) == ["id", "path", "class", "source", "source_path"] and bands == list(ALL_BAND_NAMES)
    row = labels.set_index("id").loc["Forest_3"]
    assert row["path"] == "tiles/Forest/Forest_3.tif" and row["class"] == "Forest"
    assert filecmp.cmp(raw / row["path"], real_tiles / "Forest" / "Forest_3.tif", shallow=False)


def test_nested_eurosat_allbands_download(tmp_path, real_tiles):
    root = tmp_path / "downloads" / NESTED
    for cls in CLASSES:
        for n in (1, 2):
            (root / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy(real_tiles / cls / f"{cls}_{n}.tif", root / cls / f"{cls}_{n}.tif")
    (tmp_path / "downloads" / "EuroSATallBands" / "README.txt").write_text("not a tile")
    params = params_for(tmp_path, tmp_path / "downloads" / "EuroSATallBands")
    assert ingest(params)["classes"] == {"Forest": 2, "River": 2, "SeaLake": 2}
    raw, labels, _ = raw_of(params)
    assert sorted(labels["id"]) == sorted(f"{c}_{n}" for c in CLASSES for n in (1, 2))
    assert all((raw / p).is_file() for p in labels["path"])


def test_plain_class_folders_get_class_prefixed_ids(tmp_path):
    tile(tmp_path / "src" / "Forest" / "a.tif", descriptions=ALL_BAND_NAMES)  # correct names pass
    tile(tmp_path / "src" / "Forest" / "Forest_7.tif")
    tile(tmp_path / "src" / "River" / "a.tif")
    params = params_for(tmp_path, tmp_path / "src")
    summary = ingest(params)
    assert summary["missing_classes"] == ["SeaLake"]
    _, labels, _ = raw_of(params)
    assert dict(zip(labels["id"], labels["path"])) == {
        "Forest_7": "tiles/Forest/Forest_7.tif",
        "Forest_a": "tiles/Forest/Forest_a.tif", "River_a": "tiles/River/River_a.tif"}


def _manifest_tiles(tmp_path):
    """Three tiles (values 1, 2, 3) in ``src/t/``; returns ``src``, where the manifest goes."""
    src = tmp_path / "src"
    for i in range(3):
        tile(src / "t" / f"tile_{i}.tif", value=i + 1)
    return src


def test_csv_manifest_keeps_split_and_metadata(tmp_path):
    src = _manifest_tiles(tmp_path)
    pd.DataFrame({"id": ["f1", "r1", "s1"], "path": ["t/tile_0.tif", "t/tile_1.tif", str(src / "t" / "tile_2.tif")],
                  "class": CLASSES, "split": ["train", "val", "test"], "x": [500100.5, 500740.0, 501380.0],
                  "y": [5.6e6, 5.6e6, 5.6e6], "lat": [50.1, 50.2, 50.3]}).to_csv(src / "m.csv", index=False)
    params = params_for(tmp_path, src / "m.csv")
    summary = ingest(params)
    assert summary["splits"] == {"test": 1, "train": 1, "val": 1}
    assert summary["metadata_columns"] == ["x", "y", "lat"]
    raw, labels, _ = raw_of(params)
    assert list(labels.columns) == ["id", "path", "class", "split", "x", "y", "lat", "source", "source_path"]
    assert labels.loc[0, "path"] == "tiles/Forest/f1.tif" and labels.loc[0, "x"] == 500100.5
    with rasterio.open(raw / labels.loc[2, "path"]) as f:
        assert f.read(1)[0, 0] == 3  # the absolute path's tile, not another


def test_parquet_manifest_with_uri_column(tmp_path):
    src = _manifest_tiles(tmp_path)
    pd.DataFrame({"uri": [f"t/tile_{i}.tif" for i in range(3)], "class": CLASSES, "split": ["train"] * 3,
                  "scene": ["a", "b", "c"]}).to_parquet(src / "m.parquet")
    params = params_for(tmp_path, src / "m.parquet")
    ingest(params)
    _, labels, _ = raw_of(params)
    assert list(labels["id"]) == ["tile_0", "tile_1", "tile_2"] and list(labels["scene"]) == ["a", "b", "c"]
    assert list(labels.columns) == ["id", "path", "class", "split", "scene", "source", "source_path"]


@pytest.mark.parametrize("column, values, message", [
    ("split", ["train", "training", "test"],
     r"m.csv: row 2 \(.*tile_1.tif\): split 'training'; expected one of train, val, test"),
    ("id", ["a", "b", "a"], r"m.csv: duplicate id\(s\) \['a'\]"),
    ("class", ["Forest", "Moon", "Mars"],
     r"m.csv: unknown class\(es\) \['Mars', 'Moon'\]; expected names from classes.names"),
])
def test_manifest_refusals(tmp_path, column, values, message):
    src = _manifest_tiles(tmp_path)
    df = pd.DataFrame({"path": [f"t/tile_{i}.tif" for i in range(3)], "class": CLASSES})
    df[column] = values
    df.to_csv(src / "m.csv", index=False)
    with pytest.raises(GeoclipError, match=message):
        ingest(params_for(tmp_path, src / "m.csv"))
    assert not (tmp_path / "data" / "raw").exists()


def test_unknown_class_folder_and_empty_sources(tmp_path):
    tile(tmp_path / "src" / "Moon" / "a.tif")
    with pytest.raises(GeoclipError, match=r"unknown class\(es\) \['Moon'\].*add new classes"):
        ingest(params_for(tmp_path, tmp_path / "src"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(GeoclipError, match="empty: no .tif tiles found"):
        ingest(params_for(tmp_path, tmp_path / "empty"))
    tile(tmp_path / "flat" / "a.tif")
    with pytest.raises(GeoclipError, match="flat: tiles have no class; expected one folder per class"):
        ingest(params_for(tmp_path, tmp_path / "flat"))
    with pytest.raises(GeoclipError, match="ingest.source: .*absent does not exist"):
        ingest(params_for(tmp_path, tmp_path / "absent"))


def test_not_a_tiff_is_named_by_its_source_path(tmp_path):
    bad = tmp_path / "src" / "Forest" / "Forest_1.tif"
    bad.parent.mkdir(parents=True)
    bad.write_text("not a tiff")
    with pytest.raises(GeoclipError) as err:
        ingest(params_for(tmp_path, tmp_path / "src"))
    assert str(err.value).startswith(f"{bad}: cannot be read as a raster") and ".tmp" not in str(err.value)


def test_tiles_in_another_band_order_or_form_are_stacked_in_ingest_band_order(tmp_path):
    from s2_products import per_band_folder

    ordered = np.stack([np.full((8, 8), 100 + i, "uint16") for i in range(13)])
    make_tile(tmp_path / "src" / "River_1.tif", ordered[::-1].copy(), descriptions=list(reversed(ALL_BAND_NAMES)))
    make_tile(tmp_path / "src" / "Forest_1.tif", ordered, descriptions=list(ALL_BAND_NAMES))
    patch = per_band_folder(tmp_path / "src" / "S2A_MSIL2A_patch", size_10m=60)
    pd.DataFrame({"path": ["River_1.tif", "Forest_1.tif", "S2A_MSIL2A_patch"],
                  "class": ["River", "Forest", "SeaLake"]}).to_csv(tmp_path / "src" / "m.csv", index=False)
    params = params_for(tmp_path, tmp_path / "src" / "m.csv")
    with pytest.raises(GeoclipError, match=r"S2A_MSIL2A_patch: no band B10 in this L2A per-band input"):
        ingest(params)  # an L2A patch has no B10, which ingest.band_names lists
    (patch / "S2A_MSIL2A_patch_B10.tif").write_bytes((patch / "S2A_MSIL2A_patch_B09.tif").read_bytes())
    ingest(params)
    raw = Path(params.paths.raw)
    for tile_id in ("River_1", "Forest_1"):
        with rasterio.open(raw / "tiles" / tile_id.split("_")[0] / f"{tile_id}.tif") as src:
            np.testing.assert_array_equal(src.read(), ordered)  # reversed on disk, stored in ingest.band_names order
            assert list(src.descriptions) == list(ALL_BAND_NAMES)
    with rasterio.open(raw / "tiles" / "SeaLake" / "S2A_MSIL2A_patch.tif") as src:
        assert src.shape == (60, 60) and list(src.descriptions) == list(ALL_BAND_NAMES)
        assert src.read(2)[0, 0] == 1100 and src.read(5)[0, 0] == 1400  # B02 (10 m) and B05 (20 m, resampled)


def test_a_tile_lacking_a_band_of_ingest_band_names_is_refused_naming_it(tmp_path):
    bad = make_tile(tmp_path / "src" / "River" / "River_1.tif", bands=12, descriptions=list(ALL_BAND_NAMES[:12]))
    tile(tmp_path / "src" / "Forest" / "Forest_1.tif", descriptions=ALL_BAND_NAMES)
    with pytest.raises(GeoclipError) as err:
        ingest(params_for(tmp_path, tmp_path / "src"))
    msg = str(err.value)
    assert msg.startswith(f"{bad}: no band B8A in this stacked input") and "ingest.band_names" in msg
    assert "\n" not in msg and not (tmp_path / "data" / "raw").exists()


def test_failure_leaves_existing_raw_untouched(tmp_path):
    raw = tmp_path / "data" / "raw"
    src = _manifest_tiles(tmp_path)
    pd.DataFrame({"path": ["t/tile_0.tif"], "class": ["Forest"]}).to_csv(src / "one.csv", index=False)
    ingest(params_for(tmp_path, src / "one.csv"))  # a raw folder of ingest's own, which a failure must keep
    before = {p.relative_to(raw): p.read_bytes() for p in raw.rglob("*") if p.is_file()}
    pd.DataFrame({"path": ["t/tile_0.tif", "t/missing.tif"], "class": ["Forest", "River"]}).to_csv(
        src / "m.csv", index=False)
    with pytest.raises(GeoclipError, match=r"missing.tif: no such file"):
        ingest(params_for(tmp_path, src / "m.csv"))
    assert {p.relative_to(raw): p.read_bytes() for p in raw.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in raw.parent.iterdir()) == ["raw", "synthetic"]  # no temp folder left behind
    with pytest.raises(GeoclipError, match="is inside paths.raw"):
        ingest(params_for(tmp_path, raw / "tiles"))  # ingest would delete its own source


def test_ingest_refuses_to_delete_files_it_did_not_write(tmp_path):
    """A user's scenes in data/raw (the old default score.scenes) survive a real-source ingest."""
    raw = tmp_path / "data" / "raw"
    mine = tile(raw / "scenes" / "mine.tif")
    tile(tmp_path / "src" / "Forest" / "a.tif")
    params = params_for(tmp_path, tmp_path / "src")
    with pytest.raises(GeoclipError) as err:
        ingest(params)
    msg = str(err.value)
    assert msg.startswith(f"{raw}: holds 1 file(s) ingest did not write (scenes/mine.tif); ") and "\n" not in msg
    assert mine.is_file() and sorted(p.name for p in raw.parent.iterdir()) == ["raw"]
    shutil.move(raw / "scenes", tmp_path / "data" / "scenes")  # what the message asks for
    ingest(params)
    tile(tmp_path / "src" / "River" / "b.tif")
    assert ingest(params)["n_tiles"] == 2  # its own earlier output is replaced without complaint
    assert (tmp_path / "data" / "scenes" / "mine.tif").is_file()


def test_synthetic_scenes_live_outside_raw_where_scoring_finds_them(tmp_path):
    synth = {"synth": {"tiles_per_class": 2, "tile_size": 16, "scene_size": 64}}
    params = params_for(tmp_path, "synthetic", classes=["Forest", "River"], **synth)
    summary = ingest(params)
    synthetic = tmp_path / "data" / "synthetic"  # beside paths.raw unless paths.synthetic says otherwise
    scene = synthetic / "scenes" / "scene_1.tif"
    assert summary["scenes"] == [str(scene)] and not (tmp_path / "data" / "raw" / "scenes").exists()
    assert _find_truth(scene, None) == str(synthetic / "truth" / "scene_1_truth.tif")
    repo = load_params(REPO / "params.yaml")
    assert (repo.paths.synthetic, repo.score.scenes) == ("data/synthetic", "data/synthetic/scenes")
    assert params_from_dict({}).score.scenes == "data/synthetic/scenes"
    tile(tmp_path / "src" / "Forest" / "a.tif")
    ingest(params_for(tmp_path, tmp_path / "src"))  # a real source leaves the synthetic scenes alone
    assert scene.is_file()
    mine = tile(synthetic / "scenes" / "mine.tif")
    with pytest.raises(GeoclipError, match=r"synthetic: holds 1 file\(s\) ingest did not write \(scenes/mine.tif\)"):
        ingest(params)
    assert mine.is_file() and scene.is_file()


@pytest.mark.parametrize("row", ["../outside.tif", "ABSOLUTE"])
def test_manifest_rows_outside_its_folder_are_refused(tmp_path, row):
    outside = tile(tmp_path / "outside.tif")
    src = _manifest_tiles(tmp_path)
    path = str(outside) if row == "ABSOLUTE" else row
    pd.DataFrame({"id": ["f1", "r1"], "path": ["t/tile_0.tif", path], "class": ["Forest", "River"]}).to_csv(
        src / "m.csv", index=False)
    with pytest.raises(GeoclipError) as err:
        ingest(params_for(tmp_path, src / "m.csv"))
    msg = str(err.value)
    assert msg.startswith(f"{src / 'm.csv'}: row 2 (id r1, path {path}) is outside the manifest's folder {src}")
    assert "ingest.allow_outside_paths" in msg and "\n" not in msg
    assert not (tmp_path / "data" / "raw").exists()
    allowed = params_from_dict({"classes": {"names": CLASSES}, "paths": {"raw": str(tmp_path / "data" / "raw")},
                                "ingest": {"source": str(src / "m.csv"), "allow_outside_paths": True}})
    assert ingest(allowed)["n_tiles"] == 2


def test_every_tile_is_checked_to_be_a_raster(tmp_path):
    tile(tmp_path / "src" / "Forest" / "Forest_1.tif")
    bad = tmp_path / "src" / "Forest" / "Forest_2.tif"  # not the first of its class
    bad.write_text("not a tiff")
    with pytest.raises(GeoclipError) as err:
        ingest(params_for(tmp_path, tmp_path / "src"))
    assert str(err.value).startswith(f"{bad}: cannot be read as a raster")
    assert not (tmp_path / "data" / "raw").exists()


def test_synthetic_source_records_band_names(tmp_path):
    synth = {"synth": {"tiles_per_class": 2, "tile_size": 16, "n_scenes": 0}}
    params = params_for(tmp_path, "synthetic", classes=["Forest", "River"], **synth)
    summary = ingest(params)
    assert summary["n_tiles"] == 4 and summary["metadata_columns"] == ["x", "y", "caption"]
    _, labels, bands = raw_of(params)
    assert bands == list(ALL_BAND_NAMES) and len(labels) == 4
    other = params_from_dict({"classes": {"names": ["Forest", "River"]}, "paths": {"raw": str(tmp_path / "r2")},
                              "ingest": {"band_names": list(reversed(ALL_BAND_NAMES))}, **synth})
    with pytest.raises(GeoclipError, match=r"ingest.band_names: \['B8A', .*synthetic tiles are written in EuroSAT"):
        ingest(other)


@pytest.fixture
def bucket(s3_server, tmp_path):
    """A bucket holding class folders under eurosat/, and a manifest with relative keys under m/."""
    import boto3

    s3 = boto3.client("s3")
    if BUCKET not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=BUCKET)
    for cls in CLASSES:
        path = tile(tmp_path / "up" / f"{cls}_1.tif")
        s3.upload_file(str(path), BUCKET, f"eurosat/{cls}/{cls}_1.tif")
        s3.upload_file(str(path), BUCKET, f"m/tiles/{cls.lower()}.tif")
    s3.put_object(Bucket=BUCKET, Key="eurosat/README.md", Body=b"not a tile")
    manifest = tmp_path / "up" / "manifest.csv"
    pd.DataFrame({"path": [f"tiles/{c.lower()}.tif" for c in CLASSES], "class": CLASSES,
                  "split": ["train", "val", "test"], "lon": [7.1, 7.2, 7.3]}).to_csv(manifest, index=False)
    s3.upload_file(str(manifest), BUCKET, "m/manifest.csv")
    s3.put_object(Bucket=BUCKET, Key="m/bad.csv", Body=b"path,class\ntiles/gone.tif,River\n")
    return f"s3://{BUCKET}"


def test_s3_prefix_and_manifest(tmp_path, bucket):
    params = params_for(tmp_path, f"{bucket}/eurosat/")
    assert ingest(params)["classes"] == {c: 1 for c in CLASSES}
    raw, labels, _ = raw_of(params)
    assert sorted(labels["id"]) == [f"{c}_1" for c in CLASSES] and (raw / "tiles/River/River_1.tif").is_file()
    params = params_for(tmp_path, f"{bucket}/m/manifest.csv")
    assert ingest(params)["splits"] == {"test": 1, "train": 1, "val": 1}
    raw, labels, _ = raw_of(params)
    assert list(labels["lon"]) == [7.1, 7.2, 7.3] and (raw / "tiles/SeaLake/sealake.tif").is_file()


@pytest.mark.parametrize("suffix, message", [
    ("/nothing", r"s3://ingest-test/nothing: no objects found; expected tiles under <Class>/ folders or a manifest"),
    ("/m/absent.parquet", r"s3://ingest-test/m/absent.parquet: no such object; expected a .csv/.parquet manifest"),
    ("/m/tiles", r"s3://ingest-test/m/tiles: tiles have no class; expected one folder per class"),
    ("/m/bad.csv", r"^s3://ingest-test/m/tiles/gone.tif: no such object$"),
])
def test_s3_sources_that_do_not_exist(tmp_path, bucket, suffix, message):
    with pytest.raises(GeoclipError, match=message):
        ingest(params_for(tmp_path, bucket + suffix))


def test_s3_manifest_rows_outside_its_prefix_are_refused(tmp_path, bucket):
    import boto3

    rows = ["../eurosat/Forest/Forest_1.tif", f"{bucket}/eurosat/River/River_1.tif", "s3://other-bucket/x.tif",
            str(tile(tmp_path / "local.tif"))]
    for i, row in enumerate(rows):
        key = f"m/escape_{i}.csv"
        boto3.client("s3").put_object(Bucket=BUCKET, Key=key, Body=f"path,class\ntiles/forest.tif,Forest\n"
                                                                     f"{row},River\n".encode())
        with pytest.raises(GeoclipError) as err:
            ingest(params_for(tmp_path, f"{bucket}/{key}"))
        assert str(err.value).startswith(f"{bucket}/{key}: row 2 (path ") and "outside the manifest's folder " \
            f"{bucket}/m" in str(err.value) and "ingest.allow_outside_paths" in str(err.value)


def test_s3_bucket_that_does_not_exist(tmp_path, s3_server):
    with pytest.raises(GeoclipError, match=r"^s3://no-such-bucket/x: bucket 'no-such-bucket' does not exist$"):
        ingest(params_for(tmp_path, "s3://no-such-bucket/x"))


def test_cli_ingest(tmp_path, capsys):
    tile(tmp_path / "src" / "Forest" / "a.tif")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(f"classes: {{names: {CLASSES}}}\npaths: {{raw: {tmp_path / 'raw'}}}\n"
                           f"ingest: {{source: {tmp_path / 'src'}}}\n")
    assert main(["ingest", "--params", str(params_file)]) == 0
    assert json.loads(capsys.readouterr().out)["n_tiles"] == 1
    params_file.write_text(params_file.read_text().replace("/src", "/absent"))
    assert main(["--params", str(params_file), "ingest"]) == 2
    assert capsys.readouterr().err.startswith("error: ingest.source:")


# ---------------------------------------------------------------- several sources in one dataset
def test_synthetic_plus_a_real_folder_is_one_dataset_with_each_tiles_source(tmp_path, real_tiles):
    """[synthetic, folder]: both written, ids prefixed by source name, each row's source kept, scenes generated."""
    params = params_from_dict({"paths": {"raw": str(tmp_path / "raw")},
                               "synth": {"tiles_per_class": 2, "n_scenes": 1, "scene_size": 64},
                               "ingest": {"source": ["synthetic", str(real_tiles)], "workers": 2}})
    summary = ingest(params)
    assert summary["sources"] == {"synthetic": 20, str(real_tiles): 100} and summary["n_tiles"] == 120
    raw, labels, _ = raw_of(params)
    assert list(labels.columns)[-2:] == ["source", "source_path"]
    real = labels[labels["source"] == str(real_tiles)].set_index("id")
    row = real.loc[f"{real_tiles.name}-Forest_3"]
    assert row["path"] == f"tiles/Forest/{real_tiles.name}-Forest_3.tif"
    assert row["source_path"] == str(real_tiles / "Forest" / "Forest_3.tif")
    assert filecmp.cmp(raw / row["path"], real_tiles / "Forest" / "Forest_3.tif", shallow=False)
    synthetic = labels[labels["source"] == "synthetic"]
    assert synthetic["id"].str.startswith("synthetic-").all() and synthetic["source_path"].isna().all()
    assert all((raw / p).exists() for p in labels["path"]) and labels["id"].is_unique
    assert (params.paths.synthetic_dir() / "scenes" / "scene_1.tif").exists()


def test_a_missing_source_in_the_list_fails_before_anything_is_written(tmp_path):
    tile(tmp_path / "a" / "Forest" / "Forest_1.tif")
    params = params_from_dict({"classes": {"names": CLASSES}, "paths": {"raw": str(tmp_path / "raw")},
                               "ingest": {"source": [str(tmp_path / "a"), str(tmp_path / "gone")]}})
    with pytest.raises(GeoclipError, match=r"ingest.source: .*gone does not exist"):
        ingest(params)
    assert not Path(params.paths.raw).exists()


def test_a_tile_repeated_across_sources_is_kept_once_from_the_first_source(tmp_path):
    """The same image in two folders (re-exported with other tags): one tile, the first source's."""
    tile(tmp_path / "a" / "Forest" / "Forest_1.tif", value=5)
    tile(tmp_path / "a" / "River" / "River_1.tif", value=6)
    tile(tmp_path / "b" / "Forest" / "x.tif", value=5, descriptions=ALL_BAND_NAMES)  # same pixels, other file bytes
    tile(tmp_path / "b" / "SeaLake" / "SeaLake_9.tif", value=7)
    params = params_from_dict({"classes": {"names": CLASSES}, "paths": {"raw": str(tmp_path / "raw")},
                               "ingest": {"source": [str(tmp_path / "a"), str(tmp_path / "b")]}})
    summary = ingest(params)
    raw, labels, _ = raw_of(params)
    assert summary["repeated_tiles_dropped"] == 1 and sorted(labels["id"]) == ["a-Forest_1", "a-River_1",
                                                                                "b-SeaLake_9"]
    assert sorted(p.name for p in (raw / "tiles").rglob("*.tif")) == ["a-Forest_1.tif", "a-River_1.tif",
                                                                      "b-SeaLake_9.tif"]


def test_one_image_with_two_classes_across_sources_is_refused_naming_both(tmp_path):
    tile(tmp_path / "a" / "Forest" / "Forest_1.tif", value=5)
    tile(tmp_path / "b" / "River" / "River_4.tif", value=5)
    params = params_from_dict({"classes": {"names": CLASSES}, "paths": {"raw": str(tmp_path / "raw")},
                               "ingest": {"source": [str(tmp_path / "a"), str(tmp_path / "b")]}})
    with pytest.raises(GeoclipError, match=r"b/River/River_4.tif \(River, from .*\) has the same pixels as "
                                           r".*a/Forest/Forest_1.tif \(Forest, "):
        ingest(params)
    assert not Path(params.paths.raw).exists()


def test_splits_from_some_sources_but_not_others_are_refused(tmp_path):
    src = _manifest_tiles(tmp_path)
    (src / "m.csv").write_text("path,class,split\nt/tile_0.tif,Forest,train\nt/tile_1.tif,River,val\n"
                               "t/tile_2.tif,SeaLake,test\n")
    tile(tmp_path / "folder" / "Forest" / "Forest_1.tif", value=9)
    params = params_from_dict({"classes": {"names": CLASSES}, "paths": {"raw": str(tmp_path / "raw")},
                               "ingest": {"source": [str(src / "m.csv"), str(tmp_path / "folder")]}})
    with pytest.raises(GeoclipError, match=r"give a split column but .*folder'\] do not"):
        ingest(params)


def test_source_names_are_unique_and_file_name_safe():
    from geoclip.data.ingest import source_names

    assert source_names(["synthetic", "/d/EuroSAT MS/", "/e/EuroSAT MS", "s3://b/p/m.csv"]) == {
        "synthetic": "synthetic", "/d/EuroSAT MS/": "EuroSAT_MS", "/e/EuroSAT MS": "EuroSAT_MS-2",
        "s3://b/p/m.csv": "m"}


@pytest.mark.parametrize("source", [[], ["synthetic", "synthetic"], ["synthetic", " "]])
def test_a_bad_source_list_is_refused(tmp_path, source):
    with pytest.raises(GeoclipError, match="ingest.source: .*expected one source or a list of distinct"):
        params_from_dict({"ingest": {"source": source}})
