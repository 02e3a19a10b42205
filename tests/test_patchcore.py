from __future__ import annotations

import math
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from config import Config, UserError
from conftest import part_photo, small_config
from models.calibration import fewest_photos, fit_tail, promise, rate_interval, read_at
from models.patchcore import PatchCore, anomaly_confidence_from_sigma
from evaluation.mvtec import load_test_split, train_images
from preprocessing.io import read_image


def test_predictions_are_on_the_original_photo(fitted_model, small_screw_dir):
    sample = load_test_split(small_screw_dir)[0]
    photo = read_image(sample.path)
    (prediction,) = fitted_model.predict([photo])
    assert prediction.anomaly_map.shape == photo.shape[:2]
    assert prediction.anomaly_map.dtype == np.float32
    assert np.isfinite(prediction.score) and prediction.score > 0
    assert 0.0 <= prediction.anomaly_confidence <= 1.0
    assert prediction.is_anomalous == (prediction.score > fitted_model.threshold)


def test_photos_scored_together_get_the_verdicts_they_get_alone(fitted_model, small_screw_dir):
    """One k-NN search serves a whole batch: every photo must still get its own scores and Eq. 7 weight."""
    paths = [sample.path for sample in load_test_split(small_screw_dir)[::3]][:5]
    together = fitted_model.predict(paths)
    alone = [fitted_model.predict([path])[0] for path in paths]
    assert len({round(p.score, 3) for p in alone}) == len(paths)  # distinct photos, distinct scores
    for batched, single in zip(together, alone):
        assert batched.score == pytest.approx(single.score, rel=1e-4)
        np.testing.assert_allclose(batched.anomaly_map, single.anomaly_map, rtol=1e-4, atol=1e-4 * single.score)


def test_calibration_scores_every_training_photo(fitted_model):
    # 12 training photos, 5 folds: every photo builds the bank and every photo is scored.
    assert fitted_model.n_train == 12
    assert fitted_model.calibration_scores.shape == (12,)
    assert fitted_model.calibration["count"] == 12 and "5-fold" in fitted_model.calibration["method"]


def test_threshold_is_the_false_alarm_rate_quantile_of_a_gumbel_law_through_two_quantiles(fitted_model):
    scores = fitted_model.calibration_scores.astype(np.float64)
    low, high = np.quantile(scores, [0.25, 0.9])
    scale = (high - low) / (-math.log(-math.log(0.9)) + math.log(-math.log(0.25)))
    location = low + scale * math.log(-math.log(0.25))
    # read where thresholds from this many photos flag the rate on average (12 photos: as far as it may go)
    exceedance, average = read_at(scores.size, 0.01)
    assert exceedance == 0.001
    expected = location - scale * math.log(-math.log(1 - exceedance))
    assert fitted_model.threshold == pytest.approx(expected, rel=1e-5)
    assert fitted_model.calibration["false_alarm_rate"] == fitted_model.config.false_alarm_rate == 0.01
    low_per_1000, high_per_1000 = fitted_model.calibration["interval_per_1000"]
    assert fitted_model.calibration["false_alarms_per_1000"] == round(1000 * average, 1) > 10
    assert low_per_1000 < fitted_model.calibration["false_alarms_per_1000"] < high_per_1000
    # the interval is the one for this rate (1 %), from these scores and this seed
    low, high = rate_interval(scores, 0.01, fitted_model.calibration["spread_floor"], fitted_model.config.seed)
    assert (low_per_1000, high_per_1000) == pytest.approx((1000 * low, 1000 * high))


def test_one_odd_healthy_photo_does_not_move_the_threshold(fitted_model):
    odd = fitted_model.calibration_scores.copy()
    odd[np.argmax(odd)] *= 3
    model = PatchCore(fitted_model.config)
    model.memory_bank = fitted_model.memory_bank
    model.set_calibration(odd, "test")
    assert model.threshold == pytest.approx(fitted_model.threshold)


def test_calibration_scores_come_from_banks_that_never_saw_the_photo(small_screw_dir):
    # One photo unlike all others (coarse colour noise): only a bank without it sees it as new.
    paths = train_images(small_screw_dir)[:9]
    photos = [read_image(path) for path in paths]
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    photos[4] = cv2.resize(noise, photos[4].shape[1::-1], interpolation=cv2.INTER_NEAREST)
    model = PatchCore(small_config(preprocess="off"))
    model.fit(photos, progress=False)
    others = np.delete(model.calibration_scores, 4)
    assert model.calibration_scores[4] > 1.4 * np.median(others)


def test_past_the_calibration_sample_photos_share_the_bank_and_scored_photos_still_never_see_themselves(
    small_screw_dir, monkeypatch
):
    """A set larger than MAX_CALIBRATION_PHOTOS scores a seeded sample. The other photos join no fold
    (one coreset each, not two): their share of the final bank is part of every scoring bank, so
    those banks stay as large as the final bank, and a scored photo's own patches are in none."""
    import models.patchcore as patchcore

    monkeypatch.setattr(patchcore, "MAX_CALIBRATION_PHOTOS", 5)
    paths = train_images(small_screw_dir)[:10]
    photos = [read_image(path) for path in paths]
    config = small_config(preprocess="off")
    sampled = np.flatnonzero(np.random.default_rng(config.seed).permutation(len(photos)) < 5)
    odd = int(sampled[0])  # unlike all others: only a bank without it sees it as new
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    photos[odd] = cv2.resize(noise, photos[odd].shape[1::-1], interpolation=cv2.INTER_NEAREST)
    bank_sizes = []
    anomaly_maps = PatchCore._anomaly_maps
    monkeypatch.setattr(
        PatchCore, "_anomaly_maps", lambda self, batch: bank_sizes.append(len(self.memory_bank)) or anomaly_maps(self, batch)
    )
    model = PatchCore(config)
    model.fit(photos, progress=False)
    assert model.calibration["count"] == 5 and model.calibration_scores.shape == (5,)
    final = len(model.memory_bank)
    assert bank_sizes and all(0.8 * final <= size <= 1.2 * final for size in bank_sizes), (bank_sizes, final)
    others = np.delete(model.calibration_scores, list(sampled).index(odd))
    assert model.calibration_scores[list(sampled).index(odd)] > 1.4 * np.median(others)


def test_every_photo_is_scored_against_as_many_bank_patches_as_the_final_bank_holds(small_screw_dir, monkeypatch):
    """Each fold's coreset keeps n/(n-1) of the ratio, so the other folds together hold as many
    patches as the final bank: a healthy photo's calibration score is not inflated by a sparser bank."""
    bank_sizes = []
    anomaly_maps = PatchCore._anomaly_maps
    monkeypatch.setattr(
        PatchCore, "_anomaly_maps", lambda self, batch: bank_sizes.append(len(self.memory_bank)) or anomaly_maps(self, batch)
    )
    model = PatchCore(small_config(preprocess="off", calibration_folds=3))
    model.fit(train_images(small_screw_dir), progress=False)
    final = len(model.memory_bank)
    assert len(bank_sizes) == 3 and all(0.9 * final <= size <= 1.1 * final for size in bank_sizes), (bank_sizes, final)


def test_the_patches_kept_are_those_touching_the_part_and_one_patch_of_margin():
    """A patch that sees any of the part is kept, and so is the ring around them (its features still
    see the part's edge); farther patches are table alone."""
    from preprocessing.pipeline import Preprocessed

    mask = np.zeros((64, 64), bool)
    mask[26:30, 26:30] = True  # within patch (3, 3) of the 8 x 8 grid of 8-pixel patches
    item = Preprocessed(np.zeros((64, 64, 3), np.uint8), np.eye(3), mask, (64, 64), background_zeroed=True)
    kept = PatchCore(small_config())._object_patches([item], 8, 8).reshape(8, 8)
    expected = np.zeros((8, 8), bool)
    expected[2:5, 2:5] = True
    np.testing.assert_array_equal(kept, expected)
    unzeroed = Preprocessed(item.image, item.transform, mask, (64, 64), background_zeroed=False)
    assert PatchCore(small_config())._object_patches([unzeroed], 8, 8).all()  # nothing blacked out: every patch


def _with_a_noise_patch(photo: Path, out: Path) -> Path:
    """The photo with a 400-pixel square of coarse colour noise on the part: unlike any healthy screw."""
    image = cv2.imread(str(photo))
    noise = np.random.default_rng(0).integers(0, 256, (24, 24, 3)).astype(np.uint8)
    image[300:700, 300:700] = cv2.resize(noise, (400, 400), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(out), image)
    return out


def test_a_sampled_photo_unlike_the_rest_is_listed_under_its_own_name_with_its_held_out_map(
    small_screw_dir, monkeypatch, tmp_path
):
    """With only a sample scored, the listing still names the photo that scored high (not the one at
    its place in the sample), and its held-out map is kept to show it."""
    import models.patchcore as patchcore

    monkeypatch.setattr(patchcore, "MAX_CALIBRATION_PHOTOS", 10)
    photos = list(train_images(small_screw_dir)[:12])
    config = small_config()
    sampled = np.flatnonzero(np.random.default_rng(config.seed).permutation(len(photos)) < 10)
    odd = next(int(photo) for place, photo in enumerate(sampled) if place != photo)
    photos[odd] = _with_a_noise_patch(photos[odd], tmp_path / "odd.png")
    model = PatchCore(config)
    model.fit(photos, progress=False)
    assert [entry["photo"] for entry in model.calibration["unlike_the_rest"]] == [str(photos[odd])]
    assert list(model.held_out_maps) == [str(photos[odd])]
    assert model.held_out_maps[str(photos[odd])].max() == pytest.approx(model.calibration["unlike_the_rest"][0]["score"])


@pytest.mark.parametrize("as_arrays", [False, True], ids=["files", "arrays"])
def test_a_set_under_the_cap_is_scored_whole_and_each_photo_listed_keeps_its_held_out_map(tmp_path, as_arrays):
    """Sets of up to 500 photos are scored whole (here 60 small ones), and when two photos are listed as unlike
    the rest, each is shown with the heatmap of a bank that never saw it, under its own name: its path, or
    "photo N" for a photo given as an array."""
    paths = []
    for number in range(60):
        photo = part_photo(degrees=3.0 * number, short=40 + number % 5)
        if number in (7, 31):  # a square of coarse colour noise on the part, at its own place
            noise = np.random.default_rng(number).integers(0, 256, (8, 8, 3)).astype(np.uint8)
            at = 40 if number == 7 else 120
            photo[at : at + 40, at : at + 40] = cv2.resize(noise, (40, 40), interpolation=cv2.INTER_NEAREST)
        paths.append(tmp_path / f"{number:02d}.png")
        cv2.imwrite(str(paths[-1]), photo)
    model = PatchCore(small_config(preprocess="off", image_size=64))
    model.fit([read_image(path) for path in paths] if as_arrays else paths, progress=False)
    assert model.calibration["count"] == 60 and "60 of 60 training photos scored" in model.calibration["method"]
    listed = sorted(entry["photo"] for entry in model.calibration["unlike_the_rest"])
    assert listed == (["photo 31", "photo 7"] if as_arrays else [str(tmp_path / "07.png"), str(tmp_path / "31.png")])
    assert sorted(model.held_out_maps) == listed


def test_nearly_identical_photos_give_a_finite_sigma(small_screw_dir):
    photo = read_image(train_images(small_screw_dir)[0])
    model = PatchCore(small_config(preprocess="off"))
    model.fit([photo, photo.copy(), photo.copy()], progress=False)
    assert model.calibration_std > 0 and model.threshold > 0
    (same,) = model.predict([photo])
    assert same.sigma < 3 and not same.is_anomalous  # not the 10^5 sigma of a spread of ~0
    assert model.calibration["warnings"] and "fewer than the 100" in model.calibration["warnings"][0]


def test_a_failure_while_building_the_bank_stops_the_fit_with_that_error(small_screw_dir, monkeypatch):
    """The coresets run on a worker thread: what goes wrong there must reach the caller, not vanish."""

    def broken(self, features):
        raise RuntimeError("coreset failed")

    monkeypatch.setattr("models.coreset.StreamingCoreset.add", broken)
    with pytest.raises(RuntimeError, match="coreset failed"):
        PatchCore(small_config()).fit(train_images(small_screw_dir)[:3], progress=False)


def test_fewer_than_two_photos_are_refused(small_screw_dir):
    with pytest.raises(UserError, match="at least 2 healthy photos"):
        PatchCore(small_config()).fit(train_images(small_screw_dir)[:1], progress=False)


@pytest.mark.parametrize("sigma, expected", [(-2.0, 0.0), (0.0, 0.0), (1.0, 0.6827), (2.0, 0.9545), (3.0, 0.9973)])
def test_confidence_follows_the_sigma_rule(sigma, expected):
    assert anomaly_confidence_from_sigma(sigma) == pytest.approx(expected, abs=1e-4)


# A memory bank worked out on paper (2-d features). m0's nearest other patch is m1 (3 away; m2 is
# 8.5 away), but the test patch (0, 4) has m2 (4.5 away) closer than m1 (5 away): so Eq. 7 gives a
# different answer when it takes the neighbourhood of the test patch instead of that of m*.
BANK = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 8.5]], dtype=np.float32)  # m0, m1, m2
PATCHES = np.array([[[0.0, 4.0], [3.0, 1.0]], [[1.0, 0.0], [0.0, 8.0]]], dtype=np.float32)  # 2x2 grid
# Distances to the nearest healthy patch: 4 (m0), 1 (m1), 1 (m0), 0.5 (m2): the worst is 4, m* = m0.


class HandMadeFeatures:
    """Stands in for the backbone: every photo yields the patch grid ``PATCHES``."""

    weights_identity = "hand-made"
    device = "cpu"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.repeat(PATCHES[None], len(images), axis=0)

    def graph(self) -> None:
        """A network that does not export to ONNX."""
        return None


def hand_made_model(monkeypatch, **changes) -> PatchCore:
    monkeypatch.setattr("models.patchcore.open_extractor", lambda *_args: HandMadeFeatures())
    # no smoothing: the map (whose maximum is the image score) keeps the grid's values at its corners
    config = Config(backbone="efficientnet_lite0", image_size=32, preprocess="off", device="cpu", heatmap_sigma=0.0,
                    **changes)
    model = PatchCore(config)
    model.memory_bank = BANK.copy()
    return model


def test_without_reweighting_the_image_score_is_the_largest_patch_distance(monkeypatch):
    model = hand_made_model(monkeypatch, score_reweighting=False)
    (prediction,) = model.predict([np.zeros((32, 32, 3), np.uint8)])
    assert prediction.score == pytest.approx(4.0, abs=1e-6)  # a Euclidean distance, not its square


@pytest.mark.parametrize(
    "neighbours, weight",
    [
        # b = 2: N(m0) = {m0, m1}, at 4 and 5 from the test patch: 1 - e^4 / (e^4 + e^5) = e / (1 + e)
        (2, math.e / (1 + math.e)),
        # b = 3: N(m0) = {m0, m1, m2}, at 4, 5 and 4.5: 1 - e^4 / (e^4 + e^5 + e^4.5)
        (3, 1 - 1 / (1 + math.e + math.exp(0.5))),
    ],
)
def test_reweighting_follows_eq7_on_a_bank_worked_out_on_paper(monkeypatch, neighbours, weight):
    model = hand_made_model(monkeypatch, score_reweighting=True, num_neighbors=neighbours)
    (prediction,) = model.predict([np.zeros((32, 32, 3), np.uint8)])
    assert prediction.score == pytest.approx(weight * 4.0, rel=1e-5)


def test_a_score_exactly_at_the_threshold_is_not_flagged(monkeypatch):
    """The verdict is 'score above the threshold': a photo exactly at it passes, one a hair above is flagged."""
    model = hand_made_model(monkeypatch, score_reweighting=False)
    photo = np.zeros((32, 32, 3), np.uint8)
    model.threshold = model.predict([photo])[0].score
    (at,) = model.predict([photo])
    assert at.score == model.threshold and not at.is_anomalous
    model.threshold = float(np.nextafter(np.float32(at.score), np.float32(0)))
    assert model.predict([photo])[0].is_anomalous


def test_the_heatmap_is_blurred_by_heatmap_sigma_around_the_worst_patch(monkeypatch):
    """heatmap_sigma is how far a defect's heat spreads on the overlay: the map is the unsmoothed one
    blurred by exactly that sigma, with its peak still on the worst patch (the grid's top-left one)."""
    photo = np.zeros((32, 32, 3), np.uint8)
    (sharp,) = hand_made_model(monkeypatch, score_reweighting=False).predict([photo])
    model = hand_made_model(monkeypatch, score_reweighting=False)
    model.config = model.config.replace(heatmap_sigma=3.0)
    (smooth,) = model.predict([photo])
    np.testing.assert_allclose(smooth.anomaly_map, cv2.GaussianBlur(sharp.anomaly_map, (0, 0), 3.0), atol=1e-5)
    peak = np.unravel_index(np.argmax(smooth.anomaly_map), smooth.anomaly_map.shape)
    assert peak[0] < 16 and peak[1] < 16


def test_sigma_counts_robust_spreads_above_the_healthy_median(monkeypatch):
    """One odd healthy photo must not move what a score is compared with: healthy scores 1, 2, 3, 4 and 10
    have median 3 and median absolute deviation 1, so a score of 4 lies 1 / 1.4826 spreads above the
    centre, as unusual as the healthy quartile (confidence 0.5)."""
    model = hand_made_model(monkeypatch, score_reweighting=False)
    model.set_calibration(np.array([1.0, 2.0, 3.0, 4.0, 10.0]), "five healthy photos")
    (prediction,) = model.predict([np.zeros((32, 32, 3), np.uint8)])
    assert prediction.score == pytest.approx(4.0)
    assert prediction.sigma == pytest.approx(1 / 1.4826, rel=1e-4)
    assert prediction.anomaly_confidence == pytest.approx(0.5, abs=1e-4)


class BrokenFeatures(HandMadeFeatures):
    """A backbone gone wrong (a broken export, a failing GPU): every feature is NaN."""

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.full((len(images), *PATCHES.shape), np.nan, dtype=np.float32)


def test_a_photo_confirmed_good_whose_score_is_not_a_number_is_refused_by_name(monkeypatch):
    """NaN is above no limit: unless refused, it would join the bank and make the threshold NaN, and
    every later photo would then pass."""
    model = hand_made_model(monkeypatch, score_reweighting=False)
    model.set_calibration(np.array([1.0, 2.0, 3.0, 4.0, 10.0]), "five healthy photos")
    bank, threshold = model.memory_bank.copy(), model.threshold
    model._extractor = BrokenFeatures()
    with pytest.raises(UserError, match="part.png: its score is not a finite number"):
        model.add_good([part_photo()], progress=False, labels=["part.png"])
    np.testing.assert_array_equal(model.memory_bank, bank)
    assert model.threshold == threshold and not model.updates


@pytest.mark.parametrize("thresholds_above", [1.2, 1.5, 1.6, 2.0])
def test_a_photo_confirmed_good_is_refused_only_above_good_score_limit_thresholds(monkeypatch, thresholds_above):
    """A borderline part the operator passed (flagged, but at most 1.5 thresholds) is what learning is for: it
    joins the bank. Only one above 1.5 times the threshold, likely a wrong click on a defect, is refused by name."""
    model = hand_made_model(monkeypatch, score_reweighting=False)  # every photo scores 4.0
    model.set_calibration(np.array([1.0, 2.0, 3.0, 4.0, 10.0]), "five healthy photos")
    score = model.predict([part_photo()])[0].score
    model.threshold = score / thresholds_above
    assert (1.5 * model.threshold == score) == (thresholds_above == 1.5)  # exactly at the limit, or clear of it
    if thresholds_above <= 1.5:
        record = model.add_good([part_photo()], progress=False, labels=["borderline.png"])
        assert record["photos"] == 1 and record["refused"] == [] and record["forced"] == []
    else:
        with pytest.raises(UserError, match="1 of 1 photos score above 1.5 x the threshold .*far.png"):
            model.add_good([part_photo()], progress=False, labels=["far.png"])


def test_the_interval_stated_is_the_one_the_models_seed_draws(monkeypatch):
    """The seed recorded in the model file reproduces the 95 % interval the promise states: it is drawn
    with the model's own seed (another seed draws another, equally valid, interval)."""
    model = hand_made_model(monkeypatch, score_reweighting=False, seed=5)
    scores = np.random.default_rng(0).gumbel(15.0, 0.8, 40)
    model.set_calibration(scores, "forty healthy photos")
    floor = model.calibration["spread_floor"]
    drawn = {seed: [1000 * end for end in rate_interval(scores, 0.01, floor, seed)] for seed in (0, 5)}
    assert drawn[0] != drawn[5]
    assert model.calibration["interval_per_1000"] == pytest.approx(drawn[5], rel=1e-12)


def test_an_update_counts_every_healthy_score_in_its_promise_an_odd_one_of_the_fits_included(monkeypatch):
    """After an update the promise says how many healthy scores the threshold rests on, the fit's and the
    new ones; and a model whose first healthy photo scored unlike the rest still learns (the model holds
    no names for the fit's photos, so the update lists none)."""
    model = hand_made_model(monkeypatch, score_reweighting=False)  # every photo scores 4.0
    model.set_calibration(np.array([100.0, *range(1, 21)]), "21 healthy photos", [f"{n}.png" for n in range(21)])
    assert [entry["photo"] for entry in model.calibration["unlike_the_rest"]] == ["0.png"]
    record = model.add_good([part_photo()], progress=False, labels=["new.png"])
    assert record["photos"] == 1 and model.calibration["count"] == 22
    assert "from 22 healthy photos" in promise(model.calibration)


def test_the_heatmap_fades_between_patches_instead_of_stepping_at_their_border(monkeypatch):
    """Unsmoothed (heatmap_sigma 0) the map is the patch grid upsampled linearly: along its top row it falls
    from the worst patch's 4 to its neighbour's 1 through the values between, not in one step."""
    (prediction,) = hand_made_model(monkeypatch, score_reweighting=False).predict([np.zeros((32, 32, 3), np.uint8)])
    top = prediction.anomaly_map[0]
    assert top[0] == pytest.approx(4.0, abs=1e-6) and top[-1] == pytest.approx(1.0, abs=1e-6)
    assert np.all(np.diff(top) <= 1e-6) and np.count_nonzero((top > 1.01) & (top < 3.99)) >= 8


def test_a_recalibration_without_a_source_names_no_source(monkeypatch):
    """The method a promise ends with says where the photos came from only when it was told."""
    model = hand_made_model(monkeypatch, score_reweighting=False, false_alarm_rate=0.3)  # two photos hold 0.3
    model.recalibrate([part_photo(), part_photo(degrees=30.0)], progress=False)
    assert model.calibration_method == "re-calibrated on 2 healthy photos"


def test_saving_a_model_whose_network_does_not_export_removes_an_earlier_export_beside_it(monkeypatch, tmp_path):
    """runtime auto scores through the export beside a model file: one left by an earlier model of another
    network must not stay beside the new one."""
    model = hand_made_model(monkeypatch, score_reweighting=False)
    model.predict([np.zeros((32, 32, 3), np.uint8)])  # opens the network
    (tmp_path / "line.onnx").write_bytes(b"an earlier model's export")
    assert model.save(tmp_path / "line.pkl") is None
    assert sorted(path.name for path in tmp_path.iterdir()) == ["line.pkl"]


def test_sigma_is_measured_against_healthy_calibration(fitted_model, small_screw_dir):
    (prediction,) = fitted_model.predict([load_test_split(small_screw_dir)[-1].path])
    expected = (prediction.score - fitted_model.calibration_median) / fitted_model.calibration_std
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


def test_coresets_running_behind_the_backbone_build_the_bank_they_build_in_line(small_screw_dir, monkeypatch):
    """The coresets take the batches on a thread of their own, several behind the network; a slow
    chunk must not let a later batch overtake it, or the bank would depend on timing."""
    from models.coreset import StreamingCoreset

    paths = train_images(small_screw_dir)
    # six batches of ~280 patches; chunks of 512 at ratio 0.2 are reduced one by one as they fill
    config = small_config(batch_size=2, coreset_chunk_size=512, coreset_sampling_ratio=0.2)

    def fit_bank() -> np.ndarray:
        model = PatchCore(config)
        model.fit(paths, progress=False, calibrate=False)
        return model.memory_bank

    monkeypatch.setattr("models.patchcore.CORESET_BACKLOG", 0)  # each batch's coresets finish before the next batch
    in_line = fit_bank()
    add = StreamingCoreset.add
    calls = []

    def slow_first_batches(self: StreamingCoreset, features) -> None:
        calls.append(len(features))
        if len(calls) <= 2:
            time.sleep(0.5)  # the network runs on meanwhile
        add(self, features)

    monkeypatch.setattr("models.patchcore.CORESET_BACKLOG", 3)
    monkeypatch.setattr(StreamingCoreset, "add", slow_first_batches)
    behind = fit_bank()
    assert len(calls) == 6
    assert np.array_equal(behind, in_line)


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
    assert prediction.anomaly_map[corner].max() <= fitted_model.calibration_median / 2
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


def test_a_phone_photo_is_scored_and_mapped_upright(fitted_model, small_screw_dir, tmp_path):
    """EXIF orientation 6 (camera held sideways): the map covers the photo as a viewer shows it, and
    the verdict is the one for the upright pixels."""
    from PIL import Image

    upright = read_image(load_test_split(small_screw_dir)[-1].path)[:, 112:-112]  # 1024 x 800, not square
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated 90° anticlockwise; viewers turn it back clockwise
    path = tmp_path / "phone.png"
    Image.fromarray(np.rot90(upright).copy()).save(path, exif=exif)
    (from_file,) = fitted_model.predict([path])
    (direct,) = fitted_model.predict([upright])
    assert from_file.anomaly_map.shape == upright.shape[:2] == (1024, 800)
    assert from_file.score == pytest.approx(direct.score, rel=1e-6)


def test_the_score_is_read_off_the_map_the_overlay_draws(fitted_model, small_screw_dir):
    """Flagged means some pixel of the shown map is above the threshold: the score is the map's maximum."""
    predictions = fitted_model.predict([s.path for s in load_test_split(small_screw_dir)[:4]])
    for prediction in predictions:
        assert prediction.score == float(prediction.anomaly_map.max())
        assert prediction.threshold == fitted_model.threshold
        assert prediction.normalized_score == pytest.approx(prediction.score / fitted_model.threshold)
        assert prediction.is_anomalous == bool((prediction.anomaly_map > prediction.threshold).any())


def test_set_calibration_records_the_method_in_the_model_file(fitted_model, tmp_path):
    model = PatchCore.load(_saved(fitted_model, tmp_path))
    scores = np.arange(1.0, 101.0)
    model.set_calibration(scores, "a hundred healthy photos")
    assert model.calibration_median == pytest.approx(50.5)
    model.save(tmp_path / "again.pkl")
    reloaded = PatchCore.load(tmp_path / "again.pkl")
    assert reloaded.calibration_method == "a hundred healthy photos"
    assert reloaded.calibration_scores.size == 100 and reloaded.threshold == model.threshold


def test_recalibration_moves_the_threshold_and_keeps_the_bank_bit_identical(fitted_model, screw_dir, tmp_path):
    model = PatchCore.load(_saved(fitted_model, tmp_path))
    bank_before = model.memory_bank.copy()
    healthy = train_images(screw_dir)[-fewest_photos(0.01):]  # photos the model was not fitted on
    model.recalibrate(healthy, progress=False, source="new camera")
    assert model.memory_bank.tobytes() == bank_before.tobytes()
    expected = [p.score for p in fitted_model.predict(healthy)]  # scored with the same, untouched bank
    np.testing.assert_allclose(model.calibration_scores, expected, rtol=1e-6)
    reference = PatchCore.load(_saved(fitted_model, tmp_path))
    reference.set_calibration(np.asarray(expected), "reference")
    assert model.threshold == pytest.approx(reference.threshold)
    assert model.threshold != fitted_model.threshold
    assert model.calibration_method == f"re-calibrated on {len(healthy)} healthy photos from new camera"


def _saved(model: PatchCore, folder: Path) -> Path:
    path = folder / "copy.pkl"
    model.save(path)
    return path


def test_threshold_for_follows_the_models_own_rule_and_spread_floor(fitted_model):
    """The calibration check sets other rates with this: at the model's own rate it is the model's
    threshold, at 1 in 10 the law through the 90th percentile read where 12 photos flag 1 in 10 on
    average, and a spread floor that binds (identical scores) applies to it as to the threshold."""
    assert fitted_model.threshold_for(fitted_model.config.false_alarm_rate) == pytest.approx(fitted_model.threshold)
    scores = fitted_model.calibration_scores
    law = fit_tail(scores)
    assert law.threshold(0.1) == pytest.approx(float(np.quantile(scores, 0.9)), rel=1e-5)
    assert fitted_model.threshold_for(0.1) == pytest.approx(law.threshold(read_at(scores.size, 0.1)[0]), rel=1e-5)
    assert fitted_model.threshold_for(0.1) > law.threshold(0.1)
    model = PatchCore(fitted_model.config)
    model.memory_bank = fitted_model.memory_bank
    model.set_calibration(np.full(5, 10.0), "identical healthy scores")
    assert model.threshold > 10 and model.threshold_for(model.config.false_alarm_rate) == pytest.approx(model.threshold)


def test_recalibration_needs_photos_and_names_a_photo_unlike_the_rest(fitted_model, screw_dir, tmp_path):
    model = PatchCore.load(_saved(fitted_model, tmp_path))
    needed = fewest_photos(0.01)  # from fewer, the threshold flags more than 1 in 100 even on average
    healthy = train_images(screw_dir)[-needed:]  # photos the model was not fitted on (it has the first 12)
    for too_few in ([], healthy[:1], healthy[1:]):  # two photos promised 181 in 1,000 and flagged 327
        with pytest.raises(UserError, match=f"at least {needed} healthy photos for a false-alarm rate of 0.01 "
                                            f"\\(got {len(too_few)}\\)"):
            model.recalibrate(too_few, progress=False)
    odd = _with_a_noise_patch(healthy[0], tmp_path / "odd.png")
    model.calibration["left_out"] = ["train/good/defect.png"]  # as a fit with --drop-unlike records it
    model.recalibrate([*healthy, odd], progress=False)  # the odd photo last, as the last one scored
    assert model.calibration["left_out"] == ["train/good/defect.png"]  # the bank still lacks it
    assert [entry["photo"] for entry in model.calibration["unlike_the_rest"]] == [str(odd)]


@pytest.mark.parametrize("count", [2, 5])
def test_the_interval_of_a_set_too_small_for_the_rate_holds_the_rate_it_states(monkeypatch, count):
    """Two nearly identical photos: the spread floor set the law, and the interval leaned on it (0.1 to 2.1 in
    1,000) while the promise said 181 in 1,000, and such thresholds flagged 327 in 1,000 new healthy parts."""
    model = hand_made_model(monkeypatch, score_reweighting=False)
    model.set_calibration(np.linspace(14.0, 14.01, count), "a few photos")
    low, high = model.calibration["interval_per_1000"]
    assert model.calibration["warnings"]  # too few for the rate, and said so
    assert low <= model.calibration["false_alarms_per_1000"] <= high
