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
#: STAC ``eo:common_name`` of each band (and the older ``rededge1..3`` / ``narrow_nir`` spellings), for files and
#: catalogues that name bands by what they see rather than by number.
BAND_COMMON_NAMES: dict[str, tuple[str, ...]] = {
    "B01": ("coastal",), "B02": ("blue",), "B03": ("green",), "B04": ("red",),
    "B05": ("rededge071", "rededge1"), "B06": ("rededge075", "rededge2"), "B07": ("rededge078", "rededge3"),
    "B08": ("nir",), "B09": ("nir09", "wvp_band"), "B10": ("cirrus",), "B11": ("swir16",), "B12": ("swir22",),
    "B8A": ("nir08", "narrow_nir", "rededge4"),
}
#: The L2A scene classification layer (20 m): not a spectral band, a per-pixel class used as a mask.
SCL_BAND = "SCL"
#: SCL classes masked by default: no data, saturated or defective, cloud shadow, cloud medium and high
#: probability, thin cirrus.
SCL_MASKED_CLASSES: tuple[int, ...] = (0, 1, 3, 8, 9, 10)

_ALIASES = {alias: band for band, names in BAND_COMMON_NAMES.items() for alias in names} | {"scl": SCL_BAND}


def canonical_band(name: str) -> str | None:
    """``B1``/``b01``/``B8a``/``blue``/``nir08``/``SCL`` -> ``B01``/``B01``/``B8A``/``B02``/``B8A``/``SCL``; None if
    the name is not a Sentinel-2 band."""
    text = name.strip()
    if text.upper().startswith("B") and text[1:].upper().rstrip("A").isdigit():
        digits, a = text[1:].upper().rstrip("A"), text.upper().endswith("A")
        band = f"B{int(digits)}A" if a else f"B{int(digits):02d}"
        return band if band in BAND_WAVELENGTH_NM else None
    return _ALIASES.get(text.lower().replace("-", "").replace(" ", "_"))


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
