"""Figures: matplotlib on its file-only Agg backend, chosen when a figure is first made (never on import), and
PNGs written atomically."""

from __future__ import annotations

from pathlib import Path

from geoclip.ioutils import atomic_path


def pyplot():
    """Matplotlib's pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path, dpi: int = 100, **savefig_kwargs) -> Path:
    """Save ``fig`` as a PNG at ``path`` atomically (temporary name, then rename) and close it."""
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, **savefig_kwargs)
    pyplot().close(fig)
    return Path(path)
