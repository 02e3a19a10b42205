"""Ground-truth masks: every non-zero pixel is defect, whatever grey level the mask tool wrote."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from evaluation.mvtec import load_test_split, train_images
from preprocessing.io import read_mask


def test_every_non_zero_pixel_of_a_mask_is_defect(tmp_path):
    levels = np.array([[0, 1, 64], [128, 200, 255]], np.uint8)
    cv2.imwrite(str(tmp_path / "grey_mask.png"), levels)
    cv2.imwrite(str(tmp_path / "colour_mask.png"), np.dstack([np.zeros_like(levels), levels, np.zeros_like(levels)]))
    expected = levels > 0
    assert np.array_equal(read_mask(tmp_path / "grey_mask.png"), expected)
    assert np.array_equal(read_mask(tmp_path / "colour_mask.png"), expected)


def mvtec_folder(root: Path, photos: dict[str, list[str]], masks: dict[str, list[str]]) -> Path:
    """A tiny MVTec-layout folder: ``photos`` per kind in test/, ``masks`` (photo stems) per kind in ground_truth/."""
    blank = np.zeros((8, 8), np.uint8)
    for kind, stems in photos.items():
        (root / "test" / kind).mkdir(parents=True)
        for stem in stems:
            cv2.imwrite(str(root / "test" / kind / f"{stem}.png"), blank)
    for kind, stems in masks.items():
        (root / "ground_truth" / kind).mkdir(parents=True)
        for stem in stems:
            cv2.imwrite(str(root / "ground_truth" / kind / f"{stem}_mask.png"), blank + 255)
    return root


def test_the_test_split_labels_each_photo_by_its_kind_folder_with_its_own_mask(tmp_path: Path) -> None:
    """Every evaluation figure rests on these labels: a good photo counted as defective, a kind named after
    the wrong folder or a mask paired with another photo would skew the AUROC and the per-defect table."""
    root = mvtec_folder(tmp_path, {"good": ["000", "001"], "scratch_head": ["000", "001", "002"]},
                        {"scratch_head": ["000", "002"]})  # 001 has no mask: an image-level label only
    split = load_test_split(root)
    gt = root / "ground_truth" / "scratch_head"
    assert [(s.path.relative_to(root).as_posix(), s.kind, s.mask_path) for s in split] == [
        ("test/good/000.png", "good", None),
        ("test/good/001.png", "good", None),
        ("test/scratch_head/000.png", "scratch_head", gt / "000_mask.png"),
        ("test/scratch_head/001.png", "scratch_head", None),
        ("test/scratch_head/002.png", "scratch_head", gt / "002_mask.png"),
    ]
    assert [s.is_defective for s in split] == [False, False, True, True, True]


def test_an_empty_training_folder_is_refused_by_name(tmp_path: Path) -> None:
    """Fitting on no photos would fail later with an unhelpful error; the user must learn which folder is empty."""
    (tmp_path / "train" / "good").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="folder has no images"):
        train_images(tmp_path)
