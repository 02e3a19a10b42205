"""Overlays and plots: colour scale, contours, files written, no pyplot state left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb

from evaluation.visualize import Tile, figure_bytes, pro_figure, roc_figure, score_histogram_figure, tiles_figure
from inspection.overlay import (
    BAR_WIDTH,
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


@pytest.mark.parametrize("name, shown", [("scratch/\udcff000.png", "scratch/\\xff000.png"),
                                         ("scratch/a$\\foo$.png", "scratch/a$\\foo$.png")],
                         ids=["not UTF-8", "dollar signs"])
def test_a_tile_named_by_any_file_name_is_drawn_with_the_name_as_written(name: str, shown: str) -> None:
    """A name that is not UTF-8 (its bytes held as surrogates) and one that reads as mathtext are drawn as
    their text, with undecodable bytes as escapes: either once failed the whole figure, and the report."""
    image, anomaly_map = _photo_and_map()
    figure = tiles_figure({"false positives": [Tile(image, anomaly_map, f"FP 5.00\n{name}")]}, threshold=2.0, columns=2)
    assert figure_bytes(figure).startswith(PNG_MAGIC)
    assert figure.subfigs[0].axes[0].get_title() == f"FP 5.00\n{shown}"


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


def _overlay_panel(picture: np.ndarray, photo_shape: tuple[int, int]) -> np.ndarray:
    """The right-hand panel of an ``overlay_image`` (the overlay itself) for a photo of ``photo_shape``."""
    height, width = photo_shape
    scale = PANEL_SIDE / max(height, width)
    size = (round(width * scale), round(height * scale))
    left = 2 * MARGIN + size[0]
    return picture[TITLE_HEIGHT : TITLE_HEIGHT + size[1], left : left + size[0]]


def test_a_map_that_only_reaches_the_threshold_is_not_outlined() -> None:
    """A score equal to the threshold passes (OK), so a map that reaches but never exceeds it has no contour."""
    image = np.zeros((80, 80, 3), np.uint8)
    anomaly_map = np.zeros((80, 80), np.float32)
    anomaly_map[30:50, 30:50] = 2.0
    assert not (overlay_rgb(image, anomaly_map, threshold=2.0) == THRESHOLD_RGB).all(-1).any()
    anomaly_map[40, 40] = np.nextafter(np.float32(2.0), np.float32(3.0))
    assert (overlay_rgb(image, anomaly_map, threshold=2.0) == THRESHOLD_RGB).all(-1).any()


def test_a_one_pixel_peak_of_a_large_photo_is_outlined_on_its_saved_overlay() -> None:
    """The saved overlay is drawn at PANEL_SIDE; the region above the threshold is taken at full size first."""
    photo = np.zeros((1024, 1024, 3), np.uint8)
    anomaly_map = np.zeros((1024, 1024), np.float32)
    anomaly_map[517, 300] = 5.0
    panel = _overlay_panel(overlay_image(photo, anomaly_map, 2.0, 5.0, "ANOMALOUS"), photo.shape[:2])
    assert (panel == THRESHOLD_RGB).all(-1).any()


def test_a_healthy_photo_looks_calm_on_its_saved_overlay() -> None:
    """With vmin at the healthy median, a map at that median leaves the photo uncoloured on the saved overlay too."""
    photo = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    calm = np.full((300, 400), 1.0, np.float32)
    picture = overlay_image(photo, calm, 2.0, 1.0, "OK", vmin=1.0)
    shown = picture[TITLE_HEIGHT : TITLE_HEIGHT + 384, MARGIN : MARGIN + PANEL_SIDE]  # the photo panel
    np.testing.assert_array_equal(_overlay_panel(picture, photo.shape[:2]), shown)


def test_the_colour_bar_marks_the_threshold_a_third_of_the_way_up() -> None:
    """Scale (vmin, threshold + 2 (threshold - vmin)): the black threshold mark sits a third up the bar."""
    photo = np.zeros((100, 100, 3), np.uint8)
    picture = overlay_image(photo, np.zeros((100, 100), np.float32), 2.0, 1.0, "OK", vmin=1.0)
    bar_left = 3 * MARGIN + 2 * PANEL_SIDE
    bar = picture[TITLE_HEIGHT : TITLE_HEIGHT + PANEL_SIDE, bar_left : bar_left + BAR_WIDTH]
    rows = np.nonzero((bar == 0).all(-1).all(-1))[0]
    assert rows.size and abs(rows.mean() - 2 / 3 * (PANEL_SIDE - 1)) <= 2


def test_plots_draw_what_their_legends_say() -> None:
    """The ROC curve runs from (0, 0) to (1, 1) after resampling, the PRO shading stops at max_fpr, and the
    histogram's threshold line stands at the threshold."""
    fpr = np.linspace(0, 1, 50_000)
    (curve, *_) = roc_figure({"image": (fpr, np.sqrt(fpr), 0.67)}).axes[0].get_lines()
    assert curve.get_xdata()[-1] == 1.0 and curve.get_ydata()[-1] == 1.0 and len(curve.get_xdata()) <= 2000
    assert curve.get_xdata()[0] == 0.0 and curve.get_ydata()[0] == 0.0
    shaded = pro_figure(fpr, fpr ** 0.3, 0.5, 0.3).axes[0].collections[0].get_paths()[0].vertices
    assert shaded[:, 0].min() == 0.0 and shaded[:, 0].max() <= 0.3
    histogram = score_histogram_figure([1.0, 1.2, 1.1], [2.5, 3.0], 1.6, [1.0, 1.1, 1.05], (1.1, 0.05))
    (line,) = [line for line in histogram.axes[0].get_lines() if line.get_label().startswith("threshold")]
    assert list(line.get_xdata()) == [1.6, 1.6]


def _legend(ax: Axes) -> list[str]:
    """The texts of the axes' legend, in order."""
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_the_roc_plot_draws_each_rate_on_its_axis_and_names_each_auroc() -> None:
    """False-positive rate across, true-positive rate up: a curve better than chance bows above the dotted
    diagonal from (0, 0) to (1, 1), a worse one below it, and the legend gives each curve's own AUROC."""
    fpr = np.linspace(0, 1, 50_000)
    ax = roc_figure({"image": (fpr, np.sqrt(fpr), 0.667), "pixel": (fpr, fpr ** 2, 0.333)}).axes[0]
    image, pixel, chance = ax.get_lines()
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("false-positive rate", "true-positive rate")
    np.testing.assert_allclose(image.get_ydata(), np.sqrt(image.get_xdata()))
    np.testing.assert_allclose(pixel.get_ydata(), pixel.get_xdata() ** 2)
    assert list(chance.get_xdata()) == [0, 1] and list(chance.get_ydata()) == [0, 1]
    assert _legend(ax) == ["image (AUROC 0.667)", "pixel (AUROC 0.333)", "chance"]


def test_the_pro_plot_follows_the_curve_and_marks_where_its_integral_stops() -> None:
    """The drawn curve is PRO at each FPR, the dashed line stands at max_fpr, and the legend reads
    AUPRO@max_fpr = aupro."""
    fpr = np.linspace(0, 1, 50_000)
    ax = pro_figure(fpr, np.sqrt(fpr), 0.512, 0.3).axes[0]
    curve, limit = ax.get_lines()
    np.testing.assert_allclose(curve.get_ydata(), np.sqrt(curve.get_xdata()), atol=2e-3)
    assert list(limit.get_xdata()) == [0.3, 0.3]
    assert _legend(ax) == ["AUPRO@0.3 = 0.512"]


def test_the_score_histogram_draws_each_group_in_its_colour_and_counts_it() -> None:
    """Healthy test photos in green, defective in red, the calibration photos outlined, each counted in the
    legend with the threshold to three decimals; the outline covers every calibration score even when they all
    lie below the test scores."""
    calibration = [0.5, 0.6, 0.7, 0.8]
    ax = score_histogram_figure([1.0, 1.2, 1.1], [2.5, 3.0], 1.6, calibration).axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("image anomaly score", "images")
    assert _legend(ax) == ["test healthy (3)", "test defective (2)", "calibration healthy (4)", "threshold 1.600"]
    handles, labels = ax.get_legend_handles_labels()
    colours = {label: to_rgb(handle.get_facecolor()) for handle, label in zip(handles[:2], labels)}
    assert colours == {"test healthy (3)": to_rgb("tab:green"), "test defective (2)": to_rgb("tab:red")}
    outline = handles[2].get_path().vertices
    assert outline[:, 0].min() <= min(calibration) and outline[:, 0].max() >= max(calibration)
    assert outline[:, 1].max() > 0


def test_the_score_histogram_marks_the_healthy_median_and_each_sigma_where_the_model_counts_them() -> None:
    """Median 0.65 and spread 0.1: the solid line and "median" at 0.65, dotted lines labelled 1σ, 2σ and 3σ at
    0.75, 0.85 and 0.95."""
    ax = score_histogram_figure([1.0, 1.2, 1.1], [2.5, 3.0], 1.6, [0.5, 0.6, 0.7, 0.8], (0.65, 0.1)).axes[0]
    marks = {text.get_text(): text.get_position()[0] for text in ax.texts}
    assert marks == pytest.approx({"median": 0.65, "1σ": 0.75, "2σ": 0.85, "3σ": 0.95})
    solid = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "-"]
    dotted = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert solid == pytest.approx([0.65]) and sorted(dotted) == pytest.approx([0.75, 0.85, 0.95])


def test_the_worst_cases_grid_shows_each_row_under_its_title_in_the_order_given() -> None:
    """Each row is titled with its own group; its tiles run left to right in the order given (worst first), each
    under its caption; a row with no tiles says "none"."""
    image, anomaly_map = _photo_and_map()
    rows = {"false positives": [Tile(image, anomaly_map, f"FP {score}") for score in ("9.00", "7.00", "5.00")],
            "false negatives": []}
    figure = tiles_figure(rows, threshold=2.0, columns=4)
    assert [subfig.get_suptitle() for subfig in figure.subfigs] == ["false positives", "false negatives"]
    assert [ax.get_title() for ax in figure.subfigs[0].axes] == ["FP 9.00", "FP 7.00", "FP 5.00", ""]
    assert [text.get_text() for text in figure.subfigs[1].axes[0].texts] == ["none"]


def test_a_tile_carries_the_threshold_outline_the_ground_truth_and_the_full_size_highlight() -> None:
    """A tile is drawn as every overlay is: white round the region above the threshold, magenta round the
    annotated defect, and white round a full-size highlight that the shrunk map no longer reaches."""
    image, anomaly_map = _photo_and_map()
    gt = np.zeros(anomaly_map.shape, bool)
    gt[5:15, 5:15] = True
    highlight = np.zeros((600, 800), bool)
    highlight[300, 400] = True  # one pixel of the full-size photo, lost when its map was shrunk
    tiles = [Tile(image, anomaly_map, "hot", gt_mask=gt), Tile(image, np.zeros_like(anomaly_map), "faint",
                                                              highlight=highlight)]
    figure = tiles_figure({"worst": tiles}, threshold=2.0, columns=2)
    hot, faint = (np.asarray(ax.get_images()[0].get_array()) for ax in figure.subfigs[0].axes)
    assert _has_colour(hot, THRESHOLD_RGB) and _has_colour(hot, GROUND_TRUTH_RGB)
    assert _has_colour(faint, THRESHOLD_RGB)


def test_tiles_use_the_models_colour_scale() -> None:
    """A tile whose map sits at the healthy median (vmin) shows the photo uncoloured."""
    image = np.random.default_rng(2).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    tile = Tile(image, np.full((60, 80), 1.0, np.float32), "good/000.png")
    figure = tiles_figure({"healthy": [tile]}, threshold=2.0, vmin=1.0, columns=2)
    shown = [ax.get_images()[0].get_array() for sub in figure.subfigs for ax in sub.axes if ax.get_images()]
    np.testing.assert_array_equal(np.asarray(shown[0]), image)


def test_a_defect_is_drawn_red_on_the_photo() -> None:
    """Jet runs from blue (calm) to red (defect): a map at the top of the scale must tint the photo red, not blue."""
    image, anomaly_map = _photo_and_map()
    drawn = overlay_rgb(image, anomaly_map * 2, threshold=2.0).astype(int)  # 10: above the scale's top of 6
    red, _, blue = drawn[30, 40]
    assert red >= 120 and blue <= 60


def test_the_ground_truth_outline_lies_around_the_defect() -> None:
    """The magenta outline surrounds the annotated defect, not the rest of the photo."""
    image = np.zeros((100, 100, 3), np.uint8)
    gt = np.zeros((100, 100), bool)
    gt[40:60, 30:50] = True
    drawn = overlay_rgb(image, np.zeros((100, 100), np.float32), threshold=2.0, gt_mask=gt)
    rows, cols = np.nonzero((drawn == GROUND_TRUTH_RGB).all(-1))
    assert rows.size and (rows.min(), rows.max(), cols.min(), cols.max()) == (40, 59, 30, 49)


def test_a_small_region_off_the_diagonal_is_ringed_round_itself() -> None:
    """A 3-pixel-wide peak is as easy to miss as a 1-pixel one: it gets a ring, and the ring is round the peak,
    not at the mirrored place."""
    image = np.zeros((200, 200, 3), np.uint8)
    anomaly_map = np.zeros((200, 200), np.float32)
    anomaly_map[39:42, 149:152] = 5.0
    rows, cols = np.nonzero((overlay_rgb(image, anomaly_map, threshold=2.0) == THRESHOLD_RGB).all(-1))
    assert rows.size and rows.max() - rows.min() >= 12 and cols.max() - cols.min() >= 12
    assert abs(rows.mean() - 40) <= 2 and abs(cols.mean() - 150) <= 2


def test_the_outline_on_a_landscape_photos_saved_overlay_is_on_its_defect() -> None:
    """Camera photos are wider than tall: the white outline on the saved overlay surrounds the hot region
    at its own place on the panel (the region is taken at full size, then shrunk to the panel)."""
    photo = np.zeros((600, 800, 3), np.uint8)
    anomaly_map = np.zeros((600, 800), np.float32)
    anomaly_map[100:160, 500:600] = 5.0
    panel = _overlay_panel(overlay_image(photo, anomaly_map, 2.0, 5.0, "ANOMALOUS"), photo.shape[:2])
    rows, cols = np.nonzero((panel == THRESHOLD_RGB).all(-1))
    scale = PANEL_SIDE / 800
    assert rows.size
    assert abs(rows.min() - 100 * scale) <= 3 and abs(rows.max() - 160 * scale) <= 3
    assert abs(cols.min() - 500 * scale) <= 3 and abs(cols.max() - 600 * scale) <= 3


@pytest.mark.parametrize(("verdict", "hue"), [("ANOMALOUS", 0), ("OK", 1)])
def test_the_verdict_is_written_in_red_when_anomalous_and_green_when_ok(verdict: str, hue: int) -> None:
    """The title's colour is read before its words: ANOMALOUS in red, OK in green."""
    photo = np.zeros((100, 100, 3), np.uint8)
    title = overlay_image(photo, np.zeros((100, 100), np.float32), 2.0, 1.0, verdict)[:TITLE_HEIGHT].astype(int)
    others = [channel for channel in range(3) if channel != hue]
    assert (title[..., hue] - title[..., others].max(-1) > 60).any()
