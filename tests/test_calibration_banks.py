"""Calibration properties that hold whatever the threshold rule: scoring banks as dense as the final
bank, calibration scores on the scale of a prediction, the spread floor measured between different
bank patches, and re-calibration that reads only healthy training photos and honours ``--output``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import small_config
from models.calibration import promise
from models.patchcore import PatchCore
from preprocessing import io as photo_io
from evaluation.mvtec import train_images
from preprocessing.io import read_image


def test_each_photo_is_scored_by_a_bank_as_dense_as_the_final_bank(small_screw_dir, monkeypatch):
    """10 photos in 5 folds: each photo is scored by the other 4 folds' coresets together. Each fold
    keeps a 5/4 larger share, so their union holds as many patches as the final bank; a bank 4/5 as
    dense would score healthy photos higher than production ever will, and inflate the threshold."""
    photos = [read_image(path) for path in train_images(small_screw_dir)[:10]]
    scoring_banks: list[int] = []
    anomaly_maps = PatchCore._anomaly_maps
    monkeypatch.setattr(
        PatchCore, "_anomaly_maps",
        lambda self, batch: scoring_banks.append(len(self.memory_bank)) or anomaly_maps(self, batch),
    )
    model = PatchCore(small_config(preprocess="off", calibration_folds=5))  # every photo gives as many patches
    model.fit(photos, progress=False)
    final = len(model.memory_bank)
    assert len(scoring_banks) == 5 and model.calibration["count"] == 10
    assert all(abs(size - final) <= 0.03 * final for size in scoring_banks), (scoring_banks, final)


def test_calibration_scores_are_map_maxima_like_a_prediction(fitted_model, small_screw_dir):
    """A training photo scored by a bank that never saw it cannot look more normal than when it is
    scored by the final bank, which holds some of its own patches."""
    own = np.array([p.score for p in fitted_model.predict(train_images(small_screw_dir))])
    assert np.median(fitted_model.calibration_scores) >= np.median(own)
    assert fitted_model.calibration_scores.min() > 0


def test_the_spread_floor_is_measured_to_the_nearest_other_bank_patch(fitted_model):
    """Every patch's nearest patch in the bank is itself, at distance 0; the bank's unit of length is
    the median distance to the nearest *other* patch (worked out here by brute force)."""
    bank = np.random.default_rng(1).normal(size=(400, 16)).astype(np.float32)
    model = PatchCore(fitted_model.config)
    model.memory_bank = bank
    squared = ((bank[:, None, :] - bank[None, :, :]) ** 2).sum(axis=2)
    np.fill_diagonal(squared, np.inf)
    expected = float(np.median(np.sqrt(squared.min(axis=1))))
    assert expected > 1
    assert model._patch_spacing() == pytest.approx(expected, rel=1e-4)
    model.set_calibration(np.full(5, 10.0), "identical healthy scores")
    assert model.calibration["spread_floor"] > 0 and model.calibration_std >= model.calibration["spread_floor"]


def test_a_large_banks_spread_floor_and_threshold_are_the_same_for_the_same_seed(fitted_model):
    """The bank's unit of length is measured on a seeded sample of 1,000 of its patches: the same bank and
    seed give the same spread floor, and so the same threshold where the floor sets the spread."""
    bank = np.random.default_rng(2).normal(size=(5000, 16)).astype(np.float32)
    calibrations = []
    for _ in range(2):
        model = PatchCore(fitted_model.config)
        model.memory_bank = bank
        model.set_calibration(np.full(5, 10.0), "identical healthy scores")
        calibrations.append((model.calibration["spread_floor"], model.threshold))
    assert calibrations[0] == calibrations[1] and calibrations[0][1] > 10


def run_train(argv: list[str], monkeypatch, tmp_path: Path) -> list[Path]:
    """train.main as a user runs it from ``tmp_path``; returns every photo file it read."""
    import train

    opened: list[Path] = []
    real_read = photo_io._read_photo_file

    def recording_read(path, *limits):
        opened.append(Path(path).resolve())
        return real_read(path, *limits)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(photo_io, "_read_photo_file", recording_read)
    assert train.main(argv) == 0
    return opened


def test_recalibrate_with_output_writes_there_and_leaves_the_input_model_untouched(
    fitted_model, screw_dir, small_screw_dir, tmp_path, monkeypatch, capsys
):
    """And on an MVTec-layout folder it reads train/good only, never test/; the result line names the
    file written."""
    original = tmp_path / "line3.pkl"
    fitted_model.save(original)
    before = original.read_bytes()
    new_light = tmp_path / "new_light"  # healthy photos the model was not fitted on, and a test split
    (new_light / "train" / "good").mkdir(parents=True)
    for image in train_images(screw_dir)[-13:]:  # enough to hold 1 in 100
        (new_light / "train" / "good" / image.name).symlink_to(image.resolve())
    copy = new_light / "train" / "good" / "zz_copy.png"  # a photo twice: it counts once
    copy.write_bytes(train_images(screw_dir)[-1].read_bytes())
    (new_light / "test").symlink_to(small_screw_dir / "test")
    opened = run_train(["--recalibrate", "--model", str(original), "--data-dir", str(new_light),
                        "--output", "moved/line3_new_light.pkl", "--quiet"], monkeypatch, tmp_path)
    assert original.read_bytes() == before
    moved = PatchCore.load(tmp_path / "moved" / "line3_new_light.pkl")
    assert moved.memory_bank.tobytes() == fitted_model.memory_bank.tobytes()
    assert moved.calibration_method.startswith("re-calibrated on 13 healthy photos")
    assert set(opened) == {path.resolve() for path in train_images(new_light)}  # test/ is never read
    shown = capsys.readouterr().out
    assert "; saved to moved/line3_new_light.pkl (memory bank unchanged)" in shown
    assert shown.startswith(f"note: 1 photos are copies of others, used once each: {copy} = ")


def test_a_fit_writes_its_model_to_output_and_nowhere_else(small_screw_dir, tmp_path, monkeypatch):
    parts = tmp_path / "bolts" / "train" / "good"
    parts.mkdir(parents=True)
    for image in train_images(small_screw_dir)[:4]:
        (parts / image.name).symlink_to(image.resolve())
    run_train(["--data-dir", "bolts", "--backbone", "efficientnet_lite0", "--image-size", "64", "--quiet",
               "--output", "models_here/bolts_v2.pkl"], monkeypatch, tmp_path)
    assert PatchCore.load(tmp_path / "models_here" / "bolts_v2.pkl").n_train == 4
    assert not (tmp_path / "saved_models").exists()


def test_add_good_with_output_writes_there_and_leaves_the_input_model_untouched(
    fitted_model, screw_dir, tmp_path, monkeypatch, capsys
):
    """The result line names the file written and what its threshold promises; --quiet: no progress bars."""
    original = tmp_path / "line5.pkl"
    fitted_model.save(original)
    before = original.read_bytes()
    confirmed = tmp_path / "confirmed"
    confirmed.mkdir()
    for image in train_images(screw_dir)[-3:]:  # photos the model was not fitted on
        (confirmed / image.name).symlink_to(image.resolve())
    run_train(["--add-good", "--model", str(original), "--data-dir", str(confirmed), "--output", "grown/line5.pkl",
               "--quiet"], monkeypatch, tmp_path)
    assert original.read_bytes() == before
    grown = PatchCore.load(tmp_path / "grown" / "line5.pkl")
    assert [update["photos"] for update in grown.updates] == [3]
    assert sorted(path.name for path in tmp_path.glob("*.pkl")) == ["line5.pkl"]  # nothing written beside the input
    shown = capsys.readouterr()
    assert shown.out.splitlines()[0].endswith("; saved to grown/line5.pkl")  # nothing replaced, no backup named
    assert f"threshold {grown.threshold:.3f}: {promise(grown.calibration)}" in shown.out.splitlines()
    assert shown.err == ""
