"""Photometric steps (1-3 of the pipeline): make lighting comparable between photos.

Each step is a pure function ``image -> StepResult`` on 8-bit RGB, so steps can be switched off,
reordered or previewed without knowing about each other. A step that cannot do its job returns
the image unchanged and says why in ``warnings``; it never raises on odd input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

MAX_GRAY_WORLD_GAIN = 4.0  # a channel that needs more than this is missing, not tinted
MAX_SPECULAR_FRACTION = 0.2  # above this the photo is overexposed; inpainting would invent the object


@dataclass
class StepResult:
    """The output image of one step plus anything the user should know about it."""

    image: np.ndarray
    warnings: list[str] = field(default_factory=list)


def is_grayscale(image: np.ndarray) -> bool:
    """True for a single-channel photo, or when all three channels are identical (a grey photo stored as RGB).

    A sparse grid of pixels is compared first: a colour photo nearly always shows it there, and
    is then told apart without a pass over every pixel.
    """
    if image.ndim == 2:
        return True
    for pixels in (image[::16, ::16], image):
        if not (np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2])):
            return False
    return True


def as_rgb(image: np.ndarray) -> np.ndarray:
    """A grey (H, W) image as the three identical channels the network, GrabCut and the preview sheets take."""
    return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image


def gray_world(image: np.ndarray) -> StepResult:
    """Scale each channel so that all channel means are equal: removes a global colour cast.

    Grey input is returned untouched (bit-exact), because rescaling identical channels by the
    same gain would only add rounding noise. Each channel has 256 levels, so the gains are applied
    as a lookup table: a float copy of a 100-megapixel photo would take gigabytes.
    """
    if image.size == 0 or is_grayscale(image):
        return StepResult(image)
    means = np.array(cv2.sumElems(image)[:3]) / (image.size // 3)  # OpenCV's sums of 8-bit pixels are exact
    target = means.mean()
    if means.min() < 1.0 or target / means.min() > MAX_GRAY_WORLD_GAIN:
        return StepResult(image, ["white balance skipped: a colour channel is almost empty"])
    levels = np.arange(256, dtype=np.float32)[:, None]
    balanced = np.clip(levels * (target / means), 0, 255).round().astype(np.uint8)  # (level, channel)
    return StepResult(cv2.LUT(image, balanced.reshape(256, 1, 3)))


def specular_mask(image: np.ndarray, threshold: int) -> np.ndarray:
    """Pixels where any channel reaches ``threshold``, grown by one pixel to cover the glare halo."""
    if image.ndim == 2:
        saturated = (image >= threshold).astype(np.uint8)
    else:
        red, green, blue = cv2.split(image)  # OpenCV's per-pixel max is ~10x NumPy's axis=2 reduction
        saturated = (cv2.max(cv2.max(red, green), blue) >= threshold).astype(np.uint8)
    return cv2.dilate(saturated, np.ones((3, 3), np.uint8)) > 0


def inpaint_specular(
    image: np.ndarray,
    threshold: int,
    radius: int = 3,
    region: np.ndarray | None = None,
    glare: np.ndarray | None = None,
) -> StepResult:
    """Fill saturated highlights from their surroundings: glare moves with the pose, defects do not.

    ``region`` (bool, the part) limits the filling to the part: a bright table is not glare, and
    inpainting it would smear the part's colour into the background. ``glare`` is the photo's
    ``specular_mask`` where the caller has it already (it is not modified).
    """
    mask = specular_mask(image, threshold) if glare is None else glare
    if region is not None:
        mask = mask & region
    fraction = float(mask.mean()) if mask.size else 0.0
    if fraction == 0.0:
        return StepResult(image)
    if fraction > MAX_SPECULAR_FRACTION:
        return StepResult(
            image,
            [f"specular inpainting skipped: {fraction:.0%} of the photo is saturated (overexposed?)"],
        )
    inpainted = cv2.inpaint(image, mask.astype(np.uint8), radius, cv2.INPAINT_TELEA)
    return StepResult(inpainted)


def clahe_lab(image: np.ndarray, clip_limit: float, tile_grid: int) -> StepResult:
    """Contrast-limited adaptive histogram equalisation of lightness only, so colours do not shift."""
    height, width = image.shape[:2]
    if min(height, width) < 2 * tile_grid:
        return StepResult(image, [f"CLAHE skipped: image {width}x{height} is smaller than its tile grid"])
    clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid))
    if image.ndim == 2:
        return StepResult(clahe.apply(image))
    if is_grayscale(image):  # the L*a*b* round trip would only add rounding noise to grey
        return StepResult(as_rgb(clahe.apply(image[..., 0])))
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
    return StepResult(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB))
