"""The approximate index for large archives: recall against exact search, reproducible builds, kept and rebuilt."""

from __future__ import annotations

import numpy as np
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


def test_index_is_saved_reused_and_rebuilt_when_the_embeddings_change(tmp_path):
    emb = clustered(3000)
    files = [str(tmp_path / "scene_embeddings.parquet")]
    (tmp_path / "scene_embeddings.parquet").write_bytes(b"stand-in for the embeddings file")
    ann.load_or_build(tmp_path, files, emb)
    saved = (tmp_path / ann.INDEX_FILE).stat().st_mtime_ns
    ann.load_or_build(tmp_path, files, emb)
    assert (tmp_path / ann.INDEX_FILE).stat().st_mtime_ns == saved  # reused
    (tmp_path / "scene_embeddings.parquet").write_bytes(b"the scene was scored again")
    ann.load_or_build(tmp_path, files, emb)
    assert (tmp_path / ann.INDEX_FILE).stat().st_mtime_ns != saved  # rebuilt


def test_a_folder_that_cannot_hold_the_index_is_a_clear_error(tmp_path):
    (tmp_path / "not_a_folder").write_text("a file where the index folder should be")
    with pytest.raises(GeoclipError, match="cannot save the search index"):
        ann.load_or_build(tmp_path / "not_a_folder", [], clustered(100))
