"""Heatmap overlays: the photo with the anomaly map blended in and the threshold region outlined.

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

import cv2
import numpy as np
from matplotlib import colormaps

CMAP = "jet"
MAX_ALPHA = 0.65  # opacity of the heatmap at the top of the colour scale
THRESHOLD_RGB = (255, 255, 255)
GROUND_TRUTH_RGB = (255, 0, 255)


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
