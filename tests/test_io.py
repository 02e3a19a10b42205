"""Reading photos and writing result files: every bad file gets one clear reason, and no write loses data."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from preprocessing import io as photo_io
from output_files import OutputError, check_writable, json_document, write_atomically
from preprocessing.io import ImageReadError, find_images, read_image, read_mask, read_photo_bytes

ROOT = Path(__file__).resolve().parents[1]


def without_root_powers(command: list[str]) -> list[str]:
    """Run ``command`` so that file permissions apply even to root (no DAC override capabilities)."""
    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be enforced")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]


def photo(height: int = 60, width: int = 80) -> np.ndarray:
    """A photo whose every pixel differs, so a flip or rotation cannot go unnoticed (RGB)."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([rows * 4 % 256, cols * 3 % 256, (rows * cols) % 256], axis=2).astype(np.uint8)


def jpeg_bytes(image_rgb: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return encoded.tobytes()


def bomb_png(side: int) -> bytes:
    """A genuine, valid 1-bit PNG of side x side pixels that compresses to a few hundred kilobytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(compressor.compress(row * 1000) for _ in range(side // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------- reading photos
def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(30000))
    assert bomb.stat().st_size < 2_000_000

    def no_decoding(*_args):
        raise AssertionError("the bomb was decoded")

    monkeypatch.setattr(photo_io.cv2, "imdecode", no_decoding)
    with pytest.raises(ImageReadError, match=r"bomb.png: 30000x30000 pixels is more than the limit of 100_000_000"):
        read_image(bomb)


def test_the_size_limit_is_a_setting(tmp_path):
    path = tmp_path / "small.png"
    cv2.imwrite(str(path), photo())
    assert read_image(path, max_pixels=80 * 60).shape == (60, 80, 3)
    with pytest.raises(ImageReadError, match="max_image_pixels"):
        read_image(path, max_pixels=80 * 60 - 1)


def with_a_preview(data: bytes) -> bytes:
    """A JPEG as cameras write it: a preview JPEG, with its own end marker, in a segment before the photo's data."""
    body = b"preview\x00" + jpeg_bytes(photo(16, 16))
    return data[:2] + b"\xff\xe3" + struct.pack(">H", len(body) + 2) + body + data[2:]


@pytest.mark.parametrize(
    "cut_short", [lambda data: data[: len(data) * 2 // 3], lambda data: data[: data.rfind(b"\xff\xda")]],
    ids=["in-the-pixels", "in-the-headers"],  # a copy stopped before the photo's data is as incomplete
)
@pytest.mark.parametrize("layout", [lambda data: data, with_a_preview], ids=["plain", "with-preview"])
def test_truncated_jpeg_is_an_error_not_a_grey_photo(tmp_path, layout, cut_short):
    data = layout(jpeg_bytes(photo(200, 300)))
    whole, cut = tmp_path / "whole.jpg", tmp_path / "cut.jpg"
    whole.write_bytes(data)
    cut.write_bytes(cut_short(data))
    assert read_image(whole).shape == (200, 300, 3)
    with pytest.raises(ImageReadError, match="cut.jpg: truncated JPEG"):
        read_image(cut)


def test_bytes_after_the_jpeg_end_marker_are_fine(tmp_path):
    """Phones append videos or maker data after the image; that is not a truncation."""
    path = tmp_path / "motion.jpg"
    path.write_bytes(jpeg_bytes(photo()) + b"\x00\x00ftypmp42" + bytes(range(256)) * 10)
    assert read_image(path).shape == (60, 80, 3)


def test_truncated_png_is_an_error(tmp_path):
    ok, encoded = cv2.imencode(".png", photo())
    path = tmp_path / "cut.png"
    path.write_bytes(encoded.tobytes()[:-40])
    with pytest.raises(ImageReadError, match="cut.png: truncated PNG"):
        read_image(path)


def test_a_png_with_corrupt_pixel_data_is_one_reason_not_a_crash(tmp_path):
    ok, encoded = cv2.imencode(".png", photo(200, 300))
    data = bytearray(encoded.tobytes())
    start = data.find(b"IDAT") + 20
    data[start : start + 400] = bytes(byte ^ 0x5A for byte in data[start : start + 400])  # IEND is still there
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match=r"corrupt.png: not a readable image \(corrupt or unsupported format\)"):
        read_image(path)


def test_an_upload_larger_than_any_photo_within_the_limit_is_refused_undecoded(monkeypatch):
    monkeypatch.setattr(photo_io.Image, "open", lambda *_: pytest.fail("the upload was opened"))
    with pytest.raises(ImageReadError, match="upload.png: 67_111_865 bytes is larger than any photo within the limit"):
        photo_io.decode_image(bytes(photo_io.max_file_bytes(1000) + 1), "upload.png", max_pixels=1000)


def test_an_alpha_channel_counts_in_the_decode_limit(tmp_path):
    """100x100 8-bit RGBA takes 40,000 bytes: within 13,334 RGB pixels' 40,002 bytes, not within 13,000's 39,000."""
    path = tmp_path / "alpha.png"
    cv2.imwrite(str(path), np.full((100, 100, 4), 200, np.uint8))
    assert read_image(path, max_pixels=13_334).shape == (100, 100, 3)
    with pytest.raises(ImageReadError, match=r"alpha.png: 100x100 pixels take 0 MiB decoded"):
        read_image(path, max_pixels=13_000)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_gives_the_photo_as_a_viewer_shows_it(tmp_path, orientation, suffix):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"phone{suffix}"
    Image.fromarray(photo()).save(path, exif=exif, quality=100)
    with Image.open(path) as stored:
        as_viewed = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
    decoded = read_image(path)
    assert decoded.shape == as_viewed.shape
    assert np.abs(decoded.astype(int) - as_viewed).mean() < (0.01 if suffix == ".png" else 3)


def test_mask_is_turned_upright_like_its_photo(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    mask = np.zeros((60, 80), np.uint8)
    mask[:10, :20] = 255  # top-left corner
    path = tmp_path / "mask.png"
    Image.fromarray(mask).save(path, exif=exif)
    upright = read_mask(path)
    assert upright.shape == (80, 60)
    assert upright[:20, -10:].all() and upright.sum() == 200  # 90° clockwise: now the top-right corner


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_text("this is not a photo"), "not a readable image"),
        (lambda p: p.symlink_to(p.parent / "gone.png"), "broken symbolic link"),
        (lambda p: p.mkdir(), "is a folder"),
        (lambda p: os.mkfifo(p), "not a regular file"),  # opening it would wait for a writer forever
        (lambda p: p.symlink_to(p), "Too many levels of symbolic links"),
        (lambda p: None, "no such file"),
    ],
    ids=["text", "broken-link", "folder", "fifo", "link-loop", "missing"],
)
def test_unusable_files_get_one_reason(tmp_path, make, reason):
    path = tmp_path / "part.png"
    make(path)
    with pytest.raises(ImageReadError, match=reason) as raised:
        read_image(path)
    assert str(raised.value).startswith(f"{path}: ")


def test_permission_denied_says_so(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    path = folder / "locked.png"
    cv2.imwrite(str(path), photo())
    path.chmod(0)
    code = f"from preprocessing.io import read_image\ntry:\n    read_image({str(path)!r})\nexcept Exception as e:\n    print(e)"
    result = subprocess.run(without_root_powers([sys.executable, "-c", code]), cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.strip() == f"{path}: permission denied", result.stderr


def test_folder_listing_keeps_broken_links_so_they_are_reported(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), photo())
    (tmp_path / "b.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "c.png").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in find_images(tmp_path)] == ["a.png", "b.png"]


def test_folder_listing_follows_links_to_folders_and_walks_each_folder_once(tmp_path):
    """A camera's folder linked in (``ln -s /mnt/cam2 incoming/cam2``) is scored with the rest, not passed
    over in silence; a second link to it and a link back up (a loop) list no photo twice."""
    cam2, incoming = tmp_path / "elsewhere" / "cam2", tmp_path / "incoming"
    cam2.mkdir(parents=True)
    incoming.mkdir()
    for path in (cam2 / "a.png", cam2 / "b.png", incoming / "c.png"):
        cv2.imwrite(str(path), photo())
    (incoming / "cam2").symlink_to(cam2)
    (incoming / "cam2_again").symlink_to(cam2)
    (cam2 / "up").symlink_to(incoming)
    assert [p.relative_to(incoming).as_posix() for p in find_images(incoming)] == ["c.png", "cam2/a.png", "cam2/b.png"]


def test_a_broken_link_to_a_folder_is_listed_so_it_is_reported(tmp_path):
    """A link to a camera share that is gone held photos that will not be scored: it is named, not skipped."""
    cv2.imwrite(str(tmp_path / "a.png"), photo())
    (tmp_path / "cam3").symlink_to(tmp_path / "unmounted" / "cam3")
    (tmp_path / "notes.txt").symlink_to(tmp_path / "gone.txt")  # not a photo, nor a folder of them
    assert [p.name for p in find_images(tmp_path)] == ["a.png", "cam3"]
    with pytest.raises(ImageReadError, match=f"^{tmp_path}/cam3: broken symbolic link"):
        read_image(tmp_path / "cam3")


def test_folder_listing_takes_upper_case_suffixes_and_sub_folders(tmp_path):
    (tmp_path / "line2" / "shift1").mkdir(parents=True)
    for name in ("IMG_0001.JPG", "line2/shift1/part.Png", "line2/b.tiff", "line2/readme.md"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == [
        "IMG_0001.JPG", "line2/b.tiff", "line2/shift1/part.Png"
    ]
    assert [p.name for p in find_images(tmp_path, recursive=False)] == ["IMG_0001.JPG"]


@pytest.mark.parametrize("suffix", [".pgm", ".ppm", ".pnm", ".jp2", ".webp"])
def test_photos_in_the_formats_of_vision_software_are_listed_and_read(tmp_path, suffix):
    """A camera writing PGM, PPM, JPEG 2000 or WebP: its photos are found in the folder (never passed over
    for their suffix) and read as the photo they hold."""
    image = photo()[..., 0] if suffix == ".pgm" else photo()  # PGM holds one grey channel
    written = tmp_path / f"part{suffix}"
    lossless = [cv2.IMWRITE_WEBP_QUALITY, 101] if suffix == ".webp" else []
    ok, data = cv2.imencode(".ppm" if suffix == ".pnm" else suffix, image, lossless)
    assert ok
    written.write_bytes(data.tobytes())
    assert find_images(tmp_path) == [written]
    expected = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., ::-1]
    assert np.array_equal(read_image(written), expected)


def test_a_folder_that_cannot_be_listed_is_named_not_passed_over(tmp_path):
    """A listing that skips what it may not read loses photos in silence ("no images found", or a
    batch a folder short): a locked subfolder is listed so that it gets its error record, and a
    locked folder given itself raises its PermissionError."""
    cv2.imwrite(str(tmp_path / "a.png"), photo())
    locked = tmp_path / "shift2"
    locked.mkdir()
    cv2.imwrite(str(locked / "b.png"), photo())
    code = (
        "from preprocessing.io import find_images, read_images\n"
        f"for path, result in read_images(find_images({str(tmp_path)!r})):\n"
        "    print(path.name, result if isinstance(result, Exception) else 'read')\n"
        f"try:\n    find_images({str(locked)!r})\nexcept PermissionError as error:\n    print('refused', error.filename)\n"
    )
    locked.chmod(0)
    try:
        result = subprocess.run(without_root_powers([sys.executable, "-c", code]), cwd=ROOT, capture_output=True, text=True)
    finally:
        locked.chmod(0o755)
    assert result.stdout.splitlines() == ["a.png read", f"shift2 {locked}: permission denied", f"refused {locked}"], (
        result.stderr
    )


def test_a_batch_read_returns_each_bad_file_as_its_error_in_order(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), photo())
    (tmp_path / "b.png").write_text("not a photo")
    cv2.imwrite(str(tmp_path / "c.png"), photo(30, 40))
    paths = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "missing.png", tmp_path / "c.png"]
    results = list(photo_io.read_images(paths, workers=2))
    assert [path for path, _ in results] == paths
    assert results[0][1].shape == (60, 80, 3) and results[3][1].shape == (30, 40, 3)
    assert str(results[1][1]) == f"{paths[1]}: not a readable image (corrupt or unsupported format)"
    assert str(results[2][1]) == f"{paths[2]}: no such file"


def test_a_mask_marked_in_any_colour_is_defective_there(tmp_path):
    mask = np.zeros((60, 80, 3), np.uint8)
    mask[:10, :20] = (0, 0, 255)  # red, stored BGR
    mask[-10:, -20:] = (0, 255, 0)  # green
    path = tmp_path / "drawn_mask.png"
    cv2.imwrite(str(path), mask)
    marked = read_mask(path)
    assert marked[:10, :20].all() and marked[-10:, -20:].all() and marked.sum() == 400


def test_a_mask_saved_with_an_opaque_alpha_channel_is_defective_only_where_marked(tmp_path):
    """Image editors save masks as RGBA: the alpha channel, opaque everywhere, marks no defect."""
    mask = np.zeros((60, 80, 4), np.uint8)
    mask[..., 3] = 255
    mask[:10, :20, :3] = 255
    path = tmp_path / "edited_mask.png"
    cv2.imwrite(str(path), mask)
    marked = read_mask(path)
    assert marked[:10, :20].all() and marked.sum() == 200


# ----------------------------------------------------------------------------- photos that cannot teach the bank
def textured(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "image, problem",
    [
        (textured(32, 32), None),
        (textured(31, 400), "400x31 pixels is too small to show a part (at least 32 on each side)"),
        (textured(1000, 8), "8x1000 pixels is too small to show a part (at least 32 on each side)"),
        (np.full((64, 64, 3), 128, np.uint8), "blank: its pixels vary by 0.00 grey levels (standard deviation), less than 1"),
        (np.full((64, 64, 3), (0, 135, 0), np.uint8), "blank: its pixels vary by 0.00 grey levels (standard deviation), less than 1"),
        (np.full((64, 64), 128, np.uint8) + np.eye(64, dtype=np.uint8) * 12, None),
    ],
    ids=["32-px", "31-px", "strip", "grey-frame", "green-frame", "faint-line"],
)
def test_a_tiny_or_blank_photo_is_no_training_photo(image, problem):
    assert photo_io.photo_problem(image) == problem


def test_a_set_with_unusable_photos_is_refused_naming_how_many_and_each_reason():
    message = photo_io.unusable_photos(["a.png: no such file", "b.png: blank"], 7)
    assert message == "2 of 7 training photos cannot be used; remove or replace them: a.png: no such file; b.png: blank"


# ----------------------------------------------------------------------------- writing results
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        write_atomically(tmp_path / "out" / "metrics.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out" / "metrics.json").stat().st_mode) == mode


def test_a_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "model.pkl"
    path.write_bytes(b"old")
    path.chmod(0o640)
    write_atomically(path, b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    """A real write failure: the file-size limit makes the kernel refuse the write, as a full disk would."""
    path = tmp_path / "model.pkl"
    path.write_bytes(b"the old model")
    code = (
        "import resource, signal\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
        "from output_files import write_atomically\n"
        "try:\n"
        f"    write_atomically({str(path)!r}, b'x' * 5000)\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.strip() == (
        f"OutputError {path}: cannot be written (File too large); any previous file is unchanged"
    ), result.stderr
    assert path.read_bytes() == b"the old model"
    assert os.listdir(tmp_path) == ["model.pkl"]


def test_a_write_stopped_by_an_error_other_than_a_disk_error_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    """Text that cannot be encoded (a lone surrogate) fails the write after the temporary exists; it goes too."""
    path = tmp_path / "report.html"
    path.write_text("the old report")
    with pytest.raises(UnicodeEncodeError):
        write_atomically(path, "<html>\ud800</html>")
    assert path.read_text() == "the old report"
    assert os.listdir(tmp_path) == ["report.html"]


def test_a_photo_name_that_is_not_utf8_is_written_as_the_bytes_it_has_on_disk(tmp_path):
    """A CSV or report naming such a photo must name the file a user can find, not a replacement character."""
    name = os.fsdecode(b"caf\xe9.png")
    write_atomically(tmp_path / "scores.csv", f"path,score\n{name},0.5\n")
    assert (tmp_path / "scores.csv").read_bytes() == b"path,score\ncaf\xe9.png,0.5\n"


def test_a_stray_temporary_named_with_an_impossible_pid_does_not_stop_writing(tmp_path):
    """Any file may match our temporaries' pattern: a pid no process can have is a dead writer's, not a crash."""
    stray = tmp_path / f".report.html.fastener-{2**80}-0badc0de.tmp"
    stray.write_text("partial")
    write_atomically(tmp_path / "report.html", "<html></html>")
    assert os.listdir(tmp_path) == ["report.html"]


def test_stale_temporaries_of_a_dead_writer_are_removed_a_live_one_is_kept(tmp_path):
    finished = subprocess.Popen(["true"])
    finished.wait()
    stale = [tmp_path / f".report.html.fastener-{finished.pid}-0badc0de.tmp", tmp_path / f".model.pkl.fastener-{finished.pid}-12345678.tmp"]
    kept = [tmp_path / f".report.html.fastener-{os.getpid()}-c0ffee00.tmp", tmp_path / "notes.tmp", tmp_path / ".cache.tmp",
            tmp_path / f".editor.{finished.pid}.0badc0de.tmp"]  # another program's temporary, its writer gone
    for path in stale + kept:
        path.write_text("partial")
    write_atomically(tmp_path / "report.html", "<html></html>")
    assert sorted(os.listdir(tmp_path)) == sorted(["report.html", *(path.name for path in kept)])


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.mkdir(), "is a folder"),
        (lambda p: os.mkfifo(p), "is a device, FIFO or socket"),
    ],
    ids=["folder", "fifo"],
)
def test_an_output_that_is_not_a_file_is_refused_and_left_alone(tmp_path, make, reason):
    path = tmp_path / "model.pkl"
    make(path)
    kind = stat.S_IFMT(path.stat().st_mode)
    for attempt in (check_writable, lambda p: write_atomically(p, b"x")):
        with pytest.raises(OutputError, match=reason):
            attempt(path)
    assert stat.S_IFMT(path.stat().st_mode) == kind
    assert os.listdir(tmp_path) == ["model.pkl"]


def test_a_device_node_is_never_replaced():
    with pytest.raises(OutputError, match="/dev/null: is a device"):
        write_atomically("/dev/null", b"x")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_read_only_folder_is_found_before_any_work(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    code = (
        "from output_files import check_writable\n"
        f"try:\n    check_writable({str(folder / 'model.pkl')!r})\nexcept Exception as e:\n    print(e)"
    )
    result = subprocess.run(without_root_powers([sys.executable, "-c", code]), cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.strip() == f"{folder / 'model.pkl'}: cannot be written (Permission denied); any previous file is unchanged", result.stderr
    assert os.listdir(folder) == []


def test_a_parent_that_is_a_file_is_an_output_error(tmp_path):
    (tmp_path / "saved_models").write_text("a file, not a folder")
    with pytest.raises(OutputError, match="cannot be written"):
        check_writable(tmp_path / "saved_models" / "model.pkl")


def test_json_document_never_holds_nan_or_infinity():
    text = json_document({"score": float("nan"), "nested": [1.5, float("inf"), {"x": -float("inf")}],
                          "interval": (0.5, float("nan"))})
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON")) == {
        "score": None, "nested": [1.5, None, {"x": None}], "interval": [0.5, None]
    }


def test_a_grey_photo_can_stay_one_channel_and_a_colour_one_stays_rgb(tmp_path):
    grey = (np.arange(60 * 40).reshape(60, 40) % 256).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "grey8.png"), grey)
    cv2.imwrite(str(tmp_path / "grey16.png"), grey.astype(np.uint16) * 257)
    colour = np.dstack([grey, 255 - grey, grey // 2])
    cv2.imwrite(str(tmp_path / "colour.png"), colour)  # stored BGR
    for name in ("grey8.png", "grey16.png"):
        one_channel = read_image(tmp_path / name, keep_grey=True)
        assert one_channel.shape == (60, 40) and one_channel.dtype == np.uint8
        assert np.array_equal(one_channel, grey)
        assert np.array_equal(read_image(tmp_path / name), np.dstack([grey] * 3))  # RGB unless asked
    assert np.array_equal(read_image(tmp_path / "colour.png", keep_grey=True), colour[..., ::-1])


# ----------------------------------------------------------------------------- budgets and full disks
def test_the_decode_limit_counts_bytes_so_a_16_bit_rgba_photo_counts_for_more(tmp_path, monkeypatch):
    """100x100 pixels is within 15,000, but 16-bit RGBA takes 80,000 bytes, more than 15,000 8-bit RGB pixels."""
    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), np.full((100, 100, 4), 40000, np.uint16))
    assert read_image(path, max_pixels=30_000).shape == (100, 100, 3)  # 90,000 bytes allowed
    monkeypatch.setattr(photo_io.cv2, "imdecode", lambda *_: pytest.fail("decoded despite the budget"))
    with pytest.raises(ImageReadError, match=r"deep.png: 100x100 pixels take 0 MiB decoded \(16-bit or extra channels\)"):
        read_image(path, max_pixels=15_000)


@pytest.mark.parametrize(
    "name, pixels",
    [
        ("deep.tiff", np.full((100, 100, 4), 40000, np.uint16)),
        ("mono.pgm", np.full((100, 100), 40000, np.uint16)),
        ("deep.ppm", np.full((100, 100, 3), 40000, np.uint16)),  # Pillow calls these 8-bit RGB
        ("deep.jp2", np.full((100, 100, 3), 40000, np.uint16)),
    ],
    ids=["tiff-rgba", "pgm-grey", "ppm-rgb", "jpeg2000-rgb"],
)
def test_a_16_bit_photo_of_another_format_than_png_counts_for_more_in_the_decode_limit(
    tmp_path, monkeypatch, name, pixels
):
    """A scanner's TIFF or a mono camera's PGM keeps its depth elsewhere than a PNG: 100x100 16-bit pixels decode
    to 60,000 bytes or more as RGB, beyond the 45,000 of 15,000 8-bit RGB pixels, so they are refused undecoded."""
    path = tmp_path / name
    cv2.imwrite(str(path), pixels)
    assert read_image(path).shape == (100, 100, 3)
    monkeypatch.setattr(photo_io.cv2, "imdecode", lambda *_: pytest.fail("decoded despite the budget"))
    refusal = rf"{name}: 100x100 pixels take 0 MiB decoded \(16-bit or extra channels\)"
    with pytest.raises(ImageReadError, match=refusal):
        read_image(path, max_pixels=15_000)


@pytest.mark.parametrize("name", ["plain.ppm", "plain.jp2"])
def test_an_8_bit_ppm_or_jpeg2000_photo_right_at_the_limit_is_decoded(tmp_path, name):
    """Their depth is read from their own headers, so an 8-bit one is not counted as 16-bit and refused."""
    path = tmp_path / name
    cv2.imwrite(str(path), photo(100, 150))
    assert read_image(path, max_pixels=15_000).shape == (100, 150, 3)


def test_a_floating_point_photo_is_spread_over_the_8_bit_range(tmp_path):
    """A 32-bit float TIFF holds 0.0 to 1.0: cut to 8 bits it would be a black frame; spread, its shading stays."""
    ramp = np.linspace(0.0, 1.0, 60 * 80, dtype=np.float32).reshape(60, 80)
    path = tmp_path / "float.tiff"
    cv2.imwrite(str(path), ramp)
    decoded = read_image(path, keep_grey=True)
    assert decoded.min() == 0 and decoded.max() == 255
    assert (np.diff(decoded.ravel().astype(int)) >= 0).all()  # brighter stays brighter


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_a_floating_point_photo_with_pixels_that_are_not_numbers_is_refused(tmp_path, value):
    """A float TIFF cut short by its writer or a broken sensor pipeline: spread over 8 bits, its NaN pixels
    would read as black and the photo would get a verdict."""
    ramp = np.linspace(0.0, 1.0, 60 * 80, dtype=np.float32).reshape(60, 80)
    ramp[20:30, 10:40] = value
    path = tmp_path / "float.tiff"
    cv2.imwrite(str(path), ramp)
    with pytest.raises(ImageReadError, match=r"float.tiff: holds pixels that are not numbers \(NaN or infinite\)"):
        read_image(path)


def save_pages(path: Path, *sizes: tuple[int, int]) -> None:
    """One file holding a different photo of each (width, height), in the order given; the first is ``photo``."""
    pages = [Image.fromarray(photo(height, width) // (index + 1)) for index, (width, height) in enumerate(sizes)]
    pages[0].save(path, save_all=True, append_images=pages[1:])


@pytest.mark.parametrize("name", ["stack.tiff", "burst.png", "burst.webp"])
def test_a_file_holding_two_photos_is_refused_as_only_its_first_would_be_scored(tmp_path, name):
    """A camera's multi-page TIFF (or an animation) decodes to its first page alone: a defect on the second would
    pass unseen under an "ok" verdict."""
    save_pages(tmp_path / name, (100, 80), (100, 80))
    with pytest.raises(ImageReadError, match=rf"{name}: holds more than one 100x80 photo .* save each photo as its own"):
        read_image(tmp_path / name)


def test_a_tiff_whose_other_pages_are_smaller_previews_is_read_as_its_photo(tmp_path):
    save_pages(tmp_path / "with_preview.tiff", (100, 80), (50, 40), (25, 20))
    assert np.array_equal(read_image(tmp_path / "with_preview.tiff"), photo(80, 100))


@pytest.mark.parametrize("pages", [[(100, 80)], [(25, 20), (100, 80)]], ids=["photo-second", "photo-third"])
def test_a_tiff_whose_first_page_is_a_preview_of_the_photo_is_refused(tmp_path, pages):
    """OpenCV decodes the first page: a 50x40 preview written before the photo would get the verdict while the
    photo itself was never looked at."""
    save_pages(tmp_path / "preview_first.tiff", (50, 40), *pages)
    with pytest.raises(ImageReadError, match=r"preview_first.tiff: holds a 100x80 photo after a 50x40 first page "
                                             r"\(.*\), and only the first page would be scored"):
        read_image(tmp_path / "preview_first.tiff")


def test_16_bit_photos_become_8_bit_as_rounding_by_257_does():
    raw = np.random.default_rng(0).integers(0, 65536, (64, 48, 4), dtype=np.uint16)
    expected = (raw / 257.0).round().astype(np.uint8)
    assert np.array_equal(photo_io.to_rgb8(raw), cv2.cvtColor(expected, cv2.COLOR_BGRA2RGB))


def test_a_file_larger_than_any_photo_within_the_limit_is_not_read(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    with open(path, "wb") as handle:  # sparse: no disk used
        handle.truncate(photo_io.max_file_bytes(1000) + 1)
    monkeypatch.setattr(photo_io.os, "fdopen", lambda *a, **k: pytest.fail("the file was read"))
    with pytest.raises(ImageReadError, match="huge.png: 67_111_865 bytes is larger than any photo within the limit"):
        read_image(path, max_pixels=1000)


def test_a_photo_that_cannot_be_read_into_memory_gets_its_reason(tmp_path, monkeypatch):
    """Under a memory limit (a line PC, a container) reading one large file may fail: that photo's error
    record, never a MemoryError that stops the batch or the watched folder."""
    path = tmp_path / "large.png"
    cv2.imwrite(str(path), photo(100, 150))

    def out_of_memory(*args: object) -> bytes:
        raise MemoryError

    monkeypatch.setattr(photo_io, "_read_at_most", out_of_memory)
    with pytest.raises(ImageReadError, match=rf"large.png: {path.stat().st_size:_} bytes cannot be read with the mem"):
        read_photo_bytes(path)


def test_reading_a_small_photo_reserves_its_size_not_the_largest_a_photo_may_be(tmp_path):
    """Every decoder thread reads a photo at once: had each reserved the file-size limit (hundreds of MiB)
    to read a 3 KB photo, a line PC with a memory limit would fail a batch of tiny photos."""
    path = tmp_path / "small.png"
    cv2.imwrite(str(path), photo(32, 32))
    tracemalloc.start()
    try:
        data = photo_io.read_photo_bytes(path, max_pixels=100_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert data == path.read_bytes()
    assert peak < 2**20, f"reading a {len(data)} byte photo peaked at {peak:_} bytes"


@pytest.mark.parametrize("check, name", [("check_writable", "model.pkl"), ("check_output_folder", "heatmaps")])
def test_a_full_disk_is_found_before_any_work(tmp_path, check, name):
    """The file-size limit makes the kernel refuse the probe's write, as a full disk or a quota would: for an
    output file and for a folder of outputs (heatmaps) alike."""
    code = (
        "import resource, signal\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
        f"from output_files import {check}\n"
        f"try:\n    {check}({str(tmp_path / name)!r})\nexcept Exception as e:\n    print(e)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    expected = f"{tmp_path / name}: cannot be written (File too large); any previous file is unchanged"
    assert result.stdout.strip() == expected, result.stderr
    assert [path for path in tmp_path.rglob("*") if not path.is_dir()] == []


def test_a_full_disk_that_shows_only_when_synced_is_found_before_any_work(tmp_path, monkeypatch):
    """Network and quota file systems may accept the write and refuse it at fsync: the probe syncs its bytes."""
    import output_files

    def no_space(_descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(output_files.os, "fsync", no_space)
    with pytest.raises(OutputError, match=r"model.pkl: cannot be written \(No space left on device\)"):
        check_writable(tmp_path / "model.pkl")
    assert os.listdir(tmp_path) == []


def test_the_data_is_synced_before_the_rename_and_the_rename_is_synced(tmp_path, monkeypatch):
    """What survives a power cut: the new bytes reach the disk before the name points at them, and the
    rename itself is then made durable by syncing the folder. Each fsync is recorded by what it syncs."""
    import output_files

    events: list[tuple[str, Path]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{descriptor}"))))
        real_fsync(descriptor)

    def replace(source, target) -> None:
        events.append(("rename", Path(target).resolve()))
        real_replace(source, target)

    monkeypatch.setattr(output_files.os, "fsync", fsync)
    monkeypatch.setattr(output_files.os, "replace", replace)
    path = tmp_path.resolve() / "metrics.json"
    write_atomically(path, "{}")
    assert [kind for kind, _ in events] == ["fsync", "rename", "fsync"]
    (_, data), (_, renamed), (_, folder) = events
    assert data.parent == path.parent and data.name.startswith(".metrics.json.fastener-")  # the temporary's bytes
    assert renamed == path and folder == path.parent


def test_a_temporary_of_a_live_writer_run_by_another_user_is_kept(tmp_path, monkeypatch):
    """Signal 0 to another user's process is refused (EPERM): that writer lives, its file is mid-write."""
    def refused(pid, signal):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", refused)
    theirs = tmp_path / ".report.html.fastener-4242-0badc0de.tmp"
    theirs.write_text("partial")
    write_atomically(tmp_path / "report.html", "<html></html>")
    assert sorted(os.listdir(tmp_path)) == sorted(["report.html", theirs.name])
