"""The approximate index for large archives: recall against exact search, reproducible builds, kept and rebuilt."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from geoclip.errors import GeoclipError
from geoclip.scoring import ann
from geoclip.scoring.search import rank


def clustered(n: int, dim: int = 32, clusters: int = 200, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``clusters`` centres, as window embeddings of a few land covers cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def test_recall_at_10_against_exact_search():
    emb = clustered(20_000)
    queries = clustered(50, seed=1).astype(np.float32)
    index = ann.build(emb)
    assert index.nlist == ann.default_nlist(20_000) == 141
    ids, _ = ann.query(index, queries, 10, nprobe=16)
    exact = [set(rank(emb, q, 10)[0]) for q in queries]
    recall = np.mean([len(set(i) & e) / 10 for i, e in zip(ids, exact, strict=True)])
    assert recall >= 0.95
    few, _ = ann.query(index, queries, 10, nprobe=1)  # fewer lists scanned: lower recall, the knob works
    assert np.mean([len(set(i) & e) / 10 for i, e in zip(few, exact, strict=True)]) < recall
    # Re-scoring the codes' candidates with the float16 vectors orders the near-ties the 8-bit codes blur.
    refined, scores = ann.query(index, queries, 10, nprobe=16, embeddings=emb)
    assert np.mean([len(set(i) & e) / 10 for i, e in zip(refined, exact, strict=True)]) > recall
    np.testing.assert_allclose(scores[0], emb[refined[0]].astype(np.float32) @ queries[0], rtol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()  # best first


def test_same_data_and_seed_give_the_same_index():
    emb = clustered(5000)
    q = clustered(5, seed=2).astype(np.float32)
    a, b = ann.build(emb, seed=0), ann.build(emb, seed=0)
    np.testing.assert_array_equal(ann.query(a, q, 10, 8)[0], ann.query(b, q, 10, 8)[0])


def write_archive(folder, n_files: int = 3, per_file: int = 1500, dim: int = 32, seed: int = 0) -> list[str]:
    """Embeddings files as scoring writes them (small row groups, so footprints come from several)."""
    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    from geoclip.scoring import embeddings

    emb = clustered(n_files * per_file, dim, seed=seed)
    files = []
    for k in range(n_files):
        writer = embeddings.EmbeddingWriter(folder / f"scene_{k}{embeddings.SUFFIX}", f"scene_{k}.tif",
                                            from_origin(500_000 + 100_000 * k, 5_000_000, 10, 10),
                                            CRS.from_epsg(32632), 64, dim, model_uri="models:/geoclip/3")
        for start in range(0, per_file, 500):  # one row group per add: ROW_GROUP is larger
            rows = range(k * per_file + start, k * per_file + min(start + 500, per_file))
            writer.add([(32 * (i // 40), 32 * (i % 40)) for i in range(start, start + len(rows))], emb[list(rows)])
            writer._flush()
        files.append(str(writer.close()))
    return files


def test_archive_searches_without_loading_and_reads_only_the_hits_footprints(tmp_path):
    from geoclip.scoring.search import read_index

    files = write_archive(tmp_path)
    archive = ann.open_archive(tmp_path, files)
    whole = read_index(tmp_path)  # the in-memory reading, for reference
    assert isinstance(archive.embeddings, ann.RowFile) and archive.model_uri == "models:/geoclip/3"
    np.testing.assert_array_equal(archive.embeddings[:], whole.embeddings)  # read on demand, never mapped whole
    ids = np.array([4499, 0, 2000, 1499, 1500, 3333])  # across files and row groups, in no order
    pd.testing.assert_frame_equal(archive.rows(ids), whole.rows(ids), check_dtype=False)
    q = whole.embeddings[2000].astype(np.float32)
    found, _ = ann.query(archive.ann, q, 10, nprobe=64, embeddings=archive.embeddings)
    assert set(found[0]) == set(rank(whole.embeddings, q, 10)[0])


def test_archive_is_saved_reused_and_rebuilt_when_the_embeddings_change(tmp_path):
    files = write_archive(tmp_path, n_files=2, per_file=1000)
    ann.open_archive(tmp_path, files)
    saved = {f: (tmp_path / f).stat().st_mtime_ns for f in (ann.INDEX_FILE, ann.VECTORS_FILE)}
    ann.open_archive(tmp_path, files)
    assert {f: (tmp_path / f).stat().st_mtime_ns for f in saved} == saved  # reused
    write_archive(tmp_path, n_files=2, per_file=1000, seed=5)  # the scenes scored again
    again = ann.open_archive(tmp_path, files)
    assert all((tmp_path / f).stat().st_mtime_ns != t for f, t in saved.items())  # rebuilt
    from geoclip.scoring.search import read_index

    np.testing.assert_array_equal(again.embeddings[:], read_index(tmp_path).embeddings)


def test_an_interrupted_build_is_not_taken_for_a_finished_one(tmp_path):
    files = write_archive(tmp_path, n_files=1, per_file=1000)
    ann.open_archive(tmp_path, files)
    vectors = (tmp_path / ann.VECTORS_FILE).read_bytes()
    (tmp_path / ann.VECTORS_FILE).write_bytes(vectors[:-100])  # e.g. the disk filled while copying
    archive = ann.open_archive(tmp_path, files)
    assert archive.embeddings.shape == (1000, 32) and (tmp_path / ann.VECTORS_FILE).read_bytes() == vectors


def test_a_folder_that_cannot_hold_the_index_is_a_clear_error(tmp_path):
    files = write_archive(tmp_path, n_files=1, per_file=200)
    (tmp_path / "not_a_folder").write_text("a file where the index folder should be")  # refused even to root
    with pytest.raises(GeoclipError, match="cannot save the search index"):
        ann.open_archive(tmp_path / "not_a_folder", files)


def test_mixed_widths_and_broken_files_are_named(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    files = write_archive(tmp_path / "a", n_files=1, per_file=100) + write_archive(tmp_path / "b", 1, 100, dim=16)
    with pytest.raises(GeoclipError, match=r"embeddings of widths \[16, 32\]"):
        ann.open_archive(tmp_path, files)
    (tmp_path / "broken_embeddings.parquet").write_bytes(b"not parquet")
    with pytest.raises(GeoclipError, match="broken_embeddings.parquet: not a readable GeoParquet"):
        ann.window_count([str(tmp_path / "broken_embeddings.parquet")])
