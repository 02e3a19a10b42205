"""preprocess auto: every decision rule on both sides of its cut-off, and the pipeline ranking on
sets where the better pipeline is known (one where the measured steps win, one where 'off' wins)."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest

from conftest import part_photo, small_config
from config import Config
from models.patchcore import PatchCore
from models.pipeline_selection import choose_preprocessing
from preprocessing.auto import Decision, PhotoMeasure, decide_steps, measure_photos

CONFIG = Config(image_size=64, preprocess="on")


def same_area(elongation: float) -> float:
    """The short side that gives a part of this elongation a 2,400-pixel area (a steady mask)."""
    return float(np.sqrt(2400 / elongation))


def decided(photos: list[np.ndarray]):
    return decide_steps(measure_photos(photos, CONFIG), CONFIG)


GLARE_WORDS = {
    "off": "glare inpainting off",
    "trial": "glare inpainting left to the trial",
    "on": "glare inpainting on, on the part only",
}


def glare_reason(decision: Decision) -> str:
    """The line ``train.py`` prints for the glare decision."""
    (reason,) = [reason for reason in decision.reasons if reason.startswith("glare")]
    return reason


def assert_glare(decision: Decision, state: str) -> None:
    """Glare inpainting off, left to the trial or on: in the switches and in the printed reason alike."""
    assert decision.changes["inpaint_specular"] is (state == "on")
    assert decision.try_inpainting is (state == "trial")
    assert glare_reason(decision).startswith(GLARE_WORDS[state])


# ----------------------------------------------------------------------------- rotation
def test_rotation_needs_every_elongation_to_clear_the_cutoff_not_just_some():
    """Most parts are long, a few are stubby: a per-set rule that looked at any photo would turn on."""
    elongations = [3.0] * 9 + [1.3, 1.35, 1.4]
    photos = [part_photo(e, a, short=same_area(e)) for e, a in zip(elongations, np.linspace(0, 165, 12))]
    decision = decided(photos)
    assert decision.numbers["elongation_max"] > 2.5 and decision.numbers["elongation_min"] < 1.5
    assert decision.changes["align_rotation"] is False


@pytest.mark.parametrize("least, on", [(1.55, False), (1.85, True)])
def test_rotation_cutoff_is_the_least_elongation_against_1_5_with_a_10_percent_margin(least, on):
    """1.5 x 1.1 = 1.65: a set whose stubbiest part is 1.55 stays unturned, one at 1.85 is turned."""
    elongations = np.linspace(least, 3.0, 10)
    photos = [part_photo(e, a, short=same_area(e)) for e, a in zip(elongations, np.linspace(0, 160, 10))]
    decision = decided(photos)
    assert decision.numbers["elongation_min"] == pytest.approx(least, abs=0.08)
    assert decision.changes["align_rotation"] is on


# ----------------------------------------------------------------------------- the mask
@pytest.mark.parametrize("spread, reliable", [(0.1, True), (0.3, False)])
def test_mask_area_stability_is_relative_to_the_parts_size(spread, reliable):
    """Small parts (1-3 % of the frame) whose area varies by 37 % (over the 25 % cut-off) are not a
    stable mask, though the area's absolute spread is tiny; parts varying by 12 % are."""
    scales = 1 + spread * np.linspace(-1, 1, 10)
    photos = [part_photo(1.5, 20 * i, short=14 * s) for i, s in enumerate(scales)]
    decision = decided(photos)
    variation = decision.numbers["area_variation"]
    assert decision.numbers["area_median"] < 0.05
    assert variation == pytest.approx(0.12 if reliable else 0.37, abs=0.03)
    assert decision.changes["zero_background"] is reliable and decision.changes["segment"] is reliable


@pytest.mark.parametrize("blank, reliable", [(1, True), (2, False)])
def test_the_part_must_be_found_in_95_percent_of_photos(blank, reliable):
    photos = [part_photo(2.0, 15 * i) for i in range(20 - blank)] + [np.full((200, 200, 3), 40, np.uint8)] * blank
    decision = decided(photos)
    assert decision.numbers["part_found"] == pytest.approx((20 - blank) / 20)
    assert decision.changes["zero_background"] is reliable


@pytest.mark.parametrize("on_border, reliable", [(2, True), (3, False)])
def test_at_most_a_fifth_of_the_parts_may_touch_the_frame(on_border, reliable):
    photos = [part_photo(1.5, 10 * i, centre=(12 if i < on_border else 100, 100)) for i in range(10)]
    decision = decided(photos)
    assert decision.numbers["on_border"] == pytest.approx(on_border / 10)
    assert decision.changes["zero_background"] is reliable


@pytest.mark.parametrize("side, reliable", [(150, True), (184, False)])
def test_a_part_filling_most_of_the_frame_leaves_no_background_to_zero(side, reliable):
    """56 % of the frame: the mask is used; 85 %: the photo is used whole."""
    photos = [part_photo(1.0, 0.5 * i, short=side, centre=(100 + i % 3 - 1, 100)) for i in range(8)]
    decision = decided(photos)
    assert decision.numbers["area_median"] == pytest.approx((side / 200) ** 2, abs=0.04)
    assert decision.changes["zero_background"] is reliable


def test_the_border_share_counts_among_the_photos_where_a_part_was_found():
    """4 of the 19 parts found touch the frame (21 %, over the 20 % cut-off); the blank photo is not a part."""
    photos = [part_photo(1.5, 10 * i, centre=(12 if i < 4 else 100, 100)) for i in range(19)]
    decision = decided(photos + [np.full((200, 200, 3), 40, np.uint8)])
    assert decision.numbers["on_border"] == pytest.approx(4 / 19)
    assert decision.changes["zero_background"] is False


def test_the_area_cut_off_applies_to_the_median_photo():
    """Six photos at 78 % of the frame and four close-ups at 95 %: the median photo leaves background to zero."""
    measures = [PhotoMeasure(found=True, area=area, solidity=1.0, elongation=3.0, axis_degrees=30.0 * i)
                for i, area in enumerate([0.78] * 6 + [0.95] * 4)]
    decision = decide_steps(measures, CONFIG)
    assert decision.numbers["area_median"] == pytest.approx(0.78)
    assert decision.changes["zero_background"] is True


def test_a_dim_part_with_a_large_highlight_is_masked_whole():
    """The mask is taken with the glare filled in, as the pipeline takes it: Otsu on the raw photo would
    separate the highlight from a dim part and measure the highlight's area (1-3 % instead of 10 %)."""
    photos = []
    for index, radius in enumerate(np.linspace(10, 18, 8)):
        photo = part_photo(2.5, 20 * index, colour=(90, 90, 90))
        cv2.circle(photo, (100, 100), int(radius), (255, 255, 255), -1)
        photos.append(photo)
    decision = decided(photos)
    assert decision.numbers["area_median"] == pytest.approx(2.5 * 40 * 40 / 200**2, abs=0.01)
    assert decision.changes["zero_background"] is True


# ----------------------------------------------------------------------------- colour and glare
def test_a_steady_colour_cast_leaves_white_balance_off_and_a_changing_one_turns_it_on():
    warm = [part_photo(2.0, 20 * i, colour=(200, 150, 100), table=(60, 45, 30)) for i in range(8)]
    steady = decided(warm)
    assert steady.numbers["cast_median"] > 0.5  # a strong cast, the same in every photo
    assert steady.changes["white_balance"] is False
    changing = [np.clip(photo * np.array([1.0, 1.0, 0.6 + 0.08 * i]), 0, 255).astype(np.uint8)
                for i, photo in enumerate(warm)]
    assert decided(changing).changes["white_balance"] is True


@pytest.mark.parametrize("radius, state", [(0, "off"), (3, "trial"), (6, "on")])
def test_glare_on_a_share_of_the_part_is_inpainted_tried_or_left(radius, state):
    """On an 80 x 40 part a highlight of radius 3 (with its halo) is about 1.5 %, one of radius 6 about 5 %."""
    photos = [part_photo(2.0, 20 * i) for i in range(8)]
    for photo in photos:
        if radius:
            cv2.circle(photo, (100, 100), radius, (255, 255, 255), -1)
    assert_glare(decided(photos), state)


@pytest.mark.parametrize(
    "side, state, share", [(1, "off", 0.0009), (2, "trial", 0.0016), (11, "trial", 0.0172), (13, "on", 0.0230)]
)
def test_glare_is_left_under_a_tenth_of_a_percent_tried_up_to_two_percent_and_inpainted_from_there(side, state, share):
    """On a 140 x 70 part a highlight of side 1, 2, 11 or 13 pixels (with its halo) is 0.09, 0.16, 1.7 or 2.3 %."""
    photos = [part_photo(2.0, 20 * i, short=70) for i in range(8)]
    for photo in photos:
        photo[100:100 + side, 100:100 + side] = 255
    decision = decided(photos)
    assert decision.numbers["glare_median"] == pytest.approx(share, abs=0.0003 if side < 3 else 0.001)
    assert_glare(decision, state)


def test_a_small_highlight_on_a_small_part_counts_against_the_part():
    """A 4 x 4 highlight (6 x 6 with its halo) is 0.09 % of a 200 x 200 photo, far under the 2 % cut-off,
    but 2.3 % of a 20 x 80 part: inpainting must turn on."""
    photos = [part_photo(4.0, 20 * i, short=20) for i in range(8)]
    for photo in photos:
        photo[98:102, 98:102] = 255
    decision = decided(photos)
    assert decision.numbers["glare_median"] > 0.02
    assert decision.changes["inpaint_specular"] is True


def test_glare_is_not_inpainted_without_a_reliable_part_mask():
    photos = [part_photo(1.5, 10 * i, centre=(12 if i % 2 else 100, 100)) for i in range(10)]
    for photo in photos:
        cv2.circle(photo, (100, 100), 6, (255, 255, 255), -1)
    decision = decided(photos)
    assert decision.changes["zero_background"] is False
    assert_glare(decision, "off")
    assert glare_reason(decision).endswith("no reliable part mask)")


# ----------------------------------------------------------------------------- the ranking
def noisy_parts(angles: np.ndarray, seed: int) -> list[np.ndarray]:
    """128-px photos of a 3:1 bar at the given angles, shifted a little, with sensor noise."""
    rng = np.random.default_rng(seed)
    photos = []
    for angle in angles:
        image = np.full((128, 128, 3), 40, np.float32)
        centre = (64 + rng.uniform(-15, 15), 64 + rng.uniform(-15, 15))
        cv2.fillPoly(image, [cv2.boxPoints((centre, (66, 22), float(angle))).astype(np.int32)], (170, 170, 170))
        photos.append(np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8))
    return photos


def test_the_ranking_picks_the_measured_steps_where_parts_lie_at_any_angle():
    """Bars at any angle: aligned by the measured steps, every photo looks alike; fed whole, a bank of
    8 photos cannot cover the angles of 8 others, so 'off' tells healthy from painted defects badly.
    The healthy photos scored are not the bank's (a bank scoring its own photos gives 'off' a
    perfect separation)."""
    photos = noisy_parts(np.random.default_rng(0).uniform(0, 180, 16), seed=0)
    config, record = choose_preprocessing(
        photos, small_config(preprocess="auto", image_size=64, coreset_sampling_ratio=1.0), PatchCore
    )
    scores = record["candidates"]
    assert record["chosen"] == "decided" and config.preprocess == "on" and config.align_rotation
    assert scores["decided"]["image_auroc"] > 0.75
    assert scores["off"]["image_auroc"] < 0.7
    assert scores["decided"]["rank_score"] > scores["off"]["rank_score"] + 0.1


def test_the_ranking_picks_off_where_the_measured_steps_wreck_the_photos():
    """The same bars lying still, with CLAHE at its harshest (a setting 'auto' keeps): it blows the
    sensor noise up into texture on every photo the measured steps feed the network, which then
    separates painted defects far worse than the photos fed whole."""
    photos = noisy_parts(np.zeros(16), seed=0)
    harsh = small_config(preprocess="auto", image_size=64, coreset_sampling_ratio=1.0, clahe=True, clahe_clip_limit=100.0, clahe_tile_grid=64)
    config, record = choose_preprocessing(photos, harsh, PatchCore)
    scores = record["candidates"]
    assert record["chosen"] == "off" and config.preprocess == "off"
    assert scores["off"]["image_auroc"] > scores["decided"]["image_auroc"] + 0.1
    assert scores["off"]["rank_score"] > scores["decided"]["rank_score"] + 0.05


# ----------------------------------------------------------------------------- cut-offs read off measurements
def measured(count: int = 10, **fields: float) -> list[PhotoMeasure]:
    """Measurements of a steady part at varied angles (a reliable mask), with ``fields`` changed."""
    base = {"found": True, "area": 0.2, "solidity": 1.0, "elongation": 3.0}
    return [PhotoMeasure(**{**base, "axis_degrees": 18.0 * i, **fields}) for i in range(count)]


def alternating(field: str, centre: float, amplitude: float) -> list[PhotoMeasure]:
    """``measured()`` with ``field`` alternating between ``centre`` plus and minus ``amplitude``."""
    return [replace(m, **{field: centre + amplitude * (-1) ** i}) for i, m in enumerate(measured())]


@pytest.mark.parametrize("glare, state", [(0.001, "trial"), (0.02, "on")])
def test_glare_exactly_at_a_cut_off_takes_the_step_above_it(glare, state):
    decision = decide_steps(measured(glare=glare), CONFIG)
    assert_glare(decision, state)
    assert f"({glare:.2%} of the part saturated)" in glare_reason(decision)


def test_glare_is_decided_by_the_median_photo_not_by_a_few_shiny_ones():
    measures = measured(8) + measured(2, glare=0.3)  # two photos caught a reflection
    decision = decide_steps(measures, CONFIG)
    assert decision.numbers["glare_median"] == 0.0
    assert_glare(decision, "off")
    assert glare_reason(decision).startswith("glare inpainting off (0.00% of the part saturated")


def test_the_glare_median_counts_only_the_photos_where_a_part_was_found():
    measures = measured(10, glare=0.0012) + measured(9, glare=0.0005) + [PhotoMeasure(found=False)]
    decision = decide_steps(measures, CONFIG)
    assert decision.numbers["part_found"] == 0.95 and decision.changes["zero_background"] is True
    assert decision.numbers["glare_median"] == 0.0012 and decision.try_inpainting is True


def test_glare_between_the_cut_offs_is_not_tried_without_a_reliable_part_mask():
    measures = [replace(m, border=i % 2 == 0) for i, m in enumerate(measured(glare=0.01))]
    decision = decide_steps(measures, CONFIG)
    assert decision.changes["zero_background"] is False
    assert_glare(decision, "off")
    assert glare_reason(decision).endswith("no reliable part mask)")


@pytest.mark.parametrize("variation, reliable", [(0.24, True), (0.26, False)])
def test_the_mask_is_trusted_while_its_area_varies_by_at_most_25_percent(variation, reliable):
    decision = decide_steps(alternating("area", 0.2, 0.2 * variation), CONFIG)
    assert decision.numbers["area_variation"] == pytest.approx(variation)
    assert decision.changes["zero_background"] is reliable


@pytest.mark.parametrize("solidity, fill", [(0.92, "hull"), (0.88, "contour")])
def test_the_hull_is_the_mask_from_a_median_solidity_of_0_9(solidity, fill):
    assert decide_steps(measured(solidity=solidity), CONFIG).changes["mask_fill"] == fill


@pytest.mark.parametrize("spread, balance", [(0.025, False), (0.035, True)])
def test_white_balance_runs_where_the_colour_cast_spreads_over_3_percent(spread, balance):
    decision = decide_steps(alternating("cast", 0.2, spread), CONFIG)
    assert decision.numbers["cast_spread"] == pytest.approx(spread)
    assert decision.changes["white_balance"] is balance
