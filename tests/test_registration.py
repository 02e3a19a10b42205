"""Moments, canonical direction and the crop/rotate/scale matrix, checked against known geometry."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from preprocessing.registration import (
    canonical_rotation,
    crop_transform,
    image_outline,
    object_outline,
    principal_axis,
    warp_image,
)


def ellipse_mask(angle_deg: float, axes: tuple[int, int] = (80, 20)) -> np.ndarray:
    mask = np.zeros((240, 240), np.uint8)
    cv2.ellipse(mask, (120, 120), axes, angle_deg, 0, 360, 1, -1)
    return mask > 0


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return cv2.perspectiveTransform(points[None].astype(np.float64), matrix)[0]


@pytest.mark.parametrize("angle_deg", [0, 25, 70, 115, 160])
def test_principal_axis_of_ellipse(angle_deg: float) -> None:
    pose = principal_axis(ellipse_mask(angle_deg))
    difference = (math.degrees(pose.axis_angle) - angle_deg + 90) % 180 - 90
    assert abs(difference) < 1
    assert pose.elongation == pytest.approx(4, rel=0.05)
    assert pose.centre == pytest.approx((120, 120), abs=0.5)


def test_heavy_end_decides_direction() -> None:
    mask = np.zeros((200, 200), np.uint8)
    cv2.rectangle(mask, (40, 90), (160, 110), 1, -1)
    cv2.rectangle(mask, (150, 70), (165, 130), 1, -1)  # the head is on the right
    angle = canonical_rotation(mask > 0, min_elongation=1.5)
    assert math.cos(angle) == pytest.approx(-1, abs=1e-3)  # direction head -> tip points left


def test_round_shape_is_not_rotated() -> None:
    assert canonical_rotation(ellipse_mask(33, axes=(50, 48)), min_elongation=1.5) == 0.0


def test_a_part_with_ends_of_equal_mass_is_not_turned_end_over_end() -> None:
    """A symmetric bar has no head: it keeps the direction needing the smaller turn, never a half turn."""
    bar = np.zeros((100, 200), bool)
    bar[40:60, 20:180] = True
    assert canonical_rotation(bar, min_elongation=1.5) == pytest.approx(0.0, abs=1e-9)


def test_crop_transform_centres_and_fills_long_axis() -> None:
    mask = ellipse_mask(30)
    angle = principal_axis(mask).axis_angle
    matrix = crop_transform(object_outline(mask), angle, 128, padding=0.1, keep_aspect=True)
    centre = apply(matrix, np.array([[120.0, 120.0]]))[0]
    assert centre == pytest.approx((63.5, 63.5), abs=0.6)
    tips = apply(matrix, np.array([[120 + 80 * math.cos(math.radians(30)), 120 + 80 * math.sin(math.radians(30))]]))
    assert abs(tips[0, 1] - 63.5) < 1  # the long axis lies horizontal
    assert abs(tips[0, 0] - 63.5) == pytest.approx(64 / 1.2, abs=1.5)  # long side + padding fills the square


def test_crop_transform_stretch_fills_both_axes() -> None:
    mask = ellipse_mask(0)
    matrix = crop_transform(object_outline(mask), 0.0, 128, padding=0.0, keep_aspect=False)
    corners = apply(matrix, np.array([[39.5, 99.5], [200.5, 140.5]]))
    assert corners[0] == pytest.approx((-0.5, -0.5), abs=1.5)
    assert corners[1] == pytest.approx((127.5, 127.5), abs=1.5)


def test_whole_image_outline_without_rotation_is_plain_resize() -> None:
    matrix = crop_transform(image_outline(300, 200), 0.0, 64, padding=0.0, keep_aspect=False)
    expected = np.array([[64 / 200, 0, 0.5 * 64 / 200 - 0.5], [0, 64 / 300, 0.5 * 64 / 300 - 0.5], [0, 0, 1]])
    assert np.allclose(matrix, expected)


def test_warp_image_antialiases_a_strong_shrink() -> None:
    stripes = np.zeros((512, 512, 3), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: pure aliasing when sampled without a low-pass
    matrix = crop_transform(image_outline(512, 512), 0.0, 64, padding=0.0, keep_aspect=True)
    assert warp_image(stripes, matrix, 64).astype(float).std() < 20
    # 500 -> 64 puts the samples at varying phases of the stripes: without the low-pass they alias.
    stripes = stripes[:500, :500]
    matrix = crop_transform(image_outline(500, 500), 0.0, 64, padding=0.0, keep_aspect=True)
    assert cv2.warpAffine(stripes, matrix[:2], (64, 64), flags=cv2.INTER_LINEAR).astype(float).std() > 50
    assert warp_image(stripes, matrix, 64).astype(float).std() < 20
