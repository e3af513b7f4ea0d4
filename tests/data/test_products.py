"""Sentinel-2 inputs in every form (stacked, per-band, SAFE, STAC), read in the model's band order and units."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from s2_products import SIZE_10M, band_value, per_band_folder, safe_product, stac_item, write_band

from geoclip.bands import ALL_BAND_NAMES, canonical_band
from geoclip.data.product_reader import ProductReader, ReadOptions, open_product
from geoclip.data.products import discover_inputs, input_stem, resolve
from geoclip.errors import GeoclipError
from geoclip.scoring.ledger import content_hash
from geoclip.scoring.scene_io import scene_env

BIGEARTHNET = Path(__file__).resolve().parents[3] / "shared" / "data" / "bigearthnet_s2_examples"
L2A_BANDS = [b for b in ALL_BAND_NAMES if b != "B10"]
FILL = ReadOptions(band_fill={"B10": 12})


def expected(bands=ALL_BAND_NAMES, fill=12) -> np.ndarray:
    return np.array([fill if b == "B10" else band_value(b) for b in bands])


def test_band_names_are_read_in_any_spelling():
    assert [canonical_band(n) for n in ("B1", "b01", "B8a", "B08", "nir", "nir08", "swir22", "SCL")] == \
        ["B01", "B01", "B8A", "B08", "B08", "B8A", "B12", "SCL"]
    assert canonical_band("B13") is None and canonical_band("Band 1") is None


def write_archive_export(path: Path, crs: str = "EPSG:4326") -> np.ndarray:
    """A chip as common archives export it: int16, bands described B1 ... B8, B8A, B9 ... B12, geographic CRS."""
    order = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
    data = np.stack([np.full((70, 80), band_value(canonical_band(b)), np.int16) for b in order])
    data[:, :5, :5] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=80, height=70, count=13, dtype="int16", crs=crs,
                       transform=from_origin(11.0, 46.0, 0.0001, 0.0001)) as dst:
        dst.write(data)
        dst.descriptions = tuple(order)
    return data


def test_a_stacked_export_is_read_in_the_models_order_by_its_band_descriptions(tmp_path):
    write_archive_export(tmp_path / "chip.tif")
    with open_product(str(tmp_path / "chip.tif"), ALL_BAND_NAMES, ReadOptions()) as src:
        pixels = src.read()
        assert src.dtypes[0] == "uint16" and src.crs.to_epsg() == 4326
    assert pixels.dtype == np.uint16
    np.testing.assert_array_equal(pixels[:, 10, 10], expected(fill=band_value("B10")))
    assert (pixels[:, :5, :5] == 0).all()  # nodata stays nodata


def test_an_undescribed_stacked_file_follows_band_names_and_a_mismatch_is_one_line(tmp_path):
    path = tmp_path / "plain.tif"
    data = np.stack([np.full((64, 64), band_value(b), np.uint16) for b in reversed(ALL_BAND_NAMES)])
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=13, dtype="uint16", crs="EPSG:32632",
                       transform=from_origin(0, 640, 10, 10)) as dst:
        dst.write(data)
    with open_product(str(path), ALL_BAND_NAMES, ReadOptions(band_names=tuple(reversed(ALL_BAND_NAMES)))) as src:
        np.testing.assert_array_equal(src.read()[:, 0, 0], expected(fill=band_value("B10")))
    with pytest.raises(GeoclipError, match=r"plain\.tif: 13 band\(s\), but band_names names 12"):
        open_product(str(path), ALL_BAND_NAMES, ReadOptions(band_names=tuple(L2A_BANDS)))
    with pytest.raises(GeoclipError, match=r"band_names: \['B99'\] are not Sentinel-2 band names"):
        open_product(str(path), ALL_BAND_NAMES, ReadOptions(band_names=("B99", *ALL_BAND_NAMES[1:])))


def test_unknown_band_descriptions_are_named(tmp_path):
    path = tmp_path / "odd.tif"
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=2, dtype="uint16", crs="EPSG:32632",
                       transform=from_origin(0, 640, 10, 10)) as dst:
        dst.write(np.ones((2, 64, 64), np.uint16))
        dst.descriptions = ("B02", "thermal")
    with pytest.raises(GeoclipError, match=r"odd\.tif: band description\(s\) \['thermal'\] are not Sentinel-2"):
        resolve(str(path))


def test_a_per_band_folder_is_stacked_on_the_10m_grid_through_a_vrt(tmp_path):
    folder = per_band_folder(tmp_path / "S2B_MSIL2A_patch")
    with open_product(str(folder), ALL_BAND_NAMES, FILL) as src:
        assert (src.height, src.width, src.resolution) == (SIZE_10M, SIZE_10M, 10.0)
        pixels = src.read(window=rasterio.windows.Window(0, 64, SIZE_10M, 64))  # a strip, not the whole product
        info = src.describe()
    np.testing.assert_array_equal(pixels[:, 5, 5], expected())
    assert info["form"] == "per-band" and info["processing_level"] == "L2A" and info["bands"]["B10"] == "fill 12"
    assert input_stem(str(folder)) == "S2B_MSIL2A_patch"


def test_l2a_without_b10_says_which_band_and_how_to_fix(tmp_path):
    folder = per_band_folder(tmp_path / "patch")
    with pytest.raises(GeoclipError, match=r"patch: no band B10 in this L2A per-band input .* score.band_fill"):
        open_product(str(folder), ALL_BAND_NAMES, ReadOptions(level="L2A"))
    with open_product(str(folder), L2A_BANDS, ReadOptions()) as src:  # a model trained on L2A's bands
        np.testing.assert_array_equal(src.read()[:, 0, 0], expected(L2A_BANDS))


@pytest.mark.skipif(not BIGEARTHNET.is_dir(), reason="../shared/data/bigearthnet_s2_examples is not here")
def test_bigearthnet_patches_read_through_the_vrt_equal_each_band_resampled_on_its_own():
    from rasterio.enums import Resampling

    for folder in sorted(p for p in BIGEARTHNET.iterdir() if p.is_dir())[:4]:
        with open_product(str(folder), L2A_BANDS, ReadOptions()) as src:
            pixels, shape = src.read(), (src.height, src.width)
            assert src.describe()["processing_level"] == "L2A" and src.resolution == 10.0
        for i, band in enumerate(L2A_BANDS):  # the reference: rasterio's own bilinear resampling, band by band
            with rasterio.open(folder / f"{folder.name}_{band}.tif") as b:
                np.testing.assert_array_equal(pixels[i], b.read(1, out_shape=shape, resampling=Resampling.bilinear))


def test_a_safe_l2a_product_applies_its_offset_and_masks_its_scl_classes(tmp_path):
    scl = np.full((96, 96), 4, np.uint8)  # vegetation
    scl[:10, :10], scl[50:60, 50:60] = 9, 0  # a cloud (high probability), no data
    safe = safe_product(tmp_path, scl=scl)
    for uri in (safe, next(safe.glob("MTD_*.xml"))):  # the folder or its MTD
        with open_product(str(uri), ALL_BAND_NAMES, FILL) as src:
            pixels = src.read()
            info = src.describe()
        np.testing.assert_array_equal(pixels[:, 100, 150], expected())  # stored DN + BOA_ADD_OFFSET (-1000)
        assert (pixels[:, :20, :20] == 0).all() and (pixels[:, 100:120, 100:120] == 0).all()
        assert (pixels[:, 20:, 20:100] != 0).all()
        assert info["form"] == "safe" and info["processing_level"] == "L2A" and info["dn_offset"] == [-1000.0]
        assert info["mask"]["kind"] == "scl" and info["mask"]["classes"] == [0, 1, 3, 8, 9, 10]
    with open_product(str(safe), ALL_BAND_NAMES, ReadOptions(band_fill={"B10": 12}, mask="none")) as src:
        assert (src.read()[:, :20, :20] != 0).all()  # score.mask none
    assert input_stem(str(safe)).startswith("S2B_MSIL2A_20240601") and not input_stem(str(safe)).endswith("SAFE")


def test_another_handle_reads_the_same_pixels_without_resolving_or_checking_again(tmp_path, monkeypatch):
    scl = np.full((96, 96), 4, np.uint8)
    scl[:10, :10] = 9
    safe = safe_product(tmp_path, scl=scl)
    with open_product(str(safe), ALL_BAND_NAMES, FILL) as src:
        expected_pixels = src.read()

        def refuse(*_):
            raise AssertionError("resolved or checked again")

        # Scoring's reader threads each take a handle: the product was resolved and its values checked once.
        monkeypatch.setattr("geoclip.data.products.resolve", refuse)
        monkeypatch.setattr(ProductReader, "_check_plausible", refuse)
        with src.reopen() as other:
            np.testing.assert_array_equal(other.read(), expected_pixels)  # offset and SCL mask applied alike
            assert other._sources[0][0].ds is not src._sources[0][0].ds  # a GDAL dataset of its own
        assert not src._sources[0][0].ds.closed  # closing the other handle leaves this one open
        np.testing.assert_array_equal(src.read(), expected_pixels)


def test_an_old_baseline_l1c_safe_reads_as_it_is(tmp_path):
    safe = safe_product(tmp_path, level="L1C", baseline="02.09", offset=0)
    with open_product(str(safe), ALL_BAND_NAMES, ReadOptions()) as src:
        np.testing.assert_array_equal(src.read()[:, 7, 7], expected(fill=band_value("B10")))
        assert src.describe()["processing_level"] == "L1C"


def test_an_empty_or_incomplete_safe_is_refused(tmp_path):
    with pytest.raises(GeoclipError, match=r"gone: no such file or folder"):
        resolve(str(tmp_path / "gone"))
    (tmp_path / "X.SAFE").mkdir()
    with pytest.raises(GeoclipError, match=r"X\.SAFE: empty folder"):
        resolve(str(tmp_path / "X.SAFE"))
    (tmp_path / "Y.SAFE").mkdir()
    (tmp_path / "Y.SAFE" / "manifest.safe").write_text("<x/>")
    with pytest.raises(GeoclipError, match=r"Y\.SAFE: a \.SAFE folder without MTD_MSIL1C\.xml or MTD_MSIL2A\.xml"):
        resolve(str(tmp_path / "Y.SAFE"))
    safe = safe_product(tmp_path / "z", bands=("B02", "B03", "B04"))
    with pytest.raises(GeoclipError, match=r"no band B01, B05, .* in this L2A safe input"):
        open_product(str(safe), ALL_BAND_NAMES, FILL)


def test_a_stac_item_reads_its_assets_with_their_scale_and_offset(tmp_path):
    item = stac_item(tmp_path / "stac")
    with open_product(str(item), ALL_BAND_NAMES, FILL) as src:
        np.testing.assert_array_equal(src.read()[:, 50, 50], expected())
        info = src.describe()
    assert info["form"] == "stac" and info["processing_level"] == "L2A" and info["dn_offset"] == [-1000.0]
    assert input_stem(str(item)) == "item"


def test_a_stac_item_on_s3_reads_s3_assets_through_vsis3(tmp_path, s3_server):
    bucket = f"stac-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    local = stac_item(tmp_path / "stac")
    for f in sorted(local.parent.glob("*.tif")):
        s3.upload_file(str(f), bucket, f"items/x/{f.name}")
    item = json.loads(local.read_text())
    item["assets"]["blue"]["href"] = f"s3://{bucket}/items/x/B02.tif"  # absolute; the others relative to the item
    s3.put_object(Bucket=bucket, Key="items/x/item.json", Body=json.dumps(item).encode())
    uri = f"s3://{bucket}/items/x/item.json"
    with scene_env(uri), open_product(uri, ALL_BAND_NAMES, FILL) as src:
        np.testing.assert_array_equal(src.read()[:, 10, 10], expected())
    before = content_hash(uri)
    s3.upload_file(str(local.parent / "B03.tif"), bucket, "items/x/B02.tif")  # one band changes
    assert content_hash(uri) != before and content_hash(uri).startswith("files:")


def test_stac_items_missing_or_unreachable_assets_are_named(tmp_path):
    item = stac_item(tmp_path / "stac")
    data = json.loads(item.read_text())
    data["assets"]["red"]["href"] = "missing/B04.tif"
    item.write_text(json.dumps(data))
    with pytest.raises(GeoclipError, match=r"item\.json: band B04 \(.*missing/B04\.tif\) cannot be read"):
        open_product(str(item), ALL_BAND_NAMES, FILL)
    del data["assets"]["red"]["href"]
    item.write_text(json.dumps(data))
    with pytest.raises(GeoclipError, match=r"item\.json: asset 'red' \(B04\) has no href"):
        resolve(str(item))
    (tmp_path / "other.json").write_text('{"type": "FeatureCollection"}')
    with pytest.raises(GeoclipError, match=r"other\.json: not a STAC Item"):
        resolve(str(tmp_path / "other.json"))


def write_float(path: Path, value: float) -> None:
    data = np.full((13, 64, 64), value, np.float32)
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=13, dtype="float32", crs="EPSG:32632",
                       transform=from_origin(0, 640, 10, 10)) as dst:
        dst.write(data)
        dst.descriptions = tuple(ALL_BAND_NAMES)


def test_float_reflectance_needs_a_declared_scale_and_an_implausible_one_is_refused(tmp_path):
    path = tmp_path / "refl.tif"
    write_float(path, 0.25)
    with open_product(str(path), ALL_BAND_NAMES, ReadOptions(reflectance_scale=10000)) as src:
        assert (src.read() == 2500).all()
    with pytest.raises(GeoclipError, match=r"refl\.tif: float values \(float32\) with no declared scale"):
        open_product(str(path), ALL_BAND_NAMES, ReadOptions())
    with pytest.raises(GeoclipError, match=r"refl\.tif: reflectance .* implausibly dark"):
        open_product(str(path), ALL_BAND_NAMES, ReadOptions(reflectance_scale=1))
    write_float(path, 2500.0)
    with pytest.raises(GeoclipError, match=r"refl\.tif: reflectance 2\.5e\+03 after score\.reflectance_scale 10000"):
        open_product(str(path), ALL_BAND_NAMES, ReadOptions(reflectance_scale=10000))


def test_bands_of_different_extents_and_a_mask_on_another_grid_are_refused(tmp_path):
    folder = per_band_folder(tmp_path / "p")
    write_band(next(folder.glob("*_B05.tif")), "B05", origin=(600500.0, 5100000.0))
    with pytest.raises(GeoclipError, match=r"p: band B05 covers .* but B02 covers .*expected bands of one extent"):
        open_product(str(folder), ALL_BAND_NAMES, FILL)
    folder = per_band_folder(tmp_path / "q", scl=np.full((48, 48), 4))  # 960 m of SCL for a 1920 m product
    with pytest.raises(GeoclipError, match=r"q: mask .*SCL\.tif covers .*expected bands of one extent"):
        open_product(str(folder), ALL_BAND_NAMES, FILL)


def test_a_stacked_scenes_own_mask_file_makes_its_pixels_nodata(tmp_path):
    write_archive_export(tmp_path / "chip.tif")
    mask = np.zeros((70, 80), np.uint8)
    mask[30:40, 30:40] = 1
    with rasterio.open(tmp_path / "chip_mask.tif", "w", driver="GTiff", width=80, height=70, count=1, dtype="uint8",
                       crs="EPSG:4326", transform=from_origin(11.0, 46.0, 0.0001, 0.0001)) as dst:
        dst.write(mask, 1)
    with open_product(str(tmp_path / "chip.tif"), ALL_BAND_NAMES, ReadOptions()) as src:
        pixels = src.read()
        assert src.describe()["mask"]["kind"] == "binary"
    assert (pixels[:, 30:40, 30:40] == 0).all() and (pixels[:, 50:, 50:] != 0).all()


def test_a_scenes_folder_lists_each_input_once_whatever_its_form(tmp_path):
    root = tmp_path / "scenes"
    write_archive_export(root / "2024" / "chip.tif")
    (root / "2024" / "chip_mask.tif").write_bytes((root / "2024" / "chip.tif").read_bytes())
    per_band_folder(root / "patches" / "S2A_MSIL2A_1")
    (root / "patches" / "S2A_MSIL2A_1" / "S2A_MSIL2A_1_labels_metadata.json").write_text("{}")
    safe = safe_product(root / "safe")
    item = stac_item(root / "stac" / "one")
    (root / "notes.json").write_text('{"hello": 1}')
    files = [str(p) for p in sorted(root.rglob("*")) if p.is_file()]
    found = discover_inputs(str(root), files)
    assert found == sorted([str(root / "2024" / "chip.tif"), str(root / "patches" / "S2A_MSIL2A_1"), str(safe),
                            str(item)])
    patch = root / "patches" / "S2A_MSIL2A_1"
    assert discover_inputs(str(patch), [str(p) for p in sorted(patch.iterdir())]) == [str(patch)]


def test_stacked_scenes_with_their_masks_are_scenes_not_a_product(tmp_path):
    for stem in ("a", "b"):
        write_archive_export(tmp_path / f"{stem}.tif")
        (tmp_path / f"{stem}_mask.tif").write_bytes((tmp_path / f"{stem}.tif").read_bytes())
    files = [str(p) for p in sorted(tmp_path.iterdir())]
    assert discover_inputs(str(tmp_path), files) == [str(tmp_path / "a.tif"), str(tmp_path / "b.tif")]


def test_malformed_metadata_is_one_line_naming_the_file(tmp_path):
    item = stac_item(tmp_path / "stac")
    data = json.loads(item.read_text())
    data["assets"]["red"]["raster:bands"] = [{"scale": "a tenth", "offset": 0}]
    item.write_text(json.dumps(data))
    with pytest.raises(GeoclipError, match=r"item\.json: unexpected STAC Item content"):
        resolve(str(item))
    safe = safe_product(tmp_path / "s")
    mtd = next(safe.glob("MTD_*.xml"))
    mtd.write_text(mtd.read_text().replace('band_id="3"', 'band_id="red"'))
    with pytest.raises(GeoclipError, match=r"MTD_MSIL2A\.xml: unexpected product metadata"):
        resolve(str(safe))
