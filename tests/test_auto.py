"""preprocess auto, first half: one set of steps per data set, decided from measurements of its photos."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from config import Config
from conftest import part_photo
from preprocessing.auto import MAX_MEASURED_PHOTOS, angle_spread, decide, decide_steps, measure_photos
from preprocessing.pipeline import preprocess
from preprocessing.registration import principal_axis

CONFIG = Config(image_size=64, preprocess="on")


def rotation_of(transform: np.ndarray) -> float:
    """Angle (degrees) by which a preprocessing transform turns the photo."""
    return math.degrees(math.atan2(transform[1, 0], transform[0, 0]))


def test_elongation_spanning_the_cutoff_turns_rotation_off_for_every_photo() -> None:
    photos = [part_photo(e, a) for e, a in zip(np.linspace(1.15, 1.55, 12), np.linspace(0, 80, 12))]
    decision = decide_steps(measure_photos(photos, CONFIG), CONFIG)
    assert decision.changes["align_rotation"] is False
    assert any("rotation off" in reason and "cut-off" in reason for reason in decision.reasons)
    decided = CONFIG.replace(**decision.changes)
    # A photo whose plate clears the per-photo cut-off of `preprocess: on` is still not turned: the set's decision holds.
    elongated = part_photo(1.7, 35)
    assert principal_axis(cv2.cvtColor(elongated, cv2.COLOR_RGB2GRAY) > 100).elongation > CONFIG.min_elongation
    assert rotation_of(preprocess(elongated, decided).transform) == pytest.approx(0, abs=1e-6)
    assert abs(rotation_of(preprocess(elongated, CONFIG).transform)) > 10  # 'on' would have turned it


def test_elongated_parts_at_any_angle_turn_rotation_on_for_every_photo() -> None:
    photos = [part_photo(3.0, a) for a in np.linspace(0, 170, 12)]
    decision = decide_steps(measure_photos(photos, CONFIG), CONFIG)
    assert decision.changes["align_rotation"] is True and decision.changes["min_elongation"] == 0
    decided = CONFIG.replace(**decision.changes)
    # A stubby photo, below that cut-off, is turned like every other photo of the set.
    stubby = part_photo(1.3, 40)
    assert abs(rotation_of(preprocess(stubby, decided).transform)) > 10
    assert rotation_of(preprocess(stubby, CONFIG).transform) == pytest.approx(0, abs=1e-6)


def test_parts_in_a_fixture_are_not_rotated() -> None:
    photos = [part_photo(3.0, a) for a in np.linspace(-2, 2, 8)]
    decision = decide_steps(measure_photos(photos, CONFIG), CONFIG)
    assert decision.changes["align_rotation"] is False
    assert any("orientation spread" in reason for reason in decision.reasons)


def test_stubby_parts_in_a_fixture_are_not_rotated_for_their_elongation_first():
    """Both rules fail; the reason names the cut-off, the rule a user would tune (min_elongation)."""
    photos = [part_photo(1.2, a) for a in np.linspace(-2, 2, 8)]
    decision = decide_steps(measure_photos(photos, CONFIG), CONFIG)
    assert decision.changes["align_rotation"] is False
    (rotation,) = [reason for reason in decision.reasons if reason.startswith("rotation")]
    assert "does not clear the cut-off 1.5" in rotation


def test_parts_on_the_border_turn_the_mask_off() -> None:
    photos = [part_photo(1.5, 10 * i, centre=(12 if i % 2 else 100, 100)) for i in range(10)]
    decision = decide_steps(measure_photos(photos, CONFIG), CONFIG)
    switches = ("segment", "crop", "align_rotation", "normalize_scale", "zero_background")
    assert {name: decision.changes[name] for name in switches} == dict.fromkeys(switches, False)  # what runs is what is recorded
    assert decision.numbers["on_border"] == pytest.approx(0.5)


def test_convex_parts_get_the_hull_mask_and_an_l_shape_its_outline() -> None:
    plates = [part_photo(1.5, 10 * i) for i in range(8)]
    assert decide_steps(measure_photos(plates, CONFIG), CONFIG).changes["mask_fill"] == "hull"
    brackets = []
    for i in range(8):
        image = np.full((200, 200, 3), 40, np.uint8)
        cv2.rectangle(image, (50 + i, 50), (150 + i, 80), (170, 170, 170), -1)
        cv2.rectangle(image, (50 + i, 50), (80 + i, 150), (170, 170, 170), -1)
        brackets.append(image)
    assert decide_steps(measure_photos(brackets, CONFIG), CONFIG).changes["mask_fill"] == "contour"


def test_white_balance_only_where_the_cast_changes_between_photos() -> None:
    grey = [part_photo(2.0, 20 * i) for i in range(8)]
    neutral = decide_steps(measure_photos(grey, CONFIG), CONFIG)
    assert neutral.changes["white_balance"] is False and neutral.numbers["cast_median"] == pytest.approx(0)
    assert any(reason.startswith("white balance off (colour cast 0.00, steady") for reason in neutral.reasons)
    tinted = [np.clip(photo * np.array([1.0, 1.0, 0.6 + 0.05 * i]), 0, 255).astype(np.uint8) for i, photo in enumerate(grey)]
    changing = decide_steps(measure_photos(tinted, CONFIG), CONFIG)
    assert changing.changes["white_balance"] is True
    assert any(reason.startswith("white balance on") and "varies" in reason for reason in changing.reasons)


def test_white_balance_is_decided_from_every_photo_also_where_no_part_is_found():
    """Frames filled by the surface (no part mask) still tell whether the colour cast changes."""
    frames = [np.full((100, 100, 3), (150, 150, int(100 + 10 * i)), np.uint8) for i in range(8)]
    decision = decide_steps(measure_photos(frames, CONFIG), CONFIG)
    assert decision.numbers["part_found"] == 0 and decision.changes["zero_background"] is False
    assert decision.changes["white_balance"] is True


def test_glare_on_the_part_turns_inpainting_on() -> None:
    plain = [part_photo(2.0, 20 * i) for i in range(8)]
    assert decide_steps(measure_photos(plain, CONFIG), CONFIG).changes["inpaint_specular"] is False
    shiny = [photo.copy() for photo in plain]
    for photo in shiny:
        cv2.circle(photo, (100, 100), 6, (255, 255, 255), -1)
    assert decide_steps(measure_photos(shiny, CONFIG), CONFIG).changes["inpaint_specular"] is True


def test_inpainting_never_paints_the_table() -> None:
    image = np.full((208, 208, 3), 252, np.uint8)  # a bright, saturated table
    image[60:140, 60:140] = (90, 60, 40)  # a brown part
    image[95:105, 95:105] = 255  # glare on the part
    decided = CONFIG.replace(white_balance=False, clahe=False, crop=False, zero_background=False,
                             align_rotation=False, normalize_scale=False, image_size=208)
    result = preprocess(image, decided)
    assert (result.image[:40, :40] == 252).all() and (result.image[-40:, -40:] == 252).all()
    assert result.image[100, 100].max() < 200  # the glare on the part was filled


def test_angle_spread_wraps_at_180_degrees() -> None:
    assert angle_spread(np.array([179.0, 1.0, 0.5, 179.5])) < 2
    assert angle_spread(np.linspace(0, 180, 36, endpoint=False)) > 40


def test_angle_spread_is_in_degrees_of_the_axis():
    """Axes at +-5 degrees (also across the 180 wrap) spread 5 degrees: the 5-degree fixture rule reads it so."""
    assert angle_spread(np.array([85.0, 95.0])) == pytest.approx(5.0, abs=0.02)
    assert angle_spread(np.array([175.0, 5.0])) == pytest.approx(5.0, abs=0.02)


def test_at_most_60_photos_are_measured_as_an_even_sample_of_the_whole_set():
    """121 photos, the part growing from the first to the last: every third is measured (41), first and last included."""
    photos = []
    for index in range(121):
        image = np.full((100, 100, 3), 40, np.uint8)
        cv2.rectangle(image, (10, 40), (10 + 20 + index // 2, 59), (170, 170, 170), -1)
        photos.append(image)
    measures = measure_photos(photos, CONFIG)
    assert len(measures) == 41 <= MAX_MEASURED_PHOTOS
    areas = [measure.area for measure in measures]
    last = measure_photos(photos[-1:], CONFIG)[0].area
    assert min(areas) == measure_photos(photos[:1], CONFIG)[0].area and max(areas) == last


def test_grabcut_takes_over_where_otsu_splits_a_shaded_part_on_a_light_table() -> None:
    from scripts.synthetic_fasteners import SyntheticSettings, render_sample

    settings = SyntheticSettings(part="plate", n_train=8, size=192, seed=5, table="bright", glare=0.0)
    photos = [render_sample(settings, (0, index), None)[0] for index in range(8)]
    decision = decide(photos, CONFIG)
    assert decision.changes["zero_background"] is True and decision.changes["segmentation_method"] == "grabcut"
    assert decision.reasons[0].startswith("part mask by GrabCut")


def test_otsu_is_kept_where_its_mask_is_reliable():
    photos = [part_photo(2.0, 20 * i) for i in range(6)]
    decision = decide(photos, CONFIG)
    assert decision.changes["zero_background"] is True and decision.changes["segmentation_method"] == "otsu"
    assert not any("GrabCut" in reason for reason in decision.reasons)


def test_where_grabcut_is_no_better_the_decision_and_its_figures_are_otsus():
    """Parts on the frame defeat both masks: the mask is off and the reasons quote Otsu's measurements."""
    photos = [part_photo(1.5, 10 * i, centre=(12 if i % 2 else 100, 100)) for i in range(6)]
    decision = decide(photos, CONFIG)
    otsu = decide_steps(measure_photos(photos, CONFIG), CONFIG)
    assert decision.changes["zero_background"] is False
    assert decision.numbers == otsu.numbers and decision.reasons == otsu.reasons
