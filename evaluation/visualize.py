"""Evaluation plots (ROC, PRO, score histogram, grids of overlays), drawn on Figure objects (no pyplot
global state). Overlays themselves are drawn by inspection/overlay.py."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

from config import printable
from inspection.overlay import overlay_rgb

_PLOT_POINTS = 2000  # curves are resampled to this many points: pixel curves have millions


@dataclass
class Tile:
    """One overlay in a grid of examples: a (small) photo, its map and mask, and a caption."""

    image_rgb: np.ndarray
    anomaly_map: np.ndarray
    caption: str  # lines of plain text (``drawable``): a photo's name may hold anything a file name can
    gt_mask: np.ndarray | None = None
    highlight: np.ndarray | None = None  # the full-resolution highlighted region, shrunk (see region_at)


def drawable(line: str) -> str:
    """One line of outside text (a photo's name) as matplotlib can draw it: the bytes of a name that is
    not UTF-8, which Python holds as surrogates and matplotlib refuses (TypeError: no report at all),
    and control characters are shown as escapes (``\\xff``, ``\\x1b``), as ``config.printable`` does."""
    return printable(line.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))


def figure_bytes(fig: Figure, image_format: str = "png", dpi: int = 100) -> bytes:
    """A figure encoded as an image file, for writing or for embedding in the HTML report."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=image_format, dpi=dpi)
    return buffer.getvalue()


def _resample(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most _PLOT_POINTS points of a long monotone curve, keeping both ends."""
    if len(x) <= _PLOT_POINTS:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, _PLOT_POINTS).round().astype(int))
    return x[keep], y[keep]


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, float]]) -> Figure:
    """ROC curves, e.g. {"image": (fpr, tpr, auroc), "pixel": (...)}, on one axes."""
    fig = Figure(figsize=(5, 4.5), layout="constrained")
    ax = fig.subplots()
    for name, (fpr, tpr, auroc) in curves.items():
        ax.plot(*_resample(fpr, tpr), lw=2, label=f"{name} (AUROC {auroc:.3f})")
    ax.plot([0, 1], [0, 1], color="0.6", ls=":", label="chance")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def pro_figure(fpr: np.ndarray, pro: np.ndarray, aupro: float, max_fpr: float) -> Figure:
    """PRO against FPR, with the integrated part (FPR <= max_fpr) shaded."""
    fig = Figure(figsize=(5, 4.5), layout="constrained")
    ax = fig.subplots()
    grid = np.linspace(0.0, 1.0, _PLOT_POINTS)
    curve = np.interp(grid, fpr, pro)
    ax.plot(grid, curve, lw=2, color="tab:purple")
    inside = grid <= max_fpr
    ax.fill_between(
        grid[inside], curve[inside], color="tab:purple", alpha=0.2, label=f"AUPRO@{max_fpr:g} = {aupro:.3f}"
    )
    ax.axvline(max_fpr, color="0.4", ls="--", lw=1)
    ax.set(xlabel="false-positive rate (healthy pixels)", ylabel="per-region overlap", title="PRO curve",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def score_histogram_figure(
    good_scores: Sequence[float],
    defect_scores: Sequence[float],
    threshold: float,
    calibration_scores: Sequence[float],
    healthy: tuple[float | None, float | None] = (None, None),
) -> Figure:
    """Test scores of healthy and defective photos, the threshold, and the healthy calibration scores with
    their median and 1-3 sigma marked (``healthy``: median and robust spread, as the model counts sigma)."""
    good, defect, calibration = (
        np.asarray(values, dtype=np.float64) for values in (good_scores, defect_scores, calibration_scores)
    )
    everything = np.concatenate([good, defect, calibration, [threshold]])
    bins = np.linspace(everything.min(), everything.max(), 41)
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.hist(good, bins=bins, color="tab:green", alpha=0.6, label=f"test healthy ({len(good)})")
    ax.hist(defect, bins=bins, color="tab:red", alpha=0.6, label=f"test defective ({len(defect)})")
    if len(calibration):
        ax.hist(calibration, bins=bins, histtype="step", color="0.25", lw=1.5,
                label=f"calibration healthy ({len(calibration)})")
    median, spread = healthy
    if median is not None and spread is not None:
        ax.axvline(median, color="0.25", lw=1)
        top = ax.get_ylim()[1]
        ax.text(median, top, "median", ha="center", va="bottom", color="0.25")
        for k in (1, 2, 3):
            ax.axvline(median + k * spread, color="0.25", lw=1, ls=":")
            ax.text(median + k * spread, top, f"{k}σ", ha="center", va="bottom", color="0.25")
    ax.axvline(threshold, color="black", lw=2.5, ls="--", label=f"threshold {threshold:.3f}")
    ax.set(xlabel="image anomaly score", ylabel="images")
    ax.set_title("Score distribution", pad=16)
    ax.legend(loc="upper right", fontsize=8)
    return fig


def tiles_figure(
    rows: dict[str, Sequence[Tile]],
    threshold: float | None,
    *,
    vmin: float | None = None,
    columns: int = 6,
) -> Figure:
    """A grid of overlays, one titled row per group (e.g. worst false positives / false negatives)."""
    tile_inches = 2.0
    fig = Figure(figsize=(columns * tile_inches, len(rows) * (tile_inches + 0.7)), layout="constrained")
    for subfig, (name, tiles) in zip(np.atleast_1d(fig.subfigures(len(rows), 1)), rows.items()):
        subfig.suptitle(drawable(name), x=0.01, ha="left", fontsize=10, fontweight="bold", parse_math=False)
        axes = subfig.subplots(1, columns, squeeze=False)[0]
        for ax in axes:
            ax.set_axis_off()
        if not tiles:
            axes[0].text(0.0, 0.5, "none", fontsize=10, transform=axes[0].transAxes)
        for ax, tile in zip(axes, tiles):
            ax.imshow(overlay_rgb(tile.image_rgb, tile.anomaly_map, threshold, gt_mask=tile.gt_mask, vmin=vmin,
                                  highlight=tile.highlight))
            # Drawn as written: a name holding "$" is no mathtext, which would fail the figure or garble the name.
            ax.set_title("\n".join(map(drawable, tile.caption.split("\n"))), fontsize=8, parse_math=False)
    return fig
