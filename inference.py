"""Score photos with a fitted model: ``python inference.py --model M --image P`` (or ``--dir D``).

Prints a table (or one JSON document with ``--json``); ``--visualize`` writes a heatmap overlay of
each photo; ``--evaluate`` treats ``--dir`` as an MVTec-layout folder and writes a metrics report.
Exit status: 0 when every photo was scored, 1 when the single ``--image`` could not be read, 3 when
some photos of a ``--dir`` could not be read (the rest are scored and reported).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from config import fail, run_cli
from preprocessing.io import ImageReadError, find_images, read_images


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="model file written by train.py")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--image", type=Path, help="one photo")
    target.add_argument("--dir", type=Path, help="a folder of photos (searched recursively)")
    parser.add_argument("--visualize", action="store_true", help="write a heatmap overlay per photo")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--evaluate", action="store_true", help="--dir is an MVTec-layout folder: write metrics")
    parser.add_argument("--output-dir", type=Path, help="where overlays and reports go (default outputs/<model>)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override the model's device")
    parser.add_argument(
        "--runtime",
        choices=("auto", "torch", "onnx"),
        default="auto",
        help="feature extractor back end; auto = ONNX Runtime when scripts/export_onnx.py wrote <model>.onnx",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.evaluate and not args.dir:
        parser.error("--evaluate needs --dir (an MVTec-layout folder with test/)")
    return args


def score_files(model: Any, paths: list[Path], heatmap_dir: Path | None, quiet: bool) -> list[dict[str, Any]]:
    """Score photos batch by batch; an unreadable file becomes an error record, not a crash."""
    from tqdm import tqdm

    records = []
    batch_size = model.config.batch_size
    with tqdm(total=len(paths), desc="scoring", unit="img", disable=quiet, leave=False) as bar:
        for start in range(0, len(paths), batch_size):
            decoded = list(read_images(paths[start : start + batch_size], model.config.num_workers))
            readable = [(path, image) for path, image in decoded if not isinstance(image, ImageReadError)]
            predictions = iter(model.predict([image for _, image in readable]) if readable else [])
            for path, image in decoded:
                if isinstance(image, ImageReadError):
                    print(f"error: {image}", file=sys.stderr)
                    records.append({"path": str(path), "error": str(image)})
                    continue
                prediction = next(predictions)
                record = {
                    "path": str(path),
                    "score": round(prediction.score, 4),
                    "threshold": round(model.threshold, 4),
                    "is_anomalous": prediction.is_anomalous,
                    "sigma": round(prediction.sigma, 2),
                    "confidence": round(prediction.confidence, 4),
                    "warnings": prediction.warnings,
                }
                if heatmap_dir is not None:
                    record["heatmap"] = str(write_overlay(model, path, image, prediction, heatmap_dir))
                records.append(record)
            bar.update(len(decoded))
    return records


def write_overlay(model: Any, path: Path, image: Any, prediction: Any, heatmap_dir: Path) -> Path:
    from evaluation.visualize import save_overlay

    out_path = heatmap_dir / f"{path.parent.name}_{path.stem}_heatmap.png"
    save_overlay(
        image,
        prediction.anomaly_map,
        out_path,
        threshold=model.threshold,
        vmin=model.calibration_mean,  # same colour scale as the report: a healthy part looks calm
        score=prediction.score,
        verdict="ANOMALOUS" if prediction.is_anomalous else "OK",
    )
    return out_path


def print_table(records: list[dict[str, Any]]) -> None:
    width = max(len(r["path"]) for r in records)
    print(f"{'image':<{width}}  {'score':>8}  {'threshold':>9}  {'verdict':<9}  {'sigma':>6}  confidence")
    for record in records:
        if "error" in record:
            print(f"{record['path']:<{width}}  error: {record['error']}")
            continue
        verdict = "ANOMALOUS" if record["is_anomalous"] else "ok"
        print(
            f"{record['path']:<{width}}  {record['score']:>8.3f}  {record['threshold']:>9.3f}  "
            f"{verdict:<9}  {record['sigma']:>6.1f}  {record['confidence']:>9.1%}"
        )
        for warning in record["warnings"]:
            print(f"{'':<{width}}  warning: {warning}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from models.patchcore import PatchCore

    model = PatchCore.load(args.model, device=args.device, runtime=args.runtime)
    out_dir = args.output_dir or Path("outputs") / args.model.stem

    if args.evaluate:
        from evaluation.report import evaluate, format_summary

        metrics = evaluate(model, args.dir, out_dir, fit_seconds=model.fit_seconds, quiet=args.quiet)
        print(json.dumps(metrics, indent=2) if args.json else format_summary(metrics))
        print(f"metrics: {out_dir / 'metrics.json'}  report: {out_dir / 'report.html'}", file=sys.stderr)
        return 0

    if args.image:
        paths = [args.image]
    else:
        if not args.dir.is_dir():
            fail(f"{args.dir}: no such folder")
        paths = find_images(args.dir)
        if not paths:
            fail(f"{args.dir}: no images found (png, jpg, jpeg, bmp, tif, tiff)")
    heatmap_dir = out_dir / "heatmaps" if args.visualize else None
    records = score_files(model, paths, heatmap_dir, args.quiet or args.json)

    if args.json:
        print(json.dumps({"model": str(args.model), "results": records}, indent=2))
    else:
        print_table(records)
        if heatmap_dir is not None:
            print(f"heatmaps: {heatmap_dir}/")
    failed = sum("error" in record for record in records)
    if failed == 0:
        return 0
    return 1 if args.image else 3


if __name__ == "__main__":
    sys.exit(run_cli(main))
