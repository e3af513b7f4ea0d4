"""Spectral library and per-class texture generators for synthetic EuroSAT-like land cover.

Generators return *surface* images ``(13, h, w)`` float32 in L1C digital numbers (EuroSAT band order);
sensor effects (noise, blur, quantisation) are added by :func:`sensor`. Every generator works at any
size, so the same code paints a 64 px tile and a 600 px region of a large scene, and fills a :class:`Composition`
(what it painted, in words) for the tile's caption without drawing a random number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.special import expit, ndtri

from geoclip.bands import ALL_BAND_NAMES, BAND_GSD_M
from geoclip.data.synth_calib import ENDMEMBERS, MATERIAL_RULES, TILE_PCS  # re-exported: tx.ENDMEMBERS

N_BANDS = len(ALL_BAND_NAMES)
MAX_DN = 20000
#: Gaussian blur sigma (pixels of 10 m) per band: the MTF at 10 m, and 20 m / 60 m bands resampled to 10 m.
BLUR_SIGMA = np.array([{10: 0.5, 20: 1.4, 60: 3.6}[BAND_GSD_M[b]] for b in ALL_BAND_NAMES], dtype=np.float32)
#: White detector noise (DN) added after the blur in the 10 m bands: real SeaLake dev tiles, nearly featureless,
#: show ~7 DN of pixel-to-pixel noise in B02-B08 (second differences of log DN, 0.008-0.022).
NOISE_10M = np.array([6.0 if BAND_GSD_M[b] == 10 else 0.0 for b in ALL_BAND_NAMES], dtype=np.float32)
#: Fine texture: log-DN standard deviation of (brightness, vegetation density) at the pixel scale, per class, set
#: so that synthetic second differences of log B04 and B08 (and their correlation) approach the real dev tiles'
#: (e.g. Forest 0.037 / 0.059, correlation 0.45: mostly shadow; Pasture 0.042 / 0.042, correlation 0: both).
#: Classes whose generators already draw that detail (crop rows, roofs) get little or none.
#: The third number is the log sd of SPECTRAL_JITTER (below): small over water, whose real tiles are smooth.
FINE_TEXTURE: dict[str, tuple[float, float, float]] = {
    "AnnualCrop": (0.01, 0.01, 0.03), "Forest": (0.06, 0.01, 0.03), "HerbaceousVegetation": (0.06, 0.03, 0.03),
    "Highway": (0.05, 0.0, 0.03), "Industrial": (0.07, 0.03, 0.03), "Pasture": (0.03, 0.03, 0.03),
    "PermanentCrop": (0.0, 0.0, 0.03), "Residential": (0.02, 0.02, 0.03), "River": (0.05, 0.04, 0.03),
    "SeaLake": (0.0, 0.0, 0.005),
}
#: How vegetation density moves each band (log): NIR and red edge up, visible and SWIR down, B01/B10 hardly, B02
#: half (haze adds a constant to blue: real dev tiles' within-tile log std of B02 is 0.12, of B04 0.2+).
VEG_LOADING = np.array([0.0, -0.5, -1, -1, -0.3, 0.7, 1, 1, 1, 0, -1, -1, 1], np.float32)
FINE_SIGMA = 0.7  # pixels: crowns and gaps of 10-20 m
FINE_GAIN = np.float32(2 * np.sqrt(np.pi) * FINE_SIGMA)  # brings blurred white noise back to unit variance


@dataclass
class Composition:
    """What a generator painted, in plain words: each material's share of the area and the shapes it drew.

    The generator knows exactly what a tile shows, which no label of a real tile says; captions built from this
    (``geoclip.data.captions``) teach the class encoder words shared across classes (water, trees, roads).
    """

    shares: dict[str, float] = field(default_factory=dict)  # material -> share of the area (sums to about 1)
    features: list[str] = field(default_factory=list)  # shapes, e.g. "a narrow river", "rectangular fields"

    def add(self, material: str, cover) -> None:
        """Add ``cover`` (a per-pixel 0..1 array, or a share) of ``material`` to the tile's shares."""
        self.shares[material] = self.shares.get(material, 0.0) + float(np.mean(cover))


# ---------------------------------------------------------------- primitives
def noise(rng: np.random.Generator, h: int, w: int, scale: float, k: int | None = None) -> np.ndarray:
    """Smooth value noise, roughly N(0, 1), with features about ``scale`` pixels across; ``k`` independent
    fields ``(k, h, w)`` at once when given."""
    scale = max(float(scale), 1.0)
    grid = rng.standard_normal((*(() if k is None else (k,)), int(h / scale) + 3, int(w / scale) + 3))
    grid = grid.astype(np.float32)
    y = np.arange(h, dtype=np.float32) / scale + rng.uniform(0, 1)
    x = np.arange(w, dtype=np.float32) / scale + rng.uniform(0, 1)
    y0, x0 = y.astype(np.int64), x.astype(np.int64)
    fy, fx = y - y0, x - x0
    fy, fx = (fy * fy * (3 - 2 * fy))[:, None], (fx * fx * (3 - 2 * fx))[None, :]
    cols = grid[..., x0] * (1 - fx) + grid[..., x0 + 1] * fx  # separable: along x on the coarse rows first
    out = cols[..., y0, :] * (1 - fy) + cols[..., y0 + 1, :] * fy
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
def field_background(rng: np.random.Generator, h: int, w: int, low: np.ndarray, high: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Farmland behind a road or river: parcels from bare to lush between two materials, half each on average.

    Returns the image and the per-pixel mask of the green (lusher) parcels.
    """
    p = parcels(rng, h, w, width=rng.uniform(12, 30), length=rng.uniform(20, 60))
    # Four states; the outer two extend past the materials (barer, lusher) with weights that keep the mean.
    states = np.stack([1.5 * low - 0.5 * high, low, high, 1.5 * high - 0.5 * low])
    group = choose(rng, p["n"], [0.2, 0.3, 0.3, 0.2], alpha=2.0)
    return paint(p["label"], jitter(rng, states[group], 0.12)), group[p["label"]] >= 2


def add_fields(comp: Composition, green: np.ndarray, area: np.ndarray) -> None:
    """Farmland's shares: ``area`` (per pixel, what roads or water leave) split into green crops and bare fields."""
    comp.add("green crops", area * green)
    comp.add("bare fields", area * ~green)


def annual_crop(rng: np.random.Generator, h: int, w: int, s: dict, comp: Composition) -> np.ndarray:
    """Rectangular field parcels, each a crop at its own growth stage, with faint sowing stripes."""
    p = parcels(rng, h, w, width=rng.uniform(10, 28), length=rng.uniform(20, 60))
    group = choose(rng, p["n"], [0.25] * 4, alpha=2.0)
    table = jitter(rng, np.stack([s[m] for m in ("bare", "sparse", "growing", "dense")])[group])
    stripes = 1 + 0.04 * np.sin(2 * np.pi * p["su"] / rng.uniform(3, 6))
    add_fields(comp, group[p["label"]] >= 2, np.ones((h, w), np.float32))
    comp.features.append("rectangular fields")
    return paint(p["label"], table) * stripes[None]


def permanent_crop(rng: np.random.Generator, h: int, w: int, s: dict, comp: Composition) -> np.ndarray:
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
    grassy, tree_cover = kind[lab] == 3, np.clip(cover, 0, 1)
    comp.add("trees", tree_cover * ~grassy)
    comp.add("bare soil", (1 - tree_cover) * ~grassy)
    comp.add("green grass", grassy)
    comp.features.append("narrow plots")
    if (kind[lab] == 2).mean() > 0.2:
        comp.features.append("trees in rows")
    return np.where((kind == 3)[lab][None], mixed, mix(soil, trees, cover))


def pasture(rng: np.random.Generator, h: int, w: int, s: dict, comp: Composition) -> np.ndarray:
    """Smooth grassland: a few large parcels of slightly different grass, very little texture."""
    n = 1 + int(rng.poisson(h * w / 36 ** 2))
    lab = voronoi(rng, h, w, n, warp=3)
    # Lushness per parcel around this tile's level (season, grazing); symmetric about 0.5 to keep the class
    # mean, and reaching past the two materials (drier, lusher) as real meadows do.
    f = 0.5 + 0.25 * rng.normal() + 0.35 * rng.normal(size=n)[lab] + 0.05 * noise(rng, h, w, 16)
    dry, lush = (paint(lab, jitter(rng, np.tile(s[m], (n, 1)), 0.1, 0.04)) for m in ("dry", "lush"))
    img = mix(dry, lush, np.clip(f, -0.6, 1.6)) * (1 + 0.01 * noise(rng, h, w, 2))[None]
    hedge_cover = np.zeros((h, w), np.float32)
    if rng.random() < HEDGE_SHARE:  # hedgerows (trees: the Forest crown spectrum) along parcel boundaries
        edge = np.zeros((h, w), bool)
        edge[1:] |= lab[1:] != lab[:-1]
        edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
        keep = rng.random(n * n).reshape(n, n) < 0.7  # some boundaries are fences only
        hedge = ndimage.binary_dilation(edge, iterations=int(rng.integers(0, 2))) & keep[lab, np.roll(lab, 1, 0)]
        hedge_cover = hedge.astype(np.float32) * 0.8
        blend(img, jitter(rng, spectra("Forest")["crown"][None], 0.1)[0], hedge_cover)
        comp.features.append("hedgerows")
    lush_share = np.clip(f, 0, 1)
    comp.add("green grass", lush_share * (1 - hedge_cover))
    comp.add("dry grass", (1 - lush_share) * (1 - hedge_cover))
    comp.add("trees", hedge_cover)
    comp.features.append("large smooth meadows")
    return img


def herbaceous(rng: np.random.Generator, h: int, w: int, s: dict, comp: Composition) -> np.ndarray:
    """Patchy natural vegetation: irregular patches of bare ground, dry and green herbs, relief shading."""
    p = np.clip(rng.dirichlet([2.0, 2.0, 2.0]), 0.01, 0.98)
    z = fractal(rng, h, w, rng.uniform(10, 24))
    t1, t2 = ndtri(p[0]), ndtri(min(p[0] + p[1], 0.99))
    wb, wg = sigmoid((t1 - z) / 0.25), sigmoid((z - t2) / 0.25)
    wd = np.clip(1 - wb - wg, 0, 1)
    bare, dry, green = (jitter(rng, s[m][None], 0.06)[0, :, None, None] for m in ("bare", "dry", "green"))
    img = bare * wb[None] + dry * wd[None] + green * wg[None]
    for material, cover in (("bare soil", wb), ("dry grass", wd), ("green grass", wg)):
        comp.add(material, cover)
    comp.features.append("irregular patches")
    return img * (1 + 0.1 * noise(rng, h, w, 12) + 0.03 * noise(rng, h, w, 2))[None]


def forest(rng: np.random.Generator, h: int, w: int, s: dict, comp: Composition) -> np.ndarray:
    """Closed canopy: crowns a few pixels wide with shadow between, in stands of varying density."""
    sigma = rng.uniform(0.7, 1.3)
    crowns = ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), sigma)
    crowns *= np.float32(2 * np.sqrt(np.pi) * sigma)  # back to unit variance after the blur
    z = 0.8 * crowns + 0.6 * noise(rng, h, w, rng.uniform(8, 20)) + rng.normal(0, 0.5)
    shade, crown = (jitter(rng, s[m][None], 0.05)[0] for m in ("shade", "crown"))
    comp.add("trees", 1.0)
    comp.features.append("a closed canopy")
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


def highway(rng: np.random.Generator, h: int, w: int, s: dict, comp: Composition) -> np.ndarray:
    """One or two straight roads (grey asphalt, grass verges), sometimes a ramp loop, across farmland."""
    bg, green = field_background(rng, h, w, s["field"], s["green"])
    n_roads = 1 if rng.random() < 0.65 else 2
    cover, verge = roads(rng, h, w, n_roads)
    comp.add("roads", cover)
    comp.add("green grass", verge * 0.6 * (1 - cover))
    add_fields(comp, green, (1 - verge * 0.6) * (1 - cover))
    comp.features.append("a straight road" if n_roads == 1 else "two straight roads")
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


def river(rng: np.random.Generator, h: int, w: int, s: dict, comp: Composition) -> np.ndarray:
    """A meandering river with tree-lined banks crossing farmland."""
    bg, green = field_background(rng, h, w, s["field"], s["green"])
    width = rng.uniform(6, 26)
    water, bank = channel(rng, h, w, width)
    comp.add("water", water)
    comp.add("trees", bank * 0.7 * (1 - water))
    add_fields(comp, green, (1 - bank * 0.7) * (1 - water))
    comp.features.append("a narrow winding river" if width < 12 else "a winding river" if width < 20
                         else "a wide winding river")
    bg = mix(bg, jitter(rng, s["green"][None], 0.05)[0], bank * 0.7)
    return mix(bg, jitter(rng, s["water"][None], 0.15, 0.05)[0], water)


def industrial(rng: np.random.Generator, h: int, w: int, s: dict, comp: Composition) -> np.ndarray:
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
    comp.add("buildings", roof)
    comp.add("green grass", green)
    comp.add("pavement", ~roof & ~green)
    comp.features += ["large flat roofs", "car parks"]
    return np.where(green[None], paint(lab, jitter(rng, np.tile(s["vegetation"], (n, 1)))), img)


def residential(rng: np.random.Generator, h: int, w: int, s: dict, comp: Composition) -> np.ndarray:
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
    roofs = paint(hid, jitter(rng, np.tile(s["roof"], (997, 1)), 0.2, 0.06))
    house &= (rng.random(997) < 0.9)[hid]  # some empty plots
    # Gardens: trees and lawns (below 0) to driveways, paved yards and shadow (towards 1), mean 0.35.
    yard = np.clip(0.35 + 0.5 * fractal(rng, h, w, 3, 2), -0.5, 1.2)
    gardens = mix(jitter(rng, s["garden"][None], 0.06)[0], s["street"], yard)
    img = np.where(house[None], roofs, gardens)
    comp.add("buildings", house & ~street)
    comp.add("roads", street)
    comp.add("gardens", ~house & ~street)
    comp.features += ["small houses in rows", "a street grid"]
    return np.where(street[None], jitter(rng, s["street"][None], 0.05)[0][:, None, None], img)


def sea_lake(rng: np.random.Generator, h: int, w: int, s: dict, comp: Composition) -> np.ndarray:
    """Open water, nearly uniform (turbidity varies slowly); sometimes a strip of shore."""
    water = jitter(rng, s["water"][None], 0.05)[0][:, None, None]
    img = water * (1 + 0.012 * noise(rng, h, w, 24) + 0.005 * noise(rng, h, w, 1.5))[None]
    if rng.random() < 0.3:  # about a third of real SeaLake tiles show a little land
        _, v = frame(rng, h, w, spread=0.0)
        edge = v + 2 * noise(rng, h, w, 8) - (0.5 - rng.uniform(0.02, 0.18)) * min(h, w)
        land = s["shore"][:, None, None] * (1 + 0.25 * fractal(rng, h, w, 8))[None]
        shore = sigmoid(2 * edge)
        img = mix(img, land, shore)
        comp.add("land", shore)
        comp.features.append("a strip of shore")
    comp.add("water", 1 - comp.shares.get("land", 0.0))
    comp.features.insert(0, "open water")
    return img


GENERATORS: dict[str, Callable[..., np.ndarray]] = {
    "AnnualCrop": annual_crop, "Forest": forest, "HerbaceousVegetation": herbaceous, "Highway": highway,
    "Industrial": industrial, "Pasture": pasture, "PermanentCrop": permanent_crop, "Residential": residential,
    "River": river, "SeaLake": sea_lake,
}
#: How much of the real between-tile variation (TILE_PCS) to add as whole-tile spectral factors; the rest comes
#: from each generator's own composition changes (tuned so synthetic tile-mean spread matches the real one).
VARIATION_SCALE = 0.8
#: B01 (443 nm, aerosols), B09 (945 nm, water vapour) and B10 (1375 nm, cirrus) see the atmosphere more than the
#: ground: how much of the ground's contrast they keep, and the relative size of their own smooth field (haze,
#: vapour, thin cirrus). Set so synthetic correlations with the other bands approach the real dev tiles'
#: (B10 with B06-B8A 0.08-0.14, B01 with B06-B8A 0.03-0.15, B09 with B06-B07 0.8) and within-tile log std of
#: B10 (0.09: about 1 DN of 12) and B01 (0.05).
GROUND_CONTRAST = {0: 0.6, 8: 1.0, 9: 0.5}
ATMOS_FIELD = {0: (0.01, 32), 8: (0.02, 32), 9: (0.13, 8)}  # relative amplitude, feature size (pixels)
ATMOSPHERIC = tuple(GROUND_CONTRAST)
#: Spectral variation not along the material mixtures (log sd, feature size in pixels), one field per group of
#: bands: real materials are not exact mixtures of a few spectra, so the visible, red edge, NIR and SWIR groups
#: decorrelate a little within a tile (real dev tiles: B05-B11 0.83, B03-B12 0.67), bands within a group hardly
#: (B06-B07 0.96).
SPECTRAL_JITTER_SIZE = 4
#: Real dev Pasture tiles often show hedgerows between fields (bocage); this share of synthetic ones do.
HEDGE_SHARE = 0.5
BAND_GROUP = np.array([-1, 0, 0, 0, 1, 2, 2, 2, 2, -1, 3, 3, 2])  # -1: atmospheric bands, none


def variation(rng: np.random.Generator, cls: str) -> np.ndarray:
    """Whole-tile spectral factors (13,), mean one: a random mix of the class's real between-tile directions."""
    pcs = np.asarray(TILE_PCS[cls]) * VARIATION_SCALE
    return np.exp(rng.standard_normal(len(pcs)) @ pcs - (pcs ** 2).sum(0) / 2).astype(np.float32)


def fine_texture(rng: np.random.Generator, cls: str, h: int, w: int) -> np.ndarray:
    """Multiplicative sub-parcel texture ``(13, h, w)`` of class ``cls`` (its FINE_TEXTURE): see texture_field."""
    return texture_field(rng, FINE_TEXTURE[cls], h, w)


def texture_field(rng: np.random.Generator, texture: tuple[float, float, float], h: int, w: int) -> np.ndarray:
    """Multiplicative sub-parcel texture ``(13, h, w)``, mean about one: brightness (shadows, gaps, single trees,
    cars) and vegetation density (NIR up, visible and SWIR down), each a field a pixel or two across, and a
    little spectral variation per group of bands (SPECTRAL_JITTER_SIZE pixels across); ``texture`` gives their
    log sds (brightness, vegetation, spectral jitter), as in FINE_TEXTURE."""
    bright, veg, amp = texture
    u, v = ndimage.gaussian_filter(rng.standard_normal((2, h, w)).astype(np.float32), (0, FINE_SIGMA, FINE_SIGMA),
                                   truncate=3.0) * FINE_GAIN
    fields = np.concatenate([noise(rng, h, w, SPECTRAL_JITTER_SIZE, BAND_GROUP.max() + 1),
                             np.zeros((1, h, w), np.float32)])[BAND_GROUP]  # the last, zero: atmospheric bands
    loading = veg * VEG_LOADING[:, None, None]
    log = np.float32(amp) * fields
    log += bright * u[None] + loading * v[None]
    log -= ((bright ** 2 + loading ** 2 + amp ** 2 * (BAND_GROUP >= 0)[:, None, None]) / 2).astype(np.float32)
    return np.exp(log, out=log)


def surface(rng: np.random.Generator, cls: str, h: int, w: int, comp: Composition | None = None) -> np.ndarray:
    """One patch of class ``cls``: texture times this patch's spectral variation, ``(13, h, w)`` float32.

    ``comp``: filled with what was painted (:class:`Composition`), for captions.
    """
    img = GENERATORS[cls](rng, h, w, spectra(cls), Composition() if comp is None else comp)
    return finish(rng, img, FINE_TEXTURE[cls], cls)


def finish(rng: np.random.Generator, img: np.ndarray, texture: tuple[float, float, float], cls: str) -> np.ndarray:
    """A painted surface ``img`` (13, h, w) made real: fine ``texture``, smooth atmospheric bands, and class
    ``cls``'s whole-tile spectral variation (shared by the ten classes and synth_concepts' concepts)."""
    h, w = img.shape[1:]
    img *= texture_field(rng, texture, h, w)
    for b in ATMOSPHERIC:  # mostly smooth path radiance: the ground's contrast shows only weakly
        mean = img[b].mean()
        amp, size = ATMOS_FIELD[b]
        img[b] = mean * (1 + amp * noise(rng, h, w, size)) + GROUND_CONTRAST[b] * (img[b] - mean)
    img *= variation(rng, cls)[:, None, None]
    return img.astype(np.float32, copy=False)


def sensor(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Add sensor noise and band-dependent blur to ``(..., 13, h, w)`` float DN; return uint16 in 1..MAX_DN.

    Noise before the blur is smoothed with the 20 m and 60 m bands (resampled to 10 m, as in EuroSAT); the 10 m
    bands get their white detector noise after the blur (MTF), as real 10 m pixels show it."""
    sd = img * np.float32(0.004)  # noise grows with signal (shot noise) above a floor (read noise)
    sd += 1.0
    sd *= rng.standard_normal(img.shape, dtype=np.float32)
    img = img + sd
    del sd
    lead = (0,) * (img.ndim - 3)
    for b in range(N_BANDS):
        ndimage.gaussian_filter(img[..., b, :, :], lead + (BLUR_SIGMA[b],) * 2, mode="reflect", truncate=3.0,
                                output=img[..., b, :, :])
        if NOISE_10M[b]:
            img[..., b, :, :] += rng.standard_normal(img[..., b, :, :].shape, dtype=np.float32) * NOISE_10M[b]
    return np.clip(np.rint(img), 1, MAX_DN).astype(np.uint16)
