"""License-free synthetic photos of screws or hex nuts, healthy and defective, in the MVTec AD layout.

MVTec AD needs a registration and forbids commercial use; this set lets anyone run the whole toolkit
end to end in seconds. Every photo is rendered from a seeded scene (pose, lamp, background, sensor
noise) plus, for defective photos, a defect drawn from a second, independent seed. So the same photo
can be rendered with and without its defect, and the mask is exactly the set of pixels the defect
drawing changed; the tests rely on this to prove the masks are right.

Geometry is written in pixels of a 256-px image ("reference pixels") and scaled for other sizes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from preprocessing.io import mask_path, write_atomically
from synthetic.defects import SURFACE_DEFECTS, pixel_grid, smooth_noise

PARTS = ("screw", "nut")
DEFECT_KINDS = ("rust", "corrosion", "scratch", "deformation")
REFERENCE_SIZE = 256
MARKER_NAME = "synthetic.json"  # written into the output folder; lets a rerun replace its own files only

# Screw lying on its side: axis along a (head at negative a), b across it; reference pixels.
HEAD_LENGTH, HEAD_RADIUS, SLOT_HALF_WIDTH, SLOT_DEPTH = 24.0, 19.0, 2.2, 7.0
NECK_END, SHANK_END, TIP_LENGTH = 38.0, 138.0, 14.0
MAJOR_RADIUS, CORE_RADIUS, PITCH, THREAD_SLANT = 10.0, 7.5, 7.0, 0.35
SCREW_MIDDLE = (SHANK_END - HEAD_LENGTH) / 2  # the pose centre sits here on the axis
# Hex nut seen from above; reference pixels.
FLAT_RADIUS, TOP_FACE_RADIUS, HOLE_CHAMFER_RADIUS, THREAD_RADIUS, BORE_RADIUS = 66.0, 63.0, 36.0, 31.0, 27.0


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

    def __post_init__(self) -> None:
        if self.part not in PARTS:
            raise ValueError(f"part must be one of {', '.join(PARTS)}, got {self.part!r}")
        if self.n_train < 1 or self.n_test_per_kind < 1:
            raise ValueError("n_train and n_test_per_kind must be at least 1")
        if self.size < 64:
            raise ValueError("size must be at least 64 pixels")
        if self.defect_scale <= 0:
            raise ValueError("defect_scale must be positive")


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
    base_angle = 0.0 if settings.part == "screw" else rng.uniform(0, math.pi / 3)
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
    tone = 0.22 * rng.uniform(0.9, 1.1) * (1 + 0.07 * mottle + 0.04 * fibre + 0.05 * grain)
    background = tone[..., None] * np.array([0.97, 1.0, 1.04], np.float32)

    xs, ys = pixel_grid(size, size)
    direction = rng.uniform(0, 2 * math.pi)
    ramp = ((xs - size / 2) * math.cos(direction) + (ys - size / 2) * math.sin(direction)) / size
    vignette = ((xs - size / 2) ** 2 + (ys - size / 2) ** 2) / (size / 2) ** 2
    illumination = (1 + rng.uniform(0.15, 0.35) * ramp) * (1 - 0.12 * vignette)
    noise_level = rng.uniform(0.012, 0.022)
    noise = (rng.standard_normal((size, size, 1), np.float32) * 0.7
             + rng.standard_normal((size, size, 3), np.float32) * 0.5)
    return Scene(centre, angle, unit, light, softboxes, background.astype(np.float32),
                 illumination.astype(np.float32), (noise * noise_level).astype(np.float32),
                 rng.uniform(0.45, 0.8) * unit)


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


def screw_coverage(a: np.ndarray, b: np.ndarray, unit: float) -> np.ndarray:
    body = np.minimum(screw_radius(a, np.sign(b)) - np.abs(b), np.minimum(a + HEAD_LENGTH, SHANK_END - a))
    slot = np.maximum(np.abs(b) - SLOT_HALF_WIDTH, a + HEAD_LENGTH - SLOT_DEPTH)
    return coverage_from_distance(np.minimum(body, slot), unit)


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
    return Part(colour * factor[..., None], screw_coverage(a, b, scene.unit), diffuse)


def nut_coverage(a: np.ndarray, b: np.ndarray, unit: float) -> np.ndarray:
    rho = np.hypot(a, b)
    offset = (np.arctan2(b, a) + math.pi / 6) % (math.pi / 3) - math.pi / 6
    return coverage_from_distance(np.minimum(FLAT_RADIUS - rho * np.cos(offset), rho - BORE_RADIUS), unit)


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
    # Turned faces show a bright streak through the centre along the lamp's direction.
    azimuth = math.atan2(scene.light[1], scene.light[0]) - scene.angle
    streak = np.exp(-np.sin(angle - azimuth) ** 2 / 0.05)
    turning = np.sin(rho * 2.3) * 0.03 + np.sin(rho * 0.71 + 1.0) * 0.03
    factor = (1 + face * (0.3 * streak + turning)) * (1 - thread * (0.45 - 0.3 * helix))
    return Part(colour * factor[..., None], nut_coverage(a, b, scene.unit), diffuse)


RENDERERS = {"screw": render_screw, "nut": render_nut}
COVERAGES = {"screw": screw_coverage, "nut": nut_coverage}


def bent_shank(rng: np.random.Generator, strength: float) -> Deformation:
    """The shank bends smoothly from a random point, the tip moving sideways a few pixels."""
    start = rng.uniform(0.35, 0.6) * SHANK_END
    curvature = strength * rng.uniform(6.0, 11.0) * rng.choice([-1, 1]) / (SHANK_END - start) ** 2
    return lambda a, b: (np.zeros_like(a), -curvature * np.clip(a - start, 0, None) ** 2)


def dented_edge(rng: np.random.Generator, strength: float) -> Deformation:
    """An edge of the nut pushed inwards, fading towards the bore; zero outside a compact sector so
    that the mask (every pixel that moved) stays local."""
    centre = rng.uniform(0, 2 * math.pi)
    width = rng.uniform(0.3, 0.5)
    depth = strength * rng.uniform(5.0, 8.0)

    def displacement(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rho = np.maximum(np.hypot(a, b), 1e-3)
        offset = (np.arctan2(b, a) - centre + math.pi) % (2 * math.pi) - math.pi
        falloff = np.clip((rho - 0.75 * FLAT_RADIUS) / (0.25 * FLAT_RADIUS), 0, None) ** 2
        push = depth * np.clip(1 - (offset / width) ** 2, 0, None) ** 2 * falloff
        return push * a / rho, push * b / rho

    return displacement


DEFORMATIONS = {"screw": bent_shank, "nut": dented_edge}


def render_sample(
    settings: SyntheticSettings, key: tuple[int, ...], defect: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """One RGB photo and its uint8 mask (255 = defect). The same key without a defect gives the
    identical photo minus the defect, because scene and defect draw from separate seeds."""
    if defect not in (None, *DEFECT_KINDS):
        raise ValueError(f"unknown defect kind {defect!r}; expected one of {', '.join(DEFECT_KINDS)}")
    scene = draw_scene(np.random.default_rng([settings.seed, *key, 0]), settings)
    defect_rng = np.random.default_rng([settings.seed, *key, 1])
    size, scale = settings.size, scene.unit * settings.defect_scale
    a, b = local_coordinates(scene, size)
    a = a + (SCREW_MIDDLE if settings.part == "screw" else 0.0)
    mask = np.zeros((size, size), bool)
    if defect == "deformation":
        da, db = DEFORMATIONS[settings.part](defect_rng, settings.defect_scale)(a, b)
        clean = COVERAGES[settings.part](a, b, scene.unit)
        part = RENDERERS[settings.part](scene, a + da, b + db)
        moved = np.hypot(da, db) > 0  # any shift can flip a pixel at a sharp edge, so no threshold
        mask = moved & ((clean > 0) | (part.coverage > 0))
    else:
        part = RENDERERS[settings.part](scene, a, b)

    shadow_offset = -scene.light[:2] / scene.light[2] * 3 * scene.unit
    shifted = cv2.warpAffine(part.coverage, np.float32([[1, 0, shadow_offset[0]], [0, 1, shadow_offset[1]]]),
                             (size, size))
    shadow = cv2.GaussianBlur(shifted, (0, 0), 3 * scene.unit)
    coverage = part.coverage[..., None]
    image = scene.background * (1 - 0.6 * shadow)[..., None] * (1 - coverage) + part.colour * coverage
    if defect in SURFACE_DEFECTS:
        mask = SURFACE_DEFECTS[defect](defect_rng, image, part.coverage, part.diffuse, scale)

    image = image * scene.illumination[..., None] + scene.noise
    image = cv2.GaussianBlur(image, (0, 0), scene.blur_sigma)
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8), mask.astype(np.uint8) * 255


def planned_files(settings: SyntheticSettings) -> list[tuple[str, tuple[int, ...], str | None]]:
    """(relative image path, scene key, defect) for every photo of the set, in a fixed order."""
    plan = [(f"train/good/{i:03d}.png", (0, 0, i), None) for i in range(settings.n_train)]
    plan += [(f"test/good/{i:03d}.png", (1, 0, i), None) for i in range(settings.n_test_per_kind)]
    for kind_index, kind in enumerate(DEFECT_KINDS, start=1):
        plan += [(f"test/{kind}/{i:03d}.png", (1, kind_index, i), kind) for i in range(settings.n_test_per_kind)]
    return plan


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), array, [cv2.IMWRITE_PNG_COMPRESSION, 3]):
        raise OSError(f"{path}: could not write image")


def clear_previous_set(out: Path) -> None:
    """Remove what an earlier run wrote (it may have had more photos); refuse to touch anything else."""
    marker = out / MARKER_NAME
    if not marker.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise FileExistsError(f"{out}: folder is not empty and was not made by --synthetic; "
                                  "choose another --out")
        return
    inside = out.resolve()
    for relative in json.loads(marker.read_text(encoding="utf-8"))["files"]:
        target = (out / relative).resolve()
        if inside in target.parents:  # a hand-edited marker must not reach outside the folder
            target.unlink(missing_ok=True)


def generate(settings: SyntheticSettings, out: str | Path) -> list[Path]:
    """Write the whole set in the MVTec AD layout and return the files written.

    The marker listing every file is written first, so an interrupted run can still be cleared and
    redone by the next one.
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
