"""Anomaly maps at the evaluation size: the common size of maps and masks for pixel metrics and of the
maps a report keeps per photo. OpenCV and NumPy only, so the batch page needs no metrics libraries."""

from __future__ import annotations

import cv2
import numpy as np

DEFAULT_EVAL_SIZE = 256  # longer side, in pixels, of maps and masks for the pixel metrics


def eval_shape(shape: tuple[int, int], eval_size: int) -> tuple[int, int]:
    """(height, width) with the longer side at ``eval_size`` and the aspect ratio kept."""
    height, width = shape[:2]
    scale = eval_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def shrink_map(anomaly_map: np.ndarray, eval_size: int = DEFAULT_EVAL_SIZE) -> np.ndarray:
    """The map with its longer side at ``eval_size``: area-averaged, or linear when enlarging."""
    height, width = eval_shape(anomaly_map.shape, eval_size)
    enlarging = height > anomaly_map.shape[0]
    return cv2.resize(
        np.asarray(anomaly_map, dtype=np.float32),
        (width, height),
        interpolation=cv2.INTER_LINEAR if enlarging else cv2.INTER_AREA,
    )
