"""Decide the preprocessing of a data set from its own training photos (``preprocess: auto``).

Every default of the eight-step pipeline was first chosen on screws. Other parts break those
choices photo by photo: a plate whose elongation straddles the rotation cut-off is turned in some
photos and not in others, a shiny edge falls out of the Otsu mask and is blacked out, a bright
table is "inpainted". So the steps are decided once, for the whole data set, from measurements of
the training photos, and every photo (training and inference) then goes through the same steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from config import Config
from preprocessing.lighting import inpaint_specular, specular_mask
from preprocessing.registration import principal_axis
from preprocessing.segmentation import segment_object, solidity

MAX_MEASURED_PHOTOS = 60  # an even sample; the statistics below settle well before this
MIN_FOUND_RATE = 0.95  # share of photos in which a part must be found for the mask to be trusted
MAX_BORDER_RATE = 0.2  # share of photos whose part may touch the frame (such a part keeps its mask)
MAX_AREA_VARIATION = 0.25  # coefficient of variation of the mask's area across photos
MAX_AREA = 0.8  # a part filling more of the frame leaves no background worth zeroing
MIN_HULL_SOLIDITY = 0.9  # a part this convex gets its convex hull as mask (shiny edges kept)
ROTATION_MARGIN = 1.1  # every photo's elongation must clear the cut-off by this factor to align
MIN_ANGLE_SPREAD = 5.0  # degrees; parts laid in a fixture need no rotation
MAX_CAST_SPREAD = 0.03  # spread of the colour cast across photos above which white balance runs
# Share of the part's pixels saturated (median photo): from MIN_GLARE the glare is worth a look, from
# SURE_GLARE it is inpainted. In between, the saturated pixels may be glare that moves with the pose
# (filling it helps) or the brightest corner of a bright face that crosses the threshold in some
# photos and not in others (filling it turns a brightness that varies into a shape that varies, and
# healthy photos score higher): the pipeline trial decides, without inpainting where it cannot run
# (docs/preprocessing.md, "Glare inpainting").
MIN_GLARE = 0.001
SURE_GLARE = 0.02


@dataclass(frozen=True)
class PhotoMeasure:
    """What one training photo says about the steps; ``None`` fields where no part was found."""

    found: bool
    area: float = math.nan  # share of the photo covered by the part
    border: bool = False  # the part touches the frame
    solidity: float = math.nan  # filled mask area / convex hull area
    elongation: float = math.nan  # long / short axis of the mask's moments
    axis_degrees: float = math.nan  # orientation of the long axis, in [0, 180)
    cast: float = 0.0  # largest / smallest channel mean - 1 (0 for a neutral grey photo)
    glare: float = 0.0  # share of the part's pixels that are saturated


def measure_photo(image: np.ndarray, config: Config, method: str = "otsu") -> PhotoMeasure:
    """Segment one photo (with ``method``) and measure what decides the steps.

    The mask is taken, as the pipeline takes it, from a copy with the glare filled in.
    """
    means = image.reshape(-1, 3).mean(axis=0)
    cast = float(means.max() / max(means.min(), 1.0) - 1)
    saturated = specular_mask(image, config.specular_threshold)
    found = segment_object(inpaint_specular(image, config.specular_threshold, glare=saturated).image, method=method)
    if found.mask is None:
        return PhotoMeasure(found=False, cast=cast)
    pose = principal_axis(found.working_mask)
    glare = float(saturated[found.mask].mean())
    return PhotoMeasure(
        found=True,
        area=float(found.working_mask.mean()),
        border=found.touches_border,
        solidity=solidity(found.working_mask),
        elongation=min(pose.elongation, 100.0),
        axis_degrees=math.degrees(pose.axis_angle) % 180,
        cast=cast,
        glare=glare,
    )


def measure_photos(images: Sequence[np.ndarray], config: Config, method: str = "otsu") -> list[PhotoMeasure]:
    """Measure an even sample of at most ``MAX_MEASURED_PHOTOS`` photos on the config's worker threads."""
    step = max(1, math.ceil(len(images) / MAX_MEASURED_PHOTOS))
    with ThreadPoolExecutor(max_workers=max(1, config.num_workers)) as pool:
        return list(pool.map(lambda image: measure_photo(image, config, method), list(images)[::step]))


def decide(images: Sequence[np.ndarray], config: Config) -> Decision:
    """Measure the photos and decide the steps; GrabCut replaces Otsu where only it finds the part reliably."""
    measures = measure_photos(images, config)
    decision = decide_steps(measures, config)
    if decision.changes["zero_background"]:
        return decision
    with_grabcut = decide_steps(measure_photos(images, config, "grabcut"), config, "grabcut")
    if not with_grabcut.changes["zero_background"]:
        return decision
    with_grabcut.reasons.insert(
        0, f"part mask by GrabCut (Otsu's mask was unreliable: {decision.reasons[0].split('(', 1)[1].split(')')[0]})"
    )
    return with_grabcut


def angle_spread(degrees: np.ndarray) -> float:
    """Circular standard deviation (degrees) of axis orientations, which repeat every 180 degrees."""
    doubled = np.radians(degrees) * 2
    resultant = math.hypot(np.cos(doubled).mean(), np.sin(doubled).mean())
    return math.degrees(math.sqrt(-2 * math.log(max(resultant, 1e-12)))) / 2


@dataclass
class Decision:
    """The steps chosen for a data set, as config switches, with a reason for each."""

    changes: dict[str, object]
    reasons: list[str]
    numbers: dict[str, float]
    try_inpainting: bool = False  # glare between MIN_GLARE and SURE_GLARE: the pipeline trial decides


def mask_reliability(found_rate: float, border_rate: float, area_variation: float, area_median: float) -> bool:
    """Can background zeroing trust this mask on every photo of the set?"""
    return (
        found_rate >= MIN_FOUND_RATE
        and border_rate <= MAX_BORDER_RATE
        and area_variation <= MAX_AREA_VARIATION
        and area_median <= MAX_AREA
    )


def decide_steps(measures: Sequence[PhotoMeasure], config: Config, method: str = "otsu") -> Decision:
    """Turn per-photo measurements (masks made by ``method``) into one set of switches for every photo."""
    found = [m for m in measures if m.found]
    found_rate = len(found) / max(1, len(measures))
    border_rate = float(np.mean([m.border for m in found])) if found else 1.0
    areas = np.array([m.area for m in found])
    area_variation = float(areas.std() / areas.mean()) if found else math.inf
    numbers = {
        "photos_measured": len(measures),
        "part_found": found_rate,
        "on_border": border_rate,
        "area_median": float(np.median(areas)) if found else math.nan,
        "area_variation": area_variation,
    }
    changes: dict[str, object] = {"preprocess": "on"}
    reasons = []

    mask_reliable = mask_reliability(found_rate, border_rate, area_variation, numbers["area_median"])
    if not mask_reliable:
        changes.update(segment=False, crop=False, align_rotation=False, normalize_scale=False, zero_background=False)
        reasons.append(
            f"part mask off (found in {found_rate:.0%} of photos, {border_rate:.0%} on the border, "
            f"area varies {area_variation:.0%}): every photo is used whole"
        )
    else:
        hull_solidity = float(np.median([m.solidity for m in found]))
        numbers["solidity_median"] = hull_solidity
        fill = "hull" if hull_solidity >= MIN_HULL_SOLIDITY else "contour"
        changes.update(
            segment=True, segmentation_method=method, crop=True, normalize_scale=True, zero_background=True, mask_fill=fill
        )
        reasons.append(
            f"background zeroing on (part found in {found_rate:.0%} of photos, {border_rate:.0%} on the border, "
            f"area varies {area_variation:.0%}), mask = {'convex hull' if fill == 'hull' else 'outline'} "
            f"(solidity {hull_solidity:.2f})"
        )
        elongations = np.array([m.elongation for m in found])
        spread = angle_spread(np.array([m.axis_degrees for m in found]))
        numbers.update(
            elongation_min=float(elongations.min()), elongation_max=float(elongations.max()), angle_spread=spread
        )
        span = f"elongation {elongations.min():.2f}-{elongations.max():.2f}"
        if elongations.min() >= config.min_elongation * ROTATION_MARGIN and spread >= MIN_ANGLE_SPREAD:
            changes.update(align_rotation=True, min_elongation=0.0)  # every photo, no per-photo cut-off
            reasons.append(f"rotation on for every photo ({span}, orientation spread {spread:.0f} deg)")
        else:
            changes.update(align_rotation=False)
            why = (
                f"{span} does not clear the cut-off {config.min_elongation:g}"
                if elongations.min() < config.min_elongation * ROTATION_MARGIN
                else f"orientation spread only {spread:.0f} deg"
            )
            reasons.append(f"rotation off ({why})")

    casts = np.array([m.cast for m in measures])
    numbers.update(cast_median=float(np.median(casts)), cast_spread=float(casts.std()))
    balance = bool(casts.std() > MAX_CAST_SPREAD)
    changes["white_balance"] = balance
    reasons.append(
        f"white balance {'on' if balance else 'off'} (colour cast {np.median(casts):.2f}, "
        f"{'varies' if balance else 'steady'} across photos: spread {casts.std():.3f})"
    )
    glare = float(np.median([m.glare for m in found])) if found else 0.0
    numbers["glare_median"] = glare
    inpaint = bool(mask_reliable and glare >= SURE_GLARE)
    try_inpainting = bool(mask_reliable and MIN_GLARE <= glare < SURE_GLARE)
    changes["inpaint_specular"] = inpaint
    state = "on, on the part only" if inpaint else "left to the trial" if try_inpainting else "off"
    reasons.append(
        f"glare inpainting {state} "
        f"({glare:.2%} of the part saturated{'' if mask_reliable else ', no reliable part mask'})"
    )
    return Decision(changes, reasons, numbers, try_inpainting)
