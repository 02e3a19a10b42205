from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import inference
from evaluation.mvtec import load_test_split


@pytest.fixture(scope="module")
def model_file(fitted_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "patchcore_small.pkl"
    fitted_model.save(path)
    return path


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = inference.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_single_image_json_has_every_field(model_file, small_screw_dir, capsys):
    image = load_test_split(small_screw_dir)[0].path
    code, out, err = run(["--model", str(model_file), "--image", str(image), "--json"], capsys)
    assert code == 0
    assert json.loads(out)["model"] == str(model_file)  # the path as given: two lines' files may share a name
    (record,) = json.loads(out)["results"]
    assert err.splitlines() == [f"1 scored, {int(record['is_anomalous'])} anomalous, 0 unreadable"]  # no progress bar
    assert set(record) == {"path", "score", "normalized_score", "threshold", "is_anomalous", "sigma",
                           "anomaly_confidence", "warnings"}
    assert record["path"] == str(image)
    assert record["is_anomalous"] == (record["score"] > record["threshold"])
    assert record["normalized_score"] == pytest.approx(record["score"] / record["threshold"], abs=1e-3)


def test_unreadable_single_image_exits_non_zero(model_file, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"nope")
    code, out, err = run(["--model", str(model_file), "--image", str(broken), "--json"], capsys)
    assert code == 1
    assert json.loads(out)["results"] == [{"path": str(broken), "error": f"{broken}: not a readable image (corrupt or unsupported format)"}]
    assert f"error: {broken}" in err


def test_folder_with_a_bad_file_scores_the_rest(model_file, small_screw_dir, tmp_path, capsys):
    folder = tmp_path / "batch"
    (folder / "sub").mkdir(parents=True)
    samples = load_test_split(small_screw_dir)[:3]
    for index, sample in enumerate(samples):
        (folder / "sub" / f"{index}.png").symlink_to(sample.path.resolve())
    (folder / "corrupt.png").write_bytes(b"\x89PNG broken")
    code, out, err = run(["--model", str(model_file), "--dir", str(folder)], capsys)
    assert code == 3
    assert "corrupt.png" in err
    assert out.count("ANOMALOUS") + out.count(" ok ") == 3
    flagged = out.count("ANOMALOUS")
    assert out.splitlines()[-1] == f"3 scored, {flagged} anomalous, 1 unreadable"
    header = out.splitlines()[0]
    assert "anomaly confidence" in header and "score/thr" in header and "confidence" not in header.replace(
        "anomaly confidence", "")


def test_a_folder_linked_into_the_dir_is_scored_and_a_broken_link_to_one_is_named(model_file, small_screw_dir,
                                                                                   tmp_path, capsys):
    """``ln -s /mnt/cam2 incoming/cam2``: cam2's photos are scored with the rest; a link to a share that
    is gone is an error record, not a folder's photos missing in silence."""
    cam2, incoming = tmp_path / "elsewhere" / "cam2", tmp_path / "incoming"
    cam2.mkdir(parents=True)
    incoming.mkdir()
    photos = [sample.path.resolve() for sample in load_test_split(small_screw_dir)[:3]]
    (incoming / "a.png").symlink_to(photos[0])
    for index, photo in enumerate(photos[1:]):
        (cam2 / f"{index}.png").symlink_to(photo)
    (incoming / "cam2").symlink_to(cam2)
    (incoming / "cam3").symlink_to(tmp_path / "unmounted")
    code, out, _ = run(["--model", str(model_file), "--dir", str(incoming), "--json"], capsys)
    assert code == 3
    records = {Path(record["path"]).relative_to(incoming).as_posix(): record for record in json.loads(out)["results"]}
    assert sorted(records) == ["a.png", "cam2/0.png", "cam2/1.png", "cam3"]
    assert "score" in records["cam2/0.png"] and "score" in records["cam2/1.png"]
    assert records["cam3"]["error"].startswith(f"{incoming}/cam3: broken symbolic link")


def test_visualize_writes_one_overlay_per_image(model_file, small_screw_dir, tmp_path, capsys):
    image = load_test_split(small_screw_dir)[-1].path
    out_dir = tmp_path / "out"
    code, out, _ = run(
        ["--model", str(model_file), "--image", str(image), "--json", "--visualize", "--output-dir", str(out_dir)], capsys
    )
    assert code == 0
    heatmap = Path(json.loads(out)["results"][0]["heatmap"])
    assert heatmap.is_file() and heatmap.parent == out_dir / "heatmaps"


def test_missing_model_file_is_a_one_line_error(tmp_path):
    from config import run_cli

    assert run_cli(lambda: inference.main(["--model", str(tmp_path / "none.pkl"), "--image", "x.png"])) == 2


def test_evaluating_a_saved_model_repeats_the_fit_time_numbers(fitted_model, model_file, small_screw_dir, tmp_path, capsys):
    from evaluation.report import evaluate

    at_fit = evaluate(fitted_model, small_screw_dir, tmp_path / "fit", quiet=True)
    code, out, _ = run(
        ["--model", str(model_file), "--dir", str(small_screw_dir), "--evaluate", "--json", "--quiet",
         "--output-dir", str(tmp_path / "saved")], capsys
    )
    assert code == 0
    from_file = json.loads(out)
    for key in ("image_auroc", "image_ap", "pixel_auroc", "aupro", "per_defect_auroc", "threshold", "n_test"):
        assert from_file[key] == at_fit[key], key
    assert (tmp_path / "saved" / "report.html").is_file()


def test_evaluate_with_an_unreadable_photo_scores_the_rest_and_exits_3(model_file, screw_dir, tmp_path, capsys):
    from conftest import link_subset

    data = link_subset(screw_dir, tmp_path / "data", n_train=0, n_test_per_kind=1)
    (data / "test" / "good" / "999\nmetrics: forged\x1b[2J.png").write_bytes(b"not a png")  # a name that forges lines
    code, out, err = run(["--model", str(model_file), "--dir", str(data), "--evaluate", "--json", "--quiet",
                          "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 3
    metrics = json.loads(out)
    assert metrics["n_skipped"] == 1 and metrics["skipped"][0]["path"].endswith("999\nmetrics: forged\x1b[2J.png")
    assert (metrics["n_test"], metrics["n_test_good"], metrics["n_test_defective"]) == (6, 1, 5)
    assert "warning: skipped:" in err and "999\\nmetrics: forged\\x1b[2J.png" in err and "\x1b" not in err
    assert [line.split(":")[0] for line in err.splitlines()] == ["warning", "metrics"]  # --quiet: no progress bar
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == metrics


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--evaluate", "--dir", "d", "--threshold", "5"], "--evaluate reports the model's calibrated threshold"),
        (["--evaluate", "--image", "x.png"], "--evaluate needs --dir"),
        (["--evaluate", "--dir", "d", "--csv", "r.csv"], "--csv, --visualize and --report are for a scoring run"),
        (["--evaluate", "--dir", "d", "--visualize"], "--csv, --visualize and --report are for a scoring run"),
        (["--evaluate", "--dir", "d", "--report"], "--csv, --visualize and --report are for a scoring run"),
        (["--watch", "inbox", "--jsonl", "r.jsonl", "--threshold", "5"], "--threshold are for --image/--dir"),
        (["--watch", "inbox"], "--watch needs somewhere to put results"),
        (["--dir", "d", "--jsonl", "r.jsonl"], "--jsonl, --sort-into and --state go with --watch"),
        (["--image", "x.png", "--sort-into", "sorted"], "--jsonl, --sort-into and --state go with --watch"),
    ],
    ids=["evaluate-threshold", "evaluate-image", "evaluate-csv", "evaluate-visualize", "evaluate-report", "watch-threshold", "watch-nowhere", "jsonl-dir", "sort-into-image"],
)
def test_a_flag_the_run_would_not_honour_is_refused(tmp_path, capsys, flags, message):
    """A usage error (exit 2) naming the flag, before the model is read: never a run that ignores it."""
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--model", str(tmp_path / "m.pkl"), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- hardening
def test_a_batch_with_every_kind_of_bad_file_scores_the_rest(model_file, small_screw_dir, tmp_path):
    """Bomb, truncated JPEG, broken link, text named .png, unreadable file: each one error record, exit 3."""
    import cv2
    from test_io import ROOT, bomb_png, jpeg_bytes, without_root_powers

    from preprocessing.io import read_image

    folder = tmp_path / "incoming"
    folder.mkdir()
    good = [sample.path for sample in load_test_split(small_screw_dir)[:3]]
    for index, path in enumerate(good):
        (folder / f"good_{index}.png").symlink_to(path.resolve())
    (folder / "bomb.png").write_bytes(bomb_png(30000))
    data = jpeg_bytes(read_image(good[0]))
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "moved.png").symlink_to(tmp_path / "no_longer_here.png")
    (folder / "notes.png").write_text("not a photo")
    cv2.imwrite(str(folder / "locked.png"), cv2.imread(str(good[1])))
    (folder / "locked.png").chmod(0)
    command = [sys.executable, str(ROOT / "inference.py"), "--model", str(model_file), "--dir", str(folder), "--json"]
    result = subprocess.run(without_root_powers(command), capture_output=True, text=True, timeout=600)
    assert result.returncode == 3, result.stderr
    records = {Path(r["path"]).name: r for r in json.loads(result.stdout)["results"]}
    assert sorted(name for name, r in records.items() if "score" in r) == ["good_0.png", "good_1.png", "good_2.png"]
    reasons = {
        "bomb.png": "30000x30000 pixels is more than the limit",
        "truncated.jpg": "truncated JPEG",
        "moved.png": "broken symbolic link",
        "notes.png": "not a readable image",
        "locked.png": "permission denied",
    }
    for name, reason in reasons.items():
        assert reason in records[name]["error"], records[name]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == len(reasons) and "Traceback" not in result.stderr


def test_json_output_is_valid_json_even_when_a_number_is_not_finite(model_file, small_screw_dir, monkeypatch, capsys):
    from models.patchcore import PatchCore

    real_predict = PatchCore.predict

    def nan_sigma(self, images, *args, **kwargs):
        predictions = real_predict(self, images, *args, **kwargs)
        for prediction in predictions:
            prediction.sigma = float("nan")
        return predictions

    monkeypatch.setattr(PatchCore, "predict", nan_sigma)
    image = load_test_split(small_screw_dir)[0].path
    code, out, _ = run(["--model", str(model_file), "--image", str(image), "--json"], capsys)
    assert code == 0
    (record,) = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in --json output"))["results"]
    assert record["sigma"] is None


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.mkdir(), "is a folder, not a model file"),
        (lambda p: p.write_bytes(b"\x80\x05\x8e" + (1 << 40).to_bytes(8, "little")), "corrupt, it declares a value larger"),
        (lambda p: p.write_bytes(b"not a pickle"), "not a model file or truncated"),
    ],
    ids=["folder", "terabyte-length", "garbage"],
)
def test_a_bad_model_file_is_one_error_line_and_exit_2(tmp_path, capsys, make, reason):
    from config import run_cli

    model = tmp_path / "model.pkl"
    make(model)
    assert run_cli(lambda: inference.main(["--model", str(model), "--image", "x.png"])) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {model}: ") and reason in line


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--visualize"], "out/heatmaps: cannot be written ("),
        (["--report"], "out/batch_report.html: cannot be written ("),
        (["--csv", "/dev/null"], "/dev/null: is a device, FIFO or socket"),
        (["--evaluate"], "out: cannot be written ("),
    ],
    ids=["heatmaps", "report", "csv", "evaluate"],
)
def test_an_unwritable_output_is_refused_before_scoring(
    model_file, small_screw_dir, tmp_path, monkeypatch, capsys, flags, named
):
    from config import run_cli
    from models.patchcore import PatchCore

    monkeypatch.setattr(PatchCore, "predict", lambda *a, **k: pytest.fail("scored before checking the output"))
    (tmp_path / "out").write_text("a file where the output folder should be")
    image = load_test_split(small_screw_dir)[0].path
    photos = ["--dir", str(small_screw_dir)] if "--evaluate" in flags else ["--image", str(image)]
    argv = ["--model", str(model_file), *photos, "--output-dir", str(tmp_path / "out"), *flags]
    assert run_cli(lambda: inference.main(argv)) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and named in line


def test_heatmaps_and_reports_honour_the_umask(model_file, small_screw_dir, tmp_path, capsys):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        image = load_test_split(small_screw_dir)[-1].path
        code, out, _ = run(
            ["--model", str(model_file), "--image", str(image), "--json", "--visualize", "--output-dir", str(tmp_path)],
            capsys,
        )
    finally:
        os.umask(previous)
    assert code == 0
    heatmap = Path(json.loads(out)["results"][0]["heatmap"])
    assert stat.S_IMODE(heatmap.stat().st_mode) == 0o644


def _folder_of(small_screw_dir: Path, folder: Path, names: list[str]) -> Path:
    """A folder of photos named as given (links to real screw photos, any suffix)."""
    for name, sample in zip(names, load_test_split(small_screw_dir)):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).symlink_to(sample.path.resolve())
    return folder


def test_same_stem_in_different_folders_gives_one_heatmap_each(model_file, small_screw_dir, tmp_path, capsys):
    folder = _folder_of(small_screw_dir, tmp_path / "photos", ["line1/cam/P1.JPG", "line1/cam/P1.png", "line2/cam/P1.JPG"])
    out_dir = tmp_path / "out"
    code, out, _ = run(["--model", str(model_file), "--dir", str(folder), "--visualize", "--json", "--output-dir",
                        str(out_dir)], capsys)
    assert code == 0
    heatmaps = [Path(record["heatmap"]) for record in json.loads(out)["results"]]
    assert len(set(heatmaps)) == 3 and all(path.is_file() for path in heatmaps)
    assert sorted(p.relative_to(out_dir / "heatmaps").as_posix() for p in heatmaps) == [
        "line1/cam/P1.JPG_heatmap.png", "line1/cam/P1.png_heatmap.png", "line2/cam/P1.JPG_heatmap.png"]


def test_threshold_flag_moves_the_verdict_for_one_run(model_file, small_screw_dir, tmp_path, capsys):
    folder = _folder_of(small_screw_dir, tmp_path / "photos", ["a.png", "b.png", "c.png"])
    base = ["--model", str(model_file), "--dir", str(folder), "--json"]
    _, out, _ = run(base, capsys)
    calibrated = json.loads(out)
    scores = sorted(record["score"] for record in calibrated["results"])
    middle = (scores[0] + scores[1]) / 2
    code, out, err = run([*base, "--threshold", str(middle)], capsys)
    moved = json.loads(out)
    assert code == 0 and moved["threshold"] == middle
    assert [r["is_anomalous"] for r in moved["results"]] == [r["score"] > middle for r in moved["results"]]
    assert sum(r["is_anomalous"] for r in moved["results"]) == 2
    assert all(r["normalized_score"] == pytest.approx(r["score"] / middle, abs=1e-3) for r in moved["results"])
    assert moved["summary"] == {"scored": 3, "anomalous": 2, "unreadable": 0}
    assert "3 scored, 2 anomalous, 0 unreadable" in err
    _, out, _ = run(base, capsys)
    assert json.loads(out) == calibrated, "the model file keeps its calibrated threshold"


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_threshold_must_be_positive(model_file, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--model", str(model_file), "--image", "x.png", "--threshold", value])
    assert exit_info.value.code == 2
    assert "--threshold must be a positive number" in capsys.readouterr().err


def test_csv_holds_the_same_records_as_json(model_file, small_screw_dir, tmp_path, capsys):
    import csv

    folder = _folder_of(small_screw_dir, tmp_path / "photos", ["a.png", "b.png"])
    (folder / "broken.png").write_bytes(b"nope")
    table = tmp_path / "results.csv"
    code, out, _ = run(["--model", str(model_file), "--dir", str(folder), "--json", "--csv", str(table)], capsys)
    assert code == 3
    records = json.loads(out)["results"]
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == [record["path"] for record in records]
    for row, record in zip(rows, records):
        if "error" in record:
            assert row["error"] == record["error"] and row["score"] == ""
        else:
            assert float(row["score"]) == record["score"] and float(row["normalized_score"]) == record["normalized_score"]
            assert row["is_anomalous"] == str(record["is_anomalous"])


def test_report_page_for_photos_without_labels(model_file, small_screw_dir, tmp_path, capsys):
    import re

    names = ["x/a.png", "x/b.png", "y/a.png", "c.png", "d.png"]
    folder = _folder_of(small_screw_dir, tmp_path / "photos", names)
    (folder / "broken.png").write_bytes(b"nope")
    out_dir = tmp_path / "out"
    code, out, _ = run(["--model", str(model_file), "--dir", str(folder), "--report", "--json", "--quiet",
                        "--output-dir", str(out_dir)], capsys)
    assert code == 3
    records = [r for r in json.loads(out)["results"] if "error" not in r]
    page = (out_dir / "batch_report.html").read_text()
    cards = re.findall(r'<figure class="card (\w+)".*?<b>([\d.]+)</b>.*?<div class="name">([^<]+)</div>', page)
    assert [name for _, _, name in cards] == [Path(r["path"]).relative_to(folder).as_posix() for r in
                                               sorted(records, key=lambda r: -r["score"])]
    assert [float(score) for _, score, _ in cards] == sorted((float(s) for _, s, _ in cards), reverse=True)
    assert [verdict for verdict, _, _ in cards] == [
        "ANOMALOUS" if r["is_anomalous"] else "OK" for r in sorted(records, key=lambda r: -r["score"])]
    threshold = json.loads(out)["threshold"]
    assert f"threshold {threshold:.4f}" in page and "broken.png" in page
    assert "White contour: where the anomaly map is above the threshold" in page
    assert "oracle" not in page and "AUROC" not in page  # no label, no metric


@pytest.mark.parametrize("photos_in_it", [None, []], ids=["missing", "no-photos"])
def test_a_folder_that_is_missing_or_holds_no_photos_is_one_error_line_and_exit_2(model_file, tmp_path, capsys,
                                                                                  photos_in_it):
    from config import run_cli

    folder = tmp_path / "photos"
    if photos_in_it is not None:
        folder.mkdir()
        (folder / "notes.txt").write_text("not a photo")
    assert run_cli(lambda: inference.main(["--model", str(model_file), "--dir", str(folder)])) == 2
    (line,) = capsys.readouterr().err.splitlines()
    reason = "no such folder" if photos_in_it is None else "no images found (png, jpg, jpeg, bmp, tif, tiff)"
    assert line == f"error: {folder}: {reason}"


def test_a_photo_name_that_is_not_utf8_is_written_to_the_csv_and_report_as_its_bytes(
        model_file, small_screw_dir, tmp_path, capsys):
    folder = tmp_path / "batch"
    folder.mkdir()
    image = load_test_split(small_screw_dir)[0].path.resolve()
    odd = os.fsencode(folder) + b"/frame\xff.png"  # a camera writing Latin-1 names: not UTF-8
    os.symlink(image, odd)
    (folder / "plain.png").symlink_to(image)
    csv_path = tmp_path / "results.csv"
    code, _, err = run(["--model", str(model_file), "--dir", str(folder), "--csv", str(csv_path), "--report",
                        "--output-dir", str(tmp_path / "out"), "--json"], capsys)
    assert code == 0, err
    assert odd in csv_path.read_bytes() and b"plain.png" in csv_path.read_bytes()
    assert b"frame\xff.png" in (tmp_path / "out" / "batch_report.html").read_bytes()


def test_a_photo_name_that_is_not_utf8_is_printed_on_a_strict_terminal_not_a_crash(model_file, small_screw_dir,
                                                                                    tmp_path):
    folder = tmp_path / "batch"
    folder.mkdir()
    os.symlink(load_test_split(small_screw_dir)[0].path.resolve(), os.fsencode(folder) + b"/frame\xff.png")
    Path(os.fsdecode(os.fsencode(folder) + b"/broken\xff.png")).write_bytes(b"x")
    command = [sys.executable, str(Path(inference.__file__)), "--model", str(model_file), "--dir", str(folder), "--quiet"]
    strict = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}  # as a terminal in an en_US.UTF-8 locale encodes
    result = subprocess.run(command, capture_output=True, timeout=600, env=strict)
    out, err = result.stdout, result.stderr
    assert result.returncode == 3, err
    assert out.splitlines()[-1] == b"1 scored, %d anomalous, 1 unreadable" % out.count(b"ANOMALOUS")
    assert b"frame\xff.png" in out and b"error: " in err and b"broken\xff.png" in err


def test_control_characters_in_a_photo_name_are_printed_as_escapes(model_file, small_screw_dir, tmp_path, capsys):
    """A name holding a newline split its row in two (a second line that looks like another photo),
    and one holding an escape sequence reached the terminal as a command: clear the screen, or
    move the cursor back over "ANOMALOUS"."""
    folder = tmp_path / "batch"
    folder.mkdir()
    image = load_test_split(small_screw_dir)[0].path.resolve()
    (folder / "frame\nok.png").symlink_to(image)
    (folder / "clear\x1b[2J.png").write_bytes(b"not a photo")
    (folder / "bad\nOK fake\u202egnp.png").write_bytes(b"not a photo either")
    code, out, err = run(["--model", str(model_file), "--dir", str(folder), "--quiet"], capsys)
    assert code == 3, err
    rows = out.splitlines()
    assert len(rows) == 6  # heading, three photos, note, summary: one line each
    assert rows[1].split()[:3] == [f"{folder}/bad\\nOK", "fake\\u202egnp.png", "error:"] and "\u202e" not in out
    assert rows[2].split()[:2] == [f"{folder}/clear\\x1b[2J.png", "error:"] and "\x1b" not in out
    assert rows[3].startswith(f"{folder}/frame\\nok.png ") and rows[3].split()[4] in ("ok", "ANOMALOUS")
    # each unreadable photo's error line on stderr, as it comes: one line each, nothing sent to the terminal
    assert [line.split(": not a readable image")[0] for line in err.splitlines()] == [
        f"error: {folder}/bad\\nOK fake\\u202egnp.png", f"error: {folder}/clear\\x1b[2J.png"]


def test_a_csv_named_as_one_of_the_photos_is_refused_before_scoring_and_the_photo_kept(model_file, small_screw_dir,
                                                                                      tmp_path, capsys):
    folder = tmp_path / "batch"
    folder.mkdir()
    photo = folder / "a.png"
    photo.write_bytes(load_test_split(small_screw_dir)[0].path.read_bytes())
    before = photo.read_bytes()
    (tmp_path / "link").symlink_to(folder)  # the same photo by another spelling
    for csv_name in (photo, tmp_path / "link" / "a.png"):
        code = inference.run_cli(lambda: inference.main(["--model", str(model_file), "--dir", str(tmp_path / "link"),
                                                         "--csv", str(csv_name)]))
        out, err = capsys.readouterr()
        assert code == 2 and err.startswith(f"error: {csv_name}: is ") and "one of the photos" in err
        assert "scored" not in out and photo.read_bytes() == before


@pytest.mark.parametrize("named", ["model", "export", "export by a link"])
@pytest.mark.parametrize("mode", ["--csv", "--watch --jsonl", "--watch --csv", "--watch --state"])
def test_a_results_file_named_as_the_model_or_its_export_is_refused_and_the_model_kept(
        model_file, small_screw_dir, tmp_path, capsys, named, mode):
    """Results written or appended over the model file, or its network's export, would ruin the model with no
    copy kept: refused at start, before anything is scored, whatever the spelling."""
    folder = tmp_path / "batch"
    folder.mkdir()
    (folder / "a.png").write_bytes(load_test_split(small_screw_dir)[0].path.read_bytes())
    (tmp_path / "link").symlink_to(model_file.parent)
    export = model_file.with_suffix(".onnx")
    target = {"model": model_file, "export": export, "export by a link": tmp_path / "link" / export.name}[named]
    before = model_file.read_bytes(), export.read_bytes()
    *watch, flag = mode.split()
    argv = ["--model", str(model_file), *(["--watch", str(folder)] if watch else ["--dir", str(folder)]), flag,
            str(target)]
    if flag == "--state":
        argv += ["--jsonl", str(tmp_path / "results.jsonl")]
    code = inference.run_cli(lambda: inference.main(argv))
    out, err = capsys.readouterr()
    assert code == 2 and err.splitlines() == [
        f"error: {target}: is {target.resolve()}, the model file or its ONNX export; give another file name"], err
    assert out == "" and (model_file.read_bytes(), export.read_bytes()) == before


def test_a_results_file_named_as_the_export_a_linked_model_file_scores_with_is_refused(model_file, small_screw_dir,
                                                                                      tmp_path, capsys):
    """A line's current.pkl links to the model: it scores through the export beside the file the link leads to."""
    folder = tmp_path / "batch"
    folder.mkdir()
    (folder / "a.png").write_bytes(load_test_split(small_screw_dir)[0].path.read_bytes())
    (tmp_path / "current.pkl").symlink_to(model_file)
    export = model_file.with_suffix(".onnx")
    before = export.read_bytes()
    code = inference.run_cli(lambda: inference.main(["--model", str(tmp_path / "current.pkl"), "--dir", str(folder),
                                                     "--csv", str(export)]))
    out, err = capsys.readouterr()
    assert code == 2 and err == f"error: {export}: is {export}, the model file or its ONNX export; give another file name\n"
    assert out == "" and export.read_bytes() == before


def test_a_csv_named_as_the_file_a_linked_photo_leads_to_is_refused(model_file, small_screw_dir, tmp_path, capsys):
    """A camera's photo linked into --dir: a CSV written at the camera's file would replace the photo."""
    camera, folder = tmp_path / "camera", tmp_path / "batch"
    camera.mkdir()
    folder.mkdir()
    photo = camera / "a.png"
    photo.write_bytes(load_test_split(small_screw_dir)[0].path.read_bytes())
    before = photo.read_bytes()
    (folder / "a.png").symlink_to(photo)
    code = inference.run_cli(lambda: inference.main(["--model", str(model_file), "--dir", str(folder),
                                                     "--csv", str(photo)]))
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith(f"error: {photo}: is ") and "one of the photos" in err
    assert "scored" not in out and photo.read_bytes() == before


def test_a_gpu_asked_for_where_torch_sees_none_is_one_error_line_and_exit_2(model_file, small_screw_dir, monkeypatch,
                                                                            capsys):
    """A line PC without a GPU, run with --device cuda: the user needs the remedy in one line, not a traceback."""
    import torch

    from config import run_cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    image = load_test_split(small_screw_dir)[0].path
    argv = ["--model", str(model_file), "--image", str(image), "--device", "cuda", "--runtime", "torch", "--quiet"]
    assert run_cli(lambda: inference.main(argv)) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu or auto\n"


def test_the_table_shows_each_photos_record_in_the_columns_its_heading_names(model_file, small_screw_dir, tmp_path,
                                                                            monkeypatch, capsys):
    """Each row holds the values --json gives the photo, under their headings and lined up with them
    whatever the length of the name; a photo's warnings follow its row, an unreadable photo's row gives its reason."""
    from models.patchcore import PatchCore

    real_predict = PatchCore.predict

    def with_a_warning(self: PatchCore, images: list, *args, **kwargs) -> list:
        predictions = real_predict(self, images, *args, **kwargs)
        for prediction in predictions:
            prediction.warnings = ["no part found: the whole photo was scored"]
        return predictions

    monkeypatch.setattr(PatchCore, "predict", with_a_warning)
    folder = _folder_of(small_screw_dir, tmp_path / "photos", ["a.png", "a_longer_name.png"])
    (folder / "b.png").write_bytes(b"nope")
    base = ["--model", str(model_file), "--dir", str(folder), "--quiet"]
    _, out, _ = run([*base, "--json"], capsys)
    records = json.loads(out)["results"]
    code, out, _ = run(base, capsys)
    assert code == 3
    heading, *lines = out.splitlines()
    assert heading.split() == ["image", "score", "score/thr", "threshold", "verdict", "sigma", "anomaly", "confidence"]
    rows = iter(lines)
    for record in records:
        row = next(rows)
        name, *cells = row.split()
        assert name == record["path"]
        if "error" in record:
            assert row.split("  error: ", 1)[1] == record["error"]
            continue
        score, ratio, threshold, verdict, sigma, confidence = cells
        assert float(score) == pytest.approx(record["score"], abs=5e-4)
        assert float(ratio) == pytest.approx(record["normalized_score"], abs=5e-4)
        assert float(threshold) == pytest.approx(record["threshold"], abs=5e-4)
        assert verdict == ("ANOMALOUS" if record["is_anomalous"] else "ok")
        assert float(sigma) == pytest.approx(record["sigma"], abs=0.05)
        assert confidence == f"{record['anomaly_confidence']:.1%}"
        assert row.index(verdict, len(name)) == heading.index("verdict")
        warnings = [next(rows).strip() for _ in record["warnings"]]
        assert warnings == ["warning: no part found: the whole photo was scored"]
    assert next(rows).startswith("(anomaly confidence: ")


@pytest.mark.parametrize("threshold, verdict", [("0.001", "ANOMALOUS"), ("1e9", "ok")], ids=["below", "above"])
def test_a_threshold_set_for_the_run_decides_every_verdict_and_the_report_says_so(model_file, small_screw_dir,
                                                                                 tmp_path, capsys, threshold, verdict):
    """--threshold below (above) every score: every row flagged (ok) with that threshold in its column, the
    summary counts them so, and the report's cards and threshold agree and say it was set for this run."""
    import re

    out_dir = tmp_path / "out"
    code, out, _ = run(["--model", str(model_file), "--dir", str(small_screw_dir / "test"), "--threshold", threshold,
                        "--report", "--output-dir", str(out_dir), "--quiet"], capsys)
    assert code == 0
    photos = len(load_test_split(small_screw_dir))
    rows = out.splitlines()[1:-3]  # between the heading and the note, summary and report lines
    assert len(rows) == photos and all(row.split()[3:5] == [f"{float(threshold):.3f}", verdict] for row in rows)
    flagged = photos if verdict == "ANOMALOUS" else 0
    assert f"{photos} scored, {flagged} anomalous, 0 unreadable" in out.splitlines()
    page = (out_dir / "batch_report.html").read_text()
    assert re.findall(r'<figure class="card (\w+)"', page) == [verdict.upper()] * photos
    assert f"threshold {float(threshold):.4f}" in page and "set with --threshold for this run" in page


def test_every_file_written_is_named_after_the_summary(model_file, small_screw_dir, tmp_path, capsys):
    """One photo with --visualize, --report and --csv: after the summary line, one line names each output
    (the heatmap folder, the report, the CSV), and each is there."""
    image = load_test_split(small_screw_dir)[0].path
    out_dir, table = tmp_path / "out", tmp_path / "results.csv"
    code, out, err = run(["--model", str(model_file), "--image", str(image), "--visualize", "--report", "--csv",
                          str(table), "--output-dir", str(out_dir), "--quiet"], capsys)
    assert code == 0, err
    flagged = out.count("ANOMALOUS")
    assert out.splitlines()[-4:] == [f"1 scored, {flagged} anomalous, 0 unreadable",
                                     f"heatmaps: {out_dir / 'heatmaps'}/", f"report: {out_dir / 'batch_report.html'}",
                                     f"csv: {table}"]
    assert (out_dir / "heatmaps" / f"{image.name}_heatmap.png").is_file()
    assert image.name in (out_dir / "batch_report.html").read_text() and str(image) in table.read_text()


def test_a_csv_that_cannot_be_written_whole_leaves_the_previous_one(model_file, small_screw_dir, tmp_path,
                                                                   monkeypatch, capsys):
    """The disk fails while the CSV is written: one error line naming it, exit 2, and the previous run's
    CSV as it was, never half of the new one."""
    import errno

    import inspection.scoring as scoring
    from config import run_cli

    table = tmp_path / "results.csv"
    table.write_text("the previous run's results\n")
    real_records_csv = scoring.records_csv

    def then_the_disk_fails(records: list) -> str:  # after every check: as the CSV is written
        def full(descriptor: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", full)
        return real_records_csv(records)

    monkeypatch.setattr(scoring, "records_csv", then_the_disk_fails)
    image = load_test_split(small_screw_dir)[0].path
    argv = ["--model", str(model_file), "--image", str(image), "--csv", str(table), "--quiet"]
    assert run_cli(lambda: inference.main(argv)) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {table}: cannot be written (No space left on device)")
    assert table.read_text() == "the previous run's results\n"
    assert [path.name for path in tmp_path.iterdir()] == ["results.csv"]


def test_a_watch_folder_that_does_not_exist_is_one_error_line_and_exit_2(tmp_path, capsys):
    """Named in the error, before the model file is read."""
    from config import run_cli

    inbox = tmp_path / "inbox"
    argv = ["--model", str(tmp_path / "never_read.pkl"), "--watch", str(inbox), "--jsonl", str(tmp_path / "r.jsonl")]
    assert run_cli(lambda: inference.main(argv)) == 2
    assert capsys.readouterr().err == f"error: {inbox}: no such folder to watch\n"


def test_the_watch_command_hands_the_watcher_its_outputs_and_waits(model_file, tmp_path, monkeypatch):
    """--visualize with --output-dir, --state, --settle-seconds and --retry-seconds reach the watcher as given:
    overlays go under <output-dir>/heatmaps, the journal where --state names it, and each wait is its own flag's."""
    import runtime.watcher

    handed: dict[str, object] = {}

    def watch_until_stopped(model: object, folder: Path, outputs: runtime.watcher.WatchOutputs, settle_s: float,
                            retry_s: float, model_path: Path | None = None) -> int:
        handed.update(folder=folder, outputs=outputs, settle_s=settle_s, retry_s=retry_s, model_path=model_path)
        return 0

    monkeypatch.setattr(runtime.watcher, "watch_until_stopped", watch_until_stopped)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    assert inference.main(["--model", str(model_file), "--watch", str(inbox), "--jsonl", str(tmp_path / "r.jsonl"),
                           "--visualize", "--output-dir", str(tmp_path / "out"), "--state", str(tmp_path / "journal"),
                           "--settle-seconds", "0.25", "--retry-seconds", "7"]) == 0
    outputs = handed["outputs"]
    assert (outputs.jsonl, outputs.heatmaps, outputs.state) == (tmp_path / "r.jsonl", tmp_path / "out" / "heatmaps",
                                                                tmp_path / "journal")
    assert (handed["folder"], handed["settle_s"], handed["retry_s"]) == (inbox, 0.25, 7.0)
    assert handed["model_path"] == model_file  # where confirmed photos are learnt into
