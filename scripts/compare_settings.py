"""Compare settings on your own training photos, with synthetic defects painted on: which suits the part?

    .venv/bin/python scripts/compare_settings.py --data-dir data/mvtec_ad/screw --backbone efficientnet_lite0 \\
        --try image_size=320 --try heatmap_sigma=6

The healthy photos of ``train/good`` are split 70/30 (``--splits`` seeded splits, 3). For the
settings given (the same flags as ``train.py``) and for each ``--try`` on top of them, a model is
fitted on the 70 % and scores the held-out 30 % and a copy of each with a synthetic defect painted
on (rust, corrosion, a scratch, a chip or a dent, ``--defect-scale`` times its usual size). The
table shows, at each model's own threshold, the painted copies caught and the healthy photos
flagged, with the AUROC of healthy against painted and the CPU time. Nothing under ``test/`` is
read. ``--json FILE`` writes the table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import (  # noqa: E402
    CATEGORY_DEFAULTS,
    Config,
    UserError,
    add_config_arguments,
    config_from_args,
    fail,
    run_cli,
    settings_from_pairs,
)
from evaluation.mvtec import train_images  # noqa: E402
from output_files import check_writable, write_atomically  # noqa: E402

BASELINE = "as set"
PAIR_START = re.compile(r",(?=\s*[A-Za-z_][\w-]*\s*=)")  # a comma before another SETTING=


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with train/good")
    parser.add_argument("--try", dest="tries", action="append", default=[], metavar="SETTING=VALUE[,SETTING=VALUE]",
                        help="a candidate: settings changed from the ones given, values written as in a config "
                        "file, e.g. image_size=320 or false_alarm_rate=1e-3 (repeatable)")
    parser.add_argument("--splits", type=int, default=3, help="seeded 70/30 splits of train/good (default 3)")
    parser.add_argument("--defect-scale", type=float, default=0.55,
                        help="size of the painted defects, relative to their usual size (default 0.55: small ones)")
    parser.add_argument("--json", type=Path, help="also write the table as JSON to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_arguments(parser)
    return parser.parse_args(argv)


def candidate(base: Config, text: str) -> Config:
    """``base`` with the changes of one ``--try``: ``SETTING=VALUE`` pairs split at the commas that
    start another ``SETTING=``, so a list value keeps its own (``layers=[_blocks.3, _blocks.7]``)."""
    return base.replace(**settings_from_pairs(PAIR_START.split(text)))


def _row(name: str, result: dict[str, Any]) -> str:
    low, high = result["recall_interval"]
    caught = f"{result['painted_caught']} of {result['painted']} ({result['recall']:.1%}, {low:.1%}-{high:.1%})"
    flagged = f"{result['healthy_flagged']} of {result['photos']}"
    return f"{name:<28}  {caught:<34}  {flagged:<15}  {result['auroc']:>6.3f}  {result['cpu_seconds']:>7.1f} s"


def check_networks(base: Config, tries: dict[str, Config]) -> None:
    """Each ``--try``'s device and backbone weights (a file, a download) are there before the first fit:
    a missing one would otherwise stop the comparison after the fits before it. The settings as given
    need no look: their fit comes first."""
    from models.feature_extractor import build_backbone, resolve_device

    checked = {(base.device, base.backbone, base.weights_path)}
    for name, settings in tries.items():
        network = (settings.device, settings.backbone, settings.weights_path)
        if network in checked:
            continue
        checked.add(network)
        try:
            resolve_device(settings.device)
            build_backbone(settings.backbone, settings.weights_path)
        except UserError as error:
            fail(f"--try {name}: {error}")


def main(argv: list[str] | None = None) -> int:
    from evaluation.settings_check import compare_settings

    args = parse_args(argv)
    name = args.data_dir.resolve().name
    base = config_from_args(args, name if name in CATEGORY_DEFAULTS else "custom")
    candidates = {BASELINE: base}
    for text in args.tries:  # every candidate is checked before the first fit
        try:
            candidates[text] = candidate(base, text)
        except ValueError as error:
            fail(f"--try {text}: {error}")
    check_networks(base, {name: settings for name, settings in candidates.items() if name != BASELINE})
    photos = train_images(args.data_dir)
    if args.json:
        check_writable(args.json)
    try:
        results = compare_settings(photos, candidates, args.splits, args.defect_scale, base.seed,
                                   not args.quiet, base.segmentation_method)
    except ValueError as error:
        fail(f"{args.data_dir}: {error}")
    held = results[BASELINE]["photos"] // args.splits
    splits = f"{args.splits} seeded split{'s' if args.splits != 1 else ''}"
    print(f"{name}: {len(photos)} training photos, {splits}, each holding out {held} healthy "
          f"photos and a painted copy of each (defects at {args.defect_scale:g} x their usual size)")
    if (unpainted := results[BASELINE]["photos"] - results[BASELINE]["painted"]) > 0:
        print(f"note: {unpainted} of {results[BASELINE]['photos']} copies left unpainted: their parts have no room "
              "for the defect at this scale")
    print(f"{'setting':<28}  {'painted copies caught at threshold':<34}  {'healthy flagged':<15}  {'AUROC':>6}  {'CPU':>9}")
    for candidate_name, result in results.items():
        print(_row(candidate_name, result))
    if args.json:
        record = {"data_dir": str(args.data_dir), "splits": args.splits, "defect_scale": args.defect_scale,
                  "settings": results}
        write_atomically(args.json, json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
