"""The HTML pages' shared parts: what is kept of each scored photo, heatmap thumbnails, galleries
and the page frame; and the page for photos without labels (``write_batch_report``, behind
``inference.py --report``): thumbnails highest score first, threshold and verdicts.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from evaluation.maps import DEFAULT_EVAL_SIZE, eval_shape, shrink_map
from evaluation.mvtec import LabelledImage
from inspection.overlay import colour_scale_image, highlighted_region, overlay_rgb, png_bytes, region_at
from models.calibration import promise
from output_files import write_atomically

THUMB_SIZE = 224  # longer side of gallery thumbnails, in pixels
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
    calibration_median: float
    calibration_std: float  # the robust spread of the healthy scores
    n_train: int
    fit_seconds: float
    config: Any

    def predict(self, images: list[np.ndarray], progress: bool = False) -> list[Any]: ...

    def threshold_for(self, false_alarm_rate: float) -> float: ...


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
    regions: np.ndarray | None = None,
    eval_size: int = DEFAULT_EVAL_SIZE,
) -> ScoredImage:
    """Reduce a prediction to what a report keeps: an evaluation-size map, its highlighted region, a thumbnail.

    ``regions`` are the defect-region labels at the evaluation size (evaluation.metrics.downsample_for_eval),
    None for a photo without known ground truth.
    """
    eval_map = shrink_map(prediction.anomaly_map, eval_size)
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
        eval_regions=regions,
    )


def calibration_stats(model: Model) -> tuple[float | None, float | None]:
    """Median and robust spread of the healthy calibration scores (what sigma counts from and in), None without them."""
    if len(model.calibration_scores) == 0:
        return None, None
    return model.calibration_median, model.calibration_std


def number(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def update_lines(updates: list[dict[str, Any]]) -> list[str]:
    """One line per update since the fit (train.py --add-good, POST /feedback, the watcher's confirmed_good/)."""
    lines = []
    for count, update in enumerate(updates, 1):
        line = (f"update {count} ({update.get('time', '?')}): added {update['photos']} photos confirmed good"
                f"{' from ' + update['source'] if update.get('source') else ''}; memory bank {update.get('bank_before')} "
                f"-> {update.get('bank_after')} patches, threshold {number(update.get('threshold_before'), 3)} -> "
                f"{number(update.get('threshold_after'), 3)}")
        if update.get("refused"):
            line += f"; refused as too far above the threshold: {', '.join(update['refused'])}"
        if update.get("already_learnt"):
            line += f"; learnt already, not added again: {', '.join(update['already_learnt'])}"
        if update.get("forced"):
            line += f"; added although far above the threshold (forced): {', '.join(update['forced'])}"
        lines.append(line)
    return lines


def score_timeline_svg(scores: list[float], threshold: float, healthy_limit: float | None, window: int) -> str:
    """Scores in processing order as an inline SVG chart: passed and flagged photos, the threshold,
    the calibration's healthy limit and the rolling median of passed photos (drift shows as that
    median climbing over the limit)."""
    width, height, margin = 760, 260, 44
    values = np.asarray(scores, dtype=np.float64)
    top = max(float(values.max()), threshold, healthy_limit or 0.0) * 1.05
    bottom = min(float(values.min()), healthy_limit or np.inf) * 0.95

    def x(i: float) -> float:
        return margin + (width - 2 * margin) * (i / max(1, len(values) - 1))

    def y(v: float) -> float:
        return height - margin - (height - 2 * margin) * (v - bottom) / max(top - bottom, 1e-12)

    dots = "".join(
        f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="2.5" fill="{"#c62828" if v > threshold else "#1f77b4"}"/>'
        for i, v in enumerate(values)
    )
    passed = np.where(values > threshold, np.nan, values)
    span = max(1, min(window, len(values)))
    medians = [(i, np.nanmedian(part)) for i in range(len(values))
               if np.isfinite(part := passed[max(0, i + 1 - span) : i + 1]).any()]
    median_line = " ".join(f"{x(i):.1f},{y(m):.1f}" for i, m in medians)

    def level(v: float, colour: str, dash: str, label: str) -> str:
        return (f'<line x1="{margin}" x2="{width - margin}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="{colour}" '
                f'stroke-dasharray="{dash}"/><text x="{width - margin}" y="{y(v) - 4:.1f}" text-anchor="end" '
                f'font-size="11" fill="{colour}">{html.escape(label)}</text>')

    limit = "" if healthy_limit is None else level(healthy_limit, "#ef6c00", "2,3", f"healthy limit {healthy_limit:.3f}")
    return (f'<svg class="plot" role="img" aria-label="score over time" width="{width}" height="{height}" '
            f'xmlns="http://www.w3.org/2000/svg">{dots}'
            f'<polyline points="{median_line}" fill="none" stroke="#333" stroke-width="1.5"/>'
            f'{level(threshold, "black", "6,4", f"threshold {threshold:.3f}")}{limit}'
            f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle" font-size="12">photo, in processing order '
            f'(red: flagged; line: median of the last {span} passed)</text>'
            f'<text x="{margin - 6}" y="{y(top) + 10:.1f}" text-anchor="end" font-size="11">{top:.1f}</text>'
            f'<text x="{margin - 6}" y="{y(bottom):.1f}" text-anchor="end" font-size="11">{bottom:.1f}</text></svg>')


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def jpeg_uri(image_rgb: np.ndarray) -> str:
    """Photos as JPEG: a tenth of the PNG size, which keeps a 160-photo report a few MB."""
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data_uri(encoded.tobytes(), "image/jpeg")


def png_img(data: bytes, alt: str) -> str:
    """A PNG picture as an inline <img>: the page stays one self-contained file."""
    return f'<img class="plot" src="{data_uri(data, "image/png")}" alt="{html.escape(alt)}">'


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
        f'<img src="{jpeg_uri(overlay)}" width="{width}" height="{height}" alt="{html.escape(item.name)}">'
        f'<figcaption><span class="badge {item.outcome}">{" · ".join(filter(None, (badge, meaning)))}</span>'
        f'<div><b>{item.score:.3f}</b> ({item.normalized_score:.3f} × threshold) {verdict}</div>'
        f'<div class="name">{html.escape(item.name)}</div>{warnings}'
        "</figcaption></figure>"
    )


def gallery(title: str, scored: list[ScoredImage], outcomes: tuple[str, ...], threshold: float,
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
{png_img(png_bytes(colour_scale_image(threshold, vmin=vmin)), "heatmap colour scale")}
<div>{''.join(buttons)}</div>
<div class="gallery">
{''.join(_card(s, vmin) for s in ordered)}
</div>"""


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
<tr><th>Threshold</th><td>{number(model.threshold)}</td><td>{html.escape(origin)}</td></tr>
</table>
{f'<h2>Unreadable files</h2><ul class="skipped">{unreadable}</ul>' if unreadable else ''}
{_timeline(model, records)}
{gallery("Scored photos, highest score first", scored, VERDICTS, model.threshold, calibration_stats(model)[0])}"""
    meta = (f"{html.escape(str(source))} · generated {datetime.now():%Y-%m-%d %H:%M} · "
            f"backbone {html.escape(str(model.config.backbone))} · threshold {number(model.threshold)}")
    write_atomically(out_path, page(f"Scored photos: {source.name}", meta, body))
    return out_path


def _timeline(model: Model, records: list[dict[str, Any]]) -> str:
    """Score over time for a batch processed in order (a folder's photos sorted by name), and the
    model's update history: where a line drifts, its healthy scores climb towards the threshold."""
    scores = [record["score"] for record in records if "error" not in record]
    if len(scores) < 2:
        return ""
    config = model.config
    limit = float(np.percentile(model.calibration_scores, config.drift_percentile)) if len(model.calibration_scores) else None
    updates = "".join(f"<li>{html.escape(line)}</li>" for line in update_lines(list(getattr(model, "updates", []))))
    return (f"<h2>Score over time</h2>\n{score_timeline_svg(scores, model.threshold, limit, config.drift_window)}"
            + (f"<h2>Model updates since the fit</h2><ul>{updates}</ul>" if updates else ""))


def page(title: str, meta: str, body: str) -> str:
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
  table.grid td {{ font-variant-numeric: tabular-nums; font-weight: normal; color: inherit; font-size: inherit;
                   text-align: right; }}
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
