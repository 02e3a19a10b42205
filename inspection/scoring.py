"""The one scoring path: photos in, verdict records and overlays out.

``inference.py``, the report of an unlabelled batch, ``evaluate`` and any later service (HTTP,
watched folder) call this module, so a photo is read, checked, scored and drawn the same way
whichever door it came in by. Nothing here prints: callers decide what to show.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from inspection.overlay import save_overlay
from models.patchcore import PatchCore, Prediction
from preprocessing.io import ImageReadError, read_images

RECORD_FIELDS = ("path", "score", "normalized_score", "threshold", "is_anomalous", "sigma", "anomaly_confidence",
                 "warnings", "heatmap", "error")


@dataclass(frozen=True)
class Photo:
    """One photo to score: a file to read, or an 8-bit RGB array already in memory.

    ``name`` is its relative name (``line1/cam/P1.JPG``): the overlay is written at that path
    under the heatmap folder, so photos with one file name in different folders never collide.
    """

    name: str
    source: Path | np.ndarray

    @property
    def label(self) -> str:
        """How records name the photo: the file path as given, else the name."""
        return str(self.source) if isinstance(self.source, Path) else self.name


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
    """A photo that could not be scored: its name and why."""
    return {"path": label, "error": str(error)}


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


def score_batch(model: PatchCore, photos: Sequence[Photo], heatmap_dir: Path | None = None) -> list[Scored]:
    """Read, check, score and (with ``heatmap_dir``) draw one batch; an unreadable photo gets an error record.

    Pass at most ``model.config.batch_size`` photos at a time to keep memory flat; ``score_files``
    does that for a list of any length.
    """
    files = [photo.source for photo in photos if isinstance(photo.source, Path)]
    decoded = iter(read_images(files, model.config.num_workers, model.config.max_image_pixels))
    images: list[np.ndarray | ImageReadError] = [
        next(decoded)[1] if isinstance(photo.source, Path) else photo.source for photo in photos
    ]
    readable = [image for image in images if not isinstance(image, ImageReadError)]
    predictions = iter(model.predict(readable) if readable else [])
    results = []
    for photo, image in zip(photos, images):
        if isinstance(image, ImageReadError):
            results.append(Scored(photo, error_record(photo.label, image)))
            continue
        prediction = next(predictions)
        record = prediction_record(photo.label, prediction)
        if heatmap_dir is not None:
            record["heatmap"] = str(write_overlay(model, image, prediction, heatmap_path(heatmap_dir, photo.name)))
        results.append(Scored(photo, record, image, prediction))
    return results


def score_files(model: PatchCore, photos: Sequence[Photo], heatmap_dir: Path | None = None) -> Iterator[list[Scored]]:
    """``score_batch`` over any number of photos, one batch at a time (the caller keeps what it needs)."""
    size = max(1, model.config.batch_size)
    for start in range(0, len(photos), size):
        yield score_batch(model, photos[start : start + size], heatmap_dir)


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


def records_csv(records: Sequence[dict[str, Any]]) -> str:
    """The records as CSV, one row per photo and every field a column (warnings joined by '; ')."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RECORD_FIELDS, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({**record, "warnings": "; ".join(record.get("warnings", []))})
    return buffer.getvalue()
