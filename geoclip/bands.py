"""Band and class metadata for Sentinel-2 / EuroSAT_MS, kept as data."""

from __future__ import annotations

#: Band order inside EuroSAT_MS GeoTIFFs (B8A comes last, as in the download).
ALL_BAND_NAMES: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07",
    "B08", "B09", "B10", "B11", "B12", "B8A",
)
#: True-colour composite, in display order.
RGB_BANDS: tuple[str, ...] = ("B04", "B03", "B02")
#: Central wavelength in nanometres (Sentinel-2A MSI), for plots and docs.
BAND_WAVELENGTH_NM: dict[str, int] = {
    "B01": 443, "B02": 490, "B03": 560, "B04": 665, "B05": 705, "B06": 740, "B07": 783,
    "B08": 842, "B09": 945, "B10": 1375, "B11": 1610, "B12": 2190, "B8A": 865,
}
#: Native ground sampling distance in metres.
BAND_GSD_M: dict[str, int] = {
    "B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20,
    "B08": 10, "B09": 60, "B10": 60, "B11": 20, "B12": 20, "B8A": 20,
}

#: The ten EuroSAT ground-cover classes, in the dataset's (alphabetical) order.
EUROSAT_CLASSES: tuple[str, ...] = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
    "Pasture", "PermanentCrop", "Residential", "River", "SeaLake",
)
#: Plain-language names used to build text prompts for each class.
EUROSAT_CLASS_DESCRIPTIONS: dict[str, str] = {
    "AnnualCrop": "annual crop land",
    "Forest": "forest",
    "HerbaceousVegetation": "herbaceous vegetation",
    "Highway": "a highway or road",
    "Industrial": "industrial buildings",
    "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land such as orchards or vineyards",
    "Residential": "residential buildings",
    "River": "a river",
    "SeaLake": "a sea or lake",
}


def band_indices(selected: list[str] | tuple[str, ...], available: tuple[str, ...] = ALL_BAND_NAMES) -> list[int]:
    """Return the positions of ``selected`` band names within ``available``."""
    missing = [b for b in selected if b not in available]
    if missing:
        raise ValueError(f"unknown band name(s) {missing}; expected names from {list(available)}")
    return [available.index(b) for b in selected]
