"""Score a test set, compute every metric, and write metrics.json plus one self-contained report.html.

The page's shared parts (thumbnails, galleries, the page frame) are in evaluation/gallery.py.

Memory stays bounded on large test sets (160 photos of 1024²): photos are read and scored in
batches, and right after prediction each full-size map is reduced to the evaluation size and each
photo to a small thumbnail; nothing full-size outlives its batch.
"""

from __future__ import annotations

import html
import json
import math
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve
from tqdm import tqdm

from config import printable
from evaluation.maps import DEFAULT_EVAL_SIZE
from evaluation.metrics import (
    DEFAULT_MAX_FPR,
    area_under_pro,
    downsample_for_eval,
    image_metrics,
    operating_points,
    per_defect_auroc,
    pixel_roc,
    pro_curve,
    rates_at_threshold,
)
from evaluation.gallery import (
    LABELLED_OUTCOMES,
    Model,
    ScoredImage,
    calibration_stats,
    data_uri,
    gallery,
    number,
    page,
    png_img,
    scored_image,
    update_lines,
)
from evaluation.mvtec import LabelledImage, load_test_split
from evaluation.visualize import Tile, figure_bytes, pro_figure, roc_figure, score_histogram_figure, tiles_figure
from inspection.scoring import Photo, score_batch
from models.calibration import promise
from output_files import write_atomically
from preprocessing.io import ImageReadError, read_mask

WORST_CASES = 6  # false positives / negatives shown in the grid
F1_MAX_NOTE = "oracle: its threshold is chosen on the test labels, so production cannot reach it"
COMPARED_RATES = (0.005, 0.01, 0.02, 0.05, 0.1)  # false_alarm_rate settings set side by side, the model's own added
OPERATING_POINT_COLUMNS = ("false_alarm_rate", "threshold", "false alarms", "escapes", "F1")
OPERATING_POINTS_NOTE = (
    "What a stricter or looser promise would cost on these photos. Each threshold is the one the model's healthy "
    "scores give that false_alarm_rate (a fit with --false-alarm-rate R sets it); * marks the model's own. A few "
    "dozen healthy test photos cannot confirm a rate of 1 in 100: the promise rests on the training photos"
)


def evaluate(
    model: Model,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    fit_seconds: float | None = None,
    eval_size: int = DEFAULT_EVAL_SIZE,
    quiet: bool = False,
) -> dict[str, Any]:
    """Score every photo under ``data_dir/test``, write metrics.json and report.html, return the metrics.

    ``fit_seconds`` overrides ``model.fit_seconds`` (e.g. to include data loading). Unreadable
    photos or masks are reported on stderr and in the report, and the rest are still evaluated.
    """
    if eval_size < 8:
        raise ValueError(f"eval_size must be at least 8 pixels, got {eval_size}")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    samples = load_test_split(data_dir)
    if not samples:
        raise FileNotFoundError(f"{data_dir}: no test images (expected {data_dir / 'test'}/<kind>/*.png)")
    scored, skipped = _score(model, samples, eval_size, quiet)
    if not scored:
        raise ValueError(f"{data_dir}: none of the {len(samples)} test images could be read")
    metrics, curves = _metrics(model, scored, skipped, fit_seconds, eval_size)
    write_atomically(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    write_atomically(out_dir / "report.html", _html(model, data_dir, scored, metrics, curves))
    return metrics


def _warn(message: str) -> None:
    tqdm.write(printable(f"warning: {message}"), file=sys.stderr)


def _score(
    model: Model, samples: list[LabelledImage], eval_size: int, quiet: bool
) -> tuple[list[ScoredImage], list[dict[str, str]]]:
    """Score in batches through the one scoring path, keeping only evaluation-size maps and thumbnails."""
    scored: list[ScoredImage] = []
    skipped: list[dict[str, str]] = []
    batch_size = max(1, int(model.config.batch_size))
    with tqdm(total=len(samples), desc="evaluating", unit="img", disable=quiet) as bar:
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            photos = [Photo(f"{sample.kind}/{sample.path.name}", sample.path) for sample in batch]
            for sample, result in zip(batch, score_batch(model, photos)):
                reason = result.record.get("error")
                try:
                    limit = model.config.max_image_pixels
                    mask = read_mask(sample.mask_path, limit) if reason is None and sample.mask_path else None
                except ImageReadError as error:
                    reason = str(error)
                if reason is not None:
                    _warn(f"skipped: {reason}")
                    skipped.append({"path": str(sample.path), "reason": reason})
                    continue
                mask = _mask_fitting(sample, result.image, mask)
                known = not sample.is_defective or mask is not None  # a healthy photo's truth is "no defect"
                regions = downsample_for_eval(result.prediction.anomaly_map, mask, eval_size)[1] if known else None
                scored.append(scored_image(result.photo.name, result.image, result.prediction,
                                           sample=sample, regions=regions, eval_size=eval_size))
            bar.update(len(batch))
    return scored, skipped


def _mask_fitting(sample: LabelledImage, image: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    """The mask when it has its photo's size; otherwise a warning and None, so the photo stays out of
    pixel metrics (stretching a mask of another size would score the wrong pixels)."""
    if mask is None or mask.shape == image.shape[:2]:
        return mask
    _warn(
        f"{sample.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its photo {sample.path} is "
        f"{image.shape[1]}x{image.shape[0]}; that photo is left out of the pixel metrics"
    )
    return None


def _calibration_statement(model: Model) -> dict[str, Any]:
    """The threshold's promise, its interval and the training photos listed as unlike the rest."""
    calibration = model.calibration
    return {
        "promise": promise(calibration),
        "false_alarms_per_1000": calibration.get("false_alarms_per_1000"),
        "interval_per_1000": calibration.get("interval_per_1000"),
        "count": calibration.get("count"),
        "rule": calibration.get("rule"),
        "unlike_the_rest": list(calibration.get("unlike_the_rest", [])),
        "left_out": list(calibration.get("left_out", [])),
    }


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN: unknown numbers become null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _metrics(
    model: Model,
    scored: list[ScoredImage],
    skipped: list[dict[str, str]],
    fit_seconds: float | None,
    eval_size: int,
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The metrics dictionary, and the curves the plots need (not stored in metrics.json)."""
    labels = np.array([s.sample.is_defective for s in scored])
    scores = np.array([s.score for s in scored])
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    metrics: dict[str, Any] = image_metrics(labels, scores, model.threshold)
    kinds = [s.sample.kind for s in scored]
    metrics.update(rates_at_threshold(kinds, scores, model.threshold))
    rates = sorted({*COMPARED_RATES, model.config.false_alarm_rate})
    metrics["operating_points"] = operating_points(kinds, scores, {rate: model.threshold_for(rate) for rate in rates})
    if metrics["image_auroc"] is not None:
        curves["image_roc"] = tuple(roc_curve(labels, scores)[:2])
    with_truth = [s for s in scored if s.eval_regions is not None]
    maps = [s.eval_map for s in with_truth]
    regions = [s.eval_regions for s in with_truth]
    roc = pixel_roc(maps, regions) if with_truth else None
    pro = pro_curve(maps, regions) if with_truth else None
    if roc is not None:
        curves["pixel_roc"] = roc[1:]
    if pro is not None:
        curves["pro"] = pro
    median, spread = calibration_stats(model)
    metrics.update(
        pixel_auroc=None if roc is None else roc[0],
        aupro=None if pro is None else area_under_pro(*pro, DEFAULT_MAX_FPR),
        aupro_max_fpr=DEFAULT_MAX_FPR,
        per_defect_auroc=per_defect_auroc([s.sample.kind for s in scored], scores),
        threshold=model.threshold,
        promised_false_alarm_rate=model.config.false_alarm_rate,
        calibration=_calibration_statement(model),
        calibration_median=median,
        calibration_spread=spread,
        calibration_method=model.calibration_method,
        calibration_warnings=list(model.calibration.get("warnings", [])),
        preprocessing=model.config.preprocess,
        preprocessing_decisions=list(model.preprocessing.get("reasons", [])),
        n_train=int(model.n_train),
        updates=list(getattr(model, "updates", [])),
        n_test=len(scored),
        n_test_good=int((~labels).sum()),
        n_test_defective=int(labels.sum()),
        n_pixel_eval_images=len(with_truth),
        n_skipped=len(skipped),
        skipped=skipped,
        fit_seconds=model.fit_seconds if fit_seconds is None else fit_seconds,
        backbone=model.config.backbone,
        seed=model.config.seed,
        eval_size=eval_size,
        notes={"image_f1_max": F1_MAX_NOTE},
    )
    return {key: _finite_or_none(value) for key, value in metrics.items()}, curves


def _setup_section(metrics: dict[str, Any]) -> str:
    """How the model was set up: the preprocessing decisions and the calibration, with any warning."""
    items = [f"preprocessing: {html.escape(reason)}" for reason in metrics["preprocessing_decisions"]]
    if not items:
        items.append(f"preprocessing: {html.escape(str(metrics['preprocessing']))} (set, not decided)")
    items.append(f"calibration: {html.escape(metrics['calibration']['promise'])}")
    items += [f"<strong>warning:</strong> {html.escape(w)}" for w in metrics["calibration_warnings"]]
    items += [
        f"<strong>check this training photo</strong>, it looks unlike the rest: {html.escape(entry['photo'])} "
        f"(held-out score {entry['score']:.3f}){_heatmap_image(entry.get('heatmap'))}"
        for entry in metrics["calibration"]["unlike_the_rest"]
    ]
    items += [f"left out of the fit as unlike the rest: {html.escape(photo)}"
              for photo in metrics["calibration"]["left_out"]]
    items += [html.escape(line) for line in update_lines(metrics.get("updates", []))]
    return "<h2>How this model was set up</h2>\n<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def _operating_points_table(metrics: dict[str, Any]) -> str:
    """The compared false_alarm_rate settings as a table, with what each would do on these photos."""
    cells = _operating_point_cells(metrics)
    if not cells:
        return ""
    header = "".join(f"<th>{name}</th>" for name in OPERATING_POINT_COLUMNS)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in cells)
    return (f"<h2>Other false-alarm settings</h2>\n<p>{html.escape(OPERATING_POINTS_NOTE)}.</p>\n"
            f'<table class="grid">\n<tr>{header}</tr>\n{rows}\n</table>')


def _heatmap_image(path: str | None) -> str:
    """A written overlay embedded in the page (the report stays one self-contained file), or nothing."""
    if not path or not Path(path).is_file():
        return ""
    return f'<br><img class="plot" src="{data_uri(Path(path).read_bytes(), "image/png")}" alt="{html.escape(path)}">'


def _count_and_rate(metrics: dict[str, Any], count: str, total: str) -> str:
    """'2 of 27 (7.4 %, 95 % interval 2.1–23.4 %)' for a count at the threshold."""
    if not metrics[total]:
        return "n/a"
    rate_key = count[:-1] + "_rate" if count.endswith("s") else count
    low, high = metrics[f"{rate_key}_interval"]
    return f"{metrics[count]} of {metrics[total]} ({metrics[rate_key]:.1%}, 95 % interval {low:.1%}–{high:.1%})"


def format_summary(metrics: dict[str, Any]) -> str:
    """A compact console table of the headline metrics."""
    rows = [
        ("image AUROC", number(metrics.get("image_auroc"))),
        ("image AP", number(metrics.get("image_ap"))),
        (f"image F1 @ threshold {number(metrics.get('threshold'))}", number(metrics.get("image_f1_at_threshold"))),
        (f"image F1-max (oracle, t={number(metrics.get('image_f1_max_threshold'))})",
         number(metrics.get("image_f1_max"))),
        ("pixel AUROC", number(metrics.get("pixel_auroc"))),
        (f"AUPRO (FPR <= {metrics.get('aupro_max_fpr', DEFAULT_MAX_FPR):g})", number(metrics.get("aupro"))),
        *((f"  AUROC {kind}", number(value)) for kind, value in metrics.get("per_defect_auroc", {}).items()),
        ("false alarms @ threshold", _count_and_rate(metrics, "false_alarms", "n_test_good")),
        ("escapes @ threshold", _count_and_rate(metrics, "escapes", "n_test_defective")),
        *((f"  recall {kind}", f"{value:.1%}") for kind, value in metrics.get("recall_per_defect", {}).items()),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value:>7}" for name, value in rows]
    fit = metrics.get("fit_seconds")
    lines.append(
        f"test {metrics.get('n_test')} images ({metrics.get('n_test_good')} good, "
        f"{metrics.get('n_test_defective')} defective"
        + (f", {metrics['n_skipped']} skipped" if metrics.get("n_skipped") else "")
        + f") · train {metrics.get('n_train')} · fit {'n/a' if fit is None else f'{fit:.1f} s'}"
        + f" · {metrics.get('backbone')} · pixel metrics at {metrics.get('eval_size')} px"
    )
    lines += update_lines(metrics.get("updates", []))
    lines += _operating_lines(metrics)
    return "\n".join(lines)


def _operating_point_cells(metrics: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(rate, threshold, false alarms, escapes, F1) per compared false_alarm_rate; '*' marks the model's."""
    own = metrics.get("promised_false_alarm_rate")
    return [
        (f"{100 * point['false_alarm_rate']:g}%" + (" *" if point["false_alarm_rate"] == own else ""),
         number(point["threshold"], 3),
         f"{point['false_alarms']} of {metrics['n_test_good']}",
         f"{point['escapes']} of {metrics['n_test_defective']}",
         number(point["f1"], 3))
        for point in metrics.get("operating_points", [])
    ]


def _operating_lines(metrics: dict[str, Any]) -> list[str]:
    """The compared false_alarm_rate settings as a console table, columns right-aligned."""
    cells = _operating_point_cells(metrics)
    if not cells:
        return []
    header = OPERATING_POINT_COLUMNS
    widths = [max(len(row[column]) for row in (header, *cells)) for column in range(len(header))]
    return ["other false_alarm_rate settings on these test photos:"] + [
        "  " + "  ".join(f"{cell:>{width}}" for cell, width in zip(row, widths)) for row in (header, *cells)
    ]


# ----------------------------------------------------------------------------------- HTML page
def plot(fig: Any, alt: str) -> str:
    return png_img(figure_bytes(fig), alt)


def _metric_rows(metrics: dict[str, Any]) -> str:
    rows = [
        ("Image AUROC", number(metrics["image_auroc"]), "ranking of defective above healthy photos (1 = perfect)"),
        ("Image average precision", number(metrics["image_ap"]), "area under the precision-recall curve"),
        ("Image F1 at threshold", number(metrics["image_f1_at_threshold"]),
         f"with the calibrated threshold {number(metrics['threshold'])}: what production sees"),
        ("Image F1-max (oracle)", number(metrics["image_f1_max"]),
         f"at threshold {number(metrics['image_f1_max_threshold'])}; {F1_MAX_NOTE}"),
        ("Pixel AUROC", number(metrics["pixel_auroc"]), "per-pixel ranking against the ground-truth masks"),
        (f"AUPRO (FPR &le; {metrics['aupro_max_fpr']:g})", number(metrics["aupro"]),
         "per-region overlap; every defect counts equally whatever its size"),
        *((f"AUROC healthy vs {html.escape(kind)}", number(value), "") for kind, value in
          metrics["per_defect_auroc"].items()),
        ("Threshold", number(metrics["threshold"]), html.escape(metrics["calibration"]["promise"])),
        ("False alarms at threshold", _count_and_rate(metrics, "false_alarms", "n_test_good"),
         f"healthy test photos flagged; the threshold promises at most {metrics['promised_false_alarm_rate']:.1%}"),
        ("Escapes at threshold", _count_and_rate(metrics, "escapes", "n_test_defective"),
         "defective test photos passed as OK"),
        *((f"Recall {html.escape(kind)}", f"{value:.1%}", "share of this defect kind flagged at the threshold")
          for kind, value in metrics["recall_per_defect"].items()),
        ("Healthy calibration median / robust spread",
         f"{number(metrics['calibration_median'], 3)} / {number(metrics['calibration_spread'], 3)}",
         f"one sigma is one robust spread above the median; {html.escape(metrics['calibration_method'])}"),
        ("Test photos", f"{metrics['n_test']}", f"{metrics['n_test_good']} healthy, {metrics['n_test_defective']} "
         f"defective, {metrics['n_skipped']} unreadable"),
        ("Training photos", f"{metrics['n_train']}", "used to build the memory bank"),
        ("Fit time", "n/a" if metrics["fit_seconds"] is None else f"{metrics['fit_seconds']:.1f} s", ""),
        ("Backbone / seed", f"{html.escape(str(metrics['backbone']))} / {metrics['seed']}", ""),
        ("Pixel evaluation size", f"{metrics['eval_size']} px",
         f"maps and masks resized to this longer side; {metrics['n_pixel_eval_images']} photos with known masks"),
    ]
    return "\n".join(f"<tr><th>{name}</th><td>{value}</td><td>{meaning}</td></tr>" for name, value, meaning in rows)


def _worst_cases(scored: list[ScoredImage], threshold: float, vmin: float | None) -> str:
    false_positives = sorted((s for s in scored if s.outcome == "FP"), key=lambda s: -s.score)
    false_negatives = sorted((s for s in scored if s.outcome == "FN"), key=lambda s: s.score)

    def tiles(items: list[ScoredImage]) -> list[Tile]:
        return [Tile(s.thumbnail, s.eval_map, f"{s.outcome} {s.score:.3f}\n{s.name}",
                     None if s.eval_regions is None else s.eval_regions > 0, s.highlight) for s in items[:WORST_CASES]]

    fig = tiles_figure({
        f"Worst false positives: healthy photos flagged, highest score first ({len(false_positives)} in all)":
            tiles(false_positives),
        f"Worst false negatives: defective photos passed, lowest score first ({len(false_negatives)} in all)":
            tiles(false_negatives),
    }, threshold, vmin=vmin, columns=WORST_CASES)
    return plot(fig, "worst false positives and false negatives")


def _html(
    model: Model,
    data_dir: Path,
    scored: list[ScoredImage],
    metrics: dict[str, Any],
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
) -> str:
    threshold = model.threshold
    vmin = metrics["calibration_median"]
    roc_curves = {
        name: (*curves[key], metrics[metric])
        for name, key, metric in (("image", "image_roc", "image_auroc"), ("pixel", "pixel_roc", "pixel_auroc"))
        if key in curves
    }
    plots = []
    if roc_curves:
        plots.append(plot(roc_figure(roc_curves), "ROC curves"))
    if "pro" in curves:
        plots.append(plot(pro_figure(*curves["pro"], metrics["aupro"], DEFAULT_MAX_FPR), "PRO curve"))
    plots.append(plot(score_histogram_figure(
        [s.score for s in scored if not s.sample.is_defective], [s.score for s in scored if s.sample.is_defective],
        threshold, model.calibration_scores, calibration_stats(model)), "score histogram"))
    skipped = "".join(f"<li>{html.escape(s['reason'])}</li>" for s in metrics["skipped"])
    body = f"""<h2>Metrics</h2>
<table>
{_metric_rows(metrics)}
</table>
{_operating_points_table(metrics)}
{_setup_section(metrics)}
{f'<h2>Unreadable files</h2><ul class="skipped">{skipped}</ul>' if skipped else ''}
<h2>Plots</h2>
<div class="plots">
{''.join(plots)}
</div>
<h2>Worst cases</h2>
{_worst_cases(scored, threshold, vmin)}
{gallery("All test photos, highest score first", scored, LABELLED_OUTCOMES, threshold, vmin)}"""
    meta = (f"{html.escape(str(data_dir))} · generated {datetime.now():%Y-%m-%d %H:%M} · "
            f"backbone {html.escape(str(metrics['backbone']))} · threshold {number(threshold)}")
    return page(f"Anomaly detection report: {data_dir.name}", meta, body)
