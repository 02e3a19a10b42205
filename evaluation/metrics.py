"""Image- and pixel-level detection metrics, as the MVTec AD benchmark defines them.

Image level: AUROC, average precision, F1 at the calibrated threshold and the (oracle) best F1, and
the line's own figures at the threshold: false alarms and escapes with their intervals.
Pixel level: pixel AUROC and AUPRO, computed on anomaly maps and ground-truth masks brought to a
common evaluation size first (``downsample_for_eval``), which keeps memory bounded: 160 photos of
1024² would otherwise need 160 M float pixels plus sorting buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from scipy import ndimage
from scipy.stats import binomtest
from sklearn.metrics import (
    auc,
    average_precision_score,
    f1_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from evaluation.maps import DEFAULT_EVAL_SIZE, shrink_map

DEFAULT_MAX_FPR = 0.3  # AUPRO integration limit of the MVTec AD benchmark
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def is_flagged(scores: np.ndarray | Sequence[float], threshold: float) -> np.ndarray:
    """The one decision rule of the toolkit: an image is anomalous when its score exceeds the threshold."""
    return np.asarray(scores, dtype=np.float64) > threshold


def image_metrics(
    is_defective: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: float
) -> dict[str, float | None]:
    """Image-level AUROC, AP, F1 at ``threshold`` and F1-max with its threshold.

    F1-max picks its threshold on the test labels themselves, so it is an oracle figure (what the
    best possible threshold would give), not what the calibrated model achieves. Figures that need
    both classes are None when the test set has only one.
    """
    labels = np.asarray(is_defective, dtype=bool)
    values = np.asarray(scores, dtype=np.float64)
    result: dict[str, float | None] = dict.fromkeys(
        ("image_auroc", "image_ap", "image_f1_at_threshold", "image_f1_max", "image_f1_max_threshold")
    )
    if labels.any():
        result["image_f1_at_threshold"] = float(
            f1_score(labels, is_flagged(values, threshold), zero_division=0.0)
        )
    if labels.all() or not labels.any():
        return result
    result["image_auroc"] = float(roc_auc_score(labels, values))
    result["image_ap"] = float(average_precision_score(labels, values))
    precision, recall, thresholds = precision_recall_curve(labels, values)
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    best = int(np.argmax(f1))
    result["image_f1_max"] = float(f1[best])
    # The curve flags scores >= its cut; the toolkit flags scores > the threshold (is_flagged). Halfway down to
    # the next lower score flags the same photos, so --threshold with this figure gives F1-max, not one escape more.
    below = values[values < thresholds[best]]
    result["image_f1_max_threshold"] = float((thresholds[best] + below.max()) / 2 if below.size
                                             else np.nextafter(thresholds[best], -np.inf))
    return result


def wilson_interval(hits: int, trials: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of a rate seen ``hits`` times in ``trials`` (None without trials): unlike
    hits/trials +- a normal margin, it stays inside 0..1 and is honest about 0 of 27."""
    if trials == 0:
        return None
    interval = binomtest(hits, trials).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def rates_at_threshold(kinds: Sequence[str], scores: Sequence[float] | np.ndarray, threshold: float) -> dict[str, Any]:
    """What the line sees at ``threshold``: healthy ('good') photos flagged (false alarms), defective
    photos passed (escapes), each as a count, a rate and a 95 % Wilson interval, and recall per defect kind."""
    kinds_array = np.asarray(kinds)
    flagged = is_flagged(scores, threshold)
    good = kinds_array == "good"
    false_alarms, escapes = int(flagged[good].sum()), int((~flagged[~good]).sum())
    n_good, n_defective = int(good.sum()), int((~good).sum())
    return {
        "false_alarms": false_alarms,
        "false_alarm_rate": false_alarms / n_good if n_good else None,
        "false_alarm_rate_interval": wilson_interval(false_alarms, n_good),
        "escapes": escapes,
        "escape_rate": escapes / n_defective if n_defective else None,
        "escape_rate_interval": wilson_interval(escapes, n_defective),
        "recall_per_defect": {
            kind: float(flagged[kinds_array == kind].mean()) for kind in sorted(set(kinds_array.tolist()) - {"good"})
        },
    }


def operating_points(kinds: Sequence[str], scores: Sequence[float] | np.ndarray,
                     thresholds: dict[float, float]) -> list[dict[str, Any]]:
    """What each promised false-alarm rate's threshold does on these photos: the healthy ('good')
    photos it flags, the defective ones it passes and the F1, one row per rate, lowest rate first.

    ``thresholds`` maps each rate to the threshold the model's healthy scores give it, so a line can
    see what a stricter or looser setting costs in escapes before choosing it."""
    n_defective = sum(kind != "good" for kind in kinds)
    points = []
    for rate, threshold in sorted(thresholds.items()):
        at = rates_at_threshold(kinds, scores, threshold)
        caught = n_defective - at["escapes"]
        points.append({
            "false_alarm_rate": rate,
            "threshold": float(threshold),
            "false_alarms": at["false_alarms"],
            "escapes": at["escapes"],
            "f1": 2 * caught / (2 * caught + at["false_alarms"] + at["escapes"]) if n_defective else None,
        })
    return points


def per_defect_auroc(kinds: Sequence[str], scores: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """AUROC of healthy ('good') images against each defect kind alone: which defects the model misses."""
    kinds_array = np.asarray(kinds)
    values = np.asarray(scores, dtype=np.float64)
    good = kinds_array == "good"
    result: dict[str, float | None] = {}
    for kind in sorted(set(kinds_array.tolist()) - {"good"}):
        selected = good | (kinds_array == kind)
        result[kind] = (
            float(roc_auc_score(kinds_array[selected] == kind, values[selected])) if good.any() else None
        )
    return result


def region_labels(mask: np.ndarray) -> np.ndarray:
    """Connected defect regions of a mask (8-connected, as the MVTec AD evaluation code), 0 = healthy."""
    labels, _ = ndimage.label(np.asarray(mask, dtype=bool), structure=_EIGHT_CONNECTED)
    return labels.astype(np.int32)


def downsample_for_eval(
    anomaly_map: np.ndarray, mask: np.ndarray | None, eval_size: int = DEFAULT_EVAL_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Bring a full-resolution map and its mask to the evaluation size, as (map, region labels).

    The map is area-averaged (linear when enlarging). Defect regions are labelled at full
    resolution and the label image is resized nearest-neighbour, so a thin scratch that the
    coarser grid samples into pieces still counts as one region; a region too small to hit any
    grid cell keeps one cell at its centre, so no ground-truth defect silently drops out of AUPRO.
    ``mask`` None means a healthy image (all zero).
    """
    small_map = shrink_map(anomaly_map, eval_size)
    height, width = small_map.shape
    if mask is None:
        return small_map, np.zeros((height, width), dtype=np.int32)
    full_labels = region_labels(mask)
    small_labels = cv2.resize(full_labels, (width, height), interpolation=cv2.INTER_NEAREST)
    missing = np.setdiff1d(np.arange(1, full_labels.max() + 1), small_labels)
    if missing.size:
        centres = ndimage.center_of_mass(full_labels > 0, full_labels, missing)
        for label, (row, col) in zip(missing, centres):
            cell = (min(int(row * height / full_labels.shape[0]), height - 1),
                    min(int(col * width / full_labels.shape[1]), width - 1))
            if small_labels[cell] == 0:  # never overwrite another region
                small_labels[cell] = label
    return small_map, small_labels


def _flatten(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """All pixels of all images as one score vector and one globally numbered region-label vector.

    ``masks`` may be boolean (labelled here) or region-label images from ``downsample_for_eval``.
    """
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} maps but {len(masks)} masks")
    scores, labels, offset = [], [], 0
    for anomaly_map, mask in zip(maps, masks):
        if anomaly_map.shape != mask.shape:
            raise ValueError(f"map shape {anomaly_map.shape} differs from mask shape {mask.shape}")
        image_labels = region_labels(mask) if mask.dtype == bool else np.asarray(mask, dtype=np.int64)
        scores.append(np.asarray(anomaly_map, dtype=np.float32).ravel())
        labels.append(np.where(image_labels > 0, image_labels.astype(np.int64) + offset, 0).ravel())
        offset += int(image_labels.max(initial=0))
    return np.concatenate(scores), np.concatenate(labels)


def pixel_roc(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]
) -> tuple[float, np.ndarray, np.ndarray] | None:
    """Pixel AUROC with its ROC curve (fpr, tpr); None when no pixel, or every pixel, is defective."""
    scores, labels = _flatten(maps, masks)
    defective = labels > 0
    if defective.all() or not defective.any():
        return None
    fpr, tpr, _ = roc_curve(defective, scores)
    return float(auc(fpr, tpr)), fpr, tpr


def pro_curve(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-region overlap (PRO) against false-positive rate, for every distinct score as threshold.

    At threshold t a pixel is flagged when its score >= t. FPR = flagged healthy pixels / all
    healthy pixels of all images; PRO = mean over ground-truth regions of the flagged fraction of
    that region. Sorting the pixels once by descending score and accumulating per-pixel weights
    (1/#healthy for healthy pixels, 1/(region size × #regions) for defect pixels) gives both
    curves exactly; ties are resolved by keeping only the last pixel of each run of equal scores.
    The curve starts at (0, 0) (threshold above every score) and ends at (1, 1). None when there
    is no defect region or no healthy pixel.
    """
    scores, labels = _flatten(maps, masks)
    healthy = labels == 0
    n_healthy, n_regions = int(healthy.sum()), len(np.unique(labels[~healthy]))
    if n_healthy == 0 or n_regions == 0:
        return None
    region_sizes = np.bincount(labels)
    order = np.argsort(scores, kind="stable")[::-1]
    sorted_labels = labels[order]
    fpr = np.cumsum(sorted_labels == 0) / n_healthy
    pro_weight = np.zeros(len(sorted_labels))
    defect = sorted_labels > 0
    pro_weight[defect] = 1.0 / (region_sizes[sorted_labels[defect]] * n_regions)
    pro = np.cumsum(pro_weight)
    sorted_scores = scores[order]
    last_of_run = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    return (np.concatenate(([0.0], np.minimum(fpr[last_of_run], 1.0))),
            np.concatenate(([0.0], np.minimum(pro[last_of_run], 1.0))))


def area_under_pro(fpr: np.ndarray, pro: np.ndarray, max_fpr: float = DEFAULT_MAX_FPR) -> float:
    """Integral of PRO over FPR in [0, max_fpr] divided by max_fpr (1.0 = perfect, 0.15 = constant map).

    The curve is linearly interpolated at exactly ``max_fpr``; ``fpr`` must be non-decreasing.
    """
    end = int(np.searchsorted(fpr, max_fpr, side="right"))
    x, y = fpr[:end], pro[:end]
    if end < len(fpr) and x[-1] < max_fpr:
        x = np.append(x, max_fpr)
        y = np.append(y, np.interp(max_fpr, fpr[end - 1:end + 1], pro[end - 1:end + 1]))
    return float(np.trapezoid(y, x) / max_fpr)


def aupro(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], max_fpr: float = DEFAULT_MAX_FPR
) -> float | None:
    """Normalised area under the PRO curve up to ``max_fpr``; None without defect regions.

    The one-call form for library users and tests; the report builds the curve once with
    ``pro_curve`` because it also plots it.
    """
    curve = pro_curve(maps, masks)
    return None if curve is None else area_under_pro(*curve, max_fpr)
