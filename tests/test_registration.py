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
    warp_mask,
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


def test_a_nut_on_the_shank_does_not_outweigh_the_head_at_the_far_end() -> None:
    """Only the outer ends decide the head: a bulge part-way along (a nut run onto the shank) is not an end."""
    mask = np.zeros((200, 200), np.uint8)
    cv2.rectangle(mask, (40, 95), (160, 105), 1, -1)  # the shank
    cv2.rectangle(mask, (150, 75), (160, 125), 1, -1)  # the head, on the right
    cv2.rectangle(mask, (70, 80), (95, 120), 1, -1)  # a nut between the middle and the tip
    angle = canonical_rotation(mask > 0, min_elongation=1.5)
    assert math.cos(angle) == pytest.approx(-1, abs=1e-3)  # direction head -> tip points left


def test_blurring_only_the_sampled_part_of_a_wide_photo_gives_what_blurring_all_of_it_would() -> None:
    """The low-pass before a strong shrink runs on a crop for speed: the crop must reach far enough, on any aspect."""
    photo = np.random.default_rng(0).integers(0, 256, (300, 900, 3), np.uint8)
    box = np.array([[380.0, 100.0], [620.0, 100.0], [380.0, 200.0], [620.0, 200.0]])
    matrix = crop_transform(box, 0.0, 64, padding=0.0, keep_aspect=True)
    sigma = (1 / min(np.linalg.svd(matrix[:2, :2], compute_uv=False)) - 1) / 2
    blurred = cv2.GaussianBlur(photo, (0, 0), sigma)
    whole = cv2.warpAffine(blurred, matrix[:2], (64, 64), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    assert np.abs(warp_image(photo, matrix, 64).astype(int) - whole.astype(int)).max() <= 1


def test_a_mask_carried_into_the_model_input_neither_grows_nor_shrinks() -> None:
    """Edge pixels that the resampling leaves partly covered split evenly, so the part keeps its area at model size."""
    mask = ellipse_mask(30)
    matrix = crop_transform(image_outline(240, 240), 0.0, 96, padding=0.0, keep_aspect=True)
    assert warp_mask(mask, matrix, 96).sum() == pytest.approx(mask.sum() * (96 / 240) ** 2, rel=0.02)
