"""Scoring Sentinel-2 inputs of every form end to end: outputs named after the product, masks, levels, the ledger."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
from s2_products import SIZE_10M, per_band_folder, safe_product, stac_item, write_band
from scoring_fakes import FakeModel

from geoclip.bands import ALL_BAND_NAMES, EUROSAT_CLASSES
from geoclip.config import params_from_dict
from geoclip.errors import GeoclipError
from geoclip.scoring.exactly_once import score_scene_once
from geoclip.scoring.score import check_scenes, list_scenes, scene_key, score_one


class L1CModel(FakeModel):
    """The fake model, recording the processing level it was trained on, as geoclip models do."""

    metadata = SimpleNamespace(metadata={"class_names": list(EUROSAT_CLASSES), "input_band_names": list(ALL_BAND_NAMES),
                                         "processing_level": "L1C"})


def params(tmp_path, **score):
    return params_from_dict({"score": {"band_fill": {"B10": 12}, **score},
                             "paths": {"reports": str(tmp_path / "reports")}})


def test_an_l2a_safe_is_scored_with_its_cloud_mask_and_a_level_warning(tmp_path, capsys):
    scl = np.full((96, 96), 4, np.uint8)
    scl[:32, :32] = 8  # a cloud over the top-left 320 m
    safe = safe_product(tmp_path / "in", scl=scl)
    summary = score_one(params(tmp_path), L1CModel(str(safe)), str(safe), str(tmp_path / "out"))
    stem = safe.name.removesuffix(".SAFE")
    assert summary["classmap"] == str(tmp_path / "out" / f"{stem}_classmap.tif")
    with rasterio.open(summary["classmap"]) as cm, rasterio.open(next(safe.rglob("*_B02_10m.jp2"))) as b02:
        assert (cm.crs, cm.transform, cm.width, cm.height) == (b02.crs, b02.transform, SIZE_10M, SIZE_10M)
        classes = cm.read(1)
        assert cm.colormap(1)[0][:3] == (31, 119, 180)  # the colour table travels with the map
    assert (classes[:64, :64] == 255).all() and (classes[64:, 64:] == 0).all()  # masked: nodata; B01 says class 0
    assert summary["nodata_pixels"] == 64 * 64
    assert summary["input"]["form"] == "safe" and summary["input"]["mask"]["kind"] == "scl"
    assert summary["input"]["bands"]["B10"] == "fill 12" and summary["input"]["dn_offset"] == [-1000.0]
    (warning,) = summary["warnings"]
    assert "processing level L2A, but the model was trained on L1C" in warning
    assert f"warning: {warning}" in capsys.readouterr().err  # said where the run is watched, too
    assert json.loads((tmp_path / "out" / f"{stem}_summary.json").read_text())["warnings"] == [warning]
    assert (tmp_path / "out" / f"{stem}_quicklook.png").read_bytes()[:4] == b"\x89PNG"


def test_level_mismatch_error_refuses_before_anything_is_written(tmp_path):
    safe = safe_product(tmp_path / "in")
    with pytest.raises(GeoclipError, match=r"SAFE: processing level L2A, but the model was trained on L1C.*level_mismatch: error"):
        score_one(params(tmp_path, level_mismatch="error"), L1CModel(str(safe)), str(safe), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_folder_of_products_is_scored_once_each_and_again_when_a_band_changes(tmp_path):
    root = tmp_path / "scenes"
    patch = per_band_folder(root / "patches" / "S2A_MSIL2A_7")
    item = stac_item(root / "stac" / "one")
    p = params(tmp_path, quicklook=False)
    scenes = list_scenes(root)
    assert scenes == sorted([str(patch), str(item)])
    check_scenes(p, scenes, ALL_BAND_NAMES, report=True)  # the scenes suite, as the model will read them
    out = str(tmp_path / "out")

    def run() -> list[str]:
        return [score_scene_once(p, lambda s=s: FakeModel(s), s, out, "models:/fake/1", checked=True,
                                 name=scene_key(s, root))["status"] for s in scenes]

    assert run() == ["scored", "scored"]
    assert (tmp_path / "out" / "patches" / "S2A_MSIL2A_7_classmap.tif").is_file()
    assert (tmp_path / "out" / "stac" / "one" / "item_classmap.tif").is_file()
    assert run() == ["skipped", "skipped"]
    write_band(next(patch.glob("*_B03.tif")), "B03", value=1234)  # one band file of the patch changes
    assert run() == ["scored", "skipped"]


def test_a_bad_product_fails_the_scenes_suite_with_its_reason(tmp_path):
    root = tmp_path / "scenes"
    per_band_folder(root / "good")
    per_band_folder(root / "bad", bands=("B02", "B03", "B04", "B08"))
    with pytest.raises(GeoclipError, match=r"scene validation failed: .*bad.*no band B01, B05"):
        check_scenes(params(tmp_path), list_scenes(root), ALL_BAND_NAMES)


def test_the_cli_scores_a_bigearthnet_like_folder_with_a_real_pyfunc(tmp_path, capsys):
    """`geoclip score --scenes patches/` end to end: the scenes suite, a real (tiny) pyfunc, the ledger, outputs."""
    import yaml
    from factories import make_model_dir, synthetic_tiles

    from geoclip.cli import main
    from geoclip.registry.pyfunc import save_pyfunc

    model = save_pyfunc(make_model_dir(tmp_path / "model"), synthetic_tiles(2), tmp_path / "pyfunc")
    per_band_folder(tmp_path / "patches" / "S2A_MSIL2A_20170613T101031_87_48", size_10m=120)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "score": {"band_fill": {"B10": 12}, "window": 64, "stride": 32},
        "paths": {"reports": str(tmp_path / "reports")}}))
    args = ["--params", str(tmp_path / "params.yaml"), "score", "--model", str(model),
            "--scenes", str(tmp_path / "patches"), "--out", str(tmp_path / "out")]
    main(args)
    summary = json.loads((tmp_path / "out" / "S2A_MSIL2A_20170613T101031_87_48_summary.json").read_text())
    assert summary["input"]["form"] == "per-band" and summary["valid_pixels"] == 120 * 120
    assert summary["width"] == summary["height"] == 120 and summary["area_km2"] == pytest.approx(1.44)
    main(args)  # again: the same content is skipped by the ledger
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["n_skipped"] == 1


def test_a_local_stac_item_with_assets_on_s3_is_scored_through_vsis3(tmp_path, s3_server):
    import uuid

    import boto3
    from test_score import fake_predict

    from geoclip.scoring.score import score_scene

    bucket = f"assets-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    staged = stac_item(tmp_path / "staged")
    item = json.loads(staged.read_text())
    for asset in item["assets"].values():
        if asset["href"].endswith(".tif"):
            s3.upload_file(str(staged.parent / asset["href"]), bucket, f"cogs/{asset['href']}")
            asset["href"] = f"s3://{bucket}/cogs/{asset['href']}"
    local = tmp_path / "items" / "item.json"
    local.parent.mkdir()
    local.write_text(json.dumps(item))
    l2a_bands = [b for b in ALL_BAND_NAMES if b != "B10"]  # a model trained on the bands L2A has
    summary = score_scene(fake_predict, local, tmp_path / "out", list(EUROSAT_CLASSES), quicklook=False,
                          bands=l2a_bands)
    assert summary["input"]["form"] == "stac" and summary["input"]["bands"]["B02"].startswith(f"/vsis3/{bucket}/")
    assert summary["valid_pixels"] == SIZE_10M * SIZE_10M
