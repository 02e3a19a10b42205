"""The evaluate-and-report glue, run against a stand-in model on a tiny synthetic MVTec-layout folder."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from config import Config
from evaluation.metrics import aupro, downsample_for_eval, image_metrics, pixel_roc, rates_at_threshold, wilson_interval
from evaluation.report import OPERATING_POINT_COLUMNS, evaluate, format_summary
from inspection.overlay import colour_scale_image, png_bytes
from models.patchcore import Prediction

ROOT = Path(__file__).resolve().parents[1]

SIZE = 96
REQUIRED_KEYS = {
    "image_auroc", "image_ap", "image_f1_at_threshold", "image_f1_max", "image_f1_max_threshold",
    "pixel_auroc", "aupro", "per_defect_auroc", "threshold", "n_train", "n_test", "fit_seconds",
    "backbone", "seed", "eval_size",
}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class FakeModel:
    """Stand-in for PatchCore: the anomaly map is how much redder than grey each pixel is."""

    def __init__(self) -> None:
        self.config = Config(batch_size=4, num_workers=1, false_alarm_rate=0.02)
        self.threshold = 0.3
        self.calibration_scores = np.array([0.12, 0.15, 0.18, 0.2, 0.22, 0.25], dtype=np.float32)
        self.calibration_method = "six healthy photos"
        self.calibration = {"method": self.calibration_method, "count": 6, "warnings": ["only six photos"],
                            "left_out": ["train/good/odd.png"]}
        self.preprocessing = {"reasons": ["rotation off (a test decision)"]}
        self.n_train = 20
        self.fit_seconds = 1.5
        self.batch_sizes: list[int] = []
        self.calibration_median = float(np.median(self.calibration_scores))
        self.calibration_std = 0.05  # the robust spread

    def threshold_for(self, false_alarm_rate: float) -> float:
        """Lower for a looser promise, the model's own threshold at its own rate."""
        return self.threshold * (self.config.false_alarm_rate / false_alarm_rate) ** 0.25

    def predict(self, images: list[np.ndarray], progress: bool = False) -> list[Prediction]:
        self.batch_sizes.append(len(images))
        predictions = []
        for image in images:
            redness = (image[..., 0].astype(np.float32) - image[..., 1]) / 255.0
            anomaly_map = cv2.GaussianBlur(redness, (0, 0), 2.0) + 0.1
            score = float(anomaly_map.max())
            warnings = ["object touches the border"] if score > 0.9 else []
            predictions.append(Prediction(score, self.threshold, anomaly_map, score > self.threshold, 0.0, 0.5, warnings))
        return predictions


def _photo(rng: np.random.Generator, spot: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A grey disc on a dark background, optionally with a red spot (x, y, radius, strength)."""
    image = np.full((SIZE, SIZE, 3), 30, np.uint8)
    cv2.circle(image, (SIZE // 2, SIZE // 2), 35, (150, 150, 150), -1)
    image = np.clip(image + rng.integers(0, 6, (SIZE, SIZE, 1)), 0, 255).astype(np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    if spot:
        x, y, radius, strength = spot
        cv2.circle(image, (x, y), radius, (min(255, 150 + strength), 150 - strength // 2, 150 - strength // 2), -1)
        cv2.circle(mask, (x, y), radius, 255, -1)
    return image, mask


def _write(path: Path, image_rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR) if image_rgb.ndim == 3 else image_rgb)


def make_dataset(root: Path, with_masks: bool = True) -> Path:
    """test/good (one a false alarm), test/scratch and test/hole (one missed), plus a corrupt file."""
    rng = np.random.default_rng(0)
    spots = {
        "good": [None] * 5 + [(40, 40, 3, 60)],  # the last is a faint red speck: a false positive
        "scratch": [(30, 50, 6, 150), (60, 40, 5, 120), (50, 60, 8, 200)],
        "hole": [(45, 45, 4, 140), (55, 35, 2, 20)],  # the last is too faint: a false negative
    }
    for kind, kind_spots in spots.items():
        for index, spot in enumerate(kind_spots):
            image, mask = _photo(rng, spot)
            _write(root / "test" / kind / f"{index:03d}.png", image)
            if kind != "good" and with_masks:
                _write(root / "ground_truth" / kind / f"{index:03d}_mask.png", mask)
    (root / "test" / "hole" / "999.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, FakeModel]:
    root = tmp_path_factory.mktemp("report")
    model = FakeModel()
    metrics = evaluate(model, make_dataset(root / "data"), root / "out", quiet=True, eval_size=64)
    return metrics, root / "out", model


def test_metrics_json(report: tuple[dict, Path, FakeModel]) -> None:
    metrics, out_dir, _ = report
    written = json.loads((out_dir / "metrics.json").read_text())
    assert REQUIRED_KEYS <= written.keys()
    assert written == json.loads(json.dumps(metrics))
    assert written["n_test"] == 11 and written["n_test_good"] == 6 and written["n_test_defective"] == 5
    assert written["n_skipped"] == 1 and written["skipped"][0]["path"].endswith("999.png")
    assert written["eval_size"] == 64 and written["backbone"] == "wide_resnet50_2" and written["fit_seconds"] == 1.5
    assert set(written["per_defect_auroc"]) == {"hole", "scratch"}
    assert 0.0 <= written["aupro"] <= 1.0 and 0.5 < written["pixel_auroc"] <= 1.0
    assert not list(out_dir.glob(".*tmp")), "temporary files must be renamed away"


def test_metrics_match_direct_computation(report: tuple[dict, Path, FakeModel]) -> None:
    metrics, _, model = report
    data_dir = Path(report[1]).parent / "data"
    paths = sorted((data_dir / "test").glob("*/[0-8]*.png"))
    images = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]
    scores = [p.score for p in FakeModel().predict(images)]
    expected = image_metrics([p.parent.name != "good" for p in paths], scores, model.threshold)
    expected.update(rates_at_threshold([p.parent.name for p in paths], scores, model.threshold))
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value)
    assert (metrics["false_alarms"], metrics["escapes"]) == (1, 1)  # the faint speck on a good photo, the faint hole


def test_other_false_alarm_settings_show_what_each_threshold_would_do(report: tuple[dict, Path, FakeModel]) -> None:
    """metrics.json, the console and the page set the compared rates side by side: each row's threshold is
    the model's for that rate, its counts are those of the test photos' own scores, and the model's own
    setting (2 %, added to the list) agrees with the figures at the threshold."""
    metrics, out_dir, model = report
    data_dir = out_dir.parent / "data"
    paths = sorted((data_dir / "test").glob("*/[0-8]*.png"))
    scores = np.array([p.score for p in FakeModel().predict(
        [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths])])
    good = np.array([p.parent.name == "good" for p in paths])
    points = metrics["operating_points"]
    assert [point["false_alarm_rate"] for point in points] == [0.005, 0.01, 0.02, 0.05, 0.1]
    for point in points:
        threshold = model.threshold_for(point["false_alarm_rate"])
        assert point["threshold"] == pytest.approx(threshold)
        assert point["false_alarms"] == int((scores[good] > threshold).sum())
        assert point["escapes"] == int((scores[~good] <= threshold).sum())
    own = points[2]
    assert (own["false_alarms"], own["escapes"]) == (metrics["false_alarms"], metrics["escapes"])
    assert own["f1"] == pytest.approx(metrics["image_f1_at_threshold"])
    assert points[0]["false_alarms"] == 0 < own["false_alarms"]  # a stricter promise drops the faint speck
    summary = format_summary(metrics)
    assert "other false_alarm_rate settings on these test photos:" in summary
    assert re.search(r"\n +2% \* +0\.300 +1 of 6 +1 of 5 +0\.800$", summary, re.MULTILINE)
    assert re.search(r"\n +0\.5% +0\.424 +0 of 6 +1 of 5 +0\.889\n", summary)
    page = (out_dir / "report.html").read_text()
    assert "<h2>Other false-alarm settings</h2>" in page and "<td>2% *</td><td>0.300</td>" in page


def _console_table(summary: str) -> list[dict[str, str]]:
    """The console's other-settings rows as {column: cell}, each cell read right-aligned under its heading."""
    header, *rows = summary.split("other false_alarm_rate settings on these test photos:\n")[1].splitlines()
    ends = [header.index(name) + len(name) for name in OPERATING_POINT_COLUMNS]
    for row in rows:
        assert len(row) == len(header) and all(row[end - 1] != " " for end in ends), f"\n{header}\n{row}"
    return [{name: row[start:end].strip() for name, start, end in zip(OPERATING_POINT_COLUMNS, [0, *ends], ends)}
            for row in rows]


def test_each_column_of_the_other_settings_table_sits_under_its_heading(report: tuple[dict, Path, FakeModel]) -> None:
    """Read by heading, as a user reads it: false alarms are of the 6 healthy photos, escapes of the 5 defective."""
    metrics, out_dir, _ = report
    table = re.search(r"<h2>Other false-alarm settings</h2>.*?</table>", (out_dir / "report.html").read_text(), re.S)
    headings = re.findall(r"<th>([^<]*)</th>", table.group(0))
    page_rows = [dict(zip(headings, re.findall(r"<td>([^<]*)</td>", row), strict=True))
                 for row in re.findall(r"<tr><td>.*?</tr>", table.group(0))]
    for rows in (_console_table(format_summary(metrics)), page_rows):
        assert [row["false_alarm_rate"] for row in rows] == ["0.5%", "1%", "2% *", "5%", "10%"]
        assert all(row["false alarms"].endswith(" of 6") and row["escapes"].endswith(" of 5") for row in rows)
        assert (rows[2]["threshold"], rows[2]["F1"]) == ("0.300", "0.800")


def test_a_models_own_rate_outside_the_compared_ones_is_added_and_marked(tmp_path: Path) -> None:
    model = FakeModel()
    model.config = model.config.replace(false_alarm_rate=0.03)
    metrics = evaluate(model, make_dataset(tmp_path / "data"), tmp_path / "out", quiet=True, eval_size=32)
    assert [point["false_alarm_rate"] for point in metrics["operating_points"]] == [0.005, 0.01, 0.02, 0.03, 0.05, 0.1]
    assert _console_table(format_summary(metrics))[3]["false_alarm_rate"] == "3% *"


def test_without_defective_photos_the_other_settings_give_no_f1(tmp_path: Path) -> None:
    """Healthy photos alone: what each setting catches is unknown (n/a), not nothing (0.000)."""
    data = make_dataset(tmp_path / "data")
    for kind in ("scratch", "hole"):
        shutil.rmtree(data / "test" / kind)
    metrics = evaluate(FakeModel(), data, tmp_path / "out", quiet=True, eval_size=32)
    rows = _console_table(format_summary(metrics))
    assert len(rows) == 5 and all(row["F1"] == "n/a" and row["escapes"] == "0 of 0" for row in rows)


def test_pixel_metrics_match_direct_computation(report: tuple[dict, Path, FakeModel]) -> None:
    """Pixel AUROC and AUPRO (to FPR 0.3) of the same maps and masks at the evaluation size, healthy photos included."""
    metrics, out_dir, _ = report
    maps, regions = [], []
    for path in sorted((out_dir.parent / "data" / "test").glob("*/[0-8]*.png")):
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        (prediction,) = FakeModel().predict([image])
        mask_file = out_dir.parent / "data" / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        mask = cv2.imread(str(mask_file), cv2.IMREAD_GRAYSCALE) > 0 if mask_file.is_file() else None
        small_map, small_regions = downsample_for_eval(prediction.anomaly_map, mask, eval_size=64)
        maps.append(small_map)
        regions.append(small_regions)
    assert metrics["aupro_max_fpr"] == 0.3 and metrics["n_pixel_eval_images"] == 11
    assert metrics["pixel_auroc"] == pytest.approx(pixel_roc(maps, regions)[0])
    assert metrics["aupro"] == pytest.approx(aupro(maps, regions, max_fpr=0.3))


def test_the_figures_at_the_threshold_follow_the_models_threshold(tmp_path: Path) -> None:
    """Moved to 0.5, the threshold passes the healthy photo with the faint speck (score 0.34) and still
    misses the faint hole (0.15); the other healthy photos score 0.10, the other defects 0.69 to 0.90."""
    model = FakeModel()
    model.threshold = 0.5
    metrics = evaluate(model, make_dataset(tmp_path / "data"), tmp_path / "out", quiet=True, eval_size=32,
                       fit_seconds=12.5)
    assert metrics["threshold"] == 0.5 and metrics["fit_seconds"] == 12.5
    assert (metrics["false_alarms"], metrics["escapes"]) == (0, 1)
    assert metrics["recall_per_defect"] == {"hole": 0.5, "scratch": 1.0}
    assert metrics["image_f1_at_threshold"] == pytest.approx(8 / 9)  # 4 found, none wrongly: 2*4 / (2*4 + 1)


def _table_row(page: str, name: str) -> str:
    """The value cell of a row of the report's metrics table."""
    found = re.search(rf"<tr><th>{re.escape(name)}</th><td>([^<]*)</td>", page)
    assert found, name
    return found.group(1)


def test_the_report_table_gives_counts_rates_intervals_and_recall(report: tuple[dict, Path, FakeModel]) -> None:
    page = (report[1] / "report.html").read_text()

    def rate(hits: int, trials: int) -> str:
        low, high = wilson_interval(hits, trials)
        return f"{hits} of {trials} ({hits / trials:.1%}, 95 % interval {low:.1%}–{high:.1%})"

    assert _table_row(page, "False alarms at threshold") == rate(1, 6)  # the faint speck on a healthy photo
    assert _table_row(page, "Escapes at threshold") == rate(1, 5)  # the faint hole
    assert _table_row(page, "Recall hole") == "50.0%" and _table_row(page, "Recall scratch") == "100.0%"


def test_report_says_how_the_model_was_set_up(report: tuple[dict, Path, FakeModel]) -> None:
    metrics, out_dir, _ = report
    assert metrics["preprocessing_decisions"] == ["rotation off (a test decision)"]
    assert metrics["calibration_warnings"] == ["only six photos"]
    page = (out_dir / "report.html").read_text()
    setup = page.split("How this model was set up", 1)[1].split("</ul>", 1)[0]
    assert "rotation off (a test decision)" in setup and "six healthy photos" in setup and "only six photos" in setup
    assert metrics["calibration"]["left_out"] == ["train/good/odd.png"]
    assert "left out of the fit as unlike the rest: train/good/odd.png" in setup
    assert metrics["promised_false_alarm_rate"] == 0.02 and "the threshold promises at most 2.0%" in page


def test_the_healthy_statistics_have_one_name_everywhere(report: tuple[dict, Path, FakeModel]) -> None:
    """Median, robust spread and sigma, in the report, metrics.json and inference.py --help alike."""
    metrics, out_dir, model = report
    assert metrics["calibration_median"] == pytest.approx(np.median(model.calibration_scores))
    assert metrics["calibration_spread"] == pytest.approx(model.calibration_std)
    assert not any("mean" in key or "std" in key for key in metrics)
    page = (out_dir / "report.html").read_text()
    assert "median / robust spread" in page and "μ" not in page
    help_text = subprocess.run([sys.executable, "inference.py", "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=120).stdout
    assert "median" in help_text and "robust spread" in " ".join(help_text.split()) and "mean" not in help_text


def test_predicts_in_batches(report: tuple[dict, Path, FakeModel]) -> None:
    _, _, model = report
    assert sum(model.batch_sizes) == 11 and max(model.batch_sizes) <= model.config.batch_size


def test_html_is_self_contained(report: tuple[dict, Path, FakeModel]) -> None:
    page = (report[1] / "report.html").read_text()
    sources = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert sources and all(src.startswith("data:image/") for src in sources)
    assert page.count('class="card ') == 11
    for outcome in ("TP", "TN", "FP", "FN"):
        assert f'data-outcome="{outcome}"' in page
    assert "999.png" in page  # the unreadable file is reported
    assert "oracle" in page
    cards = re.findall(r'<figure class="card[^>]*>.*?<b>([\d.]+)</b>', page)
    assert [float(s) for s in cards] == sorted((float(s) for s in cards), reverse=True)


def test_warning_names_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    evaluate(FakeModel(), make_dataset(tmp_path / "data", with_masks=False), tmp_path / "out", quiet=False)
    err = capsys.readouterr().err
    assert re.search(r"warning: .*999\.png", err)
    assert "evaluating" in err  # the progress bar
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["aupro"] is None and metrics["pixel_auroc"] is None
    assert metrics["image_auroc"] is not None


def test_a_mask_of_another_size_is_left_out_of_pixel_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_dataset(tmp_path / "data")
    wrong = data / "ground_truth" / "scratch" / "001_mask.png"
    _write(wrong, cv2.resize(cv2.imread(str(wrong), cv2.IMREAD_GRAYSCALE), (SIZE // 2, SIZE)))
    metrics = evaluate(FakeModel(), data, tmp_path / "out", quiet=True, eval_size=64)
    assert re.search(r"warning: .*001_mask\.png: mask is 48x96 but its photo .*001\.png is 96x96", capsys.readouterr().err)
    assert metrics["n_pixel_eval_images"] == 11 - 1  # all 11 readable photos but the one with the wrong mask
    assert metrics["n_test"] == 11  # the photo still counts for the image metrics


def test_no_test_images(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no test images"):
        evaluate(FakeModel(), tmp_path, tmp_path / "out", quiet=True)


def test_format_summary(report: tuple[dict, Path, FakeModel]) -> None:
    summary = format_summary(report[0])
    assert "image AUROC" in summary and "oracle" in summary and "AUPRO" in summary
    assert "AUROC scratch" in summary and "1 skipped" in summary
    # the console gives what metrics.json and the report give: count, rate, Wilson interval, recall per kind
    metrics = report[0]
    low, high = metrics["false_alarm_rate_interval"]
    assert re.search(rf"false alarms @ threshold +1 of 6 \(16.7%, 95 % interval {low:.1%}–{high:.1%}\)\n", summary)
    assert re.search(r"escapes @ threshold +1 of 5 \(20.0%, ", summary)
    for kind, recall in metrics["recall_per_defect"].items():
        assert re.search(rf"\n  recall {kind} +{recall:.1%}\n", summary)
    other = format_summary({**metrics, "false_alarms": 2, "escapes": 3})  # each count on its own line
    assert re.search(r"false alarms @ threshold +2 of 6 ", other) and re.search(r"escapes @ threshold +3 of 5 ", other)
    assert "n/a" in format_summary({**report[0], "aupro": None, "fit_seconds": None})


def _chromium(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed: `make browser` installs it (apt-get, needs root)")
def test_report_renders_in_chromium(report: tuple[dict, Path, FakeModel], tmp_path: Path) -> None:
    page = (report[1] / "report.html").resolve()
    result = _chromium("--virtual-time-budget=10000", "--dump-dom", page.as_uri(), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    root = re.search(r"<html[^>]*>", result.stdout)
    assert root, result.stdout[:500]
    attributes = dict(re.findall(r'data-([\w-]+)="([^"]*)"', root.group(0)))
    assert attributes.get("errors") == "0", result.stderr[-2000:]
    assert int(attributes["images-total"]) >= 11 + 4  # cards + plots
    assert attributes["images-loaded"] == attributes["images-total"]
    screenshot = tmp_path / "report.png"
    result = _chromium(f"--screenshot={screenshot}", "--window-size=1280,2400", page.as_uri(), tmp_path=tmp_path)
    assert result.returncode == 0 and screenshot.stat().st_size > 10_000


@pytest.fixture(scope="module")
def batch_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The page for photos without labels, over the same folder (its labels unused)."""
    from evaluation.gallery import scored_image, write_batch_report
    from preprocessing.io import find_images
    from inspection.scoring import folder_photos, score_files

    root = tmp_path_factory.mktemp("batch")
    test_dir = make_dataset(root / "data") / "test"
    model = FakeModel()
    records, gallery = [], []
    for scored in score_files(model, folder_photos(test_dir, find_images(test_dir))):
        records.append(scored.record)
        if scored.prediction is not None:
            gallery.append(scored_image(scored.photo.name, scored.image, scored.prediction))
    return write_batch_report(model, test_dir, gallery, records, root / "out" / "batch_report.html")


def test_batch_page_shows_verdicts_without_metrics(batch_page: Path) -> None:
    page = batch_page.read_text()
    outcomes = re.findall(r'<figure class="card (\w+)"', page)
    assert len(outcomes) == 11 and set(outcomes) == {"ANOMALOUS", "OK"}
    assert "<th>Unreadable</th><td>1</td>" in page and "999.png" in page
    assert "six healthy photos" in page  # where the threshold came from
    assert "AUROC" not in page and "Magenta" not in page  # nothing that needs labels
    sources = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert sources and all(src.startswith("data:image/") for src in sources)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed: `make browser` installs it (apt-get, needs root)")
def test_batch_page_renders_in_chromium(batch_page: Path, tmp_path: Path) -> None:
    result = _chromium("--virtual-time-budget=10000", "--dump-dom", batch_page.resolve().as_uri(), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    attributes = dict(re.findall(r'data-([\w-]+)="([^"]*)"', re.search(r"<html[^>]*>", result.stdout).group(0)))
    assert attributes.get("errors") == "0" and attributes["images-loaded"] == attributes["images-total"]
    assert int(attributes["images-total"]) == 11 + 1  # cards + colour bar


def test_the_report_and_the_summary_list_the_model_updates(report: tuple[dict, Path, FakeModel]) -> None:
    from evaluation.report import _setup_section

    update = {"time": "2026-01-02T03:04:05+0000", "photos": 2, "source": "POST /feedback", "refused": [],
              "forced": [], "threshold_before": 1.0, "threshold_after": 1.25, "bank_before": 10, "bank_after": 12}
    metrics = {**report[0], "updates": [update]}
    line = "update 1 (2026-01-02T03:04:05+0000): added 2 photos confirmed good from POST /feedback"
    assert line in format_summary(metrics) and line in _setup_section(metrics)
    assert "update 1" not in format_summary(report[0])


def _gallery_items(model: FakeModel, names: list[str], strengths: list[int]) -> list:
    """Scored gallery items of grey discs with red spots of the given strengths (0: healthy)."""
    from evaluation.gallery import scored_image

    rng = np.random.default_rng(3)
    images = [_photo(rng, (48, 48, 6, strength) if strength else None)[0] for strength in strengths]
    return [scored_image(name, image, prediction)
            for name, image, prediction in zip(names, images, model.predict(images))]


def test_the_gallery_lists_photos_highest_score_first_with_score_over_threshold() -> None:
    from evaluation.gallery import VERDICTS, gallery

    model = FakeModel()
    items = _gallery_items(model, ["a.png", "b.png", "c.png", "d.png"], [40, 0, 200, 100])
    page = gallery("photos", items, VERDICTS, model.threshold, model.calibration_median)
    cards = re.findall(r"<b>([\d.]+)</b> \(([\d.]+) × threshold\) (\w+)</div><div class=\"name\">([^<]*)<", page)
    scores = [float(score) for score, *_ in cards]
    assert scores == sorted(scores, reverse=True) and len(cards) == 4
    for score, ratio, verdict, _ in cards:
        assert float(ratio) == pytest.approx(float(score) / model.threshold, abs=2e-3)
        assert verdict == ("ANOMALOUS" if float(score) > model.threshold else "OK")


def test_a_photo_name_is_shown_as_text_never_run_as_markup() -> None:
    from evaluation.gallery import VERDICTS, gallery

    model = FakeModel()
    name = '<img src=x onerror="alert(1)">.png'
    page = gallery("photos", _gallery_items(model, [name], [0]), VERDICTS, model.threshold, None)
    assert name not in page and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;.png" in page


def test_a_healthy_card_shows_its_photo_uncoloured_on_the_models_scale() -> None:
    """With the model's scale (from the healthy median), a map at that median adds no colour to the thumbnail."""
    from evaluation.gallery import VERDICTS, gallery, jpeg_uri

    model = FakeModel()
    (item,) = _gallery_items(model, ["calm.png"], [0])
    item.eval_map = np.full_like(item.eval_map, model.calibration_median)
    item.highlight = np.zeros_like(item.highlight)
    page = gallery("photos", [item], VERDICTS, model.threshold, model.calibration_median)
    assert jpeg_uri(item.thumbnail) in page


def test_the_timeline_colours_only_scores_above_the_threshold_as_flagged() -> None:
    from evaluation.gallery import score_timeline_svg

    svg = score_timeline_svg([0.2, 0.3, 0.31, 0.25], threshold=0.3, healthy_limit=0.28, window=3)
    assert re.findall(r'<circle [^>]*fill="(#[0-9a-f]+)"', svg) == ["#1f77b4", "#1f77b4", "#c62828", "#1f77b4"]


def test_each_card_names_its_outcome_from_its_label_and_verdict(report: tuple[dict, Path, FakeModel]) -> None:
    """The data set holds one false alarm (a faint speck on a healthy part) and one missed defect (the faint hole)."""
    page = (report[1] / "report.html").read_text()
    names: dict[str, list[str]] = {}
    for outcome, name in re.findall(r'data-outcome="(\w+)">.*?<div class="name">([^<]*)</div>', page):
        names.setdefault(outcome, []).append(name)
    assert names["FP"] == ["good/005.png"] and names["FN"] == ["hole/001.png"]
    assert len(names["TP"]) == 4 and len(names["TN"]) == 5


def test_a_one_pixel_peak_stays_highlighted_on_the_report_thumbnail() -> None:
    """The region above the threshold is taken from the full-size map, then shrunk: the peak cannot vanish."""
    from evaluation.gallery import scored_image

    anomaly_map = np.zeros((1024, 1024), np.float32)
    anomaly_map[517, 300] = 5.0
    prediction = Prediction(5.0, 2.0, anomaly_map, True, 0.0, 0.5, [])
    item = scored_image("peak.png", np.zeros((1024, 1024, 3), np.uint8), prediction)
    assert item.highlight.sum() == 1


def test_each_figure_in_the_report_is_the_one_in_metrics_json(tmp_path: Path) -> None:
    """Every headline figure on the page is read from its own metric: none shows another's value. (Without
    one scratch photo, as with it the image AUROC and average precision happen to be equal.)"""
    data = make_dataset(tmp_path / "data")
    (data / "test" / "scratch" / "002.png").unlink()
    model = FakeModel()
    metrics = evaluate(model, data, tmp_path / "out", quiet=True, eval_size=32)
    page = (tmp_path / "out" / "report.html").read_text()
    rows = {
        "Image AUROC": metrics["image_auroc"], "Image average precision": metrics["image_ap"],
        "Image F1 at threshold": metrics["image_f1_at_threshold"], "Image F1-max (oracle)": metrics["image_f1_max"],
        "Pixel AUROC": metrics["pixel_auroc"], "AUPRO (FPR &le; 0.3)": metrics["aupro"],
        "AUROC healthy vs hole": metrics["per_defect_auroc"]["hole"],
        "AUROC healthy vs scratch": metrics["per_defect_auroc"]["scratch"], "Threshold": model.threshold,
    }
    assert len({f"{value:.4f}" for value in rows.values()}) == len(rows)  # distinct, so a swap would show
    for name, value in rows.items():
        assert _table_row(page, name) == f"{value:.4f}", name
    assert re.search(r"<tr><th>Test photos</th><td>10</td><td>6 healthy, 4 defective, 1 unreadable</td></tr>", page)
    assert re.search(r'<p class="meta">.* · threshold 0\.3000</p>', page)


def test_file_and_photo_names_in_the_report_are_shown_as_text_never_run_as_markup(tmp_path: Path) -> None:
    """An unreadable file and the training photos the setup section names are listed by name, escaped."""
    name = '<img src=x onerror="alert(1)">'
    data = make_dataset(tmp_path / "data")
    (data / "test" / "hole" / "999.png").rename(data / "test" / "hole" / f"{name}.png")
    model = FakeModel()
    model.calibration = {**model.calibration, "left_out": [f"train/good/{name}.png"],
                         "unlike_the_rest": [{"photo": f"train/good/{name}2.png", "score": 0.5}]}
    evaluate(model, data, tmp_path / "out", quiet=True, eval_size=32)
    page = (tmp_path / "out" / "report.html").read_text()
    assert name not in page
    escaped = "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;"
    setup = page.split("How this model was set up", 1)[1].split("</ul>", 1)[0]
    assert f"train/good/{escaped}.png" in setup and f"train/good/{escaped}2.png" in setup
    assert f"{escaped}.png" in page.split("Unreadable files", 1)[1].split("</ul>", 1)[0]


def test_a_test_photo_whose_name_is_not_utf8_is_in_the_report(tmp_path: Path) -> None:
    """A camera writing Latin-1 names: the worst cases drew the name in a figure, which failed on its
    undecodable byte after metrics.json was written, and no report.html came."""
    data = make_dataset(tmp_path / "data")
    renamed = (("test/good", b"005.png"), ("test/hole", b"001.png"), ("ground_truth/hole", b"001_mask.png"))
    for folder, name in renamed:  # the false alarm, and the escape with its mask
        os.rename(bytes(data / folder) + b"/" + name, bytes(data / folder) + b"/\xff" + name)
    evaluate(FakeModel(), data, tmp_path / "out", quiet=True, eval_size=32)
    page = (tmp_path / "out" / "report.html").read_bytes()
    assert b"good/\xff005.png" in page and b"hole/\xff001.png" in page


def test_a_training_photo_unlike_the_rest_is_shown_with_its_heatmap(tmp_path: Path) -> None:
    """The setup section embeds the written overlay of a training photo to check, so the page alone shows why."""
    overlay = png_bytes(np.full((8, 8, 3), 200, np.uint8))
    (tmp_path / "odd.png").write_bytes(overlay)
    model = FakeModel()
    model.calibration = {**model.calibration, "unlike_the_rest": [
        {"photo": "train/good/odd.png", "score": 0.5, "heatmap": str(tmp_path / "odd.png")}]}
    evaluate(model, make_dataset(tmp_path / "data"), tmp_path / "out", quiet=True, eval_size=32)
    setup = (tmp_path / "out" / "report.html").read_text().split("How this model was set up", 1)[1].split("</ul>", 1)[0]
    assert "check this training photo</strong>, it looks unlike the rest: train/good/odd.png (held-out score 0.500)" in setup
    assert f'src="data:image/png;base64,{base64.b64encode(overlay).decode()}"' in setup


def _drawn(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple]:
    """The arguments of every call to the report's figure function ``name``, which still draws."""
    import evaluation.report

    calls: list[tuple] = []
    draw = getattr(evaluation.report, name)
    monkeypatch.setattr(evaluation.report, name, lambda *args, **kwargs: calls.append(args) or draw(*args, **kwargs))
    return calls


@pytest.mark.parametrize("threshold", [0.05, 0.8], ids=["six false alarms", "three escapes"])
def test_the_worst_cases_show_the_worst_mistakes_first(threshold: float, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """False alarms highest score first, missed defects lowest first, up to six of each, every mistake counted."""
    calls = _drawn(monkeypatch, "tiles_figure")
    model = FakeModel()
    model.threshold = threshold
    metrics = evaluate(model, make_dataset(tmp_path / "data"), tmp_path / "out", quiet=True, eval_size=32)
    ((rows, *_),) = calls
    false_alarms, escapes = ([tile.caption for tile in tiles] for tiles in rows.values())
    assert len(false_alarms) == min(6, metrics["false_alarms"]) and len(escapes) == min(6, metrics["escapes"])
    assert len(false_alarms) + len(escapes) >= 3
    for captions, worst_first in ((false_alarms, True), (escapes, False)):
        scores = [float(caption.split()[1]) for caption in captions]
        assert scores == sorted(scores, reverse=worst_first), captions
    assert all(caption.startswith("FP ") for caption in false_alarms)
    assert all(caption.startswith("FN ") for caption in escapes)
    if threshold < 0.1:
        assert false_alarms[0].endswith("good/005.png")  # the faint speck scores highest
    else:
        assert escapes[0].endswith("hole/001.png")  # the faint hole scores lowest


def test_the_score_histogram_separates_healthy_from_defective_photos(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The 6 healthy scores (one false alarm at 0.34) are drawn as healthy, the 5 defective as defective."""
    calls = _drawn(monkeypatch, "score_histogram_figure")
    evaluate(FakeModel(), make_dataset(tmp_path / "data"), tmp_path / "out", quiet=True, eval_size=32)
    ((healthy, defective, threshold, *_),) = calls
    assert len(healthy) == 6 and len(defective) == 5 and threshold == 0.3
    assert sorted(healthy)[-1] == pytest.approx(0.34, abs=0.01) and max(healthy) < max(defective)


def test_a_healthy_photo_in_the_report_shows_uncoloured_on_the_models_scale(report: tuple[dict, Path, FakeModel]) -> None:
    """The report's heatmaps start at the healthy median: a healthy part below it keeps its own colours."""
    from evaluation.gallery import THUMB_SIZE, jpeg_uri

    image = cv2.cvtColor(cv2.imread(str(report[1].parent / "data" / "test" / "good" / "000.png")), cv2.COLOR_BGR2RGB)
    thumbnail = cv2.resize(image, (THUMB_SIZE, THUMB_SIZE), interpolation=cv2.INTER_AREA)
    assert jpeg_uri(thumbnail) in (report[1] / "report.html").read_text()


def assert_replaced_whole(paths: list[Path], write: Callable[[], object]) -> None:
    """``write`` replaces each file whole, never rewrites it in place: a reader of the previous file (a
    browser loading the page, a crash or full disk mid-write) sees it complete, never half a file."""
    before = {path: path.read_bytes() for path in paths}
    handles = {path: path.open("rb") for path in paths}
    try:
        write()
        for path, handle in handles.items():
            assert handle.read() == before[path], f"{path.name} was rewritten in place"
            assert path.read_bytes() != before[path], f"{path.name} was not replaced"
    finally:
        for handle in handles.values():
            handle.close()


def test_a_new_evaluation_replaces_the_metrics_and_report_whole(tmp_path: Path) -> None:
    data, out = make_dataset(tmp_path / "data"), tmp_path / "out"
    evaluate(FakeModel(), data, out, quiet=True, eval_size=32)
    model = FakeModel()
    model.threshold = 0.5
    assert_replaced_whole([out / "metrics.json", out / "report.html"],
                          lambda: evaluate(model, data, out, quiet=True, eval_size=32))


def _picture(data: str) -> np.ndarray:
    """An embedded base64 picture as the browser shows it (RGB)."""
    encoded = np.frombuffer(base64.b64decode(data), np.uint8)
    return cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _card_pictures(page: str) -> dict[str, np.ndarray]:
    """Each card's picture, by the photo name under it."""
    cards = re.findall(r'<img src="data:image/jpeg;base64,([^"]+)"[^>]*>.*?<div class="name">([^<]*)</div>', page)
    return {name: _picture(data) for data, name in cards}


def test_a_card_shows_the_heatmap_on_the_defect_of_the_original_photo() -> None:
    """A wide photo with a red defect up and to the right: the card keeps the photo's shape and colours, and
    the heatmap and contour sit on the defect, not mirrored or transposed."""
    from evaluation.gallery import VERDICTS, gallery, scored_image

    model = FakeModel()
    image = np.full((96, 192, 3), 150, np.uint8)
    cv2.circle(image, (150, 30), 8, (255, 50, 50), -1)
    (prediction,) = model.predict([image])
    item = scored_image("wide.png", image, prediction)
    card = _card_pictures(gallery("photos", [item], VERDICTS, model.threshold, model.calibration_median))["wide.png"]
    assert card.shape[:2] == (112, 224)  # 96 x 192 with the longer side at 224
    changed = np.abs(card.astype(int) - cv2.resize(image, (224, 112), interpolation=cv2.INTER_AREA)).sum(-1) > 60
    rows, columns = np.nonzero(changed)
    assert changed.any() and abs(columns.mean() - 175) < 8 and abs(rows.mean() - 35) < 8  # (150, 30) x 224/192
    red, _, blue = card[35, 175].astype(int)
    assert red > blue + 80  # a red defect under a hot heatmap stays red


def test_each_outcome_is_named_and_coloured_for_what_it_means(report: tuple[dict, Path, FakeModel]) -> None:
    """The badges say what each outcome means, and a missed defect, a false alarm, a found defect and a
    healthy pass each have their own colour."""
    page = (report[1] / "report.html").read_text()
    badges = dict(re.findall(r'<span class="badge (\w+)">\1 · ([^<]*)</span>', page))
    assert badges == {"FN": "missed defect", "FP": "false alarm", "TP": "defect found", "TN": "healthy, passed"}
    colours = dict(re.findall(r"\.badge\.(\w+) \{ background: (#\w+); \}", page))
    assert len({colours[outcome] for outcome in badges}) == 4


def test_defective_cards_outline_the_ground_truth_in_magenta(report: tuple[dict, Path, FakeModel]) -> None:
    """As the page's legend says: every defective photo with a mask has a magenta contour, no healthy one does."""
    for name, picture in _card_pictures((report[1] / "report.html").read_text()).items():
        red, green, blue = np.moveaxis(picture.astype(int), -1, 0)
        magenta = np.minimum(red, blue) - green > 80  # the thin contour, blurred by JPEG
        assert magenta.any() == (not name.startswith("good/")), name


def test_the_colour_scale_above_the_cards_is_the_one_they_are_drawn_on() -> None:
    """The legend runs from the healthy median, as the cards' heatmaps do, not from zero."""
    from evaluation.gallery import VERDICTS, gallery

    model = FakeModel()
    page = gallery("photos", _gallery_items(model, ["a.png"], [0]), VERDICTS, model.threshold, model.calibration_median)
    legend = re.search(r'<img class="plot" src="data:image/png;base64,([^"]+)" alt="heatmap colour scale">', page)
    assert np.array_equal(_picture(legend.group(1)), colour_scale_image(model.threshold, vmin=model.calibration_median))


def test_a_one_pixel_peak_is_ringed_on_its_card() -> None:
    """The card draws the region found at full size: a peak lost when the map is shrunk is still ringed in white."""
    from evaluation.gallery import VERDICTS, gallery, scored_image

    anomaly_map = np.zeros((1024, 1024), np.float32)
    anomaly_map[517, 300] = 5.0
    prediction = Prediction(5.0, 2.0, anomaly_map, True, 0.0, 0.5, [])
    item = scored_image("peak.png", np.zeros((1024, 1024, 3), np.uint8), prediction)
    card = _card_pictures(gallery("photos", [item], VERDICTS, 2.0, None))["peak.png"]
    white = np.nonzero((card > 200).all(-1))
    assert white[0].size and abs(white[0].mean() - 517 * 224 / 1024) < 4 and abs(white[1].mean() - 300 * 224 / 1024) < 4


def test_a_folder_or_file_name_on_the_batch_page_is_shown_as_text_never_run_as_markup(tmp_path: Path) -> None:
    from evaluation.gallery import write_batch_report

    name = '<img src=x onerror="alert(1)">'
    model = FakeModel()
    records = [{"path": "a.png", "score": 0.2}, {"path": f"{name}.png", "error": f"{name}.png: not a readable image"}]
    page = write_batch_report(model, tmp_path / name, _gallery_items(model, ["a.png"], [0]), records,
                              tmp_path / "batch_report.html").read_text()
    assert name not in page
    escaped = "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;"
    assert f"<title>Scored photos: {escaped}</title>" in page and f"<h1>Scored photos: {escaped}</h1>" in page
    assert f"<li>{escaped}.png: not a readable image</li>" in page


def test_the_batch_page_counts_what_it_shows(batch_page: Path) -> None:
    """The flagged count and the filter buttons agree with the cards; the threshold is the model's."""
    page = batch_page.read_text()
    outcomes = re.findall(r'<figure class="card (\w+)"', page)
    flagged = outcomes.count("ANOMALOUS")
    assert 0 < flagged < len(outcomes)
    assert f"<tr><th>Flagged ANOMALOUS</th><td>{flagged}</td>" in page
    assert "<tr><th>Threshold</th><td>0.3000</td>" in page
    buttons = re.findall(r'<button data-filter="(\w+)"[^>]*>[^<]*\((\d+)\)</button>', page)
    assert buttons == [("all", "11"), ("ANOMALOUS", str(flagged)), ("OK", str(len(outcomes) - flagged))]


def test_the_batch_pages_healthy_limit_is_the_drift_percentile_of_the_healthy_scores(batch_page: Path) -> None:
    """Config's drift_percentile (90) of the calibration scores: where the drift warning starts."""
    limit = np.percentile(FakeModel().calibration_scores, Config().drift_percentile)
    assert f"healthy limit {limit:.3f}</text>" in batch_page.read_text()


def test_the_timeline_draws_the_threshold_and_the_healthy_limit_at_their_scores() -> None:
    """A photo scoring exactly the threshold (or the limit) sits on that line."""
    from evaluation.gallery import score_timeline_svg

    svg = score_timeline_svg([0.2, 0.3, 0.28, 0.25], threshold=0.3, healthy_limit=0.28, window=3)
    dots = [float(y) for y in re.findall(r'<circle [^>]*cy="([\d.]+)"', svg)]
    lines = dict(re.findall(r'<line [^>]*y1="([\d.]+)"[^>]*>.*?>(threshold|healthy limit) [\d.]+</text>', svg))
    assert {label: float(y) for y, label in lines.items()} == {"threshold": dots[1], "healthy limit": dots[2]}


def test_a_new_batch_page_replaces_the_previous_one_whole(tmp_path: Path) -> None:
    from evaluation.gallery import write_batch_report

    model = FakeModel()
    path = tmp_path / "batch_report.html"
    write_batch_report(model, tmp_path, _gallery_items(model, ["a.png"], [0]), [], path)
    assert_replaced_whole([path], lambda: write_batch_report(model, tmp_path, _gallery_items(model, ["b.png"], [200]),
                                                             [], path))
