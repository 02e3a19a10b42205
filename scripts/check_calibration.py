"""Promised against observed false-alarm rate, on healthy photos each model never saw.

    .venv/bin/python scripts/check_calibration.py --data-dir data/mvtec_ad/screw --backbone efficientnet_lite0

The photos of ``train/good`` are split into seeded folds (``--folds``, 5). For each fold a model is
fitted on the other folds with the settings given (the same flags as ``train.py``), and the fold's
photos are scored against it; every training photo is held out once. Each false-alarm rate of
``--rates`` (default 0.01 and 0.05) is then set by the model's own calibration rule, and the table
shows how many held-out photos, and how many ``test/good`` photos if the folder has them, it flags.
The intervals are 95 % Wilson intervals over the photos counted (test/good photos, scored by every
model, count once in an interval's width). A last line gives how far the held-out
photos' scores lie from the calibration scores at the median and the 90th percentile. ``--json FILE``
writes the table.

``--fit-photos N`` asks how the promise holds for a set of N photos: each of ``--folds`` models is
fitted on N seeded photos of ``train/good`` and scores all the others.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import CATEGORY_DEFAULTS, add_config_arguments, config_from_args, fail, run_cli  # noqa: E402
from evaluation.mvtec import load_test_split, train_images  # noqa: E402
from output_files import check_writable, write_atomically  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with train/good (test/good optional)")
    parser.add_argument("--folds", type=int, default=5, help="folds of train/good; each is held out once (default 5)")
    parser.add_argument("--fit-photos", type=int, metavar="N",
                        help="fit each of --folds models on N seeded training photos and count on all the others")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.01, 0.05], metavar="RATE",
                        help="promised false-alarm rates to check (default 0.01 0.05)")
    parser.add_argument("--json", type=Path, help="also write the table as JSON to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    if not all(0 < rate < 0.5 for rate in args.rates):
        parser.error("--rates must lie between 0 and 0.5")
    return args


def _cell(counted: dict) -> str:
    if not counted["photos"]:
        return "-"
    low, high = counted["interval"]
    return f"{counted['flagged']} of {counted['photos']} ({counted['rate']:.1%}, {low:.1%}-{high:.1%})"


def main(argv: list[str] | None = None) -> int:
    from evaluation.calibration_check import held_out_folds, promised_and_observed, score_gap

    args = parse_args(argv)
    name = args.data_dir.resolve().name
    config = config_from_args(args, name if name in CATEGORY_DEFAULTS else "custom")
    photos = train_images(args.data_dir)
    test_good = [sample.path for sample in load_test_split(args.data_dir) if not sample.is_defective]
    if args.json:
        check_writable(args.json)  # before the fits, not after them
    try:
        folds = held_out_folds(photos, test_good, config, args.folds, not args.quiet, args.fit_photos)
    except ValueError as error:
        fail(f"{args.data_dir}: {error}")
    table = promised_and_observed(folds, args.rates)
    split = (f"{args.folds} models, each fitted on {args.fit_photos} seeded photos and scoring the others"
             if args.fit_photos else f"{args.folds} folds, each held out once")
    print(f"{name}: {len(photos)} training photos in {split}; "
          f"{len(test_good)} test/good photos scored by every model")
    print(f"{'promised':>9}  {'held-out training photos flagged':<36}  test/good photos flagged")
    for row in table:
        print(f"{row['promised']:>9.1%}  {_cell(row['held_out_training']):<36}  {_cell(row['test_good'])}")
    gap = score_gap(folds)
    print(f"held-out training photos score {gap['median']:+.3f} at the median and {gap['percentile_90']:+.3f} at the "
          "90th percentile against the calibration scores (mean over the models; near 0: the calibration scores "
          "stand in for new photos)")
    if args.json:
        record = {"data_dir": str(args.data_dir), "folds": args.folds, "fit_photos": args.fit_photos, "rows": table,
                  "score_gap": gap}
        write_atomically(args.json, json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
