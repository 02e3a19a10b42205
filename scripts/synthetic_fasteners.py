"""License-free synthetic photos of metal parts, healthy and defective, in the MVTec AD layout.

Parts: a screw and a hex nut (what the toolkit is for), and three parts unlike a screw to measure how
it fails on other shapes: a flat brushed plate (its elongation straddles the pipeline's rotation
cut-off), a washer and an L-shaped bent bracket. Scene options (a bright table, saturated glare, a
part crossing the image border) make the photos harder in the ways real rigs do.

MVTec AD needs a registration and forbids commercial use; this set lets anyone run the whole toolkit
end to end in seconds. Every photo is rendered from a seeded scene (pose, lamp, background, sensor
noise) plus, for defective photos, a defect drawn from a second, independent seed. So the same photo
can be rendered with and without its defect, and the mask is exactly the set of pixels the defect
drawing changed; the tests rely on this to prove the masks are right.

Geometry is written in pixels of a 256-px image ("reference pixels") and scaled for other sizes.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # run as a script, sys.path holds scripts/ instead of the root
    sys.path.insert(0, str(PROJECT_ROOT))

from evaluation.mvtec import mask_path  # noqa: E402
from output_files import write_atomically  # noqa: E402
from synthetic.defects import (  # noqa: E402
    MAX_SCALE,
    SURFACE_DEFECTS,
    EdgeSite,
    chip,
    pick_edge_site,
    pixel_grid,
    smooth_noise,
)

PARTS = ("screw", "nut", "plate", "washer", "bracket")
# Defect kinds per part, in folder order (the order also seeds the test photos: keep it).
PART_DEFECTS = {
    "screw": ("rust", "corrosion", "scratch", "deformation"),
    "nut": ("rust", "corrosion", "scratch", "deformation"),
    "plate": ("rust", "corrosion", "scratch", "missing"),
    "washer": ("rust", "corrosion", "scratch", "deformation"),
    "bracket": ("rust", "corrosion", "scratch", "deformation"),
}
TABLES = {"dark": 0.22, "bright": 0.62}  # mean grey level of the table the part lies on
# Turns a part may lie at before the max_rotation jitter: a nut repeats every 60 degrees, a washer is round.
BASE_TURNS = {"screw": 0.0, "nut": math.pi / 3, "plate": 0.0, "washer": 2 * math.pi, "bracket": 0.0}
REFERENCE_SIZE = 256
MAX_SIZE = 4096  # image side; a larger one needs gigabytes per photo
MAX_GLARE = 100.0  # 1 already clips the highlights to white; far above, the shading overflows to NaN
MARKER_NAME = "synthetic.json"  # written into the output folder; lets a rerun replace its own files only

# Screw lying on its side: axis along a (head at negative a), b across it; reference pixels.
HEAD_LENGTH, HEAD_RADIUS, SLOT_HALF_WIDTH, SLOT_DEPTH = 24.0, 19.0, 2.2, 7.0
NECK_END, SHANK_END, TIP_LENGTH = 38.0, 138.0, 14.0
MAJOR_RADIUS, CORE_RADIUS, PITCH, THREAD_SLANT = 10.0, 7.5, 7.0, 0.35
SCREW_MIDDLE = (SHANK_END - HEAD_LENGTH) / 2  # the pose centre sits here on the axis
# Hex nut seen from above; reference pixels.
FLAT_RADIUS, TOP_FACE_RADIUS, HOLE_CHAMFER_RADIUS, THREAD_RADIUS, BORE_RADIUS = 66.0, 63.0, 36.0, 31.0, 27.0
# Flat plate seen from above: half sides for elongation 1 (scaled by sqrt(elongation) either way),
# rounded corners, a narrow bevel round the edge.
PLATE_HALF_SIDE, PLATE_CORNER_RADIUS, PLATE_BEVEL = 66.0, 9.0, 2.5
PLATE_ELONGATION = (1.1, 1.6)  # straddles Config.min_elongation (1.5), the pipeline's rotation cut-off
# Flat washer seen from above.
WASHER_OUTER_RADIUS, WASHER_INNER_RADIUS, WASHER_BEVEL = 62.0, 27.0, 2.5
# Flat bar bent edgewise into an L, seen from above: the outer corner is at (0, 0), one arm runs along
# +a, the other along +b, and the bend is a quarter ring round (BEND_CENTRE, BEND_CENTRE).
BAR_WIDTH, BEND_INNER_RADIUS, ARM_A_END, ARM_B_END, BAR_HOLE_RADIUS = 32.0, 14.0, 142.0, 108.0, 5.5
BEND_CENTRE = BAR_WIDTH + BEND_INNER_RADIUS
BRACKET_CENTROID = (54.2, 36.1)  # the pose centre sits here (centroid of the L, measured)
STREAK_REACH, STREAK_SAMPLES = 160.0, 641  # brushed streak profile: +-reach reference pixels, 0.5 px apart


@dataclass(frozen=True)
class SyntheticSettings:
    """What to generate; defect_scale and max_rotation are the knobs that make the set easier or harder."""

    part: str = "screw"
    n_train: int = 60
    n_test_per_kind: int = 15  # also the number of healthy test photos, as in MVTec AD
    size: int = 256
    seed: int = 0
    defect_scale: float = 1.0  # multiplies every defect's size
    max_rotation: float = 25.0  # degrees either way from the part's base orientation
    table: str = "dark"  # what the part lies on: "dark" or "bright"
    glare: float = 0.0  # strength of saturated specular highlights on the part; 0 = none, 1 = clipped
    border_touch: float = 0.0  # share of photos whose part is shifted onto or across the image border

    def __post_init__(self) -> None:
        if self.part not in PARTS:
            raise ValueError(f"part must be one of {', '.join(PARTS)}, got {self.part!r}")
        if self.n_train < 1 or self.n_test_per_kind < 1:
            raise ValueError("n_train and n_test_per_kind must be at least 1")
        if not 64 <= self.size <= MAX_SIZE:
            raise ValueError(f"size must be 64 to {MAX_SIZE} pixels, got {self.size}")
        if self.seed < 0:
            raise ValueError(f"seed must be 0 or more, got {self.seed}")
        # written as "not in range" so that NaN is refused too
        if not 0 < self.defect_scale <= MAX_SCALE:
            raise ValueError(f"defect_scale must be above 0, at most {MAX_SCALE:g}, got {self.defect_scale}")
        if not 0 <= self.max_rotation <= 360:
            raise ValueError(f"max_rotation must be 0 to 360 degrees, got {self.max_rotation}")
        if self.table not in TABLES:
            raise ValueError(f"table must be one of {', '.join(TABLES)}, got {self.table!r}")
        if not 0 <= self.glare <= MAX_GLARE:
            raise ValueError(f"glare must be 0 to {MAX_GLARE:g}, got {self.glare}")
        if not 0 <= self.border_touch <= 1:
            raise ValueError("border_touch must be between 0 and 1")


@dataclass
class Scene:
    """Everything about one photo that does not depend on its defect."""

    centre: np.ndarray  # (2,) image pixels, x then y
    angle: float  # radians, part's local frame -> image frame
    unit: float  # image pixels per reference pixel
    light: np.ndarray  # (3,) unit vector towards the lamp, image frame (x, y, z towards camera)
    softboxes: np.ndarray  # (k, 4): normal-space x, y, width, strength of the reflected lamps
    background: np.ndarray  # (H, W, 3) float RGB
    illumination: np.ndarray  # (H, W) uneven lighting factor
    noise: np.ndarray  # (H, W, 3) sensor noise
    blur_sigma: float
    elongation: float = 1.0  # long side over short side, for parts whose proportions vary (plate)
    streaks: np.ndarray = field(default_factory=lambda: np.zeros(2))  # brushed-metal profile, unit variance
    # Highlights: (where on the part as a quantile of its pixels, long and short radius in reference
    # pixels, turn, gain) per row.
    glare_spots: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))
    border: tuple[int, float] | None = None  # (side 0-3 = left/top/right/bottom, share pushed over it)


@dataclass
class Part:
    """A shaded part before it is put on the background."""

    colour: np.ndarray  # (H, W, 3)
    coverage: np.ndarray  # (H, W) 0..1, anti-aliased silhouette
    diffuse: np.ndarray  # (H, W) lambert term, so that matte deposits (rust) are lit like the part


# A deformation maps local coordinates (a, b) to the displacement (da, db) where the undeformed part
# is looked up, in reference pixels.
Deformation = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def draw_scene(rng: np.random.Generator, settings: SyntheticSettings) -> Scene:
    """Pose, lamp, background and sensor of one photo (always the same number of draws, in order)."""
    size = settings.size
    unit = size / REFERENCE_SIZE * rng.uniform(0.93, 1.07)
    centre = size / 2 + rng.uniform(-0.06, 0.06, 2) * size
    turns = BASE_TURNS[settings.part]
    base_angle = rng.uniform(0, turns) if turns else 0.0
    angle = base_angle + math.radians(rng.uniform(-settings.max_rotation, settings.max_rotation))
    azimuth = math.radians(225 + rng.uniform(-20, 20))  # lamp above-left, as on a fixed inspection rig
    elevation = math.radians(rng.uniform(40, 55))
    light = np.array([math.cos(azimuth) * math.cos(elevation), math.sin(azimuth) * math.cos(elevation),
                      math.sin(elevation)])
    softboxes = np.array([
        [0.55 * math.cos(azimuth), 0.55 * math.sin(azimuth), 0.30, rng.uniform(0.7, 0.9)],
        [-0.65 * math.cos(azimuth + 0.4), -0.65 * math.sin(azimuth + 0.4), 0.18, rng.uniform(0.3, 0.5)],
    ]) + np.concatenate([rng.uniform(-0.06, 0.06, (2, 2)), np.zeros((2, 2))], axis=1)

    shape = (size, size)
    grain = smooth_noise(rng, shape, 1.5 * unit)
    mottle = smooth_noise(rng, shape, 28 * unit)
    fibre = smooth_noise(rng, shape, 5 * unit)
    contrast = TABLES["dark"] / TABLES[settings.table]  # the same texture in grey levels on any table
    tone = TABLES[settings.table] * rng.uniform(0.9, 1.1) * (
        1 + 0.07 * contrast * mottle + 0.04 * contrast * fibre + 0.05 * contrast * grain)
    background = tone[..., None] * np.array([0.97, 1.0, 1.04], np.float32)

    xs, ys = pixel_grid(size, size)
    direction = rng.uniform(0, 2 * math.pi)
    ramp = ((xs - size / 2) * math.cos(direction) + (ys - size / 2) * math.sin(direction)) / size
    vignette = ((xs - size / 2) ** 2 + (ys - size / 2) ** 2) / (size / 2) ** 2
    illumination = (1 + rng.uniform(0.15, 0.35) * ramp) * (1 - 0.12 * vignette)
    noise_level = rng.uniform(0.012, 0.022)
    noise = (rng.standard_normal((size, size, 1), np.float32) * 0.7
             + rng.standard_normal((size, size, 3), np.float32) * 0.5)
    blur_sigma = rng.uniform(0.45, 0.8) * unit
    # Draws for the plate, washer and bracket and for the scene options come last and only when used,
    # so a screw or nut set does not depend on them (the same seed gives the same photos).
    elongation = rng.uniform(*PLATE_ELONGATION) if settings.part == "plate" else 1.0
    streaks = np.zeros(2)
    if settings.part in ("plate", "bracket"):
        streaks = cv2.GaussianBlur(rng.standard_normal((1, STREAK_SAMPLES)), (0, 0), 1.2).ravel()
        streaks /= streaks.std()
    glare_spots = np.zeros((0, 5))
    if settings.glare > 0:
        count = int(rng.integers(1, 4))
        glare_spots = np.column_stack([
            rng.random(count), rng.uniform(6, 16, count), rng.uniform(1.5, 4, count),
            rng.uniform(0, math.pi, count), settings.glare * rng.uniform(0.8, 1.2, count)])
    border = None
    if settings.border_touch > 0 and rng.random() < settings.border_touch:
        border = (int(rng.integers(4)), float(rng.uniform(0.03, 0.3)))
    return Scene(centre, angle, unit, light, softboxes, background.astype(np.float32),
                 illumination.astype(np.float32), (noise * noise_level).astype(np.float32), blur_sigma,
                 elongation, streaks, glare_spots, border)


def local_coordinates(scene: Scene, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel in the part's own frame, in reference pixels."""
    xs, ys = pixel_grid(size, size)
    dx, dy = xs - scene.centre[0], ys - scene.centre[1]
    cos, sin = math.cos(scene.angle), math.sin(scene.angle)
    return (dx * cos + dy * sin) / scene.unit, (-dx * sin + dy * cos) / scene.unit


def shade_metal(scene: Scene, na: np.ndarray, nb: np.ndarray, albedo: float) -> tuple[np.ndarray, np.ndarray]:
    """Lambert + Blinn-Phong + reflected softboxes for local-frame normals; returns (RGB, lambert)."""
    nz = np.sqrt(np.clip(1 - na**2 - nb**2, 0.0, 1.0))
    cos, sin = math.cos(scene.angle), math.sin(scene.angle)
    nx, ny = na * cos - nb * sin, na * sin + nb * cos
    lx, ly, lz = scene.light
    diffuse = np.clip(nx * lx + ny * ly + nz * lz, 0, 1)
    half = scene.light + np.array([0.0, 0.0, 1.0])
    half /= np.linalg.norm(half)
    specular = np.clip(nx * half[0] + ny * half[1] + nz * half[2], 0, 1) ** 60
    reflection = np.full_like(nx, 0.22)
    for cx, cy, width, strength in scene.softboxes:
        reflection += strength * np.exp(-((nx - cx) ** 2 + (ny - cy) ** 2) / width**2)
    luminance = albedo * (0.12 + 0.45 * diffuse + 0.75 * reflection) + 0.8 * specular
    colour = luminance[..., None] * np.array([0.94, 0.97, 1.0], np.float32)
    return colour.astype(np.float32), diffuse.astype(np.float32)


def coverage_from_distance(signed_distance: np.ndarray, unit: float) -> np.ndarray:
    """Anti-aliased silhouette from a signed distance in reference pixels (positive inside)."""
    return np.clip(signed_distance * unit + 0.5, 0, 1).astype(np.float32)


def triangle(phase: np.ndarray) -> np.ndarray:
    """0 at integer phase (thread root), 1 at half phase (crest)."""
    return 1 - np.abs(2 * (phase % 1.0) - 1)


def turned_face(scene: Scene, rho: np.ndarray, angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A turned face's sheen: a bright streak through the centre along the lamp's direction, and
    faint concentric tool marks."""
    azimuth = math.atan2(scene.light[1], scene.light[0]) - scene.angle
    streak = np.exp(-np.sin(angle - azimuth) ** 2 / 0.05)
    turning = np.sin(rho * 2.3) * 0.03 + np.sin(rho * 0.71 + 1.0) * 0.03
    return streak, turning


def bevel_normals(scene: Scene, distance: np.ndarray, bevel: float, tilt: float) -> tuple[np.ndarray, np.ndarray]:
    """Local-frame normals of a flat part whose edge is rounded off over `bevel` reference pixels:
    within it the surface tilts outwards, down the slope of the signed distance."""
    gy, gx = np.gradient(distance)  # per image pixel; turned into the part's frame below
    cos, sin = math.cos(scene.angle), math.sin(scene.angle)
    ga, gb = gx * cos + gy * sin, -gx * sin + gy * cos
    length = np.maximum(np.hypot(ga, gb), 1e-6)
    slope = tilt * np.clip(1 - distance / bevel, 0, 1)
    return -slope * ga / length, -slope * gb / length


def brushed(scene: Scene, across: np.ndarray) -> np.ndarray:
    """Streaks of brushed metal: the photo's own random profile across the brushing direction."""
    positions = np.linspace(-STREAK_REACH, STREAK_REACH, len(scene.streaks))
    return np.interp(across, positions, scene.streaks).astype(np.float32)


def screw_radius(a: np.ndarray, side: np.ndarray) -> np.ndarray:
    """Silhouette half-width of the screw at axial position a on the given side (+1/-1)."""
    dome = np.clip((a + HEAD_LENGTH) / (0.55 * HEAD_LENGTH), 0, 1)
    head = HEAD_RADIUS * (0.55 + 0.45 * np.sqrt(1 - (1 - dome) ** 2))
    run_in = np.clip((a - NECK_END) / PITCH, 0, 1)  # the thread grows to full depth over one pitch
    crest = np.clip(1.3 * triangle((a + THREAD_SLANT * side * MAJOR_RADIUS) / PITCH) - 0.15, 0, 1)
    thread = 0.92 * MAJOR_RADIUS + run_in * (CORE_RADIUS - 0.92 * MAJOR_RADIUS
                                             + (MAJOR_RADIUS - CORE_RADIUS) * crest)
    taper = np.clip((SHANK_END - a) / TIP_LENGTH, 0.25, 1)
    return np.where(a < 0, head, thread * taper)


def screw_coverage(scene: Scene, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    body = np.minimum(screw_radius(a, np.sign(b)) - np.abs(b), np.minimum(a + HEAD_LENGTH, SHANK_END - a))
    slot = np.maximum(np.abs(b) - SLOT_HALF_WIDTH, a + HEAD_LENGTH - SLOT_DEPTH)
    return coverage_from_distance(np.minimum(body, slot), scene.unit)


def render_screw(scene: Scene, a: np.ndarray, b: np.ndarray) -> Part:
    """Side view of a slotted pan-head screw: cylinder shading, thread flanks, crest highlights."""
    radius = np.maximum(screw_radius(a, np.sign(b)), 1e-3)
    across = np.clip(b / radius, -0.98, 0.98)
    phase = ((a + THREAD_SLANT * b) / PITCH) % 1.0
    threaded = ((a > NECK_END) & (a < SHANK_END)).astype(np.float32)
    flank = np.where(phase < 0.5, -0.5, 0.5) * threaded  # rising flanks face the head, falling ones the tip
    dome = np.clip(1 - (a + HEAD_LENGTH) / (0.45 * HEAD_LENGTH), 0, 1)
    ledge = ((a > -1.5) & (a < 0)).astype(np.float32)  # underside of the head faces the tip
    along = (flank - 0.8 * dome + 0.8 * ledge) * np.sqrt(1 - across**2)
    colour, diffuse = shade_metal(scene, along, across * np.sqrt(1 - along**2), albedo=0.62)
    crest_line = np.exp(-(((phase - 0.5) / 0.07) ** 2)) * threaded
    root_line = np.exp(-((np.minimum(phase, 1 - phase) / 0.08) ** 2)) * threaded
    neck_shadow = 1 - 0.35 * np.exp(-np.clip(a, 0, None) / 2.0) * (a >= 0)
    factor = (1 + 0.35 * crest_line - 0.45 * root_line) * neck_shadow
    return Part(colour * factor[..., None], screw_coverage(scene, a, b), diffuse)


def nut_coverage(scene: Scene, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    rho = np.hypot(a, b)
    offset = (np.arctan2(b, a) + math.pi / 6) % (math.pi / 3) - math.pi / 6
    return coverage_from_distance(np.minimum(FLAT_RADIUS - rho * np.cos(offset), rho - BORE_RADIUS), scene.unit)


def render_nut(scene: Scene, a: np.ndarray, b: np.ndarray) -> Part:
    """Top view of a hex nut: turned top face, chamfered corners, inner chamfer, threaded bore."""
    rho = np.maximum(np.hypot(a, b), 1e-3)
    angle = np.arctan2(b, a)
    # Soft region weights, so that edges between faces are anti-aliased like the silhouette.
    outer = coverage_from_distance(rho - TOP_FACE_RADIUS, scene.unit)
    within_chamfer = coverage_from_distance(HOLE_CHAMFER_RADIUS - rho, scene.unit)
    thread = coverage_from_distance(THREAD_RADIUS - rho, scene.unit)
    face = 1 - outer - within_chamfer
    helix = triangle(rho / 2.0 + angle / (2 * math.pi))
    tilt = 0.57 * outer - 0.7 * (within_chamfer - thread) + 0.5 * (helix - 0.5) * thread
    colour, diffuse = shade_metal(scene, tilt * a / rho, tilt * b / rho, albedo=0.6)
    streak, turning = turned_face(scene, rho, angle)
    factor = (1 + face * (0.3 * streak + turning)) * (1 - thread * (0.45 - 0.3 * helix))
    return Part(colour * factor[..., None], nut_coverage(scene, a, b), diffuse)


def plate_half_sides(scene: Scene) -> tuple[float, float]:
    """Half length and half width: the same area at every elongation."""
    stretch = math.sqrt(scene.elongation)
    return PLATE_HALF_SIDE * stretch, PLATE_HALF_SIDE / stretch


def plate_distance(scene: Scene, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Signed distance to the rounded rectangle's outline (positive inside), reference pixels."""
    half_a, half_b = plate_half_sides(scene)
    qa = np.abs(a) - (half_a - PLATE_CORNER_RADIUS)
    qb = np.abs(b) - (half_b - PLATE_CORNER_RADIUS)
    outside = np.hypot(np.maximum(qa, 0), np.maximum(qb, 0)) + np.minimum(np.maximum(qa, qb), 0)
    return PLATE_CORNER_RADIUS - outside


def plate_coverage(scene: Scene, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return coverage_from_distance(plate_distance(scene, a, b), scene.unit)


def render_plate(scene: Scene, a: np.ndarray, b: np.ndarray) -> Part:
    """Top view of a flat, polished plate brushed along its length: the softboxes' reflection sweeps
    across its very slightly domed face, the streaks catch the light, the edge is bevelled."""
    distance = plate_distance(scene, a, b)
    half_a, half_b = plate_half_sides(scene)
    edge_a, edge_b = bevel_normals(scene, distance, PLATE_BEVEL, 0.6)
    colour, diffuse = shade_metal(scene, 0.2 * a / half_a + edge_a, 0.2 * b / half_b + edge_b, albedo=0.68)
    factor = 1 + 0.07 * brushed(scene, b)
    return Part(colour * factor[..., None], coverage_from_distance(distance, scene.unit), diffuse)


def washer_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    rho = np.hypot(a, b)
    return np.minimum(WASHER_OUTER_RADIUS - rho, rho - WASHER_INNER_RADIUS)


def washer_coverage(scene: Scene, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return coverage_from_distance(washer_distance(a, b), scene.unit)


def render_washer(scene: Scene, a: np.ndarray, b: np.ndarray) -> Part:
    """Top view of a flat washer: a turned ring with both edges rounded off."""
    distance = washer_distance(a, b)
    edge_a, edge_b = bevel_normals(scene, distance, WASHER_BEVEL, 0.6)
    colour, diffuse = shade_metal(scene, edge_a, edge_b, albedo=0.6)
    streak, turning = turned_face(scene, np.hypot(a, b), np.arctan2(b, a))
    factor = 1 + 0.3 * streak + turning
    return Part(colour * factor[..., None], coverage_from_distance(distance, scene.unit), diffuse)


def bracket_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Signed distance to the bent bar's outline, with one mounting hole near each arm's end."""
    bend_rho = np.hypot(a - BEND_CENTRE, b - BEND_CENTRE)
    bend = np.minimum(bend_rho - BEND_INNER_RADIUS, BEND_CENTRE - bend_rho)
    arm_a = np.minimum(np.minimum(b, BAR_WIDTH - b), ARM_A_END - a)
    arm_b = np.minimum(np.minimum(a, BAR_WIDTH - a), ARM_B_END - b)
    body = np.where((a < BEND_CENTRE) & (b < BEND_CENTRE), bend, np.where(a >= BEND_CENTRE, arm_a, arm_b))
    hole_a = np.hypot(a - (ARM_A_END - 20), b - BAR_WIDTH / 2) - BAR_HOLE_RADIUS
    hole_b = np.hypot(a - BAR_WIDTH / 2, b - (ARM_B_END - 20)) - BAR_HOLE_RADIUS
    return np.minimum(body, np.minimum(hole_a, hole_b))


def bracket_coverage(scene: Scene, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return coverage_from_distance(bracket_distance(a, b), scene.unit)


def render_bracket(scene: Scene, a: np.ndarray, b: np.ndarray) -> Part:
    """Top view of a flat bar bent edgewise into an L: brushed along the bar (the streaks follow the
    bend), bevelled edges, the bend a little duller where the metal was stretched."""
    distance = bracket_distance(a, b)
    edge_a, edge_b = bevel_normals(scene, distance, PLATE_BEVEL, 0.6)
    colour, diffuse = shade_metal(scene, edge_a, edge_b, albedo=0.64)
    in_bend = (a < BEND_CENTRE) & (b < BEND_CENTRE)
    across = np.where(in_bend, BEND_CENTRE - np.hypot(a - BEND_CENTRE, b - BEND_CENTRE),
                      np.where(a >= BEND_CENTRE, b, a))
    factor = (1 + 0.07 * brushed(scene, across)) * np.where(in_bend, 0.93, 1.0)
    return Part(colour * factor[..., None], coverage_from_distance(distance, scene.unit), diffuse)


RENDERERS = {"screw": render_screw, "nut": render_nut, "plate": render_plate, "washer": render_washer,
             "bracket": render_bracket}
COVERAGES = {"screw": screw_coverage, "nut": nut_coverage, "plate": plate_coverage, "washer": washer_coverage,
             "bracket": bracket_coverage}
# Where the pose centre sits in each part's own frame (the origin for parts not listed).
PART_ORIGINS = {"screw": (SCREW_MIDDLE, 0.0), "bracket": BRACKET_CENTROID}


def bend_beyond(rng: np.random.Generator, strength: float, end: float, start_share: tuple[float, float],
                along_b: bool) -> Deformation:
    """A straight piece bends smoothly from a random point, its end moving sideways a few pixels."""
    start = rng.uniform(*start_share) * end
    curvature = strength * rng.uniform(6.0, 11.0) * rng.choice([-1, 1]) / (end - start) ** 2

    def displacement(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if along_b:
            return -curvature * np.clip(b - start, 0, None) ** 2, np.zeros_like(b)
        return np.zeros_like(a), -curvature * np.clip(a - start, 0, None) ** 2

    return displacement


def dented_edge(rng: np.random.Generator, strength: float, radius: float) -> Deformation:
    """The rim of a round part (nut, washer) pushed inwards, fading towards the middle; zero outside
    a compact sector so that the mask (every pixel that moved) stays local."""
    centre = rng.uniform(0, 2 * math.pi)
    width = rng.uniform(0.3, 0.5)
    depth = strength * rng.uniform(5.0, 8.0)

    def displacement(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rho = np.maximum(np.hypot(a, b), 1e-3)
        offset = (np.arctan2(b, a) - centre + math.pi) % (2 * math.pi) - math.pi
        falloff = np.clip((rho - 0.75 * radius) / (0.25 * radius), 0, None) ** 2
        push = depth * np.clip(1 - (offset / width) ** 2, 0, None) ** 2 * falloff
        return push * a / rho, push * b / rho

    return displacement


DEFORMATIONS: dict[str, Callable[[np.random.Generator, float], Deformation]] = {
    "screw": functools.partial(bend_beyond, end=SHANK_END, start_share=(0.35, 0.6), along_b=False),
    "nut": functools.partial(dented_edge, radius=FLAT_RADIUS),
    "washer": functools.partial(dented_edge, radius=WASHER_OUTER_RADIUS),
    # the arm along b bends beyond the bend and its first few pixels
    "bracket": functools.partial(bend_beyond, end=ARM_B_END, start_share=(0.5, 0.65), along_b=True),
}


def plate_corner(scene: Scene, size: int, rng: np.random.Generator) -> EdgeSite | None:
    """One of the plate's four corners (the middle of its rounded arc) if it lies in the photo."""
    half_a, half_b = plate_half_sides(scene)
    inset = PLATE_CORNER_RADIUS * (1 - 1 / math.sqrt(2))
    signs = np.array([(1, 1), (1, -1), (-1, 1), (-1, -1)], np.float64)[rng.permutation(4)]
    cos, sin = math.cos(scene.angle), math.sin(scene.angle)
    for sign_a, sign_b in signs:
        local = np.array([sign_a * (half_a - inset), sign_b * (half_b - inset)])
        point = scene.centre + scene.unit * np.array([local[0] * cos - local[1] * sin, local[0] * sin + local[1] * cos])
        if (point >= 0).all() and (point <= size - 1).all():
            normal = np.array([sign_a * cos - sign_b * sin, sign_a * sin + sign_b * cos]) / math.sqrt(2)
            return EdgeSite(point, normal)
    return None


def chip_plate(rng: np.random.Generator, scene: Scene, part: Part, scale: float) -> np.ndarray:
    """Break a chip off a corner (half the time) or an edge of the plate; returns the pixels whose
    coverage changed. The table shows through where the metal went."""
    radius = scale * rng.uniform(6, 11)
    site = plate_corner(scene, part.coverage.shape[0], rng) if rng.random() < 0.5 else None
    if site is None:
        site = pick_edge_site(rng, part.coverage >= 0.5, radius, 0)
    if site is None:  # the plate lies entirely outside the photo's inner area: nothing to chip
        return np.zeros(part.coverage.shape, bool)
    removed = part.coverage * chip(rng, part.coverage.shape, site, radius)
    part.coverage = part.coverage - removed
    return removed > 0


def part_coordinates(scene: Scene, settings: SyntheticSettings) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel in the part's own frame, shifted so the pose centre sits at the part's origin."""
    a, b = local_coordinates(scene, settings.size)
    origin_a, origin_b = PART_ORIGINS.get(settings.part, (0.0, 0.0))
    return a + origin_a, b + origin_b


def push_over_border(scene: Scene, settings: SyntheticSettings) -> Scene:
    """Shift the part so that 3-30 % of its width (or height), and at least 4 reference pixels, lie
    across the chosen image border."""
    side, share = scene.border
    ys, xs = np.nonzero(COVERAGES[settings.part](scene, *part_coordinates(scene, settings)) >= 0.5)
    last = settings.size - 1
    least = 4 * scene.unit  # a thin part lying along the border must still reach over it
    if side in (0, 2):
        overshoot = max(share * (xs.max() - xs.min()), least)
        shift = np.array([-xs.min() - overshoot if side == 0 else last - xs.max() + overshoot, 0.0])
    else:
        overshoot = max(share * (ys.max() - ys.min()), least)
        shift = np.array([0.0, -ys.min() - overshoot if side == 1 else last - ys.max() + overshoot])
    return replace(scene, centre=scene.centre + shift, border=None)


def glare(scene: Scene, clean: np.ndarray) -> np.ndarray:
    """Specular highlights centred on the undamaged part (so a defect cannot move them), in image
    pixels; the caller keeps them on the metal."""
    ys, xs = np.nonzero(clean >= 0.999)
    layer = np.zeros(clean.shape, np.float32)
    if not len(xs):
        return layer
    grid_x, grid_y = pixel_grid(*clean.shape)
    for quantile, long, short, turn, gain in scene.glare_spots:
        index = min(int(quantile * len(xs)), len(xs) - 1)
        dx, dy = grid_x - xs[index], grid_y - ys[index]
        along = (dx * math.cos(turn) + dy * math.sin(turn)) / (long * scene.unit)
        across = (-dx * math.sin(turn) + dy * math.cos(turn)) / (short * scene.unit)
        layer += gain * np.exp(-0.5 * (along**2 + across**2))
    return layer


def render_sample(
    settings: SyntheticSettings, key: tuple[int, ...], defect: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """One RGB photo and its uint8 mask (255 = defect). The same key without a defect gives the
    identical photo minus the defect, because scene and defect draw from separate seeds."""
    kinds = PART_DEFECTS[settings.part]
    if defect not in (None, *kinds):
        raise ValueError(f"unknown defect kind {defect!r} for a {settings.part}; expected one of {', '.join(kinds)}")
    scene = draw_scene(np.random.default_rng([settings.seed, *key, 0]), settings)
    if scene.border is not None:
        scene = push_over_border(scene, settings)
    defect_rng = np.random.default_rng([settings.seed, *key, 1])
    size, scale = settings.size, scene.unit * settings.defect_scale
    a, b = part_coordinates(scene, settings)
    mask = np.zeros((size, size), bool)
    if defect == "deformation":
        da, db = DEFORMATIONS[settings.part](defect_rng, settings.defect_scale)(a, b)
        clean = COVERAGES[settings.part](scene, a, b)
        part = RENDERERS[settings.part](scene, a + da, b + db)
        moved = np.hypot(da, db) > 0  # any shift can flip a pixel at a sharp edge, so no threshold
        mask = moved & ((clean > 0) | (part.coverage > 0))
    else:
        part = RENDERERS[settings.part](scene, a, b)
        clean = part.coverage
    if defect == "missing":
        mask = chip_plate(defect_rng, scene, part, scale)

    shadow_offset = -scene.light[:2] / scene.light[2] * 3 * scene.unit
    shifted = cv2.warpAffine(part.coverage, np.float32([[1, 0, shadow_offset[0]], [0, 1, shadow_offset[1]]]),
                             (size, size))
    shadow = cv2.GaussianBlur(shifted, (0, 0), 3 * scene.unit)
    coverage = part.coverage[..., None]
    image = scene.background * (1 - 0.6 * shadow)[..., None] * (1 - coverage) + part.colour * coverage
    if len(scene.glare_spots):
        image += (glare(scene, clean) * part.coverage)[..., None]
    if defect in SURFACE_DEFECTS:
        mask = SURFACE_DEFECTS[defect](defect_rng, image, part.coverage, part.diffuse, scale)

    image = image * scene.illumination[..., None] + scene.noise
    image = cv2.GaussianBlur(image, (0, 0), scene.blur_sigma)
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8), mask.astype(np.uint8) * 255


def planned_files(settings: SyntheticSettings) -> list[tuple[str, tuple[int, ...], str | None]]:
    """(relative image path, scene key, defect) for every photo of the set, in a fixed order."""
    plan = [(f"train/good/{i:03d}.png", (0, 0, i), None) for i in range(settings.n_train)]
    plan += [(f"test/good/{i:03d}.png", (1, 0, i), None) for i in range(settings.n_test_per_kind)]
    for kind_index, kind in enumerate(PART_DEFECTS[settings.part], start=1):
        plan += [(f"test/{kind}/{i:03d}.png", (1, kind_index, i), kind) for i in range(settings.n_test_per_kind)]
    return plan


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), array, [cv2.IMWRITE_PNG_COMPRESSION, 3]):
        raise OSError(f"{path}: could not write image")


def listed_files(out: Path) -> list[str]:
    """Every file (relative to ``out``) the marker of a synthetic set lists: all its run set out to
    write, so a rerun can clear them and --verify can tell a finished set from an interrupted one."""
    marker = out / MARKER_NAME
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # unreadable, not UTF-8, not JSON
        reason = getattr(error, "strerror", None) or error
        raise ValueError(f"{marker}: cannot be read as the list of a synthetic set's files ({reason})") from None
    files = record.get("files") if isinstance(record, dict) else None
    if not (isinstance(files, list) and all(isinstance(name, str) for name in files)):
        raise ValueError(f"{marker}: holds no list of the synthetic set's files under \"files\"")
    return files


def clear_previous_set(out: Path) -> None:
    """Remove what an earlier run wrote (it may have had more photos); refuse to touch anything else."""
    if not (out / MARKER_NAME).is_file():
        if out.is_dir() and any(out.iterdir()):
            raise FileExistsError(f"{out}: folder is not empty and was not made by --synthetic; "
                                  "choose another --out")
        return
    inside = out.resolve()
    for relative in listed_files(out):
        target = (out / relative).resolve()
        if inside in target.parents:  # a hand-edited marker must not reach outside the folder
            target.unlink(missing_ok=True)


def generate(settings: SyntheticSettings, out: str | Path) -> list[Path]:
    """Write the whole set in the MVTec AD layout and return the files written.

    The marker listing every file is written first, so an interrupted run can still be cleared and
    redone by the next one, and ``--verify`` reports the files it left out.
    """
    out = Path(out)
    clear_previous_set(out)
    plan = [
        (relative, key, defect, mask_path("", Path(relative)).as_posix() if defect else None)
        for relative, key, defect in planned_files(settings)
    ]
    written = [path for relative, _, _, mask in plan for path in (relative, mask) if path]
    record = {"generator": "scripts/synthetic_fasteners.py", "settings": asdict(settings), "files": written}
    write_atomically(out / MARKER_NAME, json.dumps(record, indent=1) + "\n")
    for relative, key, defect, mask_relative in plan:
        image, mask = render_sample(settings, key, defect)
        write_png(out / relative, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if mask_relative:
            write_png(out / mask_relative, mask)
    return [out / relative for relative in written]


if __name__ == "__main__":  # a library of download_datasets.py; run on its own it says where its command is
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog="Generate a set with: python scripts/download_datasets.py --synthetic [--part nut] [--out FOLDER]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args()
    parser.print_help()
