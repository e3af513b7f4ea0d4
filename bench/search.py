"""Search benchmark: exact and approximate (faiss IVF-SQ8) search over 1 and 10 million window embeddings.

Prints, per archive size: build time, index memory, query latency on one core and recall@10 against exact
search. The embeddings are synthetic but clustered (unit vectors around a few thousand centres, as windows of one
continent's land covers cluster); real archives are not this large here. With ``--archive`` the same windows are
also written as scoring's GeoParquet files and searched as ``geoclip search`` does (geoclip.scoring.ann.open_archive:
vectors and footprints copied into files read a row at a time), each step in a fresh process whose peak memory is
reported: the build (once per archive) and the queries.

    python bench/search.py                      # 1M and 10M, 100 queries, nprobe 8/16/32/64
    python bench/search.py --sizes 10000000 --archive --work /tmp/archive   # + the real path's memory (5 GB disk)
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
import subprocess  # noqa: E402
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


def bench(n: int, dim: int, n_queries: int, nprobes: list[int], seed: int, archive: Path | None = None) -> dict:
    """One archive size: exact latency, then the approximate index's build, memory, latency and recall (and with
    ``archive``, a work folder: the same through GeoParquet files, as geoclip search reads them)."""
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
    del index
    if archive is not None:
        import shutil

        folder = archive / str(n)
        shutil.rmtree(folder, ignore_errors=True)
        row["archive"] = bench_archive(emb, queries, truth, folder, nprobe=32)
        shutil.rmtree(folder)
    del emb
    return row


ARCHIVE_STEP = """
import json, sys, time
import numpy as np
from pathlib import Path
from geoclip.scoring import ann
folder, nprobe = Path(sys.argv[1]), int(sys.argv[2])
files = sorted(str(p) for p in folder.glob("*_embeddings.parquet"))
t = time.perf_counter()
archive = ann.open_archive(folder, files)
out = {"open_s": time.perf_counter() - t}
queries = np.load(folder / "queries.npy")
found, t = [], time.perf_counter()
for q in queries:
    ids, _ = ann.query(archive.ann, q[None], 10, nprobe, archive.embeddings)
    archive.rows(ids[0])  # the hits' footprints, as search writes them
    found.append(ids[0].tolist())
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
kib = {k: int(status[k].split()[0]) for k in ("VmHWM", "RssAnon", "RssFile")}
out |= {"ms_per_query": (time.perf_counter() - t) / len(queries) * 1000, "found": found,
        "peak_rss_gib": kib["VmHWM"] / 2**20, "anon_gib": kib["RssAnon"] / 2**20, "file_gib": kib["RssFile"] / 2**20}
print(json.dumps(out))
"""


def write_archive(emb: np.ndarray, folder: Path, files: int = 10) -> None:
    """The windows as scoring's GeoParquet embeddings files (``files`` scenes), with footprints on a UTM grid."""
    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    from geoclip.scoring.embeddings import SUFFIX, EmbeddingWriter

    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(emb) // files)
    for k in range(files):
        part = emb[k * per:(k + 1) * per]
        side = int(np.ceil(np.sqrt(len(part))))
        writer = EmbeddingWriter(folder / f"scene_{k}{SUFFIX}", f"scene_{k}.tif",
                                 from_origin(300_000 + 40_000_000 * k, 9_000_000, 10, 10), CRS.from_epsg(32632),
                                 64, emb.shape[1], model_uri="models:/geoclip/1")
        for start in range(0, len(part), 1 << 16):
            i = np.arange(start, min(start + (1 << 16), len(part)))
            writer.add(list(zip((32 * (i // side)).tolist(), (32 * (i % side)).tolist(), strict=True)),
                       part[start:start + len(i)])
        writer.close()


def bench_archive(emb: np.ndarray, queries: np.ndarray, truth: np.ndarray, folder: Path, nprobe: int) -> dict:
    """Write the archive, then open (build) and query it in fresh processes: their time and peak memory."""
    t = time.perf_counter()
    write_archive(emb, folder)
    np.save(folder / "queries.npy", queries)
    row = {"write_s": round(time.perf_counter() - t, 1),
           "files_gib": round(sum(f.stat().st_size for f in folder.glob("*.parquet")) / 2**30, 2)}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    for step in ("build", "query"):  # the first opening builds and saves; the second loads what was saved
        threads = {"OMP_NUM_THREADS": str(BUILD_THREADS)} if step == "build" else {}
        run = subprocess.run([sys.executable, "-c", ARCHIVE_STEP, str(folder), str(nprobe)], check=False,
                             capture_output=True, text=True, env=env | threads)
        if run.returncode:
            raise SystemExit(f"archive {step} failed:\n{run.stderr[-2000:]}")
        got = json.loads(run.stdout.strip().splitlines()[-1])
        recall = float(np.mean([len(set(f) & set(g)) / 10 for f, g in zip(got["found"], truth, strict=True)]))
        # VmHWM, not ru_maxrss: a child's ru_maxrss keeps the RSS its parent had when it forked.
        row[step] = {"open_s": round(got["open_s"], 1), "ms_per_query": round(got["ms_per_query"], 2),
                     "recall_at_10": round(recall, 4), "peak_rss_gib": round(got["peak_rss_gib"], 2),
                     "end_anon_gib": round(got["anon_gib"], 2), "end_file_gib": round(got["file_gib"], 2)}
    row["sidecar_gib"] = round((folder / "_search_vectors.npy").stat().st_size / 2**30, 2)
    row["index_gib"] = round((folder / "_search.faiss").stat().st_size / 2**30, 2)
    return row


def main() -> None:
    """Run the sizes asked for; print a table; write bench/results/search_<date>.json."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--dim", type=int, default=128, help="embedding width (train.embed_dim)")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--archive", action="store_true", help="also search the windows as GeoParquet files, as "
                    "geoclip search does, and report each step's peak memory")
    ap.add_argument("--work", type=Path, default=Path("bench/results/search_archive"),
                    help="where --archive writes its files (removed after each size)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / f"search_{date.today()}.json")
    args = ap.parse_args()
    rows = []
    for n in args.sizes:
        row = bench(n, args.dim, args.queries, args.nprobe, args.seed, args.work if args.archive else None)
        rows.append(row)
        print(f"{n:>11,} windows: exact {row['exact_ms_per_query']} ms/query (1 core); IVF-SQ8 nlist "
              f"{row['ann_nlist']}, build {row['ann_build_s']} s ({BUILD_THREADS} threads), index "
              f"{row['ann_index_gib']} GiB; peak RSS {row['peak_rss_gib']} GiB", flush=True)
        for a in row["ann"]:
            how = f"+ exact re-scoring of {a['refine'] * 10}" if a["refine"] else "codes only"
            print(f"    nprobe {a['nprobe']:>3}, {how:<30}: {a['ms_per_query']:>7} ms/query, "
                  f"recall@10 {a['recall_at_10']:.3f}")
        if "archive" in row:
            a = row["archive"]
            print(f"    as GeoParquet files ({a['files_gib']} GiB, written in {a['write_s']} s), nprobe 32 + "
                  "re-scoring:"
                  f" build {a['build']['open_s']} s at peak RSS {a['build']['peak_rss_gib']} GiB; then per process:"
                  f" open {a['query']['open_s']} s, {a['query']['ms_per_query']} ms/query with the hits' footprints,"
                  f" recall@10 {a['query']['recall_at_10']:.3f}, peak RSS {a['query']['peak_rss_gib']} GiB"
                  f" ({a['query']['end_anon_gib']} GiB anonymous, {a['query']['end_file_gib']} GiB file pages at the"
                  f" end; index {a['index_gib']} GiB in memory, vectors {a['sidecar_gib']} GiB on disk, read by row)")
    result = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "faiss": faiss.__version__, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
