"""Score photos with a fitted model: ``python inference.py --model M --image P`` (or ``--dir D``).

Prints a table (or one JSON document with ``--json``) and, after it, a summary line: photos scored,
flagged anomalous, unreadable. ``--visualize`` writes a heatmap overlay per photo, ``--csv FILE``
the same records as CSV, ``--report`` an HTML page of every photo sorted by score; ``--evaluate``
treats ``--dir`` as an MVTec-layout folder and writes a metrics report. ``--watch DIR`` scores each
photo a camera writes into DIR, once, into ``--jsonl``/``--csv`` (and ``--sort-into``, ``--visualize``),
until Ctrl-C.

Per photo: score (feature distance of the worst spot to the nearest healthy patch; its scale
depends on the model), normalized_score (score / threshold: 1.0 is the threshold on every model),
threshold, verdict (ANOMALOUS when score > threshold), sigma (how far the score lies above the
median of the healthy calibration scores, in robust spreads of those scores) and anomaly_confidence
(how unusual the score is for a healthy part, erf(sigma/√2): 1σ 68 %, 2σ 95 %, 3σ 99.7 %, 0 at or
below the healthy median; not how sure the verdict is).

Exit status: 0 when every photo was scored, 1 when the single ``--image`` could not be read, 3 when
some photos of a ``--dir`` could not be read (the rest are scored and reported), 2 for a usage
problem.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from config import DEVICE_OVERRIDE_HELP, DEVICES, fail, printable, run_cli
from models.backend import RUNTIME_HELP, RUNTIMES
from models.model_file import check_not_the_model
from output_files import check_not_an_input, check_output_folder, check_writable, json_document, write_atomically
from preprocessing.io import find_images

ANOMALY_CONFIDENCE_NOTE = (
    "anomaly confidence: how unusual the score is for a healthy part (1σ 68 %, 2σ 95 %, 3σ 99.7 %), "
    "not how sure the verdict is; score/thr: score in units of the threshold"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="model file written by train.py")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--image", type=Path, help="one photo")
    target.add_argument("--dir", type=Path, help="a folder of photos (searched recursively)")
    target.add_argument("--watch", type=Path, metavar="DIR",
                        help="score each photo written into DIR once it is complete, until Ctrl-C (README, 'On the line')")
    parser.add_argument("--threshold", type=float, metavar="T",
                        help="judge against T instead of the model's calibrated threshold, for this run only "
                             "(to move it for good: train.py --recalibrate)")
    parser.add_argument("--visualize", action="store_true",
                        help="write a heatmap overlay per photo, at its path relative to --dir under "
                             "<output-dir>/heatmaps/")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--csv", type=Path, metavar="FILE", help="also write the records to FILE as CSV")
    parser.add_argument("--report", action="store_true",
                        help="also write <output-dir>/batch_report.html: every photo as a heatmap thumbnail, "
                             "highest score first, with threshold and verdicts")
    parser.add_argument("--evaluate", action="store_true", help="--dir is an MVTec-layout folder: write metrics")
    parser.add_argument("--output-dir", type=Path, help="where overlays and reports go (default outputs/<model>)")
    parser.add_argument("--device", choices=DEVICES, help=DEVICE_OVERRIDE_HELP)
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto", help=RUNTIME_HELP)
    parser.add_argument("--jsonl", type=Path, metavar="FILE", help="with --watch: append one JSON line per photo")
    parser.add_argument("--sort-into", type=Path, metavar="OUT",
                        help="with --watch: move each photo to OUT/ok, OUT/anomalous or OUT/unreadable; photos "
                             "moved into OUT/confirmed_good are added to the model (docs/learning-on-the-line.md)")
    parser.add_argument("--settle-seconds", type=float, default=0.5,
                        help="with --watch: a photo is read once unchanged this long")
    parser.add_argument("--retry-seconds", type=float, default=30.0,
                        help="with --watch: a photo that cannot be read is read again whenever it changes, and gets "
                             "its error record once unchanged this long (a slow camera pauses between pieces)")
    parser.add_argument("--state", type=Path, metavar="FILE",
                        help="with --watch: the journal that makes restarts safe (default <jsonl or csv>.state, "
                             "else OUT/.watch-state)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if (args.jsonl or args.sort_into or args.state) and not args.watch:
        parser.error("--jsonl, --sort-into and --state go with --watch")
    if args.watch and not (args.jsonl or args.csv or args.sort_into):
        parser.error("--watch needs somewhere to put results: --jsonl, --csv and/or --sort-into")
    if args.watch and (args.report or args.json or args.threshold is not None):
        parser.error("--watch writes records to --jsonl/--csv; --report, --json and --threshold are for --image/--dir")
    if not (0 <= args.settle_seconds <= args.retry_seconds and math.isfinite(args.retry_seconds)):
        parser.error("--settle-seconds must be >= 0 and --retry-seconds at least as long")
    if args.evaluate and not args.dir:
        parser.error("--evaluate needs --dir (an MVTec-layout folder with test/)")
    if args.evaluate and args.threshold is not None:
        parser.error("--evaluate reports the model's calibrated threshold; to move it use train.py --recalibrate")
    if args.evaluate and (args.csv or args.visualize or args.report):
        parser.error("--evaluate writes metrics.json and report.html (its worst cases with heatmaps); --csv, "
                     "--visualize and --report are for a scoring run of --dir without --evaluate")
    if args.threshold is not None and not (math.isfinite(args.threshold) and args.threshold > 0):
        parser.error(f"--threshold must be a positive number, got {args.threshold}")
    if args.csv and args.csv.is_dir():
        parser.error(f"--csv {args.csv}: is a folder; name the CSV file to write")
    return args


def print_table(records: list[dict[str, Any]]) -> None:
    """One row per photo; names and messages with their control characters escaped (config.printable)."""
    names = [printable(record["path"]) for record in records]
    width = max(map(len, names))
    print(f"{'image':<{width}}  {'score':>8}  {'score/thr':>9}  {'threshold':>9}  {'verdict':<9}  {'sigma':>6}  "
          "anomaly confidence")
    for name, record in zip(names, records):
        if "error" in record:
            print(f"{name:<{width}}  error: {printable(record['error'])}")
            continue
        verdict = "ANOMALOUS" if record["is_anomalous"] else "ok"
        print(
            f"{name:<{width}}  {record['score']:>8.3f}  {record['normalized_score']:>9.3f}  "
            f"{record['threshold']:>9.3f}  {verdict:<9}  {record['sigma']:>6.1f}  {record['anomaly_confidence']:>18.1%}"
        )
        for warning in record["warnings"]:
            print(f"{'':<{width}}  warning: {printable(warning)}")
    print(f"({ANOMALY_CONFIDENCE_NOTE})")


def summary_line(counts: dict[str, int]) -> str:
    return f"{counts['scored']} scored, {counts['anomalous']} anomalous, {counts['unreadable']} unreadable"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.watch:
        if not args.watch.is_dir():
            fail(f"{args.watch}: no such folder to watch")
        from runtime.watcher import WatchOutputs

        heatmaps = (args.output_dir or Path("outputs") / args.model.stem) / "heatmaps" if args.visualize else None
        outputs = WatchOutputs(jsonl=args.jsonl, csv=args.csv, sort_into=args.sort_into, heatmaps=heatmaps,
                               state=args.state)
        outputs.check(args.watch)  # before the model loads: a read-only or full output stops nothing later
        for path in filter(None, [outputs.jsonl, outputs.csv, outputs.state]):
            check_not_the_model(path, args.model)
    from models.patchcore import PatchCore

    model = PatchCore.load(args.model, device=args.device, runtime=args.runtime)
    out_dir = args.output_dir or Path("outputs") / args.model.stem

    if args.watch:
        from runtime.watcher import watch_until_stopped

        return watch_until_stopped(model, args.watch, outputs, args.settle_seconds, args.retry_seconds,
                                   model_path=args.model)

    if args.evaluate:
        from evaluation.report import evaluate, format_summary

        check_output_folder(out_dir)
        metrics = evaluate(model, args.dir, out_dir, fit_seconds=model.fit_seconds, quiet=args.quiet)
        print(json_document(metrics) if args.json else format_summary(metrics))
        print(f"metrics: {out_dir / 'metrics.json'}  report: {out_dir / 'report.html'}", file=sys.stderr)
        return 3 if metrics["n_skipped"] else 0

    from inspection.scoring import Photo, folder_photos, records_csv, summary

    if args.image:
        photos = [Photo(args.image.name, args.image)]
    else:
        if not args.dir.is_dir():
            fail(f"{args.dir}: no such folder")
        paths = find_images(args.dir)
        if not paths:
            fail(f"{args.dir}: no images found (png, jpg, jpeg, bmp, tif, tiff)")
        photos = folder_photos(args.dir, paths)
    if args.threshold is not None:
        model.threshold = args.threshold
    heatmap_dir = out_dir / "heatmaps" if args.visualize else None
    if heatmap_dir is not None:  # every output is checked before scoring, not after the first photo
        check_output_folder(heatmap_dir)
    if args.report:
        check_writable(out_dir / "batch_report.html")
    if args.csv:
        check_writable(args.csv)
        check_not_an_input(args.csv, [photo.source for photo in photos])
        check_not_the_model(args.csv, args.model)
    records, gallery = score_all(model, photos, heatmap_dir, args.report, progress=not (args.quiet or args.json))
    if args.csv:  # the records first: whatever happens to the report, the run's results are kept
        write_atomically(args.csv, records_csv(records))
    report_path = None
    if args.report:
        from evaluation.gallery import write_batch_report

        origin = "set with --threshold for this run" if args.threshold is not None else None
        report_path = write_batch_report(model, args.image or args.dir, gallery, records,
                                         out_dir / "batch_report.html", origin)

    counts = summary(records)
    if args.json:
        print(json_document({"model": str(args.model), "threshold": model.threshold, "summary": counts,
                             "results": records}))
    else:
        print_table(records)
    written = [("heatmaps", f"{heatmap_dir}/" if heatmap_dir else None), ("report", report_path), ("csv", args.csv)]
    print(summary_line(counts), file=sys.stderr if args.json else sys.stdout)
    for name, path in written:
        if path is not None:
            print(f"{name}: {path}", file=sys.stderr if args.json else sys.stdout)
    if counts["unreadable"] == 0:
        return 0
    return 1 if args.image else 3


def score_all(
    model: Any, photos: list[Any], heatmap_dir: Path | None, thumbnails: bool, progress: bool
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Score batch by batch, naming each unreadable photo on stderr as it comes.

    Returns the records and, with ``thumbnails``, what the report keeps of each scored photo
    (small arrays only: the full-size photo and map do not outlive their batch).
    """
    from tqdm import tqdm

    from inspection.scoring import score_files

    records, gallery = [], []
    with tqdm(total=len(photos), desc="scoring", unit="img", disable=not progress, leave=False) as bar:
        for scored in score_files(model, photos, heatmap_dir):
            records.append(scored.record)
            if scored.prediction is None:
                tqdm.write(printable(f"error: {scored.record['error']}"), file=sys.stderr)
            elif thumbnails:
                from evaluation.gallery import scored_image  # only for a report

                gallery.append(scored_image(scored.photo.name, scored.image, scored.prediction))
            bar.update(1)
    return records, gallery


if __name__ == "__main__":
    sys.exit(run_cli(main))
