"""Heatmap overlays, drawn with OpenCV alone: the photo with the anomaly map blended in, the threshold
region outlined, and (``overlay_image``) the photo beside it with the verdict and the colour scale.

Colour scale of every heatmap: fixed relative to the calibrated threshold, from ``vmin`` (the
healthy median score when the caller knows it, else 0) to threshold + 2 × (threshold − vmin). Heatmaps of
different photos are therefore directly comparable, and the colour's opacity grows with the value,
so a healthy photo (map well below threshold) shows almost no colour.

The contour rule, the same on every photo: white outlines where the anomaly map is above the
threshold (``highlighted_region``). The image score is the map's maximum, so a photo is flagged
exactly when that region is not empty; a region too small to see is ringed by a white circle.
On thumbnails the region is computed at full resolution and shrunk, so it never vanishes.
Magenta outlines the ground truth.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from output_files import write_atomically

MAX_ALPHA = 0.65  # opacity of the heatmap at the top of the colour scale
THRESHOLD_RGB = (255, 255, 255)
GROUND_TRUTH_RGB = (255, 0, 255)
# The "jet" colour map as 256 RGB colours: dark blue (calm) through green and yellow to dark red.
JET_RGB = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_JET)[:, 0, ::-1].copy()
JET_LUT = JET_RGB[:, None, :].copy()  # the same colours as the (256, 1, 3) table cv2.LUT takes
PANEL_SIDE = 512  # longer side, in pixels, of the photo and overlay panels of a saved overlay
BAR_WIDTH = 18  # the colour scale beside the overlay
MARGIN = 12
TITLE_HEIGHT = 40  # the verdict line above the panels
MIN_WIDTH = 640  # room for the title and the legend beside narrow photos
TEXT_RGB = (33, 33, 33)
VERDICT_RGB = {"ANOMALOUS": (198, 40, 40), "OK": (46, 125, 50)}
LEGEND_BACKGROUND_RGB = (80, 80, 80)  # dark, so that the white contour sample shows
FONT = cv2.FONT_HERSHEY_SIMPLEX


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

    With a threshold the scale runs from ``vmin`` (the healthy median) to as far above the threshold
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
    index = (level * 255.0 + 0.5).astype(np.uint8)
    colours = cv2.LUT(cv2.merge([index, index, index]), JET_LUT)
    alpha = MAX_ALPHA * level  # one pass of OpenCV's per-pixel blend instead of four full-size float arrays
    blended = cv2.blendLinear(np.ascontiguousarray(image_rgb), colours, 1.0 - alpha, alpha)
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


def overlay_image(
    image_rgb: np.ndarray,
    anomaly_map: np.ndarray,
    threshold: float | None,
    score: float | None = None,
    verdict: str | None = None,
    gt_mask: np.ndarray | None = None,
    *,
    vmin: float | None = None,
) -> np.ndarray:
    """Photo and overlay side by side, the colour scale with the threshold marked, the verdict above and
    the contour legend below, as one 8-bit RGB picture.

    Both panels are drawn at ``PANEL_SIDE`` (the threshold region is taken from the full-size map
    first, so a one-pixel peak still shows), which keeps the cost per photo small and fixed.
    """
    height, width = image_rgb.shape[:2]
    scale = PANEL_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    photo = cv2.resize(image_rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    if photo.ndim == 2:
        photo = cv2.cvtColor(photo, cv2.COLOR_GRAY2RGB)
    values = np.asarray(anomaly_map, dtype=np.float32)
    highlight = None
    if threshold is not None and np.isfinite(threshold):
        highlight = highlighted_region(values, threshold)
    small_map = cv2.resize(values, size, interpolation=cv2.INTER_AREA if size[0] < values.shape[1] else cv2.INTER_LINEAR)
    drawn = overlay_rgb(photo, small_map, threshold, gt_mask=gt_mask, vmin=vmin, highlight=highlight)
    low, high = colour_range(threshold, values, vmin)

    title_height, legend_height, label_width = TITLE_HEIGHT, 30, 80
    panel_height = photo.shape[0]
    canvas_width = max(3 * MARGIN + 2 * photo.shape[1] + MARGIN + BAR_WIDTH + label_width, MIN_WIDTH)
    canvas = np.full((title_height + panel_height + legend_height + MARGIN, canvas_width, 3), 255, np.uint8)  # white
    top = title_height
    canvas[top : top + panel_height, MARGIN : MARGIN + photo.shape[1]] = photo
    left = 2 * MARGIN + photo.shape[1]
    canvas[top : top + panel_height, left : left + photo.shape[1]] = drawn
    bar_left = left + photo.shape[1] + MARGIN
    _draw_colour_scale(canvas, (bar_left, top), panel_height, low, high, threshold)
    _draw_title(canvas, title_height, score, threshold, verdict)
    _draw_legend(canvas, (MARGIN, top + panel_height + 4), highlight is not None, gt_mask is not None)
    return canvas


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
    """Write ``overlay_image`` as a PNG, atomically (creating the folder); returns the path.

    Pass ``vmin=model.calibration_median`` so that healthy photos look calm (see the module notes).
    """
    out_path = Path(out_path)
    picture = overlay_image(image_rgb, anomaly_map, threshold, score, verdict, gt_mask, vmin=vmin)
    write_atomically(out_path, png_bytes(picture))
    return out_path


def png_bytes(image_rgb: np.ndarray) -> bytes:
    """An RGB picture as PNG file bytes. Overlays are written per photo, so the encoding is the fast one:
    a single row filter and light compression (half the time of the defaults, files no larger)."""
    settings = [cv2.IMWRITE_PNG_COMPRESSION, 2, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB]
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), settings)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()


def colour_scale_image(threshold: float, *, vmin: float | None = None, width: int = 480) -> np.ndarray:
    """The heatmap colour scale alone, horizontal, with the threshold marked: the legend of thumbnails."""
    low, high = colour_range(threshold, np.zeros(1), vmin)
    bar_height, label_height = 16, 22
    canvas = np.full((label_height + bar_height + label_height, width + 2 * MARGIN, 3), 255, np.uint8)  # white
    ramp = JET_RGB[np.linspace(0, 255, width).round().astype(np.uint8)]
    canvas[label_height : label_height + bar_height, MARGIN : MARGIN + width] = ramp[None, :, :]
    _text(canvas, f"heatmap colour scale (black line: threshold {threshold:.3f})", (MARGIN, 15), 0.45)
    for value in (low, high):
        x = MARGIN + round((value - low) / (high - low) * (width - 1))
        label = f"{value:.3f}"
        (text_width, _), _ = cv2.getTextSize(label, FONT, 0.4, 1)
        _text(canvas, label, (min(max(MARGIN, x - text_width // 2), canvas.shape[1] - text_width - 2),
                              label_height + bar_height + 15), 0.4)
    if low <= threshold <= high:
        x = MARGIN + round((threshold - low) / (high - low) * (width - 1))
        cv2.line(canvas, (x, label_height - 2), (x, label_height + bar_height + 1), (0, 0, 0), 2)
    return canvas


def _text(canvas: np.ndarray, text: str, origin: tuple[int, int], scale: float,
          colour: tuple[int, int, int] = TEXT_RGB, thickness: int = 1) -> int:
    """Draw ASCII text (OpenCV's fonts have no other characters); returns the x after it."""
    cv2.putText(canvas, text, origin, FONT, scale, colour, thickness, cv2.LINE_AA)
    return origin[0] + cv2.getTextSize(text, FONT, scale, thickness)[0][0]


def _draw_title(canvas: np.ndarray, height: int, score: float | None, threshold: float | None,
                verdict: str | None) -> None:
    """The verdict (red or green) and the score against the threshold, on one line."""
    parts = []
    if score is not None:
        parts.append(f"score {score:.3f}")
    if threshold is not None:
        parts.append(f"threshold {threshold:.3f}")
    if score is not None and threshold is not None and threshold > 0:
        parts.append(f"{score / threshold:.3f} x threshold")
    x, baseline = MARGIN, height - 14
    if verdict is not None:
        x = _text(canvas, verdict, (x, baseline), 0.7, VERDICT_RGB.get(verdict, TEXT_RGB), 2) + 16
    _text(canvas, "   ".join(parts), (x, baseline), 0.6)


def _draw_colour_scale(canvas: np.ndarray, corner: tuple[int, int], height: int, low: float, high: float,
                       threshold: float | None) -> None:
    """A vertical colour bar (high at the top) with its ends labelled and the threshold marked in black."""
    left, top = corner
    ramp = JET_RGB[np.linspace(255, 0, height).round().astype(np.uint8)]
    canvas[top : top + height, left : left + BAR_WIDTH] = ramp[:, None, :]
    label_x = left + BAR_WIDTH + 4
    _text(canvas, f"{high:.3f}", (label_x, top + 10), 0.4)
    _text(canvas, f"{low:.3f}", (label_x, top + height), 0.4)
    if threshold is not None and np.isfinite(threshold) and low <= threshold <= high:
        y = top + round((high - threshold) / (high - low) * (height - 1))
        cv2.line(canvas, (left - 3, y), (left + BAR_WIDTH + 2, y), (0, 0, 0), 2)
        _text(canvas, f"{threshold:.3f}", (label_x, y + 4), 0.4)


def _draw_legend(canvas: np.ndarray, corner: tuple[int, int], threshold: bool, ground_truth: bool) -> None:
    """What the contour colours mean, on a dark strip so that the white sample shows."""
    entries = [(THRESHOLD_RGB, "map above threshold")] * threshold + [(GROUND_TRUTH_RGB, "ground truth")] * ground_truth
    if not entries:
        return
    x, y = corner
    width = sum(30 + cv2.getTextSize(label, FONT, 0.45, 1)[0][0] + 14 for _, label in entries) + 6
    canvas[y : y + 22, x : x + width] = LEGEND_BACKGROUND_RGB
    x += 6
    for colour, label in entries:
        cv2.line(canvas, (x, y + 11), (x + 22, y + 11), colour, 2)
        x = _text(canvas, label, (x + 30, y + 16), 0.45, (255, 255, 255)) + 14
