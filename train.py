"""Fit a PatchCore model on healthy photos: ``python train.py --category screw``.

Reads ``data/mvtec_ad/<category>`` or any folder with ``train/good`` (``--data-dir``), writes the
model file, and, when the folder has a ``test`` split, evaluates it and writes a report (exit 3
when some test photos cannot be read: each is named, the rest are evaluated).

``--recalibrate --model M --data-dir D`` moves a saved model's threshold to the healthy photos of
D (``D/train/good`` when it exists, else every photo under D) without refitting its memory bank;
``--recalibrate --model M --false-alarm-rate R`` alone reads the threshold for another rate off the
held-out healthy scores M keeps.

``--add-good --model M --data-dir D`` adds the photos of D, confirmed good on the line, to the
memory bank of M without a refit and re-calibrates (docs/learning-on-the-line.md); the file it
replaces is kept as ``M.before-update-<n>.pkl``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import TYPE_CHECKING
from pathlib import Path

from config import (
    CATEGORY_DEFAULTS, Config, add_config_arguments, config_from_args, fail, first_few, printable, run_cli,
)
from evaluation.mvtec import load_test_split, train_images
from models.backend import onnx_path_for
from models.model_file import file_identity
from output_files import OutputError, check_not_an_input, check_writable
from preprocessing.io import find_images, read_image, refuse_unusable_photos

if TYPE_CHECKING:  # fitting imports torch: loaded only when a command fits or scores
    from models.patchcore import PatchCore

CONFIG_FIELDS = {item.name for item in fields(Config)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--category", help="MVTec AD category under data/mvtec_ad (e.g. screw, metal_nut)")
    source.add_argument("--data-dir", type=Path, help="any folder with train/good (and optionally test/, ground_truth/)")
    parser.add_argument("--output", type=Path, help="model file (default saved_models/patchcore_<name>.pkl)")
    parser.add_argument(
        "--recalibrate",
        action="store_true",
        help="fit nothing: score the healthy photos of --data-dir with the saved --model and make them its "
        "calibration set (threshold, sigma); without --data-dir, read the threshold for --false-alarm-rate off "
        "the held-out scores the model keeps. The memory bank is kept as it is. Written to --output, "
        "default: --model itself",
    )
    parser.add_argument(
        "--add-good",
        action="store_true",
        help="fit nothing: add the healthy photos of --data-dir (confirmed good on the line) to the saved "
        "--model's memory bank and re-calibrate; written to --output, default: --model itself, keeping the "
        "file it replaces as <model>.before-update-<n>.pkl",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="with --add-good: add photos even when they score far above the threshold (good_score_limit)",
    )
    parser.add_argument("--model", type=Path, help="with --recalibrate or --add-good: the saved model file")
    parser.add_argument(
        "--preprocess-only",
        action="store_true",
        help="fit nothing: write a preview sheet of every preprocessing step for a sample of images",
    )
    parser.add_argument(
        "--drop-unlike",
        action="store_true",
        help="fit again without the training photos listed as unlike the rest (the photos to check), "
        "once; the model file names the photos it left out",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars, only the result lines")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.recalibrate and not (args.model and (args.data_dir or args.false_alarm_rate is not None)):
        parser.error("--recalibrate needs --model (the saved model) and --data-dir (a folder of healthy photos "
                     "the model has not seen), or --false-alarm-rate alone to change only the rate")
    if not (args.category or args.data_dir or args.recalibrate):
        parser.error("one of the arguments --category --data-dir is required")
    if (args.recalibrate or args.add_good) and args.category:
        parser.error("--recalibrate and --add-good read the photos of --data-dir, not --category")
    if args.recalibrate and args.add_good:
        parser.error("--recalibrate and --add-good are two different updates; run one at a time")
    if args.add_good and not (args.model and args.data_dir):
        parser.error("--add-good needs --model (the saved model) and --data-dir (a folder of photos confirmed good)")
    if args.force and not args.add_good:
        parser.error("--force goes with --add-good")
    if args.model and not (args.recalibrate or args.add_good):
        parser.error("--model is only for --recalibrate and --add-good; train.py fits a new model from --data-dir "
                     "or --category")
    given = [name for name in vars(args) if name in CONFIG_FIELDS and getattr(args, name) is not None]
    if args.recalibrate and (args.config or set(given) - {"false_alarm_rate"}):
        parser.error("--recalibrate keeps the model's settings; of the settings only --false-alarm-rate applies")
    if args.add_good and (args.config or given):
        parser.error("--add-good keeps the model's settings (backbone, preprocessing, coreset ratio); "
                     "it takes no settings")
    if args.drop_unlike and (args.recalibrate or args.add_good or args.preprocess_only):
        parser.error("--drop-unlike goes with a fit, not with --recalibrate, --add-good or --preprocess-only")
    if args.preprocess_only and (args.recalibrate or args.add_good or args.output):
        parser.error("--preprocess-only fits nothing and writes only preview sheets; it goes without "
                     "--recalibrate, --add-good and --output")
    return args


def healthy_photos(data_dir: Path) -> list[Path]:
    """``train/good`` of an MVTec-layout folder, otherwise every photo under the folder."""
    if (data_dir / "train" / "good").is_dir():
        return train_images(data_dir)
    if not data_dir.is_dir():
        fail(f"{data_dir}: no such folder")
    paths = find_images(data_dir)
    if not paths:
        fail(f"{data_dir}: no images found (png, jpg, jpeg, bmp, tif, tiff)")
    return paths


def check_model_output(path: Path, photos: Sequence[Path] = ()) -> None:
    """The model file and the network's export written beside it (``<model>.onnx``), checked
    before any long work: each writable, and neither one of the ``photos`` the run reads."""
    for written in (path, onnx_path_for(path)):
        check_writable(written)
        check_not_an_input(written, photos, "one of the photos this run reads")


def recalibrate(args: argparse.Namespace) -> int:
    """Score new healthy photos with the saved bank and make them the model's calibration set."""
    from models.patchcore import PatchCore

    model = PatchCore.load(args.model)
    output = args.output or args.model
    since = model.file_identity if args.output is None else file_identity(output)  # refused if changed meanwhile
    before = model.threshold
    if args.data_dir is None:
        check_model_output(output)
        model.set_false_alarm_rate(args.false_alarm_rate)
        model.prepare_to_score()  # opens the network: saved elsewhere, the model keeps its export beside it
        done = (f"false_alarm_rate {args.false_alarm_rate:g}, read off the {model.calibration_scores.size} held-out "
                "healthy scores the model keeps")
    else:
        if args.false_alarm_rate is not None:
            model.config = model.config.replace(false_alarm_rate=args.false_alarm_rate)
        warn_without_fingerprints(model)
        paths = healthy_photos(args.data_dir)
        check_model_output(output, paths)  # before scoring, as for a fit
        paths = without_copies(paths, refuse_unusable_photos(paths, model.config, "photos"), "photos")
        model.recalibrate(paths, progress=not args.quiet, source=str(args.data_dir))
        done = f"re-calibrated on {len(paths)} healthy photos from {args.data_dir}"
    kept = model.save_update(output, since)
    print(printable(f"{done}: threshold {before:.3f} -> {model.threshold:.3f}; saved to {output} (memory bank "
                    "unchanged)" + (f", previous file kept as {kept}" if kept else "")))
    print_calibration(model)
    return 0


def warn_without_fingerprints(model: PatchCore) -> None:
    """A model file written before models kept their photos' fingerprints cannot refuse its own photos."""
    if not model.learnt_photos:
        print(printable(f"warning: {model.model_file} keeps no fingerprints of the photos in its memory bank (it was "
                        "saved before models kept them): it cannot tell them from new ones, so make sure these "
                        "are photos it was not fitted on"))


def without_copies(paths: list[Path], copies: list[tuple[Path, Path]], what: str) -> list[Path]:
    """``paths`` with each copy of another photo (``refuse_unusable_photos``) left out, the copies named."""
    if not copies:
        return paths
    named = first_few([f"{copy} = {original}" for copy, original in copies])
    print(printable(f"note: {len(copies)} {what} are copies of others, used once each: {named}"))
    left_out = {copy for copy, _ in copies}
    return [path for path in paths if path not in left_out]


def print_calibration(model: PatchCore) -> None:
    """What the threshold promises and how sure that is, in the line's words, then its warnings."""
    from models.calibration import promise

    print(f"threshold {model.threshold:.3f}: {promise(model.calibration)}")
    for warning in model.calibration["warnings"]:
        print(f"warning: {warning}")


def print_unlike_the_rest(model: PatchCore, heatmap_dir: Path) -> list[str]:
    """List the training photos that score far above the rest, with heatmaps from a bank that never saw them."""
    from inspection.scoring import heatmap_path, write_overlay

    listed = [entry["photo"] for entry in model.calibration.get("unlike_the_rest", [])]
    if not listed:
        return []
    print(f"check these {len(listed)} training photos: they look unlike the rest (a defect, another part, "
          f"a bad exposure?); --drop-unlike fits without them")
    for entry in model.calibration["unlike_the_rest"]:
        anomaly_map = model.held_out_maps.get(entry["photo"])
        where = ""
        if anomaly_map is not None:
            image = read_image(entry["photo"], model.config.max_image_pixels)
            out = heatmap_path(heatmap_dir, Path(entry["photo"]).name)
            try:
                entry["heatmap"] = str(write_overlay(model, image, model.prediction_from_map(anomaly_map), out))
                where = f", heatmap {out}"
            except OutputError as error:  # the fit is worth more than its picture: the model is still saved
                print(printable(f"warning: {error}; listed without its heatmap"), file=sys.stderr)
        print(printable(f"  {entry['photo']}: score {entry['score']:.3f} ({entry['score'] / model.threshold:.2f} x "
                        f"threshold){where}"))
    return listed


def add_good(args: argparse.Namespace) -> int:
    """Add photos confirmed good to a saved model's bank and re-calibrate, keeping the file it replaces."""
    from models.patchcore import PatchCore

    model = PatchCore.load(args.model)
    output = args.output or args.model
    since = model.file_identity if args.output is None else file_identity(output)  # refused if changed meanwhile
    warn_without_fingerprints(model)
    paths = healthy_photos(args.data_dir)
    check_model_output(output, paths)  # before scoring, as for a fit
    update = model.add_good(paths, progress=not args.quiet, source=str(args.data_dir), force=args.force)
    if not update["photos"]:  # every photo is in the bank already: the file stays as it is
        print(printable(f"added nothing from {args.data_dir}: the model has learnt all {len(paths)} photos already; "
                        "nothing saved"))
        return 0
    kept = model.save_update(output, since)
    for name in update["forced"]:
        print(printable(f"warning: {name} scores above {model.config.good_score_limit:g} x the threshold; added "
                        "because of --force"))
    for name in update["already_learnt"]:
        print(printable(f"note: {name} is a photo the model has learnt already; not added again"))
    print(f"added {update['photos']} photos confirmed good from {args.data_dir}: memory bank "
          f"{update['bank_before']} -> {update['bank_after']} patches, threshold {update['threshold_before']:.3f} -> "
          f"{update['threshold_after']:.3f} ({update['seconds']:.1f} s); saved to {output}"
          + (f", previous file kept as {kept}" if kept else ""))
    print_calibration(model)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.recalibrate:
        return recalibrate(args)
    if args.add_good:
        return add_good(args)
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

            decision = decide([read_image(path) for path in paths[:: max(1, len(paths) // 60)]], config)
            config = config.replace(**decision.changes)
            for reason in decision.reasons:
                print(f"preprocessing: {reason}")
        out_dir = Path("outputs") / "preprocess_preview"
        written = write_preview_sheets(paths, config, out_dir)
        print(f"wrote {len(written)} preview sheets to {out_dir}/")
        return 0

    model_path = args.output or Path("saved_models") / f"patchcore_{name}.pkl"
    report_dir = Path("outputs") / model_path.stem
    test_split = load_test_split(data_dir)
    masks = [sample.mask_path for sample in test_split if sample.mask_path]
    inputs = [*paths, *(sample.path for sample in test_split), *masks]
    check_model_output(model_path, inputs)  # before the fit
    has_test_split = bool(test_split)
    if has_test_split:
        check_writable(report_dir / "metrics.json")
    paths = without_copies(paths, refuse_unusable_photos(paths, config), "training photos")
    model = fit_model(paths, config, data_dir, args.quiet)
    listed = print_unlike_the_rest(model, report_dir / "unlike_the_rest")
    if listed and args.drop_unlike:
        kept = [path for path in paths if str(path) not in set(listed)]
        print(f"fitting again without the {len(listed)} photos listed above")
        model = fit_model(kept, config, data_dir, args.quiet)
        model.calibration["left_out"] = listed
        print_unlike_the_rest(model, report_dir / "unlike_the_rest")
    print_calibration(model)
    export = model.save(model_path)
    print(
        f"model saved to {model_path} ({model.memory_bank.shape[0]} patches in the memory bank, "
        f"threshold {model.threshold:.3f}, fit {model.fit_seconds:.1f} s)"
    )
    if export:
        print(f"network exported beside it to {export}: scoring and learning on the line need no torch")
    from models.coreset import RADIUS_SAMPLE  # loaded by the fit already

    print(f"memory bank: each of {RADIUS_SAMPLE:,} training patches sampled at random lies within "
          f"{model.coverage_radius:.3f} of a kept one (on the scale of the scores; all of them, when fewer)")
    if has_test_split:
        from evaluation.report import evaluate, format_summary

        metrics = evaluate(model, data_dir, report_dir, fit_seconds=model.fit_seconds, quiet=args.quiet)
        print(format_summary(metrics))
        print(f"metrics: {report_dir / 'metrics.json'}  report: {report_dir / 'report.html'}")
        return 3 if metrics["n_skipped"] else 0  # the model is saved; some test photos could not be read
    return 0


def fit_model(paths: list[Path], config: Config, data_dir: Path, quiet: bool) -> PatchCore:
    """Fit on ``paths`` and say what the fit decided."""
    from models.patchcore import PatchCore

    model = PatchCore(config)
    if not quiet:
        print(f"fitting {config.backbone} PatchCore on {len(paths)} healthy images from {data_dir}")
    model.fit(paths, progress=not quiet)
    for reason in model.preprocessing.get("reasons", []):
        print(f"preprocessing: {reason}")
    return model


if __name__ == "__main__":
    sys.exit(run_cli(main))
