"""Geometric steps (5-7 of the pipeline): crop, canonical rotation, scale, as ONE 3x3 matrix.

Composing crop, rotation and scale into a single original -> model-input matrix means the photo is
resampled once (one interpolation blur instead of three) and the same matrix maps anomaly maps
back onto the photo exactly.

Canonical pose: the object's long axis is horizontal and its heavier end (a screw's head) is on the
left. Objects without a dominant axis (nuts) keep the rotation they were photographed in, because
the principal axis of a near-round shape is decided by noise and would spin it arbitrarily.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

END_FRACTION = 0.2  # share of the length at each end whose mass decides which end is the head
MIN_END_ASYMMETRY = 0.05  # relative mass difference below which the ends count as alike


@dataclass(frozen=True)
class Pose:
    """Second-moment description of a mask: centroid, long-axis angle (radians), axis-length ratio."""

    centre: tuple[float, float]
    axis_angle: float
    elongation: float


def principal_axis(mask: np.ndarray) -> Pose:
    """Centroid, orientation of the long axis and elongation from the mask's image moments."""
    moments = cv2.moments(mask.astype(np.uint8), binaryImage=True)
    area = max(moments["m00"], 1e-12)
    mu20, mu02, mu11 = moments["mu20"] / area, moments["mu02"] / area, moments["mu11"] / area
    half_trace, spread = (mu20 + mu02) / 2, math.hypot((mu20 - mu02) / 2, mu11)
    major, minor = half_trace + spread, half_trace - spread
    elongation = math.sqrt(major / minor) if minor > 1e-12 else math.inf
    angle = 0.5 * math.atan2(2 * mu11, mu20 - mu02)
    return Pose((moments["m10"] / area, moments["m01"] / area), angle, elongation)


def heavy_end_first(mask: np.ndarray, pose: Pose) -> float:
    """The long-axis direction that points from the heavier end to the lighter one (radians).

    A screw's head end carries more mask area than its pointed tip, so comparing the area in the
    outer ``END_FRACTION`` of each end resolves the 180-degree ambiguity of the moments. Ends of
    (nearly) equal mass keep the direction needing the smaller turn, so a symmetric bar is stable.
    """
    ys, xs = np.nonzero(mask)
    along = (xs - pose.centre[0]) * math.cos(pose.axis_angle) + (ys - pose.centre[1]) * math.sin(pose.axis_angle)
    low, high = along.min(), along.max()
    margin = END_FRACTION * (high - low)
    low_mass, high_mass = int((along < low + margin).sum()), int((along > high - margin).sum())
    if abs(low_mass - high_mass) <= MIN_END_ASYMMETRY * max(low_mass + high_mass, 1):
        return pose.axis_angle
    return pose.axis_angle if low_mass > high_mass else pose.axis_angle + math.pi


def canonical_rotation(mask: np.ndarray, min_elongation: float) -> float:
    """Angle (radians) of the object direction that alignment turns onto +x; 0 = leave as is."""
    pose = principal_axis(mask)
    if pose.elongation < min_elongation:
        return 0.0
    return heavy_end_first(mask, pose)


def rotation_matrix(angle: float) -> np.ndarray:
    """3x3 matrix turning direction ``angle`` onto +x (about the origin; the crop re-centres)."""
    cos, sin = math.cos(angle), math.sin(angle)
    return np.array([[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]])


def object_outline(mask: np.ndarray) -> np.ndarray:
    """(N, 2) outline points of the mask, widened by half a pixel so extents cover whole pixels."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    points = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float64)
    offsets = np.array([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]])
    return (points[:, None, :] + offsets[None]).reshape(-1, 2)


def image_outline(height: int, width: int) -> np.ndarray:
    """The four outer corners of a photo (pixel edges, not centres)."""
    return np.array([[-0.5, -0.5], [width - 0.5, -0.5], [-0.5, height - 0.5], [width - 0.5, height - 0.5]])


def crop_transform(
    outline: np.ndarray, angle: float, size: int, padding: float, keep_aspect: bool
) -> np.ndarray:
    """Original -> model-input matrix: rotate by ``angle``, frame the outline's box (plus padding), scale.

    ``keep_aspect`` scales the box's long side to ``size`` and shows real context on the short side
    (shapes stay true); otherwise the box is stretched to fill the square (more pixels across a
    thin part, but its proportions depend on the box).
    """
    rotation = rotation_matrix(angle)
    turned = outline @ rotation[:2, :2].T
    low, high = turned.min(axis=0), turned.max(axis=0)
    extent = np.maximum((high - low) * (1 + 2 * padding), 1e-6)
    centre = (low + high) / 2
    scale = np.full(2, size / extent.max()) if keep_aspect else size / extent
    frame = np.array(
        [
            [scale[0], 0.0, size / 2 - 0.5 - scale[0] * centre[0]],
            [0.0, scale[1], size / 2 - 0.5 - scale[1] * centre[1]],
            [0.0, 0.0, 1.0],
        ]
    )
    return frame @ rotation


def warp_image(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Resample a photo into the model input once, low-pass filtered first when shrinking.

    ``warpAffine`` samples bilinearly without averaging, so a strong shrink would alias fine
    texture (screw threads) into moire that differs between photos; a Gaussian of the shrink
    factor's width (as in scikit-image's anti-aliasing) removes what the output cannot hold.
    """
    shrink = 1.0 / min(np.linalg.svd(matrix[:2, :2], compute_uv=False))
    sigma = (shrink - 1) / 2
    if sigma > 0.3:
        # Blur only the part of the photo the output square samples (plus the kernel's reach).
        x0, y0, x1, y1 = _source_box(matrix, size, image.shape[:2], margin=int(np.ceil(3 * sigma)) + 2)
        image = cv2.GaussianBlur(image[y0:y1, x0:x1], (0, 0), sigma)
        matrix = matrix @ np.array([[1.0, 0, x0], [0, 1.0, y0], [0, 0, 1]])
    return cv2.warpAffine(
        image, matrix[:2], (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )


def _source_box(matrix: np.ndarray, size: int, shape: tuple[int, int], margin: int) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1) in the photo of the output square, grown by ``margin`` and clipped."""
    corners = np.array([[[-0.5, -0.5], [size - 0.5, -0.5], [size - 0.5, size - 0.5], [-0.5, size - 0.5]]])
    placed = cv2.perspectiveTransform(corners, np.linalg.inv(matrix))[0]
    height, width = shape
    x0, y0 = np.floor(placed.min(axis=0)).astype(int) - margin
    x1, y1 = np.ceil(placed.max(axis=0)).astype(int) + margin + 1
    x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    return x0, y0, max(min(x1, width), x0 + 1), max(min(y1, height), y0 + 1)


def warp_mask(mask: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """A boolean mask carried into model-input coordinates (outside the photo = not object)."""
    warped = cv2.warpAffine(
        mask.astype(np.uint8) * 255, matrix[:2], (size, size), flags=cv2.INTER_LINEAR, borderValue=0
    )
    return warped >= 128
