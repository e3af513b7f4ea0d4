"""Tests for geoclip.data.tiles: discovering and reading tiles in the supported layouts."""

import numpy as np
import pandas as pd
import pytest
from factories import make_tile

from geoclip.data.tiles import discover_tiles, read_tile
from geoclip.errors import GeoclipError


def test_eurosat_layout_gives_class_from_folder(tmp_path):
    for name in ["Forest", "River"]:
        for n in (1, 2):
            make_tile(tmp_path / name / f"{name}_{n}.tif", np.ones((13, 8, 8), "uint16"))
    (tmp_path / "Forest" / "notes.txt").write_text("not a tile")
    df = discover_tiles(tmp_path)
    assert list(df.columns[:3]) == ["id", "path", "class"]
    assert sorted(df["class"]) == ["Forest", "Forest", "River", "River"]
    assert set(df["id"]) == {"Forest_1", "Forest_2", "River_1", "River_2"}


def test_flat_folder_has_no_class(tmp_path):
    make_tile(tmp_path / "a.tif", np.ones((13, 8, 8), "uint16"))
    df = discover_tiles(tmp_path)
    assert len(df) == 1 and df["class"].isna().all()


def test_manifest_paths_are_relative_to_manifest(tmp_path):
    make_tile(tmp_path / "x" / "t.tif", np.ones((13, 8, 8), "uint16"))
    pd.DataFrame({"path": ["x/t.tif"], "class": ["Forest"]}).to_csv(tmp_path / "m.csv", index=False)
    df = discover_tiles(tmp_path / "m.csv")
    assert df.loc[0, "path"] == str(tmp_path / "x" / "t.tif") and df.loc[0, "class"] == "Forest"


def test_manifest_without_path_column(tmp_path):
    (tmp_path / "m.csv").write_text("file,class\na.tif,Forest\n")
    with pytest.raises(GeoclipError, match="m.csv: manifest has no 'path' column"):
        discover_tiles(tmp_path / "m.csv")


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(GeoclipError, match="no such file or folder"):
        discover_tiles(tmp_path / "absent")
    with pytest.raises(GeoclipError, match="no .tif tiles found"):
        discover_tiles(tmp_path)


def test_read_tile_selects_and_orders_bands(tmp_path):
    data = np.arange(13 * 4, dtype="uint16").reshape(13, 2, 2)
    path = make_tile(tmp_path / "t.tif", data)
    assert np.array_equal(read_tile(path), data)
    assert np.array_equal(read_tile(path, [3, 2, 1]), data[[3, 2, 1]])
    with pytest.raises(GeoclipError, match="has 13 bands, expected at least 14"):
        read_tile(path, [13])


def test_read_tile_not_a_raster(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_text("hello")
    with pytest.raises(GeoclipError, match="bad.tif: cannot be read as a raster"):
        read_tile(bad)


def test_real_eurosat_tiles(real_tiles):
    df = discover_tiles(real_tiles)
    assert len(df) == 100 and df["class"].nunique() == 10
    tile = read_tile(df.loc[0, "path"])
    assert tile.shape == (13, 64, 64) and tile.dtype == np.uint16


def test_write_labels_for_a_eurosat_download(tmp_path):
    from geoclip.data.tiles import write_labels

    for name in ["Forest", "River"]:
        make_tile(tmp_path / "tiles" / name / f"{name}_1.tif", np.ones((13, 8, 8), "uint16"))
    out = write_labels(tmp_path)
    df = pd.read_csv(out)
    assert list(df.columns) == ["id", "path", "class"]
    assert set(df["path"]) == {"tiles/Forest/Forest_1.tif", "tiles/River/River_1.tif"}
    with pytest.raises(GeoclipError, match="labels.csv: already exists; pass --overwrite"):
        write_labels(tmp_path)
    assert write_labels(tmp_path, overwrite=True) == out


def test_nested_eurosat_allbands_layout(tmp_path):
    nested = tmp_path / "EuroSATallBands/ds/images/remote_sensing/otherDatasets/sentinel_2/tif"
    for name in ["AnnualCrop", "River"]:
        make_tile(nested / name / f"{name}_1.tif", np.ones((13, 8, 8), "uint16"))
    make_tile(tmp_path / "__MACOSX" / "AnnualCrop" / "._AnnualCrop_1.tif", np.ones((13, 8, 8), "uint16"))
    df = discover_tiles(tmp_path)
    assert dict(zip(df["id"], df["class"])) == {"AnnualCrop_1": "AnnualCrop", "River_1": "River"}
    assert df.loc[0, "path"] == str(nested / "AnnualCrop" / "AnnualCrop_1.tif")


def test_several_layouts_are_refused(tmp_path):
    for split in ["train", "test"]:
        make_tile(tmp_path / split / "Forest" / "a.tif", np.ones((13, 8, 8), "uint16"))
    with pytest.raises(GeoclipError, match=r"more than one layout \(test/<Class>/, train/<Class>/\)"):
        discover_tiles(tmp_path)


def test_layout_of_s3_keys():
    from geoclip.data.tiles import layout_tiles

    df = layout_tiles(["x/tif/Forest/Forest_1.tif", "x/tif/Forest/notes.txt", "x/readme.md"], "s3://b/p")
    assert df.to_dict("records") == [{"path": "s3://b/p/x/tif/Forest/Forest_1.tif", "class": "Forest"}]


def test_parquet_manifest_with_uri_column(tmp_path):
    make_tile(tmp_path / "t.tif", np.ones((13, 8, 8), "uint16"))
    pd.DataFrame({"uri": ["t.tif", "s3://b/k/u.tif"], "class": ["Forest", None], "id": [1, 2],
                  "x": [1.5, 2.5]}).to_parquet(tmp_path / "m.parquet")
    df = discover_tiles(tmp_path / "m.parquet")
    assert list(df["path"]) == [str(tmp_path / "t.tif"), "s3://b/k/u.tif"]
    assert list(df["id"]) == ["1", "2"] and pd.isna(df.loc[1, "class"]) and list(df["x"]) == [1.5, 2.5]


def test_manifest_row_without_path(tmp_path):
    (tmp_path / "m.csv").write_text("path,class\na.tif,Forest\n,River\n")
    with pytest.raises(GeoclipError, match="m.csv: row 2 has no path"):
        discover_tiles(tmp_path / "m.csv")


def test_band_descriptions(tmp_path):
    import rasterio

    from geoclip.data.tiles import band_descriptions

    path = make_tile(tmp_path / "t.tif", np.ones((2, 4, 4), "uint16"))
    assert band_descriptions(path) is None
    with rasterio.open(path, "r+") as dst:
        dst.set_band_description(2, "B08")
    assert band_descriptions(path) == ["", "B08"]
