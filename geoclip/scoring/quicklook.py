"""A scene's quick-look PNG: true colour beside the class map, with the legend and the area table."""

from __future__ import annotations

import math
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


def true_colour(src, nodata: int = 0) -> np.ndarray | None:
    """``(h, w, 3)`` float 0-1 true-colour view of a scene (B04, B03, B02 of the model's bands, averaged down to
    :data:`MAX_SIZE`), stretched between each band's 2nd and 98th percentile; None without those bands."""
    names = list(getattr(src, "model_bands", []))
    if not all(b in names for b in RGB_BANDS):
        return None
    shape = _shape(src.height, src.width)
    rgb = src.read([names.index(b) + 1 for b in RGB_BANDS], out_shape=shape, resampling=Resampling.average)
    valid = np.any(rgb != nodata, axis=0)
    out = np.zeros((*shape, 3))
    if not valid.any():
        return out
    for i in range(3):
        lo, hi = np.percentile(rgb[i][valid], (2, 98))
        out[..., i] = np.clip((rgb[i] - lo) / max(hi - lo, 1), 0, 1)
    out[~valid] = 1.0  # nodata white, as the class map's transparent pixels over a white page
    return out


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
