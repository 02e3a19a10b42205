"""The MVTec AD folder layout: ``train/good/`` healthy photos, ``test/<kind>/`` labelled photos and
``ground_truth/<kind>/NNN_mask.png`` defect masks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from preprocessing.io import IMAGE_SUFFIXES, find_images


@dataclass(frozen=True)
class LabelledImage:
    """One test image with its label: defect kind ('good' for healthy) and mask path if known."""

    path: Path
    kind: str
    mask_path: Path | None

    @property
    def is_defective(self) -> bool:
        return self.kind != "good"


def train_images(data_dir: str | Path) -> list[Path]:
    """The healthy training photos of an MVTec-layout folder, or a clear error."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such folder")
    good = data_dir / "train" / "good"
    if not good.is_dir():
        raise FileNotFoundError(f"{data_dir}: expected healthy training photos in {good}")
    paths = find_images(good)
    if not paths:
        raise FileNotFoundError(f"{good}: folder has no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def mask_path(data_dir: str | Path, image: Path) -> Path:
    """Where MVTec AD keeps the ground truth of ``test/<kind>/NNN.png``: ``ground_truth/<kind>/NNN_mask.png``."""
    return Path(data_dir) / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"


def load_test_split(data_dir: str | Path) -> list[LabelledImage]:
    """Every image under ``test/<kind>/`` with its ground-truth mask when one exists."""
    test_dir = Path(data_dir) / "test"
    samples = []
    if not test_dir.is_dir():
        return samples
    for kind_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        for path in find_images(kind_dir):
            mask = mask_path(data_dir, path)
            samples.append(LabelledImage(path, kind_dir.name, mask if mask.is_file() else None))
    return samples


def auroc_problem(data_dir: str | Path, samples: list[LabelledImage]) -> str | None:
    """Why ``samples`` cannot give an AUROC, or None: it ranks defective photos above healthy ones,
    so it needs some of each: without them it is undefined (NaN), and a table of NaN measures nothing."""
    test_dir = Path(data_dir) / "test"
    if not samples:
        return f"{data_dir}: no test split (expected photos in {test_dir}/good/ and {test_dir}/<defect kind>/)"
    defective = sum(sample.is_defective for sample in samples)
    if 0 < defective < len(samples):
        return None
    if defective:
        which, missing = "defective", "healthy ones in good/"
    else:
        which, missing = "healthy", "defective ones in a folder per defect kind"
    return f"{test_dir}: the {len(samples)} test photos evaluated are all {which}; AUROC needs {missing} too"
