"""The one scoring path: photos in, verdict records and overlays out.

``inference.py``, the report of an unlabelled batch, ``evaluate`` and any later service (HTTP,
watched folder) call this module, so a photo is read, checked, scored and drawn the same way
whichever door it came in by. Nothing here prints: callers decide what to show.
"""

from __future__ import annotations

import csv
import io
import math
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import cv2
import numpy as np

from config import Config
from inspection.overlay import save_overlay
from models.patchcore import PatchCore, Prediction
from output_files import OutputError
from preprocessing.io import ImageReadError, check_photo, decode_image, read_image

RECORD_FIELDS = ("path", "score", "normalized_score", "threshold", "is_anomalous", "sigma", "anomaly_confidence",
                 "warnings", "heatmap", "error")


@dataclass(frozen=True)
class Photo:
    """One photo to score: a file to read, its encoded bytes (an upload), or an 8-bit RGB array.

    ``name`` is its relative name (``line1/cam/P1.JPG``): the overlay is written at that path
    under the heatmap folder, so photos with one file name in different folders never collide.
    """

    name: str
    source: Path | bytes | np.ndarray
    origin: str | None = None  # the file the bytes were read from, when there was one

    @property
    def label(self) -> str:
        """How records name the photo: the file path as given (or its bytes came from), else the name."""
        return str(self.source) if isinstance(self.source, Path) else self.origin or self.name


@dataclass
class Scored:
    """One photo after scoring. ``image`` and ``prediction`` are None when it could not be read."""

    photo: Photo
    record: dict[str, Any]
    image: np.ndarray | None = None
    prediction: Prediction | None = None


def prediction_record(label: str, prediction: Prediction) -> dict[str, Any]:
    """The verdict on one photo as plain JSON-ready data (the fields README, 'What inference.py prints', explains)."""
    return {
        "path": label,
        "score": round(prediction.score, 4),
        "normalized_score": round(prediction.normalized_score, 4),
        "threshold": round(prediction.threshold, 4),
        "is_anomalous": prediction.is_anomalous,
        "sigma": round(prediction.sigma, 2),
        "anomaly_confidence": round(prediction.anomaly_confidence, 4),
        "warnings": list(prediction.warnings),
    }


def error_record(label: str, error: Exception) -> dict[str, Any]:
    """A photo that could not be scored: its name and why (the message is prefixed with the name when it lacks it)."""
    message = str(error)
    return {"path": label, "error": message if message.startswith(label) else f"{label}: {message}"}


def heatmap_path(heatmap_dir: Path, name: str) -> Path:
    """``heatmap_dir/<name>_heatmap.png`` with the name's folders kept (and never climbing out).

    The file name keeps its suffix (``P1.JPG_heatmap.png``), so ``P1.JPG`` and ``P1.png`` of one
    folder get two overlays as well.
    """
    parts = [part for part in PurePosixPath(name.replace("\\", "/")).parts if part not in ("/", ".", "..")]
    if not parts:
        raise ValueError(f"{name!r}: a photo needs a file name to name its heatmap")
    return heatmap_dir.joinpath(*parts[:-1], f"{parts[-1]}_heatmap.png")


def write_overlay(model: PatchCore, image: np.ndarray, prediction: Prediction, out_path: Path) -> Path:
    """The photo beside its heatmap, contour and verdict, on the model's fixed colour scale."""
    return save_overlay(
        image,
        prediction.anomaly_map,
        out_path,
        threshold=prediction.threshold,
        vmin=model.calibration_median,  # same colour scale as the report: a healthy part looks calm
        score=prediction.score,
        verdict="ANOMALOUS" if prediction.is_anomalous else "OK",
    )


def score_batch(model: PatchCore, photos: Sequence[Photo], heatmap_dir: Path | None = None) -> Iterator[Scored]:
    """Read, check, score and (with ``heatmap_dir``) draw photos, yielding each one's result in order;
    a photo that cannot be scored gets an error record.

    Pass at most ``model.config.batch_size`` photos at a time; ``score_files`` does that for a list
    of any length. Photos are decoded at most ``num_workers`` ahead and scored in groups of at most
    ``max_image_pixels`` pixels (a batch of ordinary photos is one group, a photo at the limit is
    scored alone), and a result lives only as long as the caller keeps it: memory stays that of one
    photo at the limit however many heavy photos arrive together. A group that runs out of memory
    is scored again photo by photo, so only the photo too large to score fails. A score that is not
    a finite number is never a verdict: NaN is below every threshold and would read as "ok". A
    heatmap that cannot be written (a full disk, a name too long for one) is a warning on its
    record: the verdict stands, and a line that draws heatmaps never stops on one.
    """
    budget = model.config.max_image_pixels
    group: list[tuple[Photo, np.ndarray | ImageReadError]] = []
    pixels = 0
    for photo, image in zip(photos, _decoded_in_order(photos, model.config)):
        size = 0 if isinstance(image, ImageReadError) else image.shape[0] * image.shape[1]
        if group and pixels + size > budget:
            yield from _score_group(model, group, heatmap_dir)
            group, pixels = [], 0
        group.append((photo, image))
        pixels += size
    yield from _score_group(model, group, heatmap_dir)


def _decoded_in_order(photos: Sequence[Photo], config: Config) -> Iterator[np.ndarray | ImageReadError]:
    """Each photo decoded (``_decoded``), in order, by ``num_workers`` threads at most that many photos ahead."""
    workers = max(1, config.num_workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        ahead: deque[Future[np.ndarray | ImageReadError]] = deque()
        for photo in photos:
            ahead.append(pool.submit(_decoded, photo, config.max_image_pixels))
            if len(ahead) > workers:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def _score_group(
    model: PatchCore, group: list[tuple[Photo, np.ndarray | ImageReadError]], heatmap_dir: Path | None
) -> list[Scored]:
    """The results of photos decoded together (``score_batch``)."""
    readable = [image for _, image in group if not isinstance(image, ImageReadError)]
    predictions = iter(_predict_isolating_memory_errors(model, readable))
    results = []
    for photo, image in group:
        prediction = None if isinstance(image, ImageReadError) else next(predictions)
        if isinstance(image, ImageReadError) or isinstance(prediction, Exception):
            results.append(Scored(photo, error_record(photo.label, image if prediction is None else prediction)))
            continue
        if not math.isfinite(prediction.score):
            problem = ValueError(f"{photo.label}: the score is {prediction.score}, not a number a verdict can rest on; "
                                 "the model file may be damaged")
            results.append(Scored(photo, error_record(photo.label, problem)))
            continue
        record = prediction_record(photo.label, prediction)
        if heatmap_dir is not None:
            try:
                record["heatmap"] = str(write_overlay(model, image, prediction, heatmap_path(heatmap_dir, photo.name)))
            except OutputError as error:  # the verdict stands without its picture; the next photo is scored
                record["warnings"].append(f"no heatmap: {error}")
        results.append(Scored(photo, record, image, prediction))
    return results


def _decoded(photo: Photo, max_pixels: int) -> np.ndarray | ImageReadError:
    """The photo as 8-bit RGB, or the reason it cannot be scored (returned, so one bad photo never stops
    a batch): unreadable, or a frame that cannot show a part (tiny, blank), which gets no verdict."""
    try:
        if isinstance(photo.source, Path):
            image = read_image(photo.source, max_pixels)
        elif isinstance(photo.source, bytes):
            image = decode_image(photo.source, photo.label, max_pixels)
        else:
            image = photo.source
        check_photo(image, photo.label)
    except ImageReadError as error:
        return error
    return image


def _predict_isolating_memory_errors(model: PatchCore, images: list[np.ndarray]) -> list[Prediction | MemoryError]:
    """``model.predict``; when the batch runs out of memory, each photo alone, the one that still does
    getting a MemoryError that names it in place of its prediction. OpenCV says it ran out of memory
    with its own error (code -4), not MemoryError."""
    try:
        return model.predict(images) if images else []
    except (MemoryError, cv2.error) as error:
        if isinstance(error, cv2.error) and error.code != cv2.Error.StsNoMem:
            raise
        if len(images) == 1:
            height, width = images[0].shape[:2]
            return [MemoryError(f"{width}x{height} pixels: too large to score with the memory available")]
    return [prediction for image in images for prediction in _predict_isolating_memory_errors(model, [image])]


def score_files(model: PatchCore, photos: Sequence[Photo], heatmap_dir: Path | None = None) -> Iterator[Scored]:
    """``score_batch`` over any number of photos, ``batch_size`` at a time (the caller keeps what it needs)."""
    size = max(1, model.config.batch_size)
    for start in range(0, len(photos), size):
        yield from score_batch(model, photos[start : start + size], heatmap_dir)


def folder_photos(folder: Path, paths: Sequence[Path]) -> list[Photo]:
    """Photos found under ``folder``, each named by its path relative to it."""
    return [Photo(path.relative_to(folder).as_posix(), path) for path in paths]


def summary(records: Sequence[dict[str, Any]]) -> dict[str, int]:
    """What a line supervisor reads first: how many photos were scored, flagged and unreadable."""
    scored = [record for record in records if "error" not in record]
    return {
        "scored": len(scored),
        "anomalous": sum(record["is_anomalous"] for record in scored),
        "unreadable": len(records) - len(scored),
    }


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet reads as the start of a formula


def csv_cell(value: Any) -> Any:
    """A value as a CSV cell a spreadsheet shows as text: a file named ``=HYPERLINK(...).png`` gets a
    leading apostrophe instead of becoming a formula (numbers are left as they are)."""
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def records_csv(records: Sequence[dict[str, Any]]) -> str:
    """The records as CSV, one row per photo and every field a column (warnings joined by '; ').

    Rows end in CRLF (RFC 4180): the writer quotes a field holding either character of its line end,
    so a carriage return in a file name stays inside its cell instead of starting a row (a formula).
    """
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RECORD_FIELDS, lineterminator="\r\n")
    writer.writeheader()
    for record in records:
        row = {**record, "warnings": "; ".join(record.get("warnings", []))}
        writer.writerow({key: csv_cell(value) for key, value in row.items()})
    return buffer.getvalue()
