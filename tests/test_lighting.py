"""Each lighting step does what its name says, and leaves input it cannot help alone."""

from __future__ import annotations

import tracemalloc

import cv2
import numpy as np
import pytest

from preprocessing.lighting import clahe_lab, gray_world, inpaint_specular, specular_mask


def tinted_image() -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(60, 180, size=(64, 64, 1)).astype(np.float32)
    return np.clip(base * np.array([1.2, 1.0, 0.7]), 0, 255).astype(np.uint8)


def noisy_flat_grey() -> np.ndarray:
    """A flat grey part with faint noise: all CLAHE can do is amplify that noise."""
    rng = np.random.default_rng(1)
    flat = (120 + rng.integers(-4, 5, size=(128, 128))).astype(np.uint8)
    return np.repeat(flat[..., None], 3, axis=2)


def test_gray_world_equalises_channel_means() -> None:
    image = tinted_image()
    means = gray_world(image).image.reshape(-1, 3).mean(axis=0)
    assert means.max() - means.min() < 1.0
    assert np.ptp(image.reshape(-1, 3).mean(axis=0)) > 20  # there was a cast to remove


@pytest.mark.parametrize("seed", range(5))
def test_gray_world_scales_each_channel_by_target_over_its_mean_rounded_to_the_nearest_level(seed: int) -> None:
    """What the step promises, pixel for pixel: level × (mean of the channel means / the channel's mean),
    clipped to 0..255 and rounded half to even, the gain in double precision."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    image[..., seed % 3] = (image[..., seed % 3] * 0.6).astype(np.uint8)  # a cast to remove
    means = image.reshape(-1, 3).astype(np.float64).mean(axis=0)
    expected = np.clip(image.astype(np.float32) * (means.mean() / means), 0, 255).round().astype(np.uint8)
    assert np.array_equal(gray_world(image).image, expected)


def test_gray_world_of_a_large_photo_needs_no_more_memory_than_its_result() -> None:
    """A float copy of a 100-megapixel photo takes gigabytes; a line PC scoring one must not need them."""
    image = tinted_image()
    large = np.tile(image, (32, 32, 1))  # 2048 x 2048
    tracemalloc.start()
    try:
        gray_world(large)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * large.nbytes


def test_gray_world_leaves_grey_input_bit_exact() -> None:
    grey = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=2)
    result = gray_world(grey)
    assert np.array_equal(result.image, grey) and not result.warnings


def test_gray_world_warns_on_missing_channel() -> None:
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 200
    result = gray_world(red)
    assert np.array_equal(result.image, red) and result.warnings


def test_gray_world_refuses_a_gain_above_its_limit_for_a_faint_channel() -> None:
    """Blue at 10 beside red and green at 100 would need a gain of 7: a missing channel, not a tint."""
    faint = np.dstack([np.full((8, 8), 100, np.uint8), np.full((8, 8), 100, np.uint8), np.full((8, 8), 10, np.uint8)])
    faint[0, 0] = (101, 99, 11)  # not grey
    result = gray_world(faint)
    assert np.array_equal(result.image, faint) and result.warnings == ["white balance skipped: a colour channel is almost empty"]


def test_gray_world_saturates_a_boosted_highlight_instead_of_wrapping_it_dark() -> None:
    """Blue needs a gain above 1 here: a near-white pixel must clip at 255, not wrap round to a dark blotch."""
    image = tinted_image()
    image[10, 10] = (250, 250, 250)
    balanced = gray_world(image).image
    assert balanced[..., 2].mean() > image[..., 2].mean()  # blue was boosted
    assert balanced[10, 10, 2] == 255


def test_gray_world_changes_the_colour_not_the_exposure() -> None:
    """Balancing to the mean of the channel means keeps the photo's brightness; a brighter target would wash it out."""
    image = tinted_image()
    assert abs(gray_world(image).image.mean() - image.mean()) < 1.0


def test_a_grey_photo_s_pixel_at_the_specular_threshold_counts_as_glare() -> None:
    """A single-channel photo takes its own branch: it must treat the threshold as inclusive like a colour one."""
    grey = np.full((32, 32), 120, np.uint8)
    grey[16, 16] = 250
    glare = specular_mask(grey, threshold=250)
    assert glare[16, 16] and glare[15:18, 15:18].all() and glare.sum() == 9  # the spot and its 1-pixel halo


def test_a_pixel_at_the_specular_threshold_counts_as_glare() -> None:
    image = np.full((64, 64, 3), 120, np.uint8)
    image[:, :, 1] = np.linspace(100, 140, 64).astype(np.uint8)
    cv2.circle(image, (32, 32), 3, (255, 255, 255), -1)
    assert inpaint_specular(image, threshold=255).image.max() < 255  # threshold 255: pure white is glare


def test_inpainting_removes_saturated_spot() -> None:
    image = np.full((64, 64, 3), 120, np.uint8)
    image[:, :, 1] = np.linspace(100, 140, 64).astype(np.uint8)  # texture to inpaint from
    cv2.circle(image, (32, 32), 4, (255, 255, 255), -1)
    result = inpaint_specular(image, threshold=250).image
    assert result.max() < 250
    assert np.abs(result[32, 32].astype(int) - [120, 120, 120]).max() < 15


def test_inpainting_skips_overexposed_photo() -> None:
    white = np.full((32, 32, 3), 255, np.uint8)
    result = inpaint_specular(white, threshold=250)
    assert np.array_equal(result.image, white) and result.warnings


def test_clahe_raises_local_contrast() -> None:
    image = noisy_flat_grey()
    enhanced = clahe_lab(image, clip_limit=4.0, tile_grid=4).image
    assert enhanced[..., 0].std() > 2 * image[..., 0].std()


def test_clahe_boosts_contrast_no_more_than_its_clip_limit_allows() -> None:
    """The clip limit is the user's cap on noise amplification: a low limit must give a mild boost."""
    image = noisy_flat_grey()
    for clip_limit in (1.0, 2.0):
        enhanced = clahe_lab(image, clip_limit=clip_limit, tile_grid=4).image
        assert enhanced[..., 0].std() < (clip_limit + 1.5) * image[..., 0].std()


def test_clahe_keeps_colour_and_skips_tiny_images() -> None:
    image = tinted_image()
    enhanced = clahe_lab(image, clip_limit=2.0, tile_grid=4).image
    hue = lambda rgb: cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[..., 1:].mean(axis=(0, 1))  # noqa: E731
    assert np.abs(hue(enhanced) - hue(image)).max() < 3
    tiny = np.full((5, 5, 3), 9, np.uint8)
    result = clahe_lab(tiny, clip_limit=2.0, tile_grid=8)
    assert np.array_equal(result.image, tiny) and result.warnings
