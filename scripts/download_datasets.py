"""Get, check and create datasets in the MVTec AD folder layout.

MVTec AD cannot be downloaded by a script (it needs a registration and accepting its license), so
this tool explains how to get it and then verifies what the user extracted, naming every missing or
broken file. It also prepares a folder for a user's own photos and renders a license-free synthetic
set, so the toolkit can be tried without any download.

Run from the project root:  python scripts/download_datasets.py [--verify | --setup-custom | --synthetic]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # run as a script, sys.path holds scripts/ instead of the root
    sys.path.insert(0, str(PROJECT_ROOT))

from config import fail, printable, run_cli  # noqa: E402
from evaluation.mvtec import mask_path  # noqa: E402
from output_files import write_atomically  # noqa: E402
from preprocessing.io import IMAGE_SUFFIXES, ImageReadError, find_images, read_images  # noqa: E402
from scripts.synthetic_fasteners import (  # noqa: E402
    MARKER_NAME, PARTS, TABLES, SyntheticSettings, generate, listed_files,
)

# Image counts of the official MVTec AD archives (Bergmann et al., CVPR 2019).
OFFICIAL_COUNTS: dict[str, dict[str, int]] = {
    "screw": {
        "train/good": 320, "test/good": 41, "test/manipulated_front": 24, "test/scratch_head": 24,
        "test/scratch_neck": 25, "test/thread_side": 23, "test/thread_top": 23,
    },
    "metal_nut": {
        "train/good": 220, "test/good": 22, "test/bent": 25, "test/color": 22, "test/flip": 23,
        "test/scratch": 23,
    },
}
CUSTOM_DEFECT_KINDS = ("rust", "deformed", "corroded")

GUIDE = """\
How to get data for this toolkit
================================

1. MVTec AD, categories "screw" and "metal_nut" (license CC BY-NC-SA 4.0: non-commercial use only)
   This script cannot download MVTec AD for you: the archive is behind a registration form and
   you have to accept its license yourself.

   a) Official site: https://www.mvtec.com/company/research/datasets/mvtec-ad
      - open the download page and fill in the registration form,
      - accept the license (Creative Commons Attribution-NonCommercial-ShareAlike 4.0),
      - download the category archives screw.tar.xz and metal_nut.tar.xz,
      - extract them into {mvtec_root}/:
            mkdir -p {mvtec_root}
            tar -xJf screw.tar.xz -C {mvtec_root}
            tar -xJf metal_nut.tar.xz -C {mvtec_root}

   b) Kaggle mirror (needs a Kaggle account and an API token in ~/.kaggle/kaggle.json;
      the same license applies):
            pip install kaggle
            kaggle datasets download -d ipythonx/mvtec-ad
            unzip mvtec-ad.zip -d mvtec-ad
      then move (or link) the folders screw/ and metal_nut/ into {mvtec_root}/.

   Then check the result (counts, every image decodes, every defect has its mask):
            python scripts/download_datasets.py --verify --category all

2. Your own photos of screws and nuts
            python scripts/download_datasets.py --setup-custom
   creates {custom_root}/ with a README.md saying which photos go where.

3. A synthetic, license-free set (rendered in a few seconds; no download)
            python scripts/download_datasets.py --synthetic [--part screw|nut|plate|washer|bracket] [--seed 0]
   writes {synthetic_root}/ with rust, corrosion, scratch and deformation (a plate: missing chips)
   defects and exact masks; --table bright, --glare 1 and --border-touch 0.3 make the photos harder.

Expected folder layout (MVTec AD; any dataset for this toolkit):
    <dataset>/
        train/good/*.png                 healthy photos only (the model learns "normal" from them)
        test/good/*.png                  healthy photos to measure false alarms
        test/<kind>/NNN.png              defective photos, one folder per defect kind
        ground_truth/<kind>/NNN_mask.png masks for test/<kind>/NNN.png, white (255) = defect,
                                         same size as the photo
"""

CUSTOM_README = """\
# Your own fastener photos

Put photos here in the same layout as MVTec AD; the toolkit reads {suffixes} files.

| Folder | What goes in it | How many |
|---|---|---|
| `train/good/` | healthy parts only: no rust, no scratches, no deformation | at least 50, ideally 200 or more |
| `test/good/` | other healthy parts (not the training photos) to measure false alarms | 20 or more |
| `test/rust/` | parts with rust | as many as you have (10+ helps) |
| `test/corroded/` | parts with corrosion: pitting, dark stains | as many as you have |
| `test/deformed/` | bent, dented or crushed parts | as many as you have |
| `ground_truth/<kind>/` | optional masks for `test/<kind>/NNN.png`, named `NNN_mask.png` | one per defective photo |

Photos:

- Take every photo with the same camera, lens, distance, lighting and background: the model learns
  what "normal" looks like, so a change of setup looks like a defect.
- One part per photo, fully in view; one part type per dataset (screws or nuts, not both).
- More defect kinds? Add a folder `test/<kind>/` (and `ground_truth/<kind>/` for its masks).

Masks (optional, only needed for pixel-level metrics):

- a black-and-white PNG with exactly the size of its photo, white (255) where the defect is;
- name: the photo's name without extension plus `_mask.png`, e.g. `test/rust/007.jpg` ->
  `ground_truth/rust/007_mask.png`.

Check the folder at any time:

    python scripts/download_datasets.py --verify --data-dir {folder}
"""


@dataclass(frozen=True)
class Finding:
    """One line of the verification report."""

    ok: bool
    text: str


def count_findings(root: Path, folders: list[str], expected: dict[str, int] | None) -> list[Finding]:
    """Image count per folder: equal to the official count if known, else at least one."""
    findings = []
    for folder in folders:
        path = root / folder
        if not path.is_dir():
            findings.append(Finding(False, f"{path}: folder missing"))
            continue
        count = len(find_images(path))
        if expected is None:
            findings.append(Finding(count > 0, f"{folder}: {count} images" + ("" if count else f" in {path}")))
        elif count == expected[folder]:
            findings.append(Finding(True, f"{folder}: {count} images"))
        else:
            findings.append(Finding(False, f"{path}: {count} images, expected {expected[folder]}"))
    return findings


def mask_findings(root: Path, kind: str, masks_required: bool) -> list[Finding]:
    """Every defective photo has its mask (required for MVTec, all-or-none for own data), no stray masks."""
    images = find_images(root / "test" / kind)
    masks = find_images(root / "ground_truth" / kind)
    if not masks and not masks_required:
        return [Finding(True, f"test/{kind}: no masks (optional; pixel-level metrics will be skipped)")]
    findings = [Finding(False, f"{mask_path(root, image)}: mask missing for {image}")
                for image in images if not mask_path(root, image).is_file()]
    image_stems = {image.stem for image in images}
    findings += [Finding(False, f"{mask}: mask without a photo in {root / 'test' / kind}")
                 for mask in masks if mask.name.removesuffix("_mask.png") not in image_stems]
    if not findings:
        findings.append(Finding(True, f"test/{kind}: every photo has its mask"))
    return findings


def decode_findings(root: Path, kinds: list[str], workers: int) -> list[Finding]:
    """Decode every photo and mask on a thread pool; report unreadable files and mask/photo size mismatches."""
    folders = ["train/good"] + [f"test/{kind}" for kind in kinds]
    images = [path for folder in folders for path in find_images(root / folder)]
    masks = [mask_path(root, path) for path in images if path.parent.name != "good"]
    masks = [path for path in masks if path.is_file()]
    sizes: dict[Path, tuple[int, ...]] = {}
    findings = []
    for path, result in read_images(images + masks, workers=workers):
        if isinstance(result, ImageReadError):
            findings.append(Finding(False, str(result)))
        else:
            sizes[path] = result.shape[:2]
    for image in images:
        mask = mask_path(root, image)
        if image in sizes and mask in sizes and sizes[image] != sizes[mask]:
            (h, w), (mh, mw) = sizes[image], sizes[mask]
            findings.append(Finding(False, f"{mask}: size {mw}x{mh} differs from its photo {image} ({w}x{h})"))
    if not findings:
        findings.append(Finding(True, f"all {len(images)} photos and {len(masks)} masks decode, sizes match"))
    return findings


def synthetic_findings(root: Path) -> list[Finding]:
    """A synthetic set holds every file its marker lists; an interrupted --synthetic run leaves some out,
    and what it did write would otherwise pass every other check."""
    try:
        listed = listed_files(root)
    except ValueError as error:
        return [Finding(False, str(error))]
    missing = [name for name in listed if not (root / name).is_file()]
    if not missing:
        return [Finding(True, f"{MARKER_NAME}: all {len(listed)} files it lists are present")]
    return [Finding(False, f"{root}: {len(missing)} of the {len(listed)} files listed in {MARKER_NAME} are missing "
                           f"(first {missing[0]}); an interrupted --synthetic run leaves them out: run it again")]


def verify_dataset(
    root: Path, expected: dict[str, int] | None, workers: int = 1, decode: bool = True
) -> list[Finding]:
    """All checks of one dataset folder; `expected` holds official counts, None for own data.

    Own data needs only healthy training photos; a test folder counts once it holds photos (right
    after --setup-custom they are empty). ``decode=False`` skips decoding every photo (seconds
    instead of a minute on MVTec) for a quick layout check.
    """
    if not root.is_dir():
        return [Finding(False, f"{root}: folder missing (run this script without arguments to see how to get it)")]
    test_dir = root / "test"
    present = sorted(p.name for p in test_dir.iterdir() if p.is_dir()) if test_dir.is_dir() else []
    if expected is None:
        folders = ["train/good"] + [f"test/{kind}" for kind in present if find_images(test_dir / kind)]
    else:
        folders = list(expected)
    findings = count_findings(root, folders, expected)
    if expected is not None:
        findings += [Finding(False, f"{test_dir / kind}: not a folder of the official set")
                     for kind in present if f"test/{kind}" not in expected]
    defect_kinds = [kind for kind in present if kind != "good" and f"test/{kind}" in folders]
    for kind in defect_kinds:
        findings += mask_findings(root, kind, masks_required=expected is not None)
    if (root / MARKER_NAME).is_file():
        findings += synthetic_findings(root)
    if decode:
        findings += decode_findings(root, [kind for kind in present if f"test/{kind}" in folders], workers)
    return findings


def symbols() -> tuple[str, str]:
    """Pass/fail marks: coloured on a terminal, plain in logs, ASCII if the output cannot show ✓."""
    try:
        "✓✗".encode(sys.stdout.encoding or "ascii")
        marks = ("✓", "✗")
    except UnicodeEncodeError:
        marks = ("OK", "FAIL")
    if sys.stdout.isatty():
        return f"\033[32m{marks[0]}\033[0m", f"\033[31m{marks[1]}\033[0m"
    return marks


def report(name: str, findings: list[Finding]) -> bool:
    passed, failed = symbols()
    print(f"{name}:")
    for finding in findings:
        print(printable(f"  {passed if finding.ok else failed} {finding.text}"))
    problems = sum(not finding.ok for finding in findings)
    if problems:
        print(f"{failed} {name}: {problems} problem(s), see the lines above")
    else:
        print(f"{passed} {name}: dataset OK")
    return problems == 0


def run_verify(args: argparse.Namespace) -> int:
    workers = min(8, os.cpu_count() or 1)  # PNG decoding releases the GIL, so threads scale
    if args.data_dir is not None:
        return 0 if report(str(args.data_dir), verify_dataset(Path(args.data_dir), None, workers)) else 1
    categories = list(OFFICIAL_COUNTS) if args.category in (None, "all") else [args.category]
    results = [report(f"{category} ({Path(args.root) / category})",
                      verify_dataset(Path(args.root) / category, OFFICIAL_COUNTS[category], workers))
               for category in categories]
    return 0 if all(results) else 1


def run_setup_custom(out: Path) -> int:
    """Create the folder tree; never delete or overwrite anything already there (safe to rerun)."""
    if out.exists() and not out.is_dir():
        fail(f"{out} exists and is not a folder")
    folders = ["train/good", "test/good"] + [f"{top}/{kind}" for top in ("test", "ground_truth")
                                             for kind in CUSTOM_DEFECT_KINDS]
    for folder in folders:
        path = out / folder
        existed = path.is_dir()
        path.mkdir(parents=True, exist_ok=True)
        print(f"  {'exists ' if existed else 'created'} {path}")
    readme = out / "README.md"
    if readme.exists():
        print(f"  kept    {readme} (not overwritten)")
    else:
        suffixes = ", ".join(IMAGE_SUFFIXES)
        write_atomically(readme, CUSTOM_README.format(suffixes=suffixes, folder=out))
        print(f"  created {readme}")
    print(f"Put your photos into {out} as {readme} explains, then run:\n"
          f"  python scripts/download_datasets.py --verify --data-dir {out}")
    return 0


def run_synthetic(settings: SyntheticSettings, out: Path) -> int:
    started = time.perf_counter()
    try:
        written = generate(settings, out)
    except FileExistsError as error:  # a folder it did not make: a usage error, nothing written
        fail(str(error))
    masks = sum(path.parent.parent.name == "ground_truth" for path in written)
    print(f"wrote {len(written) - masks} photos and {masks} masks of {settings.part}s to {out} "
          f"(seed {settings.seed}, {settings.size} px) in {time.perf_counter() - started:.1f} s\n"
          f"check it: python scripts/download_datasets.py --verify --data-dir {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Explain how to get MVTec AD, verify datasets, set up a folder for own photos, "
                    "or render a synthetic set. Without arguments: print how to get the data.")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--verify", action="store_true", help="check counts, decoding and masks of a dataset")
    action.add_argument("--setup-custom", action="store_true", help="create the folders for your own photos")
    action.add_argument("--synthetic", action="store_true", help="render a license-free synthetic dataset")
    parser.add_argument("--category", choices=[*OFFICIAL_COUNTS, "all"],
                        help="--verify: MVTec category (default all)")
    parser.add_argument("--root", default="data/mvtec_ad", help="--verify: folder holding the MVTec categories")
    parser.add_argument("--data-dir", help="--verify: any dataset folder (no official counts checked)")
    parser.add_argument("--out", help="--setup-custom / --synthetic: output folder "
                                      "(default data/custom_fasteners or data/synthetic_fasteners)")
    synthetic = parser.add_argument_group("--synthetic options")
    defaults = SyntheticSettings()
    synthetic.add_argument("--part", choices=PARTS, default=defaults.part, help="one part type per dataset")
    synthetic.add_argument("--n-train", type=int, default=defaults.n_train, help="healthy training photos")
    synthetic.add_argument("--n-test-per-kind", type=int, default=defaults.n_test_per_kind,
                           help="test photos per defect kind and healthy test photos")
    synthetic.add_argument("--seed", type=int, default=defaults.seed, help="same seed, byte-identical files")
    synthetic.add_argument("--size", type=int, default=defaults.size, help="image side in pixels")
    synthetic.add_argument("--defect-scale", type=float, default=defaults.defect_scale,
                           help="multiplies defect sizes (smaller = harder to detect)")
    synthetic.add_argument("--max-rotation", type=float, default=defaults.max_rotation,
                           help="largest rotation of a part either way, in degrees")
    synthetic.add_argument("--table", choices=TABLES, default=defaults.table, help="what the part lies on")
    synthetic.add_argument("--glare", type=float, default=defaults.glare,
                           help="strength of saturated highlights on the part (0 = none, 1 = clipped white)")
    synthetic.add_argument("--border-touch", type=float, default=defaults.border_touch,
                           help="share of photos (0-1) whose part touches or crosses the image border")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data_dir is not None and (not args.verify or args.category is not None):
        parser.error("--data-dir goes with --verify and excludes --category")
    if args.verify:
        return run_verify(args)
    if args.setup_custom:
        return run_setup_custom(Path(args.out or "data/custom_fasteners"))
    if args.synthetic:
        try:
            settings = SyntheticSettings(
                part=args.part, n_train=args.n_train, n_test_per_kind=args.n_test_per_kind, size=args.size,
                seed=args.seed, defect_scale=args.defect_scale, max_rotation=args.max_rotation, table=args.table,
                glare=args.glare, border_touch=args.border_touch)
        except ValueError as error:  # e.g. --size 10
            parser.error(str(error))
        return run_synthetic(settings, Path(args.out or "data/synthetic_fasteners"))
    print(GUIDE.format(mvtec_root=args.root, custom_root="data/custom_fasteners",
                       synthetic_root="data/synthetic_fasteners"))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
