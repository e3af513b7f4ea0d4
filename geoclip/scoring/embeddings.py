"""Window embeddings with their footprints as GeoParquet: what scoring writes and search reads.

One file per scene, one row per scored window: ``scene``, ``row``/``col`` (its top-left pixel), ``size``,
``geometry`` (the window's footprint as a WKB polygon in the scene's CRS), ``bbox`` (GeoParquet 1.1 covering) and
``embedding`` (the unit image embedding, float16). Rows are written in row groups as windows are scored, so memory
follows the batch, not the scene.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from geoclip.errors import GeoclipError

ROW_GROUP = 65_536  # windows per row group: 8 MB of float16 embeddings at D=128
GEOPARQUET_VERSION = "1.1.0"
META_KEY = "geoclip"  # file metadata: the model that embedded the windows, the scene and its CRS as WKT
SUFFIX = "_embeddings.parquet"
META_COLUMNS = ["scene", "row", "col", "size", "crs", "xmin", "ymin", "xmax", "ymax"]


def polygon_wkb(xmin: float, ymin: float, xmax: float, ymax: float) -> bytes:
    """An axis-aligned rectangle as little-endian WKB (a closed 5-point polygon ring, counter-clockwise)."""
    ring = [(xmin, ymin), (xmax, ymin), (xmax, ymax), (xmin, ymax), (xmin, ymin)]
    return struct.pack("<BIII", 1, 3, 1, 5) + b"".join(struct.pack("<dd", x, y) for x, y in ring)


def schema(dim: int) -> pa.Schema:
    """The embeddings table's columns."""
    bbox = pa.struct([("xmin", pa.float64()), ("ymin", pa.float64()), ("xmax", pa.float64()), ("ymax", pa.float64())])
    return pa.schema([("scene", pa.string()), ("row", pa.int32()), ("col", pa.int32()), ("size", pa.int32()),
                      ("geometry", pa.binary()), ("bbox", bbox), ("embedding", pa.list_(pa.float16(), dim))])


def geo_metadata(crs) -> dict:
    """GeoParquet ``geo`` metadata for a rasterio CRS (PROJJSON, as the spec asks)."""
    return {"version": GEOPARQUET_VERSION, "primary_column": "geometry",
            "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"],
                                     "crs": crs.to_dict(projjson=True) if crs else None,
                                     "covering": {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}}}}}


class EmbeddingWriter:
    """Collect window embeddings of one scene and write them as a GeoParquet file (temporary name, then renamed)."""

    def __init__(self, path: Path, scene: str, transform, crs, window: int, dim: int, model_uri: str | None = None):
        self.path, self.scene, self.transform, self.window, self.dim = Path(path), scene, transform, window, dim
        # The query must be embedded by the model that embedded the windows: its URI travels with them.
        own = {"model_uri": model_uri, "crs_wkt": crs.to_wkt() if crs else None, "scene": scene}
        self.schema = schema(dim).with_metadata({"geo": json.dumps(geo_metadata(crs)), META_KEY: json.dumps(own)})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")  # renamed by close()
        self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        self._parts: list[tuple[list[tuple[int, int]], np.ndarray]] = []
        self._pending = 0
        self.count = 0

    def add(self, where: list[tuple[int, int]], embeddings: np.ndarray) -> None:
        """Windows' top-left pixels ``(row, col)`` and their embeddings ``(n, D)``."""
        embeddings = np.asarray(embeddings)
        if embeddings.shape != (len(where), self.dim):
            raise GeoclipError(f"model embeddings: shape {embeddings.shape}, expected ({len(where)}, {self.dim})")
        self._parts.append((list(where), embeddings.astype(np.float16)))
        self._pending += len(where)
        if self._pending >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        """Write the collected windows as one row group."""
        if not self._parts:
            return
        where = np.array([w for part, _ in self._parts for w in part], dtype=np.int64).reshape(-1, 2)
        emb = np.concatenate([e for _, e in self._parts])
        a, b, c, d, e, f = self.transform[:6]
        rows, cols = where[:, 0], where[:, 1]
        xs = [c + a * cols + b * rows, c + a * (cols + self.window) + b * (rows + self.window)]
        ys = [f + d * cols + e * rows, f + d * (cols + self.window) + e * (rows + self.window)]
        xmin, xmax = np.minimum(*xs), np.maximum(*xs)
        ymin, ymax = np.minimum(*ys), np.maximum(*ys)
        bbox = pa.StructArray.from_arrays([pa.array(v) for v in (xmin, ymin, xmax, ymax)],
                                          names=["xmin", "ymin", "xmax", "ymax"])
        table = pa.Table.from_arrays([
            pa.array([self.scene] * len(where)), pa.array(rows.astype(np.int32)), pa.array(cols.astype(np.int32)),
            pa.array(np.full(len(where), self.window, np.int32)),
            pa.array([polygon_wkb(*box) for box in zip(xmin, ymin, xmax, ymax, strict=True)], pa.binary()),
            bbox, pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), self.dim)], schema=self.schema)
        self._writer.write_table(table)
        self.count += len(where)
        self._parts, self._pending = [], 0

    def close(self) -> Path:
        """Write what is left and rename the file into place."""
        self._flush()
        self._writer.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the temporary file (scoring failed)."""
        self._writer.close()
        self._tmp.unlink(missing_ok=True)


def own_metadata(schema: pa.Schema) -> dict:
    """geoclip's file metadata (``model_uri``, ``crs_wkt``, ``scene``) of an embeddings file's schema; {} if none."""
    return json.loads((schema.metadata or {}).get(META_KEY.encode(), b"{}"))


def bbox_columns(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``xmin, ymin, xmax, ymax`` of an embeddings table's windows (its ``bbox`` covering column)."""
    return tuple(np.asarray(a) for a in table.column("bbox").combine_chunks().flatten())


def footprints(table: pa.Table, crs_wkt: str | None) -> pd.DataFrame:
    """The windows of an embeddings ``table`` as META_COLUMNS rows."""
    xmin, ymin, xmax, ymax = bbox_columns(table)
    return pd.DataFrame({"scene": table.column("scene").to_pylist(), "row": table.column("row").to_numpy(),
                         "col": table.column("col").to_numpy(), "size": table.column("size").to_numpy(),
                         "crs": crs_wkt, "xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax},
                        columns=META_COLUMNS)
