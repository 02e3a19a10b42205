"""preprocess auto, second half: candidates ranked on synthetic defects painted on training photos only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from config import Config
from conftest import part_photo, small_config
from models.patchcore import PatchCore
from models.pipeline_selection import choose_preprocessing
from preprocessing import io as photo_io
from evaluation.mvtec import train_images
from scripts.synthetic_fasteners import SyntheticSettings, generate


@pytest.fixture(scope="module")
def nut_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("nuts")
    generate(SyntheticSettings(part="nut", n_train=8, n_test_per_kind=2, size=128, seed=3), out)
    return out


@pytest.fixture(scope="module")
def auto_fit(nut_dir: Path) -> tuple[PatchCore, list[str]]:
    """A model fitted with preprocess auto, and every file that fitting opened."""
    opened: list[str] = []
    real_read = photo_io._read_photo_file  # where every photo and mask is read from disk

    def recording_read(path, *limits):
        opened.append(str(Path(path).resolve()))
        return real_read(path, *limits)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(photo_io, "_read_photo_file", recording_read)
        model = PatchCore(small_config(preprocess="auto", image_size=64))
        model.fit(train_images(nut_dir), progress=False)
    return model, opened


def test_auto_and_calibration_never_read_the_test_split(auto_fit, nut_dir):
    model, opened = auto_fit
    train_dir = str((nut_dir / "train").resolve())
    assert opened and all(path.startswith(train_dir) for path in opened), sorted(set(opened))
    assert set(model.preprocessing["candidates"]) == {"decided", "off"}  # the ranking really ran
    assert model.calibration["count"] == 8


def test_auto_resolves_into_switches_recorded_in_the_model_file(auto_fit, tmp_path):
    model, _ = auto_fit
    assert model.config.preprocess in ("on", "off")  # what inference repeats, photo by photo
    record = model.preprocessing
    assert record["chosen"] in ("decided", "off") and record["reasons"][-1].startswith("pipeline:")
    assert record["switches"]["preprocess"] == model.config.preprocess
    assert any(reason.startswith("rotation off") for reason in record["reasons"])  # a hex nut has no long axis
    model.save(tmp_path / "nut.pkl")
    loaded = PatchCore.load(tmp_path / "nut.pkl")
    assert loaded.preprocessing == record and loaded.config == model.config


class NearestPhotoModel:
    """A stand-in candidate that needs no backbone: a photo's map is its pixel difference from the
    nearest bank photo. The candidate ``right_way_up`` picks (by default 'off') reads it as is; the
    others read it upside down, so they rank every painted defect below its healthy photo. It
    records what it was fitted on and scored."""

    def __init__(self, config: Config, right_way_up: Callable[[Config], bool] = lambda config: config.preprocess == "off") -> None:
        self.sign = 1.0 if right_way_up(config) else -1.0
        self.bank: list[np.ndarray] = []
        self.scored: list[np.ndarray] = []

    def fit(self, images: list[np.ndarray], progress: bool = True, calibrate: bool = True) -> None:
        self.bank = [np.asarray(image, np.float32) for image in images]

    def predict(self, images: list[np.ndarray]) -> list[SimpleNamespace]:
        self.scored = list(images)
        predictions = []
        for image in images:
            differences = [np.abs(np.asarray(image, np.float32) - photo).mean(axis=2) for photo in self.bank]
            anomaly_map = self.sign * min(differences, key=lambda difference: difference.mean())
            predictions.append(SimpleNamespace(score=float(anomaly_map.mean()), anomaly_map=anomaly_map))
        return predictions


def test_the_candidate_that_separates_the_painted_defects_wins_and_is_never_scored_on_its_own_bank(nut_dir):
    built: list[NearestPhotoModel] = []

    def new_model(config: Config) -> NearestPhotoModel:
        built.append(NearestPhotoModel(config))
        return built[-1]

    chosen, record = choose_preprocessing(train_images(nut_dir), small_config(preprocess="auto", image_size=64), new_model)
    assert record["chosen"] == "off" and chosen.preprocess == "off"
    assert record["candidates"]["off"]["image_auroc"] > record["candidates"]["decided"]["image_auroc"]
    assert len(built) == 2
    for model in built:
        healthy = model.scored[: len(model.scored) // 2]
        assert healthy and not any(np.array_equal(photo, kept) for photo in healthy for kept in model.bank)


def glinting_bars(count: int = 16) -> list[np.ndarray]:
    """Bright bars at varied angles, each with a highlight on about 1.5 % of it: glare the trial decides on."""
    photos = [part_photo(2.0, 20.0 * index) for index in range(count)]
    for photo in photos:
        cv2.circle(photo, (100, 100), 3, (255, 255, 255), -1)
    return photos


@pytest.mark.parametrize("inpainting_wins", [True, False])
def test_glare_left_to_the_trial_is_inpainted_exactly_when_inpainting_separates_better(inpainting_wins):
    built: list[NearestPhotoModel] = []

    def right_way_up(config: Config) -> bool:
        return config.preprocess == "on" and config.inpaint_specular is inpainting_wins

    def new_model(config: Config) -> NearestPhotoModel:
        built.append(NearestPhotoModel(config, right_way_up))
        return built[-1]

    chosen, record = choose_preprocessing(glinting_bars(), small_config(preprocess="auto", image_size=64), new_model)
    assert any(reason.startswith("glare inpainting left to the trial") for reason in record["reasons"])
    assert set(record["candidates"]) == {"decided", "inpainted", "off"} and len(built) == 3
    assert record["chosen"] == ("inpainted" if inpainting_wins else "decided")
    assert chosen.preprocess == "on" and chosen.inpaint_specular is inpainting_wins
    assert record["switches"]["inpaint_specular"] is inpainting_wins
