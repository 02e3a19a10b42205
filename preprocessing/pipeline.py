"""Turns an original photo into the model input, and maps anomaly maps back onto the photo.

The eight steps, each switchable in the config:
  1   gray-world white balance (preprocessing.lighting);
  2   object mask (preprocessing.segmentation): Otsu with automatic polarity (or GrabCut),
      morphology, taken from a glare-filled copy and before CLAHE, so that neither glare nor
      amplified table texture can move it;
  3-4 specular inpainting on the part only, CLAHE (preprocessing.lighting);
  5-7 geometry (preprocessing.registration): crop, canonical rotation, scale, as one matrix;
  8   background zeroing with the dilated object mask.
Which steps run is the config's switches ('on'), none ('off', a plain resize), or what
preprocessing.auto decided from the training photos ('auto' is resolved into switches at fit time).

The pipeline always returns the geometric transform it applied (original pixels -> model-input
pixels, one 3x3 matrix), so every heatmap a user sees can be warped back into the coordinates of
their own photo. A step that cannot do its job falls back to a safe default and adds a warning;
preprocessing never fails on a decodable photo.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from config import Config
from preprocessing.io import read_image
from preprocessing.lighting import (
    StepResult,
    as_rgb,
    clahe_lab,
    gray_world,
    inpaint_specular,
    is_grayscale,
    specular_mask,
)
from preprocessing.registration import (
    canonical_rotation,
    crop_transform,
    image_outline,
    object_outline,
    warp_image,
    warp_mask,
)
from preprocessing.segmentation import segment_object

# The config switch of each of the eight steps, in the order they run.
STEP_FLAGS = (
    "white_balance",
    "segment",
    "inpaint_specular",
    "clahe",
    "crop",
    "align_rotation",
    "normalize_scale",
    "zero_background",
)

@dataclass
class Preprocessed:
    """A model input and what is needed to map results back onto the original photo."""

    image: np.ndarray  # (S, S, 3) uint8 RGB model input
    transform: np.ndarray  # (3, 3) float64, original pixel (x, y, 1) -> model-input pixel
    mask: np.ndarray  # (S, S) bool object mask (dilated by mask_dilation) in model-input coordinates
    original_size: tuple[int, int]  # (height, width) of the photo
    warnings: list[str] = field(default_factory=list)
    background_zeroed: bool = False  # True when everything outside ``mask`` was set to black


def resize_transform(original_size: tuple[int, int], size: int) -> np.ndarray:
    """The 3x3 matrix of a plain resize (pixel centres kept aligned, as cv2.resize does)."""
    height, width = original_size
    sx, sy = size / width, size / height
    return np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]], dtype=np.float64)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow a mask by ``radius`` pixels so that defects on the object's edge stay visible."""
    if radius <= 0:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


def _run(image: np.ndarray, config: Config, record: Callable[[str, Callable[[], np.ndarray]], None]) -> Preprocessed:
    """The pipeline proper; ``record`` receives a maker of every intermediate image, called only for previews."""
    if config.preprocess == "auto":
        raise ValueError("preprocess 'auto' is decided from training photos first (models.pipeline_selection)")
    size = config.image_size
    height, width = image.shape[:2]
    if image.ndim == 3 and is_grayscale(image):  # one channel says it all: a third of the work
        image = np.ascontiguousarray(image[..., 0])
    record("0 original", lambda: image)
    if config.preprocess == "off":
        resized = as_rgb(cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA))
        record("plain resize", lambda: resized)
        full = np.ones((size, size), dtype=bool)
        return Preprocessed(resized, resize_transform((height, width), size), full, (height, width))

    warnings: list[str] = []

    def step(result: StepResult, label: str) -> np.ndarray:
        warnings.extend(result.warnings)
        record(label, lambda: result.image)
        return result.image

    lit = step(gray_world(image), "1 white balance") if config.white_balance else image
    # Glare filled over the whole photo: what the mask is taken from (glare confuses Otsu), and the
    # model's input too when no part mask narrows the filling to the part.
    glare = specular_mask(lit, config.specular_threshold) if config.inpaint_specular else None
    whole_filled = inpaint_specular(lit, config.specular_threshold, glare=glare) if glare is not None else None
    object_mask = pose_mask = None
    if config.segment:  # before CLAHE: amplified table texture confuses Otsu
        segmentation = segment_object(
            lit if whole_filled is None else whole_filled.image, config.mask_fill, config.segmentation_method
        )
        object_mask, pose_mask = segmentation.mask, segmentation.working_mask
        warnings.extend(segmentation.warnings)
        record("2 object mask", lambda: _overlay(as_rgb(lit), object_mask))
    if whole_filled is not None:  # on the part only where there is one: a bright table is not glare
        part_only = object_mask is not None
        filled = (
            inpaint_specular(lit, config.specular_threshold, region=dilate(object_mask, 2), glare=glare)
            if part_only
            else whole_filled
        )
        lit = step(filled, "3 specular inpainting")
    if config.clahe:
        lit = step(clahe_lab(lit, config.clahe_clip_limit, config.clahe_tile_grid), "4 CLAHE")

    use_object = config.crop and object_mask is not None
    angle = 0.0
    if config.align_rotation and pose_mask is not None:
        angle = canonical_rotation(pose_mask, config.min_elongation)
    matrix = crop_transform(
        object_outline(object_mask) if use_object else image_outline(height, width),
        angle,
        size,
        config.crop_padding if use_object else 0.0,
        keep_aspect=config.normalize_scale,
    )
    record("5-7 crop, rotation, scale (frame)", lambda: _draw_frame(as_rgb(lit), matrix, size))
    model_image = as_rgb(warp_image(lit, matrix, size))
    record("5-7 model input", lambda: model_image)

    if object_mask is None:
        model_mask = np.ones((size, size), dtype=bool)
    else:
        model_mask = dilate(warp_mask(object_mask, matrix, size), config.mask_dilation)
        if config.zero_background:
            model_image = np.where(model_mask[..., None], model_image, 0).astype(np.uint8)
            record("8 background zeroed", lambda: model_image)
    zeroed = object_mask is not None and config.zero_background
    return Preprocessed(model_image, matrix, model_mask, (height, width), warnings, background_zeroed=zeroed)


def preprocess(image: np.ndarray, config: Config) -> Preprocessed:
    """Run the configured steps on one 8-bit RGB photo, or a grey one given as (H, W)."""
    return _run(image, config, lambda label, make_image: None)


def preview_steps(image: np.ndarray, config: Config) -> list[tuple[str, np.ndarray]]:
    """Every intermediate image (labelled, RGB uint8) of one photo, to check the settings by eye."""
    steps: list[tuple[str, np.ndarray]] = []
    _run(image, config, lambda label, make_image: steps.append((label, as_rgb(make_image()))))
    return steps


def save_preview_sheet(steps: list[tuple[str, np.ndarray]], path: str | Path, tile: int = 256) -> Path:
    """One PNG with the steps side by side, each scaled to ``tile`` pixels high and labelled."""
    tiles = []
    for label, step_image in steps:
        height, width = step_image.shape[:2]
        scaled = cv2.resize(step_image, (max(1, round(width * tile / height)), tile), interpolation=cv2.INTER_AREA)
        scaled = np.ascontiguousarray(scaled)
        cv2.putText(scaled, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(scaled, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 0), 1, cv2.LINE_AA)
        tiles.append(scaled)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(np.hstack(tiles), cv2.COLOR_RGB2BGR))
    return path


def write_preview_sheets(paths: Sequence[Path], config: Config, out_dir: Path, count: int = 8) -> list[Path]:
    """Preview sheets for an evenly spaced sample of ``count`` photos (the same ones every run)."""
    step = max(1, len(paths) // count)
    return [
        save_preview_sheet(preview_steps(read_image(path), config), out_dir / f"{path.stem}_steps.png")
        for path in list(paths)[::step][:count]
    ]


def _overlay(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The photo with the object mask tinted red (unchanged when there is no mask)."""
    if mask is None:
        return image
    tinted = image.copy()
    tinted[mask] = (0.5 * tinted[mask] + [127, 0, 0]).astype(np.uint8)
    return tinted


def _draw_frame(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """The photo with the model input's square drawn where it lies, top edge marked."""
    corners = np.array([[-0.5, -0.5], [size - 0.5, -0.5], [size - 0.5, size - 0.5], [-0.5, size - 0.5]])
    inverse = np.linalg.inv(matrix)
    placed = cv2.perspectiveTransform(corners[None], inverse)[0].round().astype(np.int32)
    framed = image.copy()
    thickness = max(1, max(image.shape[:2]) // 200)
    cv2.polylines(framed, [placed], True, (0, 255, 0), thickness)
    cv2.line(framed, tuple(placed[0]), tuple(placed[1]), (255, 0, 0), 2 * thickness)
    return framed


def to_original(anomaly_map: np.ndarray, result: Preprocessed) -> np.ndarray:
    """Warp a model-input anomaly map back to the photo's size; outside the input it is the minimum.

    Every transform the pipeline makes is affine (crop, rotation, scale), and OpenCV's affine warp
    gives the same pixels as its perspective warp for it in three quarters of the time.
    """
    height, width = result.original_size
    return cv2.warpAffine(
        anomaly_map.astype(np.float32),
        result.transform[:2],
        (width, height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=float(anomaly_map.min()),
    )
