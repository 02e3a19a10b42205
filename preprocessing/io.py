"""Reading photos and MVTec-layout folders with errors a user can act on; writing result files atomically."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from config import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ImageReadError(UserError, ValueError):
    """An image file that cannot be used; the message names the file and the reason."""


def read_image(path: str | Path) -> np.ndarray:
    """Decode any photo (8/16-bit, grey, RGB, RGBA) into 8-bit RGB, the one form the pipeline takes."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.size == 0:
        raise ImageReadError(f"{path}: not a readable image (corrupt or unsupported format)")
    return to_rgb8(raw)


def to_rgb8(raw: np.ndarray) -> np.ndarray:
    """Bring an OpenCV-decoded array (BGR order) of any depth and channel count to 8-bit RGB."""
    if raw.dtype == np.uint16:
        raw = (raw / 257.0).round().astype(np.uint8)
    elif raw.dtype != np.uint8:
        raw = cv2.normalize(raw.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if raw.ndim == 2:
        return cv2.cvtColor(raw, cv2.COLOR_GRAY2RGB)
    if raw.shape[2] == 4:
        return cv2.cvtColor(raw, cv2.COLOR_BGRA2RGB)
    if raw.shape[2] == 1:
        return cv2.cvtColor(raw[:, :, 0], cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(raw, cv2.COLOR_BGR2RGB)


def read_mask(path: str | Path) -> np.ndarray:
    """A ground-truth mask as a boolean array (any non-zero pixel is defective)."""
    raw = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if raw is None:
        raise ImageReadError(f"{path}: not a readable mask image")
    return raw > 0


def read_images(
    paths: Sequence[str | Path], workers: int = 2
) -> Iterator[tuple[Path, np.ndarray | ImageReadError]]:
    """Decode files on a thread pool (OpenCV releases the GIL), in order, errors returned not raised."""

    def attempt(path: str | Path) -> tuple[Path, np.ndarray | ImageReadError]:
        try:
            return Path(path), read_image(path)
        except ImageReadError as error:
            return Path(path), error

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        yield from pool.map(attempt, paths)


def find_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Image files under a folder, sorted so that runs are reproducible."""
    folder = Path(folder)
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@dataclass(frozen=True)
class LabelledImage:
    """One test image with its label: defect kind ('good' for healthy) and mask path if known."""

    path: Path
    kind: str
    mask_path: Path | None

    @property
    def is_defective(self) -> bool:
        return self.kind != "good"


def train_images(data_dir: str | Path) -> list[Path]:
    """The healthy training photos of an MVTec-layout folder, or a clear error."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such folder")
    good = data_dir / "train" / "good"
    if not good.is_dir():
        raise FileNotFoundError(f"{data_dir}: expected healthy training photos in {good}")
    paths = find_images(good)
    if not paths:
        raise FileNotFoundError(f"{good}: folder has no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def mask_path(data_dir: str | Path, image: Path) -> Path:
    """Where MVTec AD keeps the ground truth of ``test/<kind>/NNN.png``: ``ground_truth/<kind>/NNN_mask.png``."""
    return Path(data_dir) / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"


def load_test_split(data_dir: str | Path) -> list[LabelledImage]:
    """Every image under ``test/<kind>/`` with its ground-truth mask when one exists."""
    test_dir = Path(data_dir) / "test"
    samples = []
    if not test_dir.is_dir():
        return samples
    for kind_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        for path in find_images(kind_dir):
            mask = mask_path(data_dir, path)
            samples.append(LabelledImage(path, kind_dir.name, mask if mask.is_file() else None))
    return samples


def write_atomically(path: str | Path, data: bytes | str) -> None:
    """Write to a temporary file beside ``path``, then rename it over ``path``.

    A crash or a full disk leaves the previous file (or none), never half a model or report.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
