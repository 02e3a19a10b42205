"""Object mask (step 4 of the pipeline): Otsu threshold, automatic polarity, morphological clean-up.

Segmentation runs on a copy shrunk to ``WORKING_SIDE`` pixels: Otsu and the morphology do not need
full resolution, and the mask is only used for geometry and for zeroing a dilated background.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from preprocessing.lighting import as_rgb

WORKING_SIDE = 512  # long side of the copy that is thresholded
MIN_CONTRAST = 10  # grey levels; below this spread the frame is blank
MIN_OBJECT_FRACTION = 0.001  # smaller components are dust, not the part
MAX_OBJECT_FRACTION = 0.95  # larger ones are the background (or a part filling the frame)


MASK_FILLS = ("contour", "hull")
SEGMENTATION_METHODS = ("otsu", "grabcut")
GRABCUT_SIDE = 160  # long side of the copy GrabCut runs on: ~10x cheaper than 512, masks as good for geometry
GRABCUT_BAND = 2  # pixels of that copy along the frame taken as certain background, where they look like table
# A band pixel whose colour lies farther from the band's median colour than this many times the band's
# median distance (and at least TABLE_OUTLIER_FLOOR grey levels) is not table: a part crossing the edge.
TABLE_OUTLIER_SPREAD = 3.0
TABLE_OUTLIER_FLOOR = 2 * MIN_CONTRAST
GRABCUT_ITERATIONS = 4


@dataclass
class Segmentation:
    """The object mask at the photo's size, or None when no trustworthy object was found."""

    mask: np.ndarray | None
    warnings: list[str] = field(default_factory=list)
    touches_border: bool = False  # the part reaches the frame's edge (it may be cut off)
    # The same mask on the working copy, which keeps the photo's aspect ratio: the full-size mask is
    # only this one enlarged, so shape measures (pose, solidity) read the same off it, 16x cheaper.
    working_mask: np.ndarray | None = None


def flatten_illumination(gray: np.ndarray) -> np.ndarray:
    """Divide out the slow light fall-off (vignetting, dark corners) so Otsu separates part from table.

    Without it a dark corner or a soft shadow lands on the object's side of the threshold and joins
    the object to the frame border. The background estimate is a blur far wider than fine detail.
    """
    height, width = gray.shape
    # So smooth a field is estimated as well, and 64x cheaper, on an 8x smaller copy.
    small = cv2.resize(gray, (max(1, width // 8), max(1, height // 8)), interpolation=cv2.INTER_AREA)
    blurred = cv2.GaussianBlur(small.astype(np.float32), (0, 0), max(small.shape) / 8)
    background = cv2.resize(blurred, (width, height), interpolation=cv2.INTER_LINEAR) + 1.0
    flat = gray.astype(np.float32) / background
    return cv2.normalize(flat, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def threshold_object(gray: np.ndarray) -> np.ndarray:
    """Otsu foreground, with the polarity chosen so that the object is the side touching the border less.

    Parts may be darker (screw on a light table) or lighter (nut on dark felt) than the background;
    the background is whatever fills most of the frame's edge.
    """
    _, bright = cv2.threshold(gray, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    border = np.concatenate([bright[0], bright[-1], bright[:, 0], bright[:, -1]])
    return (bright == 0) if border.mean() > 0.5 else (bright == 1)


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """Remove specks, then close gaps (e.g. between thread teeth); kernel sizes scale with the image."""
    side = max(mask.shape)
    open_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * max(1, side // 256) + 1,) * 2)
    close_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * max(1, side // 128) + 1,) * 2)
    binary = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, open_kernel)
    return cv2.morphologyEx(binary, cv2.MORPH_CLOSE, close_kernel) > 0


def largest_object(mask: np.ndarray, fill: str = "contour") -> np.ndarray | None:
    """The biggest outer contour, filled (holes such as a nut's bore or glare inside are closed).

    ``fill="hull"`` fills its convex hull instead: on a convex part (plate, nut, washer) a shiny
    stretch of edge that thresholding gave to the table is put back, so zeroing never blacks it out.
    """
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    outline = max(contours, key=cv2.contourArea)
    if fill == "hull":
        outline = cv2.convexHull(outline)
    filled = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(filled, [outline], -1, 1, thickness=cv2.FILLED)
    return filled > 0


def solidity(mask: np.ndarray) -> float:
    """Area of a filled mask over the area of its convex hull: 1 for convex parts, low for an L or a screw."""
    hull = largest_object(mask, "hull")
    return float(mask.sum() / hull.sum()) if hull is not None and hull.any() else 0.0


def touches_border(mask: np.ndarray, within: int = 1) -> bool:
    """True when the mask reaches into the outer ``within`` pixels of the frame."""
    return bool(mask[:within].any() or mask[-within:].any() or mask[:, :within].any() or mask[:, -within:].any())


def frame_band(shape: tuple[int, int], width: int) -> np.ndarray:
    """The outer ``width`` pixels of a frame of ``shape``, as a boolean mask."""
    band = np.ones(shape, bool)
    band[width:-width, width:-width] = False
    return band


def unlike_the_table(image: np.ndarray, band: np.ndarray) -> np.ndarray:
    """Pixels of the frame's ``band`` whose colour stands out from the band's own (the rest are table).

    Seeding a part that crosses the edge as certain table teaches GrabCut the part's colour as
    table, and it then loses the whole part; left out of the seed, the part keeps its mask and is
    reported as touching the border. The spread is measured on the band, so a mottled table stays table.
    """
    colours = image[band].astype(np.float32)
    distance = np.linalg.norm(colours - np.median(colours, axis=0), axis=1)
    unlike = np.zeros(image.shape[:2], bool)
    unlike[band] = distance > max(TABLE_OUTLIER_SPREAD * float(np.median(distance)), TABLE_OUTLIER_FLOOR)
    return unlike


def grabcut_object(image: np.ndarray) -> np.ndarray:
    """Foreground by GrabCut: colour models of part and table, refined by a graph cut.

    Otsu needs the part darker or lighter than the whole table; a brushed plate on a light,
    mottled table is both, and Otsu splits it along its shading. GrabCut learns what the table
    looks like from the frame's edge and what the part looks like from the rest, so it follows
    the outline instead. Slower than Otsu, so preprocessing.auto picks it per data set.
    """
    mask = np.full(image.shape[:2], cv2.GC_PR_FGD, np.uint8)
    band = frame_band(image.shape[:2], GRABCUT_BAND)
    mask[band & ~unlike_the_table(image, band)] = cv2.GC_BGD
    background, foreground = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)  # GrabCut's colour models start from k-means: the same photo gives the same mask
    cv2.grabCut(image, mask, None, background, foreground, GRABCUT_ITERATIONS, cv2.GC_INIT_WITH_MASK)
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


def segment_object(image: np.ndarray, fill: str = "contour", method: str = "otsu") -> Segmentation:
    """Mask of the single part in an 8-bit RGB (or grey) photo, or None plus a warning saying why not.

    A part that reaches the frame's edge keeps its mask (with a warning): falling back to the whole
    photo would show the model a background that no training photo had.
    """
    height, width = image.shape[:2]
    side = GRABCUT_SIDE if method == "grabcut" else WORKING_SIDE
    scale = min(1.0, side / max(height, width))
    working_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = cv2.resize(image, working_size, interpolation=cv2.INTER_AREA)
    gray = cv2.GaussianBlur(small if small.ndim == 2 else cv2.cvtColor(small, cv2.COLOR_RGB2GRAY), (5, 5), 0)
    if int(gray.max()) - int(gray.min()) < MIN_CONTRAST:
        return Segmentation(None, ["no object found: the photo has no contrast (blank frame?); using the whole image"])
    if method == "grabcut" and min(small.shape[:2]) > 4 * GRABCUT_BAND:
        raw, edge = grabcut_object(as_rgb(small)), GRABCUT_BAND + 1  # GrabCut takes 3 channels
    else:
        raw, edge = threshold_object(flatten_illumination(gray)), 1
    found = largest_object(clean_mask(raw), fill)
    fraction = float(found.mean()) if found is not None else 0.0
    if found is None or fraction < MIN_OBJECT_FRACTION:
        finder = "GrabCut" if method == "grabcut" else "thresholding"
        return Segmentation(None, [f"no object found by {finder}; using the whole image"])
    if fraction > MAX_OBJECT_FRACTION:
        warning = f"object mask covers {fraction:.0%} of the photo (background?); using the whole image"
        return Segmentation(None, [warning])
    mask = cv2.resize(found.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
    if touches_border(found, edge):
        warning = "object touches the image border (may be cut off)"
        return Segmentation(mask, [warning], touches_border=True, working_mask=found)
    return Segmentation(mask, working_mask=found)
