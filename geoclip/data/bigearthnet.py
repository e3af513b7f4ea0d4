"""BigEarthNet-S2 patches (one GeoTIFF per band, L2A) stacked to 13 bands at 10 m; CORINE labels as EuroSAT classes."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import rasterio

from geoclip.bands import ALL_BAND_NAMES
from geoclip.errors import GeoclipError
from geoclip.ioutils import atomic_path

#: The band L2A products do not have (B10, cirrus, is a top-of-atmosphere band): filled with a constant.
MISSING_BAND = "B10"
#: Default B10 fill: the mean of B10 over the 100 real EuroSAT_MS dev tiles (12.5 digital numbers), rounded.
B10_FILL = 12
LABELS_SUFFIX = "_labels_metadata.json"

#: Each of BigEarthNet's 43 CORINE Land Cover level-3 labels, spelled as its label files spell them, to the EuroSAT
#: class a 64 x 64 px (640 m) window of it looks like, or None where no EuroSAT class fits.
CORINE_TO_EUROSAT: dict[str, str | None] = {
    # 1. Artificial surfaces
    "Continuous urban fabric": "Residential",  # city centres hold shops and offices too, but EuroSAT has no other
    "Discontinuous urban fabric": "Residential",
    "Industrial or commercial units": "Industrial",
    "Road and rail networks and associated land": "Highway",  # railways too: EuroSAT has no rail class
    "Port areas": "Industrial",  # quays, warehouses and container yards: built-up, not housing
    "Airports": None,  # mostly grass and runways: neither Highway nor Industrial
    "Mineral extraction sites": None,
    "Dump sites": None,
    "Construction sites": None,  # bare soil and unfinished buildings
    "Green urban areas": None,  # lawns and trees inside a city: neither Forest nor HerbaceousVegetation alone
    "Sport and leisure facilities": None,  # golf courses, stadiums, campsites
    # 2. Agricultural areas
    "Non-irrigated arable land": "AnnualCrop",
    "Permanently irrigated land": "AnnualCrop",  # irrigated arable land: annual crops
    "Rice fields": "AnnualCrop",  # an annual crop, though flooded part of the year
    "Vineyards": "PermanentCrop",
    "Fruit trees and berry plantations": "PermanentCrop",
    "Olive groves": "PermanentCrop",
    "Pastures": "Pasture",
    "Annual crops associated with permanent crops": None,  # a mix of AnnualCrop and PermanentCrop in one parcel
    "Complex cultivation patterns": None,  # small parcels of annual crops, pasture and permanent crops, mixed
    "Land principally occupied by agriculture, with significant areas of natural vegetation": None,  # a mix
    "Agro-forestry areas": None,  # crops or pasture under open tree cover (montado): a mix
    # 3. Forest and semi-natural areas
    "Broad-leaved forest": "Forest",
    "Coniferous forest": "Forest",
    "Mixed forest": "Forest",
    "Natural grassland": "HerbaceousVegetation",
    "Moors and heathland": "HerbaceousVegetation",  # low heather, gorse and grass: closest to herbaceous cover
    "Sclerophyllous vegetation": None,  # maquis: dense evergreen shrubs up to a few metres, neither class
    "Transitional woodland/shrub": None,  # clear-cuts and regrowth, between Forest and HerbaceousVegetation
    "Beaches, dunes, sands": None,
    "Bare rock": None,
    "Sparsely vegetated areas": None,  # mostly bare ground with scattered plants
    "Burnt areas": None,
    # 4. Wetlands: EuroSAT has no wetland class
    "Inland marshes": None,
    "Peatbogs": None,  # open bog with moss and sparse pines (Finland): neither Forest nor HerbaceousVegetation
    "Salt marshes": None,
    "Salines": None,
    "Intertidal flats": None,
    # 5. Water bodies
    "Water courses": "River",
    "Water bodies": "SeaLake",  # lakes and reservoirs
    "Coastal lagoons": "SeaLake",  # open water behind a barrier: looks like a lake
    "Estuaries": "SeaLake",  # wide open water at the river mouth: a window of it looks like SeaLake, not River
    "Sea and ocean": "SeaLake",
}


class Patch(NamedTuple):
    """A stacked patch: pixels, its 10 m grid and its CORINE labels."""

    pixels: np.ndarray  # (13, H, W) uint16, bands in ALL_BAND_NAMES order
    profile: dict  # GeoTIFF profile of the 10 m grid: crs, transform, width, height, count, dtype
    labels: list[str]  # CORINE level-3 label names


def _band_file(folder: Path, band: str) -> Path:
    """The file of ``band`` in a patch folder: ``<patch>/<patch>_<band>.tif``."""
    return folder / f"{folder.name}_{band}.tif"


def read_labels(folder: str | Path) -> list[str]:
    """The CORINE labels of a patch, from ``<patch>_labels_metadata.json``."""
    path = Path(folder) / f"{Path(folder).name}{LABELS_SUFFIX}"
    if not path.is_file():
        raise GeoclipError(f"{path}: missing; expected the patch's labels as <patch>{LABELS_SUFFIX}")
    try:
        labels = json.loads(path.read_text())["labels"]
    except (ValueError, KeyError, TypeError) as exc:
        raise GeoclipError(f"{path}: expected JSON with a 'labels' list ({exc!r})") from exc
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise GeoclipError(f"{path}: 'labels' is {labels!r}; expected a list of CORINE label names")
    return labels


def read_patch(folder: str | Path, b10_fill: int = B10_FILL) -> Patch:
    """Stack a patch's 12 band files to ``(13, H, W)`` uint16 at 10 m; B10, absent from L2A, is ``b10_fill``.

    Read as scoring reads any per-band product (geoclip.data.product_reader: on the 10 m grid, 20 m and
    60 m bands upsampled bilinearly, as EuroSAT_MS tiles show theirs). A missing band or labels file raises
    GeoclipError naming it.
    """
    from geoclip.data.product_reader import ReadOptions, open_product

    folder = Path(folder)
    if not folder.is_dir():
        raise GeoclipError(f"{folder}: no such folder; expected a BigEarthNet-S2 patch folder")
    for band in ALL_BAND_NAMES:
        if band != MISSING_BAND and not _band_file(folder, band).is_file():
            raise GeoclipError(f"{_band_file(folder, band)}: missing; expected band {band} as <patch>_{band}.tif "
                               "(BigEarthNet-S2 layout)")
    labels = read_labels(folder)
    opts = ReadOptions(band_fill={MISSING_BAND: b10_fill}, mask="none")
    with open_product(str(folder), ALL_BAND_NAMES, opts) as src:
        pixels = src.read()
        profile = {"driver": "GTiff", "crs": src.crs, "transform": src.transform, "width": src.width,
                   "height": src.height, "count": len(ALL_BAND_NAMES), "dtype": "uint16"}
    return Patch(pixels, profile, labels)


def write_stacked_scene(folder: str | Path, out_path: str | Path, b10_fill: int = B10_FILL,
                        band_names: Sequence[str] = ALL_BAND_NAMES) -> Path:
    """Write a patch as one GeoTIFF of ``band_names`` (descriptions set to them), CRS and transform kept, atomically."""
    patch = read_patch(folder, b10_fill)
    unknown = [b for b in band_names if b not in ALL_BAND_NAMES]
    if unknown:
        raise GeoclipError(f"band_names: unknown band(s) {unknown}; expected names from {list(ALL_BAND_NAMES)}")
    pixels = patch.pixels[[ALL_BAND_NAMES.index(b) for b in band_names]]
    profile = patch.profile | {"count": len(band_names), "compress": "deflate"}
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(pixels)
        for i, name in enumerate(band_names, start=1):
            dst.set_band_description(i, name)
        dst.update_tags(source=str(folder), processing_level="L2A", filled=f"{MISSING_BAND}={b10_fill}")
    return out_path


def mapped_labels(labels: Iterable[str]) -> set[str]:
    """The EuroSAT classes of CORINE ``labels`` (labels with no EuroSAT class drop out); an unknown label raises."""
    labels = list(labels)
    unknown = [x for x in labels if x not in CORINE_TO_EUROSAT]
    if unknown:
        raise GeoclipError(f"labels: unknown CORINE label(s) {unknown}; expected BigEarthNet's 43 level-3 names")
    return {CORINE_TO_EUROSAT[x] for x in labels} - {None}
