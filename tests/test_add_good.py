"""Photos confirmed good join a saved model without a refit (PatchCore.add_good, train.py --add-good)."""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest
import torch

from config import UserError
from conftest import small_config
from models.coreset import StreamingCoreset
from models.patchcore import ModelFileError, PatchCore
from evaluation.mvtec import load_test_split, train_images
from preprocessing.io import read_image
from train import main as train_main


@pytest.fixture(scope="module")
def half_model(small_screw_dir) -> PatchCore:
    """A model fitted on the first 6 of the 12 training photos; the other 6 are the ones to add."""
    model = PatchCore(small_config())
    model.fit(train_images(small_screw_dir)[:6], progress=False)
    return model


def fresh(model: PatchCore, tmp_path, name: str = "half.pkl") -> PatchCore:
    """The model as a file would give it back (add_good changes the model it runs on)."""
    model.save(tmp_path / name)
    return PatchCore.load(tmp_path / name)


def noise_photo() -> np.ndarray:
    """Coarse colour noise at a screw photo's size: nothing like any healthy patch."""
    noise = np.random.default_rng(1).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    return cv2.resize(noise, (1024, 1024), interpolation=cv2.INTER_NEAREST)


def test_an_update_keeps_every_old_patch_grows_the_bank_in_proportion_and_records_itself(
    half_model, small_screw_dir, tmp_path
):
    model = fresh(half_model, tmp_path)
    old_bank, old_scores = model.memory_bank.copy(), model.calibration_scores.copy()
    new = train_images(small_screw_dir)[6:]
    update = model.add_good(new, progress=False, source="line 1")
    np.testing.assert_array_equal(model.memory_bank[: len(old_bank)], old_bank)
    added = len(model.memory_bank) - len(old_bank)
    # the fit's rule: the bank holds coreset_sampling_ratio of the patches, here of the new ones
    per_photo = len(old_bank) / 6
    assert 0.5 * 6 * per_photo < added < 1.5 * 6 * per_photo
    assert model.n_train == 12
    # the old held-out scores are kept and each new photo adds its score against the bank before it joined
    assert model.calibration_scores.size == old_scores.size + 6
    np.testing.assert_array_equal(model.calibration_scores[: old_scores.size], old_scores)
    before = PatchCore.load(tmp_path / "half.pkl").predict(new)
    np.testing.assert_allclose(model.calibration_scores[old_scores.size :], [p.score for p in before], rtol=1e-4)
    assert "6 photos added on the line" in model.calibration_method
    assert update["photos"] == 6 and update["source"] == "line 1"
    assert update["bank_before"] == len(old_bank) and update["bank_after"] == len(model.memory_bank)
    assert update["threshold_after"] == model.threshold
    # the history survives a save and a load
    model.save(tmp_path / "updated.pkl")
    assert PatchCore.load(tmp_path / "updated.pkl").updates == [update]


def test_each_update_joins_the_history_and_starts_from_the_last_one(half_model, small_screw_dir, tmp_path):
    model = fresh(half_model, tmp_path)
    new = train_images(small_screw_dir)[6:]
    first = model.add_good(new[:3], progress=False, source="morning")
    second = model.add_good(new[3:], progress=False, source="evening")
    assert [update["source"] for update in model.updates] == ["morning", "evening"]
    assert second["threshold_before"] == first["threshold_after"]
    assert second["bank_before"] == first["bank_after"]
    assert "6 photos added on the line" in model.calibration_method


def test_an_update_is_reproducible_with_a_seed(half_model, small_screw_dir, tmp_path):
    new = train_images(small_screw_dir)[6:]
    first, second = fresh(half_model, tmp_path), fresh(half_model, tmp_path)
    first.add_good(new, progress=False)
    second.add_good(new, progress=False)
    np.testing.assert_array_equal(first.memory_bank, second.memory_bank)
    assert first.threshold == second.threshold


def test_a_photo_far_above_the_threshold_is_refused_unless_forced(half_model, small_screw_dir, tmp_path):
    model = fresh(half_model, tmp_path)
    bank = model.memory_bank.copy()
    good = read_image(train_images(small_screw_dir)[6])
    with pytest.raises(UserError, match="noise.png.*|look defective") as refused:
        model.add_good([good, noise_photo()], progress=False, labels=["good.png", "noise.png"])
    assert "noise.png" in str(refused.value) and "good.png" not in str(refused.value)
    np.testing.assert_array_equal(model.memory_bank, bank)  # nothing learnt from a refused update
    assert model.updates == []
    skipped = model.add_good([good, noise_photo()], progress=False, labels=["good.png", "noise.png"],
                             skip_refused=True)
    assert skipped["photos"] == 1 and skipped["refused"] == ["noise.png"]
    forced = fresh(half_model, tmp_path).add_good([noise_photo()], progress=False, labels=["noise.png"], force=True)
    assert forced["photos"] == 1 and forced["forced"] == ["noise.png"]


def test_an_update_refuses_a_model_fitted_with_other_backbone_weights(half_model, small_screw_dir, tmp_path):
    half_model.save(tmp_path / "half.pkl")
    state = pickle.loads((tmp_path / "half.pkl").read_bytes())
    state["weights_identity"] = "efficientnet_lite0:0123456789abcdef"
    (tmp_path / "other.pkl").write_bytes(pickle.dumps(state))
    model = PatchCore.load(tmp_path / "other.pkl")
    with pytest.raises(ModelFileError, match="backbone weights differ"):
        model.add_good(train_images(small_screw_dir)[6:7], progress=False)


def test_a_model_file_without_an_update_history_loads(half_model, tmp_path):
    half_model.save(tmp_path / "half.pkl")
    state = pickle.loads((tmp_path / "half.pkl").read_bytes())
    del state["updates"]
    (tmp_path / "older.pkl").write_bytes(pickle.dumps(state))
    assert PatchCore.load(tmp_path / "older.pkl").updates == []
    state["updates"] = [{"photos": "six"}]
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps(state))
    with pytest.raises(ModelFileError, match="updates"):
        PatchCore.load(tmp_path / "bad.pkl")


def test_add_good_on_the_command_line_keeps_the_previous_file(half_model, small_screw_dir, tmp_path, capsys):
    half_model.save(tmp_path / "line.pkl")
    original = (tmp_path / "line.pkl").read_bytes()
    folder = tmp_path / "confirmed"
    folder.mkdir()
    for image in train_images(small_screw_dir)[6:9]:
        (folder / image.name).symlink_to(image.resolve())
    assert train_main(["--add-good", "--model", str(tmp_path / "line.pkl"), "--data-dir", str(folder), "--quiet"]) == 0
    kept = tmp_path / "line.before-update-1.pkl"
    assert kept.read_bytes() == original
    assert "previous file kept as" in capsys.readouterr().out
    updated = PatchCore.load(tmp_path / "line.pkl")
    assert [update["photos"] for update in updated.updates] == [3]
    assert updated.updates[0]["source"] == str(folder)


def test_add_good_takes_no_settings(tmp_path, capsys):
    with pytest.raises(SystemExit) as usage:
        train_main(["--add-good", "--model", "m.pkl", "--data-dir", str(tmp_path), "--coreset-sampling-ratio", "0.5"])
    assert usage.value.code == 2
    assert "takes no settings" in capsys.readouterr().err


def test_a_defect_photo_scores_higher_after_the_update_than_a_healthy_one(half_model, small_screw_dir, tmp_path):
    """What the update is for: the bank learns the new healthy photos, not to accept everything."""
    model = fresh(half_model, tmp_path)
    model.add_good(train_images(small_screw_dir)[6:], progress=False)
    split = load_test_split(small_screw_dir)
    healthy = [sample.path for sample in split if not sample.is_defective]
    defects = [sample.path for sample in split if sample.is_defective]
    assert max(p.score for p in model.predict(healthy)) < max(p.score for p in model.predict(defects))


def test_known_patches_count_as_kept_so_greedy_picks_what_they_do_not_cover():
    rng = np.random.default_rng(0)
    covered = rng.normal(0, 0.01, (400, 16)).astype(np.float32)  # one tight cluster the bank holds
    uncovered = rng.normal(5, 0.01, (400, 16)).astype(np.float32) + np.eye(16, dtype=np.float32)[rng.integers(0, 16, 400)]
    known = covered[:50]
    coreset = StreamingCoreset(0.05, 128, 4096, seed=0, known=known)
    coreset.add(torch.from_numpy(np.concatenate([covered, uncovered])))
    picks = coreset.result()
    assert len(picks) == 40  # ratio x new patches, the known ones not counted
    assert (np.linalg.norm(picks, axis=1) > 2).sum() >= 38  # nearly all from the cluster the bank lacks
    assert coreset.covering_radius < 0.5  # every new patch lies near the known bank or a pick


def test_the_batch_report_plots_score_over_time_and_lists_the_updates(half_model, small_screw_dir, tmp_path):
    from inference import main as inference_main

    model = fresh(half_model, tmp_path)
    model.add_good(train_images(small_screw_dir)[6:8], progress=False, source="line 1")
    model.save(tmp_path / "updated.pkl")
    folder = small_screw_dir / "test"
    code = inference_main(["--model", str(tmp_path / "updated.pkl"), "--dir", str(folder), "--report", "--quiet",
                           "--output-dir", str(tmp_path / "out")])
    assert code == 0
    page = (tmp_path / "out" / "batch_report.html").read_text()
    assert "Score over time" in page and "aria-label=\"score over time\"" in page
    assert "update 1 (" in page and "added 2 photos confirmed good from line 1" in page
