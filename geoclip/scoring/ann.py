"""Approximate search for large window archives: a faiss inverted-file index with 8-bit scalar quantisation.

IVF + SQ8 keeps one byte per dimension (10 million 128-d windows: 1.3 GB) and scans ``nprobe`` of ``nlist`` lists
per query; chosen by ``bench/search.py`` against exact search (recall@10, latency, memory). A large archive is never
loaded whole (:func:`open_archive`): its float16 vectors and its footprints are copied once, row group by row group,
into two sidecar files read a row at a time (re-scoring reads a few dozen vectors a query, the output a few
footprints). The index and the sidecars are saved beside the embeddings with a fingerprint of those files, and
rebuilt when they change.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from geoclip.errors import GeoclipError
from geoclip.ioutils import atomic_path
from geoclip.scoring.embeddings import META_COLUMNS, bbox_columns, own_metadata

INDEX_FILE = "_search.faiss"
VECTORS_FILE = "_search_vectors.npy"
FOOTPRINTS_FILE = "_search_windows.npy"
META_FILE = "_search.json"
TRAIN_PER_LIST = 64  # k-means sample: faiss warns below 39 points per centroid
ADD_CHUNK = 1 << 18  # vectors added at a time: 128 MB as float32 at D=128
REFINE = 4  # candidates from the 8-bit codes per hit wanted, re-scored exactly when the vectors are at hand


def default_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: about sqrt(n) (10 million: 3162), at least 1, at most 65536.

    More lists shorten each scan but cost k-means and assignment time at build, which on a few cores dominates.
    """
    return int(min(65536, max(1, round(math.sqrt(n)))))


def training_rows(n: int, nlist: int, seed: int) -> np.ndarray:
    """The sorted rows k-means trains on: a seeded sample of TRAIN_PER_LIST per list."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, TRAIN_PER_LIST * nlist), replace=False))


def build(embeddings: np.ndarray, nlist: int = 0, seed: int = 0) -> faiss.Index:
    """An IVF-SQ8 inner-product index over unit embeddings ``(N, D)`` (trained on a seeded sample)."""
    n = len(embeddings)
    nlist = min(nlist or default_nlist(n), n)
    chunks = (embeddings[start:start + ADD_CHUNK] for start in range(0, n, ADD_CHUNK))
    return build_from(chunks, embeddings[training_rows(n, nlist, seed)], nlist, seed)


def build_from(chunks: Iterator[np.ndarray], sample: np.ndarray, nlist: int, seed: int = 0) -> faiss.Index:
    """:func:`build` from ``chunks`` of the vectors in order and the k-means ``sample`` (:func:`training_rows`).

    Memory stays at the codes plus one chunk, however the vectors are stored.
    """
    dim = sample.shape[1]
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed  # k-means initialisation: the same data gives the same index
    index.train(np.ascontiguousarray(sample, np.float32))
    for chunk in chunks:
        index.add(np.ascontiguousarray(chunk, np.float32))
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


def window_count(files: list[str]) -> int:
    """Windows in local embeddings files, from their Parquet footers alone."""
    return sum(_open(f).metadata.num_rows for f in files)


def _open(path: str) -> pq.ParquetFile:
    """An embeddings file opened for its footer and row groups; a broken one is named."""
    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several kinds for a broken file
        raise GeoclipError(f"{path}: not a readable GeoParquet embeddings file ({str(exc).splitlines()[0]})") from exc


class RowFile:
    """The rows of a saved ``.npy`` array, read on demand with ``pread``: ``rows[ids]`` costs a read per row.

    Not a memory map: on a freshly written file the kernel maps whole page-cache folios per fault, so a few
    thousand random rows would bring most of a 2.4 GiB file into the process's resident set.
    """

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            np.lib.format.read_magic(f)
            self.shape, _, self.dtype = np.lib.format.read_array_header_1_0(f)
            self._offset = f.tell()
        if os.path.getsize(path) != self._offset + self.dtype.itemsize * int(np.prod(self.shape)):
            raise ValueError(f"{path}: size does not match its header (a copy cut short)")
        self._row = self.dtype.itemsize * int(np.prod(self.shape[1:]))
        self._fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.arange(self.shape[0])[ids] if isinstance(ids, slice) else np.atleast_1d(np.asarray(ids, np.int64))
        data = b"".join(os.pread(self._fd, self._row, self._offset + int(i) * self._row) for i in ids)
        return np.frombuffer(data, self.dtype).reshape(len(ids), *self.shape[1:])

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


#: One record per window in FOOTPRINTS_FILE: where it lies in its scene and its footprint in the scene's CRS.
FOOTPRINT = np.dtype([("row", "<i4"), ("col", "<i4"), ("size", "<i4"), ("xmin", "<f8"), ("ymin", "<f8"),
                      ("xmax", "<f8"), ("ymax", "<f8")])


@dataclass
class Archive:
    """A large local archive of window embeddings, searchable without loading it."""

    files: list[str]
    starts: np.ndarray  # the first window id of each file, then the total
    embeddings: RowFile  # (N, D) float16 in VECTORS_FILE, read a row at a time
    windows: RowFile  # (N,) FOOTPRINT records in FOOTPRINTS_FILE
    scenes: list[tuple[str, str | None]]  # per file: the scene and its CRS as WKT
    ann: faiss.Index
    model_uri: str | None

    def rows(self, ids: np.ndarray) -> pd.DataFrame:
        """The footprints of windows ``ids`` (search's META_COLUMNS), in that order."""
        ids = np.asarray(ids, np.int64)
        which = np.searchsorted(self.starts, ids, side="right") - 1
        records = self.windows[ids]
        table = pd.DataFrame({name: records[name] for name in FOOTPRINT.names})
        table.insert(0, "scene", [self.scenes[f][0] for f in which])
        table.insert(4, "crs", [self.scenes[f][1] for f in which])
        return table[META_COLUMNS]


@dataclass
class _Files:
    """What the footers of an archive's files say: window offsets, width, model, and each file's scene and CRS."""

    starts: np.ndarray
    dim: int
    model_uri: str | None
    scenes: list[tuple[str, str | None]]


def _describe(files: list[str]) -> _Files:
    """Read every file's footer once; mixed embedding widths are refused."""
    counts, dims, models, scenes = [], set(), set(), []
    for f in files:
        pf = _open(f)
        counts.append(pf.metadata.num_rows)
        if "embedding" not in pf.schema_arrow.names:
            raise GeoclipError(f"{f}: no embedding column; expected a file written by scoring (score.embeddings)")
        dims.add(pf.schema_arrow.field("embedding").type.list_size)
        own = own_metadata(pf.schema_arrow)
        models.add(own.get("model_uri"))
        scene = own.get("scene") or (pf.read_row_group(0, columns=["scene"]).column("scene")[0].as_py()
                                     if pf.num_row_groups else None)  # files from before the scene was recorded
        scenes.append((scene, own.get("crs_wkt")))
    if len(dims) > 1:
        raise GeoclipError(f"{Path(files[0]).parent}: embeddings of widths {sorted(dims)}; search one model's files "
                           "at a time")
    model = models.pop() if len(models) == 1 else None
    return _Files(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), dims.pop(),
                  model and model.split("#")[0], scenes)


def _row_groups(files: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The files' windows in order, a row group at a time: float16 vectors ``(n, D)`` and FOOTPRINT records."""
    for f in files:
        pf = _open(f)
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g, columns=["embedding", "row", "col", "size", "bbox"])
            column = table.column("embedding").combine_chunks()
            vectors = np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float16)
            records = np.empty(table.num_rows, FOOTPRINT)
            for name in ("row", "col", "size"):
                records[name] = table.column(name).to_numpy()
            for name, values in zip(("xmin", "ymin", "xmax", "ymax"), bbox_columns(table), strict=True):
                records[name] = values
            yield vectors.reshape(-1, column.type.list_size), records


def _write_sidecars(files: list[str], vectors_path: Path, footprints_path: Path, n: int, dim: int,
                    sample_rows: np.ndarray) -> np.ndarray:
    """Copy every window's vector and footprint into two ``.npy`` files (temporary names, then renamed), one row
    group at a time (memory stays a row group); return the vectors of ``sample_rows`` (sorted), picked on the way."""
    sample, start = np.empty((len(sample_rows), dim), np.float16), 0
    with atomic_path(vectors_path) as vtmp, open(vtmp, "wb") as vout, \
            atomic_path(footprints_path) as ftmp, open(ftmp, "wb") as fout:
        for out, dtype, shape in ((vout, np.dtype(np.float16), (n, dim)), (fout, FOOTPRINT, (n,))):
            np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                       "fortran_order": False, "shape": shape})
        for vectors, records in _row_groups(files):
            vout.write(np.ascontiguousarray(vectors).tobytes())
            fout.write(records.tobytes())
            lo, hi = np.searchsorted(sample_rows, [start, start + len(vectors)])
            sample[lo:hi] = vectors[sample_rows[lo:hi] - start]
            start += len(vectors)
    return sample


def _file_chunks(path: Path) -> Iterator[np.ndarray]:
    """An ``.npy`` file's rows, ADD_CHUNK at a time, read (not memory-mapped: the pages would stay in RSS)."""
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        (n, dim), _, dtype = np.lib.format.read_array_header_1_0(f)
        for start in range(0, n, ADD_CHUNK):
            rows = min(ADD_CHUNK, n - start)
            yield np.fromfile(f, dtype, count=rows * dim).reshape(rows, dim)


def open_archive(folder: Path, files: list[str], nlist: int = 0, seed: int = 0) -> Archive:
    """The archive of ``files``: the index and sidecars saved in ``folder`` when built from exactly those files, else
    new ones built there (vectors and footprints copied row group by row group, the index from them chunk by chunk)."""
    about = _describe(files)
    n, dim = int(about.starts[-1]), about.dim
    index_path, meta_path = folder / INDEX_FILE, folder / META_FILE
    vectors_path, footprints_path = folder / VECTORS_FILE, folder / FOOTPRINTS_FILE
    want = json.loads(json.dumps({"files": fingerprint(files), "nlist": nlist, "seed": seed, "n": n}))
    try:
        if json.loads(meta_path.read_text()) == want:
            vectors, windows = RowFile(vectors_path), RowFile(footprints_path)
            if vectors.shape == (n, dim) and windows.shape == (n,) and windows.dtype == FOOTPRINT:
                return Archive(files, about.starts, vectors, windows, about.scenes,
                               faiss.read_index(str(index_path)), about.model_uri)
    except (OSError, ValueError, RuntimeError):
        pass  # missing or unreadable: rebuilt below
    try:
        meta_path.unlink(missing_ok=True)  # a build stopped half-way must not look finished
        lists = min(nlist or default_nlist(n), n)
        sample = _write_sidecars(files, vectors_path, footprints_path, n, dim, training_rows(n, lists, seed))
        index = build_from(_file_chunks(vectors_path), sample, lists, seed)
        vectors, windows = RowFile(vectors_path), RowFile(footprints_path)
        with atomic_path(index_path) as tmp:
            faiss.write_index(index, str(tmp))
        with atomic_path(meta_path) as tmp:
            tmp.write_text(json.dumps(want))
    except OSError as exc:
        raise GeoclipError(f"{folder}: cannot save the search index ({exc.strerror}); is the folder writable?") from exc
    return Archive(files, about.starts, vectors, windows, about.scenes, index, about.model_uri)
