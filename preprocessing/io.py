"""Reading photos with errors a user can act on: every reason a file cannot be used is named."""

from __future__ import annotations

import hashlib
import math
import os
import stat
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
from PIL import Image

from config import Config, UserError

# What cameras and machine-vision software write (PGM/PPM/PNM: the plain formats of many vision
# libraries; JPEG 2000; WebP), each decoded by OpenCV within the same decode limit.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".ppm", ".pnm", ".jp2", ".webp")


class ImageReadError(UserError, ValueError):
    """An image file that cannot be used; the message names the file and the reason."""


# The declared size is checked by our own limit (Config.max_image_pixels), so Pillow, which only reads
# headers here, need not apply its own process-wide one.
Image.MAX_IMAGE_PIXELS = None
ORIENTATION_TAG = 0x0112  # EXIF: how the camera was held
DEFAULT_MAX_PIXELS: int = Config.max_image_pixels
PILLOW_READ_ERRORS = (OSError, ValueError, SyntaxError, IndexError, TypeError)  # Pillow's "not an image I know"
PAGES_LOOKED_AT = 16  # pages of a multi-page file looked at for a second full-size photo


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, keep_grey: bool = False) -> np.ndarray:
    """Decode any photo (8/16-bit, grey, RGB, RGBA) into 8-bit RGB, the form the pipeline takes.

    ``keep_grey`` leaves a single-channel photo as one (H, W) channel, which the pipeline also
    takes: three identical channels would only triple its work (a mono camera's photos).
    The photo comes upright as a viewer shows it (EXIF orientation applied), so heatmaps drawn on
    it match what the user sees. Anything that cannot be used raises ImageReadError naming the
    file and the reason; nothing is decoded before its decoded size is known to be within limits.
    """
    return to_rgb8(_decode(read_photo_bytes(path, max_pixels), str(path), max_pixels), keep_grey)


def read_photo_bytes(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """A photo file's bytes, refused (ImageReadError) when it is no regular file or larger than any
    photo within ``max_pixels`` could be: a 10 GB file named ``.png`` is never read into memory."""
    return _read_photo_file(Path(path), max_file_bytes(max_pixels))


def decode_image(data: bytes, label: str, max_pixels: int = DEFAULT_MAX_PIXELS, keep_grey: bool = False) -> np.ndarray:
    """``read_image`` for a photo already in memory (an upload, a file read once); errors name it ``label``."""
    if len(data) > max_file_bytes(max_pixels):
        raise ImageReadError(f"{label}: {len(data):_} bytes is larger than any photo within the limit could be")
    return to_rgb8(_decode(data, label, max_pixels), keep_grey)


def max_file_bytes(max_pixels: int) -> int:
    """The largest file a photo within ``max_pixels`` can be: uncompressed 8-bit RGB, plus room for metadata."""
    return 3 * max_pixels + 64 * 2**20


def decoded_bytes(header: Image.Image, data: bytes) -> int:
    """Bytes the decoded photo takes: width x height x channels (3 at least: it becomes RGB) x bytes per sample.

    Pillow reports 16-bit colour PNG, PPM and JPEG 2000 photos as 8-bit, which OpenCV decodes to
    16 bits, so their depth is read from their own headers.
    """
    width, height = header.size
    channels = max(3, len(header.getbands()))
    if header.format == "PNG" and data[12:16] == b"IHDR":
        sample_bytes = 2 if data[24] == 16 else 1
    elif header.format == "TIFF":
        bits = header.tag_v2.get(258, 8)  # BitsPerSample: one number, or one per channel
        sample_bytes = max(1, math.ceil(max(bits if isinstance(bits, tuple) else (bits,)) / 8))
    elif header.format == "PPM" and header.tile and isinstance(header.tile[0].args, tuple):
        sample_bytes = 2 if header.tile[0].args[-1] > 255 else 1  # (mode, maxval): above 255, two bytes a sample
    elif header.format == "JPEG2000":
        sample_bytes = 1 if jpeg2000_bits(data) <= 8 else 2
    else:
        sample_bytes = 4 if header.mode in ("I", "F") else 2 if header.mode.startswith("I;16") else 1
    return width * height * channels * sample_bytes


def jpeg2000_bits(data: bytes) -> int:
    """Bits per sample of a JPEG 2000 photo, from the JP2 image header box or a bare codestream's SIZ marker.

    Each stores bits - 1 in its low 7 bits; where the depth varies by component, is hidden or cannot be
    read, 16 is assumed, so that no photo is decoded past the limit.
    """
    box = data.find(b"ihdr", 0, 4096)
    if box >= 0 and len(data) > box + 14 and data[box + 14] != 0xFF:  # ihdr: height, width, components, depth
        return (data[box + 14] & 0x7F) + 1
    if data[:4] == b"\xff\x4f\xff\x51" and len(data) >= 42:  # SOC, SIZ: component count at 40, depths from 42
        count = int.from_bytes(data[40:42], "big")
        depths = data[42 : 42 + 3 * count : 3]
        if depths and len(depths) == count:
            return max(depth & 0x7F for depth in depths) + 1
    return 16


def _decode(data: bytes, label: str, max_pixels: int) -> np.ndarray:
    """The photo as OpenCV decodes it, upright, after every check that avoids a costly or misleading decode.

    The limit is a byte budget: ``max_pixels`` photos of 8-bit RGB, so a 16-bit or four-channel
    photo counts in proportion to the bytes its pixels take.
    """
    try:
        with Image.open(BytesIO(data)) as header:  # reads only the header
            width, height = header.size
            size = decoded_bytes(header, data)
            if width * height > max_pixels:
                raise ImageReadError(
                    f"{label}: {width}x{height} pixels is more than the limit of {max_pixels:_} "
                    "(setting max_image_pixels); refused before decoding"
                )
            if size > 3 * max_pixels:
                raise ImageReadError(
                    f"{label}: {width}x{height} pixels take {size / 2**20:_.0f} MiB decoded (16-bit or extra "
                    f"channels), more than the {3 * max_pixels / 2**20:_.0f} MiB of {max_pixels:_} 8-bit RGB pixels "
                    "(setting max_image_pixels); refused before decoding"
                )
            # A PNG's EXIF may follow the pixels, and Pillow would decode them all to find it.
            has_exif_in_header = header.format != "PNG" or "exif" in header.info
            orientation = header.getexif().get(ORIENTATION_TAG, 1) if has_exif_in_header else 1
            if (other := _another_photo(header)) is not None:
                held = (f"more than one {width}x{height} photo" if other == (width, height)
                        else f"a {other[0]}x{other[1]} photo after a {width}x{height} first page")
                raise ImageReadError(
                    f"{label}: holds {held} (pages of a TIFF or frames of an animation), and only the first page "
                    "would be scored; save each photo as its own file"
                )
    except ImageReadError:
        raise
    except PILLOW_READ_ERRORS as error:
        raise ImageReadError(f"{label}: not a readable image (corrupt or unsupported format)") from error
    truncated = _truncation(data)
    if truncated:
        raise ImageReadError(f"{label}: {truncated}; the file is incomplete, re-copy or re-take it")
    try:
        raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # EXIF ignored: applied below
    except (cv2.error, MemoryError) as error:
        raise ImageReadError(f"{label}: cannot be decoded ({str(error).strip().splitlines()[-1]})") from None
    if raw is None or raw.size == 0:
        raise ImageReadError(f"{label}: not a readable image (corrupt or unsupported format)")
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():  # scaled to 8 bits they would pass as black
        raise ImageReadError(f"{label}: holds pixels that are not numbers (NaN or infinite); the image is damaged")
    return upright(raw, orientation)


def _another_photo(header: Image.Image) -> tuple[int, int] | None:
    """The (width, height) of a page after the first that holds at least as many pixels, or None.

    OpenCV decodes the first page alone, so a defect on any other page would pass unseen, and a
    preview written first would be scored in place of the photo after it. Smaller pages after the
    first are the previews and thumbnails that cameras add, and are not counted. Only the first
    ``PAGES_LOOKED_AT`` pages are looked at, so a file of a million pages costs no more.
    """
    first_width, first_height = header.size
    for page in range(1, PAGES_LOOKED_AT):
        try:
            header.seek(page)
        except (EOFError, *PILLOW_READ_ERRORS):  # no such page, or one unreadable
            return None
        width, height = header.size
        if width * height >= first_width * first_height:
            return width, height
    return None


READ_CHUNK_BYTES = 2**20  # what a file that holds more than it reported (growing, or /proc's size 0) is read in


def _read_photo_file(path: Path, max_bytes: int) -> bytes:
    """The file's bytes, or an ImageReadError that says why not: missing, broken link, folder, FIFO,
    device, permissions, or larger than ``max_bytes``.

    The file is opened without blocking and checked on the open descriptor, so a FIFO (or a name
    swapped for one after a check) is refused instead of waiting for a writer forever.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        if path.is_symlink():
            target = os.readlink(path)
            raise ImageReadError(f"{path}: broken symbolic link (its target {target} does not exist)") from None
        raise ImageReadError(f"{path}: no such file") from None
    except PermissionError:
        raise ImageReadError(f"{path}: permission denied") from None
    except OSError as error:  # a symlink loop, a name too long, a folder on the way that cannot be entered
        raise ImageReadError(f"{path}: cannot be opened ({error.strerror})") from None
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode) or status.st_size > max_bytes:
        os.close(descriptor)
        if stat.S_ISDIR(status.st_mode):
            raise ImageReadError(f"{path}: is a folder, not a photo")
        if not stat.S_ISREG(status.st_mode):
            raise ImageReadError(f"{path}: not a regular file (a device, FIFO or socket)")
        raise ImageReadError(f"{path}: {status.st_size:_} bytes is larger than any photo within the limit could be")
    with os.fdopen(descriptor, "rb") as handle:
        try:
            data = _read_at_most(handle, status.st_size, max_bytes)
        except OSError as error:
            raise ImageReadError(f"{path}: cannot be read ({error.strerror})") from None
        except MemoryError:  # one photo's error record: a batch or the watched folder goes on
            raise ImageReadError(f"{path}: {status.st_size:_} bytes cannot be read with the memory available") from None
    if len(data) > max_bytes:  # it grew while it was read
        raise ImageReadError(f"{path}: larger than any photo within the limit could be")
    return data


def _read_at_most(handle: BinaryIO, size: int, max_bytes: int) -> bytes:
    """Up to ``max_bytes + 1`` bytes of an open file that reported ``size`` bytes.

    ``read(n)`` reserves all n bytes before reading, so the file is asked for what it reported
    (one byte more, to see its end) and only one that holds more is read on in chunks: a 3 KB
    photo costs 3 KB, not the hundreds of MiB the limit allows, on every decoder thread.
    """
    wanted = min(size, max_bytes) + 1
    chunks: list[bytes] = []
    total = 0
    while wanted > 0:
        chunk = handle.read(wanted)
        chunks.append(chunk)
        total += len(chunk)
        if len(chunk) < wanted:  # its end
            break
        wanted = min(READ_CHUNK_BYTES, max_bytes + 1 - total)
    return b"".join(chunks)


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
    if raw.dtype == np.uint16:  # v / 257, rounded, computed in place of a float64 copy 4x the photo's size
        raw = cv2.convertScaleAbs(raw, alpha=1 / 257)
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
    raw = _decode(read_photo_bytes(path, max_pixels), str(path), max_pixels)
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


def unusable_photos(reasons: Sequence[str], total: int, what: str = "training photos") -> str:
    """The one refusal of a set of photos some of which cannot be used: how many, of how many, and each reason.

    A set is refused whole rather than used without them, so a bank never silently learns from
    fewer photos than the user gave it.
    """
    return f"{len(reasons)} of {total} {what} cannot be used; remove or replace them: {'; '.join(reasons)}"


MIN_PHOTO_SIDE = 32  # the smallest model input: a smaller photo cannot show a part at patch scale
MIN_PHOTO_SPREAD = 1.0  # standard deviation of the pixel values, in 8-bit grey levels


def photo_problem(image: np.ndarray) -> str | None:
    """Why a decoded photo cannot show a part, or None; every door asks it (fit, update, scoring).

    A tiny or blank frame (a camera that fired in the dark, a placeholder file) would teach a
    memory bank that an empty view is healthy, and every blank frame on the line would then pass.
    Scored, such a frame would get a verdict on a part it does not show: the line is told what is
    wrong with the photo instead.
    """
    height, width = image.shape[:2]
    if min(height, width) < MIN_PHOTO_SIDE:
        return f"{width}x{height} pixels is too small to show a part (at least {MIN_PHOTO_SIDE} on each side)"
    # The spread within the channels, from OpenCV's one pass per channel (NumPy's std converts the
    # whole photo to float64 twice: 5 ms of a 1-megapixel photo's 8). The channels' means do not
    # count: a frame of one flat colour (the green of an empty camera buffer) is as blank as a grey one.
    _, deviations = cv2.meanStdDev(image)
    spread = math.sqrt(float(np.mean(deviations**2)))
    if spread < MIN_PHOTO_SPREAD:
        return f"blank: its pixels vary by {spread:.2f} grey levels (standard deviation), less than {MIN_PHOTO_SPREAD:g}"
    return None


def check_photo(image: np.ndarray, label: str) -> None:
    """Raise ImageReadError naming ``label`` when the decoded photo cannot show a part (``photo_problem``)."""
    if problem := photo_problem(image):
        raise ImageReadError(f"{label}: {problem}")


DIGEST_BYTES = 16  # of a BLAKE2b digest: a chance collision is out of reach for any number of photos


def pixel_digest(image: np.ndarray) -> bytes:
    """What tells two photos apart by their pixels alone, in whatever file format they came."""
    digest = hashlib.blake2b(str(image.shape).encode(), digest_size=DIGEST_BYTES)
    digest.update(np.ascontiguousarray(image).data)
    return digest.digest()


def refuse_unusable_photos(
    paths: Sequence[Path], config: Config, what: str = "training photos"
) -> list[tuple[Path, Path]]:
    """Decode every photo of a set before the long work: a truncated, corrupt, tiny or blank one
    must not enter the memory bank, and a fit or an evaluation must not fail at its end for it.

    Returns (photo, the earlier photo it repeats pixel for pixel, in any file format) for each copy in
    the set: a calibration must see each photo once, for a copy in another fold scores its twin as a
    photo the bank has seen, and the threshold falls below every new healthy part.
    (``--add-good`` checks its photos in the one pass that scores them: models.patchcore.add_good.)
    """
    bad, copies = [], []
    first: dict[bytes, Path] = {}
    for path, image in read_images(paths, config.num_workers, config.max_image_pixels):
        if isinstance(image, ImageReadError):
            bad.append(str(image))
        elif problem := photo_problem(image):
            bad.append(f"{path}: {problem}")
        else:
            if (digest := pixel_digest(image)) in first:
                copies.append((path, first[digest]))
            else:
                first[digest] = path
    if bad:
        raise UserError(unusable_photos(bad, len(paths), what))
    return copies


def find_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Image files under a folder, sorted so that runs are reproducible.

    Nothing vanishes from a run unnamed. Everything with a photo's name but a folder is listed: a
    broken link or a FIFO gets its error record, and so does a broken link named as folders are
    (no suffix: ``cam2`` pointing to a camera share that is gone). A subfolder that cannot be
    listed (permissions) is listed in place of its photos, so that reading it gives its error
    record too, and a folder that cannot be listed at all raises its PermissionError rather than
    looking empty. Links to folders are followed, as a user who links a camera's folder in expects;
    each folder is walked once, so a link back up (a loop) or a second way to the same folder
    lists no photo twice.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found: list[Path] = []
    walked: set[tuple[int, int]] = set()

    def not_listed(error: OSError) -> None:
        if Path(error.filename) == folder:
            raise error
        found.append(Path(error.filename))

    for root, folders, files in os.walk(folder, onerror=not_listed, followlinks=True):
        try:
            status = os.stat(root)
        except OSError as error:  # removed since it was listed
            not_listed(error)
            continue
        if (status.st_dev, status.st_ino) in walked:
            folders.clear()
            continue
        walked.add((status.st_dev, status.st_ino))
        folders.sort()  # the first way to a folder reached twice is the same on every run
        found += [Path(root, name) for name in files if _listed(Path(root, name))]
        if not recursive:
            break
    return sorted(found)


def _listed(path: Path) -> bool:
    """Whether a file found in a folder is one to read: a photo's name, or a broken link named as a folder."""
    suffix = path.suffix.lower()
    return suffix in IMAGE_SUFFIXES or (not suffix and path.is_symlink() and not path.exists())
