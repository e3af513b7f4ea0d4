"""Tests for geoclip.data.validate: real GeoTIFFs in tmp_path, the committed GX suites, JSON/HTML reports, Data Docs."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from big_files import SCENE_SIZE, write_full_scene
from factories import make_tile, write_scene
from marshmallow import ValidationError

from geoclip.config import params_from_dict
from geoclip.data.validate import SUITES_DIR, build_tile_index, publish_results, run_suite, validate, validate_scenes
from geoclip.errors import GeoclipError

CLASSES = ["Forest", "River", "SeaLake"]


def make_dataset(root: Path, per_class: int = 3) -> dict:
    """A good raw dataset under ``root/raw`` (3 classes x ``per_class`` tiles); returns a params dict."""
    raw = root / "raw"
    rows = []
    for c in CLASSES:
        for n in range(1, per_class + 1):
            rel = f"tiles/{c}/{c}_{n}.tif"
            make_tile(raw / rel, seed=len(rows))
            rows.append({"id": f"{c}_{n}", "path": rel, "class": c})
    pd.DataFrame(rows).to_csv(raw / "labels.csv", index=False)
    return {"classes": {"names": CLASSES}, "paths": {"raw": str(raw), "reports": str(root / "reports")},
            "validate": {"min_tiles_per_class": per_class}}


def edit_labels(raw: Path, fn) -> None:
    """Rewrite labels.csv through ``fn(DataFrame) -> DataFrame``."""
    df = pd.read_csv(raw / "labels.csv", dtype=str)
    fn(df).to_csv(raw / "labels.csv", index=False)


@pytest.fixture
def dataset(tmp_path) -> tuple[dict, Path]:
    """A good dataset's params dict and its raw folder."""
    return make_dataset(tmp_path), tmp_path / "raw"


def test_good_dataset_passes_and_writes_reports(dataset):
    data, _ = dataset
    params = params_from_dict(data)
    summary = validate(params)
    assert summary["success"] and summary["n_tiles"] == 9 and summary["n_checks"] >= 15
    reports = Path(params.paths.reports)
    report = json.loads((reports / "validation.json").read_text())
    assert report["success"] and all(c["success"] for c in report["checks"])
    assert {"tiles.band_count", "tiles.crs", "labels.class_in_vocabulary"} <= {c["check"] for c in report["checks"]}
    assert report["parameters"]["band_count"] == 13 and report["parameters"]["class_names"] == CLASSES
    assert "PASSED" in (reports / "validation.html").read_text()
    assert not list(reports.glob(".*"))  # nothing half-written left behind
    docs = reports / "data_docs"
    assert summary["data_docs"] == str(docs / "index.html") and (docs / "index.html").is_file()
    assert set(report["data_docs"]) == {"index", "tiles", "labels", "classes"}
    for suite in ("tiles", "labels", "classes"):
        page = Path(report["data_docs"][suite])
        assert page.is_file() and page.is_relative_to(docs / "validations" / suite)
        assert (docs / "expectations" / f"{suite}.html").is_file()
        assert str(page.relative_to(docs)) in (docs / "index.html").read_text()  # listed on the index
    assert "data_docs/index.html" in (reports / "validation.html").read_text()


def test_data_docs_load_every_script_style_and_image_from_the_site(dataset):
    """Offline (no CDN): every asset a page links is a file of the site, and the vendored licences come along."""
    import re

    data, _ = dataset
    params = params_from_dict(data)
    validate(params)
    docs = Path(params.paths.reports) / "data_docs"
    pages = sorted(docs.rglob("*.html"))
    assert len(pages) >= 7  # the index, 3 expectation and 3 validation pages
    tag = re.compile(r"""<(?:script|link|img)\b[^>]*?\b(?:src|href)=["']([^"']+)["']""")
    for page in pages:
        refs = tag.findall(page.read_text())
        assert refs, page
        remote = [r for r in refs if r.startswith(("http://", "https://", "//"))]
        assert not remote, (page, remote)
        missing = [r for r in refs if not (page.parent / r.split("?")[0]).is_file()]
        assert not missing, (page, missing)
    assert (docs / "static" / "vendor" / "licenses" / "jquery.txt").is_file()


def test_data_docs_name_an_asset_with_no_local_copy(dataset, monkeypatch, capsys):
    """A GX upgrade linking an asset not vendored: the build says which, and the page keeps the remote link."""
    from geoclip.data import docs_offline

    jquery = "https://code.jquery.com/jquery-3.7.1.min.js"
    monkeypatch.delitem(docs_offline.CDN_ASSETS, jquery)
    data, _ = dataset
    params = params_from_dict(data)
    validate(params)
    assert f"Data Docs: no local copy of {jquery}" in capsys.readouterr().err
    assert jquery in (Path(params.paths.reports) / "data_docs" / "index.html").read_text()


def _out_of_range(p: Path) -> None:
    data = np.full((13, 64, 64), 1000, dtype=np.uint16)
    data[0, 0, 0] = 40000
    make_tile(p, data)


def _truncate(p: Path) -> None:
    blob = p.read_bytes()
    p.write_bytes(blob[: len(blob) // 2])


# The CLI corpus (test_bad_inputs.py) covers the other bad tiles and labels; these check the reports in detail.
BAD_TILES = {  # name: (how to break Forest_2.tif, the checks that must fail)
    "size": (lambda p: make_tile(p, size=32), ["tiles.width", "tiles.height"]),
    "range": (_out_of_range, ["tiles.max_value"]),
    "truncated": (_truncate, ["tiles.readable"]),
}


@pytest.mark.parametrize("case", sorted(BAD_TILES))
def test_bad_tile_fails_naming_file_and_rule(dataset, case):
    data, raw = dataset
    breaker, rules = BAD_TILES[case]
    bad = raw / "tiles/Forest/Forest_2.tif"
    breaker(bad)
    with pytest.raises(GeoclipError) as err:
        validate(params_from_dict(data))
    msg = str(err.value)
    assert msg.startswith("validation failed") and "\n" not in msg and "validation.html" in msg
    report = json.loads((Path(data["paths"]["reports"]) / "validation.json").read_text())
    failed = {c["check"]: c for c in report["checks"] if not c["success"]}
    assert set(failed) == set(rules), failed.keys()  # only the intended rules, e.g. unreadable != also no-CRS
    for rule in rules:
        assert rule in msg and str(bad) in msg
        assert [o["path"] for o in failed[rule]["offending"]] == [str(bad)]
    assert (Path(data["paths"]["reports"]) / "validation.html").read_text().count("FAIL") >= len(rules)
    if rules == ["tiles.readable"]:
        assert report["unreadable"][0]["path"] == str(bad) and report["unreadable"][0]["error"]


def test_full_scene_among_tiles_is_refused_for_its_size_without_reading_its_pixels(dataset):
    data, raw = dataset
    params = params_from_dict(data)
    validate(params)  # warm: GX imported and its caches filled before memory is traced
    scene = write_full_scene(raw / "tiles/Forest/Forest_2.tif")  # 13 x 10980 x 10980: 3.1 GB of pixels, 4 kB file
    tracemalloc.start()
    try:
        with pytest.raises(GeoclipError) as err:
            validate(params)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 2**20, f"peak {peak / 2**20:.0f} MiB traced: the scene's pixels were read"
    msg = str(err.value)
    assert msg.startswith("validation failed: 2 of ") and "\n" not in msg
    assert f"tiles.width (expected width 64 px) failed for {scene} (got {SCENE_SIZE})" in msg
    assert f"tiles.height (expected height 64 px) failed for {scene} (got {SCENE_SIZE})" in msg
    row = next(r for r in json.loads((Path(params.paths.reports) / "validation.json").read_text())["checks"]
               if r["check"] == "tiles.width")
    assert [o["path"] for o in row["offending"]] == [str(scene)]


def test_build_tile_index_reads_pixels_only_of_tile_sized_files(tmp_path):
    tile = make_tile(tmp_path / "tile.tif", np.full((13, 64, 64), 7, np.uint16))
    scene = write_full_scene(tmp_path / "scene.tif")
    df = build_tile_index([tile, scene], nodata_value=0, expected_size=64).set_index("id")
    assert (df.loc["tile", "min"], df.loc["tile", "max"]) == (7, 7)
    assert (df.loc["scene", "width"], df.loc["scene", "height"], df.loc["scene", "band_count"]) == (
        SCENE_SIZE, SCENE_SIZE, 13)
    assert df.loc["scene", "readable"] and pd.isna(df.loc["scene", "min"])  # header read, pixels not
    unsized = build_tile_index([scene], nodata_value=0).iloc[0]  # no expected size: the byte limit still holds
    assert not unsized["readable"]
    assert unsized["error"] == "2989 MiB of pixels, over the 64 MiB a tile may hold; not read"


def _duplicate_id(raw: Path) -> str:
    def dup(df):
        df.loc[df["id"] == "River_2", "id"] = "River_1"
        return df
    edit_labels(raw, dup)
    return "tiles/River/River_2.tif"


def _unlabelled_tile(raw: Path) -> str:
    return str(make_tile(raw / "tiles/River/River_99.tif"))


BAD_LABELS = {  # name: (how to break the labels, the rule that must fail)
    "duplicate_id": (_duplicate_id, "labels.unique_id"),
    "unlabelled_tile": (_unlabelled_tile, "tiles.labelled"),
}


@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_bad_labels_fail_naming_file_and_rule(dataset, case):
    data, raw = dataset
    breaker, rule = BAD_LABELS[case]
    offending = breaker(raw)
    with pytest.raises(GeoclipError) as err:
        validate(params_from_dict(data))
    assert rule in str(err.value) and offending in str(err.value)
    report = json.loads((Path(data["paths"]["reports"]) / "validation.json").read_text())
    failed = {c["check"]: c for c in report["checks"] if not c["success"]}
    assert list(failed) == [rule]
    assert offending in [o["path"] for o in failed[rule]["offending"]]


def test_missing_labels_still_writes_report(dataset):
    data, raw = dataset
    (raw / "labels.csv").unlink()
    with pytest.raises(GeoclipError, match="labels.csv"):
        validate(params_from_dict(data))
    report = json.loads((Path(data["paths"]["reports"]) / "validation.json").read_text())
    assert not report["success"] and "labels.csv" in report["error"]


def test_long_failure_lists_are_truncated(tmp_path):
    data = make_dataset(tmp_path, per_class=2)
    data["validate"]["max_value"] = 10  # every tile is now out of range
    with pytest.raises(GeoclipError, match=r"tiles\.max_value .* and 3 more — see"):
        validate(params_from_dict(data))


def test_build_tile_index_reads_values(tmp_path):
    data = np.full((13, 8, 8), 7, np.uint16)
    data[:, 0, :2] = 0  # 2 of 64 pixels nodata in every band
    data[3, 1, 1] = 900
    good = make_tile(tmp_path / "a.tif", data)
    bad = tmp_path / "b.tif"
    bad.write_text("nope")
    df = build_tile_index([good, bad], nodata_value=0)
    row = df.iloc[0]
    assert (row["band_count"], row["dtype"], row["width"], row["crs"]) == (13, "uint16", 8, "EPSG:32632")
    assert pd.isna(row["band_order"])  # no band descriptions: nothing to check the order against
    assert (row["min"], row["max"], row["nonfinite_count"], row["nodata_fraction"]) == (0, 900, 0, 2 / 64)
    assert not df.iloc[1]["readable"] and "not recognized" in df.iloc[1]["error"]


def test_real_eurosat_tiles_pass_with_default_params(tmp_path, real_tiles):
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [{"id": p.stem, "path": str(p), "class": p.parent.name} for p in sorted(real_tiles.glob("*/*.tif"))]
    pd.DataFrame(rows).to_csv(raw / "labels.csv", index=False)
    params = params_from_dict({"paths": {"raw": str(raw), "reports": str(tmp_path / "reports")}})
    summary = validate(params)
    assert summary["success"] and summary["n_tiles"] == len(rows) == 100
    report = json.loads((tmp_path / "reports" / "validation.json").read_text())
    order = next(c for c in report["checks"] if c["check"] == "tiles.band_order")
    assert order["success"] and not order["offending"]  # EuroSAT_MS tiles name no bands: nothing to compare


def test_band_order_and_count_come_from_the_dataset(dataset):
    data, raw = dataset
    names = ["B02", "B03", "B04", "B08"]  # a 4-band dataset, recorded by ingest in bands.json
    (raw / "bands.json").write_text(json.dumps({"band_names": names}))
    for p in raw.glob("tiles/*/*.tif"):
        make_tile(p, bands=4, descriptions=names)
    data["bands"], data["ingest"] = names, {"band_names": names}
    assert validate(params_from_dict(data))["success"]
    make_tile(raw / "tiles/River/River_1.tif", bands=4, descriptions=["B03", "B02", "B04", "B08"])
    make_tile(raw / "tiles/River/River_2.tif", bands=4)  # no band names: the order cannot be checked, passes
    with pytest.raises(GeoclipError) as err:
        validate(params_from_dict(data))
    assert str(err.value).startswith("validation failed: 1 of ")
    assert (f"tiles.band_order (expected bands named B02,B03,B04,B08 in that order, where a tile names its bands) "
            f"failed for {raw / 'tiles/River/River_1.tif'} (got B03,B02,B04,B08)") in str(err.value)


def test_failed_read_leaves_an_empty_site_not_a_stale_one(dataset):
    data, raw = dataset
    params = params_from_dict(data)
    validate(params)
    (raw / "labels.csv").unlink()
    with pytest.raises(GeoclipError):
        validate(params)
    docs = Path(params.paths.reports) / "data_docs"
    assert (docs / "index.html").is_file() and not (docs / "validations").exists()


def test_publish_results_keeps_other_suites_and_replaces_the_site_whole(tmp_path):
    reports = tmp_path / "reports"
    df = pd.DataFrame({"class": ["Forest", "River"], "n_tiles": [4, 1]})
    first = run_suite(SUITES_DIR / "classes.json", df, {"min_tiles_per_class": 2}, keys=("class",))
    assert not first["success"] and first["checks"][0]["offending"] == [{"class": "River", "value": 1}]
    docs = publish_results([first], reports, site="extra")
    page = Path(docs["classes"])
    assert "River" in page.read_text()  # the offending row is in the static HTML (styling comes from CDNs)
    scenes = tmp_path / "scene.tif"
    write_scene(scenes, h=64, w=64, nodata_box=0)
    second = run_suite(SUITES_DIR / "scenes.json", pd.DataFrame([{"path": str(scenes), "readable": True,
                       "band_count": 13, "dtype": "uint16", "width": 64, "height": 64, "crs": "EPSG:32632"}]),
                       {"band_count": 13, "window": 64, "dtypes": ["uint16"]})
    docs = publish_results([second], reports, site="extra")
    assert set(docs) == {"index", "classes", "scenes"} and Path(docs["classes"]) == page and page.is_file()
    docs = publish_results([second], reports, site="extra", keep_others=False)
    assert set(docs) == {"index", "scenes"} and not page.exists()
    before = sorted(p.relative_to(reports) for p in reports.rglob("*"))
    with pytest.raises(ValidationError):  # a result GX cannot read: the build fails inside its temp folder
        publish_results([{**first, "gx_result": {"results": "garbage"}}], reports, site="extra")
    assert sorted(p.relative_to(reports) for p in reports.rglob("*")) == before  # the old site, whole
    assert sorted(p.name for p in reports.iterdir()) == ["extra"]  # no temp or old folders left


def test_scenes_suite_checks_each_rule(tmp_path):
    good = tmp_path / "scenes" / "good.tif"
    write_scene(good)
    rgb = tmp_path / "scenes" / "rgb.tif"
    write_scene(rgb, count=3)
    small = tmp_path / "scenes" / "small.tif"
    write_scene(small, h=48, w=100, nodata_box=0)
    broken = tmp_path / "scenes" / "broken.tif"
    broken.write_text("not a raster")
    report = validate_scenes([good], 13, 64, tmp_path / "reports")
    assert report["success"] and Path(report["data_docs"]["scenes"]).is_file()
    with pytest.raises(GeoclipError) as err:
        validate_scenes([good, rgb, small, broken], 13, 64, tmp_path / "reports")
    msg = str(err.value)
    assert msg.startswith("scene validation failed: ") and "\n" not in msg
    assert f"scenes.band_count (expected 13 bands, as the model) failed for {rgb} (got 3)" in msg
    assert f"scenes.height (expected height >= 64 px (one window)) failed for {small} (got 48)" in msg
    assert f"scenes.readable (expected a scene readable in the model's bands) failed for {broken} (got " in msg
    saved = json.loads((tmp_path / "reports" / "scenes_validation.json").read_text())
    assert not saved["success"] and {c["check"] for c in saved["checks"] if not c["success"]} == {
        "scenes.band_count", "scenes.height", "scenes.readable"}


def test_scene_without_crs_or_in_float_is_named_by_its_uri(tmp_path):
    scene = tmp_path / "s.tif"
    data = np.ones((13, 64, 64), np.float32)
    with rasterio.open(scene, "w", driver="GTiff", width=64, height=64, count=13, dtype="float32") as dst:
        dst.write(data)
    with pytest.raises(GeoclipError) as err:
        validate_scenes([scene], 13, 64, names=["s3://bucket/scenes/s.tif"])
    msg = str(err.value)
    assert "scenes.crs (expected a coordinate reference system) failed for s3://bucket/scenes/s.tif" in msg
    assert "scenes.dtype (expected uint16 digital numbers) failed for s3://bucket/scenes/s.tif (got float32)" in msg
