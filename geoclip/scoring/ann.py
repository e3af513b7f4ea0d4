"""Approximate search for large window archives: a faiss inverted-file index with 8-bit scalar quantisation.

IVF + SQ8 keeps one byte per dimension (10 million 128-d windows: 1.3 GB) and scans ``nprobe`` of ``nlist`` lists
per query; chosen by ``bench/search.py`` against exact search (recall@10, latency, memory). The index is saved
beside the embeddings it was built from, with a fingerprint of those files, and rebuilt when they change.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import faiss
import numpy as np

from geoclip.errors import GeoclipError
from geoclip.ioutils import atomic_path

INDEX_FILE = "_search.faiss"
META_FILE = "_search.json"
TRAIN_PER_LIST = 64  # k-means sample: faiss warns below 39 points per centroid
ADD_CHUNK = 1 << 20
REFINE = 4  # candidates from the 8-bit codes per hit wanted, re-scored exactly when the vectors are at hand


def default_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: about sqrt(n) (10 million: 3162), at least 1, at most 65536.

    More lists shorten each scan but cost k-means and assignment time at build, which on a few cores dominates.
    """
    return int(min(65536, max(1, round(math.sqrt(n)))))


def build(embeddings: np.ndarray, nlist: int = 0, seed: int = 0) -> faiss.Index:
    """An IVF-SQ8 inner-product index over unit embeddings ``(N, D)`` (trained on a seeded sample)."""
    n, dim = embeddings.shape
    nlist = min(nlist or default_nlist(n), n)
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed  # k-means initialisation: the same data gives the same index
    sample = np.random.default_rng(seed).choice(n, size=min(n, TRAIN_PER_LIST * nlist), replace=False)
    index.train(np.ascontiguousarray(embeddings[np.sort(sample)], np.float32))
    for start in range(0, n, ADD_CHUNK):
        index.add(np.ascontiguousarray(embeddings[start:start + ADD_CHUNK], np.float32))
    return index


def query(index: faiss.Index, vectors: np.ndarray, top: int, nprobe: int, embeddings: np.ndarray | None = None,
          refine: int = REFINE) -> tuple[np.ndarray, np.ndarray]:
    """Ids and scores ``(Q, top)`` of the approximate nearest windows (ids -1 where fewer were found).

    With ``embeddings`` (the float16 vectors, e.g. memory-mapped), ``refine`` times ``top`` candidates are taken
    from the 8-bit codes and re-scored exactly: the codes find the neighbourhood, the vectors order it (near-ties
    inside one land-cover cluster are where 8 bits lose recall).
    """
    vectors = np.ascontiguousarray(np.atleast_2d(vectors), np.float32)
    index.nprobe = max(1, min(nprobe, index.nlist))
    if embeddings is None:
        scores, ids = index.search(vectors, top)
        return ids, scores
    _, candidates = index.search(vectors, top * refine)
    ids = np.full((len(vectors), top), -1, np.int64)
    scores = np.full((len(vectors), top), -np.inf, np.float32)
    for q, (vector, cand) in enumerate(zip(vectors, candidates, strict=True)):
        cand = cand[cand >= 0]
        exact = embeddings[np.sort(cand)].astype(np.float32) @ vector
        best = np.argsort(-exact, kind="stable")[:top]
        ids[q, :len(best)], scores[q, :len(best)] = np.sort(cand)[best], exact[best]
    return ids, scores


def fingerprint(files: list[str]) -> list[list]:
    """What the index was built from: each file's name, size and modification time."""
    return [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]


def load_or_build(folder: Path, files: list[str], embeddings: np.ndarray, nlist: int = 0, seed: int = 0
                  ) -> faiss.Index:
    """The index saved in ``folder`` when it was built from exactly ``files``, else a new one (saved there)."""
    index_path, meta_path = folder / INDEX_FILE, folder / META_FILE
    want = {"files": fingerprint(files), "nlist": nlist, "seed": seed, "n": len(embeddings)}
    if index_path.exists() and meta_path.exists():
        try:
            if json.loads(meta_path.read_text()) == json.loads(json.dumps(want)):
                return faiss.read_index(str(index_path))
        except (ValueError, RuntimeError):
            pass  # unreadable: rebuilt below
    index = build(embeddings, nlist, seed)
    try:
        with atomic_path(index_path) as tmp:
            faiss.write_index(index, str(tmp))
        with atomic_path(meta_path) as tmp:
            tmp.write_text(json.dumps(want))
    except OSError as exc:
        raise GeoclipError(f"{folder}: cannot save the search index ({exc.strerror}); is the folder writable?") from exc
    return index
