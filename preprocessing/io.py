"""Reading photos and MVTec-layout folders with errors a user can act on; writing result files atomically."""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import stat
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from config import Config, UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ImageReadError(UserError, ValueError):
    """An image file that cannot be used; the message names the file and the reason."""


# The declared size is checked by our own limit (Config.max_image_pixels), so Pillow, which only reads
# headers here, need not apply its own process-wide one.
Image.MAX_IMAGE_PIXELS = None
ORIENTATION_TAG = 0x0112  # EXIF: how the camera was held
DEFAULT_MAX_PIXELS: int = Config.max_image_pixels


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, keep_grey: bool = False) -> np.ndarray:
    """Decode any photo (8/16-bit, grey, RGB, RGBA) into 8-bit RGB, the form the pipeline takes.

    ``keep_grey`` leaves a single-channel photo as one (H, W) channel, which the pipeline also
    takes: three identical channels would only triple its work (a mono camera's photos).
    The photo comes upright as a viewer shows it (EXIF orientation applied), so heatmaps drawn on
    it match what the user sees. Anything that cannot be used raises ImageReadError naming the
    file and the reason; nothing is decoded before the declared size is known to be within limits.
    """
    return to_rgb8(_decode(Path(path), max_pixels), keep_grey)


def _decode(path: Path, max_pixels: int) -> np.ndarray:
    """The photo as OpenCV decodes it, upright, after every check that avoids a costly or misleading decode."""
    data = _read_photo_file(path)
    try:
        with Image.open(BytesIO(data)) as header:  # reads only the header
            width, height = header.size
            if width * height > max_pixels:
                raise ImageReadError(
                    f"{path}: {width}x{height} pixels is more than the limit of {max_pixels:_} "
                    "(setting max_image_pixels); refused before decoding"
                )
            # A PNG's EXIF may follow the pixels, and Pillow would decode them all to find it.
            has_exif_in_header = header.format != "PNG" or "exif" in header.info
            orientation = header.getexif().get(ORIENTATION_TAG, 1) if has_exif_in_header else 1
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError) as error:  # Pillow's ways of saying "not an image I know"
        raise ImageReadError(f"{path}: not a readable image (corrupt or unsupported format)") from error
    truncated = _truncation(data)
    if truncated:
        raise ImageReadError(f"{path}: {truncated}; the file is incomplete, re-copy or re-take it")
    try:
        raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # EXIF ignored: applied below
    except (cv2.error, MemoryError) as error:
        raise ImageReadError(f"{path}: cannot be decoded ({str(error).strip().splitlines()[-1]})") from None
    if raw is None or raw.size == 0:
        raise ImageReadError(f"{path}: not a readable image (corrupt or unsupported format)")
    return upright(raw, orientation)


def _read_photo_file(path: Path) -> bytes:
    """The file's bytes, or an ImageReadError that says why not: missing, broken link, folder, FIFO, permissions."""
    try:
        status = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            target = os.readlink(path)
            raise ImageReadError(f"{path}: broken symbolic link (its target {target} does not exist)") from None
        raise ImageReadError(f"{path}: no such file") from None
    except OSError as error:  # a symlink loop, a name too long, a folder on the way that cannot be entered
        raise ImageReadError(f"{path}: cannot be opened ({error.strerror})") from None
    if stat.S_ISDIR(status.st_mode):
        raise ImageReadError(f"{path}: is a folder, not a photo")
    if not stat.S_ISREG(status.st_mode):
        raise ImageReadError(f"{path}: not a regular file (a device, FIFO or socket)")
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except PermissionError:
        raise ImageReadError(f"{path}: permission denied") from None
    except OSError as error:
        raise ImageReadError(f"{path}: cannot be read ({error.strerror})") from None


def _truncation(data: bytes) -> str | None:
    """Why a JPEG or PNG file is cut short, or None. Decoders would fill the missing part with grey."""
    if data.startswith(b"\xff\xd8"):
        return None if _jpeg_reaches_its_end(data) else "truncated JPEG (the image data stops before its end marker)"
    if data.startswith(b"\x89PNG") and data.rfind(b"IEND") < 0:
        return "truncated PNG (no IEND chunk)"
    return None


def _jpeg_reaches_its_end(data: bytes) -> bool:
    """Walk the header segments to the first scan, then look for the end-of-image marker after it.

    Skipping segments by their declared lengths steps over an EXIF thumbnail's own end marker; in
    the scan data a 0xFF byte is always escaped, so 0xFFD9 there can only be the real end. Bytes
    after the end marker (phones append videos or maker data) do not matter.
    """
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return True  # not the layout this check understands: leave the verdict to the decoder
        marker = data[position + 1]
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8:  # fill byte or a marker with no length
            position += 1 if marker == 0xFF else 2
            continue
        if marker == 0xD9:  # ends before any scan: not a layout this check understands either
            return True
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xDA:  # start of scan
            return data.find(b"\xff\xd9", position + 2 + length) >= 0
        position += 2 + length
    return False  # the headers run past the end of the file


def upright(raw: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to a decoded array, as every photo viewer does."""
    transforms = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: a.swapaxes(0, 1)[:, ::-1],
        7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
        8: lambda a: a.swapaxes(0, 1)[::-1],
    }
    transform = transforms.get(orientation)
    return raw if transform is None else np.ascontiguousarray(transform(raw))


def to_rgb8(raw: np.ndarray, keep_grey: bool = False) -> np.ndarray:
    """Bring an OpenCV-decoded array (BGR order) of any depth and channel count to 8-bit RGB
    (a single channel to 8-bit (H, W) with ``keep_grey``)."""
    if raw.dtype == np.uint16:
        raw = (raw / 257.0).round().astype(np.uint8)
    elif raw.dtype != np.uint8:
        raw = cv2.normalize(raw.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[:, :, 0]
    if raw.ndim == 2:
        return np.ascontiguousarray(raw) if keep_grey else cv2.cvtColor(raw, cv2.COLOR_GRAY2RGB)
    if raw.shape[2] == 4:
        return cv2.cvtColor(raw, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(raw, cv2.COLOR_BGR2RGB)


def read_mask(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A ground-truth mask as a boolean array (any non-zero colour pixel is defective), upright like its photo."""
    raw = _decode(Path(path), max_pixels)
    colour = raw if raw.ndim == 2 else raw[:, :, :3]
    return colour > 0 if colour.ndim == 2 else (colour > 0).any(axis=2)


def read_images(
    paths: Sequence[str | Path], workers: int = 2, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[tuple[Path, np.ndarray | ImageReadError]]:
    """Decode files on a thread pool (OpenCV releases the GIL), in order, errors returned not raised."""

    def attempt(path: str | Path) -> tuple[Path, np.ndarray | ImageReadError]:
        try:
            return Path(path), read_image(path, max_pixels)
        except ImageReadError as error:
            return Path(path), error

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        yield from pool.map(attempt, paths)


def find_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Image files under a folder, sorted so that runs are reproducible."""
    folder = Path(folder)
    pattern = "**/*" if recursive else "*"
    # Everything with a photo's name but a folder: a broken link or a FIFO gets its error record instead
    # of vanishing from the run.
    return sorted(p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())


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


class OutputError(UserError, OSError):
    """An output location that cannot be written; the message names it and the reason."""


def check_writable(path: str | Path) -> None:
    """Refuse, before any long work, an output file that is a folder, a device or FIFO, or cannot be created."""
    path = Path(path)
    _check_output_kind(path)
    _probe(path.parent, path)


def check_output_folder(folder: str | Path) -> None:
    """Refuse, before any long work, an output folder that cannot be created or written to."""
    _probe(Path(folder), Path(folder))


def _probe(folder: Path, named: Path) -> None:
    """Create ``folder`` and a temporary file in it: finds read-only disks and missing permissions.

    A disk that fills up later is still reported when it happens, with the previous file intact.
    """
    try:
        probe, descriptor = _create_temporary(folder / "write-check")
        os.close(descriptor)
        probe.unlink()
    except OSError as error:
        raise _output_error(named, error) from None


def json_document(value: Any) -> str:
    """JSON text with every NaN or infinity as null: ``NaN`` is not JSON and breaks the reader."""

    def finite(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: finite(inner) for key, inner in item.items()}
        if isinstance(item, (list, tuple)):
            return [finite(inner) for inner in item]
        return item

    return json.dumps(finite(value), indent=2, allow_nan=False)


def write_atomically(path: str | Path, data: bytes | str) -> None:
    """Write to a temporary file beside ``path``, fsync it, rename it over ``path``, fsync the folder.

    A crash, a full disk or a power cut leaves the previous file (or none), never half a model or
    report, and a failed write removes its temporary file. The new file gets the mode the umask
    gives a new file, or keeps the mode of the file it replaces.
    """
    path = Path(path)
    _check_output_kind(path)
    _remove_stale_temporaries(path.parent)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None
    try:
        temporary, descriptor = _create_temporary(path)
    except OSError as error:
        raise _output_error(path, error) from None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
        _fsync_folder(path.parent)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _output_error(path, error) from None
        raise


def _check_output_kind(path: Path) -> None:
    """Only a regular file (or nothing) may be replaced: never a folder, a device node or a FIFO."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise _output_error(path, error) from None
    if stat.S_ISDIR(mode):
        raise OutputError(f"{path}: is a folder; give a file name")
    if not stat.S_ISREG(mode):
        raise OutputError(f"{path}: is a device, FIFO or socket, not a file; give a file name")


# Our temporaries: ``.<name>.<pid>.<8 hex digits>.tmp``; the pid tells whether the writer still lives.
TEMPORARY_NAME = re.compile(r"\..+\.(\d+)\.[0-9a-f]{8}\.tmp")
_folders_cleaned: set[Path] = set()  # each folder is swept once per process: listing it per write would cost O(n²)


def _create_temporary(path: Path) -> tuple[Path, int]:
    """A new temporary file beside ``path``, created with mode 0666 so that the umask applies as to any new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        temporary = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"  # see TEMPORARY_NAME
        try:
            return temporary, os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue


def _output_error(path: Path, error: OSError) -> OutputError:
    return OutputError(f"{path}: cannot be written ({error.strerror}); any previous file is unchanged")


def _remove_stale_temporaries(folder: Path) -> None:
    """Remove temporaries whose writer is gone (killed mid-write); a live writer's are kept."""
    if folder in _folders_cleaned:
        return
    _folders_cleaned.add(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        match = TEMPORARY_NAME.fullmatch(name)
        if match and not _process_alive(int(match.group(1))):
            (folder / name).unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 only asks)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or a number no process can have
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
