"""Spectral library and per-class texture generators for synthetic EuroSAT-like land cover.

Generators return *surface* images ``(13, h, w)`` float32 in L1C digital numbers (EuroSAT band order);
sensor effects (noise, blur, quantisation) are added by :func:`sensor`. Every generator works at any
size, so the same code paints a 64 px tile and a 600 px region of a large scene.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage
from scipy.special import expit, ndtri

from geoclip.bands import ALL_BAND_NAMES, BAND_GSD_M

# ENDMEMBERS, MATERIAL_RULES and TILE_CV were calibrated on the 100 real EuroSAT_MS dev tiles
# (shared/data/eurosat_ms_dev) by geoclip.data.synth.derive_calibration: each class's pixels are split into
# groups along a spectral index (MATERIAL_RULES: name, index, share of pixels, which end), and a group's
# mean spectrum is a material here. Generators give each material, on average, the share of area it had
# in the real tiles, so synthetic class means match real ones. Hard-coded so tests run without real tiles.
MATERIAL_RULES: dict[str, list[tuple]] = {
    "AnnualCrop": [("bare", "ndvi", 0.25, "low"), ("sparse", "ndvi", 0.25, "low"),
                   ("growing", "ndvi", 0.25, "low"), ("dense",)],
    "Forest": [("shade", "nir", 0.5, "low"), ("crown",)],
    "HerbaceousVegetation": [("bare", "ndvi", 1 / 3, "low"), ("dry", "ndvi", 1 / 3, "low"), ("green",)],
    "Highway": [("road", "ndvi", 0.12, "low"), ("field", "ndvi", 0.44, "low"), ("green",)],
    "Industrial": [("vegetation", "ndvi", 0.15, "high"), ("roof", "vis", 0.40, "high"), ("paved",)],
    "Pasture": [("dry", "ndvi", 0.5, "low"), ("lush",)],
    "PermanentCrop": [("soil", "ndvi", 0.3, "low"), ("mixed", "ndvi", 0.4, "low"), ("trees",)],
    "Residential": [("garden", "ndvi", 0.35, "high"), ("roof", "vis", 0.30, "high"), ("street",)],
    "River": [("water", "nir", 0.28, "low"), ("field", "ndvi", 0.36, "low"), ("green",)],
    "SeaLake": [("shore", "nir", 0.03, "high"), ("water",)],
}
ENDMEMBERS: dict[str, dict[str, list[int]]] = {
    "AnnualCrop": {
        "bare": [1501, 1449, 1522, 1975, 2135, 2480, 2808, 2747, 856, 15, 3445, 2491, 3187],
        "sparse": [1360, 1209, 1264, 1381, 1733, 2709, 3206, 3110, 1075, 14, 2694, 1721, 3559],
        "growing": [1206, 921, 908, 568, 1065, 2998, 3941, 3803, 1092, 12, 1425, 680, 4220],
        "dense": [1108, 831, 812, 452, 931, 3286, 4577, 4490, 1530, 12, 1236, 523, 4857],
    },
    "Forest": {
        "shade": [1165, 851, 687, 445, 716, 1756, 2240, 2105, 594, 8, 1184, 504, 2548],
        "crown": [1118, 818, 704, 414, 774, 2392, 3162, 3176, 869, 9, 1524, 587, 3579],
    },
    "HerbaceousVegetation": {
        "bare": [1440, 1338, 1346, 1540, 1714, 2006, 2202, 2172, 1051, 24, 2898, 2064, 2431],
        "dry": [1418, 1167, 1049, 1005, 1293, 1835, 2066, 2062, 984, 22, 2147, 1380, 2316],
        "green": [1174, 927, 857, 777, 1228, 2113, 2483, 2572, 1283, 18, 2258, 1210, 2871],
    },
    "Highway": {
        "road": [1493, 1393, 1299, 1402, 1430, 1762, 1966, 1751, 489, 11, 2113, 1579, 2107],
        "field": [1330, 1110, 1034, 944, 1214, 2095, 2498, 2392, 727, 12, 2006, 1168, 2780],
        "green": [1210, 895, 832, 553, 1011, 2491, 3089, 3094, 956, 15, 1685, 790, 3439],
    },
    "Industrial": {
        "vegetation": [1287, 917, 831, 552, 940, 2285, 2877, 2942, 762, 10, 1587, 799, 3157],
        "roof": [1863, 1919, 1894, 2008, 1976, 2285, 2463, 2341, 630, 12, 2450, 1975, 2569],
        "paved": [1509, 1148, 1019, 941, 1177, 1653, 1868, 1706, 571, 11, 1770, 1257, 2019],
    },
    "Pasture": {
        "dry": [1310, 1040, 974, 757, 1216, 2444, 2915, 2842, 1012, 13, 1988, 1013, 3285],
        "lush": [1146, 862, 844, 488, 1077, 3109, 3914, 3939, 1521, 13, 1830, 808, 4311],
    },
    "PermanentCrop": {
        "soil": [1517, 1451, 1551, 1858, 1996, 2499, 2815, 2690, 805, 14, 3085, 2215, 3068],
        "mixed": [1409, 1215, 1256, 1289, 1625, 2508, 2917, 2807, 858, 14, 2674, 1700, 3197],
        "trees": [1269, 985, 966, 757, 1242, 2524, 3034, 2999, 880, 13, 2169, 1153, 3354],
    },
    "Residential": {
        "garden": [1298, 944, 860, 599, 1065, 2345, 2851, 2920, 953, 13, 1777, 968, 3144],
        "roof": [1435, 1313, 1245, 1259, 1369, 2064, 2362, 2264, 865, 14, 2132, 1547, 2543],
        "street": [1357, 1048, 903, 781, 1043, 1754, 2054, 1847, 663, 12, 1639, 1081, 2238],
    },
    "River": {
        "water": [1209, 919, 750, 481, 469, 506, 544, 381, 247, 9, 259, 143, 506],
        "field": [1277, 1059, 972, 868, 1115, 1853, 2155, 2049, 691, 11, 1764, 1084, 2372],
        "green": [1236, 932, 851, 565, 965, 2340, 2871, 2905, 753, 10, 1596, 766, 3161],
    },
    "SeaLake": {
        "shore": [1297, 1101, 1001, 951, 1017, 1092, 1196, 1119, 242, 8, 385, 230, 1084],
        "water": [1203, 922, 718, 475, 457, 356, 351, 284, 85, 7, 65, 40, 263],
    },
}
#: Between-tile coefficient of variation of tile-mean DN per band (season, illumination, haze, vapour).
TILE_CV: dict[str, list[float]] = {
    "AnnualCrop": [0.13, 0.22, 0.27, 0.55, 0.39, 0.19, 0.2, 0.2, 0.39, 0.18, 0.36, 0.46, 0.19],
    "Forest": [0.06, 0.07, 0.08, 0.12, 0.18, 0.16, 0.18, 0.18, 0.4, 0.11, 0.15, 0.16, 0.18],
    "HerbaceousVegetation": [0.15, 0.17, 0.24, 0.35, 0.25, 0.21, 0.22, 0.22, 0.29, 0.39, 0.29, 0.38, 0.23],
    "Highway": [0.08, 0.12, 0.14, 0.26, 0.19, 0.18, 0.18, 0.19, 0.42, 0.57, 0.2, 0.24, 0.18],
    "Industrial": [0.11, 0.15, 0.21, 0.25, 0.23, 0.21, 0.21, 0.22, 0.3, 0.15, 0.24, 0.27, 0.22],
    "Pasture": [0.15, 0.14, 0.09, 0.18, 0.1, 0.12, 0.14, 0.15, 0.32, 0.12, 0.17, 0.2, 0.13],
    "PermanentCrop": [0.12, 0.18, 0.21, 0.28, 0.2, 0.11, 0.11, 0.11, 0.19, 0.18, 0.17, 0.24, 0.1],
    "Residential": [0.07, 0.08, 0.12, 0.18, 0.17, 0.17, 0.17, 0.18, 0.47, 0.35, 0.2, 0.27, 0.17],
    "River": [0.04, 0.06, 0.09, 0.11, 0.15, 0.21, 0.23, 0.22, 0.27, 0.23, 0.21, 0.23, 0.23],
    "SeaLake": [0.15, 0.22, 0.37, 0.56, 0.6, 0.52, 0.55, 0.56, 0.3, 0.18, 0.58, 0.81, 0.55],
}

N_BANDS = len(ALL_BAND_NAMES)
MAX_DN = 20000
#: Gaussian blur sigma (pixels of 10 m) per band: the MTF at 10 m, and 20 m / 60 m bands resampled to 10 m.
BLUR_SIGMA = np.array([{10: 0.5, 20: 0.9, 60: 2.2}[BAND_GSD_M[b]] for b in ALL_BAND_NAMES], dtype=np.float32)


# ---------------------------------------------------------------- primitives
def noise(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Smooth value noise, roughly N(0, 1), with features about ``scale`` pixels across."""
    scale = max(float(scale), 1.0)
    grid = rng.standard_normal((int(h / scale) + 3, int(w / scale) + 3)).astype(np.float32)
    y = np.arange(h, dtype=np.float32) / scale + rng.uniform(0, 1)
    x = np.arange(w, dtype=np.float32) / scale + rng.uniform(0, 1)
    y0, x0 = y.astype(np.int64), x.astype(np.int64)
    fy, fx = y - y0, x - x0
    fy, fx = (fy * fy * (3 - 2 * fy))[:, None], (fx * fx * (3 - 2 * fx))[None, :]
    cols = grid[:, x0] * (1 - fx) + grid[:, x0 + 1] * fx  # separable: along x on the coarse rows first
    out = cols[y0] * (1 - fy) + cols[y0 + 1] * fy
    return out / np.float32(0.743)  # 0.743: std of smoothstep-interpolated N(0, 1)


def fractal(rng: np.random.Generator, h: int, w: int, scale: float, octaves: int = 3) -> np.ndarray:
    """Sum of noise octaves (each half the scale and amplitude), roughly N(0, 1)."""
    amps = [0.5 ** i for i in range(octaves)]
    out = sum(a * noise(rng, h, w, scale * a) for a in amps)
    return out / np.float32(np.sqrt(sum(a * a for a in amps)))


def frame(rng: np.random.Generator, h: int, w: int, angle: float | None = None,
          spread: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates ``(u, v)`` rotated by ``angle`` (random if None) about a point near the centre."""
    a = rng.uniform(0, np.pi) if angle is None else angle
    cy, cx = h / 2 + rng.normal(0, spread * h), w / 2 + rng.normal(0, spread * w)
    y = np.arange(h, dtype=np.float32)[:, None] - np.float32(cy)
    x = np.arange(w, dtype=np.float32)[None, :] - np.float32(cx)
    c, s = np.float32(np.cos(a)), np.float32(np.sin(a))
    return x * c + y * s, -x * s + y * c


def strips(rng: np.random.Generator, coord: np.ndarray, mean: float, spread: float = 0.5):
    """Cut ``coord`` into strips of random width: (strip index, offset inside the strip, strip width)."""
    lo, hi = float(coord.min()), float(coord.max())
    widths = mean * rng.uniform(1 - spread, 1 + spread, int((hi - lo) / (mean * (1 - spread))) + 3)
    starts = lo - rng.uniform(0, widths[0]) + np.concatenate([[0.0], np.cumsum(widths[:-1])])
    idx = np.searchsorted(starts, coord, side="right") - 1
    return idx, (coord - starts[idx]).astype(np.float32), widths[idx].astype(np.float32)


def parcels(rng: np.random.Generator, h: int, w: int, width: float, length: float,
            warp: float = 0.0) -> dict[str, np.ndarray]:
    """Rectangular parcels: strips of ``width`` cut every ``length`` pixels, optionally warped (curvy)."""
    u, v = frame(rng, h, w)
    if warp:
        u = u + warp * noise(rng, h, w, 40)
        v = v + warp * noise(rng, h, w, 40)
    s, su, sw = strips(rng, u, width)
    lengths = length * rng.uniform(0.5, 1.5, s.max() + 1)
    t = v + rng.uniform(0, lengths)[s]
    cell = np.floor(t / lengths[s]).astype(np.int64)
    _, label = np.unique(s * 1_000_003 + cell, return_inverse=True)
    return {"label": label.reshape(h, w), "n": int(label.max()) + 1, "su": su, "sw": sw,
            "sv": (t - cell * lengths[s]).astype(np.float32), "sl": lengths[s].astype(np.float32)}


def voronoi(rng: np.random.Generator, h: int, w: int, n: int, warp: float = 0.0) -> np.ndarray:
    """Label map of ``n`` irregular cells (Voronoi of random seeds, boundaries warped by noise)."""
    y = np.arange(h, dtype=np.float32)[:, None] + np.zeros((1, w), np.float32)
    x = np.arange(w, dtype=np.float32)[None, :] + np.zeros((h, 1), np.float32)
    if warp:
        y, x = y + warp * noise(rng, h, w, 4 * warp), x + warp * noise(rng, h, w, 4 * warp)
    seeds = rng.uniform(0, 1, (n, 2)) * np.array([h, w])
    best, label = np.full((h, w), np.inf, np.float32), np.zeros((h, w), np.int64)
    d, dx = np.empty((h, w), np.float32), np.empty((h, w), np.float32)
    for i, (sy, sx) in enumerate(seeds):  # a loop over seeds keeps memory at a few (h, w) arrays
        np.square(np.subtract(y, np.float32(sy), out=d), out=d)
        d += np.square(np.subtract(x, np.float32(sx), out=dx), out=dx)
        closer = d < best
        np.copyto(best, d, where=closer)
        np.copyto(label, i, where=closer)
    return label


def paint(label: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Image ``(13, h, w)`` with each pixel taking the spectrum ``table[label]``."""
    return np.ascontiguousarray(table.T.astype(np.float32)[:, label])


def mix(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Linear mixture ``a + f (b - a)`` of spectra (or images) with per-pixel fraction ``f``."""
    a = a if a.ndim == 3 else a.astype(np.float32)[:, None, None]
    b = b if b.ndim == 3 else b.astype(np.float32)[:, None, None]
    return a + (b - a) * f[None].astype(np.float32)


def blend(img: np.ndarray, spectrum: np.ndarray, cover: np.ndarray) -> None:
    """Mix ``spectrum`` into ``img`` (13, h, w) in place with per-pixel ``cover``, only where cover > 0."""
    m = cover > 0
    img[:, m] += (spectrum.astype(np.float32)[:, None] - img[:, m]) * cover[m][None]


def lognormal(rng: np.random.Generator, sigma, size) -> np.ndarray:
    """Mean-one multiplicative factors (lognormal with log-std ``sigma``)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    return np.exp(rng.normal(0, 1, size) * sigma - sigma ** 2 / 2)


def jitter(rng: np.random.Generator, base: np.ndarray, bright: float = 0.08, band: float = 0.03) -> np.ndarray:
    """Per-row spectral variation of ``base`` (n, 13): a brightness factor and a small per-band one."""
    n = base.shape[0]
    return base * lognormal(rng, bright, (n, 1)) * lognormal(rng, band, (n, N_BANDS))


def spectra(cls: str) -> dict[str, np.ndarray]:
    """The calibrated material spectra of one class, as float32 arrays."""
    return {k: np.asarray(v, dtype=np.float32) for k, v in ENDMEMBERS[cls].items()}


def class_mean(cls: str) -> np.ndarray:
    """The real class mean spectrum implied by the table: materials weighted by their share of pixels."""
    rules = MATERIAL_RULES[cls]
    shares = [r[2] for r in rules[:-1]]
    shares.append(1 - sum(shares))
    return sum(w * np.asarray(ENDMEMBERS[cls][r[0]], np.float64) for w, r in zip(shares, rules))


def choose(rng: np.random.Generator, n: int, shares: list[float], alpha: float) -> np.ndarray:
    """Pick a material index for ``n`` parcels; this tile's mix is Dirichlet around ``shares`` (mean kept)."""
    p = rng.dirichlet(alpha * np.asarray(shares))
    return rng.choice(len(shares), size=n, p=p)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, float32."""
    return expit(x).astype(np.float32)


def line_coverage(d: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased cover (0..1) of a line of ``width`` pixels, given distance ``d`` to its centre."""
    return np.clip(width / 2 + 0.5 - np.abs(d), 0, 1).astype(np.float32)


# ---------------------------------------------------------------- class generators
def field_background(rng: np.random.Generator, h: int, w: int, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Farmland behind a road or river: parcels from bare to lush between two materials, half each on average."""
    p = parcels(rng, h, w, width=rng.uniform(12, 30), length=rng.uniform(20, 60))
    # Four states; the outer two extend past the materials (barer, lusher) with weights that keep the mean.
    states = np.stack([1.5 * low - 0.5 * high, low, high, 1.5 * high - 0.5 * low])
    group = choose(rng, p["n"], [0.2, 0.3, 0.3, 0.2], alpha=2.0)
    return paint(p["label"], jitter(rng, states[group], 0.12))


def annual_crop(rng: np.random.Generator, h: int, w: int, s: dict) -> np.ndarray:
    """Rectangular field parcels, each a crop at its own growth stage, with faint sowing stripes."""
    p = parcels(rng, h, w, width=rng.uniform(10, 28), length=rng.uniform(20, 60))
    group = choose(rng, p["n"], [0.25] * 4, alpha=2.0)
    table = jitter(rng, np.stack([s[m] for m in ("bare", "sparse", "growing", "dense")])[group])
    stripes = 1 + 0.04 * np.sin(2 * np.pi * p["su"] / rng.uniform(3, 6))
    return paint(p["label"], table) * stripes[None]


def permanent_crop(rng: np.random.Generator, h: int, w: int, s: dict) -> np.ndarray:
    """Narrow parcels of orchards and vineyards (rows or dot grids of trees over soil), bare and grassy plots."""
    p = parcels(rng, h, w, width=rng.uniform(6, 14), length=rng.uniform(30, 90))
    lab, n = p["label"], p["n"]
    # Parcel kinds: bare soil, dense trees, tree rows over soil, grassy; shares give soil 0.3, trees 0.3, mixed 0.4.
    kind = choose(rng, n, [0.15, 0.15, 0.3, 0.4], alpha=3.0)
    period = rng.uniform(2.5, 5.0, n)[lab]
    rows = np.cos(2 * np.pi * p["su"] / period)
    dots = np.where((rng.random(n) < 0.4)[lab], rows * np.cos(2 * np.pi * p["sv"] / period), rows)
    cover = np.array([0.0, 1.0, 0.5, 0.0], np.float32)[kind][lab] + np.where(kind[lab] == 2, 0.5 * dots, 0)
    soil, trees, mixed = (paint(lab, jitter(rng, np.tile(s[m], (n, 1)), 0.12)) for m in ("soil", "trees", "mixed"))
    return np.where((kind == 3)[lab][None], mixed, mix(soil, trees, cover))


def pasture(rng: np.random.Generator, h: int, w: int, s: dict) -> np.ndarray:
    """Smooth grassland: a few large parcels of slightly different grass, very little texture."""
    n = 1 + int(rng.poisson(h * w / 36 ** 2))
    lab = voronoi(rng, h, w, n, warp=3)
    # Lushness per parcel around this tile's level (season, grazing); symmetric about 0.5 to keep the class
    # mean, and reaching past the two materials (drier, lusher) as real meadows do.
    f = 0.5 + 0.25 * rng.normal() + 0.5 * rng.normal(size=n)[lab] + 0.05 * noise(rng, h, w, 16)
    dry, lush = (paint(lab, jitter(rng, np.tile(s[m], (n, 1)), 0.1, 0.04)) for m in ("dry", "lush"))
    return mix(dry, lush, np.clip(f, -0.6, 1.6)) * (1 + 0.01 * noise(rng, h, w, 2))[None]


def herbaceous(rng: np.random.Generator, h: int, w: int, s: dict) -> np.ndarray:
    """Patchy natural vegetation: irregular patches of bare ground, dry and green herbs, relief shading."""
    p = np.clip(rng.dirichlet([2.0, 2.0, 2.0]), 0.01, 0.98)
    z = fractal(rng, h, w, rng.uniform(10, 24))
    t1, t2 = ndtri(p[0]), ndtri(min(p[0] + p[1], 0.99))
    wb, wg = sigmoid((t1 - z) / 0.25), sigmoid((z - t2) / 0.25)
    wd = np.clip(1 - wb - wg, 0, 1)
    bare, dry, green = (jitter(rng, s[m][None], 0.06)[0, :, None, None] for m in ("bare", "dry", "green"))
    img = bare * wb[None] + dry * wd[None] + green * wg[None]
    return img * (1 + 0.1 * noise(rng, h, w, 12) + 0.03 * noise(rng, h, w, 2))[None]


def forest(rng: np.random.Generator, h: int, w: int, s: dict) -> np.ndarray:
    """Closed canopy: crowns a few pixels wide with shadow between, in stands of varying density."""
    sigma = rng.uniform(0.7, 1.3)
    crowns = ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), sigma)
    crowns *= np.float32(2 * np.sqrt(np.pi) * sigma)  # back to unit variance after the blur
    z = 0.8 * crowns + 0.6 * noise(rng, h, w, rng.uniform(8, 20)) + rng.normal(0, 0.5)
    shade, crown = (jitter(rng, s[m][None], 0.05)[0] for m in ("shade", "crown"))
    return mix(shade, crown, 1.6 * sigmoid(3.0 * z) - 0.3)  # reaches past both means: deep gaps, sunlit tops


def roads(rng: np.random.Generator, h: int, w: int, n: int, ramps: bool = True, with_distance: bool = False):
    """Asphalt and verge cover (0..1) of ``n`` straight roads near the centre, maybe a ramp loop (+ distance)."""
    cover, verge = np.zeros((h, w), np.float32), np.zeros((h, w), np.float32)
    dist = np.full((h, w), np.inf, np.float32)
    for _ in range(n):
        _, v = frame(rng, h, w, spread=0.12)
        if rng.random() < 0.5:  # dual carriageway with a grass median
            wc, gap = rng.uniform(2.0, 3.0), rng.uniform(0.8, 1.6)
            c = np.maximum(line_coverage(v - (wc + gap) / 2, wc), line_coverage(v + (wc + gap) / 2, wc))
            half = wc + gap / 2
        else:
            half = rng.uniform(1.7, 2.7)
            c = line_coverage(v, 2 * half)
        cover, dist = np.maximum(cover, c), np.minimum(dist, np.abs(v))
        verge = np.maximum(verge, line_coverage(v, 2 * half + 3))
    if ramps and rng.random() < 0.3:  # an interchange loop
        r = np.hypot(*np.meshgrid(np.arange(h) - rng.uniform(0.2, 0.8) * h,
                                  np.arange(w) - rng.uniform(0.2, 0.8) * w, indexing="ij"))
        cover = np.maximum(cover, line_coverage(r - rng.uniform(7, 16), 1.8))
    verge = np.clip(verge - cover, 0, 1)
    return (cover, verge, dist) if with_distance else (cover, verge)


def highway(rng: np.random.Generator, h: int, w: int, s: dict) -> np.ndarray:
    """One or two straight roads (grey asphalt, grass verges), sometimes a ramp loop, across farmland."""
    bg = field_background(rng, h, w, s["field"], s["green"])
    cover, verge = roads(rng, h, w, 1 if rng.random() < 0.65 else 2)
    bg = mix(bg, jitter(rng, s["green"][None], 0.05)[0], verge * 0.6)
    return mix(bg, jitter(rng, s["road"][None], 0.06)[0], cover)


def channel(rng: np.random.Generator, h: int, w: int, width: float, with_distance: bool = False):
    """Water cover and bank cover (0..1) of a meandering channel ``width`` pixels wide (+ signed distance)."""
    u, v = frame(rng, h, w, spread=0.1)
    amp1 = rng.uniform(0, min(1.2 * width, 0.2 * min(h, w)))
    lam1, lam2 = width * rng.uniform(10, 20), width * rng.uniform(4, 7)
    ph1, ph2, amp2 = rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi), width * rng.uniform(0, 0.3)
    g = amp1 * np.sin(2 * np.pi * u / lam1 + ph1) + amp2 * np.sin(2 * np.pi * u / lam2 + ph2)
    slope = (amp1 * 2 * np.pi / lam1 * np.cos(2 * np.pi * u / lam1 + ph1)
             + amp2 * 2 * np.pi / lam2 * np.cos(2 * np.pi * u / lam2 + ph2))
    d = (v - g) / np.sqrt(1 + slope ** 2)  # distance to the centreline, to first order
    water = line_coverage(d, width)
    bank = np.clip(line_coverage(d, width + 2 * rng.uniform(1, 3)) - water, 0, 1)
    return (water, bank, d) if with_distance else (water, bank)


def river(rng: np.random.Generator, h: int, w: int, s: dict) -> np.ndarray:
    """A meandering river with tree-lined banks crossing farmland."""
    bg = field_background(rng, h, w, s["field"], s["green"])
    water, bank = channel(rng, h, w, rng.uniform(6, 26))
    bg = mix(bg, jitter(rng, s["green"][None], 0.05)[0], bank * 0.7)
    return mix(bg, jitter(rng, s["water"][None], 0.15, 0.05)[0], water)


def industrial(rng: np.random.Generator, h: int, w: int, s: dict) -> np.ndarray:
    """Large bright rectangular roofs on paved lots and car parks, service roads, a few green plots."""
    p = parcels(rng, h, w, width=rng.uniform(16, 30), length=rng.uniform(16, 36))
    lab, n = p["label"], p["n"]
    a0, b0 = rng.uniform(0.03, 0.2, n), rng.uniform(0.03, 0.2, n)
    a1, b1 = np.minimum(a0 + rng.uniform(0.6, 0.9, n), 0.97), np.minimum(b0 + rng.uniform(0.6, 0.9, n), 0.97)
    fu, fv = p["su"] / p["sw"], p["sv"] / p["sl"]
    street = (p["su"] < 1.5) | (p["sv"] < 1.5)
    green = (rng.random(n) < 0.17)[lab] & ~street
    roof = (fu > a0[lab]) & (fu < a1[lab]) & (fv > b0[lab]) & (fv < b1[lab]) & ~green & ~street
    paved = paint(lab, jitter(rng, np.tile(s["paved"], (n, 1)), 0.08))
    paved *= (1 + 0.06 * np.sin(2 * np.pi * p["sv"] / 2.5))[None]  # rows of parked cars
    img = np.where(roof[None], paint(lab, jitter(rng, np.tile(s["roof"], (n, 1)), 0.2, 0.04)), paved)
    return np.where(green[None], paint(lab, jitter(rng, np.tile(s["vegetation"], (n, 1)))), img)


def residential(rng: np.random.Generator, h: int, w: int, s: dict) -> np.ndarray:
    """Dense small houses in two rows per block along a street grid, with gardens, trees and yards."""
    p = parcels(rng, h, w, width=rng.uniform(9, 14), length=rng.uniform(16, 40), warp=rng.choice([0.0, 3.0]))
    su, sv, sw = p["su"], p["sv"], p["sw"]
    street = (su < 1.4) | (sv < 1.2)
    period, size = rng.uniform(2.5, 3.5), rng.uniform(2.0, 3.0)
    side = (su > 0.5 * sw).astype(np.int64)
    row = np.abs(su - np.where(side == 1, 0.72, 0.3) * sw) < size / 2
    slot = np.floor(sv / period).astype(np.int64)
    house = row & (sv - slot * period < 0.75 * period) & ~street
    hid = (p["label"] * 131 + slot * 7 + side) % 997  # a house id, hashed into a table of roof colours
    roofs = paint(hid, jitter(rng, np.tile(s["roof"], (997, 1)), 0.3, 0.06))
    house &= (rng.random(997) < 0.9)[hid]  # some empty plots
    # Gardens: trees and lawns (below 0) to driveways, paved yards and shadow (towards 1), mean 0.35.
    yard = np.clip(0.35 + 0.5 * fractal(rng, h, w, 3, 2), -0.5, 1.2)
    gardens = mix(jitter(rng, s["garden"][None], 0.06)[0], s["street"], yard)
    img = np.where(house[None], roofs, gardens)
    return np.where(street[None], jitter(rng, s["street"][None], 0.05)[0][:, None, None], img)


def sea_lake(rng: np.random.Generator, h: int, w: int, s: dict) -> np.ndarray:
    """Open water, nearly uniform (turbidity varies slowly); sometimes a strip of shore."""
    water = jitter(rng, s["water"][None], 0.05)[0][:, None, None]
    img = water * (1 + 0.012 * noise(rng, h, w, 24) + 0.005 * noise(rng, h, w, 1.5))[None]
    if rng.random() < 0.3:  # about a third of real SeaLake tiles show a little land
        _, v = frame(rng, h, w, spread=0.0)
        edge = v + 2 * noise(rng, h, w, 8) - (0.5 - rng.uniform(0.02, 0.18)) * min(h, w)
        land = s["shore"][:, None, None] * (1 + 0.25 * fractal(rng, h, w, 8))[None]
        img = mix(img, land, sigmoid(2 * edge))
    return img


GENERATORS: dict[str, Callable[..., np.ndarray]] = {
    "AnnualCrop": annual_crop, "Forest": forest, "HerbaceousVegetation": herbaceous, "Highway": highway,
    "Industrial": industrial, "Pasture": pasture, "PermanentCrop": permanent_crop, "Residential": residential,
    "River": river, "SeaLake": sea_lake,
}
#: How much of the real between-tile variation to add as whole-tile spectral factors; the rest comes from
#: each generator's own composition changes (tuned so synthetic tile-mean spread matches the real one).
VARIATION_SCALE: dict[str, float] = {c: 0.9 for c in GENERATORS}


AEROSOL_CONTRAST = 0.5


def variation(rng: np.random.Generator, cls: str) -> np.ndarray:
    """Whole-tile spectral factors (13,): illumination, season, haze and water vapour differ between tiles."""
    cv = np.asarray(TILE_CV[cls]) * VARIATION_SCALE[cls]
    z = 0.7 * rng.normal() + 0.714 * rng.normal(size=N_BANDS)  # correlated across bands, not identical
    return np.exp(cv * z - cv ** 2 / 2).astype(np.float32)


def surface(rng: np.random.Generator, cls: str, h: int, w: int) -> np.ndarray:
    """One patch of class ``cls``: texture times this patch's spectral variation, ``(13, h, w)`` float32."""
    img = GENERATORS[cls](rng, h, w, spectra(cls))
    # B01 (443 nm, aerosols) is mostly smooth path radiance: the ground's contrast shows only weakly.
    img[0] = img[0].mean() + AEROSOL_CONTRAST * (img[0] - img[0].mean())
    return img * variation(rng, cls)[:, None, None]


def sensor(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Add sensor noise and band-dependent blur to ``(..., 13, h, w)`` float DN; return uint16 in 1..MAX_DN."""
    sd = img * np.float32(0.004)  # noise grows with signal (shot noise) above a floor (read noise)
    sd += 1.0
    sd *= rng.standard_normal(img.shape, dtype=np.float32)
    img = img + sd
    del sd
    lead = (0,) * (img.ndim - 3)
    for b in range(N_BANDS):
        ndimage.gaussian_filter(img[..., b, :, :], lead + (BLUR_SIGMA[b],) * 2, mode="reflect", truncate=3.0,
                                output=img[..., b, :, :])
    return np.clip(np.rint(img), 1, MAX_DN).astype(np.uint16)
