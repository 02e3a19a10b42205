"""Shared fixtures: the real MVTec AD screw data (read in place, never copied) and a small fitted model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from config import Config

SCREW_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_ad" / "screw"


@pytest.fixture(scope="session")
def screw_dir() -> Path:
    if not (SCREW_DIR / "train" / "good").is_dir():
        pytest.skip(f"MVTec AD screw data not found at {SCREW_DIR}")
    return SCREW_DIR


def link_subset(source: Path, target: Path, n_train: int, n_test_per_kind: int) -> Path:
    """A small MVTec-layout folder of symlinks into the real data (no copy of the data set)."""
    for image in sorted((source / "train" / "good").glob("*.png"))[:n_train]:
        (target / "train" / "good").mkdir(parents=True, exist_ok=True)
        os.symlink(image, target / "train" / "good" / image.name)
    for kind_dir in sorted((source / "test").iterdir()):
        for image in sorted(kind_dir.glob("*.png"))[:n_test_per_kind]:
            (target / "test" / kind_dir.name).mkdir(parents=True, exist_ok=True)
            os.symlink(image, target / "test" / kind_dir.name / image.name)
            mask = source / "ground_truth" / kind_dir.name / f"{image.stem}_mask.png"
            if mask.is_file():
                (target / "ground_truth" / kind_dir.name).mkdir(parents=True, exist_ok=True)
                os.symlink(mask, target / "ground_truth" / kind_dir.name / mask.name)
    return target


@pytest.fixture(scope="session")
def small_screw_dir(screw_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return link_subset(screw_dir, tmp_path_factory.mktemp("screw_small"), n_train=12, n_test_per_kind=2)


def small_config(**changes) -> Config:
    """The offline backbone at a small size: seconds to fit on a dozen images (the eight steps as switched)."""
    return Config(**{"backbone": "efficientnet_lite0", "image_size": 128, "batch_size": 8, "preprocess": "on", **changes})


@pytest.fixture(scope="session")
def fitted_model(small_screw_dir: Path):
    from models.patchcore import PatchCore
    from evaluation.mvtec import train_images

    model = PatchCore(small_config())
    model.fit(train_images(small_screw_dir), progress=False)
    return model
