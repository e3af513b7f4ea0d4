"""The bad-input corpus: each case builds a real bad input, runs the real CLI in-process, expects one clear error.

Every case must exit non-zero with one ``error:`` line naming the offending file (or field, or URI) and the
rule, and leave no partial outputs. Adding a case is one entry in ``CASES``. ``python tests/test_bad_inputs.py``
prints each case's name and its exact error line.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pytest
import yaml
from big_files import SCENE_SIZE, write_full_scene
from factories import make_tile

from geoclip.cli import main
from geoclip.devtools.services import HOST, free_port

CLASSES = ["Forest", "River", "SeaLake"]
PER_CLASS = 3  # tiles per class in the good dataset; also validate.min_tiles_per_class


@dataclass(frozen=True)
class Case:
    """One bad input: how to build it, how to run the CLI on it, and what must (not) come out."""

    build: Callable[[Path], dict | None]  # writes params.yaml + the bad input under root; may return format fields
    argv: tuple[str, ...]  # CLI arguments after ``--params {root}/params.yaml``
    expect: tuple[str, ...]  # substrings of the error line
    absent: tuple[str, ...] = ()  # paths that must not exist afterwards
    untouched: tuple[str, ...] = ()  # paths written before the run that must keep their bytes
    fixtures: tuple[str, ...] = ()  # pytest fixtures the case needs, e.g. "s3_server"


# ---- building blocks: real files in the case's folder ----

def write_params(root: Path, **sections) -> None:
    """``root/params.yaml`` with every path under ``root``; ``sections`` update the defaults section by section."""
    params = {
        "classes": {"names": CLASSES},
        "paths": {"raw": f"{root}/data/raw", "prepared": f"{root}/data/prepared", "reports": f"{root}/reports",
                  "model": f"{root}/models", "eval": f"{root}/eval", "scores": f"{root}/outputs/scores"},
        "validate": {"min_tiles_per_class": PER_CLASS},
        "mlflow": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "artifact_location": f"{root}/mlartifacts"},
    }
    for name, values in sections.items():
        params[name] = {**params.get(name, {}), **values}
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def good_raw(root: Path, **params) -> Path:
    """A good raw dataset (3 classes x 3 tiles, labels.csv) plus params.yaml; returns the raw folder."""
    raw = root / "data" / "raw"
    rows = []
    for c in CLASSES:
        for n in range(1, PER_CLASS + 1):
            rel = f"tiles/{c}/{c}_{n}.tif"
            make_tile(raw / rel, seed=len(rows))
            rows.append({"id": f"{c}_{n}", "path": rel, "class": c})
    pd.DataFrame(rows).to_csv(raw / "labels.csv", index=False)
    write_params(root, **params)
    return raw


def edit_labels(raw: Path, fn: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    """Rewrite labels.csv through ``fn``."""
    fn(pd.read_csv(raw / "labels.csv", dtype=str)).to_csv(raw / "labels.csv", index=False)


def break_tile(how: Callable[[Path], object]) -> Callable[[Path], None]:
    """A builder: the good dataset with Forest_2.tif replaced by ``how(path)``."""
    def build(root: Path) -> None:
        how(good_raw(root) / "tiles/Forest/Forest_2.tif")
    return build


def _truncate(p: Path) -> None:
    blob = p.read_bytes()
    p.write_bytes(blob[: len(blob) // 2])


def _with_value(value: float) -> Callable[[Path], Path]:
    def write(p: Path) -> Path:
        data = np.full((13, 64, 64), 1000.0, np.float32)
        data[2, 5, 5] = value
        return make_tile(p, data)
    return write


def _unknown_class(root: Path) -> None:
    raw = good_raw(root)
    make_tile(raw / "tiles/Desert/Desert_1.tif")
    edit_labels(raw, lambda df: pd.concat([df, pd.DataFrame(
        [{"id": "Desert_1", "path": "tiles/Desert/Desert_1.tif", "class": "Desert"}])]))


def _duplicate_ids(root: Path) -> None:
    def dup(df):
        df.loc[df["id"] == "River_2", "id"] = "River_1"
        return df
    edit_labels(good_raw(root), dup)


def _empty_dataset(root: Path) -> None:
    raw = good_raw(root)
    shutil.rmtree(raw / "tiles")
    edit_labels(raw, lambda df: df.iloc[:0])  # the header only


def _too_few_tiles(root: Path) -> None:
    raw = good_raw(root)
    (raw / "tiles/SeaLake/SeaLake_3.tif").unlink()
    edit_labels(raw, lambda df: df[df["id"] != "SeaLake_3"])


@functools.cache
def tiny_pyfunc() -> Path:
    """A tiny 13-band geoclip pyfunc saved to a local folder, once per process."""
    from factories import make_model_dir, synthetic_tiles

    from geoclip.registry.pyfunc import save_pyfunc

    folder = Path(tempfile.mkdtemp(prefix="geoclip-bad-inputs-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return save_pyfunc(make_model_dir(folder / "model"), synthetic_tiles(2), folder / "pyfunc")


def _rgb_scene(root: Path) -> dict:
    from factories import write_scene

    write_scene(root / "scenes" / "rgb.tif", count=3)
    write_params(root)
    (root / "outputs/scores").mkdir(parents=True)
    (root / "outputs/scores/summary.json").write_text('{"from": "an earlier run"}\n')
    return {"model": str(tiny_pyfunc())}


def _l2a_patch(root: Path) -> dict:
    from s2_products import per_band_folder

    per_band_folder(root / "scenes" / "S2A_MSIL2A_patch", size_10m=120)  # L2A: no B10
    write_params(root)
    return {"model": str(tiny_pyfunc())}


def _safe_with_a_short_band(root: Path) -> dict:
    from s2_products import safe_product, write_band

    safe = safe_product(root / "scenes")
    b05 = next(safe.rglob("*_B05_20m.jp2"))
    write_band(b05, "B05", driver="JP2OpenJPEG", size_10m=96)  # 960 m of B05 in a 1920 m product
    write_params(root, score={"band_fill": {"B10": 12}})
    return {"model": str(tiny_pyfunc()), "safe": safe.name}


def _rgb_scene_on_s3(root: Path) -> dict:
    import boto3
    from factories import write_scene

    write_scene(root / "rgb.tif", count=3)
    bucket = f"bad-inputs-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    boto3.client("s3").upload_file(str(root / "rgb.tif"), bucket, "scenes/rgb.tif")
    write_params(root, score={"scenes": f"s3://{bucket}/scenes"})
    return {"model": str(tiny_pyfunc()), "bucket": bucket}


def _ingest_from(source: str) -> Callable[[Path], None]:
    """A builder: a good raw dataset already in place (it must survive), then ingest from ``source``."""
    def build(root: Path) -> None:
        good_raw(root, ingest={"source": source.format(root=root)})
    return build


def _empty_source(root: Path) -> None:
    (root / "incoming").mkdir()
    good_raw(root, ingest={"source": f"{root}/incoming"})


def _ingest_over_hand_made_raw(root: Path) -> None:
    """A raw dataset the user laid out by hand (ingest did not write it), then an ingest of a good source."""
    make_tile(root / "incoming" / "Forest" / "Forest_9.tif")
    good_raw(root, ingest={"source": f"{root}/incoming"})


def _manifest_row_outside(root: Path) -> None:
    make_tile(root / "secret.tif")
    (root / "incoming").mkdir()
    (root / "incoming" / "m.csv").write_text("id,path,class\nx1,../secret.tif,Forest\n")
    good_raw(root, ingest={"source": f"{root}/incoming/m.csv"})


def _too_few_for_splits(root: Path) -> None:
    good_raw(root, prepare={"min_tiles_per_split": 2, "val_fraction": 0.3, "test_fraction": 0.3})


def _scene_among_tiles(root: Path) -> dict:
    """A folder of two good tiles and a whole scene (13 x 10980 x 10980, 4 kB on disk) to predict."""
    make_tile(root / "tiles" / "a.tif")
    make_tile(root / "tiles" / "b.tif", seed=1)
    write_full_scene(root / "tiles" / "scene.tif")
    write_params(root)
    return {"model": str(tiny_pyfunc())}


def _tiles_to_predict(root: Path) -> dict:
    """Two good tiles; the fields name the tracking URI in the environment (set by a fixture)."""
    make_tile(root / "tiles" / "a.tif")
    write_params(root)
    return {"tracking": os.environ["MLFLOW_TRACKING_URI"]}


def _scenes_on_unreachable_s3(root: Path) -> dict:
    write_params(root, score={"scenes": "s3://geoclip-scenes/scenes"})
    return {"endpoint": os.environ["AWS_ENDPOINT_URL"]}


def _ingest_s3_without_credentials(root: Path) -> dict:
    good_raw(root, ingest={"source": "s3://geoclip-tiles/eurosat/"})
    return {"endpoint": os.environ["AWS_ENDPOINT_URL"]}


# ---- fixtures for infrastructure failures: the environment a user would have ----

@pytest.fixture
def unreachable_s3(monkeypatch):
    """S3 settings naming a port where nothing listens, one attempt per request."""
    endpoint = f"http://{HOST}:{free_port()}"
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # a fresh process: nothing resolved before
    for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint, "AWS_MAX_ATTEMPTS": "1",
                        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def no_aws_credentials(s3_server, monkeypatch, tmp_path):
    """moto's S3 reachable, but no AWS credentials anywhere (environment, files, instance metadata)."""
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # the session caches credentials it resolved
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                 "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def tracking_server_down(monkeypatch):
    """MLFLOW_TRACKING_URI naming a port where nothing listens, one attempt per request."""
    import mlflow

    mlflow.set_tracking_uri(None)  # an earlier case's in-process choice would win over the environment
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://{HOST}:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once, not after minutes of backoff
    yield
    mlflow.set_tracking_uri(None)


RAW = "{root}/data/raw"
TILE = RAW + "/tiles/Forest/Forest_2.tif"
VALIDATE = ("validate",)
ONE = "validation failed: 1 of "  # exactly one rule failed
TWO = "validation failed: 2 of "


def v(build: Callable[[Path], dict | None], *expect: str) -> Case:
    """A ``geoclip validate`` case (a failed validation never gets as far as prepared data)."""
    return Case(build, VALIDATE, expect, absent=("data/prepared",))


CASES: dict[str, Case] = {
    "truncated_tiff": v(break_tile(_truncate),
                        ONE, f"tiles.readable (expected a readable GeoTIFF) failed for {TILE} (got "),
    "not_a_tiff": v(break_tile(lambda p: p.write_text("this is not a GeoTIFF\n")),
                    ONE, f"tiles.readable (expected a readable GeoTIFF) failed for {TILE} (got ", "not recognized"),
    "wrong_band_count": v(break_tile(lambda p: make_tile(p, bands=12)),
                          ONE, f"tiles.band_count (expected 13 bands) failed for {TILE} (got 12)"),
    "wrong_band_order": v(break_tile(lambda p: make_tile(p, descriptions=[f"B{i:02d}" for i in range(13, 0, -1)])),
                          ONE, "tiles.band_order (expected bands named B01,B02,", f"for {TILE} (got B13,B12,"),
    "wrong_dtype": v(break_tile(lambda p: make_tile(p, dtype="float32")),
                     ONE, f"tiles.dtype (expected uint16) failed for {TILE} (got float32)"),
    "nan_values": v(break_tile(_with_value(np.nan)),
                    TWO, f"tiles.finite (expected no NaN or inf pixel values) failed for {TILE} (got 1)"),
    "inf_values": v(break_tile(_with_value(np.inf)),
                    TWO, f"tiles.finite (expected no NaN or inf pixel values) failed for {TILE} (got 1)"),
    "all_nodata_tile": v(break_tile(lambda p: make_tile(p, np.zeros((13, 64, 64), np.uint16))),
                         ONE, f"tiles.nodata_fraction (expected at most 5% nodata pixels) failed for {TILE} (got 1)"),
    "missing_crs": v(break_tile(lambda p: make_tile(p, crs=None)),
                     ONE, f"tiles.crs (expected a coordinate reference system) failed for {TILE}"),
    "label_to_missing_file": v(lambda root: (good_raw(root) / "tiles/River/River_3.tif").unlink(),
                               ONE, "labels.file_exists (expected an existing tile file) failed for "
                                    "tiles/River/River_3.tif"),
    "unknown_class": v(_unknown_class, ONE, "labels.class_in_vocabulary (expected a class from classes.names or "
                                            "classes.concepts) failed for tiles/Desert/Desert_1.tif (got Desert)"),
    "duplicate_ids": v(_duplicate_ids, ONE, "labels.unique_id (expected unique ids) failed for "
                                            "tiles/River/River_1.tif (got River_1), tiles/River/River_2.tif (got River_1)"),
    "empty_dataset": v(_empty_dataset,
                       f"labels.non_empty (expected at least one label) failed for {RAW}/labels.csv (got 0)",
                       f"tiles.non_empty (expected at least one tile) failed for {RAW}/tiles (got 0)"),
    "empty_labels_file": v(lambda root: (good_raw(root) / "labels.csv").write_text(""),
                           f"{RAW}/labels.csv: empty file; expected a header id,path,class"),
    "class_with_too_few_tiles": v(_too_few_tiles, ONE, "classes.min_tiles (expected at least 3 labelled tiles per "
                                                       "class) failed for class SeaLake (got 2)"),
    "rgb_scene_to_13_band_model": Case(
        _rgb_scene, ("score", "--model", "{model}", "--scenes", "{root}/scenes", "--out", "{root}/outputs/scores"),
        ("scene validation failed: scenes.readable (expected a scene readable in the model's bands) failed for ",
         ("{root}/scenes/rgb.tif (got 3 band(s), but the model's input order (no band descriptions, no band_names) "
          "names 13: B01,")),
        absent=("outputs/scores/rgb_classmap.tif", "outputs/scores/rgb_summary.json"),
        untouched=("outputs/scores/summary.json",)),
    "rgb_scene_on_s3": Case(
        _rgb_scene_on_s3, ("score", "--model", "{model}", "--out", "{root}/outputs/scores"),
        ("scenes.readable (expected a scene readable in the model's bands) failed for s3://{bucket}/scenes/rgb.tif",
         "(got 3 band(s), but the model's input order"),
        absent=("outputs/scores",), fixtures=("s3_server",)),
    "l2a_patch_to_a_b10_model": Case(
        _l2a_patch, ("score", "--model", "{model}", "--scenes", "{root}/scenes", "--out", "{root}/outputs/scores"),
        ("{root}/scenes/S2A_MSIL2A_patch (got no band B10 in this L2A per-band input",
         "score.band_fill (e.g. {{B10: 12}})"),
        absent=("outputs/scores",)),
    "safe_bands_of_different_extents": Case(
        _safe_with_a_short_band, ("score", "--model", "{model}", "--scenes", "{root}/scenes",
                                  "--out", "{root}/outputs/scores"),
        ("{root}/scenes/{safe} (got band B05 covers", "expected bands of one extent"),
        absent=("outputs/scores",)),
    "ingest_missing_s3_bucket": Case(
        _ingest_from("s3://no-such-bucket-geoclip/eurosat/"), ("ingest",),
        ("s3://no-such-bucket-geoclip/eurosat/", "bucket 'no-such-bucket-geoclip' does not exist"),
        untouched=("data/raw/labels.csv",), fixtures=("s3_server",)),
    "ingest_empty_source": Case(
        _empty_source, ("ingest",), ("{root}/incoming", "no .tif tiles found"),
        untouched=("data/raw/labels.csv",)),
    "ingest_missing_folder": Case(
        _ingest_from("{root}/nowhere"), ("ingest",), ("ingest.source: {root}/nowhere does not exist",),
        untouched=("data/raw/labels.csv",)),
    "ingest_over_files_it_did_not_write": Case(
        _ingest_over_hand_made_raw, ("ingest",),
        ("{root}/data/raw: holds 10 file(s) ingest did not write (labels.csv, tiles/Forest/Forest_1.tif, ",
         "move them elsewhere"),
        untouched=("data/raw/labels.csv", "data/raw/tiles/Forest/Forest_1.tif")),
    "ingest_manifest_row_outside_its_folder": Case(
        _manifest_row_outside, ("ingest",),
        ("{root}/incoming/m.csv: row 1 (id x1, path ../secret.tif) is outside the manifest's folder {root}/incoming",
         "ingest.allow_outside_paths"),
        untouched=("data/raw/labels.csv",)),
    "split_with_too_few_tiles_per_class": Case(
        _too_few_for_splits, ("prepare",), ("split_classes check failed", "split_classes.min_tiles_per_split"),
        absent=("data/prepared",)),
    "full_scene_among_tiles": v(break_tile(write_full_scene), TWO,
                                f"tiles.width (expected width 64 px) failed for {TILE} (got {SCENE_SIZE})",
                                f"tiles.height (expected height 64 px) failed for {TILE} (got {SCENE_SIZE})"),
    "full_scene_to_predict": Case(
        _scene_among_tiles, ("predict", "{root}/tiles", "--model", "{model}", "--out", "{root}/preds.csv"),
        (f"{{root}}/tiles/scene.tif: tile shape (13, {SCENE_SIZE}, {SCENE_SIZE}), the model expects (13, 64, 64)",
         "geoclip score"), absent=("preds.csv",)),
    "predict_with_tracking_server_down": Case(
        _tiles_to_predict, ("predict", "{root}/tiles", "--model", "models:/geoclip@champion", "--out",
                            "{root}/preds.csv"),
        ("models:/geoclip@champion: MLflow tracking server {tracking} is unreachable", "MLFLOW_TRACKING_URI"),
        absent=("preds.csv",), fixtures=("tracking_server_down",)),
    "s3_scenes_on_unreachable_endpoint": Case(
        _scenes_on_unreachable_s3, ("score",),
        ("s3://geoclip-scenes/scenes", "S3 endpoint {endpoint} is unreachable", "AWS_ENDPOINT_URL"),
        absent=("outputs/scores",), fixtures=("unreachable_s3",)),
    "ingest_s3_without_credentials": Case(
        _ingest_s3_without_credentials, ("ingest",),
        ("s3://geoclip-tiles/eurosat/", "no AWS credentials for the S3 endpoint {endpoint}",
         "AWS_ACCESS_KEY_ID"),
        untouched=("data/raw/labels.csv",), fixtures=("no_aws_credentials",)),
    "missing_s3_scenes": Case(
        lambda root: write_params(root, score={"scenes": "s3://missing-bucket/scenes"}), ("score",),
        ("s3://missing-bucket/scenes", "does not exist"), absent=("outputs/scores",), fixtures=("s3_server",)),
}


def _digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_with_one_clear_line(name, tmp_path, capsys, request):
    case = CASES[name]
    for fixture in case.fixtures:
        request.getfixturevalue(fixture)
    root = tmp_path / "case"
    root.mkdir()
    fields = {"root": str(root), **(case.build(root) or {})}
    before = {p: _digest(root / p) for p in case.untouched}
    capsys.readouterr()

    code = main(["--params", str(root / "params.yaml"), *(a.format(**fields) for a in case.argv)])

    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]  # tqdm bars share stderr
    assert code != 0 and len(lines) == 1, err[-2000:]
    line = lines[0]
    for text in case.expect:
        assert text.format(**fields) in line, line
    for p in case.absent:
        assert not (root / p).exists(), f"{p} was written"
    assert {p: _digest(root / p) for p in case.untouched} == before
    assert not [p for p in root.rglob(".*") if p.name.endswith((".tmp", ".old"))]  # nothing half-written
    if case.argv == VALIDATE:  # a failed validation still leaves its complete report
        assert not json.loads((root / "reports/validation.json").read_text())["success"]
    if os.environ.get("GEOCLIP_PRINT_ERRORS"):
        with capsys.disabled():
            print(f"\n{name}: {line.replace(str(root), '<case>')}")


def print_error_lines() -> int:
    """Run the corpus and print each case's name and error line (for the release notes)."""
    os.environ["GEOCLIP_PRINT_ERRORS"] = "1"
    return pytest.main([__file__, "-q", "-p", "no:cacheprovider"])


if __name__ == "__main__":
    sys.exit(print_error_lines())
