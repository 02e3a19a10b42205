"""Photos confirmed good join a saved model without a refit (PatchCore.add_good, train.py --add-good)."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from config import Config, UserError
from conftest import pretend_torch_is_not_installed, save_as_older_file, small_config
from models.coreset import StreamingCoreset
from models.model_file import ModelFileError
from models.patchcore import PatchCore
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
    # the history survives a save and a load, and the model scores with its new bank at once
    model.save(tmp_path / "updated.pkl")
    reloaded = PatchCore.load(tmp_path / "updated.pkl")
    assert reloaded.updates == [update]
    after = [p.score for p in model.predict(new)]
    np.testing.assert_allclose(after, [p.score for p in reloaded.predict(new)], rtol=1e-4)
    assert max(after) < min(p.score for p in before)  # the photos it learnt now lie in the bank


def test_each_update_joins_the_history_and_starts_from_the_last_one(half_model, small_screw_dir, tmp_path):
    model = fresh(half_model, tmp_path)
    new = train_images(small_screw_dir)[6:]
    first = model.add_good(new[:3], progress=False, source="morning")
    second = model.add_good(new[3:], progress=False, source="evening")
    assert [update["source"] for update in model.updates] == ["morning", "evening"]
    assert second["threshold_before"] == first["threshold_after"]
    assert second["bank_before"] == first["bank_after"]
    # the promise names the fit's method and every photo added since, once: not one clause per update
    assert model.calibration_method == (f"{half_model.calibration_method} + 6 photos added on the line, "
                                        "each scored by the bank before it joined")


def test_an_update_is_reproducible_with_a_seed(half_model, small_screw_dir, tmp_path):
    new = train_images(small_screw_dir)[6:]
    first, second = fresh(half_model, tmp_path), fresh(half_model, tmp_path)
    first.add_good(new, progress=False)
    second.add_good(new, progress=False)
    np.testing.assert_array_equal(first.memory_bank, second.memory_bank)
    assert first.threshold == second.threshold


def test_an_update_of_an_older_file_draws_the_fits_projection_once_and_keeps_it(half_model, small_screw_dir, tmp_path):
    save_as_older_file(half_model, tmp_path / "older.pkl")
    older = PatchCore.load(tmp_path / "older.pkl")
    assert older.coreset_projection is None and older.why_learning_needs_torch() is not None
    new = train_images(small_screw_dir)[6:]
    older.add_good(new, progress=False)
    current = fresh(half_model, tmp_path, "current.pkl")
    current.add_good(new, progress=False)
    np.testing.assert_array_equal(older.coreset_projection, half_model.coreset_projection)
    np.testing.assert_array_equal(older.memory_bank, current.memory_bank)
    older.save(tmp_path / "updated.pkl")
    np.testing.assert_array_equal(PatchCore.load(tmp_path / "updated.pkl").coreset_projection, half_model.coreset_projection)


def test_without_torch_an_older_file_says_why_it_cannot_learn(half_model, small_screw_dir, tmp_path, monkeypatch):
    save_as_older_file(half_model, tmp_path / "older.pkl")
    older = PatchCore.load(tmp_path / "older.pkl")
    pretend_torch_is_not_installed(monkeypatch)
    with pytest.raises(UserError, match="needs torch .*predates the coreset projection"):
        older.add_good(train_images(small_screw_dir)[6:7], progress=False)


def test_a_model_whose_features_need_no_projection_learns_without_torch(small_screw_dir, tmp_path, monkeypatch):
    """Features no wider than coreset_projection_dim are measured as they are: no projection to keep or draw."""
    model = PatchCore(small_config(coreset_projection_dim=152))  # lite0's 152 features per patch
    model.fit(train_images(small_screw_dir)[:6], progress=False)
    loaded = fresh(model, tmp_path)
    assert loaded.coreset_projection is None and loaded.why_learning_needs_torch() is None
    pretend_torch_is_not_installed(monkeypatch)
    assert loaded.add_good(train_images(small_screw_dir)[6:7], progress=False)["photos"] == 1


def test_an_update_saves_where_torch_is_not_installed(half_model, small_screw_dir, tmp_path, monkeypatch):
    """The line PC (requirements-runtime.txt) has no torch at all: the model file records it as such."""
    import importlib.metadata

    version = importlib.metadata.version

    def without_torch(name):
        if name == "torch":
            raise importlib.metadata.PackageNotFoundError(name)
        return version(name)

    model = fresh(half_model, tmp_path)
    model.add_good(train_images(small_screw_dir)[6:7], progress=False)
    monkeypatch.setattr(importlib.metadata, "version", without_torch)
    model.save(tmp_path / "updated.pkl")
    assert pickle.loads((tmp_path / "updated.pkl").read_bytes())["versions"]["torch"] == "not installed"
    assert PatchCore.load(tmp_path / "updated.pkl").updates == model.updates


def test_a_photo_far_above_the_threshold_is_refused_unless_forced(half_model, small_screw_dir, tmp_path):
    model = fresh(half_model, tmp_path)
    bank = model.memory_bank.copy()
    good = read_image(train_images(small_screw_dir)[6])
    with pytest.raises(UserError, match="noise.png.*|look defective") as refused:
        model.add_good([good, noise_photo()], progress=False, labels=["good.png", "noise.png"])
    assert "noise.png" in str(refused.value) and "good.png" not in str(refused.value)
    np.testing.assert_array_equal(model.memory_bank, bank)  # nothing learnt from a refused update
    assert model.updates == []
    skipped = model.add_good([noise_photo(), good, np.flipud(noise_photo())], progress=False,
                             labels=["noise.png", "good.png", "flipped.png"], skip_refused=True)
    assert skipped["photos"] == 1 and skipped["refused"] == ["noise.png", "flipped.png"]
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
    for bad in ([{"photos": "six"}], {}, [{"photos": 1, "source": {"nested": "record"}}], [{"photos": 1, 2: "x"}], ["one"]):
        state["updates"] = bad
        (tmp_path / "bad.pkl").write_bytes(pickle.dumps(state))
        with pytest.raises(ModelFileError, match="updates"):
            PatchCore.load(tmp_path / "bad.pkl")


def test_an_update_needs_a_photo_and_keeps_the_record_of_photos_the_fit_left_out(half_model, tmp_path, small_screw_dir):
    model = fresh(half_model, tmp_path)
    with pytest.raises(UserError, match="at least one photo"):
        model.add_good([], progress=False)
    model.calibration["left_out"] = ["train/good/odd.png"]  # as a fit with --drop-unlike records it
    model.add_good(train_images(small_screw_dir)[6:7], progress=False)
    assert model.calibration["left_out"] == ["train/good/odd.png"]


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
    assert f"previous file kept as {kept}" in capsys.readouterr().out  # the file to restore to undo it
    updated = PatchCore.load(tmp_path / "line.pkl")
    assert [update["photos"] for update in updated.updates] == [3]
    assert updated.updates[0]["source"] == str(folder)


def test_add_good_writes_to_output_and_force_adds_a_photo_that_looks_defective(half_model, small_screw_dir,
                                                                                tmp_path, capsys):
    half_model.save(tmp_path / "line.pkl")
    original = (tmp_path / "line.pkl").read_bytes()
    folder = tmp_path / "confirmed"
    folder.mkdir()
    (folder / "good.png").symlink_to(train_images(small_screw_dir)[6].resolve())
    cv2.imwrite(str(folder / "odd.png"), noise_photo())
    args = ["--add-good", "--model", str(tmp_path / "line.pkl"), "--data-dir", str(folder), "--quiet",
            "--output", str(tmp_path / "new.pkl")]
    with pytest.raises(UserError, match="odd.png"):  # refused: it looks defective
        train_main(args)
    assert not (tmp_path / "new.pkl").exists()
    assert train_main([*args, "--force"]) == 0
    assert "odd.png scores above" in capsys.readouterr().out
    assert (tmp_path / "line.pkl").read_bytes() == original  # --output leaves --model as it is
    assert list(tmp_path.glob("*.before-update-*")) == []  # nothing was replaced, so nothing is kept
    (update,) = PatchCore.load(tmp_path / "new.pkl").updates
    assert update["photos"] == 2 and update["forced"] == [str(folder / "odd.png")]


def test_add_good_refuses_a_model_file_another_update_saved_to_meanwhile(half_model, small_screw_dir, tmp_path,
                                                                         monkeypatch):
    """Two updates of one file at once (two --add-good, or one beside serve.py --learn): the later one
    must not save over the earlier, nor its kept copy over the fit's."""
    from models.patchcore import learn_on_a_copy

    half_model.save(tmp_path / "line.pkl")
    original = (tmp_path / "line.pkl").read_bytes()
    folder = tmp_path / "confirmed"
    folder.mkdir()
    (folder / "good.png").symlink_to(train_images(small_screw_dir)[6].resolve())
    other_photos = train_images(small_screw_dir)[7:9]
    add_good = PatchCore.add_good

    def another_writer_meanwhile(model: PatchCore, *args, **kwargs) -> dict:
        monkeypatch.setattr(PatchCore, "add_good", add_good)  # the other writer's own update runs as it is
        other = PatchCore.load(tmp_path / "line.pkl")
        assert learn_on_a_copy(other, tmp_path / "line.pkl", other_photos, [p.name for p in other_photos],
                               "the other writer")[0] is not None
        return add_good(model, *args, **kwargs)

    monkeypatch.setattr(PatchCore, "add_good", another_writer_meanwhile)
    with pytest.raises(ModelFileError, match="line.pkl: replaced on disk since it was loaded"):
        train_main(["--add-good", "--model", str(tmp_path / "line.pkl"), "--data-dir", str(folder), "--quiet"])
    assert [update["source"] for update in PatchCore.load(tmp_path / "line.pkl").updates] == ["the other writer"]
    assert (tmp_path / "line.before-update-1.pkl").read_bytes() == original
    assert not (tmp_path / "line.before-update-2.pkl").exists()


@pytest.mark.parametrize("args, says", [
    (["--add-good", "--model", "m.pkl", "--data-dir", ".", "--coreset-sampling-ratio", "0.5"], "takes no settings"),
    (["--add-good", "--data-dir", "."], "--add-good needs --model"),
    (["--add-good", "--model", "m.pkl", "--category", "screw"], "read the photos of --data-dir, not --category"),
    (["--model", "m.pkl", "--data-dir", ".", "--force"], "--force goes with --add-good"),
    (["--add-good", "--model", "m.pkl", "--data-dir", ".", "--config", "s.yaml"], "takes no settings"),
    (["--add-good", "--recalibrate", "--model", "m.pkl", "--data-dir", "."], "two different updates"),
])
def test_add_good_usage_errors(args, says, capsys):
    with pytest.raises(SystemExit) as usage:
        train_main(args)
    assert usage.value.code == 2
    assert says in capsys.readouterr().err


def test_a_defect_photo_scores_higher_after_the_update_than_a_healthy_one(half_model, small_screw_dir, tmp_path):
    """What the update is for: the bank learns the new healthy photos, not to accept everything."""
    model = fresh(half_model, tmp_path)
    model.add_good(train_images(small_screw_dir)[6:], progress=False)
    split = load_test_split(small_screw_dir)
    healthy = [sample.path for sample in split if not sample.is_defective]
    defects = [sample.path for sample in split if sample.is_defective]
    assert max(p.score for p in model.predict(healthy)) < max(p.score for p in model.predict(defects))


def test_an_update_measures_distances_in_the_projection_it_is_given_and_refuses_one_of_another_width():
    rng = np.random.default_rng(0)
    known, new = rng.normal(size=(50, 160)).astype(np.float32), rng.normal(size=(400, 160)).astype(np.float32)
    projection = rng.normal(size=(160, 128)).astype(np.float32)
    given = StreamingCoreset(0.1, 128, 4096, seed=0, known=known, projection=projection)
    given.add(new)
    given.result()
    np.testing.assert_array_equal(given.projection, projection)
    drawn = StreamingCoreset(0.1, 128, 4096, seed=0, known=known)
    drawn.add(new)
    drawn.result()
    assert drawn.projection.shape == (160, 128) and not np.array_equal(drawn.projection, projection)
    with pytest.raises(ValueError, match="takes 152 features per patch, got 160"):
        StreamingCoreset(0.1, 128, 4096, seed=0, known=known, projection=projection[:152]).add(new)


def test_patches_that_differ_only_where_the_given_projection_does_not_look_count_as_covered():
    """The bank's projection keeps the first 128 of 160 features: new patches unlike the bank in the
    last 32 alone look like it to greedy, so the picks come from the ones unlike it where it looks."""
    rng = np.random.default_rng(0)
    known = rng.normal(0, 0.01, (50, 160)).astype(np.float32)
    hidden = rng.normal(0, 0.01, (400, 160)).astype(np.float32)
    hidden[:, 128:] += rng.normal(0, 5, (400, 32))  # far from the bank, but only where the projection is zero
    seen = rng.normal(0, 0.01, (400, 160)).astype(np.float32)
    seen[:, :128] += rng.normal(0, 1, (400, 128))  # less far, where the projection looks
    projection = np.eye(160, 128, dtype=np.float32)
    coreset = StreamingCoreset(0.05, 128, 4096, seed=0, known=known, projection=projection)
    coreset.add(np.concatenate([hidden, seen]))
    picks = coreset.result()
    assert len(picks) == 40
    assert (np.abs(picks[:, 128:]).max(axis=1) < 0.1).all()  # none of the patches the projection cannot tell apart


def test_known_patches_count_as_kept_so_greedy_picks_what_they_do_not_cover():
    rng = np.random.default_rng(0)
    covered = rng.normal(0, 0.01, (400, 16)).astype(np.float32)  # one tight cluster the bank holds
    uncovered = rng.normal(5, 0.01, (400, 16)).astype(np.float32) + np.eye(16, dtype=np.float32)[rng.integers(0, 16, 400)]
    known = covered[:50]
    coreset = StreamingCoreset(0.05, 128, 4096, seed=0, known=known)
    coreset.add(np.concatenate([covered, uncovered]))
    picks = coreset.result()
    assert len(picks) == 40  # ratio x new patches, the known ones not counted
    assert (np.linalg.norm(picks, axis=1) > 2).sum() >= 38  # nearly all from the cluster the bank lacks
    assert coreset.covering_radius < 0.5  # every new patch lies near the known bank or a pick


def test_with_oversampling_the_global_pass_also_counts_the_known_patches_as_kept():
    """Where a global pass picks the bank from the chunks' candidates, it too starts from the known
    bank: the candidates near it are left, the picks go to the cluster the bank lacks."""
    rng = np.random.default_rng(0)
    covered = rng.normal(0, 0.01, (2000, 16)).astype(np.float32)
    uncovered = rng.normal(5, 0.01, (2000, 16)).astype(np.float32) + np.eye(16, dtype=np.float32)[rng.integers(0, 16, 2000)]
    points = np.concatenate([covered, uncovered])[rng.permutation(4000)]
    coreset = StreamingCoreset(0.05, 128, 2000, seed=0, oversampling=8, known=covered[:50])
    assert coreset.share > coreset.ratio  # two chunks of 256 candidates, 200 picked from them
    coreset.add(points)
    picks = coreset.result()
    assert len(picks) == 200
    assert (np.linalg.norm(picks, axis=1) > 2).sum() >= 195


class HalfCoveredFeatures:
    """Stands in for the backbone: each photo's 8 x 8 patches are the bank's own 32 patches (a part
    the bank covers) and 32 patches of a cluster it lacks, 10 away."""

    weights_identity = "hand-made"
    device = "cpu"
    covered = np.random.default_rng(0).normal(0, 0.5, (32, 2)).astype(np.float32)
    lacking = (np.random.default_rng(1).normal(0, 0.5, (32, 2)) + [10, 0]).astype(np.float32)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        grid = np.concatenate([self.covered, self.lacking]).reshape(8, 8, 2)
        return np.repeat(grid[None], len(images), axis=0)


def test_an_update_adds_patches_where_the_bank_lacks_them_not_copies_of_what_it_holds(monkeypatch):
    monkeypatch.setattr("models.patchcore.open_extractor", lambda *_args: HalfCoveredFeatures())
    model = PatchCore(Config(backbone="efficientnet_lite0", image_size=64, preprocess="off", device="cpu",
                             coreset_sampling_ratio=0.1))
    model.memory_bank = HalfCoveredFeatures.covered.copy()
    model.calibration_scores, model.threshold = np.linspace(1.0, 2.0, 20, dtype=np.float32), 3.0
    photo = np.random.default_rng(2).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    update = model.add_good([photo], progress=False, force=True)
    added = model.memory_bank[len(HalfCoveredFeatures.covered):]
    assert update["photos"] == 1 and len(added) == round(0.1 * 64)
    assert np.all(added[:, 0] > 5)  # every pick from the cluster the bank lacked


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


UPDATE = {"time": "2026-01-02T03:04:05+0000", "photos": 2, "source": "line 1", "refused": ["odd.png"],
          "forced": ["dark.png"], "threshold_before": 1.0, "threshold_after": 1.25, "bank_before": 10, "bank_after": 12}


def test_an_update_line_names_the_photos_refused_and_forced():
    from evaluation.gallery import update_lines

    (line,) = update_lines([UPDATE])
    assert line.startswith("update 1 (2026-01-02T03:04:05+0000): added 2 photos confirmed good from line 1")
    assert "memory bank 10 -> 12 patches, threshold 1.000 -> 1.250" in line
    assert "refused as too far above the threshold: odd.png" in line
    assert "added although far above the threshold (forced): dark.png" in line
    assert "learnt already" not in line
    (again,) = update_lines([{**UPDATE, "already_learnt": ["a.png", "b.png"]}])
    assert "; learnt already, not added again: a.png, b.png" in again
    assert "refused" not in update_lines([{**UPDATE, "refused": [], "forced": []}])[0]


def test_score_over_time_colours_flagged_photos_and_follows_the_median_of_passed_ones():
    import re

    from evaluation.gallery import score_timeline_svg

    svg = score_timeline_svg([1.0, 9.0, 1.0], threshold=5.0, healthy_limit=2.0, window=3)
    assert re.findall(r'<circle [^>]*fill="(#\w+)"', svg) == ["#1f77b4", "#c62828", "#1f77b4"]  # red: flagged
    points = re.search(r'<polyline points="([^"]+)"', svg).group(1).split()
    assert len({point.split(",")[1] for point in points}) == 1  # the flagged 9.0 never moves the median line


def test_add_good_refuses_blank_tiny_or_broken_photos_naming_each_and_reads_every_photo_once(
    half_model, small_screw_dir, tmp_path, monkeypatch, capsys
):
    """An update is checked like a fit: a blank frame would teach the bank that an empty view is healthy."""
    import models.patchcore as patchcore
    from config import run_cli

    half_model.save(tmp_path / "line.pkl")
    folder = tmp_path / "confirmed"
    folder.mkdir()
    for image in train_images(small_screw_dir)[6:9]:
        (folder / image.name).symlink_to(image.resolve())
    cv2.imwrite(str(folder / "blank.png"), np.full((256, 256, 3), 128, np.uint8))
    cv2.imwrite(str(folder / "dot.png"), np.zeros((1, 1, 3), np.uint8))
    (folder / "cut.png").write_bytes((folder / train_images(small_screw_dir)[6].name).read_bytes()[:5000])
    reads: list[str] = []
    counting = patchcore.read_image
    monkeypatch.setattr(patchcore, "read_image", lambda path, *a, **k: reads.append(str(path)) or counting(path, *a, **k))
    args = ["--add-good", "--model", str(tmp_path / "line.pkl"), "--data-dir", str(folder), "--quiet", "--force",
            "--output", str(tmp_path / "new.pkl")]
    assert run_cli(lambda: train_main(args)) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: 3 of 6 photos confirmed good cannot be used; remove or replace them: ")
    assert f"{folder / 'blank.png'}: blank: its pixels vary by 0.00 grey levels" in line
    assert f"{folder / 'dot.png'}: 1x1 pixels is too small" in line and f"{folder / 'cut.png'}: " in line
    assert not (tmp_path / "new.pkl").exists()
    assert sorted(reads) == sorted(str(path) for path in folder.iterdir())  # each once: no separate pre-check pass


def test_a_blank_photo_confirmed_at_a_door_is_refused_even_when_forced(half_model, tmp_path):
    """The service's /feedback and the watcher's confirmed_good/ both update through learn_on_a_copy."""
    from models.patchcore import learn_on_a_copy

    half_model.save(tmp_path / "line.pkl")
    original = (tmp_path / "line.pkl").read_bytes()
    cv2.imwrite(str(tmp_path / "blank.png"), np.zeros((1024, 1024, 3), np.uint8))
    updated, update = learn_on_a_copy(half_model, tmp_path / "line.pkl", [tmp_path / "blank.png"], ["blank.png"],
                                      "POST /feedback", force=True)
    assert updated is None and update["photos"] == 0 and update["refused"] == ["blank.png"]
    assert "blank.png: blank" in update["error"]
    assert (tmp_path / "line.pkl").read_bytes() == original


def test_a_model_file_replaced_on_disk_since_it_was_loaded_is_never_saved_over(half_model, small_screw_dir, tmp_path):
    """A new fit put in place while the service or the watcher runs: learning on the old bank must not overwrite it."""
    from models.patchcore import learn_on_a_copy

    serving = fresh(half_model, tmp_path, "line.pkl")
    photos, later = train_images(small_screw_dir)[6:8], train_images(small_screw_dir)[8:10]
    updated, _ = learn_on_a_copy(serving, tmp_path / "line.pkl", photos, [p.name for p in photos], "POST /feedback")
    assert updated is not None  # an update of the file it loaded (and saved) goes through, again and again
    updated, _ = learn_on_a_copy(updated, tmp_path / "line.pkl", later, [p.name for p in later], "POST /feedback")
    assert updated is not None and len(updated.updates) == 2
    half_model.save(tmp_path / "new_fit.pkl")
    (tmp_path / "new_fit.pkl").replace(tmp_path / "line.pkl")
    new_fit = (tmp_path / "line.pkl").read_bytes()
    kept_before = sorted(tmp_path.glob("line.before-update-*"))
    again, update = learn_on_a_copy(updated, tmp_path / "line.pkl", photos, [p.name for p in photos], "POST /feedback")
    assert again is None and update["photos"] == 0 and update["refused"] == [p.name for p in photos]
    assert update["error"].startswith(f"{tmp_path / 'line.pkl'}: replaced on disk since it was loaded")
    assert update["source"] == "POST /feedback" and update["time"][:4].isdigit()  # when, from where, as any update
    assert (tmp_path / "line.pkl").read_bytes() == new_fit and sorted(tmp_path.glob("line.before-update-*")) == kept_before


def test_a_door_that_learns_nothing_leaves_the_model_file_as_it_was(half_model, tmp_path):
    """A confirmed-good photo that looks defective is left out at a door: when it is the only one, nothing
    is learnt, so the model file is not rewritten and no copy of it is kept to undo an update."""
    from models.patchcore import learn_on_a_copy

    serving = fresh(half_model, tmp_path, "line.pkl")
    original = (tmp_path / "line.pkl").read_bytes()
    cv2.imwrite(str(tmp_path / "noise.png"), noise_photo())
    updated, update = learn_on_a_copy(serving, tmp_path / "line.pkl", [tmp_path / "noise.png"], ["noise.png"],
                                      "POST /feedback")
    assert updated is None and update["photos"] == 0 and update["refused"] == ["noise.png"]
    assert (tmp_path / "line.pkl").read_bytes() == original and not list(tmp_path.glob("line.before-update-*"))


def test_a_photo_the_bank_holds_already_is_not_learnt_again(half_model, small_screw_dir, tmp_path):
    """An operator who confirms a photo twice (or a photo of the fit, or the same pixels in another file) must
    not teach it twice: its second score, by a bank that holds it, would pull the threshold down."""
    model = fresh(half_model, tmp_path)
    photos = train_images(small_screw_dir)
    copy_of_seventh = tmp_path / "copy.png"
    copy_of_seventh.write_bytes(photos[7].read_bytes())
    first = model.add_good([photos[6], photos[6], copy_of_seventh, photos[7], photos[0]], progress=False)
    assert first["photos"] == 2 and model.n_train == 8
    assert first["already_learnt"] == [str(photos[0]), str(photos[6]), str(photos[7])]
    assert model.calibration_scores.size == half_model.calibration_scores.size + 2
    model.save(tmp_path / "updated.pkl")
    reloaded = PatchCore.load(tmp_path / "updated.pkl")  # the fingerprints are in the file
    bank, threshold = reloaded.memory_bank.copy(), reloaded.threshold
    again = reloaded.add_good([photos[6], copy_of_seventh, photos[1]], progress=False)
    assert again["photos"] == 0 and len(again["already_learnt"]) == 3
    np.testing.assert_array_equal(reloaded.memory_bank, bank)
    assert reloaded.threshold == threshold and reloaded.updates == [first]


def test_a_copy_of_a_photo_refused_in_the_same_update_is_refused_too(half_model, tmp_path):
    model = fresh(half_model, tmp_path)
    for name in ("odd.png", "odd_again.png"):
        cv2.imwrite(str(tmp_path / name), noise_photo())
    update = model.add_good([tmp_path / "odd.png", tmp_path / "odd_again.png"], progress=False, skip_refused=True)
    assert update["photos"] == 0 and update["already_learnt"] == []
    assert update["refused"] == [str(tmp_path / "odd.png"), str(tmp_path / "odd_again.png")]


def test_add_good_of_photos_learnt_already_saves_nothing(half_model, small_screw_dir, tmp_path, capsys):
    half_model.save(tmp_path / "line.pkl")
    folder = tmp_path / "confirmed"
    folder.mkdir()
    for image in train_images(small_screw_dir)[6:8]:
        (folder / image.name).symlink_to(image.resolve())
    args = ["--add-good", "--model", str(tmp_path / "line.pkl"), "--data-dir", str(folder), "--quiet"]
    assert train_main(args) == 0
    updated = (tmp_path / "line.pkl").read_bytes()
    capsys.readouterr()
    assert train_main(args) == 0  # the same folder confirmed again
    assert capsys.readouterr().out == f"added nothing from {folder}: the model has learnt all 2 photos already; nothing saved\n"
    assert (tmp_path / "line.pkl").read_bytes() == updated
    assert not (tmp_path / "line.before-update-2.pkl").exists()


def test_after_a_recalibration_the_promise_counts_only_the_photos_added_since(half_model, small_screw_dir, screw_dir,
                                                                              tmp_path):
    """A recalibration replaces the healthy scores: photos learnt before it are no longer among them."""
    model = fresh(half_model, tmp_path)
    model.add_good(train_images(small_screw_dir)[6:9], progress=False)
    model.recalibrate(train_images(screw_dir)[-13:], progress=False, source="new light")
    model.add_good(train_images(small_screw_dir)[9:11], progress=False)
    assert model.calibration_scores.size == 13 + 2
    assert model.calibration_method == ("re-calibrated on 13 healthy photos from new light + 2 photos added on the "
                                        "line, each scored by the bank before it joined")
    model.set_false_alarm_rate(0.05)  # the same scores read for another rate: the count stays
    model.add_good(train_images(small_screw_dir)[11:12], progress=False)
    assert model.calibration_method.endswith("+ 3 photos added on the line, each scored by the bank before it joined")


def test_a_photo_a_recalibration_scored_joins_the_bank_without_its_score_counted_twice(half_model, screw_dir,
                                                                                     tmp_path):
    """New light: the line recalibrates on 13 photos, then confirms the same photos good. They join the bank, but
    their scores are among the healthy ones already: counted again, they narrowed the promise on no new evidence."""
    model = fresh(half_model, tmp_path)
    new_light = train_images(screw_dir)[-13:]
    model.recalibrate(new_light, progress=False)
    model.save(tmp_path / "recalibrated.pkl")
    model = PatchCore.load(tmp_path / "recalibrated.pkl")  # the file keeps which photos it was recalibrated on
    scores, threshold, bank = model.calibration_scores.copy(), model.threshold, len(model.memory_bank)
    update = model.add_good([*new_light[:5], train_images(screw_dir)[-14]], progress=False)
    assert update["photos"] == 6 and model.n_train == half_model.n_train + 6 and len(model.memory_bank) > bank
    np.testing.assert_array_equal(model.calibration_scores[: scores.size], scores)
    assert model.calibration_scores.size == scores.size + 1  # the one photo the recalibration did not score
    assert model.calibration["count"] == 14 and model.threshold != threshold
    assert model.calibration_method.endswith("+ 1 photos added on the line, each scored by the bank before it joined")
