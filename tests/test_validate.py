"""Tests for geoclip.validate: real GeoTIFFs in tmp_path, the committed GX suites, both reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.transform import from_origin

from geoclip.config import params_from_dict
from geoclip.errors import GeoclipError
from geoclip.validate import build_tile_index, validate

CLASSES = ["Forest", "River", "SeaLake"]


def write_tile(path: Path, data: np.ndarray | None = None, *, bands: int = 13, size: int = 64,
               dtype: str = "uint16", crs: str | None = "EPSG:32632", seed: int = 0) -> Path:
    """Write a small georeferenced GeoTIFF (random plausible DNs unless ``data`` is given)."""
    if data is None:
        data = np.random.default_rng(seed).integers(100, 5000, (bands, size, size)).astype(dtype)
    profile = {"driver": "GTiff", "count": data.shape[0], "height": data.shape[1], "width": data.shape[2],
               "dtype": data.dtype.name, "transform": from_origin(500000, 5000000, 10, 10)}
    if crs:
        profile["crs"] = crs
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def make_dataset(root: Path, per_class: int = 3) -> dict:
    """A good raw dataset under ``root/raw`` (3 classes x ``per_class`` tiles); returns a params dict."""
    raw = root / "raw"
    rows = []
    for c in CLASSES:
        for n in range(1, per_class + 1):
            rel = f"tiles/{c}/{c}_{n}.tif"
            write_tile(raw / rel, seed=len(rows))
            rows.append({"id": f"{c}_{n}", "path": rel, "class": c})
    pd.DataFrame(rows).to_csv(raw / "labels.csv", index=False)
    return {"classes": {"names": CLASSES}, "paths": {"raw": str(raw), "reports": str(root / "reports")}}


def edit_labels(raw: Path, fn) -> None:
    """Rewrite labels.csv through ``fn(DataFrame) -> DataFrame``."""
    df = pd.read_csv(raw / "labels.csv", dtype=str)
    fn(df).to_csv(raw / "labels.csv", index=False)


@pytest.fixture
def dataset(tmp_path) -> tuple[dict, Path]:
    """A good dataset's params dict and its raw folder."""
    return make_dataset(tmp_path), tmp_path / "raw"


def test_good_dataset_passes_and_writes_reports(dataset):
    data, raw = dataset
    params = params_from_dict(data)
    summary = validate(params)
    assert summary["success"] and summary["n_tiles"] == 9 and summary["n_checks"] >= 15
    reports = Path(params.paths.reports)
    report = json.loads((reports / "validation.json").read_text())
    assert report["success"] and all(c["success"] for c in report["checks"])
    assert {"tiles.band_count", "tiles.crs", "labels.class_in_vocabulary"} <= {c["check"] for c in report["checks"]}
    assert report["parameters"]["band_count"] == 13 and report["parameters"]["class_names"] == CLASSES
    assert "PASSED" in (reports / "validation.html").read_text()
    assert not list(reports.glob(".*.tmp"))  # nothing half-written left behind


def _nan_tile(p: Path) -> None:
    data = np.full((13, 64, 64), 1000.0, dtype=np.float32)
    data[2, 5, 5] = np.nan
    write_tile(p, data)


def _out_of_range(p: Path) -> None:
    data = np.full((13, 64, 64), 1000, dtype=np.uint16)
    data[0, 0, 0] = 40000
    write_tile(p, data)


def _truncate(p: Path) -> None:
    blob = p.read_bytes()
    p.write_bytes(blob[: len(blob) // 2])


BAD_TILES = {  # name: (how to break Forest_2.tif, the checks that must fail)
    "band_count": (lambda p: write_tile(p, bands=12), ["tiles.band_count"]),
    "dtype": (lambda p: write_tile(p, dtype="float32"), ["tiles.dtype"]),
    "size": (lambda p: write_tile(p, size=32), ["tiles.width", "tiles.height"]),
    "crs": (lambda p: write_tile(p, crs=None), ["tiles.crs"]),
    "range": (_out_of_range, ["tiles.max_value"]),
    "nan": (_nan_tile, ["tiles.finite", "tiles.dtype"]),
    "nodata": (lambda p: write_tile(p, np.zeros((13, 64, 64), np.uint16)), ["tiles.nodata_fraction"]),
    "truncated": (_truncate, ["tiles.readable"]),
    "not_a_tiff": (lambda p: p.write_text("this is not a GeoTIFF\n"), ["tiles.readable"]),
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


def _unknown_class(raw: Path) -> str:
    write_tile(raw / "tiles/Desert/Desert_1.tif")
    edit_labels(raw, lambda df: pd.concat([df, pd.DataFrame(
        [{"id": "Desert_1", "path": "tiles/Desert/Desert_1.tif", "class": "Desert"}])]))
    return "tiles/Desert/Desert_1.tif"


def _duplicate_id(raw: Path) -> str:
    def dup(df):
        df.loc[df["id"] == "River_2", "id"] = "River_1"
        return df
    edit_labels(raw, dup)
    return "tiles/River/River_2.tif"


def _missing_file(raw: Path) -> str:
    (raw / "tiles/River/River_3.tif").unlink()
    return "tiles/River/River_3.tif"


def _unlabelled_tile(raw: Path) -> str:
    return str(write_tile(raw / "tiles/River/River_99.tif"))


BAD_LABELS = {  # name: (how to break the labels, the rule that must fail)
    "unknown_class": (_unknown_class, "labels.class_in_vocabulary"),
    "duplicate_id": (_duplicate_id, "labels.unique_id"),
    "missing_file": (_missing_file, "labels.file_exists"),
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
    data["validate"] = {"max_value": 10}  # every tile is now out of range
    with pytest.raises(GeoclipError, match=r"tiles\.max_value .* and 3 more — see"):
        validate(params_from_dict(data))


def test_build_tile_index_reads_values(tmp_path):
    data = np.full((13, 8, 8), 7, np.uint16)
    data[:, 0, :2] = 0  # 2 of 64 pixels nodata in every band
    data[3, 1, 1] = 900
    good = write_tile(tmp_path / "a.tif", data)
    bad = tmp_path / "b.tif"
    bad.write_text("nope")
    df = build_tile_index([good, bad], nodata_value=0)
    row = df.iloc[0]
    assert (row["band_count"], row["dtype"], row["width"], row["crs"]) == (13, "uint16", 8, "EPSG:32632")
    assert (row["min"], row["max"], row["nan_count"], row["nodata_fraction"]) == (0, 900, 0, 2 / 64)
    assert not df.iloc[1]["readable"] and "not recognized" in df.iloc[1]["error"]


def test_real_eurosat_tiles_pass_with_default_params(tmp_path, real_tiles):
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [{"id": p.stem, "path": str(p), "class": p.parent.name} for p in sorted(real_tiles.glob("*/*.tif"))]
    pd.DataFrame(rows).to_csv(raw / "labels.csv", index=False)
    params = params_from_dict({"paths": {"raw": str(raw), "reports": str(tmp_path / "reports")}})
    summary = validate(params)
    assert summary["success"] and summary["n_tiles"] == len(rows) == 100
