"""paint_defect: defects painted onto photos of any size, with a mask that is exactly what changed."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from synthetic.defects import DEFECT_KINDS, HALO, paint_defect

EDGE_KINDS = ("missing", "dent")
SURFACE_KINDS = ("rust", "corrosion", "scratch")


def photo_of_part(shape: tuple[int, int], centre: tuple[int, int], axes: tuple[int, int], angle: float,
                  part_level: float = 200.0, hole: int = 0, marks: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A bright, slightly textured elliptical part on a dark textured table, blurred like a camera;
    optionally with a round hole of radius `hole` in its middle (a washer) and machining marks of
    amplitude `marks` across its metal, which the plain table does not have."""
    noise = np.random.default_rng(99)
    mask = np.zeros(shape, np.uint8)
    cv2.ellipse(mask, centre, axes, angle, 0, 360, 1, -1)
    if hole:
        cv2.circle(mask, centre, hole, 0, -1)
    metal = part_level + marks * np.sin(1.3 * np.arange(shape[1]))  # vertical stripes 5 px apart
    level = np.where(mask > 0, metal, 45.0) + noise.normal(0, 6, shape)
    image = cv2.GaussianBlur(level.astype(np.float32), (0, 0), 0.8)
    rgb = np.clip(np.repeat(image[..., None], 3, axis=2), 0, 255).astype(np.uint8)
    return rgb, mask > 0


def near_part(mask: np.ndarray) -> np.ndarray:
    return cv2.dilate(mask.astype(np.uint8), np.ones((2 * HALO + 1,) * 2, np.uint8)) > 0


def check_painted(image: np.ndarray, part: np.ndarray, kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Paint once and check what holds for every defect: mask == changed pixels, on the part, visible,
    small compared with the part."""
    painted, mask = paint_defect(image, part, kind, np.random.default_rng(seed))
    assert painted.dtype == np.uint8 and painted.shape == image.shape and mask.dtype == bool
    np.testing.assert_array_equal(mask, np.any(painted != image, axis=2))
    assert mask.any(), f"{kind}: nothing painted"
    assert not (mask & ~near_part(part)).any(), f"{kind}: changed pixels away from the part"
    change = np.abs(painted.astype(int) - image.astype(int)).max(axis=2)
    assert change[mask].max() > 40, f"{kind}: not visible"
    share = mask.sum() / part.sum()
    smallest = 0.0008 if kind == "scratch" else 0.004  # a scratch is a thin line
    assert smallest < share < 0.08, f"{kind}: covers {share:.2%} of the part"
    return painted, mask


@pytest.mark.parametrize("kind", DEFECT_KINDS)
@pytest.mark.parametrize("shape", [(240, 320), (400, 300)])
def test_each_kind_changes_exactly_its_mask_on_the_part(kind: str, shape: tuple[int, int]) -> None:
    image, part = photo_of_part(shape, (shape[1] // 2, shape[0] // 2), (shape[1] // 4, shape[0] // 6), 20)
    for seed in range(3):
        check_painted(image, part, kind, seed)


# Parts the frame cuts off: (image shape, ellipse centre, axes, angle).
BORDER_CROSSINGS = {
    "left third outside": ((256, 256), (20, 128), (90, 40), 0),
    "across the bottom right corner": ((200, 200), (170, 190), (70, 30), 45),
    "across the top": ((200, 200), (170, 10), (46, 22), 101),
}


@pytest.mark.parametrize("kind", DEFECT_KINDS)
@pytest.mark.parametrize("crossing", BORDER_CROSSINGS)
def test_a_part_crossing_the_border_still_gets_its_defect(kind: str, crossing: str) -> None:
    """Wherever the frame cuts the part, each kind is painted as on a whole part, and a chip or a dent
    is put where all of it shows: it never reaches the frame, where part of it would be cut off."""
    image, part = photo_of_part(*BORDER_CROSSINGS[crossing])
    for seed in range(3):
        _, mask = check_painted(image, part, kind, seed)
        if kind in EDGE_KINDS:
            frame = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
            assert not frame.any(), f"{kind} (seed {seed}): cut off by the frame"


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_same_seed_same_defect_other_seed_other_defect(kind: str) -> None:
    image, part = photo_of_part((200, 200), (100, 100), (60, 35), 30)
    first, first_mask = paint_defect(image, part, kind, np.random.default_rng(4))
    again, again_mask = paint_defect(image, part, kind, np.random.default_rng(4))
    other, _ = paint_defect(image, part, kind, np.random.default_rng(5))
    assert np.array_equal(first, again) and np.array_equal(first_mask, again_mask)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_a_tiny_part_is_left_alone(kind: str) -> None:
    image, part = photo_of_part((64, 64), (32, 32), (3, 2), 0)
    painted, mask = paint_defect(image, part, kind, np.random.default_rng(0))
    assert np.array_equal(painted, image) and not mask.any()


@pytest.mark.parametrize("kind", EDGE_KINDS)
def test_edge_defects_replace_part_with_table(kind: str) -> None:
    """A chip or a dent moves the outline inwards: pixels that showed the bright part now show the
    dark table, and none of the table turns bright."""
    image, part = photo_of_part((240, 240), (120, 120), (80, 50), 0)
    for seed in range(3):
        painted, mask = check_painted(image, part, kind, seed)
        gray = painted[..., 0].astype(int)
        assert (gray[mask & part] < 90).sum() >= 20, f"{kind}: the part did not lose any area"
        assert (gray[~part] < 150).all(), f"{kind}: part brightness spilled onto the table"


def test_missing_chip_shows_the_table_texture_not_a_flat_fill() -> None:
    image, part = photo_of_part((240, 240), (120, 120), (80, 50), 0)
    painted, mask = paint_defect(image, part, "missing", np.random.default_rng(1))
    hole = painted[mask & part][:, 0].astype(float)
    table = image[~near_part(part)][:, 0].astype(float)
    assert abs(hole.mean() - table.mean()) < 10
    assert hole.std() > 0.5 * table.std()


def test_a_chip_out_of_a_washer_shows_table_never_the_metal_across_its_hole() -> None:
    """On a ring the outward way from its inner rim crosses the hole onto metal again. Every seed still
    bites a chip out of the washer, and what shows through the bite is table: almost all of its fully
    bitten-out pixels lie within the plain table's range, not the machined metal's."""
    image, part = photo_of_part((240, 240), (120, 120), (80, 80), 0, hole=16, marks=30.0)
    table = image[~near_part(part)][:, 0]
    lowest, highest = np.percentile(table, [0.5, 99.5])
    for seed in range(40):
        painted, mask = check_painted(image, part, "missing", seed)
        bitten = cv2.erode((mask & part).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0  # past the soft rim
        hole = painted[bitten][:, 0].astype(float)
        like_table = ((hole >= lowest - 3) & (hole <= highest + 3)).mean()
        assert like_table > 0.8, f"seed {seed}: only {like_table:.0%} of the bite looks like the table"


def test_rust_shading_follows_the_photo_brightness() -> None:
    """The same rust on a part twice as bright is brighter by more than the see-through share of the
    metal would make it: the photo's luminance is the deposit's diffuse term."""
    painted = []
    for level in (110.0, 220.0):
        image, part = photo_of_part((200, 200), (100, 100), (60, 35), 0, part_level=level)
        painted.append(paint_defect(image, part, "rust", np.random.default_rng(2)))
    (dim, dim_mask), (bright, bright_mask) = painted
    assert np.array_equal(dim_mask, bright_mask)  # same seed, same deposit
    red_gain = (bright[bright_mask][:, 0].astype(float) - dim[dim_mask][:, 0]) / 110
    assert np.median(red_gain) > 0.3  # ~0.45 when shaded, ~0.15 from the translucent edge alone


def test_rust_is_orange() -> None:
    image, part = photo_of_part((200, 200), (100, 100), (60, 35), 0)
    painted, mask = paint_defect(image, part, "rust", np.random.default_rng(0))
    red, _, blue = painted[mask].astype(float).mean(axis=0)
    assert red > blue + 30


def test_bad_arguments_are_refused() -> None:
    image, part = photo_of_part((64, 64), (32, 32), (20, 10), 0)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown defect kind"):
        paint_defect(image, part, "dirt", rng)
    with pytest.raises(ValueError, match="shape"):
        paint_defect(image, part[:10], "rust", rng)
    with pytest.raises(ValueError, match="8-bit RGB"):
        paint_defect(image[..., 0], part, "rust", rng)
    with pytest.raises(ValueError, match="scale"):
        paint_defect(image, part, "rust", rng, scale=0)


def test_defects_on_real_screw_photos(screw_dir: Path) -> None:
    """On MVTec screw photos, with the pipeline's own object mask, each kind is visible and small."""
    from preprocessing.io import read_image
    from preprocessing.segmentation import segment_object

    for index, path in enumerate(sorted((screw_dir / "train" / "good").glob("*.png"))[:2]):
        image = read_image(path)
        part = segment_object(image).mask
        for kind in DEFECT_KINDS:
            check_painted(image, part, kind, index)


def test_a_scratch_on_dark_metal_is_a_bright_line() -> None:
    """A dark groove on dark metal would be invisible: on a dark part the scratch is burnished bright."""
    image, part = photo_of_part((240, 320), (160, 120), (80, 40), 20, part_level=70.0)
    for seed in range(3):
        painted, mask = check_painted(image, part, "scratch", seed)
        assert painted[mask & part].astype(int).max() > 150
