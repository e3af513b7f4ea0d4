"""A scene's quick-look PNG: true colour beside the class map, with the legend and the area table."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling

from geoclip.bands import RGB_BANDS
from geoclip.plots import pyplot, save_png
from geoclip.scoring.blend import NODATA_CLASS, class_colors

MAX_SIZE = 1024  # longest side of each panel, in pixels


def _shape(height: int, width: int, max_size: int = MAX_SIZE) -> tuple[int, int]:
    scale = max(1, math.ceil(max(height, width) / max_size))
    return math.ceil(height / scale), math.ceil(width / scale)


class TrueColour:
    """A true-colour view (B04, B03, B02) averaged down to :data:`MAX_SIZE`, built from the strips scoring reads
    anyway (a second, decimated read of a large scene would decode every block again)."""

    def __init__(self, src, nodata: int = 0):
        names = list(getattr(src, "model_bands", []))
        self.idx = [names.index(b) for b in RGB_BANDS] if all(b in names for b in RGB_BANDS) else None
        self.scale = max(1, math.ceil(max(src.height, src.width) / MAX_SIZE))
        self.width, self.nodata = src.width, nodata
        h, w = math.ceil(src.height / self.scale), math.ceil(src.width / self.scale)
        self.sums, self.counts = np.zeros((3, h, w)), np.zeros((h, w))

    def add(self, row: int, data: np.ndarray) -> None:
        """Fold in scene rows ``row..`` (``data``: all bands, full width)."""
        if self.idx is None:
            return
        if self.nodata == 0:  # a nodata pixel is 0 in every band, so its true colour adds nothing as it is
            valid = np.bitwise_or.reduce(data, axis=0) != 0
            rgb = data[self.idx]
        else:
            valid = np.any(data != self.nodata, axis=0)
            rgb = data[self.idx] * valid
        # Integer sums, rows first (whole rows at a time), then the s-fold fewer rows in groups of columns.
        first = row // self.scale
        rgb, ok = _group_sums(rgb, row % self.scale, self.scale), _group_sums(valid, row % self.scale, self.scale)
        self.sums[:, first:first + ok.shape[0]] += rgb
        self.counts[first:first + ok.shape[0]] += ok

    def image(self) -> np.ndarray | None:
        """``(h, w, 3)`` float 0-1, each band stretched between its 2nd and 98th percentile; nodata white."""
        if self.idx is None:
            return None
        valid = self.counts > 0
        mean = self.sums / np.maximum(self.counts, 1)
        out = np.ones((*self.counts.shape, 3))
        for i in range(3):
            if valid.any():
                lo, hi = np.percentile(mean[i][valid], (2, 98))
                out[..., i] = np.clip((mean[i] - lo) / max(hi - lo, 1), 0, 1)
        out[~valid] = 1.0
        return out


def _group_sums(a: np.ndarray, phase: int, s: int) -> np.ndarray:
    """Sums of ``a`` (``(..., rows, cols)``) over blocks of ``s`` x ``s``, the first block row short by ``phase`` rows
    and the last block column by what the width leaves over."""
    rows, cols = a.shape[-2:]
    padded = np.zeros((*a.shape[:-2], -(-(phase + rows) // s) * s, -(-cols // s) * s), np.uint32)
    padded[..., phase:phase + rows, :cols] = a
    out = padded[..., 0::s, :].copy()  # strided adds: much faster than a reduction over a short axis
    for k in range(1, s):
        out += padded[..., k::s, :]
    return out.reshape(*out.shape[:-1], -1, s).sum(axis=-1)


def tapped(strips: Iterable[tuple[int, np.ndarray]], sink: Callable[[int, np.ndarray], None]
           ) -> Iterator[tuple[int, np.ndarray]]:
    """The scene's strips ``(first row, data)`` as they pass, each also handed to ``sink(row, data)``."""
    for row, data in strips:
        sink(row, data)
        yield row, data


def write_quicklook(classmap: Path, out: Path, class_names: list[str], rgb: np.ndarray | None,
                    summary: dict) -> Path:
    """True colour (if any) beside the class map (from its COG overviews), a legend of the classes present and
    their areas in km² and percent."""
    with rasterio.open(classmap) as src:
        arr = src.read(1, out_shape=_shape(src.height, src.width), resampling=Resampling.nearest)
    n = len(class_names)
    palette = np.ones((256, 4))
    palette[:n, :3] = class_colors(n) / 255.0
    palette[NODATA_CLASS, 3] = 0.0
    plt = pyplot()
    panels = 2 if rgb is not None else 1
    fig, axes = plt.subplots(1, panels + 1, figsize=(5 * panels + 4, 5.2),
                             gridspec_kw={"width_ratios": [1] * panels + [0.8]})
    if rgb is not None:
        axes[0].imshow(rgb, interpolation="nearest")
        axes[0].set_title("true colour (B04, B03, B02)", fontsize=10)
    axes[panels - 1].imshow(palette[arr], interpolation="nearest")
    axes[panels - 1].set_title("class map", fontsize=10)
    for ax in axes:
        ax.set_axis_off()
    classes = summary["classes"]
    total = summary["area_km2"] or 1.0
    order = sorted(range(n), key=lambda i: -classes[class_names[i]]["area_km2"])
    rows = [(i, class_names[i], classes[class_names[i]]["area_km2"]) for i in order if
            classes[class_names[i]]["pixels"]]
    legend = axes[panels]
    for k, (i, name, km2) in enumerate(rows[:20]):
        y = 1 - (k + 1) * 0.045
        legend.add_patch(plt.Rectangle((0, y), 0.06, 0.035, color=palette[i, :3], transform=legend.transAxes))
        legend.text(0.09, y + 0.017, f"{name}", va="center", fontsize=8.5, transform=legend.transAxes)
        legend.text(1.0, y + 0.017, f"{km2:,.2f} km²  {100 * km2 / total:4.1f}%", va="center", ha="right",
                    fontsize=8.5, family="monospace", transform=legend.transAxes)
    legend.set_title(f"{summary['area_km2']:,.2f} km² scored", fontsize=10)
    if len(rows) > 20:
        legend.text(0, 0.02, f"... and {len(rows) - 20} more classes (summary JSON)", fontsize=8,
                    transform=legend.transAxes)
    fig.suptitle(Path(str(summary["scene"])).name, fontsize=11)
    fig.tight_layout()
    return save_png(fig, out, dpi=100)
