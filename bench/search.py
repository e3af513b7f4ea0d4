"""Search benchmark: exact and approximate (faiss IVF-SQ8) search over 1 and 10 million window embeddings.

Prints, per archive size: build time, index memory, query latency on one core and recall@10 against exact
search. The embeddings are synthetic but clustered (unit vectors around a few thousand centres, as windows of one
continent's land covers cluster); real archives are not this large here.

    python bench/search.py                      # 1M and 10M, 100 queries, nprobe 8/16/32/64
    python bench/search.py --sizes 200000 --queries 20
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # queries on one core, as the goal states (numpy BLAS too)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from geoclip.scoring import ann  # noqa: E402
from geoclip.scoring.search import rank  # noqa: E402

BUILD_THREADS = os.cpu_count() or 1


def clustered(n: int, dim: int, seed: int, clusters: int = 4096, spread: float = 0.35, chunk: int = 1 << 20
              ) -> np.ndarray:
    """``n`` unit float16 vectors around ``clusters`` seeded centres, generated in chunks (bounded memory)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).normal(size=(clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float16)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[rng.integers(0, clusters, m)] + spread * rng.normal(size=(m, dim)).astype(np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact_top(emb: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids ``(Q, k)`` for many queries at once (the ground truth), chunked."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(emb), 1 << 20):
        s = queries @ emb[start:start + (1 << 20)].astype(np.float32).T
        pick = np.argpartition(-s, k - 1, axis=1)[:, :k]
        best_s = np.concatenate([best_s, np.take_along_axis(s, pick, 1)], axis=1)
        best_i = np.concatenate([best_i, pick + start], axis=1)
        keep = np.argsort(-best_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def peak_rss_gib() -> float:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench(n: int, dim: int, n_queries: int, nprobes: list[int], seed: int) -> dict:
    """One archive size: exact latency, then the approximate index's build, memory, latency and recall."""
    t = time.perf_counter()
    emb = clustered(n, dim, seed)
    queries = clustered(n_queries, dim, seed + 1)[:, :].astype(np.float32)
    row: dict = {"windows": n, "dim": dim, "queries": n_queries, "generate_s": round(time.perf_counter() - t, 1),
                 "embeddings_gib": round(emb.nbytes / 2**30, 2)}
    truth = exact_top(emb, queries, 10)
    t = time.perf_counter()
    for q in queries[:10]:  # exact search, one query at a time, one core (geoclip search's own function)
        rank(emb, q, 10)
    row["exact_ms_per_query"] = round((time.perf_counter() - t) / 10 * 1000, 1)
    faiss.omp_set_num_threads(BUILD_THREADS)
    t = time.perf_counter()
    index = ann.build(emb, seed=seed)
    row["ann_build_s"] = round(time.perf_counter() - t, 1)
    row["ann_nlist"] = index.nlist
    row["ann_index_gib"] = round(faiss.serialize_index(index).nbytes / 2**30, 3)
    faiss.omp_set_num_threads(1)
    row["ann"] = []
    for refine in (None, ann.REFINE):  # codes alone, then codes + exact re-scoring of REFINE x 10 candidates
        for nprobe in nprobes:
            vectors = emb if refine else None
            ann.query(index, queries[:1], 10, nprobe, vectors)  # warm
            t = time.perf_counter()
            found = np.stack([ann.query(index, q[None], 10, nprobe, vectors)[0][0] for q in queries])
            ms = (time.perf_counter() - t) / len(queries) * 1000
            recall = float(np.mean([len(set(f) & set(g)) / 10 for f, g in zip(found, truth, strict=True)]))
            row["ann"].append({"nprobe": nprobe, "refine": refine or 0, "ms_per_query": round(ms, 2),
                               "recall_at_10": round(recall, 4)})
    row["peak_rss_gib"] = round(peak_rss_gib(), 2)
    del emb, index
    return row


def main() -> None:
    """Run the sizes asked for; print a table; write bench/results/search_<date>.json."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--dim", type=int, default=128, help="embedding width (train.embed_dim)")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / f"search_{date.today()}.json")
    args = ap.parse_args()
    rows = []
    for n in args.sizes:
        row = bench(n, args.dim, args.queries, args.nprobe, args.seed)
        rows.append(row)
        print(f"{n:>11,} windows: exact {row['exact_ms_per_query']} ms/query (1 core); IVF-SQ8 nlist "
              f"{row['ann_nlist']}, build {row['ann_build_s']} s ({BUILD_THREADS} threads), index "
              f"{row['ann_index_gib']} GiB; peak RSS {row['peak_rss_gib']} GiB", flush=True)
        for a in row["ann"]:
            how = f"+ exact re-scoring of {a['refine'] * 10}" if a["refine"] else "codes only"
            print(f"    nprobe {a['nprobe']:>3}, {how:<30}: {a['ms_per_query']:>7} ms/query, "
                  f"recall@10 {a['recall_at_10']:.3f}")
    result = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "faiss": faiss.__version__, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
