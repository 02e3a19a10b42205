"""Ground-truth masks: every non-zero pixel is defect, whatever grey level the mask tool wrote."""

from __future__ import annotations

import cv2
import numpy as np

from preprocessing.io import read_mask


def test_every_non_zero_pixel_of_a_mask_is_defect(tmp_path):
    levels = np.array([[0, 1, 64], [128, 200, 255]], np.uint8)
    cv2.imwrite(str(tmp_path / "grey_mask.png"), levels)
    cv2.imwrite(str(tmp_path / "colour_mask.png"), np.dstack([np.zeros_like(levels), levels, np.zeros_like(levels)]))
    expected = levels > 0
    assert np.array_equal(read_mask(tmp_path / "grey_mask.png"), expected)
    assert np.array_equal(read_mask(tmp_path / "colour_mask.png"), expected)
