"""The one scoring path (inspection.scoring): records, heatmap names, CSV, and what a flagged photo shows."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from evaluation.gallery import scored_image
from inspection.overlay import THRESHOLD_RGB, TITLE_HEIGHT, VERDICT_RGB, highlighted_region, overlay_image, overlay_rgb
from evaluation.mvtec import load_test_split
from preprocessing.io import find_images, read_image
import inspection.scoring
from inspection.scoring import Photo, RECORD_FIELDS, folder_photos, heatmap_path, records_csv, score_batch, score_files, summary


def test_heatmap_names_mirror_the_relative_path(tmp_path):
    names = ["line1/cam/P1.JPG", "line1/cam/P1.png", "line2/cam/P1.JPG", "train/good/000.png", "test/good/000.png"]
    paths = [heatmap_path(tmp_path, name) for name in names]
    assert len(set(paths)) == len(names)
    assert paths[0] == tmp_path / "line1" / "cam" / "P1.JPG_heatmap.png"


@pytest.mark.parametrize("name", ["../../etc/passwd.png", "/abs/P1.png", "a/./../P1.png", "C:\\photos\\P1.png"])
def test_a_heatmap_never_lands_outside_its_folder(tmp_path, name):
    path = heatmap_path(tmp_path / "heatmaps", name)
    assert path.resolve().is_relative_to((tmp_path / "heatmaps").resolve())
    assert path.name == "P1.png_heatmap.png" or path.name == "passwd.png_heatmap.png"


def test_a_heatmap_that_cannot_be_written_is_a_warning_and_the_rest_are_drawn(fitted_model, small_screw_dir, tmp_path):
    """A photo name of 220 bytes still gets its overlay (the temporary it is written through is named
    shorter); one of 250 bytes cannot (its overlay's name would pass the 255 bytes a name may have):
    its verdict stands with a warning, and the photos after it are drawn."""
    source = load_test_split(small_screw_dir)[0].path
    names = ["p" * 216 + ".png", "q" * 246 + ".png", "after.png"]
    photos = [Photo(name, source) for name in names]
    fitted, too_long, after = score_batch(fitted_model, photos, tmp_path / "heatmaps")
    assert Path(fitted.record["heatmap"]).is_file() and Path(after.record["heatmap"]).is_file()
    assert "heatmap" not in too_long.record and too_long.record["score"] == fitted.record["score"]
    assert [warning.split(":")[0] for warning in too_long.record["warnings"]] == ["no heatmap"]
    assert "(File name too long)" in too_long.record["warnings"][0]


def test_a_batch_mixes_files_arrays_and_unreadable_files(fitted_model, small_screw_dir, tmp_path):
    """What a service calls: photos in memory or on disk; a bad one is an error record, the rest are scored."""
    first, second = (s.path for s in load_test_split(small_screw_dir)[:2])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG broken")
    photos = [Photo("upload/part.png", read_image(first)), Photo("broken.png", broken), Photo("b.png", second)]
    results = list(score_batch(fitted_model, photos, heatmap_dir=tmp_path / "heatmaps"))
    assert [r.record["path"] for r in results] == ["upload/part.png", str(broken), str(second)]
    assert "error" in results[1].record and results[1].prediction is None
    expected = [p.score for p in fitted_model.predict([first, second])]
    assert [results[0].record["score"], results[2].record["score"]] == [round(s, 4) for s in expected]
    for result in (results[0], results[2]):
        record = result.record
        assert set(record) == set(RECORD_FIELDS) - {"error"}
        assert record["normalized_score"] == pytest.approx(record["score"] / record["threshold"], abs=1e-3)
        assert Path(record["heatmap"]).is_file()
    assert results[0].record["heatmap"] == str(tmp_path / "heatmaps" / "upload" / "part.png_heatmap.png")
    assert summary([r.record for r in results]) == {"scored": 2, "anomalous": sum(
        r.record["is_anomalous"] for r in results if r.prediction), "unreadable": 1}


def test_records_csv_has_one_row_per_photo():
    records = [
        {"path": "a.png", "score": 1.5, "normalized_score": 0.75, "threshold": 2.0, "is_anomalous": False,
         "sigma": 0.1, "anomaly_confidence": 0.08, "warnings": ["no object", "dark"]},
        {"path": "b.png", "error": "b.png: not a readable image"},
    ]
    rows = list(csv.DictReader(io.StringIO(records_csv(records))))
    assert [row["path"] for row in rows] == ["a.png", "b.png"]
    assert rows[0]["normalized_score"] == "0.75" and rows[0]["warnings"] == "no object; dark"
    assert rows[1]["error"] == "b.png: not a readable image" and rows[1]["score"] == ""


def test_every_flagged_screw_photo_shows_where(fitted_model, screw_dir):
    """Acceptance (issue 10, item 2), on the FULL screw test set: every photo called ANOMALOUS has a
    highlighted region on its overlay (full size) and on its report thumbnail, and no OK photo has one.
    The small model's threshold is set low, as ``--threshold`` does for one run, so that both kinds occur."""
    model = fitted_model.copy()  # the session's model keeps its own threshold
    model.threshold = float(np.quantile(fitted_model.calibration_scores, 0.9))
    photos = folder_photos(screw_dir / "test", find_images(screw_dir / "test"))
    flagged = 0
    for scored in score_files(model, photos):
        prediction = scored.prediction
        region = highlighted_region(prediction.anomaly_map, prediction.threshold)
        assert region.any() == prediction.is_anomalous, scored.photo.name
        if not prediction.is_anomalous:
            continue
        flagged += 1
        black = np.zeros_like(scored.image)  # the only white an overlay of a black photo has is the contour
        drawn = overlay_rgb(black, prediction.anomaly_map, prediction.threshold)
        assert (drawn == THRESHOLD_RGB).all(axis=-1).any(), f"{scored.photo.name}: flagged, nothing outlined"
        card = scored_image(scored.photo.name, scored.image, prediction)  # what the report keeps
        drawn = overlay_rgb(np.zeros_like(card.thumbnail), card.eval_map, card.threshold, highlight=card.highlight)
        assert (drawn == THRESHOLD_RGB).all(axis=-1).any(), f"{scored.photo.name}: thumbnail outlines nothing"
    assert len(photos) == 160 and 0 < flagged < len(photos)


def test_a_file_name_that_starts_like_a_formula_stays_text_in_the_csv():
    records = [{"path": '=HYPERLINK("http://x","click").png', "error": '=HYPERLINK("http://x","click").png: not readable'},
               {"path": "+1.png", "score": -0.5, "normalized_score": 0.1, "threshold": 2.0, "is_anomalous": False,
                "sigma": -1.0, "anomaly_confidence": 0.0, "warnings": ["@risk"]},
               {"path": "-2+3.png", "error": "-2+3.png: not readable"}]
    rows = list(csv.DictReader(io.StringIO(records_csv(records))))
    assert rows[0]["path"] == "'" + records[0]["path"] and rows[0]["error"].startswith("'=HYPERLINK")
    assert rows[1]["path"] == "'+1.png" and rows[1]["warnings"] == "'@risk"
    assert rows[1]["score"] == "-0.5" and rows[1]["sigma"] == "-1.0"  # numbers are numbers
    assert rows[2]["path"] == "'-2+3.png"


def test_a_score_that_is_not_a_number_is_an_error_record_never_a_verdict(fitted_model, small_screw_dir):
    """A bank with one huge but finite patch overflows every distance: NaN would read as "ok"."""
    import copy

    photo = load_test_split(small_screw_dir)[0].path
    spoiled = copy.copy(fitted_model)
    spoiled.memory_bank = fitted_model.memory_bank.copy()
    spoiled.memory_bank[0] = 3e38
    spoiled._index = None  # the index is built from the spoiled bank
    (result,) = score_batch(spoiled, [Photo(photo.name, photo)])
    assert result.prediction is None and set(result.record) == {"path", "error"}
    assert result.record["error"].startswith(f"{photo}: the score is nan, not a number a verdict can rest on")


def test_a_frame_that_cannot_show_a_part_gets_its_reason_not_a_verdict(fitted_model, small_screw_dir, tmp_path):
    """A 2x2 file and a black frame (a camera that fired in the dark), in memory or uploaded as PNG bytes, are
    named with what is wrong with them; a verdict on them would judge a part they do not show. The photo beside
    them is scored."""
    part = load_test_split(small_screw_dir)[0].path
    tiny = tmp_path / "tiny.png"
    cv2.imwrite(str(tiny), np.full((2, 2, 3), 128, np.uint8))
    black = np.zeros((480, 640, 3), np.uint8)
    uploaded = cv2.imencode(".png", black)[1].tobytes()  # the same frame sent to the service
    results = list(score_batch(fitted_model, [Photo("tiny.png", tiny), Photo("part.png", part), Photo("dark.png", black),
                                              Photo("dark-upload.png", uploaded)]))
    assert results[0].record == {"path": str(tiny), "error": f"{tiny}: 2x2 pixels is too small to show a part "
                                                               "(at least 32 on each side)"}
    assert results[1].prediction is not None and "error" not in results[1].record
    for result in results[2:]:
        assert result.prediction is None
        assert result.record["error"].startswith(f"{result.photo.name}: blank: its pixels vary by 0.00 grey levels")


def run_out_of_memory_in_numpy() -> None:
    raise MemoryError


def run_out_of_memory_in_opencv() -> None:
    """What a preprocessing step meets under a memory cap: OpenCV's own error (-4), not MemoryError."""
    cv2.resize(np.zeros((8, 8), np.uint8), (300_000, 300_000))  # 90 GB


@pytest.mark.parametrize("run_out", [run_out_of_memory_in_numpy, run_out_of_memory_in_opencv], ids=["numpy", "opencv"])
def test_a_photo_too_large_for_memory_fails_alone(fitted_model, small_screw_dir, monkeypatch, run_out):
    """Under a memory cap the batch that holds a huge photo runs out of memory: only that photo may fail."""
    first, second = (s.path for s in load_test_split(small_screw_dir)[:2])
    huge = np.random.default_rng(0).integers(0, 256, (3000, 2000, 3), np.uint8)  # not square: width x height
    real_predict = type(fitted_model).predict

    def capped(self, images, *args, **kwargs):
        if any(image.shape[0] >= 3000 for image in images):
            run_out()
        return real_predict(self, images, *args, **kwargs)

    monkeypatch.setattr(type(fitted_model), "predict", capped)
    results = list(score_batch(fitted_model, [Photo("a.png", first), Photo("huge.png", huge), Photo("b.png", second)]))
    assert [("error" in r.record) for r in results] == [False, True, False]
    assert results[1].record["error"] == "huge.png: 2000x3000 pixels: too large to score with the memory available"
    expected = [round(p.score, 4) for p in real_predict(fitted_model, [first, second])]
    assert [results[0].record["score"], results[2].record["score"]] == expected


def test_each_record_carries_its_own_photos_numbers_and_warnings(fitted_model, small_screw_dir):
    """sigma, anomaly_confidence and warnings are what a reader acts on: each comes from its own field
    of the prediction (an overexposed white frame gets the preprocessing's warning)."""
    photo = load_test_split(small_screw_dir)[-1].path
    white = np.full((256, 256, 3), 255, np.uint8)
    white[::2] = 250  # not blank: blank frames are refused before scoring
    results = list(score_batch(fitted_model, [Photo("part.png", photo), Photo("white.png", white)]))
    expected = fitted_model.predict([photo, white])
    for result, prediction in zip(results, expected):
        assert result.record["sigma"] == round(prediction.sigma, 2)
        assert result.record["anomaly_confidence"] == round(prediction.anomaly_confidence, 4)
        assert result.record["warnings"] == prediction.warnings
    assert results[1].record["warnings"], "an all-white frame is scored without a warning"


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_every_character_a_spreadsheet_reads_as_a_formula_start_is_made_text(start):
    """OWASP's list of formula starts: a tab or carriage return before '=' still runs the formula."""
    name = f"{start}=cmd|' /C calc'!A0.png"
    rows = list(csv.DictReader(io.StringIO(records_csv([{"path": name, "error": f"{name}: not readable"}]), newline="")))
    assert rows[0]["path"] == "'" + name and rows[0]["error"].startswith("'" + start)


def test_a_carriage_return_in_a_file_name_never_starts_a_row():
    """A spreadsheet ends a row at a bare CR: unquoted, the name's tail would be a new row that starts with '='."""
    name = "a\r=cmd|' /C calc'!A0.png"
    text = records_csv([{"path": name, "error": "not readable"}, {"path": "b.png", "error": "not readable"}])
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [row["path"] for row in rows] == [name, "b.png"]


def test_each_saved_overlay_is_its_photo_on_the_models_colour_scale_with_its_verdict(fitted_model, small_screw_dir,
                                                                                     tmp_path):
    """The heatmap file of a photo: its own map, outlined at the model's threshold, coloured on the model's
    scale (from the healthy median, shared by every photo), titled with the photo's own verdict."""
    import copy

    paths = [sample.path for sample in load_test_split(small_screw_dir)]
    model = copy.copy(fitted_model)  # a threshold in the middle of the scores: both verdicts occur
    model.threshold = float(np.median([prediction.score for prediction in fitted_model.predict(paths)]))
    photos = [Photo(f"line/cam/{index}.png", path) for index, path in enumerate(paths)]
    results = list(score_batch(model, photos, heatmap_dir=tmp_path / "heatmaps"))
    verdicts = set()
    for index, result in enumerate(results):
        prediction = result.prediction
        assert result.record["heatmap"] == str(tmp_path / "heatmaps" / "line" / "cam" / f"{index}.png_heatmap.png")
        written = cv2.cvtColor(cv2.imread(result.record["heatmap"]), cv2.COLOR_BGR2RGB)
        verdict = "ANOMALOUS" if prediction.is_anomalous else "OK"
        verdicts.add(verdict)
        expected = overlay_image(result.image, prediction.anomaly_map, model.threshold, prediction.score,
                                 verdict, vmin=model.calibration_median)
        np.testing.assert_array_equal(written, expected, err_msg=result.photo.name)
        title = written[:TITLE_HEIGHT]
        other = "OK" if prediction.is_anomalous else "ANOMALOUS"
        assert (title == VERDICT_RGB[verdict]).all(-1).any() and not (title == VERDICT_RGB[other]).all(-1).any()
    assert verdicts == {"ANOMALOUS", "OK"}


def test_any_number_of_photos_is_scored_in_batches_each_once_in_order(fitted_model, small_screw_dir, monkeypatch):
    import copy

    paths = [sample.path for sample in load_test_split(small_screw_dir)][:5]
    model = copy.copy(fitted_model)
    model.config = fitted_model.config.replace(batch_size=2)
    batches: list[int] = []

    def counted(model: object, batch: list, heatmap_dir: Path | None) -> Iterator:
        batches.append(len(batch))
        return score_batch(model, batch, heatmap_dir)

    monkeypatch.setattr(inspection.scoring, "score_batch", counted)
    scored = list(score_files(model, [Photo(path.name, path) for path in paths]))
    assert batches == [2, 2, 1]
    assert [result.record["path"] for result in scored] == [str(path) for path in paths]


def test_heavy_photos_are_scored_in_groups_of_at_most_max_image_pixels(fitted_model, small_screw_dir):
    """A batch of photos near the decode limit would hold all their pixels, maps and overlays at once: scored
    in groups within the limit, memory stays that of one such photo however many arrive together."""
    paths = [sample.path for sample in load_test_split(small_screw_dir)][:5]
    height, width = read_image(paths[0]).shape[:2]
    model = fitted_model.copy()
    model.config = fitted_model.config.replace(max_image_pixels=int(2.5 * height * width))
    groups: list[int] = []

    def predict(images: list, **options: object) -> list:
        groups.append(len(images))
        return fitted_model.predict(images, **options)

    model.predict = predict
    results = list(score_batch(model, [Photo(path.name, path) for path in paths]))
    assert groups == [2, 2, 1]
    assert [result.record["score"] for result in results] == [round(p.score, 4) for p in fitted_model.predict(paths)]


def test_an_infinite_score_is_an_error_record_never_a_verdict(fitted_model, small_screw_dir, monkeypatch) -> None:
    """An overflowing distance can be +inf as well as NaN: "ANOMALOUS, score inf" would rest on a damaged model."""
    photo = load_test_split(small_screw_dir)[0].path
    real_predict = type(fitted_model).predict

    def overflowing(self, images, *args, **kwargs):
        return [replace(prediction, score=math.inf) for prediction in real_predict(self, images, *args, **kwargs)]

    monkeypatch.setattr(type(fitted_model), "predict", overflowing)
    (result,) = score_batch(fitted_model, [Photo(photo.name, photo)])
    assert result.prediction is None and set(result.record) == {"path", "error"}
    assert result.record["error"].startswith(f"{photo}: the score is inf, not a number a verdict can rest on")


def test_a_photo_scored_exactly_at_the_threshold_is_ok_on_its_record_and_its_overlay(fitted_model, small_screw_dir,
                                                                                    tmp_path) -> None:
    """A score equal to the threshold passes: the overlay's title must say OK (green) as the record does."""
    import copy

    photo = load_test_split(small_screw_dir)[0].path
    model = copy.copy(fitted_model)
    model.threshold = fitted_model.predict([photo])[0].score
    (result,) = score_batch(model, [Photo("at.png", photo)], heatmap_dir=tmp_path)
    assert result.record["is_anomalous"] is False and result.record["normalized_score"] == 1.0
    title = cv2.cvtColor(cv2.imread(result.record["heatmap"]), cv2.COLOR_BGR2RGB)[:TITLE_HEIGHT]
    assert (title == VERDICT_RGB["OK"]).all(-1).any() and not (title == VERDICT_RGB["ANOMALOUS"]).all(-1).any()


def test_photos_of_one_name_in_two_folders_get_their_own_records_and_heatmaps(fitted_model, small_screw_dir,
                                                                              tmp_path) -> None:
    """Cameras name files alike (P1.png in line1/ and line2/): each photo keeps its folder, so neither
    heatmap overwrites the other."""
    first, second = (sample.path for sample in load_test_split(small_screw_dir)[:2])
    for line, source in (("line1", first), ("line2", second)):
        (tmp_path / "photos" / line).mkdir(parents=True)
        (tmp_path / "photos" / line / "P1.png").symlink_to(source)
    photos = folder_photos(tmp_path / "photos", find_images(tmp_path / "photos"))
    results = list(score_batch(fitted_model, photos, heatmap_dir=tmp_path / "heatmaps"))
    heatmaps = [Path(result.record["heatmap"]) for result in results]
    assert heatmaps == [tmp_path / "heatmaps" / line / "P1.png_heatmap.png" for line in ("line1", "line2")]
    assert all(path.is_file() for path in heatmaps) and heatmaps[0].read_bytes() != heatmaps[1].read_bytes()


def test_an_upload_read_from_a_file_is_named_by_that_file_in_its_record(fitted_model, small_screw_dir,
                                                                       tmp_path) -> None:
    """The watched folder reads a photo's bytes itself: its record, scored or not, names the file it came from."""
    photo = load_test_split(small_screw_dir)[0].path
    broken = tmp_path / "cam" / "P2.png"
    results = list(score_batch(fitted_model, [Photo("P1.png", photo.read_bytes(), origin=str(photo)),
                                              Photo("P2.png", b"\x89PNG broken", origin=str(broken))]))
    assert [result.record["path"] for result in results] == [str(photo), str(broken)]
    assert results[1].record["error"].startswith(f"{broken}: ")


def test_the_summary_counts_as_anomalous_only_the_photos_flagged() -> None:
    """A passed photo with a warning (a dim frame) is scored, not anomalous: the line reads that count as parts to
    pull off the belt."""
    passed = {"path": "dim.png", "score": 1.0, "normalized_score": 0.5, "threshold": 2.0, "is_anomalous": False,
              "sigma": 0.1, "anomaly_confidence": 0.1, "warnings": ["underexposed: median grey 12"]}
    flagged = {**passed, "path": "dented.png", "score": 3.0, "is_anomalous": True, "warnings": []}
    records = [passed, flagged, {"path": "b.png", "error": "b.png: not a readable image"}]
    assert summary(records) == {"scored": 2, "anomalous": 1, "unreadable": 1}
