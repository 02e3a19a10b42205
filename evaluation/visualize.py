"""Heatmap overlays and evaluation plots, drawn on Figure objects (no pyplot global state).

Colour scale of every heatmap: fixed relative to the calibrated threshold, from ``vmin`` (the
healthy calibration mean when the caller knows it, else 0) to threshold + 2 × (threshold − vmin). Heatmaps of
different photos are therefore directly comparable, and the colour's opacity grows with the value,
so a healthy photo (map well below threshold) shows almost no colour.

The contour rule, the same on every photo: white outlines where the anomaly map is above the
threshold (``highlighted_region``). The image score is the map's maximum, so a photo is flagged
exactly when that region is not empty; a region too small to see is ringed by a white circle.
On thumbnails the region is computed at full resolution and shrunk, so it never vanishes.
Magenta outlines the ground truth.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from output_files import write_atomically

CMAP = "jet"
MAX_ALPHA = 0.65  # opacity of the heatmap at the top of the colour scale
THRESHOLD_RGB = (255, 255, 255)
GROUND_TRUTH_RGB = (255, 0, 255)
_PLOT_POINTS = 2000  # curves are resampled to this many points: pixel curves have millions


@dataclass
class Tile:
    """One overlay in a grid of examples: a (small) photo, its map and mask, and a caption."""

    image_rgb: np.ndarray
    anomaly_map: np.ndarray
    caption: str
    gt_mask: np.ndarray | None = None
    highlight: np.ndarray | None = None  # the full-resolution highlighted region, shrunk (see region_at)


def highlighted_region(anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """Where the map is above the threshold: what the white contour outlines on every overlay."""
    return np.asarray(anomaly_map) > threshold


def region_at(region: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A boolean region at another (height, width); when shrinking, a cell is set if any pixel it covers was."""
    height, width = shape[:2]
    if region.shape[:2] == (height, width):
        return region.astype(bool)
    shrinking = height * width < region.shape[0] * region.shape[1]
    resized = cv2.resize(region.astype(np.float32), (width, height),
                         interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_NEAREST)
    return resized > 0


def colour_range(
    threshold: float | None, anomaly_map: np.ndarray, vmin: float | None = None
) -> tuple[float, float]:
    """(low, high) of the colour scale: fixed by the threshold, or the map's own range without one.

    With a threshold the scale runs from ``vmin`` (the healthy mean) to as far above the threshold
    as the threshold is above ``vmin`` twice over, so the threshold sits a third of the way up and a
    clear defect reaches the warm colours; every photo of a model shares the same scale.
    """
    if threshold is None or not np.isfinite(threshold):
        low = float(anomaly_map.min()) if vmin is None else vmin
        high = float(anomaly_map.max())
    else:
        low = 0.0 if vmin is None else vmin
        high = threshold + 2.0 * (threshold - low)
    return low, max(high, low + 1e-6)


def overlay_rgb(
    image_rgb: np.ndarray,
    anomaly_map: np.ndarray,
    threshold: float | None,
    *,
    gt_mask: np.ndarray | None = None,
    vmin: float | None = None,
    highlight: np.ndarray | None = None,
) -> np.ndarray:
    """The photo with the heatmap blended in and the threshold / ground-truth contours drawn.

    Map and masks may have any size; they are resized to the photo, so small evaluation-size maps
    can be drawn on thumbnails. ``highlight`` is the region above the threshold computed at full
    resolution (a shrunk map loses its peak); without it, the region is taken from this map.
    Returns 8-bit RGB at the photo's size.
    """
    height, width = image_rgb.shape[:2]
    values = cv2.resize(np.asarray(anomaly_map, dtype=np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    low, high = colour_range(threshold, values, vmin)
    level = np.clip((values - low) / (high - low), 0.0, 1.0)
    colours = colormaps[CMAP](level)[..., :3].astype(np.float32) * 255.0
    alpha = (MAX_ALPHA * level)[..., None]
    blended = (image_rgb.astype(np.float32) * (1.0 - alpha) + colours * alpha).round().astype(np.uint8)
    thickness = max(1, round(min(height, width) / 200))
    if threshold is not None and np.isfinite(threshold):
        region = highlighted_region(values, threshold) if highlight is None else region_at(highlight, (height, width))
        _draw_contour(blended, region, THRESHOLD_RGB, thickness, ring_small=True)
    if gt_mask is not None:
        mask = cv2.resize(np.asarray(gt_mask).astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
        _draw_contour(blended, mask > 0, GROUND_TRUTH_RGB, thickness)
    return blended


def _draw_contour(
    image: np.ndarray, region: np.ndarray, colour: tuple[int, int, int], thickness: int, ring_small: bool = False
) -> None:
    """Outline a region; with ``ring_small``, also circle every piece smaller than 4 % of the image side."""
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(image, contours, -1, colour, thickness)
    if not ring_small:
        return
    ring = max(6, round(0.04 * min(image.shape[:2])))
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        if max(w, h) < ring:
            cv2.circle(image, (x + w // 2, y + h // 2), ring, colour, thickness)


def _contour_legend(threshold: bool, ground_truth: bool) -> list[Line2D]:
    handles = []
    if threshold:
        handles.append(Line2D([], [], color=np.array(THRESHOLD_RGB) / 255, lw=2, label="map above threshold"))
    if ground_truth:
        handles.append(Line2D([], [], color=np.array(GROUND_TRUTH_RGB) / 255, lw=2, label="ground truth"))
    return handles


def _add_colour_bar(fig: Figure, ax, low: float, high: float, threshold: float | None, **kwargs) -> None:
    """A colour bar of the heatmap scale with the threshold marked on it."""
    bar = fig.colorbar(ScalarMappable(Normalize(low, high), colormaps[CMAP]), ax=ax, **kwargs)
    bar.set_label("anomaly score (patch distance)")
    if threshold is not None and np.isfinite(threshold) and low <= threshold <= high:
        mark = bar.ax.axhline if bar.orientation == "vertical" else bar.ax.axvline
        mark(threshold, color="black", lw=2)


def overlay_figure(
    image_rgb: np.ndarray,
    anomaly_map: np.ndarray,
    threshold: float | None,
    score: float | None = None,
    verdict: str | None = None,
    gt_mask: np.ndarray | None = None,
    *,
    vmin: float | None = None,
) -> Figure:
    """Photo and heatmap overlay side by side, with colour bar, contours and the verdict as title."""
    height, width = image_rgb.shape[:2]
    panel_width = 5.0
    fig = Figure(figsize=(2 * panel_width + 1.2, panel_width * height / width + 1.0), layout="constrained")
    photo_ax, map_ax = fig.subplots(1, 2)
    photo_ax.imshow(image_rgb)
    photo_ax.set_title("photo")
    map_ax.imshow(overlay_rgb(image_rgb, anomaly_map, threshold, gt_mask=gt_mask, vmin=vmin))
    map_ax.set_title("anomaly map")
    for ax in (photo_ax, map_ax):
        ax.set_axis_off()
    low, high = colour_range(threshold, np.asarray(anomaly_map), vmin)
    _add_colour_bar(fig, map_ax, low, high, threshold, shrink=0.9)
    handles = _contour_legend(threshold is not None, gt_mask is not None)
    if handles:
        map_ax.legend(handles=handles, loc="lower right", fontsize=8, facecolor="0.3", labelcolor="white")
    parts = []
    if verdict is not None:
        parts.append(verdict)
    if score is not None:
        parts.append(f"score {score:.3f}")
    if threshold is not None:
        parts.append(f"threshold {threshold:.3f}")
    if score is not None and threshold is not None and threshold > 0:
        parts.append(f"{score / threshold:.3f} × threshold")
    if parts:
        fig.suptitle("  ·  ".join(parts))
    return fig


def save_overlay(
    image_rgb: np.ndarray,
    anomaly_map: np.ndarray,
    out_path: str | Path,
    threshold: float | None,
    score: float | None = None,
    verdict: str | None = None,
    gt_mask: np.ndarray | None = None,
    *,
    vmin: float | None = None,
) -> Path:
    """Write ``overlay_figure`` as an image file (format from the suffix, e.g. .png); returns the path.

    Pass ``vmin=model.calibration_mean`` so that healthy photos look calm (see the module notes).
    """
    fig = overlay_figure(image_rgb, anomaly_map, threshold, score, verdict, gt_mask, vmin=vmin)
    return save_figure(fig, out_path)


def save_figure(fig: Figure, out_path: str | Path, dpi: int = 100) -> Path:
    """Write a figure atomically (creating the folder); the format follows the suffix."""
    out_path = Path(out_path)
    write_atomically(out_path, figure_bytes(fig, out_path.suffix.lstrip(".") or "png", dpi))
    return out_path


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
) -> Figure:
    """Test scores of healthy and defective photos, the threshold, and the healthy calibration spread."""
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
        mean, std = float(calibration.mean()), float(calibration.std())
        ax.axvline(mean, color="0.25", lw=1)
        top = ax.get_ylim()[1]
        ax.text(mean, top, "μ", ha="center", va="bottom", color="0.25")
        for k in (1, 2, 3):
            ax.axvline(mean + k * std, color="0.25", lw=1, ls=":")
            ax.text(mean + k * std, top, f"{k}σ", ha="center", va="bottom", color="0.25")
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
        subfig.suptitle(name, x=0.01, ha="left", fontsize=10, fontweight="bold")
        axes = subfig.subplots(1, columns, squeeze=False)[0]
        for ax in axes:
            ax.set_axis_off()
        if not tiles:
            axes[0].text(0.0, 0.5, "none", fontsize=10, transform=axes[0].transAxes)
        for ax, tile in zip(axes, tiles):
            ax.imshow(overlay_rgb(tile.image_rgb, tile.anomaly_map, threshold, gt_mask=tile.gt_mask, vmin=vmin,
                                  highlight=tile.highlight))
            ax.set_title(tile.caption, fontsize=8)
    return fig


def colour_bar_figure(threshold: float, *, vmin: float | None = None) -> Figure:
    """The heatmap colour scale alone, with the threshold marked: the legend of the thumbnails."""
    low, high = colour_range(threshold, np.zeros(1), vmin)
    fig = Figure(figsize=(6, 0.9), layout="constrained")
    ax = fig.subplots()
    _add_colour_bar(fig, None, low, high, threshold, cax=ax, orientation="horizontal")
    ax.set_title(f"heatmap colour scale (black line: threshold {threshold:.3f})", fontsize=9)
    return fig
