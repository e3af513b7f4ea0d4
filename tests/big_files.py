"""A full Sentinel-2 scene's dimensions at almost no disk cost, for tests that must refuse it without reading it."""

from __future__ import annotations

from pathlib import Path

import rasterio
from rasterio.transform import from_origin

SCENE_SIZE = 10980  # pixels a side of a Sentinel-2 L1C/L2A granule at 10 m


def write_full_scene(path: Path, size: int = SCENE_SIZE, bands: int = 13) -> Path:
    """A ``bands`` x ``size`` x ``size`` uint16 GeoTIFF of zeros: tiled and sparse, so about 4 kB on disk.

    No block is ever written (GDAL's SPARSE_OK), yet reading its pixels allocates the full array (3.1 GB for a
    13-band 10980 x 10980 scene): what a reader that trusts the file would do.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=bands, dtype="uint16",
                       tiled=True, blockxsize=512, blockysize=512, compress="deflate", sparse_ok=True,
                       crs="EPSG:32632", transform=from_origin(500000, 5000000, 10, 10)):
        pass
    return path
