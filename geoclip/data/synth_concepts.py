"""Land-cover concepts beyond EuroSAT's ten classes, painted from shared materials for a broader synthetic world."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import ndtri

from geoclip.data import synth_textures as tx
from geoclip.data.synth_calib import ENDMEMBERS
from geoclip.data.synth_textures import Composition

# ---------------------------------------------------------------- materials
#: Surface reflectance of clear deep water at the 11 surface bands used below (443, 490, 560, 665, 705, 740, 783,
#: 842, 865, 1610, 2190 nm): typical open-water values (ECOSTRESS / USGS water spectra, 0.5-5 % in the visible,
#: ~0.3 % in the NIR, ~0.1 % in the SWIR).
WATER_REFLECTANCE = np.array([0.05, 0.045, 0.035, 0.015, 0.01, 0.005, 0.004, 0.003, 0.003, 0.001, 0.001])
#: Where each of the 11 surface bands goes among the 13 EuroSAT bands (B01..B08, B8A, B11, B12).
SURFACE_BANDS = np.array([0, 1, 2, 3, 4, 5, 6, 7, 12, 10, 11])
#: L1C DN = PATH_OFFSET + GAIN * 10000 * reflectance. The offset (path radiance) is the calibrated SeaLake water
#: spectrum minus 10000 x WATER_REFLECTANCE, so a published reflectance lands where calibrated dark water does;
#: the gain is one (calibrated bare soil and tree crowns come out at textbook reflectances with it: soil red 0.17,
#: NIR 0.25, SWIR1 0.34; crowns NIR 0.29, SWIR1 0.15) except in the absorption bands: B09 (945 nm, water vapour)
#: keeps 0.28 of the NIR reflectance (calibrated crown, lush grass and bare soil keep 0.24-0.35 of their B8A),
#: B10 (1375 nm, cirrus) 0.003 of the SWIR1 one (calibrated B10 is 8-24 DN everywhere).
_SEALAKE_WATER = np.asarray(ENDMEMBERS["SeaLake"]["water"], np.float64)
GAIN = np.ones(13)
GAIN[8], GAIN[9] = 0.28, 0.003
PATH_OFFSET = _SEALAKE_WATER.copy()
PATH_OFFSET[SURFACE_BANDS] -= 10000 * WATER_REFLECTANCE
PATH_OFFSET[8] -= GAIN[8] * 10000 * WATER_REFLECTANCE[8]
PATH_OFFSET[9] -= GAIN[9] * 10000 * WATER_REFLECTANCE[9]


def toa(reflectance: list[float]) -> np.ndarray:
    """L1C DN spectrum (13,) of a surface reflectance given at the 11 surface bands (see PATH_OFFSET)."""
    r = np.asarray(reflectance, np.float64)
    surf = np.zeros(13)
    surf[SURFACE_BANDS] = r
    surf[8], surf[9] = r[8], r[9]  # 945 nm is on the NIR plateau, 1375 nm near the SWIR1 level
    return (PATH_OFFSET + GAIN * 10000 * surf).astype(np.float32)


def _cal(cls: str, *names: str) -> np.ndarray:
    """A calibrated EuroSAT endmember (the mean of several when more are named)."""
    return np.mean([ENDMEMBERS[cls][n] for n in names], axis=0).astype(np.float32)


_PUBLISHED = ("published (approx.): typical {} reflectance of the USGS splib07 / ECOSTRESS library curves, "
              "recalled to about +-0.03, not read from the library files")
# Reflectances at (443, 490, 560, 665, 705, 740, 783, 842, 865, 1610, 2190 nm): typical values of each material's
# library curves, recalled, not read from the files (no offline copy of the libraries here); converted by toa().
_REFLECTANCE: dict[str, tuple[list[float], str]] = {
    "snow": ([0.92, 0.92, 0.91, 0.89, 0.87, 0.85, 0.83, 0.80, 0.78, 0.08, 0.04], _PUBLISHED.format("snow")),
    "ice": ([0.55, 0.54, 0.50, 0.40, 0.36, 0.32, 0.29, 0.25, 0.23, 0.02, 0.02],
            _PUBLISHED.format("glacier ice")),
    "sand": ([0.12, 0.15, 0.22, 0.30, 0.33, 0.35, 0.37, 0.39, 0.40, 0.52, 0.45],
             _PUBLISHED.format("dry quartz sand")),
    "salt": ([0.55, 0.60, 0.65, 0.68, 0.69, 0.69, 0.69, 0.69, 0.69, 0.60, 0.50],
             _PUBLISHED.format("halite salt crust")),
    "rock": ([0.10, 0.12, 0.15, 0.19, 0.21, 0.22, 0.23, 0.24, 0.24, 0.28, 0.24],
             _PUBLISHED.format("weathered granite / mixed bare rock")),
    "ash": ([0.03, 0.035, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.095, 0.16, 0.15],
            _PUBLISHED.format("burnt ground (char and ash)")),
    "solar panels": ([0.08, 0.07, 0.06, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.06, 0.05],
                     _PUBLISHED.format("photovoltaic panel (glass over silicon)")),
    "reeds": ([0.03, 0.04, 0.07, 0.05, 0.10, 0.22, 0.27, 0.29, 0.30, 0.22, 0.11],
              _PUBLISHED.format("common reed (Phragmites) canopy")),
    "peat": ([0.03, 0.035, 0.045, 0.06, 0.07, 0.08, 0.09, 0.10, 0.105, 0.10, 0.06],
             _PUBLISHED.format("wet dark peat")),
    "moss": ([0.03, 0.04, 0.07, 0.06, 0.10, 0.19, 0.24, 0.26, 0.27, 0.14, 0.06],
             _PUBLISHED.format("Sphagnum moss")),
    "heather": ([0.03, 0.035, 0.05, 0.05, 0.07, 0.12, 0.16, 0.19, 0.20, 0.20, 0.11],
                _PUBLISHED.format("heather (Calluna) dwarf shrub")),
    "gravel": ([0.22, 0.25, 0.29, 0.33, 0.35, 0.36, 0.37, 0.38, 0.38, 0.42, 0.36],
               _PUBLISHED.format("crushed limestone gravel")),
    "turf": ([0.03, 0.04, 0.09, 0.05, 0.12, 0.33, 0.42, 0.45, 0.46, 0.23, 0.11],
             _PUBLISHED.format("irrigated lawn grass")),
    "concrete": ([0.20, 0.23, 0.27, 0.30, 0.31, 0.32, 0.33, 0.34, 0.34, 0.37, 0.33],
                 _PUBLISHED.format("weathered concrete")),
    # Guesses: no library spectrum of these mixtures at 10 m.
    "plastic": ([0.30, 0.33, 0.36, 0.37, 0.38, 0.40, 0.41, 0.42, 0.42, 0.36, 0.26],
                "assumed: whitened greenhouse film over crops (bright, flat, NIR lifted by the plants beneath)"),
    "rails": ([0.06, 0.07, 0.08, 0.09, 0.10, 0.105, 0.11, 0.115, 0.12, 0.14, 0.12],
              "assumed: dark ballast, steel and sleepers, flat and dark"),
    "containers": ([0.10, 0.11, 0.13, 0.16, 0.17, 0.18, 0.19, 0.20, 0.20, 0.22, 0.18],
                   "assumed: painted steel of many colours, averaging to a reddish grey"),
    "running track": ([0.06, 0.06, 0.07, 0.15, 0.17, 0.18, 0.19, 0.20, 0.20, 0.25, 0.22],
                      "assumed: red synthetic running track"),
}
_PETALS = toa([0.50, 0.52, 0.55, 0.55, 0.55, 0.55, 0.55, 0.55, 0.55, 0.40, 0.30])

MATERIALS: dict[str, np.ndarray] = {
    "trees": _cal("Forest", "shade", "crown"),
    "green grass": _cal("Pasture", "lush"),
    "dry grass": _cal("Pasture", "dry"),
    "bare soil": _cal("AnnualCrop", "bare"),
    "green crops": _cal("AnnualCrop", "growing"),
    "bare fields": _cal("AnnualCrop", "sparse"),
    "vines": _cal("PermanentCrop", "trees"),
    "scrub": _cal("HerbaceousVegetation", "green"),
    "gardens": _cal("Residential", "garden"),
    "buildings": _cal("Industrial", "roof"),
    "pavement": _cal("Industrial", "paved"),
    "roads": _cal("Highway", "road"),
    "water": _cal("SeaLake", "water"),
    "turbid water": _cal("River", "water"),
    "mud": _cal("SeaLake", "shore"),
    **{name: toa(r) for name, (r, _) in _REFLECTANCE.items()},
    "blossom": (0.5 * _cal("Forest", "shade", "crown") + 0.5 * _PETALS).astype(np.float32),
    "flooded paddies": (0.6 * _cal("SeaLake", "water") + 0.4 * _cal("AnnualCrop", "growing")).astype(np.float32),
}
MATERIAL_SOURCES: dict[str, str] = {
    "trees": "calibrated: EuroSAT Forest/shade+crown (mean)",
    "green grass": "calibrated: EuroSAT Pasture/lush",
    "dry grass": "calibrated: EuroSAT Pasture/dry",
    "bare soil": "calibrated: EuroSAT AnnualCrop/bare",
    "green crops": "calibrated: EuroSAT AnnualCrop/growing",
    "bare fields": "calibrated: EuroSAT AnnualCrop/sparse",
    "vines": "calibrated: EuroSAT PermanentCrop/trees",
    "scrub": "calibrated: EuroSAT HerbaceousVegetation/green",
    "gardens": "calibrated: EuroSAT Residential/garden",
    "buildings": "calibrated: EuroSAT Industrial/roof",
    "pavement": "calibrated: EuroSAT Industrial/paved",
    "roads": "calibrated: EuroSAT Highway/road",
    "water": "calibrated: EuroSAT SeaLake/water",
    "turbid water": "calibrated: EuroSAT River/water",
    "mud": "calibrated: EuroSAT SeaLake/shore (wet ground at the water's edge)",
    **{name: source for name, (_, source) in _REFLECTANCE.items()},
    "blossom": "assumed: half trees (calibrated), half white petals (flat 0.55, converted by toa)",
    "flooded paddies": "assumed: 0.6 water + 0.4 green crops (both calibrated)",
}

#: Words no concept may use: names of (or synonyms for) EuroSAT's ten classes, so the concepts stay outside them.
FORBIDDEN_WORDS: frozenset[str] = frozenset({
    "forest", "forests", "woods", "woodland", "woodlands", "highway", "highways", "motorway", "motorways",
    "freeway", "freeways", "industrial", "factory", "factories", "warehouse", "warehouses", "pasture", "pastures",
    "meadow", "meadows", "grazing", "residential", "housing", "houses", "homes", "suburb", "suburbs", "suburban",
    "river", "rivers", "stream", "streams", "sea", "seas", "lake", "lakes", "ocean", "oceans", "annual crop",
    "annual crops", "cropland", "arable", "permanent crop", "permanent crops", "orchard", "orchards",
    "herbaceous", "vegetation",
})


# ---------------------------------------------------------------- painting helpers
def spec(rng: np.random.Generator, name: str, bright: float = 0.08, band: float = 0.03) -> np.ndarray:
    """Material ``name``'s spectrum (13,) with this patch's own brightness and per-band jitter."""
    return tx.jitter(rng, MATERIALS[name][None], bright, band)[0].astype(np.float32)


def cells(rng: np.random.Generator, name: str, label: np.ndarray, n: int, bright: float = 0.1) -> np.ndarray:
    """Image (13, h, w) of material ``name`` with its own jittered spectrum in each of ``n`` cells of ``label``."""
    return tx.paint(label, tx.jitter(rng, np.tile(MATERIALS[name], (n, 1)), bright))


def stack(rng: np.random.Generator, comp: Composition, h: int, w: int, layers: list[tuple]) -> np.ndarray:
    """Paint ``layers`` bottom to top and record what shows: each is (material, cover[, look]), covering what is
    below by ``cover`` (0..1, per pixel or constant; the bottom one covers all) with ``look``, a (13,) spectrum
    or (13, h, w) image (default: the material's jittered spectrum). A material's share is what stays visible,
    so the caption's shares are exactly the painted mixture."""
    img = np.zeros((tx.N_BANDS, h, w), np.float32)
    visible = np.ones((h, w), np.float32)
    for i, (name, cover, *look) in enumerate(reversed(layers)):
        shown = visible if i == len(layers) - 1 else visible * np.asarray(cover, np.float32)
        look = look[0] if look and look[0] is not None else spec(rng, name)
        img += (look[:, None, None] if look.ndim == 1 else look) * shown[None]
        comp.add(name, shown)
        visible = visible - shown
    return img


def blobs(rng: np.random.Generator, h: int, w: int, share: float, scale: float, edge: float = 0.15,
          octaves: int = 3) -> np.ndarray:
    """Cover (0..1) of irregular patches about ``scale`` pixels across, ``share`` of the area on average."""
    z = tx.fractal(rng, h, w, scale, octaves) if octaves > 1 else tx.noise(rng, h, w, scale)
    return tx.sigmoid((z - ndtri(1 - np.clip(share, 0.005, 0.995))) / edge)


def rows(coord: np.ndarray, period: float | np.ndarray, fill: float | np.ndarray) -> np.ndarray:
    """Cover (0..1) of rows ``period`` pixels apart filling ``fill`` of the ground; finer than about four pixels,
    rows blur into a striped mixture (mean still ``fill``)."""
    fill = np.asarray(fill, np.float32)
    wave = np.cos(2 * np.pi * coord / period).astype(np.float32)
    sub = fill + 0.8 * np.minimum(fill, 1 - fill) * wave  # unresolved rows: a mixture striped at the period
    d = np.abs((coord / period - np.round(coord / period)) * period)
    return np.where(np.asarray(period) < 4, sub, tx.line_coverage(d, fill * period)).astype(np.float32)


def edges(label: np.ndarray) -> np.ndarray:
    """Boolean map of pixels on the boundary between two cells of ``label``."""
    e = np.zeros(label.shape, bool)
    e[1:] |= label[1:] != label[:-1]
    e[:, 1:] |= label[:, 1:] != label[:, :-1]
    return e


def shade(rng: np.random.Generator, h: int, w: int, scale: float, strength: float) -> np.ndarray:
    """Relief shading factor (1, h, w), mean about one: the slope of a fractal terrain towards the sun."""
    z = tx.fractal(rng, h, w, scale)
    gy, gx = np.gradient(z)
    a = rng.uniform(0, 2 * np.pi)
    slope = (np.cos(a) * gx + np.sin(a) * gy) * scale
    return np.clip(1 + strength * slope, 0.3, 2.0)[None].astype(np.float32)


def radius(rng: np.random.Generator, h: int, w: int, warp: float = 0.15) -> np.ndarray:
    """Distance (pixels) from a point near the centre, stretched into an ellipse and warped by noise."""
    u, v = tx.frame(rng, h, w, spread=0.1)
    r = np.hypot(u, v * rng.uniform(1.0, 1.6))
    return r * (1 + warp * tx.noise(rng, h, w, max(h, w) / 3))


def farmland(rng: np.random.Generator, h: int, w: int, width: float = 20, length: float = 40,
             shares: tuple[float, ...] = (0.4, 0.3, 0.3)) -> tuple[np.ndarray, list[tuple]]:
    """Parcels of green crops, bare fields and green grass: (parcel label, layers for stack())."""
    p = tx.parcels(rng, h, w, width=rng.uniform(0.6, 1.4) * width, length=rng.uniform(0.6, 1.4) * length)
    lab, n = p["label"], p["n"]
    kind = tx.choose(rng, n, list(shares), alpha=3.0)[lab]
    names = ("green crops", "bare fields", "green grass")
    return lab, [(names[0], 1.0, cells(rng, names[0], lab, n, 0.12))] + [
        (m, kind == k, cells(rng, m, lab, n, 0.1)) for k, m in enumerate(names) if k]


# ---------------------------------------------------------------- concepts
def vineyard(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Narrow plots of vine rows over bare soil, some fallow or grassy; sometimes terraced."""
    p = tx.parcels(rng, h, w, width=rng.uniform(8, 18), length=rng.uniform(25, 70))
    lab, n = p["label"], p["n"]
    kind = tx.choose(rng, n, [0.8, 0.1, 0.1], alpha=4.0)[lab]  # vines, fallow soil, grass
    vines = rows(p["su"], rng.uniform(2.2, 3.5, n)[lab], rng.uniform(0.3, 0.55, n)[lab]) * (kind == 0)
    comp.features += ["rows of vines", "narrow plots"]
    img = stack(rng, comp, h, w, [("bare soil", 1.0, cells(rng, "bare soil", lab, n, 0.12)),
                                  ("dry grass", kind == 2, cells(rng, "dry grass", lab, n)),
                                  ("vines", vines, cells(rng, "vines", lab, n, 0.06))])
    if rng.random() < 0.3:  # terraces on a slope: bands of light and shadow across the rows
        _, v = tx.frame(rng, h, w)
        img *= (1 + 0.08 * np.sin(2 * np.pi * v / rng.uniform(5, 9)))[None]
        comp.features.append("terraces on a slope")
    return img


def olive_grove(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Trees in a regular grid over dry grass or ploughed soil, in plots of differing density."""
    p = tx.parcels(rng, h, w, width=rng.uniform(15, 35), length=rng.uniform(20, 50))
    lab, n = p["label"], p["n"]
    period = rng.uniform(2.0, 3.0, n)[lab]
    fill = rng.uniform(0.15, 0.45, n)[lab]
    grid = np.clip(fill + 0.9 * np.minimum(fill, 1 - fill) * np.cos(2 * np.pi * p["su"] / period)
                   * np.cos(2 * np.pi * p["sv"] / period), 0, 1)
    soil = tx.choose(rng, n, [0.5, 0.5], alpha=2.0)[lab] == 1
    comp.features += ["trees in a regular grid", "stony plots"]
    return stack(rng, comp, h, w, [("dry grass", 1.0, cells(rng, "dry grass", lab, n)),
                                   ("bare soil", soil, cells(rng, "bare soil", lab, n)),
                                   ("trees", grid, cells(rng, "trees", lab, n, 0.06))])


def fruit_blossom(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Rows of flowering fruit trees over green grass; a few plots not yet in flower."""
    p = tx.parcels(rng, h, w, width=rng.uniform(12, 30), length=rng.uniform(25, 60))
    lab, n = p["label"], p["n"]
    cover = rows(p["su"], rng.uniform(2.2, 3.5, n)[lab], rng.uniform(0.45, 0.75, n)[lab])
    leafy = tx.choose(rng, n, [0.8, 0.2], alpha=3.0)[lab] == 1
    comp.features += ["rows of flowering trees", "rectangular plots"]
    return stack(rng, comp, h, w, [("green grass", 1.0, cells(rng, "green grass", lab, n)),
                                   ("blossom", cover * ~leafy, cells(rng, "blossom", lab, n, 0.08)),
                                   ("trees", cover * leafy, cells(rng, "trees", lab, n, 0.06))])


def greenhouses(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Blocks of long plastic roofs with narrow access roads, a few open plots of crops or soil."""
    p = tx.parcels(rng, h, w, width=rng.uniform(8, 16), length=rng.uniform(10, 30))
    lab, n = p["label"], p["n"]
    kind = tx.choose(rng, n, [0.75, 0.15, 0.1], alpha=4.0)[lab]  # plastic, soil, crops
    road = (p["su"] < 1.2).astype(np.float32)
    comp.features += ["rows of greenhouses", "narrow access roads"]
    return stack(rng, comp, h, w, [("bare soil", 1.0, cells(rng, "bare soil", lab, n)),
                                   ("green crops", kind == 2, cells(rng, "green crops", lab, n)),
                                   ("plastic", (kind == 0) & (p["sv"] > 0.8), cells(rng, "plastic", lab, n, 0.12)),
                                   ("roads", road)])


def solar_farm(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Blocks of panel rows on grass, gravel tracks between the blocks, grass outside the fence."""
    p = tx.parcels(rng, h, w, width=rng.uniform(15, 30), length=rng.uniform(15, 40))
    r = radius(rng, h, w, 0.05)
    inside = tx.sigmoid((rng.uniform(0.45, 0.9) * max(h, w) - r) * 2)
    track = ((p["su"] < 1.5) | (p["sv"] < 1.5)).astype(np.float32) * inside
    panels = rows(p["su"], rng.uniform(2.0, 2.8), rng.uniform(0.5, 0.75)) * inside
    comp.features += ["rows of panels", "rectangular blocks"]
    grass = "dry grass" if rng.random() < 0.5 else "green grass"
    return stack(rng, comp, h, w, [(grass, 1.0), ("solar panels", panels), ("gravel", track)])


def quarry(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """An open pit of stepped rock faces and gravel benches, sometimes a pond at the bottom, trees around."""
    big = rng.uniform(0.3, 0.5) * min(h, w)
    r = radius(rng, h, w, 0.1) / big
    pit = tx.sigmoid((1 - r) * 12)
    benches = rng.integers(3, 6)
    face = (np.cos(2 * np.pi * r * benches) > 0.3).astype(np.float32) * pit
    pond = tx.sigmoid((rng.uniform(0.2, 0.4) - r) * 20) if rng.random() < 0.5 else np.zeros((h, w), np.float32)
    outside = blobs(rng, h, w, 0.6, 12)
    comp.features += ["an open pit", "stepped terraces"]
    if pond.mean() > 0.01:
        comp.features.append("a pond at the bottom")
    img = stack(rng, comp, h, w, [("green grass", 1.0), ("trees", outside * (1 - pit)), ("gravel", pit),
                                  ("rock", face), ("water", pond)])
    return img * (1 + 0.12 * np.sin(2 * np.pi * r * benches) * pit)[None]  # lit and shaded steps


def beach(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Open water, a long strip of sand, and behind it scrub, trees or seaside buildings."""
    _, v = tx.frame(rng, h, w, spread=0.15)
    v = v + 2 * tx.noise(rng, h, w, 20)
    wet = tx.sigmoid(-v * 1.5)
    sand = tx.sigmoid((rng.uniform(6, 14) - v) * 1.5)
    behind = ("scrub", "trees", "buildings")[int(rng.integers(3))]
    comp.features += ["a long sandy shore", "a straight coastline"]
    back = blobs(rng, h, w, 0.5, 6) if behind == "buildings" else 1.0
    return stack(rng, comp, h, w, [("dry grass", 1.0), (behind, back), ("sand", sand), ("water", wet)])


def dunes(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Wavy dune ridges of bare sand, scrub and dry grass in the hollows."""
    u, _ = tx.frame(rng, h, w)
    phase = 2 * np.pi * (u / rng.uniform(8, 16)) + 1.5 * tx.noise(rng, h, w, 15)
    hollow = tx.sigmoid((-np.sin(phase) - rng.uniform(0.3, 0.9)) * 4) * blobs(rng, h, w, 0.7, 10)
    comp.features += ["wavy dune ridges"]
    img = stack(rng, comp, h, w, [("sand", 1.0), ("dry grass", hollow * 0.6), ("scrub", hollow * 0.5)])
    return img * (1 + 0.12 * np.cos(phase))[None]  # sunlit and shaded flanks


def salt_pan(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """A flat white crust cracked into polygons, with damp mud and shallow brine patches."""
    lab = tx.voronoi(rng, h, w, max(4, h * w // 150), warp=1.0)
    cracks = ndimage.binary_dilation(edges(lab)) if rng.random() < 0.5 else edges(lab)
    wet = blobs(rng, h, w, rng.uniform(0.1, 0.3), 20)
    brine = blobs(rng, h, w, rng.uniform(0.0, 0.15), 25)
    comp.features += ["a flat white crust", "polygon cracks"]
    return stack(rng, comp, h, w, [("salt", 1.0, cells(rng, "salt", lab, lab.max() + 1, 0.04)),
                                   ("mud", np.maximum(wet, cracks * 0.7)), ("turbid water", brine)])


def salt_works(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Rectangular evaporation ponds, clear, turbid or crusted white with salt, between narrow mud dykes."""
    p = tx.parcels(rng, h, w, width=rng.uniform(12, 30), length=rng.uniform(15, 40))
    lab, n = p["label"], p["n"]
    kind = tx.choose(rng, n, [0.35, 0.35, 0.3], alpha=3.0)[lab]
    dyke = ((p["su"] < 1.2) | (p["sv"] < 1.2)).astype(np.float32)
    comp.features += ["rectangular ponds", "narrow dykes"]
    return stack(rng, comp, h, w, [("water", 1.0, cells(rng, "water", lab, n, 0.1)),
                                   ("turbid water", kind == 1, cells(rng, "turbid water", lab, n)),
                                   ("salt", kind == 2, cells(rng, "salt", lab, n, 0.06)), ("mud", dyke)])


def marsh(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Winding channels through reeds, mud flats and wet grass."""
    z = tx.fractal(rng, h, w, rng.uniform(15, 30))
    channels = tx.line_coverage(z * rng.uniform(8, 14), rng.uniform(1.5, 4))
    mud = blobs(rng, h, w, rng.uniform(0.1, 0.3), 10)
    reeds = blobs(rng, h, w, rng.uniform(0.3, 0.6), 14)
    comp.features += ["winding channels", "mud flats"]
    return stack(rng, comp, h, w, [("green grass", 1.0), ("reeds", reeds), ("mud", mud), ("water", channels)])


def reed_bed(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Dense reeds with open pools and a channel, wet grass at the margins."""
    pools = blobs(rng, h, w, rng.uniform(0.05, 0.25), 10)
    channel, _ = tx.channel(rng, h, w, rng.uniform(2, 5))
    margin = blobs(rng, h, w, rng.uniform(0.05, 0.2), 25)
    comp.features += ["dense reeds", "open pools"]
    img = stack(rng, comp, h, w, [("reeds", 1.0), ("green grass", margin), ("water", np.maximum(pools, channel))])
    return img * (1 + 0.05 * tx.noise(rng, h, w, 3))[None]


def peat_bog(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Moss with heather hummocks, small dark pools, sometimes strips of cut peat."""
    heather = blobs(rng, h, w, rng.uniform(0.2, 0.4), 5)
    pools = blobs(rng, h, w, rng.uniform(0.03, 0.12), 4, octaves=1)
    cut = np.zeros((h, w), np.float32)
    comp.features.append("small dark pools")
    if rng.random() < 0.5:
        u, _ = tx.frame(rng, h, w)
        cut = rows(u, rng.uniform(5, 9), 0.5) * blobs(rng, h, w, 0.5, 30)
        comp.features.append("strips of cut peat")
    return stack(rng, comp, h, w, [("moss", 1.0), ("heather", heather), ("peat", cut), ("water", pools)])


def glacier(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """A tongue of ice between rock walls, snow on its upper part, dark moraine stripes and crevasses."""
    u, v = tx.frame(rng, h, w, spread=0.1)
    half = rng.uniform(0.25, 0.4) * min(h, w)
    v = v + 3 * tx.noise(rng, h, w, 20)
    tongue = tx.sigmoid((half - np.abs(v)) * 1.5)
    snow = tx.sigmoid(u / rng.uniform(5, 15) + rng.normal(0, 1)) * tongue
    moraine = tx.line_coverage(v - rng.uniform(-0.3, 0.3) * half, rng.uniform(1.5, 3)) * tongue
    side_snow = blobs(rng, h, w, 0.2, 8) * (1 - tongue)
    comp.features += ["a tongue of ice", "dark moraine stripes", "crevasses"]
    img = stack(rng, comp, h, w, [("rock", 1.0), ("ice", tongue), ("snow", np.maximum(snow, side_snow)),
                                  ("rock", moraine)])
    crevasse = 1 - 0.15 * tongue * (np.cos(2 * np.pi * u / rng.uniform(3, 6)) > 0.7)
    return img * (crevasse * shade(rng, h, w, 20, 0.3)[0])[None]


def snow_field(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Smooth snow slopes with rocky outcrops and, lower down, a few dark trees."""
    rock = blobs(rng, h, w, rng.uniform(0.03, 0.25), 10)
    trees = blobs(rng, h, w, rng.uniform(0.0, 0.12), 4) if rng.random() < 0.5 else np.zeros((h, w), np.float32)
    comp.features += ["smooth snow slopes", "rocky outcrops"]
    img = stack(rng, comp, h, w, [("snow", 1.0), ("rock", rock), ("trees", trees)])
    return img * shade(rng, h, w, 25, 0.25)


def bare_rock(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Rugged rocky slopes and gullies, dry grass in the hollows, a few snow patches."""
    grass = blobs(rng, h, w, rng.uniform(0.05, 0.25), 8)
    snow = blobs(rng, h, w, rng.uniform(0.0, 0.1), 6) if rng.random() < 0.4 else np.zeros((h, w), np.float32)
    comp.features += ["rugged slopes", "gullies"]
    img = stack(rng, comp, h, w, [("rock", 1.0, spec(rng, "rock", 0.15)), ("dry grass", grass), ("snow", snow)])
    return img * shade(rng, h, w, 12, 0.3)


def burnt_area(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """A large dark scar of ash with ragged edges, islands of surviving trees and scrub around."""
    scar = blobs(rng, h, w, rng.uniform(0.4, 0.85), 25, edge=0.3)
    islands = blobs(rng, h, w, rng.uniform(0.05, 0.2), 6)
    around = "trees" if rng.random() < 0.6 else "scrub"
    comp.features += ["a large dark scar", "ragged edges"]
    return stack(rng, comp, h, w, [("dry grass", 1.0), (around, blobs(rng, h, w, 0.6, 10)),
                                   ("ash", scar * (1 - islands))])


def clear_cut(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Dense trees with rectangular cut blocks of bare soil and regrowth, and logging tracks."""
    p = tx.parcels(rng, h, w, width=rng.uniform(15, 35), length=rng.uniform(20, 50))
    lab, n = p["label"], p["n"]
    kind = tx.choose(rng, n, [0.5, 0.3, 0.2], alpha=3.0)[lab]  # standing, cut to soil, regrowing
    _, v = tx.frame(rng, h, w)
    track = tx.line_coverage(v, rng.uniform(1.2, 2))
    comp.features += ["rectangular cut blocks", "a logging track"]
    img = stack(rng, comp, h, w, [("trees", 1.0, cells(rng, "trees", lab, n, 0.06)),
                                  ("bare soil", kind == 1, cells(rng, "bare soil", lab, n, 0.12)),
                                  ("dry grass", kind == 2, cells(rng, "dry grass", lab, n)), ("gravel", track)])
    return img * (1 + 0.06 * tx.noise(rng, h, w, 2) * (kind == 0))[None]  # crowns and gaps


def airport(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """A long concrete runway and a taxiway across mown grass, aprons and terminal buildings beside."""
    _, v = tx.frame(rng, h, w, spread=0.1)
    wr, off = rng.uniform(4, 6), rng.uniform(8, 14)
    runway = tx.line_coverage(v, wr)
    taxi = tx.line_coverage(v - off, rng.uniform(1.5, 2.5))
    apron = tx.sigmoid((v - off - 2) * 2) * tx.sigmoid((off + rng.uniform(10, 20) - v) * 2)
    terminal = apron * blobs(rng, h, w, 0.35, 5, edge=0.05)
    comp.features += ["a long runway", "a taxiway", "aprons and terminals"]
    return stack(rng, comp, h, w, [("green grass", 1.0), ("dry grass", blobs(rng, h, w, 0.4, 20)),
                                   ("pavement", np.maximum(apron, taxi)), ("buildings", terminal),
                                   ("concrete", runway)])


def port(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Quays along open water, long piers reaching out, stacks of containers and sheds on the land."""
    u, v = tx.frame(rng, h, w, spread=0.1)
    shore = rng.uniform(-0.1, 0.2) * min(h, w)
    land = tx.sigmoid((v - shore) * 2)
    period = rng.uniform(10, 18)
    pier = rows(u, period, rng.uniform(2, 3.5) / period) * tx.sigmoid((v - shore + rng.uniform(10, 25)) * 2)
    sheds = land * tx.sigmoid((v - shore - 8) * 2) * blobs(rng, h, w, 0.35, 6, edge=0.05)
    boxes = land * rows(v, 3.0, 0.55) * tx.sigmoid((v - shore - 3) * 2) * blobs(rng, h, w, 0.5, 10, edge=0.05)
    comp.features += ["long piers", "stacks of containers", "quays"]
    return stack(rng, comp, h, w, [("water", 1.0), ("pavement", np.maximum(land, pier)), ("containers", boxes),
                                   ("buildings", sheds * (1 - boxes))])


def rail_yard(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Bundles of many parallel tracks on gravel, a long depot beside, weedy margins."""
    _, v = tx.frame(rng, h, w, angle=None, spread=0.05)
    half = rng.uniform(0.2, 0.4) * min(h, w)
    yard = tx.sigmoid((half - np.abs(v)) * 2)
    tracks = rows(v, rng.uniform(1.6, 2.2), 0.6) * yard
    depot = tx.line_coverage(v - half - 4, rng.uniform(3, 6))
    comp.features += ["many parallel tracks", "a long depot"]
    return stack(rng, comp, h, w, [("dry grass", 1.0), ("gravel", yard), ("rails", tracks), ("buildings", depot),
                                   ("roads", tx.line_coverage(v + half + 3, 2.0))])


def sports_fields(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Rectangular turf pitches, an oval running track, car parks, a sports hall and trees around."""
    p = tx.parcels(rng, h, w, width=rng.uniform(8, 12), length=rng.uniform(12, 18))
    lab, n = p["label"], p["n"]
    kind = tx.choose(rng, n, [0.6, 0.15, 0.1, 0.15], alpha=4.0)[lab]  # pitch, paved, hall, trees
    inner = (p["su"] > 1) & (p["sv"] > 1)
    r = radius(rng, h, w, 0.0)
    ring = tx.line_coverage(r - rng.uniform(6, 10), 1.5)
    comp.features += ["rectangular pitches", "an oval running track"]
    return stack(rng, comp, h, w, [("green grass", 1.0), ("turf", (kind == 0) & inner),
                                   ("pavement", kind == 1), ("buildings", (kind == 2) & inner),
                                   ("trees", kind == 3), ("running track", ring)])


def golf_course(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Winding turf fairways through rough grass, clumps of trees, small sand bunkers and a pond."""
    fair1, _ = tx.channel(rng, h, w, rng.uniform(5, 9))
    fair2, _ = tx.channel(rng, h, w, rng.uniform(5, 9))
    fairway = np.maximum(fair1, fair2)
    trees = blobs(rng, h, w, rng.uniform(0.15, 0.35), 8) * (1 - fairway)
    bunker = blobs(rng, h, w, 0.04, 2, edge=0.1, octaves=1)
    pond = blobs(rng, h, w, rng.uniform(0, 0.08), 10, edge=0.05)
    comp.features += ["winding fairways", "small sand bunkers", "clumps of trees"]
    return stack(rng, comp, h, w, [("green grass", 1.0), ("turf", fairway), ("trees", trees), ("sand", bunker),
                                   ("water", pond)])


def park(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Lawns with clumps of trees, curving paths and a pond, city blocks at the edges."""
    r = radius(rng, h, w, 0.1)
    city = tx.sigmoid((r - rng.uniform(0.45, 0.7) * max(h, w)) * 1.0)
    trees = blobs(rng, h, w, rng.uniform(0.2, 0.45), 8)
    path = tx.line_coverage(tx.fractal(rng, h, w, 20) * 10, 1.2)
    pond = blobs(rng, h, w, rng.uniform(0.02, 0.12), 12, edge=0.05)
    comp.features += ["curving paths", "a pond", "clumps of trees"]
    return stack(rng, comp, h, w, [("green grass", 1.0), ("trees", trees), ("gravel", path), ("water", pond),
                                   ("buildings", city * blobs(rng, h, w, 0.6, 4, edge=0.05)), ("roads", city * 0.4)])


def cemetery(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """A grid of gravel paths between blocks of grave rows on grass, lines of trees along the paths."""
    p = tx.parcels(rng, h, w, width=rng.uniform(8, 14), length=rng.uniform(8, 16))
    path = ((p["su"] < 1) | (p["sv"] < 1)).astype(np.float32)
    alley = ((p["su"] >= 1) & (p["su"] < 2)).astype(np.float32) * (rng.random() < 0.7)
    graves = rows(p["sv"], 2.2, rng.uniform(0.25, 0.45)) * (1 - path) * (1 - alley)
    comp.features += ["a grid of paths", "rows of graves", "lines of trees"]
    return stack(rng, comp, h, w, [("green grass", 1.0), ("rock", graves), ("gravel", path), ("trees", alley)])


def reservoir(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """A reservoir held by a straight dam wall, a bare drawdown ring at its shore, wooded slopes around."""
    _, v = tx.frame(rng, h, w, spread=0.15)
    dam = rng.uniform(0.2, 0.4) * min(h, w)
    reach = tx.fractal(rng, h, w, 25) + rng.uniform(0.5, 1.8) + (dam - v) / min(h, w)
    upstream = v < dam
    water = tx.sigmoid(reach * 8) * upstream
    ring = tx.sigmoid((reach + rng.uniform(0.15, 0.35)) * 8) * upstream
    wall = tx.line_coverage(v - dam, rng.uniform(1.5, 2.5))
    comp.features += ["a dam wall", "a bare shoreline ring"]
    return stack(rng, comp, h, w, [("trees", 1.0), ("dry grass", blobs(rng, h, w, 0.3, 10)),
                                   ("bare soil", ring), ("water", water), ("concrete", wall)])


def canal(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """A dead-straight canal with towpaths on both banks, a line of trees, through fields."""
    _, layers = farmland(rng, h, w)
    _, v = tx.frame(rng, h, w, spread=0.15)
    width = rng.uniform(2, 6)
    water = tx.line_coverage(v, width)
    paths = tx.line_coverage(np.abs(v) - width / 2 - 0.8, 1.2)
    trees = tx.line_coverage(np.abs(v) - width / 2 - 2.5, 2.0) * (rng.random() < 0.6)
    comp.features += ["a straight canal", "towpaths"]
    return stack(rng, comp, h, w, layers + [("trees", trees), ("gravel", paths), ("water", water)])


def fish_ponds(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Rectangular ponds, clear or green with algae, some drained to mud, between grassy dykes."""
    p = tx.parcels(rng, h, w, width=rng.uniform(14, 30), length=rng.uniform(18, 40))
    lab, n = p["label"], p["n"]
    kind = tx.choose(rng, n, [0.45, 0.4, 0.15], alpha=3.0)[lab]
    dyke = ((p["su"] < 1.5) | (p["sv"] < 1.5)).astype(np.float32)
    trees = dyke * (rng.random(n) < 0.3)[lab]
    comp.features += ["rectangular ponds", "grassy dykes"]
    return stack(rng, comp, h, w, [("water", 1.0, cells(rng, "water", lab, n)),
                                   ("turbid water", kind == 1, cells(rng, "turbid water", lab, n)),
                                   ("mud", kind == 2, cells(rng, "mud", lab, n)), ("green grass", dyke),
                                   ("trees", trees)])


def rice_paddies(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Small flooded plots and green rice between narrow bunds, sometimes terraces following a slope."""
    terraced = rng.random() < 0.4
    p = tx.parcels(rng, h, w, width=rng.uniform(5, 12), length=rng.uniform(10, 25), warp=8.0 * terraced)
    lab, n = p["label"], p["n"]
    green = tx.choose(rng, n, [0.55, 0.45], alpha=2.0)[lab] == 1
    bund = (p["su"] < 0.8).astype(np.float32)
    comp.features += ["small flooded plots", "narrow bunds"] + (["terraces following the slope"] if terraced else [])
    return stack(rng, comp, h, w, [("flooded paddies", 1.0, cells(rng, "flooded paddies", lab, n)),
                                   ("green crops", green, cells(rng, "green crops", lab, n)),
                                   ("green grass", bund)])


def heathland(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Open heather with dry grass patches, sandy tracks and scattered trees."""
    grass = blobs(rng, h, w, rng.uniform(0.1, 0.35), 10)
    track = tx.line_coverage(tx.fractal(rng, h, w, 30) * 12, 1.3)
    trees = blobs(rng, h, w, rng.uniform(0.03, 0.15), 2.5, octaves=1)
    comp.features += ["sandy tracks", "scattered trees"]
    return stack(rng, comp, h, w, [("heather", 1.0), ("dry grass", grass), ("trees", trees), ("sand", track)])


def moorland(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Rolling open slopes of heather and dry grass, dark peat hags, rocky outcrops and small pools."""
    grass = blobs(rng, h, w, rng.uniform(0.2, 0.45), 15)
    peat = blobs(rng, h, w, rng.uniform(0.05, 0.2), 5)
    rock = blobs(rng, h, w, rng.uniform(0.0, 0.1), 6)
    pools = blobs(rng, h, w, rng.uniform(0.0, 0.05), 3, octaves=1)
    comp.features += ["rolling open slopes", "dark peat hags"]
    img = stack(rng, comp, h, w, [("heather", 1.0), ("dry grass", grass), ("peat", peat), ("rock", rock),
                                  ("water", pools)])
    return img * shade(rng, h, w, 30, 0.2)


def sparse_trees(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Single tree crowns scattered over dry or green grassland."""
    density = rng.uniform(0.05, 0.3)
    crowns = blobs(rng, h, w, density, rng.uniform(1.5, 3), edge=0.1, octaves=1)
    grass = blobs(rng, h, w, rng.uniform(0.2, 0.8), 20)
    comp.features += ["scattered single trees"]
    return stack(rng, comp, h, w, [("dry grass", 1.0), ("green grass", grass), ("trees", crowns)])


def hedgerow_farmland(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Small irregular fields of crops, bare ground and grass, each bounded by a hedgerow."""
    lab = tx.voronoi(rng, h, w, 2 + int(h * w / rng.uniform(18, 30) ** 2), warp=2)
    n = int(lab.max()) + 1
    kind = tx.choose(rng, n, [0.4, 0.3, 0.3], alpha=3.0)[lab]
    hedge = edges(lab)
    if rng.random() < 0.5:  # wider hedges (iterations=0 would dilate until nothing changes: all trees)
        hedge = ndimage.binary_dilation(hedge)
    hedge = hedge.astype(np.float32) * 0.9
    comp.features += ["small irregular fields", "hedgerows"]
    return stack(rng, comp, h, w, [("green crops", 1.0, cells(rng, "green crops", lab, n, 0.12)),
                                   ("bare fields", kind == 1, cells(rng, "bare fields", lab, n)),
                                   ("green grass", kind == 2, cells(rng, "green grass", lab, n)),
                                   ("trees", hedge)])


def village(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """A cluster of buildings and gardens where roads meet, in fields."""
    _, layers = farmland(rng, h, w, width=15, length=30)
    r = radius(rng, h, w, 0.2)
    core = tx.sigmoid((rng.uniform(0.2, 0.35) * min(h, w) - r) * 0.4)
    roads = tx.roads(rng, h, w, int(rng.integers(1, 3)), ramps=False)[0]
    lots = tx.parcels(rng, h, w, width=rng.uniform(3, 5), length=rng.uniform(3, 5))
    built = ((lots["su"] > 1) & (lots["sv"] > 1) & (rng.random(lots["n"]) < 0.6)[lots["label"]]).astype(np.float32)
    comp.features += ["a cluster of buildings", "roads meeting in the middle"]
    return stack(rng, comp, h, w, layers + [("gardens", core), ("buildings", core * built),
                                            ("roads", roads * 0.8)])


def city_centre(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Dense blocks of buildings on a street grid, a paved square, a few street trees."""
    p = tx.parcels(rng, h, w, width=rng.uniform(8, 16), length=rng.uniform(8, 20))
    lab, n = p["label"], p["n"]
    street = ((p["su"] < 1.5) | (p["sv"] < 1.5)).astype(np.float32)
    square = ((rng.random(n) < 0.1)[lab]).astype(np.float32)
    court = ((p["su"] > 0.4 * p["sw"]) & (p["su"] < 0.6 * p["sw"])).astype(np.float32) * 0.5
    trees = street * blobs(rng, h, w, 0.15, 3, edge=0.1)
    comp.features += ["dense blocks", "a street grid"] + (["a square"] if square.mean() > 0.02 else [])
    return stack(rng, comp, h, w, [("buildings", 1.0, cells(rng, "buildings", lab, n, 0.15)),
                                   ("pavement", np.maximum(square, court)), ("roads", street), ("trees", trees)])


def small_island(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """A small island in open water: a sandy rim around trees and scrub."""
    big = rng.uniform(0.15, 0.35) * min(h, w)
    r = radius(rng, h, w, 0.25) / big
    land = tx.sigmoid((1 - r) * 10)
    inner = tx.sigmoid((rng.uniform(0.6, 0.85) - r) * 10)
    comp.features += ["a small island", "a sandy rim"]
    return stack(rng, comp, h, w, [("water", 1.0), ("sand", land), ("scrub", inner),
                                   ("trees", inner * blobs(rng, h, w, 0.6, 5))])


def flooded_fields(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Fields under floodwater in the low ground, hedge lines and tree tops showing through."""
    lab, layers = farmland(rng, h, w)
    flood = blobs(rng, h, w, rng.uniform(0.3, 0.8), 30, edge=0.2)
    hedge = edges(lab).astype(np.float32) * 0.8 * (rng.random() < 0.6)
    comp.features += ["fields under water", "hedge lines showing through"]
    return stack(rng, comp, h, w, layers + [("turbid water", flood), ("trees", hedge)])


def allotments(rng: np.random.Generator, h: int, w: int, comp: Composition) -> np.ndarray:
    """Tiny plots of vegetables, bare beds and lawns with garden sheds, along grass paths."""
    p = tx.parcels(rng, h, w, width=rng.uniform(3, 5), length=rng.uniform(3, 6))
    lab, n = p["label"], p["n"]
    kind = tx.choose(rng, n, [0.35, 0.35, 0.3], alpha=5.0)[lab]
    shed = ((rng.random(n) < 0.2)[lab] & (p["su"] > 0.5 * p["sw"]) & (p["sv"] < 1.5)).astype(np.float32)
    path = (p["su"] < 0.6).astype(np.float32)
    comp.features += ["tiny plots", "garden sheds"]
    return stack(rng, comp, h, w, [("green crops", 1.0, cells(rng, "green crops", lab, n, 0.15)),
                                   ("bare soil", kind == 1, cells(rng, "bare soil", lab, n)),
                                   ("gardens", kind == 2, cells(rng, "gardens", lab, n)),
                                   ("green grass", path), ("buildings", shed)])


@dataclass(frozen=True)
class Concept:
    """A land-cover concept: its label, its words for prompts, its painter, fine texture and borrowed variation."""

    name: str  # CamelCase label written in labels.csv
    wording: str  # plain words for prompts, "a solar farm"
    paint: Callable[[np.random.Generator, int, int, Composition], np.ndarray]  # (13, h, w) surface DN
    texture: tuple[float, float, float]  # (brightness, vegetation, spectral jitter) log sds, as FINE_TEXTURE
    variation: str  # the EuroSAT class whose TILE_PCS between-tile variation it borrows


_GREEN, _ROUGH, _SMOOTH, _BUILT, _WET = (0.03, 0.03, 0.03), (0.05, 0.02, 0.03), (0.01, 0.01, 0.01), \
    (0.03, 0.02, 0.03), (0.02, 0.02, 0.01)
CONCEPTS: dict[str, Concept] = {c.name: c for c in (
    Concept("Vineyard", "vineyards", vineyard, (0.02, 0.02, 0.03), "PermanentCrop"),
    Concept("OliveGrove", "olive groves", olive_grove, (0.03, 0.02, 0.03), "PermanentCrop"),
    Concept("FruitBlossom", "fruit trees in blossom", fruit_blossom, (0.02, 0.02, 0.03), "PermanentCrop"),
    Concept("Greenhouses", "greenhouses", greenhouses, _BUILT, "Industrial"),
    Concept("SolarFarm", "a solar farm", solar_farm, _BUILT, "Industrial"),
    Concept("Quarry", "a quarry", quarry, _ROUGH, "HerbaceousVegetation"),
    Concept("Beach", "a beach", beach, _WET, "SeaLake"),
    Concept("Dunes", "sand dunes", dunes, _SMOOTH, "HerbaceousVegetation"),
    Concept("SaltPan", "a salt pan", salt_pan, _SMOOTH, "HerbaceousVegetation"),
    Concept("SaltWorks", "salt evaporation ponds", salt_works, _WET, "SeaLake"),
    Concept("Marsh", "a marsh", marsh, (0.03, 0.03, 0.02), "River"),
    Concept("ReedBed", "reed beds", reed_bed, _GREEN, "Pasture"),
    Concept("PeatBog", "a peat bog", peat_bog, _GREEN, "HerbaceousVegetation"),
    Concept("Glacier", "a glacier", glacier, _ROUGH, "Industrial"),
    Concept("SnowField", "a snow field", snow_field, _SMOOTH, "Industrial"),
    Concept("BareRock", "bare rock", bare_rock, _ROUGH, "HerbaceousVegetation"),
    Concept("BurntArea", "a burnt area", burnt_area, _ROUGH, "Forest"),
    Concept("ClearCut", "a clear-cut", clear_cut, (0.05, 0.02, 0.03), "Forest"),
    Concept("Airport", "an airport", airport, _BUILT, "Highway"),
    Concept("Port", "a port with docks", port, _WET, "Industrial"),
    Concept("RailYard", "a rail yard", rail_yard, _BUILT, "Industrial"),
    Concept("SportsFields", "sports fields", sports_fields, _BUILT, "Residential"),
    Concept("GolfCourse", "a golf course", golf_course, _GREEN, "Pasture"),
    Concept("Park", "a city park", park, _GREEN, "Residential"),
    Concept("Cemetery", "a cemetery", cemetery, _BUILT, "Residential"),
    Concept("Reservoir", "a reservoir behind a dam", reservoir, _WET, "SeaLake"),
    Concept("Canal", "a canal", canal, (0.02, 0.02, 0.03), "AnnualCrop"),
    Concept("FishPonds", "fish ponds", fish_ponds, _WET, "River"),
    Concept("RicePaddies", "rice paddies", rice_paddies, (0.02, 0.02, 0.02), "AnnualCrop"),
    Concept("Heathland", "heathland", heathland, _GREEN, "HerbaceousVegetation"),
    Concept("Moorland", "moorland", moorland, _GREEN, "HerbaceousVegetation"),
    Concept("SparseTrees", "scattered trees on grassland", sparse_trees, _GREEN, "Pasture"),
    Concept("HedgerowFarmland", "small fields with hedgerows", hedgerow_farmland, (0.02, 0.02, 0.03), "AnnualCrop"),
    Concept("Village", "a village", village, _BUILT, "Residential"),
    Concept("CityCentre", "a city centre", city_centre, _BUILT, "Industrial"),
    Concept("SmallIsland", "a small island", small_island, _WET, "SeaLake"),
    Concept("FloodedFields", "flooded farmland", flooded_fields, _WET, "River"),
    Concept("Allotments", "allotment gardens", allotments, _BUILT, "Residential"),
)}


def concept_surface(rng: np.random.Generator, name: str, h: int, w: int,
                    comp: Composition | None = None) -> np.ndarray:
    """One patch of concept ``name`` (13, h, w) float32 DN, as synth_textures.surface makes one of a class."""
    concept = CONCEPTS[name]
    img = concept.paint(rng, h, w, Composition() if comp is None else comp)
    return tx.finish(rng, img, concept.texture, concept.variation)
