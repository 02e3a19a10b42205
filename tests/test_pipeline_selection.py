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
from models import pipeline_selection
from models.patchcore import PatchCore
from models.pipeline_selection import choose_preprocessing, paint_defects
from preprocessing import io as photo_io
from evaluation.mvtec import train_images
from scripts.synthetic_fasteners import SyntheticSettings, generate
from synthetic.defects import DEFECT_KINDS


AUTO = small_config(preprocess="auto", image_size=64)  # what a user leaves as set, at a size that fits in seconds


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
        model = PatchCore(AUTO)
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


def recording(built: list[NearestPhotoModel]) -> Callable[[Config], NearestPhotoModel]:
    """A candidate factory for ``choose_preprocessing`` that keeps every stand-in it builds in ``built``."""

    def new_model(config: Config) -> NearestPhotoModel:
        built.append(NearestPhotoModel(config))
        return built[-1]

    return new_model


def test_the_candidate_that_separates_the_painted_defects_wins_and_is_never_scored_on_its_own_bank(nut_dir):
    built: list[NearestPhotoModel] = []
    new_model = recording(built)
    chosen, record = choose_preprocessing(train_images(nut_dir), AUTO, new_model)
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

    chosen, record = choose_preprocessing(glinting_bars(), AUTO, new_model)
    assert any(reason.startswith("glare inpainting left to the trial") for reason in record["reasons"])
    assert set(record["candidates"]) == {"decided", "inpainted", "off"} and len(built) == 3
    assert record["chosen"] == ("inpainted" if inpainting_wins else "decided")
    assert chosen.preprocess == "on" and chosen.inpaint_specular is inpainting_wins
    assert record["switches"]["inpaint_specular"] is inpainting_wins


def test_six_photos_are_enough_for_a_trial_three_build_each_model_and_three_are_scored(nut_dir):
    built: list[NearestPhotoModel] = []
    new_model = recording(built)
    chosen, record = choose_preprocessing(train_images(nut_dir)[:6], AUTO, new_model)
    assert set(record["candidates"]) == {"decided", "off"} and len(built) == 2
    assert all(len(model.bank) == 3 and len(model.scored) == 2 * 3 for model in built)
    assert "a trial on 3 training photos" in record["reasons"][-1] and "built from 3 others" in record["reasons"][-1]


def test_a_large_set_builds_each_model_from_30_photos_and_scores_15():
    built: list[NearestPhotoModel] = []
    new_model = recording(built)
    photos = [part_photo(2.0, 3.0 * index) for index in range(62)]
    chosen, record = choose_preprocessing(photos, AUTO, new_model)
    assert all(len(model.bank) == 30 and len(model.scored) == 2 * 15 for model in built)
    assert "a trial on 15 training photos" in record["reasons"][-1] and "built from 30 others" in record["reasons"][-1]


def test_candidates_that_separate_equally_well_keep_the_measured_steps(nut_dir):
    def new_model(config: Config) -> NearestPhotoModel:
        return NearestPhotoModel(config, right_way_up=lambda config: True)  # every candidate scores alike

    chosen, record = choose_preprocessing(train_images(nut_dir), AUTO, new_model)
    assert len({result["rank_score"] for result in record["candidates"].values()}) == 1
    assert record["chosen"] == "decided" and chosen.preprocess == "on"


class FlippedMapModel(NearestPhotoModel):
    """Scores every candidate alike, but only the 'off' candidate's map points at the defect."""

    def predict(self, images: list[np.ndarray]) -> list[SimpleNamespace]:
        predictions = super().predict(images)
        if self.sign < 0:
            for prediction in predictions:
                prediction.anomaly_map = -np.flip(prediction.anomaly_map)
                prediction.score = float(prediction.anomaly_map.mean())
        return predictions


def test_where_scores_separate_equally_the_candidate_whose_maps_find_the_defects_wins(nut_dir):
    chosen, record = choose_preprocessing(train_images(nut_dir), AUTO, FlippedMapModel)
    scores = record["candidates"]
    assert scores["off"]["image_auroc"] == scores["decided"]["image_auroc"]
    # the defective copies' maps, read on their paint
    assert scores["off"]["pixel_auroc"] > 0.75 > scores["decided"]["pixel_auroc"]
    assert record["chosen"] == "off" and chosen.preprocess == "off"


def test_when_off_wins_the_chosen_config_is_the_users_with_preprocessing_off(nut_dir):
    config = AUTO
    chosen, record = choose_preprocessing(train_images(nut_dir), config, NearestPhotoModel)
    assert record["chosen"] == "off" and chosen == config.replace(preprocess="off")
    assert record["switches"] == {name: getattr(config.replace(preprocess="off"), name) for name in record["switches"]}


def test_the_inpainted_candidate_differs_from_the_measured_steps_in_glare_inpainting_alone():
    switches = {}
    for inpainting_wins in (True, False):
        def new_model(config: Config) -> NearestPhotoModel:
            def right_way_up(config: Config) -> bool:
                return config.preprocess == "on" and config.inpaint_specular is inpainting_wins

            return NearestPhotoModel(config, right_way_up)

        _, record = choose_preprocessing(glinting_bars(), AUTO, new_model)
        switches[record["chosen"]] = record["switches"]
    assert switches["inpainted"] == {**switches["decided"], "inpaint_specular": True}


def test_too_few_photos_for_a_trial_still_resolve_auto_into_the_measured_steps(nut_dir):
    chosen, record = choose_preprocessing(train_images(nut_dir)[:5], AUTO, NearestPhotoModel)
    assert "candidates" not in record and record["chosen"] == "decided"
    assert chosen.preprocess == "on"
    assert record["switches"] == {name: getattr(chosen, name) for name in record["switches"]}


def test_the_painted_defects_take_every_kind_in_turn(monkeypatch):
    kinds: list[str] = []
    real_paint = pipeline_selection.paint_defect

    def recording_paint(photo, part, kind, rng, scale=1.0):
        kinds.append(kind)
        return real_paint(photo, part, kind, rng, scale)

    monkeypatch.setattr(pipeline_selection, "paint_defect", recording_paint)
    photos = [part_photo(2.0, 20 * index) for index in range(2 * len(DEFECT_KINDS))]
    paint_defects(photos, "otsu", np.random.default_rng(0))
    assert kinds == list(DEFECT_KINDS) * 2


def test_where_no_part_is_found_defects_are_painted_within_the_central_half_of_the_frame():
    blank = [np.full((240, 320, 3), 90, np.uint8) for _ in range(2 * len(DEFECT_KINDS))]
    _, masks = paint_defects(blank, "otsu", np.random.default_rng(0))
    assert len(DEFECT_KINDS) <= len(masks) < len(blank)  # a dent or missing material needs a part's edge: no copy
    for mask in masks:
        assert mask.any(), "a copy without a defect would count as a missed defect"
        rows, cols = np.nonzero(mask)
        assert rows.min() >= 60 and rows.max() < 180 and cols.min() >= 80 and cols.max() < 240


def test_where_no_defect_fits_the_parts_auto_keeps_the_measured_steps_and_says_why(nut_dir, monkeypatch):
    """Unchanged copies would rank every candidate on healthy photos alone: no trial, the measured steps."""
    monkeypatch.setattr(pipeline_selection, "paint_defect", lambda photo, part, *args: (photo, np.zeros_like(part)))
    chosen, record = choose_preprocessing(train_images(nut_dir), AUTO, NearestPhotoModel)
    assert "candidates" not in record and record["chosen"] == "decided" and chosen.preprocess == "on"
    assert record["reasons"][-1] == "pipeline: the measured steps (no synthetic defect fits these parts to compare pipelines)"


def test_defects_are_painted_on_the_part_as_the_decided_mask_finds_it(nut_dir, monkeypatch):
    methods: list[str] = []
    real_decide, real_segment = pipeline_selection.decide, pipeline_selection.segment_object

    def grabcut_decided(images, config):
        decision = real_decide(images, config)
        decision.changes["segmentation_method"] = "grabcut"
        return decision

    def recording_segment(image, method="otsu", **options):
        methods.append(method)
        return real_segment(image, method=method, **options)

    monkeypatch.setattr(pipeline_selection, "decide", grabcut_decided)
    monkeypatch.setattr(pipeline_selection, "segment_object", recording_segment)
    choose_preprocessing(train_images(nut_dir), AUTO, NearestPhotoModel)
    assert methods and set(methods) == {"grabcut"}
