"""Metric checks against values worked out by hand (see the comments for the arithmetic)."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.maps import eval_shape, shrink_map
from evaluation.metrics import (
    area_under_pro,
    aupro,
    downsample_for_eval,
    image_metrics,
    is_flagged,
    operating_points,
    per_defect_auroc,
    pixel_roc,
    pro_curve,
    rates_at_threshold,
    region_labels,
    wilson_interval,
)


def _two_region_case() -> tuple[np.ndarray, np.ndarray]:
    """One 1×8 image: region A = pixels 0-1, region B = pixel 6, five healthy pixels."""
    scores = np.array([[0.9, 0.5, 0.8, 0.1, 0.2, 0.3, 0.7, 0.4]], dtype=np.float32)
    mask = np.array([[1, 1, 0, 0, 0, 0, 1, 0]], dtype=bool)
    return scores, mask


def test_image_metrics_hand_computed() -> None:
    labels = [False, False, False, True, True]
    scores = [0.1, 0.2, 0.6, 0.5, 0.9]
    result = image_metrics(labels, scores, threshold=0.4)
    # Pairs (defect > good): 0.5 beats 2 of 3, 0.9 beats 3 of 3 -> 5/6.
    assert result["image_auroc"] == pytest.approx(5 / 6)
    # Ranked: 0.9 (TP, P=1, R=.5), 0.6 (FP), 0.5 (TP, P=2/3, R=1) -> AP = .5*1 + .5*2/3.
    assert result["image_ap"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    # Flagged above 0.4: 0.6 (FP), 0.5, 0.9 (TP) -> F1 = 2*2 / (2*2 + 1) = 0.8.
    assert result["image_f1_at_threshold"] == pytest.approx(0.8)
    # Best is flagging 0.5 and up (P=2/3, R=1 -> 0.8), which beats 0.9 alone (P=1, R=.5 -> 2/3); flagged is
    # above the threshold, so the threshold lies halfway down to the next score, 0.2: --threshold 0.35 gives 0.8.
    assert result["image_f1_max"] == pytest.approx(0.8)
    assert result["image_f1_max_threshold"] == pytest.approx(0.35)
    at_it = image_metrics(labels, scores, threshold=result["image_f1_max_threshold"])
    assert at_it["image_f1_at_threshold"] == pytest.approx(result["image_f1_max"])


def test_auroc_ap_and_f1_max_rank_the_scores_whatever_the_threshold() -> None:
    # The hand-computed case of the test above at thresholds flagging 5, 3, 2 and 0 photos: only F1 at the
    # threshold moves (4/7, 0.8, 1/2, 0); the ranking figures stay those of the scores.
    labels = [False, False, False, True, True]
    scores = [0.1, 0.2, 0.6, 0.5, 0.9]
    for threshold, f1 in ((0.0, 4 / 7), (0.4, 0.8), (0.55, 0.5), (1.0, 0.0)):
        result = image_metrics(labels, scores, threshold)
        assert result["image_auroc"] == pytest.approx(5 / 6), threshold
        assert result["image_ap"] == pytest.approx(0.5 + 0.5 * 2 / 3), threshold
        assert (result["image_f1_max"], result["image_f1_max_threshold"]) == (pytest.approx(0.8), pytest.approx(0.35))
        assert result["image_f1_at_threshold"] == pytest.approx(f1), threshold


def test_f1_at_the_threshold_flags_scores_strictly_above_it() -> None:
    # 0.41 (defect) is flagged, 0.4 (healthy) is not, 0.2 (defect) is missed: P = 1, R = 1/2 -> F1 = 2/3.
    result = image_metrics([False, True, True], [0.4, 0.41, 0.2], threshold=0.4)
    assert result["image_f1_at_threshold"] == pytest.approx(2 / 3)


def test_image_metrics_one_class_gives_none() -> None:
    result = image_metrics([False, False], [0.1, 0.9], threshold=0.5)
    assert all(value is None for value in result.values())
    only_defects = image_metrics([True, True], [0.1, 0.9], threshold=0.5)
    assert only_defects["image_auroc"] is None
    assert only_defects["image_f1_at_threshold"] == pytest.approx(2 / 3)  # 1 of 2 found


def test_is_flagged_is_strictly_above() -> None:
    assert is_flagged([0.4, 0.5, 0.6], 0.5).tolist() == [False, False, True]


def test_per_defect_auroc() -> None:
    kinds = ["good", "good", "scratch", "hole"]
    scores = [0.1, 0.3, 0.9, 0.2]
    # scratch beats both healthy scores; hole beats one of two.
    assert per_defect_auroc(kinds, scores) == {"hole": pytest.approx(0.5), "scratch": pytest.approx(1.0)}
    assert per_defect_auroc(["scratch"], [0.5]) == {"scratch": None}


def test_aupro_perfect_inverted_constant() -> None:
    scores, mask = _two_region_case()
    perfect = mask.astype(np.float32)
    assert aupro([perfect], [mask]) == pytest.approx(1.0)
    assert aupro([1.0 - perfect], [mask]) == pytest.approx(0.0)
    # Constant map: one threshold, the curve jumps from (0,0) to (1,1); the straight line is
    # interpolated to PRO 0.3 at FPR 0.3, area 0.3*0.3/2 = 0.045, divided by 0.3 -> 0.15.
    assert aupro([np.full_like(scores, 7.0)], [mask]) == pytest.approx(0.15)


def test_aupro_hand_computed() -> None:
    scores, mask = _two_region_case()
    # Descending thresholds: .9 -> A half (PRO .25, FPR 0); .8 -> healthy (FPR .2);
    # .7 -> B (PRO .75); .5 -> A whole (PRO 1); .4 -> FPR .4.
    # Area to 0.3: 0.2 * 0.25 + 0.1 * 1.0 = 0.15; / 0.3 = 0.5.
    assert aupro([scores], [mask]) == pytest.approx(0.5)
    fpr, pro = pro_curve([scores], [mask])
    assert fpr[0] == pro[0] == 0.0 and fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)


def test_aupro_pools_images_and_numbers_regions_globally() -> None:
    scores, mask = _two_region_case()
    # The same pixels split over two images: FPR over all healthy pixels, regions of both images.
    split = aupro([scores[:, :4], scores[:, 4:]], [mask[:, :4], mask[:, 4:]])
    assert split == pytest.approx(0.5)


def test_aupro_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    maps = [rng.random((12, 12)).round(2).astype(np.float32) for _ in range(3)]  # rounding -> ties
    masks = [np.zeros((12, 12), bool), np.zeros((12, 12), bool), np.zeros((12, 12), bool)]
    masks[0][2:5, 2:6] = True
    masks[0][9:11, 9:10] = True
    masks[2][5:9, 1:3] = True
    maps[2][5:9, 1:3] += 0.3
    labels = [region_labels(mask) for mask in masks]
    healthy = np.concatenate([m[~k] for m, k in zip(maps, masks)])
    regions = [m[lab == r] for m, lab in zip(maps, labels) for r in range(1, lab.max() + 1)]
    points = [(0.0, 0.0)]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        points.append(((healthy >= t).mean(), np.mean([(region >= t).mean() for region in regions])))
    fpr, pro = np.array(points).T
    assert aupro(maps, masks) == pytest.approx(area_under_pro(fpr, pro))
    computed_fpr, computed_pro = pro_curve(maps, masks)
    np.testing.assert_allclose(computed_fpr, fpr)
    np.testing.assert_allclose(computed_pro, pro)


def test_area_under_pro_interpolates_at_limit() -> None:
    # PRO at FPR .3 on the segment (.2, .5) -> (.5, 1): .5 + .5/3. Area .05 + .1*(.5 + .6667)/2.
    expected = (0.05 + 0.1 * (0.5 + (0.5 + 0.5 / 3)) / 2) / 0.3
    assert area_under_pro(np.array([0, 0.2, 0.5, 1]), np.array([0, 0.5, 1, 1])) == pytest.approx(expected)


def test_aupro_none_without_defects() -> None:
    assert aupro([np.ones((4, 4))], [np.zeros((4, 4), bool)]) is None


def test_pixel_roc() -> None:
    scores, mask = _two_region_case()
    value, fpr, tpr = pixel_roc([scores], [mask])
    # Defect pixels .9, .5, .7 vs healthy .8, .1, .2, .3, .4: 5 + 4 + 4 wins of 15 pairs.
    assert value == pytest.approx(13 / 15)
    assert fpr[-1] == tpr[-1] == 1.0
    assert pixel_roc([scores], [np.zeros_like(mask)]) is None


def test_pixel_roc_is_none_when_every_pixel_is_defective() -> None:
    scores, mask = _two_region_case()
    # No healthy pixel: the ROC curve is undefined, and a NaN would be written to metrics.json.
    assert pixel_roc([scores], [np.ones_like(mask)]) is None


def test_pixel_auroc_equals_scikit_learn_on_the_same_pixels() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(7)
    maps = [rng.random((12, 9)) for _ in range(4)]
    masks = [rng.random((12, 9)) > 0.8 for _ in range(4)]
    masks[1][:] = False  # a healthy image among them
    value, _, _ = pixel_roc(maps, masks)
    expected = roc_auc_score(np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps]))
    assert value == pytest.approx(expected, abs=1e-12)


def test_region_labels_are_eight_connected() -> None:
    mask = np.eye(4, dtype=bool)
    mask[0, 3] = True
    labels = region_labels(mask)
    assert labels.max() == 2 and len(np.unique(labels[np.eye(4, dtype=bool)])) == 1


def test_downsample_keeps_thin_and_tiny_regions() -> None:
    mask = np.zeros((64, 96), bool)
    mask[10:50, 31] = True  # 1-pixel-wide scratch, thinner than a 4×4 evaluation cell
    mask[60, 90] = True  # single-pixel defect
    anomaly_map = np.arange(64 * 96, dtype=np.float32).reshape(64, 96)
    small_map, labels = downsample_for_eval(anomaly_map, mask, eval_size=24)
    assert eval_shape(mask.shape, 24) == (16, 24) == small_map.shape == labels.shape
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2]  # both regions survive, each still one region
    assert small_map.mean() == pytest.approx(anomaly_map.mean(), rel=1e-5)  # area averaging


def test_shrinking_a_map_averages_each_cell_so_a_hot_pixel_is_not_skipped() -> None:
    rng = np.random.default_rng(3)
    anomaly_map = rng.random((64, 96)).astype(np.float32)
    # 64x96 to a longer side of 24: each evaluation cell is the mean of its 4x4 block.
    blocks = anomaly_map.reshape(16, 4, 24, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(shrink_map(anomaly_map, 24), blocks, atol=1e-6)
    spike = np.zeros((64, 96), np.float32)
    spike[0, 0] = 16.0  # one hot pixel in the corner of its cell: a sampling resize would miss it
    small = shrink_map(spike, 24)
    assert small[0, 0] == pytest.approx(1.0) and small.sum() == pytest.approx(1.0)


def test_enlarging_a_map_blends_neighbours_smoothly_within_its_range() -> None:
    """A coarse map shown at the evaluation size must ramp between cells: blocky steps hide where a defect
    peaks, and overshoot would report scores the model never gave."""
    step = np.zeros((4, 4), np.float32)
    step[:, 2:] = 1.0
    enlarged = shrink_map(step, 16)
    assert enlarged.shape == (16, 16)
    assert enlarged.min() >= 0.0 and enlarged.max() <= 1.0
    assert ((enlarged > 0.05) & (enlarged < 0.95)).any()
    assert (np.diff(enlarged, axis=1) >= 0).all()


def test_eval_shape_rounds_to_the_nearest_pixel_and_keeps_at_least_one() -> None:
    """Rounding keeps the aspect ratio closest to the photo's; a sliver thinner than one evaluation cell
    still gets one pixel instead of an empty map that the resize would refuse."""
    assert eval_shape((1000, 667), 256) == (256, 171)  # 170.75 px would floor to 170
    assert eval_shape((2000, 1), 256) == (256, 1)
    assert shrink_map(np.ones((2000, 1), np.float32), 256).shape == (256, 1)


def test_a_region_too_small_for_the_grid_keeps_the_cell_at_its_centre() -> None:
    # 64x96 to 16x24 (4x4 cells); pixel (10, 90) lies between sampled columns 88 and 92, in cell
    # (10 * 16 / 64, 90 * 24 / 96) = (2, 22), so only its centre cell can stand for it.
    mask = np.zeros((64, 96), bool)
    mask[10, 90] = True
    _, labels = downsample_for_eval(np.zeros((64, 96), np.float32), mask, eval_size=24)
    assert np.argwhere(labels).tolist() == [[2, 22]]


def test_a_tiny_region_never_takes_a_cell_from_a_region_the_grid_already_sampled() -> None:
    big = np.zeros((64, 96), bool)
    big[:41, :40] = True  # its sampled cells include (10, 0), from pixel (40, 0)
    mask = big.copy()
    mask[42, 2] = True  # not 8-connected to the big region; its centre cell is (10, 0)
    anomaly_map = np.zeros((64, 96), np.float32)
    _, alone = downsample_for_eval(anomaly_map, big, eval_size=24)
    _, labels = downsample_for_eval(anomaly_map, mask, eval_size=24)
    assert alone[10, 0] == 1
    np.testing.assert_array_equal(labels, alone)  # the big region keeps every one of its cells


def test_downsample_healthy_and_enlarging() -> None:
    small_map, labels = downsample_for_eval(np.ones((8, 8), np.float32), None, eval_size=16)
    assert small_map.shape == labels.shape == (16, 16)
    assert not labels.any()


def test_rates_at_the_threshold_count_false_alarms_escapes_and_recall_per_kind() -> None:
    kinds = ["good", "good", "good", "good", "rust", "rust", "scratch", "scratch", "scratch"]
    scores = [1.0, 2.0, 5.5, 3.0, 9.0, 4.0, 6.0, 7.0, 5.0]
    rates = rates_at_threshold(kinds, scores, threshold=5.0)  # flagged: score > 5
    assert (rates["false_alarms"], rates["escapes"]) == (1, 2)  # good 5.5; rust 4.0 and scratch 5.0 (not above)
    assert rates["false_alarm_rate"] == pytest.approx(1 / 4) and rates["escape_rate"] == pytest.approx(2 / 5)
    assert rates["recall_per_defect"] == {"rust": pytest.approx(0.5), "scratch": pytest.approx(2 / 3)}
    low, high = rates["false_alarm_rate_interval"]
    assert low < 0.25 < high
    assert rates["false_alarm_rate_interval"] == wilson_interval(1, 4)  # 1 of the 4 healthy photos
    assert rates["escape_rate_interval"] == wilson_interval(2, 5)  # 2 of the 5 defective photos


def test_a_rate_without_photos_to_count_is_none_not_zero() -> None:
    # Only healthy photos: nothing could escape, so metrics.json must not claim an escape rate of 0 %.
    only_good = rates_at_threshold(["good", "good", "good"], [1.0, 6.0, 2.0], threshold=5.0)
    assert (only_good["false_alarms"], only_good["false_alarm_rate"]) == (1, pytest.approx(1 / 3))
    assert (only_good["escapes"], only_good["escape_rate"], only_good["escape_rate_interval"]) == (0, None, None)
    assert only_good["recall_per_defect"] == {}
    only_defects = rates_at_threshold(["rust", "rust"], [1.0, 6.0], threshold=5.0)
    assert only_defects["false_alarm_rate"] is None and only_defects["false_alarm_rate_interval"] is None
    assert only_defects["escape_rate"] == pytest.approx(0.5)


def test_each_operating_point_counts_what_its_threshold_flags_and_passes() -> None:
    """Worked on paper: healthy 1-4, defects 2.5, 3.5, 5; a score equal to a threshold is not flagged."""
    kinds = ["good"] * 4 + ["scratch"] * 3
    scores = [1.0, 2.0, 3.0, 4.0, 2.5, 3.5, 5.0]
    points = operating_points(kinds, scores, {0.1: 2.0, 0.01: 4.5, 0.05: 3.5})
    assert [point["false_alarm_rate"] for point in points] == [0.01, 0.05, 0.1]  # strictest first
    assert [(point["false_alarms"], point["escapes"]) for point in points] == [(0, 2), (1, 2), (2, 0)]
    assert [point["f1"] for point in points] == pytest.approx([2 / 4, 2 / 5, 6 / 8])
    assert operating_points(["good", "good"], [1.0, 3.0], {0.01: 2.0})[0]["f1"] is None  # no defects: no F1


def test_wilson_interval_matches_the_formula_and_stays_inside_zero_to_one() -> None:
    # 2 of 27 (z = 1.96): centre (2 + z^2/2) / (27 + z^2), half-width z/(27 + z^2) * sqrt(2*25/27 + z^2/4)
    z = 1.959964
    centre = (2 + z * z / 2) / (27 + z * z)
    half = z / (27 + z * z) * np.sqrt(2 * 25 / 27 + z * z / 4)
    assert wilson_interval(2, 27) == pytest.approx((centre - half, centre + half), rel=1e-5)
    low, high = wilson_interval(0, 27)
    assert low == pytest.approx(0.0, abs=1e-12) and 0.1 < high < 0.14
    assert wilson_interval(0, 0) is None
