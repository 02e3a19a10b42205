"""Otsu mask with automatic polarity, and honest refusal when there is no clear single object."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from conftest import part_photo
from preprocessing.segmentation import segment_object


def disc_photo(object_value: int, background_value: int, size: int = 200) -> tuple[np.ndarray, np.ndarray]:
    image = np.full((size, size, 3), background_value, np.uint8)
    truth = np.zeros((size, size), np.uint8)
    cv2.ellipse(truth, (size // 2, size // 2), (60, 25), 30, 0, 360, 1, -1)
    image[truth > 0] = object_value
    return image, truth > 0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_dark_object_on_light_background() -> None:
    image, truth = disc_photo(60, 200)
    assert iou(segment_object(image).mask, truth) > 0.9


def test_light_object_on_dark_background() -> None:
    image, truth = disc_photo(210, 40)
    assert iou(segment_object(image).mask, truth) > 0.9


def test_holes_filled_and_specks_removed() -> None:
    image, truth = disc_photo(60, 200)
    cv2.circle(image, (100, 100), 6, (200, 200, 200), -1)  # a bore or glare inside the part
    image[10:12, 10:12] = 60  # dust
    mask = segment_object(image).mask
    assert mask[100, 100] and not mask[10, 10]


def test_dark_corner_does_not_join_the_object() -> None:
    image, truth = disc_photo(60, 200, size=300)
    yy, xx = np.mgrid[:300, :300]
    vignette = 1 - 0.7 * np.exp(-np.hypot(yy - 300, xx) / 150)  # dark bottom-left corner, as in MVTec
    image = (image * vignette[..., None]).astype(np.uint8)
    result = segment_object(image)
    assert result.mask is not None and iou(result.mask, truth) > 0.85


def test_blank_frame_gives_warning_not_mask() -> None:
    result = segment_object(np.full((50, 50, 3), 128, np.uint8))
    assert result.mask is None and "no contrast" in result.warnings[0]


def test_object_touching_border_keeps_its_mask_with_a_warning() -> None:
    image = np.full((100, 100, 3), 200, np.uint8)
    image[30:70, 0:50] = 50
    result = segment_object(image)
    assert result.touches_border and "border" in result.warnings[0]
    truth = np.zeros((100, 100), bool)
    truth[30:70, 0:50] = True
    assert iou(result.mask, truth) > 0.9


def test_hull_fill_puts_back_a_shiny_bite_out_of_the_edge() -> None:
    image, truth = disc_photo(60, 200)
    cv2.circle(image, (100 + 55, 100 + 30), 12, (200, 200, 200), -1)  # glare on the rim reads as table
    outline, hull = segment_object(image).mask, segment_object(image, fill="hull").mask
    assert iou(hull, truth) > iou(outline, truth) + 0.01
    assert iou(hull, truth) > 0.95


def test_working_mask_is_the_full_mask_at_working_size_and_gives_the_same_pose() -> None:
    """Pose and solidity are read off the small working mask; it must be the mask the photo gets, only smaller."""
    from preprocessing.registration import canonical_rotation
    from preprocessing.segmentation import WORKING_SIDE

    image = np.full((1024, 768, 3), 200, np.uint8)
    cv2.ellipse(image, (400, 500), (300, 90), 35, 0, 360, (60, 60, 60), -1)
    cv2.circle(image, (200, 400), 110, (60, 60, 60), -1)  # a heavy end: the direction matters too
    found = segment_object(image)
    assert max(found.working_mask.shape) == WORKING_SIDE
    enlarged = cv2.resize(found.working_mask.astype(np.uint8), (768, 1024), interpolation=cv2.INTER_NEAREST) > 0
    assert np.array_equal(enlarged, found.mask)
    assert abs(canonical_rotation(found.working_mask, 1.5) - canonical_rotation(found.mask, 1.5)) < 1e-3


def test_a_speck_of_dust_on_an_empty_table_is_no_part() -> None:
    """A dark spot of 150 pixels (under 0.1 % of the frame) survives the clean-up but is not taken for the part."""
    image = np.full((512, 512, 3), 200, np.uint8)
    cv2.circle(image, (256, 256), 7, (60, 60, 60), -1)
    result = segment_object(image)
    assert result.mask is None and result.warnings == ["no object found by thresholding; using the whole image"]


def test_a_mask_covering_almost_the_whole_frame_is_taken_for_the_background() -> None:
    image = np.full((300, 300, 3), 60, np.uint8)
    image[:3], image[-3:], image[:, :3], image[:, -3:] = 200, 200, 200, 200  # a light rim round a dark frame
    result = segment_object(image)
    assert result.mask is None and "object mask covers 96% of the photo" in result.warnings[0]


def test_grabcut_finds_a_part_both_darker_and_lighter_than_the_table() -> None:
    """Half the part is darker than the table, half lighter: Otsu gets one half, GrabCut the whole part."""
    image = np.clip(np.random.default_rng(0).normal(140, 6, (240, 320, 3)), 0, 255).astype(np.uint8)
    image[80:160, 60:160], image[80:160, 160:260] = (40, 40, 150), (230, 200, 40)
    truth = np.zeros((240, 320), bool)
    truth[80:160, 60:260] = True
    assert iou(segment_object(image, method="otsu").mask, truth) < 0.6
    assert iou(segment_object(image, method="grabcut").mask, truth) > 0.95


def test_a_thin_fibre_lying_across_part_and_table_does_not_join_the_mask() -> None:
    """A 2-pixel fibre from the part out to near the frame's edge would stretch the crop to frame it too."""
    image, truth = disc_photo(60, 200)
    cv2.line(image, (100, 100), (190, 20), (60, 60, 60), 2)
    mask = segment_object(image).mask
    assert not mask[20:60, 160:195].any() and iou(mask, truth) > 0.95


@pytest.mark.parametrize(
    "centre", [(100, 10), (100, 190), (25, 100), (175, 100)], ids=["top", "bottom", "left", "right"]
)
def test_a_part_cut_off_by_any_edge_of_the_frame_is_flagged(centre: tuple[int, int]) -> None:
    result = segment_object(part_photo(centre=centre))
    assert result.mask is not None and result.touches_border and "border" in result.warnings[0]


def test_a_small_part_of_a_third_of_a_percent_of_the_frame_is_still_the_part() -> None:
    """The dust limit (0.1 % of the frame) must not turn away a small part, such as a washer shot from afar."""
    result = segment_object(part_photo(short=20, size=512, centre=(256, 256)))
    assert result.mask is not None and 0.002 < result.mask.mean() < 0.005 and not result.warnings


def test_the_part_is_the_blob_of_largest_area_not_a_round_speck_with_a_longer_outline() -> None:
    """A straight-edged part has a 4-point outline; a round speck beside it has many more points but less area."""
    image = part_photo()
    cv2.circle(image, (30, 30), 8, (170, 170, 170), -1)
    mask = segment_object(image).mask
    assert mask[100, 100] and not mask[30, 30]


@pytest.mark.parametrize("quarter_turns", [0, 1, 2, 3], ids=["right", "top", "left", "bottom"])
def test_grabcut_keeps_a_part_cut_off_by_the_frame_and_flags_it(quarter_turns: int) -> None:
    """The part's pixels on the frame's edge are not table: seeded as table, GrabCut loses the whole part."""
    noise = np.random.default_rng(0).normal(0, 6, (200, 200, 3))
    photo = np.clip(part_photo(elongation=3.0, short=40, centre=(160, 100)) + noise, 0, 255).astype(np.uint8)
    photo = np.ascontiguousarray(np.rot90(photo, quarter_turns))
    result = segment_object(photo, method="grabcut")
    assert result.mask is not None and result.touches_border and "border" in result.warnings[0]
    assert iou(result.mask, segment_object(photo).mask) > 0.9


@pytest.mark.parametrize("table", ["dark", "bright"])
def test_a_mottled_table_along_the_frame_stays_table_to_grabcut(table: str) -> None:
    """Only colours that stand out from the band's own spread are left unseeded, not the table's mottling."""
    from scripts.synthetic_fasteners import SyntheticSettings, render_sample

    settings = SyntheticSettings(part="plate", n_train=6, size=160, seed=11, table=table, glare=0.0)
    for index in range(6):
        photo = render_sample(settings, (0, index), None)[0]
        result = segment_object(photo, method="grabcut")
        assert result.mask is not None and not result.touches_border and not result.warnings


def test_a_grabcut_miss_names_grabcut_not_thresholding() -> None:
    image = np.full((512, 512, 3), 200, np.uint8)
    cv2.circle(image, (256, 256), 7, (60, 60, 60), -1)
    result = segment_object(image, method="grabcut")
    assert result.mask is None and result.warnings == ["no object found by GrabCut; using the whole image"]
