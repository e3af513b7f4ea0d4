"""Free-text search: rank scored windows (GeoParquet from scoring) or a folder of tiles against a text query.

Exact search: the query's unit embedding against every window's, in chunks (memory follows the chunk). Hits are
written as GeoJSON (WGS84, as RFC 7946 asks), CSV (WGS84 centre and the footprint in the scene's own CRS) and a
quick-look mosaic of the hits' true-colour windows.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import rasterio
from rasterio.crs import CRS
from rasterio.warp import transform_geom
from rasterio.windows import Window

from geoclip.bands import ALL_BAND_NAMES
from geoclip.data import s3
from geoclip.errors import GeoclipError
from geoclip.ioutils import atomic_path
from geoclip.scoring.embeddings import META_COLUMNS, SUFFIX, footprints, own_metadata

CHUNK = 1 << 20  # windows scored per matrix product
RGB = ("B04", "B03", "B02")


@dataclass
class Index:
    """Windows to search: their footprints (one row each) and unit embeddings ``(N, D)`` float16."""

    meta: pd.DataFrame  # META_COLUMNS; crs as WKT; footprint in that CRS
    embeddings: np.ndarray
    model_uri: str | None  # the model that embedded them (None: unknown or several)

    def rows(self, ids: np.ndarray) -> pd.DataFrame:
        """The footprints of windows ``ids`` (META_COLUMNS), in that order."""
        return self.meta.iloc[ids].reset_index(drop=True)


def _index_files(source: str | Path) -> list[str]:
    """GeoParquet embedding files under a folder or S3 prefix (any depth), or the one file given."""
    text = str(source)
    if s3.is_s3(text):
        return [text] if text.endswith(".parquet") else s3.list_uris(text, (SUFFIX,))
    path = Path(text)
    if path.is_file():
        return [text]
    if not path.is_dir():
        raise GeoclipError(f"{path}: no such index folder or file; score with score.embeddings: true to write one")
    return sorted(str(p) for p in path.rglob(f"*{SUFFIX}") if not any(part.startswith(".") for part in p.parts))


def _read_file(uri: str) -> tuple[pd.DataFrame, np.ndarray, str | None]:
    """One scene's windows, embeddings and model URI from its GeoParquet file (S3 files are fetched first)."""
    with tempfile.TemporaryDirectory(prefix="geoclip-index-") as tmp:
        local = s3.download(uri, Path(tmp) / Path(uri).name) if s3.is_s3(uri) else Path(uri)
        try:
            table = pq.read_table(local)
        except Exception as exc:  # pyarrow raises several kinds for a broken file
            raise GeoclipError(f"{uri}: not a readable GeoParquet embeddings file ({str(exc).splitlines()[0]})") from exc
    own = own_metadata(table.schema)
    if "embedding" not in table.column_names or "bbox" not in table.column_names:
        raise GeoclipError(f"{uri}: no embedding/bbox columns; expected a file written by scoring (score.embeddings)")
    meta = footprints(table, own.get("crs_wkt"))
    emb = table.column("embedding").combine_chunks()
    dim = emb.type.list_size
    vectors = np.asarray(emb.flatten().to_numpy(zero_copy_only=False), np.float16).reshape(-1, dim)
    return meta, vectors, own.get("model_uri")


def read_index(source: str | Path) -> Index:
    """Every embeddings file under ``source`` as one index; the files must share one embedding width."""
    files = _index_files(source)
    if not files:
        raise GeoclipError(f"{source}: no *{SUFFIX} files; score scenes with score.embeddings: true first")
    parts = [_read_file(f) for f in files]
    dims = {p[1].shape[1] for p in parts}
    if len(dims) > 1:
        raise GeoclipError(f"{source}: embeddings of widths {sorted(dims)}; search one model's files at a time")
    models = {p[2] for p in parts}
    return Index(pd.concat([p[0] for p in parts], ignore_index=True), np.concatenate([p[1] for p in parts]),
                 models.pop().split("#")[0] if len(models) == 1 and None not in models else None)


def index_tiles(source: str | Path, model, batch_size: int = 256) -> Index:
    """Embed a folder (or manifest) of tiles as an index, batch by batch: each tile's footprint from its own header.

    Tiles are read as ``geoclip predict`` reads them (headers checked first, one-line errors), so memory follows
    the batch.
    """
    from geoclip.bands import band_indices
    from geoclip.data.tiles import discover_tiles
    from geoclip.model.clip import predict_batches
    from geoclip.scoring.predict import read_tiles

    paths = [str(p) for p in discover_tiles(source)["path"]]
    if not paths:
        raise GeoclipError(f"{source}: no tiles to search")
    size = model.cfg.tile_size
    idx = band_indices(model.cfg.band_names, tuple(model.cfg.input_band_names))
    rows, embeddings = [], []
    for start in range(0, len(paths), batch_size):
        batch = paths[start:start + batch_size]
        images = read_tiles(batch, list(model.cfg.input_band_names), size)  # a bad tile fails here, in one line
        embeddings.append(predict_batches(model, images, batch_size, band_idx=idx)[1].astype(np.float16))
        for path in batch:
            with rasterio.open(path) as src:
                b = src.bounds
                rows.append({"scene": path, "row": 0, "col": 0, "size": src.width,
                             "crs": src.crs.to_wkt() if src.crs else None,
                             "xmin": b.left, "ymin": b.bottom, "xmax": b.right, "ymax": b.top})
    return Index(pd.DataFrame(rows, columns=META_COLUMNS), np.concatenate(embeddings), None)


def rank(embeddings: np.ndarray, query: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosine scores of the ``top`` windows nearest ``query`` (exact, chunked), best first."""
    query = np.asarray(query, np.float32).ravel()
    best_i, best_s = np.zeros(0, np.int64), np.zeros(0, np.float32)
    for start in range(0, len(embeddings), CHUNK):
        scores = embeddings[start:start + CHUNK].astype(np.float32) @ query
        k = min(top, len(scores))
        pick = np.argpartition(-scores, k - 1)[:k]
        best_i = np.concatenate([best_i, pick + start])
        best_s = np.concatenate([best_s, scores[pick]])
        keep = np.argsort(-best_s, kind="stable")[:top]
        best_i, best_s = best_i[keep], best_s[keep]
    return best_i, best_s


def _wgs84(row: pd.Series) -> dict:
    """A hit's footprint as a GeoJSON polygon in WGS84 longitude/latitude."""
    ring = [[row.xmin, row.ymin], [row.xmax, row.ymin], [row.xmax, row.ymax], [row.xmin, row.ymax],
            [row.xmin, row.ymin]]
    geom = {"type": "Polygon", "coordinates": [ring]}
    if row.crs is None:
        raise GeoclipError(f"{row.scene}: no CRS; a hit cannot be placed on the map")
    return transform_geom(CRS.from_wkt(row.crs), "EPSG:4326", geom)


def _rgb(row: pd.Series) -> np.ndarray | None:
    """A hit's window as a stretched true-colour ``(H, W, 3)`` uint8 image; None when its scene cannot be read."""
    from geoclip.scoring.scene_io import gdal_path, scene_env

    try:
        with scene_env(row.scene), rasterio.open(gdal_path(row.scene)) as src:
            names = [d for d in src.descriptions] if any(src.descriptions) else list(ALL_BAND_NAMES)[:src.count]
            bands = [names.index(b) + 1 for b in RGB if b in names]
            if len(bands) != 3:
                return None
            data = src.read(bands, window=Window(int(row.col), int(row.row), int(row.size), int(row.size)))
    except (rasterio.errors.RasterioIOError, GeoclipError):
        return None
    data = data.astype(np.float32)
    lo, hi = np.percentile(data, 2), np.percentile(data, 98)
    return (np.clip((data - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)


def write_mosaic(hits: pd.DataFrame, path: Path, text: str) -> Path:
    """A grid of the hits' true-colour windows, each titled with its rank and score."""
    from geoclip.plots import pyplot, save_png

    plt = pyplot()
    cols = min(5, len(hits))
    rows = math.ceil(len(hits) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, hit in zip(axes.ravel(), hits.itertuples(), strict=False):
        image = _rgb(pd.Series(hit._asdict()))
        if image is not None:
            ax.imshow(image)
        ax.set_title(f"#{hit.rank} {hit.score:.3f}", fontsize=8)
    fig.suptitle(f'"{text}"', fontsize=10)
    return save_png(fig, path)


def _check_top(top: int) -> int:
    """``top`` when it asks for at least one hit."""
    if top < 1:
        raise GeoclipError(f"--top {top}: expected at least 1")
    return top


def search(index, query: np.ndarray, text: str, out_dir: str | Path, top: int = 20,
           mosaic: bool = True, ann=None, nprobe: int = 32) -> pd.DataFrame:
    """Rank ``index`` against a unit query embedding; write ``hits.geojson``, ``hits.csv`` (and ``hits.png``).

    ``index``: an :class:`Index`, or an archive (geoclip.scoring.ann.Archive: vectors memory-mapped, footprints read
    for the hits only). ``ann``: an approximate index over the same embeddings, scanned at ``nprobe``; else exact.
    """
    _check_top(top)
    if query.shape[-1] != index.embeddings.shape[1]:
        raise GeoclipError(f"query embedding width {query.shape[-1]} != the index's {index.embeddings.shape[1]}; "
                           "embed the query with the model that wrote the index")
    if ann is not None:
        from geoclip.scoring import ann as approximate

        ids, sims = approximate.query(ann, query, top, nprobe, embeddings=index.embeddings)
        order, scores = ids[0][ids[0] >= 0], sims[0][ids[0] >= 0]
    else:
        order, scores = rank(index.embeddings, query, top)
    hits = index.rows(order)
    hits.insert(0, "score", scores.astype(float))
    hits.insert(0, "rank", np.arange(1, len(hits) + 1))
    geoms = [_wgs84(h) for _, h in hits.iterrows()]
    centres = np.array([np.mean(g["coordinates"][0][:4], axis=0) for g in geoms]).reshape(-1, 2)
    hits.insert(2, "lon", centres[:, 0])
    hits.insert(3, "lat", centres[:, 1])
    out = Path(out_dir)
    features = [{"type": "Feature", "geometry": g,
                 "properties": {k: (v.item() if hasattr(v, "item") else v) for k, v in h.items() if k != "crs"}}
                for g, (_, h) in zip(geoms, hits.iterrows(), strict=True)]
    # The hits are one set: each file is written to a temporary name and all are renamed only once every one is
    # written, so a failure (a full volume) leaves the previous set whole, never a new GeoJSON beside an old mosaic.
    with contextlib.ExitStack() as renames:
        tmp = renames.enter_context(atomic_path(out / "hits.geojson", "the search hits"))
        tmp.write_text(json.dumps({"type": "FeatureCollection", "query": text, "features": features}, indent=1))
        tmp = renames.enter_context(atomic_path(out / "hits.csv", "the search hits"))
        hits.to_csv(tmp, index=False)
        if mosaic and len(hits):
            write_mosaic(hits, renames.enter_context(atomic_path(out / "hits.png", "the search hits' mosaic")), text)
    return hits


def run_search(params, text: str, index: str | Path | None = None, tiles: str | Path | None = None,
               model_uri: str | None = None, out_dir: str | Path = "search", top: int | None = None,
               mosaic: bool = True) -> pd.DataFrame:
    """``geoclip search``: embed ``text`` with the model that embedded the index (or ``model_uri``), rank windows
    from scoring's GeoParquet files under ``index`` and/or the tiles of ``tiles``, write the hits to ``out_dir``."""
    from geoclip.model.vocab import query_embedding
    from geoclip.registry.models import load_geoclip
    from geoclip.scoring import ann as approximate

    top = _check_top(params.search.top if top is None else top)  # bad input fails before any heavy work
    if index is None and tiles is None:
        raise GeoclipError("search: give --index (scoring's embeddings folder) and/or --tiles (a folder of tiles)")
    archive = None
    if index is not None and not s3.is_s3(str(index)):
        files = _index_files(index)
        if files and (n := approximate.window_count(files)) >= params.search.ann_min_windows:
            if tiles is not None:
                raise GeoclipError(f"{n} windows: an approximate index is kept beside local embeddings only; search "
                                   "a local --index alone (or raise search.ann_min_windows)")
            # A large local archive is never loaded: vectors memory-mapped, footprints read for the hits only.
            folder = Path(index) if Path(index).is_dir() else Path(index).parent
            archive = approximate.open_archive(folder, files, params.search.nlist)
    parts = [read_index(index)] if index is not None and archive is None else []
    recorded = archive.model_uri if archive is not None else parts[0].model_uri if parts else None
    if recorded and model_uri and model_uri != recorded:
        raise GeoclipError(f"{index}: embedded by {recorded}, not {model_uri}; a query must be embedded by the same "
                           "model (omit --model)")
    model = load_geoclip(model_uri or recorded or params.score.model_uri, params)
    query = query_embedding(model, text).detach().float().numpy()  # checks the text before any tile is read
    if archive is not None:
        return search(archive, query, text, out_dir, top=top, mosaic=mosaic, ann=archive.ann,
                      nprobe=params.search.nprobe)
    if tiles is not None:
        parts.append(index_tiles(tiles, model))
    merged = Index(pd.concat([p.meta for p in parts], ignore_index=True),
                   np.concatenate([p.embeddings for p in parts]), recorded)
    if len(merged.embeddings) >= params.search.ann_min_windows:
        raise GeoclipError(f"{len(merged.embeddings)} windows: an approximate index is kept beside local "
                           "embeddings only; search a local --index alone (or raise search.ann_min_windows)")
    return search(merged, query, text, out_dir, top=top, mosaic=mosaic, nprobe=params.search.nprobe)
