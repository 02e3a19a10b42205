from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from conftest import small_config
from models.patchcore import FORMAT_VERSION, ModelFileError, PatchCore, anomaly_confidence_from_sigma
from preprocessing.io import load_test_split, read_image, train_images


def test_predictions_are_on_the_original_photo(fitted_model, small_screw_dir):
    sample = load_test_split(small_screw_dir)[0]
    photo = read_image(sample.path)
    (prediction,) = fitted_model.predict([photo])
    assert prediction.anomaly_map.shape == photo.shape[:2]
    assert prediction.anomaly_map.dtype == np.float32
    assert np.isfinite(prediction.score) and prediction.score > 0
    assert 0.0 <= prediction.anomaly_confidence <= 1.0
    assert prediction.is_anomalous == (prediction.score > fitted_model.threshold)


def test_calibration_sets_threshold_from_held_out_healthy_images(fitted_model):
    # 12 training images, 10% held out -> 1 image calibrates, 11 build the bank.
    assert fitted_model.n_train == 11
    assert fitted_model.calibration_scores.shape == (1,)
    assert fitted_model.threshold == pytest.approx(float(fitted_model.calibration_scores[0]))


@pytest.mark.parametrize("sigma, expected", [(-2.0, 0.0), (0.0, 0.0), (1.0, 0.6827), (2.0, 0.9545), (3.0, 0.9973)])
def test_confidence_follows_the_sigma_rule(sigma, expected):
    assert anomaly_confidence_from_sigma(sigma) == pytest.approx(expected, abs=1e-4)


def test_sigma_is_measured_against_healthy_calibration(fitted_model, small_screw_dir):
    (prediction,) = fitted_model.predict([load_test_split(small_screw_dir)[-1].path])
    expected = (prediction.score - fitted_model.calibration_mean) / fitted_model.calibration_std
    assert prediction.sigma == pytest.approx(expected)
    assert prediction.anomaly_confidence == pytest.approx(anomaly_confidence_from_sigma(expected))


def test_same_seed_gives_identical_bank_and_scores(small_screw_dir):
    paths = train_images(small_screw_dir)
    test_paths = [s.path for s in load_test_split(small_screw_dir)[:3]]
    first, second = PatchCore(small_config(seed=3)), PatchCore(small_config(seed=3))
    first.fit(paths, progress=False)
    second.fit(paths, progress=False)
    assert np.array_equal(first.memory_bank, second.memory_bank)
    assert [p.score for p in first.predict(test_paths)] == [p.score for p in second.predict(test_paths)]


def test_save_and_load_round_trip(fitted_model, small_screw_dir, tmp_path):
    path = tmp_path / "model.pkl"
    fitted_model.save(path)
    loaded = PatchCore.load(path)
    assert np.array_equal(loaded.memory_bank, fitted_model.memory_bank)
    assert loaded.threshold == fitted_model.threshold
    assert loaded.config == fitted_model.config and loaded.config.seed == fitted_model.config.seed
    test_paths = [s.path for s in load_test_split(small_screw_dir)[:2]]
    assert [p.score for p in loaded.predict(test_paths)] == [p.score for p in fitted_model.predict(test_paths)]
    assert not list(tmp_path.glob(".model.pkl.*")), "no temporary file is left behind"


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_model_file_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = _RunsCode()
    payload.marker = marker
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"format_version": FORMAT_VERSION, "config": payload}))
    with pytest.raises(ModelFileError, match="plain data only"):
        PatchCore.load(evil)
    assert not marker.exists()


def test_wrong_format_version_and_truncated_files_are_clear_errors(fitted_model, tmp_path):
    path = tmp_path / "model.pkl"
    fitted_model.save(path)
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="truncated.pkl"):
        PatchCore.load(truncated)
    old = tmp_path / "old.pkl"
    old.write_bytes(pickle.dumps({"format_version": 0}))
    with pytest.raises(ModelFileError, match="version 0 is not supported"):
        PatchCore.load(old)
    with pytest.raises(ModelFileError, match="not found"):
        PatchCore.load(tmp_path / "missing.pkl")


def test_ivf_index_finds_nearly_the_same_neighbours(fitted_model):
    approximate = PatchCore(fitted_model.config.replace(knn_index="ivf", ivf_nprobe=16))
    approximate.memory_bank = fitted_model.memory_bank
    queries = fitted_model.memory_bank[::7] + 0.01
    _, exact_ids = fitted_model.index.search(queries, 1)
    _, ivf_ids = approximate.index.search(queries, 1)
    assert approximate.index.ntotal == len(fitted_model.memory_bank)
    assert np.mean(exact_ids == ivf_ids) > 0.9


def test_only_patches_near_the_part_are_stored_and_searched(fitted_model, small_screw_dir):
    everything = PatchCore(fitted_model.config.replace(object_patches_only=False))
    everything.fit(train_images(small_screw_dir), progress=False)
    assert len(fitted_model.memory_bank) < 0.8 * len(everything.memory_bank)
    sample = load_test_split(small_screw_dir)[0]
    (prediction,) = fitted_model.predict([sample.path])
    (full,) = everything.predict([sample.path])
    corner = (slice(0, 50), slice(0, 50))  # the photo's corner is table, far from the screw
    assert prediction.anomaly_map[corner].max() <= fitted_model.calibration_mean / 2
    assert prediction.score == pytest.approx(full.score, rel=0.25)


def awkward_photos(screw: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs a line camera or a user can produce, each decoded the way read_image would."""
    from preprocessing.io import to_rgb8

    grey = screw[..., 0]
    return {
        "blank": np.full((480, 640, 3), 128, np.uint8),
        "all white": np.full((300, 300, 3), 255, np.uint8),
        "all black": np.zeros((300, 300, 3), np.uint8),
        "1x1": np.full((1, 1, 3), 90, np.uint8),
        "5x5": np.random.default_rng(0).integers(0, 255, (5, 5, 3), dtype=np.uint8),
        "grey": to_rgb8(grey),
        "16-bit": to_rgb8(grey.astype(np.uint16) * 257),
        "RGBA": to_rgb8(np.dstack([grey, grey, grey, np.full_like(grey, 255)])),
    }


def test_awkward_inputs_are_scored_with_a_warning_where_a_step_gave_up(fitted_model, small_screw_dir):
    screw = read_image(load_test_split(small_screw_dir)[0].path)
    photos = awkward_photos(screw)
    predictions = dict(zip(photos, fitted_model.predict(list(photos.values()))))
    for name, prediction in predictions.items():
        assert np.isfinite(prediction.score), name
        assert prediction.anomaly_map.shape == photos[name].shape[:2], name
    for name in ("blank", "all white", "all black", "1x1", "5x5"):
        assert predictions[name].warnings, f"{name} should say which step fell back"
    for name in ("grey", "16-bit", "RGBA"):  # a real screw in another encoding: nothing to warn about
        assert predictions[name].warnings == [], name
        assert predictions[name].score == pytest.approx(predictions["grey"].score, rel=1e-3)


def test_a_failed_save_leaves_the_previous_model_file_intact(fitted_model, tmp_path, monkeypatch):
    path = tmp_path / "model.pkl"
    fitted_model.save(path)
    before = path.read_bytes()

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("preprocessing.io.os.replace", disk_full)
    with pytest.raises(OSError):
        fitted_model.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pkl"]


def test_the_score_is_read_off_the_map_the_overlay_draws(fitted_model, small_screw_dir):
    """Flagged means some pixel of the shown map is above the threshold: the score is the map's maximum."""
    predictions = fitted_model.predict([s.path for s in load_test_split(small_screw_dir)[:4]])
    for prediction in predictions:
        assert prediction.score == float(prediction.anomaly_map.max())
        assert prediction.threshold == fitted_model.threshold
        assert prediction.normalized_score == pytest.approx(prediction.score / fitted_model.threshold)
        assert prediction.is_anomalous == bool((prediction.anomaly_map > prediction.threshold).any())


def test_set_calibration_takes_the_percentile_and_records_the_method(fitted_model, tmp_path):
    model = PatchCore.load(_saved(fitted_model, tmp_path))
    scores = np.arange(1.0, 101.0)
    model.set_calibration(scores, "a hundred healthy photos")
    assert model.threshold == pytest.approx(np.percentile(scores, model.config.threshold_percentile))
    assert model.calibration_mean == pytest.approx(50.5)
    model.save(tmp_path / "again.pkl")
    reloaded = PatchCore.load(tmp_path / "again.pkl")
    assert reloaded.calibration_method == "a hundred healthy photos"
    assert reloaded.calibration_scores.size == 100 and reloaded.threshold == model.threshold
    with pytest.raises(ValueError, match="at least one finite"):
        model.set_calibration(np.array([]), "nothing")


def test_fit_records_its_calibration(fitted_model):
    assert fitted_model.calibration_method == "held-out 10% of the training photos"


def test_recalibration_moves_the_threshold_and_keeps_the_bank_bit_identical(fitted_model, small_screw_dir, tmp_path):
    model = PatchCore.load(_saved(fitted_model, tmp_path))
    bank_before = model.memory_bank.copy()
    healthy = [s.path for s in load_test_split(small_screw_dir) if not s.is_defective]
    model.recalibrate(healthy, progress=False, source="new camera")
    assert model.memory_bank.tobytes() == bank_before.tobytes()
    expected = [p.score for p in fitted_model.predict(healthy)]  # scored with the same, untouched bank
    np.testing.assert_allclose(model.calibration_scores, expected, rtol=1e-6)
    assert model.threshold == pytest.approx(np.percentile(expected, model.config.threshold_percentile))
    assert model.threshold != fitted_model.threshold
    assert model.calibration_method == f"re-calibrated on {len(healthy)} healthy photos from new camera"


def _saved(model: PatchCore, folder: Path) -> Path:
    path = folder / "copy.pkl"
    model.save(path)
    return path
