"""Free-text search: window embeddings written as GeoParquet by scoring, ranked exactly, hits as GeoJSON/CSV/PNG."""

from __future__ import annotations

import json
import struct

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pyogrio
import pyogrio.raw
import pytest
import rasterio
from factories import make_model_dir, make_tile, synthetic_tiles, write_scene

import geoclip.scoring.search as search_module
from geoclip.bands import EUROSAT_CLASSES
from geoclip.cli import main
from geoclip.config import params_from_dict
from geoclip.errors import GeoclipError
from geoclip.model.clip import load_model, predict_batches
from geoclip.model.vocab import query_embedding
from geoclip.scoring import ann
from geoclip.scoring.score import score_scene
from geoclip.scoring.search import rank, read_index, run_search, search

DIM = len(EUROSAT_CLASSES)


def one_hot_predict(x: np.ndarray) -> dict:
    """Band 0 encodes each pixel's class (write_scene): probabilities = class shares, embedding = their unit vector."""
    cls = x[:, 0].astype(np.int64) // 1000 - 1
    shares = np.stack([(cls == c).mean(axis=(1, 2)) for c in range(DIM)], axis=1) + 1e-6
    return {"probabilities": shares / shares.sum(axis=1, keepdims=True),
            "embeddings": shares / np.linalg.norm(shares, axis=1, keepdims=True)}


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A scene scored with embeddings on: (scene path, its truth, the output folder, the summary)."""
    root = tmp_path_factory.mktemp("search")
    scene = root / "scenes" / "scene_0.tif"
    truth = write_scene(scene, h=256, w=256)
    summary = score_scene(one_hot_predict, scene, root / "out", list(EUROSAT_CLASSES), window=64, stride=32,
                          batch_size=16, model_uri="models:/geoclip/7", quicklook=False, embeddings=True)
    return scene, truth, root / "out", summary


def test_embeddings_are_geoparquet_with_footprints_in_the_scene_crs(scored):
    scene, _, out, summary = scored
    path = out / "scene_0_embeddings.parquet"
    assert summary["embeddings"] == str(path)
    table = pq.read_table(path)
    geo = json.loads(table.schema.metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    column = geo["columns"]["geometry"]
    assert column["encoding"] == "WKB" and column["crs"]["id"] == {"authority": "EPSG", "code": 32632}
    assert json.loads(table.schema.metadata[b"geoclip"])["model_uri"] == "models:/geoclip/7"
    assert table.schema.field("embedding").type.value_type.bit_width == 16  # float16
    df = table.to_pandas()
    # Every window with data, once: 7 x 7 positions (the 40 px nodata corner leaves each window some data).
    assert len(df) == 7 * 7 and len(df[["row", "col"]].drop_duplicates()) == len(df)
    with rasterio.open(scene) as src:
        t = src.transform
    first = df.sort_values(["row", "col"]).iloc[1]  # row 0, col 32
    order, n_points = struct.unpack_from("<BI", first["geometry"], 0)[0], struct.unpack_from("<III", first["geometry"], 1)
    xs, ys = zip(*[struct.unpack_from("<dd", first["geometry"], 13 + 16 * i) for i in range(5)], strict=True)
    assert order == 1 and n_points == (3, 1, 5)
    assert (min(xs), max(ys)) == (t.c + 32 * t.a, t.f) and (max(xs), min(ys)) == (t.c + 96 * t.a, t.f - 64 * 10)
    assert first["bbox"] == {"xmin": min(xs), "ymin": min(ys), "xmax": max(xs), "ymax": max(ys)}


def test_a_query_finds_the_windows_of_its_class(scored, tmp_path):
    scene, truth, out, _ = scored
    index = read_index(out)
    assert index.model_uri == "models:/geoclip/7" and index.embeddings.shape == (49, DIM)
    target = int(np.bincount(truth[truth < 255]).argmax())
    query = np.eye(DIM, dtype=np.float32)[target]

    hits = search(index, query, EUROSAT_CLASSES[target], tmp_path, top=5)

    assert list(hits["rank"]) == [1, 2, 3, 4, 5] and hits["score"].is_monotonic_decreasing
    shares = [(truth[h.row:h.row + 64, h.col:h.col + 64] == target).mean() for h in hits.itertuples()]
    assert shares[0] == 1.0 and min(shares) >= 0.5  # whole blocks of the class first, then windows half on it
    assert all(s == 1.0 for s, score in zip(shares, hits["score"], strict=True) if score > 0.99)
    collection = json.loads((tmp_path / "hits.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 5
    lon, lat = np.array(collection["features"][0]["geometry"]["coordinates"][0]).mean(axis=0)
    assert 8.9 < lon < 9.1 and 45.0 < lat < 45.2  # UTM 32N (500 km E, 5000 km N): about 9 E, 45.1 N
    assert collection["features"][0]["properties"]["scene"] == str(scene)
    # Read back by GDAL's OGR (pyogrio), as a GIS would: five polygons in WGS84 with their properties.
    meta, _, geometry, fields = pyogrio.raw.read(tmp_path / "hits.geojson")
    assert meta["crs"] == "EPSG:4326" and meta["geometry_type"] == "Polygon" and len(geometry) == 5
    assert list(fields[list(meta["fields"]).index("rank")]) == [1, 2, 3, 4, 5]
    xmin, ymin, xmax, ymax = pyogrio.read_bounds(tmp_path / "hits.geojson")[1][:, 0]
    assert 8.9 < xmin < xmax < 9.1 and 45.0 < ymin < ymax < 45.2
    csv = pd.read_csv(tmp_path / "hits.csv")
    assert list(csv.columns[:4]) == ["rank", "score", "lon", "lat"] and len(csv) == 5
    assert (tmp_path / "hits.png").stat().st_size > 1000


def test_exact_ranking_across_chunks_equals_a_full_sort(monkeypatch):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(5000, 16)).astype(np.float16)
    query = rng.normal(size=16).astype(np.float32)
    monkeypatch.setattr(search_module, "CHUNK", 700)
    order, scores = rank(emb, query, 25)
    full = emb.astype(np.float32) @ query
    np.testing.assert_array_equal(order, np.argsort(-full, kind="stable")[:25])
    np.testing.assert_allclose(scores, full[order])
    assert len(rank(emb[:3], query, 25)[0]) == 3  # fewer windows than asked for


def test_search_errors_say_what_to_fix(scored, tmp_path):
    _, _, out, _ = scored
    with pytest.raises(GeoclipError, match="no such index folder"):
        read_index(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GeoclipError, match="score.embeddings: true"):
        read_index(tmp_path / "empty")
    (tmp_path / "bad_embeddings.parquet").write_text("not parquet")
    with pytest.raises(GeoclipError, match="not a readable GeoParquet"):
        read_index(tmp_path / "bad_embeddings.parquet")
    index = read_index(out)
    with pytest.raises(GeoclipError, match="width 4 != the index's 10"):
        search(index, np.ones(4, np.float32), "x", tmp_path)
    with pytest.raises(GeoclipError, match="at least 1"):
        search(index, np.ones(DIM, np.float32), "x", tmp_path, top=0)
    params = params_from_dict({})
    with pytest.raises(GeoclipError, match="embedded by models:/geoclip/7, not models:/other/1"):
        run_search(params, "a lake", index=out, model_uri="models:/other/1", out_dir=tmp_path)
    with pytest.raises(GeoclipError, match="--index .* and/or --tiles"):
        run_search(params, "a lake", out_dir=tmp_path)
    assert not (tmp_path / "hits.csv").exists()


def test_cli_searches_a_folder_of_tiles_with_a_real_model(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path / "model")
    tiles = synthetic_tiles(6)
    for i, tile in enumerate(tiles):
        make_tile(tmp_path / "tiles" / f"tile_{i}.tif", tile, origin=(500000 + 640 * i, 5000000))
    out = tmp_path / "hits"
    assert main(["search", "a lake", "--tiles", str(tmp_path / "tiles"), "--model", str(model_dir),
                 "--out", str(out), "--top", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    csv = pd.read_csv(out / "hits.csv")
    model = load_model(model_dir)
    _, emb = predict_batches(model, tiles, 8)
    expected = np.argsort(-(emb @ query_embedding(model, "a lake").numpy()), kind="stable")[:3]
    assert [int(p.split("_")[-1].split(".")[0]) for p in csv["scene"]] == expected.tolist()
    assert main(["search", "  ", "--tiles", str(tmp_path / "tiles"), "--model", str(model_dir)]) == 2


def test_without_mosaic_only_geojson_and_csv_are_written(scored, tmp_path):
    _, _, out, _ = scored
    hits = search(read_index(out), np.eye(DIM, dtype=np.float32)[0], "x", tmp_path, top=4, mosaic=False)
    assert len(hits) == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["hits.csv", "hits.geojson"]


def test_a_tile_that_is_not_a_raster_is_named_in_one_line(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path / "model")
    make_tile(tmp_path / "tiles" / "good.tif", synthetic_tiles(1)[0])
    (tmp_path / "tiles" / "broken.tif").write_bytes(b"not a tiff")
    assert main(["search", "a lake", "--tiles", str(tmp_path / "tiles"), "--model", str(model_dir),
                 "--out", str(tmp_path / "hits")]) == 2
    err = capsys.readouterr().err.strip()
    assert "broken.tif: cannot be read as a raster" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "hits").exists()

def test_scheduled_scoring_path_writes_embeddings_that_search_reads_back(tmp_path):
    """score_one (what the CLI, DVC stage and Prefect flow run) with score.embeddings on, through a served pyfunc;
    the index remembers the model, so the query needs no --model."""
    import mlflow

    from geoclip.registry.pyfunc import save_pyfunc
    from geoclip.scoring.score import score_one

    model_dir = make_model_dir(tmp_path / "model")
    served = mlflow.pyfunc.load_model(str(save_pyfunc(model_dir, synthetic_tiles(2), tmp_path / "pyfunc")))
    scene = tmp_path / "scenes" / "scene_0.tif"
    write_scene(scene, h=128, w=128)
    params = params_from_dict({"score": {"embeddings": True, "quicklook": False, "batch_size": 8},
                               "paths": {"reports": str(tmp_path / "reports")}})
    summary = score_one(params, served, str(scene), str(tmp_path / "out"), model_uri=str(model_dir))
    index = read_index(tmp_path / "out")
    assert summary["embeddings"].endswith("scene_0_embeddings.parquet") and index.embeddings.shape == (9, 32)
    np.testing.assert_allclose(np.linalg.norm(index.embeddings.astype(np.float32), axis=1), 1.0, atol=2e-3)
    hits = run_search(params, "a lake", index=tmp_path / "out", out_dir=tmp_path / "hits", top=3, mosaic=False)
    query = query_embedding(load_model(model_dir), "a lake").numpy()
    assert hits["score"].iloc[0] == pytest.approx(float((index.embeddings.astype(np.float32) @ query).max()), abs=1e-4)
    assert not (tmp_path / "out" / ann.INDEX_FILE).exists()  # 9 windows: exact search
    # Above search.ann_min_windows the saved IVF-SQ8 index answers; scanning every list it finds the same windows.
    large = params_from_dict({"search": {"ann_min_windows": 5, "nprobe": 64}})
    approx = run_search(large, "a lake", index=tmp_path / "out", out_dir=tmp_path / "ann", top=3, mosaic=False)
    assert (tmp_path / "out" / ann.INDEX_FILE).exists()
    assert list(zip(approx["row"], approx["col"], strict=True)) == list(zip(hits["row"], hits["col"], strict=True))
    np.testing.assert_allclose(approx["score"], hits["score"], atol=0.02)  # 8-bit codes: scores within ~1%
    make_tile(tmp_path / "tiles" / "tile_0.tif", synthetic_tiles(1)[0])
    with pytest.raises(GeoclipError, match="approximate index is kept beside local embeddings only"):
        run_search(large, "a lake", index=tmp_path / "out", tiles=tmp_path / "tiles", out_dir=tmp_path / "x")

