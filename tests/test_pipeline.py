"""End-to-end pipeline on synthetic photos with known answers: pose, coordinates, odd inputs."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from config import Config
from conftest import part_photo
from preprocessing.io import to_rgb8
from preprocessing.lighting import clahe_lab, gray_world, inpaint_specular
from preprocessing.pipeline import (
    STEP_FLAGS,
    dilate,
    preprocess,
    preview_steps,
    resize_transform,
    save_preview_sheet,
    to_original,
    write_preview_sheets,
)
from preprocessing.registration import image_outline, warp_image, warp_mask

SIZE = 128
CONFIG = Config(image_size=SIZE, preprocess="on")
DEFECT = (70.0, 0.0)  # on the shaft, towards the tip, in screw coordinates (head at -x)


def screw_photo(
    angle_deg: float, side: int = 360, defect: bool = True
) -> tuple[np.ndarray, tuple[float, float]]:
    """A dark 'screw' (shaft, wide head at one end, pointed tip) on a light table, turned by angle.

    Returns the RGB photo and where the small bright defect ``DEFECT`` lies (or would lie) in it.
    """
    shaft = [(-110, -12), (100, -12), (125, 0), (100, 12), (-110, 12)]
    head = [(-130, -30), (-105, -30), (-105, 30), (-130, 30)]
    cos, sin = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    zoom = side / 360

    def place(x: float, y: float) -> tuple[float, float]:
        return side / 2 + zoom * (x * cos - y * sin), side / 2 + zoom * (x * sin + y * cos)

    canvas = np.full((side, side), 200, np.uint8)
    for polygon in (shaft, head):
        points = np.array([place(x, y) for x, y in polygon]) * 16
        cv2.fillPoly(canvas, [points.round().astype(np.int32)], 60, cv2.LINE_AA, shift=4)
    spot = place(*DEFECT)
    if defect:
        cv2.circle(canvas, (round(spot[0]), round(spot[1])), 2, 235, -1)
    return cv2.cvtColor(canvas, cv2.COLOR_GRAY2RGB), spot


def map_point(matrix: np.ndarray, point: tuple[float, float]) -> np.ndarray:
    return cv2.perspectiveTransform(np.array([[point]], dtype=np.float64), matrix)[0, 0]


ANGLES = list(range(-360, 361, 10))


@pytest.mark.parametrize("angle", ANGLES)
def test_screw_reaches_canonical_pose_from_any_rotation(angle: int) -> None:
    photo, _ = screw_photo(angle)
    result = preprocess(photo, CONFIG)
    dark = result.image[..., 0] < 120
    dark &= result.mask  # zeroed background is black too
    columns = dark.sum(axis=0)
    rows = np.nonzero(dark.any(axis=1))[0]
    assert rows.max() - rows.min() < 0.45 * SIZE  # lies horizontal: short in y
    assert np.ptp(np.nonzero(columns)[0]) > 0.7 * SIZE  # ... and fills the square along x
    assert np.argmax(columns) < SIZE / 3  # the wide head is on the left
    assert not result.warnings


def test_defect_lands_on_same_model_pixel_for_every_rotation() -> None:
    # lighting off: the footprint is found by subtracting the defect-free photo warped the same way
    geometry_only = CONFIG.replace(white_balance=False, inpaint_specular=False, clahe=False, zero_background=False)
    landed = []
    for angle in ANGLES:
        photo, defect = screw_photo(angle)
        result = preprocess(photo, geometry_only)
        healthy = warp_image(screw_photo(angle, defect=False)[0], result.transform, SIZE)
        expected = map_point(result.transform, defect)
        change = result.image[..., 0].astype(int) - healthy[..., 0]
        found = np.unravel_index(np.argmax(change), change.shape)
        assert np.hypot(found[1] - expected[0], found[0] - expected[1]) <= 2.0
        landed.append(expected)
    landed = np.array(landed)
    assert landed.std(axis=0).max() < 1.0  # one canonical spot, whatever the photo's rotation
    assert landed[:, 0].mean() > SIZE / 2 and abs(landed[:, 1].mean() - (SIZE - 1) / 2) < 2


@pytest.mark.parametrize("angle", [0, 37, 90, 200, 313])
def test_anomaly_peak_maps_back_onto_the_defect(angle: int) -> None:
    photo, defect = screw_photo(angle)
    result = preprocess(photo, CONFIG)
    x, y = map_point(result.transform, defect)
    anomaly = np.zeros((SIZE, SIZE), np.float32)
    anomaly[round(y), round(x)] = 1.0
    anomaly = cv2.GaussianBlur(anomaly, (0, 0), 2.0)
    back = to_original(anomaly, result)
    assert back.shape == photo.shape[:2]
    peak = np.unravel_index(np.argmax(back), back.shape)
    assert np.hypot(peak[1] - defect[0], peak[0] - defect[1]) <= 3.0


def hexagon_photo(angle_deg: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    canvas = np.full((300, 300), 60, np.uint8)  # light nut on dark felt
    turns = np.radians(angle_deg + 60 * np.arange(6))
    corners = np.stack([150 + 90 * np.cos(turns), 150 + 90 * np.sin(turns)], axis=1)
    cv2.fillPoly(canvas, [corners.round().astype(np.int32)], 190)
    cv2.circle(canvas, (150, 150), 40, 60, -1)
    noisy = np.clip(canvas + rng.normal(0, 6, canvas.shape), 0, 255).astype(np.uint8)
    return cv2.cvtColor(noisy, cv2.COLOR_GRAY2RGB)


@pytest.mark.parametrize("angle,seed", [(0, 0), (7, 1), (23, 2), (41, 3)])
def test_hex_nut_is_not_spun_by_noise(angle: float, seed: int) -> None:
    result = preprocess(hexagon_photo(angle, seed), CONFIG)
    linear = result.transform[:2, :2]
    assert abs(linear[0, 1]) < 1e-9 and abs(linear[1, 0]) < 1e-9 and linear[0, 0] > 0
    assert not result.warnings


def rgb_screw() -> np.ndarray:
    return screw_photo(30, side=200)[0]


ODD_INPUTS = {
    "blank": (np.full((100, 120, 3), 128, np.uint8), True),
    "1x1": (np.full((1, 1, 3), 77, np.uint8), True),
    "5x5": (np.random.default_rng(0).integers(0, 256, (5, 5, 3), dtype=np.uint8), True),
    "all white": (np.full((64, 64, 3), 255, np.uint8), True),
    "all black": (np.zeros((64, 64, 3), np.uint8), True),
    "RGBA": (to_rgb8(np.dstack([rgb_screw()[..., ::-1], np.full((200, 200), 255, np.uint8)])), False),
    "16-bit": (to_rgb8(rgb_screw()[..., ::-1].astype(np.uint16) * 257), False),
    "grey": (to_rgb8(rgb_screw()[..., 0]), False),
}


@pytest.mark.parametrize("name", ODD_INPUTS)
def test_odd_inputs_are_processed_with_warnings_not_errors(name: str) -> None:
    image, expect_warning = ODD_INPUTS[name]
    result = preprocess(image, CONFIG)
    assert result.image.shape == (SIZE, SIZE, 3) and result.image.dtype == np.uint8
    assert result.mask.shape == (SIZE, SIZE) and result.mask.dtype == bool
    assert np.isfinite(result.transform).all() and abs(np.linalg.det(result.transform)) > 0
    assert bool(result.warnings) == expect_warning, result.warnings
    assert to_original(np.zeros((SIZE, SIZE), np.float32), result).shape == image.shape[:2]


def test_every_step_can_be_switched_off() -> None:
    photo, defect = screw_photo(45)
    plain = preprocess(photo, CONFIG.replace(preprocess=False))
    assert plain.mask.all() and np.allclose(map_point(plain.transform, (0, 0)), (SIZE / 360 * 0.5 - 0.5,) * 2)
    for flag in STEP_FLAGS:
        result = preprocess(photo, CONFIG.replace(**{flag: False}))
        assert result.image.shape == (SIZE, SIZE, 3) and not result.warnings, flag
    unzeroed = preprocess(photo, CONFIG.replace(zero_background=False))
    assert (unzeroed.image[~unzeroed.mask] > 150).all()  # the table is still there


def part_in_model(photo: np.ndarray, result) -> np.ndarray:
    """Where the synthetic part (grey 60 on a 200 table) lands in the model input."""
    return warp_mask(photo[..., 0] < 130, result.transform, SIZE)


def test_background_is_zeroed_and_the_part_is_left_intact() -> None:
    photo, _ = screw_photo(30)
    result = preprocess(photo, CONFIG.replace(clahe=False))  # white balance, inpainting: no-ops on grey
    part = part_in_model(photo, result)
    far = cv2.distanceTransform((~part).astype(np.uint8), cv2.DIST_L2, 5)
    assert not result.warnings and part.sum() > 0.05 * SIZE * SIZE
    # The part and a rim of table around it (mask_dilation pixels) are the photo, resampled, untouched.
    assert result.mask[part].all() and result.mask[(far > 0) & (far < CONFIG.mask_dilation - 2)].all()
    resampled = warp_image(photo, result.transform, SIZE)
    assert np.array_equal(result.image[result.mask], resampled[result.mask])
    assert result.image[part].mean() < 90  # dark part, not blacked out or replaced by table
    # Everything else is black, and that is most of the table.
    assert (result.image[~result.mask] == 0).all()
    assert not result.mask[far > CONFIG.mask_dilation + 3].any() and (far > CONFIG.mask_dilation + 3).mean() > 0.25


def lighting_photo() -> np.ndarray:
    """A screw photo every lighting step changes: a warm colour cast and a saturated glare spot."""
    photo = screw_photo(0)[0].astype(np.float32) * np.array([1.15, 1.0, 0.8])
    photo = np.clip(photo, 0, 245).astype(np.uint8)
    cv2.circle(photo, (200, 180), 4, (255, 255, 255), -1)
    return photo


LIGHTING = {
    "white_balance": lambda image, config: gray_world(image).image,
    "inpaint_specular": lambda image, config: inpaint_specular(image, config.specular_threshold).image,
    "clahe": lambda image, config: clahe_lab(image, config.clahe_clip_limit, config.clahe_tile_grid).image,
}


@pytest.mark.parametrize("switched_off", list(LIGHTING))
def test_a_lighting_switch_skips_exactly_its_own_step(switched_off: str) -> None:
    photo = lighting_photo()
    lighting_only = CONFIG.replace(segment=False)  # no mask: the frame is the whole photo, nothing zeroed
    result = preprocess(photo, lighting_only.replace(**{switched_off: False}))
    expected = photo
    for flag, step in LIGHTING.items():  # without a mask: white balance, inpainting (everywhere), CLAHE
        if flag != switched_off:
            expected = step(expected, lighting_only)
    assert np.array_equal(result.image, warp_image(expected, result.transform, SIZE))
    assert not np.array_equal(result.image, preprocess(photo, lighting_only).image)  # the step did matter


def is_rotation_free(matrix: np.ndarray) -> bool:
    return abs(matrix[0, 1]) < 1e-9 and abs(matrix[1, 0]) < 1e-9


def part_extent(part: np.ndarray) -> tuple[int, int]:
    """(width, height) in pixels of the part's bounding box in the model input."""
    rows, columns = np.nonzero(part.any(axis=1))[0], np.nonzero(part.any(axis=0))[0]
    return int(np.ptp(columns)) + 1, int(np.ptp(rows)) + 1


GEOMETRY_BASE = CONFIG.replace(clahe=False)
FRAMED = SIZE / (1 + 2 * GEOMETRY_BASE.crop_padding)  # the padded box's long side fills the input


def without_zeroing(photo, on, off) -> None:
    assert np.array_equal(off.transform, on.transform) and np.array_equal(off.mask, on.mask)
    assert np.array_equal(off.image, warp_image(photo, on.transform, SIZE))  # the table is back


def without_rotation(photo, on, off) -> None:
    assert not is_rotation_free(on.transform) and is_rotation_free(off.transform)
    assert abs(max(part_extent(part_in_model(photo, off))) - FRAMED) < 3  # still cropped to the part


def without_crop(photo, on, off) -> None:
    turn = lambda matrix: matrix[:2, :2] / np.linalg.norm(matrix[0, :2])  # noqa: E731
    assert np.allclose(turn(off.transform), turn(on.transform))  # the same rotation
    corners = cv2.perspectiveTransform(image_outline(*photo.shape[:2])[None], off.transform)[0]
    assert corners.min() > -0.5 - 1e-6 and corners.max() < SIZE - 0.5 + 1e-6  # the whole photo is in view
    assert abs(part_extent(part_in_model(photo, on))[0] - FRAMED) < 3  # ... where the crop framed the part


def without_scale(photo, on, off) -> None:
    width, height = part_extent(part_in_model(photo, off))
    assert abs(width - FRAMED) < 3 and abs(height - FRAMED) < 3  # the box is stretched to fill the square
    singular = np.linalg.svd(on.transform[:2, :2], compute_uv=False)
    assert singular[0] == pytest.approx(singular[1])  # ... whereas with it on, shapes stay true


def without_mask(photo, on, off) -> None:
    assert off.mask.all() and np.allclose(off.transform, resize_transform(photo.shape[:2], SIZE))


GEOMETRY_CHECKS = {
    "zero_background": without_zeroing,
    "align_rotation": without_rotation,
    "crop": without_crop,
    "normalize_scale": without_scale,
    "segment": without_mask,
}


@pytest.mark.parametrize("switched_off", list(GEOMETRY_CHECKS))
def test_a_geometry_switch_changes_exactly_its_own_step(switched_off: str) -> None:
    photo, _ = screw_photo(30)
    on = preprocess(photo, GEOMETRY_BASE)
    off = preprocess(photo, GEOMETRY_BASE.replace(**{switched_off: False}))
    GEOMETRY_CHECKS[switched_off](photo, on, off)
    # Whatever the frame, the pixels kept are the photo's, and the background is black where it should be.
    assert np.array_equal(off.image[off.mask], warp_image(photo, off.transform, SIZE)[off.mask]) and not off.warnings
    if switched_off not in ("zero_background", "segment"):
        assert (off.image[~off.mask] == 0).all() and not off.mask.all()


def test_preview_lists_every_step_and_renders_a_sheet(tmp_path) -> None:
    steps = preview_steps(screw_photo(120)[0], CONFIG)
    labels = [label for label, _ in steps]
    assert labels[0] == "0 original" and labels[-1] == "8 background zeroed"
    assert len(labels) == 8
    sheet = cv2.imread(str(save_preview_sheet(steps, tmp_path / "sheet.png", tile=64)))
    assert sheet.shape[0] == 64 and sheet.shape[1] > 64 * 6


def test_the_preview_frame_is_drawn_where_the_model_input_lies_on_the_photo() -> None:
    """The frame on the preview sheet is how a user checks the crop by eye: its corners are the
    model input's corners carried back onto the photo."""
    photo = part_photo(degrees=30)
    result = preprocess(photo, GEOMETRY_BASE)  # no CLAHE: the frame is drawn on the photo itself
    framed = dict(preview_steps(photo, GEOMETRY_BASE))["5-7 crop, rotation, scale (frame)"]
    square = np.array([[[-0.5, -0.5], [SIZE - 0.5, -0.5], [SIZE - 0.5, SIZE - 0.5], [-0.5, SIZE - 0.5]]])
    corners = cv2.perspectiveTransform(square, np.linalg.inv(result.transform))[0]
    drawn = np.argwhere(np.any(framed != photo, axis=2))[:, ::-1]  # (x, y) of every pixel drawn
    assert all(np.hypot(*(drawn - corner).T).min() <= 1.5 for corner in corners)


def test_preview_sheets_are_written_for_count_evenly_spaced_photos(tmp_path) -> None:
    paths = []
    for number in range(10):
        paths.append(tmp_path / f"photo_{number}.png")
        cv2.imwrite(str(paths[-1]), part_photo(degrees=10 * number))
    sheets = write_preview_sheets(paths, CONFIG, tmp_path / "sheets", count=4)
    assert [sheet.name for sheet in sheets] == [f"photo_{number}_steps.png" for number in (0, 2, 4, 6)]
    assert all(sheet.is_file() for sheet in sheets)


def test_opencv_runs_each_call_on_one_thread_because_the_worker_pool_is_the_parallelism():
    """OpenCV's own threads doubled a photo's CPU cost while the pool and the backbone used the cores."""
    import subprocess
    import sys

    probe = "import cv2, preprocessing.pipeline; print(cv2.getNumThreads())"
    threads = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert threads.stdout.strip() == "1"


def test_the_map_goes_back_onto_the_photo_pixel_for_pixel_as_a_perspective_warp_would_put_it():
    """to_original uses the affine warp (faster); every pipeline transform is affine, so nothing moves."""
    photo, _ = screw_photo(35.0, side=300)
    result = preprocess(photo, CONFIG)
    anomaly_map = np.random.default_rng(0).random((SIZE, SIZE)).astype(np.float32)
    height, width = result.original_size
    expected = cv2.warpPerspective(
        anomaly_map, result.transform, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT, borderValue=float(anomaly_map.min()),
    )
    assert np.array_equal(result.transform[2], [0, 0, 1])
    np.testing.assert_allclose(to_original(anomaly_map, result), expected, atol=1e-5)


@pytest.mark.parametrize(
    "changes",
    [{}, {"clahe": True}, {"segmentation_method": "grabcut"}, {"preprocess": "off"}, {"zero_background": False}],
    ids=["default steps", "clahe", "grabcut", "off", "background kept"],
)
def test_a_grey_photo_worked_on_as_one_channel_becomes_exactly_the_input_three_channels_gave(changes, monkeypatch):
    """A mono camera's photo (or grey stored as RGB) runs through the pipeline on one channel, a
    third of the work, to the same bits as when every step worked on three identical channels."""
    rgb, _ = screw_photo(25.0, side=300)
    texture = np.random.default_rng(0).normal(0, 6, rgb.shape[:2]) + np.linspace(-20, 20, rgb.shape[1])
    rgb = np.clip(rgb + texture[..., None], 0, 249).astype(np.uint8)  # CLAHE has something to equalise
    rgb[140:160, 40:60], rgb[140:160, 60:80] = 255, 251  # glare on the part, so inpainting has work to do
    grey = np.ascontiguousarray(rgb[..., 0])
    config = CONFIG.replace(**changes)
    from_grey = preprocess(grey, config)
    monkeypatch.setattr("preprocessing.pipeline.is_grayscale", lambda image: False)  # keep all three channels
    from_rgb = preprocess(rgb, config)
    assert from_grey.image.shape == from_rgb.image.shape == (SIZE, SIZE, 3)
    assert np.array_equal(from_grey.image, from_rgb.image)
    assert np.array_equal(from_grey.mask, from_rgb.mask)
    assert np.array_equal(from_grey.transform, from_rgb.transform)
    assert [label for label, _ in preview_steps(grey, config)] == [label for label, _ in preview_steps(rgb, config)]
    assert all(image.ndim == 3 for _, image in preview_steps(grey, config))


def test_a_colour_photo_with_one_odd_pixel_is_not_taken_for_grey():
    from preprocessing.lighting import is_grayscale

    rgb, _ = screw_photo(0.0, side=200)
    assert is_grayscale(rgb) and is_grayscale(np.ascontiguousarray(rgb[..., 0]))
    tinted = rgb.copy()
    tinted[101, 37, 2] += 1  # off the sparse grid the quick check looks at
    assert not is_grayscale(tinted)


def test_a_plain_resize_of_a_wide_photo_puts_its_corners_on_the_input_corners_and_maps_back() -> None:
    photo = np.random.default_rng(0).integers(0, 256, (90, 240, 3), dtype=np.uint8)
    result = preprocess(photo, CONFIG.replace(preprocess="off"))
    assert np.array_equal(result.image, cv2.resize(photo, (SIZE, SIZE), interpolation=cv2.INTER_AREA))
    assert map_point(result.transform, (-0.5, -0.5)) == pytest.approx((-0.5, -0.5))
    assert map_point(result.transform, (239.5, 89.5)) == pytest.approx((SIZE - 0.5, SIZE - 0.5))
    anomaly = np.zeros((SIZE, SIZE), np.float32)
    anomaly[96, 32] = 1.0  # a quarter across, three quarters down
    back = to_original(cv2.GaussianBlur(anomaly, (0, 0), 2.0), result)
    assert back.shape == (90, 240)
    peak = np.unravel_index(np.argmax(back), back.shape)
    assert abs(peak[1] - 240 * 32.5 / SIZE) <= 2 and abs(peak[0] - 90 * 96.5 / SIZE) <= 2


def test_background_zeroed_says_whether_the_table_was_blacked_out() -> None:
    """The model keeps only patches near the part when (and only when) the table is black."""
    photo, _ = screw_photo(30)
    assert preprocess(photo, CONFIG).background_zeroed
    for changes in ({"zero_background": False}, {"segment": False}, {"preprocess": "off"}):
        assert not preprocess(photo, CONFIG.replace(**changes)).background_zeroed, changes


def test_glare_on_the_part_is_filled_and_a_bright_spot_on_the_table_is_left_alone() -> None:
    photo = screw_photo(0)[0].copy()
    on_part, on_table = (200, 180), (190, 80)
    for spot in (on_part, on_table):
        cv2.circle(photo, spot, 4, (255, 255, 255), -1)
    result = preprocess(photo, CONFIG.replace(white_balance=False, clahe=False, zero_background=False))
    level = {spot: result.image[round(y), round(x)] for spot in (on_part, on_table)
             for x, y in [map_point(result.transform, spot)]}
    assert (level[on_part] < 100).all() and (level[on_table] == 255).all()
    assert not result.warnings


def test_a_small_glare_spot_on_the_part_s_edge_leaves_no_bright_rim_in_the_model_input() -> None:
    """The filling reaches a little past the part's mask: the glare pixels just beyond its edge,
    within the model's mask, would otherwise stay saturated and score as a defect."""
    photo = screw_photo(0)[0].copy()
    cv2.circle(photo, (200, 171), 4, (255, 255, 255), -1)  # 3 inside the shaft's upper edge (y = 168): 1 past it
    result = preprocess(photo, CONFIG.replace(white_balance=False, clahe=False))
    assert result.image.max() < 250 and not result.warnings


def test_glare_biting_into_the_part_s_edge_does_not_bite_its_mask() -> None:
    """The mask is taken from a glare-filled copy: Otsu would give the saturated bite to the bright table."""
    config = CONFIG.replace(white_balance=False, clahe=False, mask_dilation=0)
    clean = preprocess(screw_photo(0)[0], config)
    photo = screw_photo(0)[0].copy()
    cv2.circle(photo, (200, 168), 14, (255, 255, 255), -1)  # centred on the shaft's upper edge
    glared = preprocess(photo, config)
    assert (glared.mask != clean.mask).sum() <= 0.005 * clean.mask.sum()


def test_the_mask_grows_by_its_radius_on_every_side() -> None:
    """Defects on the part's edge stay in view as far beyond it on the left as on the right, above as below."""
    dot = np.zeros((21, 21), bool)
    dot[10, 10] = True
    rows, columns = np.nonzero(dilate(dot, 4))
    assert (rows.min(), rows.max(), columns.min(), columns.max()) == (6, 14, 6, 14)


def test_a_lighting_step_that_cannot_do_its_job_says_so() -> None:
    """A part and table without blue: white balance would divide by an empty channel, so it is
    skipped, and the photo's warnings say why."""
    result = preprocess(part_photo(colour=(170, 170, 0), table=(40, 40, 0)), CONFIG)
    assert result.warnings == ["white balance skipped: a colour channel is almost empty"]
