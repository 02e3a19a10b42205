"""Defects drawn onto a photo of a part: rust, corrosion, a scratch, a missing chip, a dent.

Two users share these drawers. The synthetic generator (scripts/synthetic_fasteners.py) paints on
its rendered float images, where it knows the part's exact coverage and lambert shading.
`paint_defect` paints on any real 8-bit photo given only the part's mask, so that healthy training
photos become defective ones with a known mask (ranking preprocessing pipelines without test
labels). A real photo has no shading term, so its own luminance stands in for it: a deposit is as
bright as the metal it sits on.

Sizes are written in "reference pixels": a part whose mask covers REFERENCE_PART_SIDE² pixels gets
them as they are, other parts in proportion to the square root of their area, so a defect covers
about the same share of any part at any resolution (~0.5-5 %, like MVTec AD's defects).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np

DEFECT_KINDS = ("rust", "corrosion", "scratch", "missing", "dent")
REFERENCE_PART_SIDE = 100.0
MIN_UNIT = 0.3  # pixels per reference pixel below which a defect would be ~2 px: no room to draw it
MAX_SCALE = 1000.0  # largest defect size factor: far past covering any part; beyond it sizes overflow
HALO = 2  # pixels outside a real photo's mask that still show the part's soft edge
EDGE_ATTEMPTS = 8  # edge sites tried before an edge defect gives up for lack of room


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Unit-variance value noise with features about `cell` pixels wide."""
    height, width = shape
    coarse = rng.standard_normal((max(2, round(height / cell)) + 1, max(2, round(width / cell)) + 1))
    field = cv2.resize(coarse.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / (field.std() + 1e-6)


@functools.lru_cache(maxsize=4)
def pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """x and y of every pixel (cached: every photo of a set needs them; read-only)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    xs.flags.writeable = ys.flags.writeable = False
    return xs, ys


def pick_point_on_part(rng: np.random.Generator, coverage: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(coverage >= 0.999)
    index = rng.integers(len(xs))
    return float(xs[index]), float(ys[index])


def blob(rng: np.random.Generator, shape: tuple[int, int], centre: tuple[float, float], radius: float,
         roughness: float) -> np.ndarray:
    """An irregular elliptical patch with steep edges, 0 outside (so its mask is exact)."""
    xs, ys = pixel_grid(*shape)
    angle, elongation = rng.uniform(0, math.pi), rng.uniform(1.0, 1.8)
    dx, dy = xs - centre[0], ys - centre[1]
    along = (dx * math.cos(angle) + dy * math.sin(angle)) / (radius * elongation)
    across = (-dx * math.sin(angle) + dy * math.cos(angle)) / radius
    field = 1 - np.hypot(along, across) + roughness * smooth_noise(rng, shape, max(2.0, radius / 2.5))
    return np.clip(field * 4, 0, 1)


def blend(image: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Paint a layer over the image in place; returns the pixels it touched."""
    image *= 1 - alpha[..., None]
    image += colour * alpha[..., None]
    return alpha > 0


def add_rust(rng: np.random.Generator, image: np.ndarray, coverage: np.ndarray, diffuse: np.ndarray,
             scale: float) -> np.ndarray:
    """Matte orange-brown deposit with a grainy, mottled texture."""
    shape = image.shape[:2]
    alpha = blob(rng, shape, pick_point_on_part(rng, coverage), scale * rng.uniform(5, 9), 0.45)
    alpha *= coverage * rng.uniform(0.8, 0.95)
    mix = np.clip(0.5 + 0.3 * smooth_noise(rng, shape, 2.0) + 0.2 * smooth_noise(rng, shape, 0.7), 0, 1)
    dark, orange = np.array([0.22, 0.10, 0.04], np.float32), np.array([0.68, 0.33, 0.11], np.float32)
    colour = dark + (orange - dark) * mix[..., None]
    return blend(image, colour * (0.55 + 0.6 * diffuse)[..., None], alpha)


def add_corrosion(rng: np.random.Generator, image: np.ndarray, coverage: np.ndarray, diffuse: np.ndarray,
                  scale: float) -> np.ndarray:
    """A dark, dull stain peppered with pits."""
    shape = image.shape[:2]
    centre = pick_point_on_part(rng, coverage)
    radius = scale * rng.uniform(6, 10)
    stain = blob(rng, shape, centre, radius, 0.5) * rng.uniform(0.45, 0.65)
    stain_colour = np.array([0.16, 0.16, 0.13], np.float32) * (0.8 + 0.4 * diffuse)[..., None]
    touched = blend(image, stain_colour, stain * coverage)
    pits = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(10, 22))):
        offset = rng.normal(0, 0.6 * radius, 2)
        centre_pit = (round((centre[0] + offset[0]) * 4), round((centre[1] + offset[1]) * 4))
        pit_radius = max(2, round(4 * scale * rng.uniform(0.5, 1.2)))
        cv2.circle(pits, centre_pit, pit_radius, 1.0, -1, cv2.LINE_AA, shift=2)
    touched |= blend(image, np.array([0.03, 0.03, 0.03], np.float32), pits * coverage * 0.9)
    return touched


def add_scratch(rng: np.random.Generator, image: np.ndarray, coverage: np.ndarray, diffuse: np.ndarray,
                scale: float) -> np.ndarray:
    """A thin curved stroke, turned so that it stays on the part: a dark groove on bright metal, a
    burnished bright line on dark metal (a scratch that matches its surroundings would be invisible).
    `diffuse` is unused: a groove or a burnished line has its own tone whatever the lighting."""
    middle = np.array(pick_point_on_part(rng, coverage))
    length, bow = scale * rng.uniform(14, 26), rng.uniform(-1.0, 1.0)
    t = np.linspace(-0.5, 0.5, 24)[:, None]
    height, width = image.shape[:2]

    def stroke_points(heading: float) -> np.ndarray:
        direction = np.array([math.cos(heading), math.sin(heading)])
        normal = np.array([-direction[1], direction[0]])
        return middle + direction * length * t - normal * length * bow * t**2

    def share_on_part(points: np.ndarray) -> float:
        xs, ys = np.round(points).astype(int).T
        xs, ys = np.clip(xs, 0, width - 1), np.clip(ys, 0, height - 1)
        return float((coverage[ys, xs] >= 0.999).mean())

    first = rng.uniform(0, math.pi)
    curve = max((stroke_points(first + step * math.pi / 12) for step in range(12)), key=share_on_part)
    stroke = np.zeros(image.shape[:2], np.float32)
    thickness = max(1, round(scale * rng.uniform(0.8, 1.4)))
    cv2.polylines(stroke, [np.round(curve * 16).astype(np.int32)], False, 1.0, thickness, cv2.LINE_AA, shift=4)
    tone = 0.08 if image[round(middle[1]), round(middle[0])].mean() > 0.4 else 0.95
    return blend(image, np.full(3, tone, np.float32), stroke * coverage * rng.uniform(0.75, 0.95))


SURFACE_DEFECTS = {"rust": add_rust, "corrosion": add_corrosion, "scratch": add_scratch}


@dataclass(frozen=True)
class EdgeSite:
    """A point on the part's outline and the direction pointing away from the part there."""

    point: np.ndarray  # (2,) x, y
    normal: np.ndarray  # (2,) unit vector, outwards


def pick_edge_site(rng: np.random.Generator, solid: np.ndarray, smoothing: float, margin: float) -> EdgeSite | None:
    """A random outline pixel at least `margin` from the image border, with the outward normal of the
    outline smoothed over `smoothing` pixels (so thread teeth or noise do not turn it sideways)."""
    height, width = solid.shape
    binary = solid.astype(np.uint8)
    outline = (binary > 0) & (cv2.erode(binary, np.ones((3, 3), np.uint8)) == 0)
    ys, xs = np.nonzero(outline)
    inside = (xs >= margin) & (xs < width - margin) & (ys >= margin) & (ys < height - margin)
    if not inside.any():
        return None
    index = rng.integers(int(inside.sum()))
    x, y = int(xs[inside][index]), int(ys[inside][index])
    reach = math.ceil(3 * max(1.0, smoothing)) + 1  # the blur only needs the outline around the site
    top, left = max(0, y - reach), max(0, x - reach)
    around = binary[top:y + reach + 1, left:x + reach + 1].astype(np.float32)
    blurred = cv2.GaussianBlur(around, (0, 0), max(1.0, smoothing), borderType=cv2.BORDER_REPLICATE)
    gy, gx = np.gradient(blurred)
    normal = -np.array([gx[y - top, x - left], gy[y - top, x - left]], np.float64)
    length = float(np.hypot(*normal))
    if length < 1e-6:
        return None
    return EdgeSite(np.array([x, y], np.float64), normal / length)


def chip(rng: np.random.Generator, shape: tuple[int, int], site: EdgeSite, radius: float) -> np.ndarray:
    """Anti-aliased alpha (0..1) of an irregular bite centred a little inside the outline at `site`."""
    xs, ys = pixel_grid(*shape)
    centre = site.point - site.normal * radius * rng.uniform(0.0, 0.35)
    angle, elongation = rng.uniform(0, math.pi), rng.uniform(1.0, 1.6)
    dx, dy = xs - centre[0], ys - centre[1]
    along = (dx * math.cos(angle) + dy * math.sin(angle)) / elongation
    across = -dx * math.sin(angle) + dy * math.cos(angle)
    jagged = 0.12 * radius * smooth_noise(rng, shape, max(2.0, radius / 2))
    return np.clip(radius - np.hypot(along, across) + jagged + 0.5, 0, 1).astype(np.float32)


def background_offset(region: np.ndarray, forbidden: np.ndarray, normal: np.ndarray,
                      radius: float) -> tuple[int, int] | None:
    """A whole-pixel shift, outwards from the part, at which every pixel of `region` lands on plain
    background (inside the image, off `forbidden`); None when there is none."""
    ys, xs = np.nonzero(region)
    height, width = region.shape
    for turn in (0.0, 0.5, -0.5, 1.0, -1.0):
        direction = np.array([normal[0] * math.cos(turn) - normal[1] * math.sin(turn),
                              normal[0] * math.sin(turn) + normal[1] * math.cos(turn)])
        for distance in (2.5 * radius, 3.5 * radius, 5.0 * radius):
            dx, dy = (int(v) for v in np.round(direction * (distance + HALO + 2)))
            sx, sy = xs + dx, ys + dy
            if (sx.min() >= 0 and sy.min() >= 0 and sx.max() < width and sy.max() < height
                    and not forbidden[sy, sx].any()):
                return dx, dy
    return None


def with_soft_edge(solid: np.ndarray) -> np.ndarray:
    """The part's mask grown by HALO pixels: its anti-aliased rim belongs to it when it moves or goes."""
    return cv2.dilate(solid.astype(np.uint8), np.ones((2 * HALO + 1,) * 2, np.uint8)) > 0


def remove_chip(rng: np.random.Generator, image: np.ndarray, solid: np.ndarray, unit: float) -> None:
    """Bite a piece out of the part's edge and show the table there, copied from just beside the part
    (its own colour, texture and noise); changes nothing when no site has a clean patch of table."""
    near = with_soft_edge(solid)
    forbidden = cv2.dilate(near.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    for _ in range(EDGE_ATTEMPTS):
        radius = unit * rng.uniform(6, 11)
        site = pick_edge_site(rng, solid, radius, radius + HALO)
        if site is None:
            return
        alpha = chip(rng, image.shape[:2], site, radius) * near
        offset = background_offset(alpha > 0, forbidden, site.normal, radius)
        if offset is not None:
            table = np.roll(image, (-offset[1], -offset[0]), axis=(0, 1))
            # The copied table may lie in more or less light, or outside the part's shadow: match
            # its level to the table right beside the bite.
            beside = (cv2.dilate((alpha > 0).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0) & ~near
            if beside.any():
                table += image[beside].mean(axis=0) - table[beside].mean(axis=0)
            blend(image, table, alpha)
            return


def push_edge_in(rng: np.random.Generator, image: np.ndarray, solid: np.ndarray, unit: float) -> np.ndarray:
    """Warp a piece of the outline inwards: pixels near the site show what lay `push` pixels further
    out, the push fading along the edge and into the part, so the surface squeezes like dented metal.
    Only the part and its soft edge move; the table beyond stays where it was."""
    width, depth = unit * rng.uniform(8, 14), unit * rng.uniform(3, 5)
    site = pick_edge_site(rng, solid, width / 2, width + depth)
    if site is None:
        return image
    xs, ys = pixel_grid(*solid.shape)
    dx, dy = xs - site.point[0], ys - site.point[1]
    along = (dx * -site.normal[1] + dy * site.normal[0]) / width
    outwards = dx * site.normal[0] + dy * site.normal[1]
    near = with_soft_edge(solid)
    push = (depth * np.clip(1 - along**2, 0, None) ** 2 * np.clip(1 + outwards / (3 * depth), 0, 1) * near)
    map_x = (xs + push * site.normal[0]).astype(np.float32)
    map_y = (ys + push * site.normal[1]).astype(np.float32)
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def part_unit(object_mask: np.ndarray, scale: float) -> float:
    """Pixels per reference pixel for this part: its size relative to REFERENCE_PART_SIDE, times scale."""
    return scale * math.sqrt(float(np.count_nonzero(object_mask))) / REFERENCE_PART_SIDE


def paint_defect(image: np.ndarray, object_mask: np.ndarray, kind: str, rng: np.random.Generator,
                 scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect of `kind` on the part and return (new RGB uint8 photo, defect mask).

    The mask is exactly the set of pixels whose value changed, all on the part or its soft edge.
    When the part is too small, or an edge defect finds no room, the photo comes back unchanged with
    an empty mask. Deterministic for a seeded `rng`.
    """
    if kind not in DEFECT_KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; expected one of {', '.join(DEFECT_KINDS)}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be 8-bit RGB (H, W, 3), got {image.dtype} {image.shape}")
    if object_mask.shape != image.shape[:2]:
        raise ValueError(f"object_mask shape {object_mask.shape} differs from the image's {image.shape[:2]}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    solid = object_mask.astype(bool)
    unit = part_unit(solid, scale)
    result, changed = image.copy(), np.zeros(solid.shape, bool)
    if unit < MIN_UNIT:
        return result, changed

    # Work on the part's surroundings only, so big photos of small parts stay cheap; a chip needs
    # room beside the part to copy the table from.
    ys, xs = np.nonzero(solid)
    margin = math.ceil((70 if kind == "missing" else 25) * unit) + HALO + 4
    top, left = max(0, ys.min() - margin), max(0, xs.min() - margin)
    bottom, right = min(solid.shape[0], ys.max() + margin + 1), min(solid.shape[1], xs.max() + margin + 1)
    window = (slice(top, bottom), slice(left, right))
    photo, part = image[window].astype(np.float32) / 255, solid[window]
    if kind in SURFACE_DEFECTS:
        luminance = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
        SURFACE_DEFECTS[kind](rng, photo, part.astype(np.float32), luminance, unit)
    elif kind == "missing":
        remove_chip(rng, photo, part, unit)
    else:
        photo = push_edge_in(rng, photo, part, unit)
    result[window] = np.clip(photo * 255 + 0.5, 0, 255).astype(np.uint8)
    changed = np.any(result != image, axis=2)
    return result, changed
