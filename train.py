"""Fit a PatchCore model on healthy photos: ``python train.py --category screw``.

Reads ``data/mvtec_ad/<category>`` or any folder with ``train/good`` (``--data-dir``), writes the
model file, and, when the folder has a ``test`` split, evaluates it and writes a report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from config import CATEGORY_DEFAULTS, add_config_arguments, config_from_args, fail, run_cli
from preprocessing.io import load_test_split, train_images


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--category", help="MVTec AD category under data/mvtec_ad (e.g. screw, metal_nut)")
    source.add_argument("--data-dir", type=Path, help="any folder with train/good (and optionally test/, ground_truth/)")
    parser.add_argument("--output", type=Path, help="model file (default saved_models/patchcore_<name>.pkl)")
    parser.add_argument(
        "--preprocess-only",
        action="store_true",
        help="fit nothing: write a preview sheet of every preprocessing step for a sample of images",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars, only the result lines")
    add_config_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.category:
        data_dir = Path("data") / "mvtec_ad" / args.category
        name, category = f"mvtec_{args.category}", args.category
        if not data_dir.is_dir():
            fail(
                f"{data_dir}: no such folder. Get MVTec AD '{args.category}' as "
                "'python scripts/download_datasets.py' explains, or pass --data-dir FOLDER"
            )
    else:
        data_dir = args.data_dir
        name = data_dir.resolve().name
        category = name if name in CATEGORY_DEFAULTS else "custom"
    config = config_from_args(args, category)
    paths = train_images(data_dir)

    if args.preprocess_only:
        from preprocessing.pipeline import write_preview_sheets

        if config.preprocess == "auto":  # preview what the measurements decide (the fit may still choose 'off')
            from preprocessing.auto import decide
            from preprocessing.io import read_image

            decision = decide([read_image(path) for path in paths[:: max(1, len(paths) // 60)]], config)
            config = config.replace(**decision.changes)
            for reason in decision.reasons:
                print(f"preprocessing: {reason}")
        out_dir = Path("outputs") / "preprocess_preview"
        written = write_preview_sheets(paths, config, out_dir)
        print(f"wrote {len(written)} preview sheets to {out_dir}/")
        return 0

    from models.patchcore import PatchCore

    model_path = args.output or Path("saved_models") / f"patchcore_{name}.pkl"
    model = PatchCore(config)
    if not args.quiet:
        print(f"fitting {config.backbone} PatchCore on {len(paths)} healthy images from {data_dir}")
    model.fit(paths, progress=not args.quiet)
    for reason in model.preprocessing.get("reasons", []):
        print(f"preprocessing: {reason}")
    print(f"calibration: {model.calibration['method']}")
    for warning in model.calibration["warnings"]:
        print(f"warning: {warning}")
    model.save(model_path)
    print(
        f"model saved to {model_path} ({model.memory_bank.shape[0]} patches in the memory bank, "
        f"threshold {model.threshold:.3f}, fit {model.fit_seconds:.1f} s)"
    )
    if load_test_split(data_dir):
        from evaluation.report import evaluate, format_summary

        out_dir = Path("outputs") / model_path.stem
        metrics = evaluate(model, data_dir, out_dir, fit_seconds=model.fit_seconds, quiet=args.quiet)
        print(format_summary(metrics))
        print(f"metrics: {out_dir / 'metrics.json'}  report: {out_dir / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
