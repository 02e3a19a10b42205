"""Measure what each preprocessing step is worth: image and pixel AUROC with steps switched off in turn.

Usage:
    .venv/bin/python scripts/ablate_preprocessing.py --data-dir data/mvtec_ad/screw \\
        --backbone efficientnet_lite0 --coreset-sampling-ratio 0.02

Rows: the pipeline off (plain resize), every step on, each step removed in turn, what
``preprocess: auto`` decides from the training photos, and the category's chosen defaults. Pixel AUROC is computed in the ORIGINAL photo's coordinates (maps come back through
``to_original``), so crops that zoom in cannot flatter themselves; maps and masks are shrunk together
to 256x256 to bound memory. The table is printed and written to outputs/ablation_<category>.md, and
the rows as data to ablation_<category>.json, both after every finished row: an interrupted run keeps
them, and ``--update --variants`` runs the rest.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import CATEGORY_DEFAULTS, Config, UserError, fail, run_cli, settings_from_pairs  # noqa: E402
from models.patchcore import PatchCore  # noqa: E402
from evaluation.metrics import image_metrics, pixel_roc  # noqa: E402
from evaluation.mvtec import LabelledImage, auroc_problem, load_test_split, train_images  # noqa: E402
from output_files import check_writable, json_document, write_atomically  # noqa: E402
from preprocessing.io import read_image, read_mask, refuse_unusable_photos  # noqa: E402
from preprocessing.pipeline import STEP_FLAGS  # noqa: E402

EVAL_SIDE = 256  # maps and masks are compared at this size
FIGURES = ("image_auroc", "f1_at_threshold", "pixel_auroc", "seconds")  # one row of the table


def variants(category: str) -> dict[str, dict[str, Any]]:
    """Name -> config overrides of every row of the table."""
    rows: dict[str, dict[str, Any]] = {"pipeline off": {"preprocess": "off"}, "all steps on": {"preprocess": "on"}}
    rows.update({f"without {flag}": {"preprocess": "on", flag: False} for flag in STEP_FLAGS})
    rows["auto"] = {**CATEGORY_DEFAULTS["custom"], "preprocess": "auto"}  # what train.py gives any new folder
    if CATEGORY_DEFAULTS.get(category):  # and the same model without the pipeline, for a fair baseline
        rows[f"{category} defaults"] = dict(CATEGORY_DEFAULTS[category])
        rows[f"{category} defaults, pipeline off"] = {**CATEGORY_DEFAULTS[category], "preprocess": "off"}
        # two engine choices that ride on the pipeline: the paper's Eq. 7 and background skipping
        rows[f"{category} defaults, no score re-weighting"] = {**CATEGORY_DEFAULTS[category], "score_reweighting": False}
        rows[f"{category} defaults, every patch"] = {**CATEGORY_DEFAULTS[category], "object_patches_only": False}
    return rows


def evaluate(
    config: Config, train: list[Path], samples: list[LabelledImage], chunk: int = 16
) -> dict[str, float | None]:
    """Fit on the healthy photos, score the test set; image AUROC, F1 at the threshold, pixel AUROC
    (None when no mask marks a defect), seconds."""
    start = time.perf_counter()
    model = PatchCore(config)
    model.fit(train, progress=False)
    scores, maps, masks = [], [], []
    for offset in range(0, len(samples), chunk):
        batch = samples[offset : offset + chunk]
        for sample, prediction in zip(batch, model.predict([read_image(s.path) for s in batch])):
            scores.append(prediction.score)
            maps.append(cv2.resize(prediction.anomaly_map, (EVAL_SIDE, EVAL_SIDE), interpolation=cv2.INTER_AREA))
            truth = read_mask(sample.mask_path) if sample.mask_path else np.zeros((EVAL_SIDE, EVAL_SIDE), bool)
            shrunk = cv2.resize(truth.astype(np.float32), (EVAL_SIDE, EVAL_SIDE), interpolation=cv2.INTER_AREA)
            masks.append(shrunk >= 0.5)
    image = image_metrics([s.is_defective for s in samples], scores, model.threshold)
    pixel = pixel_roc(maps, masks)
    return {
        "image_auroc": image["image_auroc"],
        "f1_at_threshold": image["image_f1_at_threshold"],
        "pixel_auroc": None if pixel is None else pixel[0],
        "seconds": time.perf_counter() - start,
    }


def figure(value: float | None, digits: int = 3) -> str:
    """A table cell; n/a for a figure the test set cannot give (no mask marks a defect)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(results: dict[str, dict[str, float | None]], settings: str) -> str:
    lines = [
        settings,
        "",
        "| variant | image AUROC | F1 at threshold | pixel AUROC (original coords) | seconds |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {' | '.join(figure(row[key], 0 if key == 'seconds' else 3) for key in FIGURES)} |"
        for name, row in results.items()
    ]
    return "\n".join(lines) + "\n"


def earlier_results(record: Path, settings: str) -> dict[str, dict[str, float | None]]:
    """The rows an earlier run with the same settings wrote to ``record`` (for --update); none when
    it has none or other settings. A file that is not such a record is refused by name, before any fit."""
    if not record.is_file():
        return {}
    try:
        earlier = json.loads(record.read_text(encoding="utf-8"))
    except OSError as error:
        raise UserError(f"{record}: cannot be read ({error.strerror})") from None
    except ValueError as error:  # not UTF-8, or not JSON
        raise UserError(f"{record}: not a record of an earlier ablation ({error})") from None
    results = earlier.get("results") if isinstance(earlier, dict) else None
    if not (isinstance(results, dict) and all(_is_row(row) for row in results.values())):
        raise UserError(f"{record}: not a record of an earlier ablation (expected settings and results of each "
                        f"row: {', '.join(FIGURES)}); remove it or give another --output-dir")
    return results if earlier.get("settings") == settings else {}


def _is_row(row: object) -> bool:
    """Whether a recorded row holds every figure, each a number or null."""
    return isinstance(row, dict) and all(key in row and type(row[key]) in (int, float, type(None)) for key in FIGURES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="an MVTec-layout category folder")
    parser.add_argument("--category", help="name for CATEGORY_DEFAULTS and the output file (default: folder name)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--coreset-sampling-ratio", type=float, default=0.02)
    parser.add_argument("--variants", nargs="+", help="run only these rows (names as printed)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="extra config for every row")
    parser.add_argument("--output-dir", default=str(Path(__file__).resolve().parents[1] / "outputs"))
    parser.add_argument(
        "--update", action="store_true", help="keep the other rows of an earlier run with the same settings"
    )
    args = parser.parse_args(argv)

    category = args.category or Path(args.data_dir).resolve().name
    try:  # apart from --set, so that an error names the flag it came from
        base = Config(backbone=args.backbone, coreset_sampling_ratio=args.coreset_sampling_ratio)
    except ValueError as error:
        parser.error(str(error))
    try:
        common = settings_from_pairs(args.set)
        base = base.replace(**common)
    except ValueError as error:
        parser.error(f"--set: {error}")
    rows = variants(category)
    if args.variants:
        unknown = sorted(set(args.variants) - set(rows))
        if unknown:
            parser.error(f"unknown variant(s) {unknown}; choose from {list(rows)}")
        rows = {name: rows[name] for name in args.variants}

    train, samples = train_images(args.data_dir), load_test_split(args.data_dir)
    output = Path(args.output_dir) / f"ablation_{category}.md"
    record = output.with_suffix(".json")  # the rows as data, so that --update can re-run a few
    for path in (output, record):
        check_writable(path)  # before the fits (one per row), not after them
    if problem := auroc_problem(args.data_dir, samples):
        fail(problem)
    settings = (
        f"Category `{category}`, backbone `{args.backbone}`, coreset sampling ratio {args.coreset_sampling_ratio}, "
        f"image size {base.image_size}, {len(train)} healthy training photos, {len(samples)} test photos"
        + (f", extra settings {common}" if common else "")
        + "."
    )
    results = earlier_results(record, settings) if args.update else {}
    refuse_unusable_photos(train, base)  # every photo decodes before the first fit, not during one
    refuse_unusable_photos([sample.path for sample in samples], base, "test photos")
    for name, overrides in rows.items():
        results[name] = evaluate(base.replace(**overrides), train, samples)
        print(f"{name}: {results[name]}", flush=True)
        write_atomically(output, markdown_table(results, settings))  # after each row: an interrupt keeps them
        write_atomically(record, json_document({"settings": settings, "results": results}))

    print(markdown_table(results, settings))
    print(f"written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
