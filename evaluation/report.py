"""Score a test set, compute every metric, and write metrics.json plus one self-contained report.html.

The same page code also shows a batch of photos without labels (``write_batch_report``, behind
``inference.py --report``): thumbnails highest score first, threshold and verdicts.

Memory stays bounded on large test sets (160 photos of 1024²): photos are read and scored in
batches, and right after prediction each full-size map is reduced to the evaluation size and each
photo to a small thumbnail; nothing full-size outlives its batch.
"""

from __future__ import annotations

import base64
import html
import json
import math
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
from sklearn.metrics import roc_curve
from tqdm import tqdm

from evaluation.metrics import (
    DEFAULT_EVAL_SIZE,
    DEFAULT_MAX_FPR,
    area_under_pro,
    downsample_for_eval,
    eval_shape,
    image_metrics,
    rates_at_threshold,
    per_defect_auroc,
    pixel_roc,
    pro_curve,
)
from evaluation.visualize import (
    Tile,
    colour_bar_figure,
    figure_bytes,
    highlighted_region,
    overlay_rgb,
    pro_figure,
    region_at,
    roc_figure,
    score_histogram_figure,
    tiles_figure,
)
from evaluation.mvtec import LabelledImage, load_test_split
from models.calibration import promise
from output_files import write_atomically
from preprocessing.io import ImageReadError, read_mask
from runtime.scoring import Photo, score_batch

THUMB_SIZE = 224  # longer side of gallery thumbnails, in pixels
WORST_CASES = 6  # false positives / negatives shown in the grid
F1_MAX_NOTE = "oracle: its threshold is chosen on the test labels, so production cannot reach it"

OUTCOMES = {  # badge, meaning, colour
    "FN": ("missed defect", "#c62828"),
    "FP": ("false alarm", "#ef6c00"),
    "TP": ("defect found", "#2e7d32"),
    "TN": ("healthy, passed", "#546e7a"),
    "ANOMALOUS": ("flagged", "#c62828"),  # photos without labels: the verdict only
    "OK": ("passed", "#546e7a"),
}
LABELLED_OUTCOMES = ("FN", "FP", "TP", "TN")
VERDICTS = ("ANOMALOUS", "OK")
CONTOUR_RULE = (
    "White contour: where the anomaly map is above the threshold (small regions are ringed); the image score "
    "is the map's maximum, so every ANOMALOUS photo has one and no OK photo does."
)


class Model(Protocol):
    """What evaluation needs of a fitted model (models.patchcore.PatchCore provides it)."""

    threshold: float
    calibration_scores: np.ndarray
    calibration_method: str
    calibration: dict[str, Any]  # method, count, warnings
    preprocessing: dict[str, Any]  # what preprocess 'auto' decided and why (empty otherwise)
    calibration_mean: float
    calibration_std: float
    n_train: int
    fit_seconds: float
    config: Any

    def predict(self, images: list[np.ndarray], progress: bool = False) -> list[Any]: ...


@dataclass
class ScoredImage:
    """What is kept of one scored photo: small arrays only."""

    name: str
    score: float
    threshold: float
    flagged: bool
    warnings: list[str]
    thumbnail: np.ndarray  # RGB uint8, longer side THUMB_SIZE
    eval_map: np.ndarray  # anomaly map at the evaluation size
    highlight: np.ndarray  # the full-resolution region above the threshold, shrunk to the evaluation size
    sample: LabelledImage | None = None  # None: a photo without a label
    eval_regions: np.ndarray | None = None  # defect-region labels at the evaluation size; None = no ground truth

    @property
    def outcome(self) -> str:
        """TP / FP / TN / FN at the threshold for a labelled photo; ANOMALOUS / OK without a label."""
        if self.sample is None:
            return VERDICTS[0] if self.flagged else VERDICTS[1]
        return ("T" if self.flagged == self.sample.is_defective else "F") + ("P" if self.flagged else "N")

    @property
    def normalized_score(self) -> float:
        return self.score / self.threshold


def scored_image(
    name: str,
    image: np.ndarray,
    prediction: Any,
    *,
    sample: LabelledImage | None = None,
    mask: np.ndarray | None = None,
    eval_size: int = DEFAULT_EVAL_SIZE,
) -> ScoredImage:
    """Reduce a prediction to what a report keeps: an evaluation-size map, its highlighted region, a thumbnail."""
    eval_map, regions = downsample_for_eval(prediction.anomaly_map, mask, eval_size)
    height, width = eval_shape(image.shape, THUMB_SIZE)
    return ScoredImage(
        name=name,
        score=float(prediction.score),
        threshold=float(prediction.threshold),
        flagged=bool(prediction.is_anomalous),
        warnings=list(prediction.warnings),
        thumbnail=cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA),
        eval_map=eval_map,
        highlight=region_at(highlighted_region(prediction.anomaly_map, prediction.threshold), eval_map.shape),
        sample=sample,
        eval_regions=None if sample is None or (sample.is_defective and mask is None) else regions,
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
    tqdm.write(f"warning: {message}", file=sys.stderr)


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
                scored.append(scored_image(result.photo.name, result.image, result.prediction,
                                           sample=sample, mask=mask, eval_size=eval_size))
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


def _calibration(model: Model) -> tuple[float | None, float | None]:
    """Mean and spread of the healthy calibration scores (the ones the model's sigma uses), None when it has none."""
    if len(model.calibration_scores) == 0:
        return None, None
    return model.calibration_mean, model.calibration_std


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
    metrics.update(rates_at_threshold([s.sample.kind for s in scored], scores, model.threshold))
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
    mean, std = _calibration(model)
    metrics.update(
        pixel_auroc=None if roc is None else roc[0],
        aupro=None if pro is None else area_under_pro(*pro, DEFAULT_MAX_FPR),
        aupro_max_fpr=DEFAULT_MAX_FPR,
        per_defect_auroc=per_defect_auroc([s.sample.kind for s in scored], scores),
        threshold=model.threshold,
        promised_false_alarm_rate=model.config.false_alarm_rate,
        calibration=_calibration_statement(model),
        calibration_mean=mean,
        calibration_std=std,
        calibration_method=model.calibration_method,
        calibration_warnings=list(model.calibration.get("warnings", [])),
        preprocessing=model.config.preprocess,
        preprocessing_decisions=list(model.preprocessing.get("reasons", [])),
        n_train=int(model.n_train),
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
    return "<h2>How this model was set up</h2>\n<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def _heatmap_image(path: str | None) -> str:
    """A written overlay embedded in the page (the report stays one self-contained file), or nothing."""
    if not path or not Path(path).is_file():
        return ""
    return f'<br><img class="plot" src="{_data_uri(Path(path).read_bytes(), "image/png")}" alt="{html.escape(path)}">'


def _number(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _count(metrics: dict[str, Any], count: str, total: str) -> str:
    return f"{metrics.get(count)}/{metrics.get(total)}" if metrics.get(total) else "n/a"


def format_summary(metrics: dict[str, Any]) -> str:
    """A compact console table of the headline metrics."""
    rows = [
        ("image AUROC", _number(metrics.get("image_auroc"))),
        ("image AP", _number(metrics.get("image_ap"))),
        (f"image F1 @ threshold {_number(metrics.get('threshold'))}", _number(metrics.get("image_f1_at_threshold"))),
        (f"image F1-max (oracle, t={_number(metrics.get('image_f1_max_threshold'))})",
         _number(metrics.get("image_f1_max"))),
        ("pixel AUROC", _number(metrics.get("pixel_auroc"))),
        (f"AUPRO (FPR <= {metrics.get('aupro_max_fpr', DEFAULT_MAX_FPR):g})", _number(metrics.get("aupro"))),
        *((f"  AUROC {kind}", _number(value)) for kind, value in metrics.get("per_defect_auroc", {}).items()),
        ("false alarms @ threshold", _count(metrics, "false_alarms", "n_test_good")),
        ("escapes @ threshold", _count(metrics, "escapes", "n_test_defective")),
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
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- HTML page
def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _jpeg_uri(image_rgb: np.ndarray) -> str:
    """Photos as JPEG: a tenth of the PNG size, which keeps a 160-photo report a few MB."""
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return _data_uri(encoded.tobytes(), "image/jpeg")


def _plot(fig: Any, alt: str) -> str:
    return f'<img class="plot" src="{_data_uri(figure_bytes(fig), "image/png")}" alt="{html.escape(alt)}">'


def _metric_rows(metrics: dict[str, Any]) -> str:
    rows = [
        ("Image AUROC", _number(metrics["image_auroc"]), "ranking of defective above healthy photos (1 = perfect)"),
        ("Image average precision", _number(metrics["image_ap"]), "area under the precision-recall curve"),
        ("Image F1 at threshold", _number(metrics["image_f1_at_threshold"]),
         f"with the calibrated threshold {_number(metrics['threshold'])}: what production sees"),
        ("Image F1-max (oracle)", _number(metrics["image_f1_max"]),
         f"at threshold {_number(metrics['image_f1_max_threshold'])}; {F1_MAX_NOTE}"),
        ("Pixel AUROC", _number(metrics["pixel_auroc"]), "per-pixel ranking against the ground-truth masks"),
        (f"AUPRO (FPR &le; {metrics['aupro_max_fpr']:g})", _number(metrics["aupro"]),
         "per-region overlap; every defect counts equally whatever its size"),
        *((f"AUROC healthy vs {html.escape(kind)}", _number(value), "") for kind, value in
          metrics["per_defect_auroc"].items()),
        ("Threshold", _number(metrics["threshold"]), html.escape(metrics["calibration"]["promise"])),
        ("False alarms at threshold", _count_and_rate(metrics, "false_alarms", "n_test_good"),
         f"healthy test photos flagged; the threshold promises at most {metrics['promised_false_alarm_rate']:.1%}"),
        ("Escapes at threshold", _count_and_rate(metrics, "escapes", "n_test_defective"),
         "defective test photos passed as OK"),
        *((f"Recall {html.escape(kind)}", f"{value:.1%}", "share of this defect kind flagged at the threshold")
          for kind, value in metrics["recall_per_defect"].items()),
        ("Healthy calibration μ ± σ",
         f"{_number(metrics['calibration_mean'], 3)} ± {_number(metrics['calibration_std'], 3)}",
         html.escape(metrics["calibration_method"])),
        ("Test photos", f"{metrics['n_test']}", f"{metrics['n_test_good']} healthy, {metrics['n_test_defective']} "
         f"defective, {metrics['n_skipped']} unreadable"),
        ("Training photos", f"{metrics['n_train']}", "used to build the memory bank"),
        ("Fit time", "n/a" if metrics["fit_seconds"] is None else f"{metrics['fit_seconds']:.1f} s", ""),
        ("Backbone / seed", f"{html.escape(str(metrics['backbone']))} / {metrics['seed']}", ""),
        ("Pixel evaluation size", f"{metrics['eval_size']} px",
         f"maps and masks resized to this longer side; {metrics['n_pixel_eval_images']} photos with known masks"),
    ]
    return "\n".join(f"<tr><th>{name}</th><td>{value}</td><td>{meaning}</td></tr>" for name, value, meaning in rows)


def _count_and_rate(metrics: dict[str, Any], count: str, total: str) -> str:
    """'2 of 27 (7.4 %, 95 % interval 2.1–23.4 %)' for a count at the threshold."""
    if not metrics[total]:
        return "n/a"
    rate_key = count[:-1] + "_rate" if count.endswith("s") else count
    low, high = metrics[f"{rate_key}_interval"]
    return f"{metrics[count]} of {metrics[total]} ({metrics[rate_key]:.1%}, 95 % interval {low:.1%}–{high:.1%})"


def _card(item: ScoredImage, vmin: float | None) -> str:
    meaning, _ = OUTCOMES[item.outcome]
    overlay = overlay_rgb(item.thumbnail, item.eval_map, item.threshold, vmin=vmin, highlight=item.highlight,
                          gt_mask=None if item.eval_regions is None else item.eval_regions > 0)
    verdict = "ANOMALOUS" if item.flagged else "OK"
    badge = item.outcome if item.sample is not None else ""
    warnings = "".join(f'<div class="warn">⚠ {html.escape(w)}</div>' for w in item.warnings)
    height, width = item.thumbnail.shape[:2]
    return (
        f'<figure class="card {item.outcome}" data-outcome="{item.outcome}">'
        f'<img src="{_jpeg_uri(overlay)}" width="{width}" height="{height}" alt="{html.escape(item.name)}">'
        f'<figcaption><span class="badge {item.outcome}">{" · ".join(filter(None, (badge, meaning)))}</span>'
        f'<div><b>{item.score:.3f}</b> ({item.normalized_score:.3f} × threshold) {verdict}</div>'
        f'<div class="name">{html.escape(item.name)}</div>{warnings}'
        "</figcaption></figure>"
    )


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
    return _plot(fig, "worst false positives and false negatives")


def _gallery(title: str, scored: list[ScoredImage], outcomes: tuple[str, ...], threshold: float,
             vmin: float | None) -> str:
    """Every photo as a heatmap thumbnail, highest score first, with filter buttons per outcome."""
    ordered = sorted(scored, key=lambda s: -s.score)
    counts = {outcome: sum(s.outcome == outcome for s in scored) for outcome in outcomes}
    buttons = [f'<button data-filter="all">all ({len(scored)})</button>'] + [
        f'<button data-filter="{o}" class="badge {o}">{o} · {OUTCOMES[o][0]} ({counts[o]})</button>' for o in outcomes
    ]
    labelled = outcomes == LABELLED_OUTCOMES
    truth = " Magenta contour: ground-truth defect. Thick borders mark mistakes." if labelled else ""
    return f"""<h2>{html.escape(title)}</h2>
<p class="meta">Heatmap colour scale is the same for every photo (below). {CONTOUR_RULE}{truth}
Score: feature distance to the nearest healthy patch (its scale depends on the model); × threshold: the
same score in units of the threshold.</p>
{_plot(colour_bar_figure(threshold, vmin=vmin), "heatmap colour scale")}
<div>{''.join(buttons)}</div>
<div class="gallery">
{''.join(_card(s, vmin) for s in ordered)}
</div>"""


def _html(
    model: Model,
    data_dir: Path,
    scored: list[ScoredImage],
    metrics: dict[str, Any],
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
) -> str:
    threshold = model.threshold
    vmin = metrics["calibration_mean"]
    roc_curves = {
        name: (*curves[key], metrics[metric])
        for name, key, metric in (("image", "image_roc", "image_auroc"), ("pixel", "pixel_roc", "pixel_auroc"))
        if key in curves
    }
    plots = []
    if roc_curves:
        plots.append(_plot(roc_figure(roc_curves), "ROC curves"))
    if "pro" in curves:
        plots.append(_plot(pro_figure(*curves["pro"], metrics["aupro"], DEFAULT_MAX_FPR), "PRO curve"))
    plots.append(_plot(score_histogram_figure(
        [s.score for s in scored if not s.sample.is_defective], [s.score for s in scored if s.sample.is_defective],
        threshold, model.calibration_scores), "score histogram"))
    skipped = "".join(f"<li>{html.escape(s['reason'])}</li>" for s in metrics["skipped"])
    body = f"""<h2>Metrics</h2>
<table>
{_metric_rows(metrics)}
</table>
{_setup_section(metrics)}
{f'<h2>Unreadable files</h2><ul class="skipped">{skipped}</ul>' if skipped else ''}
<h2>Plots</h2>
<div class="plots">
{''.join(plots)}
</div>
<h2>Worst cases</h2>
{_worst_cases(scored, threshold, vmin)}
{_gallery("All test photos, highest score first", scored, LABELLED_OUTCOMES, threshold, vmin)}"""
    meta = (f"{html.escape(str(data_dir))} · generated {datetime.now():%Y-%m-%d %H:%M} · "
            f"backbone {html.escape(str(metrics['backbone']))} · threshold {_number(threshold)}")
    return _page(f"Anomaly detection report: {data_dir.name}", meta, body)


def write_batch_report(
    model: Model,
    source: Path,
    scored: list[ScoredImage],
    records: list[dict[str, Any]],
    out_path: Path,
    threshold_origin: str | None = None,
) -> Path:
    """The page for photos without labels: counts, threshold, unreadable files, every photo by score.

    ``records`` are the scoring records of the whole batch (for the counts and the unreadable
    files); ``threshold_origin`` says where a threshold other than the calibrated one came from.
    """
    flagged = sum(s.flagged for s in scored)
    errors = [record for record in records if "error" in record]
    origin = threshold_origin or promise(model.calibration)
    unreadable = "".join(f"<li>{html.escape(record['error'])}</li>" for record in errors)
    body = f"""<table>
<tr><th>Photos scored</th><td>{len(scored)}</td><td></td></tr>
<tr><th>Flagged ANOMALOUS</th><td>{flagged}</td><td>score above the threshold</td></tr>
<tr><th>Unreadable</th><td>{len(errors)}</td><td>not scored; listed below</td></tr>
<tr><th>Threshold</th><td>{_number(model.threshold)}</td><td>{html.escape(origin)}</td></tr>
</table>
{f'<h2>Unreadable files</h2><ul class="skipped">{unreadable}</ul>' if unreadable else ''}
{_gallery("Scored photos, highest score first", scored, VERDICTS, model.threshold, _calibration(model)[0])}"""
    meta = (f"{html.escape(str(source))} · generated {datetime.now():%Y-%m-%d %H:%M} · "
            f"backbone {html.escape(str(model.config.backbone))} · threshold {_number(model.threshold)}")
    write_atomically(out_path, _page(f"Scored photos: {source.name}", meta, body))
    return out_path


def _page(title: str, meta: str, body: str) -> str:
    """One self-contained HTML page: styles, the broken-image check and the gallery filter built in."""
    badge_css = "\n".join(
        f".badge.{o} {{ background: {colour}; }} .card.{o} {{ border-color: {colour}; }}"
        for o, (_, colour) in OUTCOMES.items()
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<script>
  // Counts script and image errors, and marks broken images, so a broken report is visible
  // at a glance (and to the automated check, which reads these data attributes).
  document.documentElement.dataset.errors = "0";
  window.addEventListener("error", function (event) {{
    var root = document.documentElement;
    root.dataset.errors = String(Number(root.dataset.errors) + 1);
    if (event.target && event.target.tagName === "IMG") event.target.classList.add("broken");
  }}, true);
  window.addEventListener("load", function () {{
    var images = Array.prototype.slice.call(document.images);
    var root = document.documentElement;
    root.dataset.imagesTotal = String(images.length);
    root.dataset.imagesLoaded = String(images.filter(function (img) {{ return img.naturalWidth > 0; }}).length);
  }});
</script>
<style>
  body {{ font-family: system-ui, sans-serif; margin: 24px; color: #212121; background: #fafafa; }}
  h1 {{ margin-bottom: 4px; }} h2 {{ margin-top: 32px; border-bottom: 1px solid #ddd; }}
  .meta {{ color: #616161; }}
  table {{ border-collapse: collapse; background: white; }}
  th, td {{ text-align: left; padding: 4px 12px; border-bottom: 1px solid #eee; vertical-align: top; }}
  td:nth-child(2) {{ font-variant-numeric: tabular-nums; font-weight: 600; white-space: nowrap; }}
  td:nth-child(3) {{ color: #616161; font-size: 90%; }}
  .plots {{ display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }}
  .plot {{ max-width: 100%; background: white; border: 1px solid #ddd; }}
  .gallery {{ display: flex; flex-wrap: wrap; gap: 10px; }}
  .card {{ margin: 0; width: {THUMB_SIZE}px; background: white; border: 3px solid; border-radius: 6px;
           overflow: hidden; }}
  .card.TN, .card.OK {{ border-width: 1px; }} .card.FN, .card.FP {{ border-width: 5px; }}
  .card img {{ display: block; width: 100%; height: auto; }}
  figcaption {{ padding: 4px 6px; font-size: 13px; }}
  .name {{ color: #616161; font-size: 12px; word-break: break-all; }}
  .warn {{ color: #e65100; font-size: 12px; }}
  .badge {{ display: inline-block; color: white; border-radius: 4px; padding: 1px 6px; font-size: 12px;
            font-weight: 600; }}
  button {{ margin: 0 6px 10px 0; padding: 4px 10px; border: 1px solid #999; border-radius: 4px; cursor: pointer;
           font-size: 13px; }}
  img.broken {{ outline: 4px dashed red; min-height: 40px; }}
  .skipped {{ color: #b71c1c; }}
  {badge_css}
</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p class="meta">{meta}</p>
{body}
<script>
  document.querySelectorAll("button[data-filter]").forEach(function (button) {{
    button.addEventListener("click", function () {{
      var wanted = button.dataset.filter;
      document.querySelectorAll(".card").forEach(function (card) {{
        card.hidden = wanted !== "all" && card.dataset.outcome !== wanted;
      }});
    }});
  }});
</script>
</body>
</html>
"""
