"""The calibration check (evaluation/calibration_check.py, scripts/check_calibration.py): every training
photo is held out exactly once from a model that never saw it, test/good photos are counted by every
fold's model, and each promised rate is set by the model's own rule and counted strictly above."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import evaluation.calibration_check as calibration_check
from evaluation.calibration_check import HeldOutFold, held_out_folds, promised_and_observed, score_gap
from evaluation.metrics import wilson_interval
from evaluation.mvtec import load_test_split, train_images
from conftest import small_config


class RecordingModel:
    """Stands in for PatchCore: records what it is fitted on; a photo's score is its number."""

    fitted: list[list[str]] = []

    def __init__(self, config) -> None:
        self.config = config

    def fit(self, photos, progress=True) -> None:
        RecordingModel.fitted.append([str(photo) for photo in photos])

    def predict(self, photos):
        return [SimpleNamespace(score=float(Path(photo).stem)) for photo in photos]


def test_every_training_photo_is_held_out_exactly_once_by_a_model_fitted_without_it(monkeypatch):
    monkeypatch.setattr(calibration_check, "PatchCore", RecordingModel)
    RecordingModel.fitted = []
    photos = [Path(f"{number}.png") for number in range(11)]
    test_good = [Path("100.png"), Path("101.png")]
    folds = held_out_folds(photos, test_good, small_config(), folds=3, progress=False)
    assert len(folds) == 3 == len(RecordingModel.fitted)
    held_out = [sorted(fold.held_out.astype(int).tolist()) for fold in folds]
    assert sorted(number for fold in held_out for number in fold) == list(range(11))  # each photo exactly once
    for fold, fitted_on in zip(held_out, RecordingModel.fitted):
        assert fold and sorted(int(Path(photo).stem) for photo in fitted_on) == sorted(set(range(11)) - set(fold))
    assert all(fold.test_good.tolist() == [100.0, 101.0] for fold in folds)  # scored by every fold's model


def test_with_fit_photos_each_model_is_fitted_on_that_many_photos_and_scores_all_the_others(monkeypatch):
    monkeypatch.setattr(calibration_check, "PatchCore", RecordingModel)
    RecordingModel.fitted = []
    photos = [Path(f"{number}.png") for number in range(11)]
    folds = held_out_folds(photos, [Path("100.png")], small_config(), 3, False, fit_photos=4)
    assert len(folds) == 3 == len(RecordingModel.fitted)
    for fold, fitted_on in zip(folds, RecordingModel.fitted):
        fitted = {int(Path(photo).stem) for photo in fitted_on}
        assert len(fitted) == 4 and sorted(fold.held_out.astype(int).tolist()) == sorted(set(range(11)) - fitted)
        assert fold.test_good.tolist() == [100.0]
    assert len({tuple(fitted_on) for fitted_on in RecordingModel.fitted}) == 3  # a seeded sample per model
    with pytest.raises(ValueError, match="fit_photos must be 2 to 10 for 11 training photos, got 11"):
        held_out_folds(photos, [], small_config(), 3, False, fit_photos=11)


def test_with_fit_photos_one_model_is_enough_and_none_is_refused(monkeypatch):
    """--folds 1 --fit-photos N fits a single model on N photos: the smallest question the check can ask."""
    monkeypatch.setattr(calibration_check, "PatchCore", RecordingModel)
    RecordingModel.fitted = []
    photos = [Path(f"{number}.png") for number in range(11)]
    (fold,) = held_out_folds(photos, [], small_config(), 1, False, fit_photos=4)
    assert len(RecordingModel.fitted) == 1 and fold.held_out.size == 7 and fold.test_good.size == 0
    with pytest.raises(ValueError, match="folds must be at least 1, got 0"):
        held_out_folds(photos, [], small_config(), 0, False, fit_photos=4)


@pytest.mark.parametrize("folds", [1, 6])
def test_fold_counts_that_leave_a_fold_under_two_held_out_photos_are_refused(folds):
    with pytest.raises(ValueError, match="folds must be 2 to 5 for 11 training photos"):
        held_out_folds([Path(f"{number}.png") for number in range(11)], [], small_config(), folds, progress=False)


def test_each_promised_rate_is_set_by_the_models_rule_and_counts_scores_strictly_above():
    """Threshold 3 for 1 %, 2 for 5 % (not the model's own threshold 5): a score equal to it passes."""
    model = SimpleNamespace(threshold=5.0, threshold_for={0.01: 3.0, 0.05: 2.0}.__getitem__)
    folds = [HeldOutFold(model, np.array([1.0, 2.0, 3.0, 4.0]), np.array([3.5, 1.0])),
             HeldOutFold(model, np.array([2.5, 3.0]), np.array([3.2, 1.0]))]
    one, five = promised_and_observed(folds, [0.01, 0.05])
    assert one["promised"] == 0.01 and five["promised"] == 0.05
    assert one["held_out_training"] == {"flagged": 1, "photos": 6, "rate": 1 / 6, "interval": wilson_interval(1, 6)}
    # the same two test/good photos scored by both models: 2 of 4 scorings, as wide as 1 of 2 photos
    assert one["test_good"] == {"flagged": 2, "photos": 4, "rate": 0.5, "interval": wilson_interval(1, 2)}
    assert (five["held_out_training"]["flagged"], five["test_good"]["flagged"]) == (4, 2)


def test_the_score_gap_compares_held_out_scores_with_each_models_own_calibration_scores():
    """Model one: held-out median 3 against calibration median 1 (+2); model two: 1 against 3 (-2)."""
    low, high = SimpleNamespace(calibration_scores=np.array([0.0, 1.0, 2.0])), SimpleNamespace(
        calibration_scores=np.array([2.0, 3.0, 4.0]))
    folds = [HeldOutFold(low, np.array([2.0, 3.0, 4.0]), np.empty(0)),
             HeldOutFold(high, np.array([0.0, 1.0, 2.0]), np.empty(0))]
    assert score_gap(folds) == {"median": 0.0, "percentile_90": 0.0}
    assert score_gap(folds[:1]) == pytest.approx({"median": 2.0, "percentile_90": 2.0})
    assert score_gap(folds[1:]) == pytest.approx({"median": -2.0, "percentile_90": -2.0})


def test_without_test_good_photos_the_row_has_no_rate_and_no_interval_rather_than_zero():
    """No test/good folder: 0 of 0 photos is no observation, so the --json file shows null, not a 0 % rate."""
    model = SimpleNamespace(threshold=5.0, threshold_for={0.01: 3.0}.__getitem__)
    (row,) = promised_and_observed([HeldOutFold(model, np.array([1.0, 4.0]), np.empty(0))], [0.01])
    assert row["test_good"] == {"flagged": 0, "photos": 0, "rate": None, "interval": None}
    assert row["held_out_training"]["rate"] == 0.5


def test_the_score_gap_is_the_mean_over_the_models_of_the_median_and_of_the_90th_percentile_gap():
    """Calibration 0, 1, 2 (median 1, 90th percentile 1.8) for three models. Held out 1, 2, 3 twice: gaps
    (+1, +1); held out 0, 1, 12 (median 1, 90th percentile 1 + 0.8 * 11 = 9.8): gaps (0, +8).
    Means over the three models: median 2/3, 90th percentile 10/3 (a median over the models would give 1, 1)."""
    model = SimpleNamespace(calibration_scores=np.array([0.0, 1.0, 2.0]))
    folds = [HeldOutFold(model, np.array([1.0, 2.0, 3.0]), np.empty(0)),
             HeldOutFold(model, np.array([1.0, 2.0, 3.0]), np.empty(0)),
             HeldOutFold(model, np.array([0.0, 1.0, 12.0]), np.empty(0))]
    assert score_gap(folds) == pytest.approx({"median": 2 / 3, "percentile_90": 10 / 3})


def test_the_script_scores_train_good_held_out_and_test_good_alone(small_screw_dir, tmp_path, monkeypatch, capsys):
    """Two real folds on the screw subset: 12 training photos each held out once, the 2 test/good
    photos scored by both fold models; no defective test photo is read."""
    import scripts.check_calibration as script

    given = {}
    real = calibration_check.held_out_folds

    def recording(photos, test_good, *args):
        given.update(photos=list(photos), test_good=list(test_good))
        return real(photos, test_good, *args)

    monkeypatch.setattr(calibration_check, "held_out_folds", recording)
    out = tmp_path / "check.json"
    assert script.main(["--data-dir", str(small_screw_dir), "--folds", "2", "--backbone", "efficientnet_lite0",
                        "--image-size", "64", "--preprocess", "off", "--quiet", "--json", str(out)]) == 0
    assert given["photos"] == train_images(small_screw_dir)
    assert given["test_good"] == [s.path for s in load_test_split(small_screw_dir) if s.kind == "good"]
    rows = json.loads(out.read_text())["rows"]
    assert [row["promised"] for row in rows] == [0.01, 0.05]
    assert all(row["held_out_training"]["photos"] == 12 and row["test_good"]["photos"] == 4 for row in rows)
    assert "12 training photos in 2 folds, each held out once; 2 test/good photos" in capsys.readouterr().out
    assert json.loads(out.read_text())["fit_photos"] is None
    assert set(json.loads(out.read_text())["score_gap"]) == {"median", "percentile_90"}


@pytest.mark.parametrize("rate", ["0", "0.5"])
def test_the_script_refuses_rates_outside_zero_to_a_half(rate, capsys):
    import scripts.check_calibration as script

    with pytest.raises(SystemExit) as stopped:
        script.parse_args(["--data-dir", "x", "--rates", "0.01", rate])
    assert stopped.value.code == 2 and "--rates must lie between 0 and 0.5" in capsys.readouterr().err


def test_a_training_folder_that_cannot_be_read_is_named_with_the_reason(tmp_path, monkeypatch, capsys):
    """It listed as empty ("folder has no images"), which sent the user looking for missing photos."""
    import scripts.check_calibration as script
    from config import run_cli

    good = tmp_path / "train" / "good"
    good.mkdir(parents=True)

    def refused(path):  # what a chmod 000 folder does to a user other than root
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "scandir", refused)
    assert run_cli(lambda: script.main(["--data-dir", str(tmp_path), "--backbone", "efficientnet_lite0"])) == 2
    assert capsys.readouterr().err.strip() == f"error: {good}: Permission denied"
