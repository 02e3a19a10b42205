"""Overlays and plots: colour scale, contours, files written, no pyplot state left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from evaluation.visualize import Tile, figure_bytes, pro_figure, roc_figure, score_histogram_figure, tiles_figure
from inspection.overlay import (
    GROUND_TRUTH_RGB,
    MARGIN,
    PANEL_SIDE,
    THRESHOLD_RGB,
    TITLE_HEIGHT,
    colour_range,
    colour_scale_image,
    overlay_image,
    overlay_rgb,
    region_at,
    save_overlay,
)

PNG_MAGIC = b"\x89PNG"
ROOT = Path(__file__).resolve().parents[1]


def _photo_and_map(height: int = 60, width: int = 80) -> tuple[np.ndarray, np.ndarray]:
    image = np.full((height, width, 3), 128, np.uint8)
    anomaly_map = np.zeros((height, width), np.float32)
    anomaly_map[20:40, 30:50] = 5.0  # a hot square, above a threshold of 2
    return image, anomaly_map


def _has_colour(image: np.ndarray, rgb: tuple[int, int, int]) -> bool:
    return bool(np.all(np.abs(image.astype(int) - rgb) <= 10, axis=-1).any())


def test_colour_range_is_fixed_by_threshold() -> None:
    anomaly_map = np.array([[0.5, 9.0]])
    assert colour_range(2.0, anomaly_map) == (0.0, 6.0)
    assert colour_range(2.0, anomaly_map, vmin=1.0) == (1.0, 4.0)  # threshold a third of the way up
    assert colour_range(21.0, anomaly_map, vmin=18.0) == (18.0, 27.0)
    assert colour_range(None, anomaly_map) == (0.5, 9.0)  # without a threshold: the map's own range


def test_healthy_map_leaves_photo_untouched() -> None:
    image, _ = _photo_and_map()
    calm = overlay_rgb(image, np.full(image.shape[:2], 1.0, np.float32), threshold=2.0, vmin=1.0)
    np.testing.assert_array_equal(calm, image)


def test_overlay_draws_threshold_and_ground_truth_contours() -> None:
    image, anomaly_map = _photo_and_map()
    gt = np.zeros((30, 40), bool)  # a smaller mask is resized to the photo
    gt[5:10, 5:10] = True
    result = overlay_rgb(image, anomaly_map, threshold=2.0, gt_mask=gt)
    assert result.shape == image.shape and result.dtype == np.uint8
    assert _has_colour(result, THRESHOLD_RGB) and _has_colour(result, GROUND_TRUTH_RGB)
    small_map = cv2.resize(anomaly_map, (40, 30), interpolation=cv2.INTER_AREA)  # maps too
    assert overlay_rgb(image, small_map, threshold=2.0).shape == image.shape


def test_save_overlay_writes_the_photo_beside_its_overlay(tmp_path: Path) -> None:
    _, anomaly_map = _photo_and_map()
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    out = save_overlay(image, anomaly_map, tmp_path / "sub" / "overlay.png", threshold=2.0, score=5.0,
                       verdict="ANOMALOUS", gt_mask=anomaly_map > 0)
    written = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    assert written.shape[1] > 2 * PANEL_SIDE and written.shape[0] > PANEL_SIDE * 60 // 80
    assert (written == overlay_image(image, anomaly_map, 2.0, 5.0, "ANOMALOUS", anomaly_map > 0)).all()  # lossless
    height, width = image.shape[:2]
    size = (round(width * PANEL_SIDE / max(height, width)), round(height * PANEL_SIDE / max(height, width)))
    photo = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    shown = written[TITLE_HEIGHT : TITLE_HEIGHT + size[1], MARGIN : MARGIN + size[0]]
    assert (shown == photo).all()  # the photo itself, left of its overlay
    assert (written == THRESHOLD_RGB).all(-1).any() and (written == GROUND_TRUTH_RGB).all(-1).any()  # both contours
    assert save_overlay(image, anomaly_map, tmp_path / "plain.png", threshold=None).is_file()


def test_overlays_need_no_matplotlib() -> None:
    """The line PC's environment (requirements-runtime.txt) has no matplotlib; scoring draws overlays there."""
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "import numpy as np, inspection.scoring, evaluation.gallery\n"
            "from inspection.overlay import overlay_image\n"
            "print(overlay_image(np.zeros((40, 60, 3), np.uint8), np.ones((40, 60), np.float32), 0.5, 1.0, 'OK').shape)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_plots_render() -> None:
    fpr = np.linspace(0, 1, 50_000)  # long pixel-level curves are resampled, not drawn point by point
    assert figure_bytes(roc_figure({"image": (fpr, np.sqrt(fpr), 0.67), "pixel": (fpr, fpr, 0.5)})).startswith(PNG_MAGIC)
    assert figure_bytes(pro_figure(fpr, fpr ** 0.3, 0.5, 0.3)).startswith(PNG_MAGIC)
    histogram = score_histogram_figure([1.0, 1.2, 1.1], [2.5, 3.0], 1.6, [1.0, 1.1, 1.05], (1.1, 0.05))
    assert figure_bytes(histogram).startswith(PNG_MAGIC)
    assert figure_bytes(score_histogram_figure([1.0], [2.0], 1.5, [])).startswith(PNG_MAGIC)
    scale = colour_scale_image(2.0, vmin=1.0)
    assert scale.shape[1] > scale.shape[0] and (scale == (0, 0, 0)).all(-1).any()  # the threshold line


@pytest.mark.parametrize("false_negatives", [0, 3])
def test_tiles_figure(false_negatives: int) -> None:
    image, anomaly_map = _photo_and_map()
    tile = Tile(image, anomaly_map, "FP 5.00\ngood/000.png")
    rows = {"false positives": [tile, tile], "false negatives": [tile] * false_negatives}
    assert figure_bytes(tiles_figure(rows, threshold=2.0, columns=4)).startswith(PNG_MAGIC)


def test_a_tiny_region_above_threshold_is_ringed_so_it_can_be_seen() -> None:
    image = np.zeros((200, 200, 3), np.uint8)
    anomaly_map = np.zeros((200, 200), np.float32)
    anomaly_map[100, 100] = 5.0  # one pixel above the threshold
    drawn = overlay_rgb(image, anomaly_map, threshold=2.0)
    rows, cols = np.nonzero((drawn == THRESHOLD_RGB).all(axis=-1))
    assert rows.size and rows.max() - rows.min() >= 12 and cols.max() - cols.min() >= 12


def test_shrinking_keeps_a_one_pixel_region_that_averaging_would_lose() -> None:
    region = np.zeros((1024, 1024), bool)
    region[517, 300] = True
    assert region_at(region, (224, 224)).sum() == 1
    assert not (cv2.resize(region.astype(np.float32), (224, 224), interpolation=cv2.INTER_AREA) > 0.5).any()
    image = np.zeros((224, 224, 3), np.uint8)
    calm_map = np.zeros((224, 224), np.float32)  # the shrunk map no longer reaches the threshold...
    drawn = overlay_rgb(image, calm_map, threshold=2.0, highlight=region)  # ...the full-size region still shows
    assert (drawn == THRESHOLD_RGB).all(axis=-1).any()
    assert not (overlay_rgb(image, calm_map, threshold=2.0) == THRESHOLD_RGB).all(axis=-1).any()
