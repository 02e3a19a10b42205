from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from evaluation.mvtec import load_test_split, train_images
from models.calibration import fit_tail, promise, read_at

ROOT = Path(__file__).resolve().parents[1]


def run_train(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """train.py as a user runs it, from a folder of their own."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_an_unreadable_test_photo_is_named_the_rest_evaluated_and_the_exit_is_3(tmp_path, screw_dir):
    """As in any batch: the model is saved and evaluated on what can be read; exit 3 says a photo was left out."""
    import json

    from conftest import link_subset

    data = link_subset(screw_dir, tmp_path / "parts", n_train=4, n_test_per_kind=1)
    (data / "test" / "good" / "999.png").write_bytes(b"not a png")
    result = run_train("--data-dir", "parts", "--backbone", "efficientnet_lite0", "--image-size", "128", "--quiet",
                       cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    assert (tmp_path / "saved_models" / "patchcore_parts.pkl").is_file()
    assert "999.png: not a readable image" in result.stderr
    metrics = json.loads((tmp_path / "outputs" / "patchcore_parts" / "metrics.json").read_text())
    assert metrics["n_skipped"] == 1 and metrics["n_test_good"] == 1
    # the summary says one photo was skipped, and where the metrics and the report are
    assert (f"test {metrics['n_test']} images (1 good, {metrics['n_test_defective']} defective, 1 skipped)"
            in result.stdout)
    assert "metrics: outputs/patchcore_parts/metrics.json  report: outputs/patchcore_parts/report.html" in result.stdout


def test_missing_category_data_says_how_to_get_it(tmp_path):
    message = one_line_error(run_train("--category", "screw", cwd=tmp_path))
    assert "data/mvtec_ad/screw" in message and "download_datasets.py" in message and "--data-dir" in message


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "parts" / "train" / "good").mkdir(parents=True)
    message = one_line_error(run_train("--data-dir", "parts", cwd=tmp_path))
    assert "train/good" in message and "no images" in message


def test_unreadable_training_image_is_named(tmp_path, small_screw_dir):
    good = tmp_path / "parts" / "train" / "good"
    good.mkdir(parents=True)
    for image in sorted((small_screw_dir / "train" / "good").iterdir())[:3]:
        (good / image.name).symlink_to(image.resolve())
    (good / "broken.png").write_bytes(b"\x89PNG not really")
    message = one_line_error(run_train("--data-dir", "parts", "--backbone", "efficientnet_lite0", cwd=tmp_path))
    assert "broken.png" in message and "not a readable image" in message


def test_wide_resnet_offline_without_weights_names_the_remedies(tmp_path):
    (tmp_path / "parts" / "train" / "good").mkdir(parents=True)
    from skimage import data, io

    for index, photo in enumerate([data.coffee(), data.coffee()[:, ::-1]]):  # two photos, not one photo twice
        io.imsave(tmp_path / "parts" / "train" / "good" / f"{index}.png", photo)
    env = {"TORCH_HOME": str(tmp_path / "torch"), "PATH": "/usr/bin:/bin", "no_proxy": "*", "https_proxy": "http://127.0.0.1:9"}
    message = one_line_error(run_train("--data-dir", "parts", "--backbone", "wide_resnet50_2", cwd=tmp_path, env=env))
    assert "--weights" in message and "efficientnet_lite0" in message


def test_unknown_setting_in_yaml_is_refused(tmp_path):
    (tmp_path / "settings.yaml").write_text("coreset_ratio: 0.1\n")
    (tmp_path / "parts" / "train" / "good").mkdir(parents=True)
    message = one_line_error(run_train("--data-dir", "parts", "--config", "settings.yaml", cwd=tmp_path))
    assert "coreset_ratio" in message


def test_fit_writes_the_model_file_named_after_the_folder(tmp_path, small_screw_dir):
    from models.patchcore import PatchCore

    parts = tmp_path / "my_screws" / "train" / "good"
    parts.mkdir(parents=True)
    for image in sorted((small_screw_dir / "train" / "good").iterdir())[:6]:
        (parts / image.name).symlink_to(image.resolve())
    result = run_train(  # --drop-unlike with no photo listed: one fit, nothing left out
        "--data-dir", "my_screws", "--backbone", "efficientnet_lite0", "--image-size", "128", "--quiet", "--drop-unlike",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "saved_models" / "patchcore_my_screws.pkl").is_file()
    model = PatchCore.load(tmp_path / "saved_models" / "patchcore_my_screws.pkl")
    assert "check these" not in result.stdout  # no photo to check: no list, not an empty one
    assert "fitting again" not in result.stdout and "left_out" not in model.calibration
    # what the threshold promises, then why 6 photos cannot pin 1 in 100
    expected = model.calibration["false_alarms_per_1000"]  # 6 photos are too few to keep 10 even on average
    assert expected > 10
    assert f"threshold {model.threshold:.3f}: expect {expected:g} false alarms per 1,000 healthy parts" in result.stdout
    assert "warning: the threshold rests on 6 healthy photos, fewer than the 100" in result.stdout
    assert "model saved to saved_models/patchcore_my_screws.pkl" in result.stdout
    assert "network exported beside it to saved_models/patchcore_my_screws.onnx" in result.stdout
    assert (tmp_path / "saved_models" / "patchcore_my_screws.onnx").is_file()
    assert (f"memory bank: each of 2,048 training patches sampled at random lies within {model.coverage_radius:.3f} "
            "of a kept one" in result.stdout)
    assert result.stderr == ""  # --quiet: no progress bars
    pipeline = next(line for line in result.stdout.splitlines() if line.startswith("preprocessing: pipeline:"))
    assert "of pairs" in pipeline  # the trial of the two pipelines, in plain words
    assert not re.search(r"AUROC|covering radius", result.stdout), result.stdout


@pytest.mark.parametrize("flag", ["--help"])
def test_help_lists_the_settings(flag, tmp_path):
    result = run_train(flag, cwd=tmp_path)
    assert result.returncode == 0
    assert "--coreset-sampling-ratio" in result.stdout and "--weights" in result.stdout


def test_preprocess_only_writes_preview_sheets_and_no_model(tmp_path, small_screw_dir):
    result = run_train("--data-dir", str(small_screw_dir), "--preprocess-only", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sheets = sorted((tmp_path / "outputs" / "preprocess_preview").glob("*_steps.png"))
    assert len(sheets) == 8
    assert "outputs/preprocess_preview" in result.stdout
    assert not (tmp_path / "saved_models").exists()


def test_calibration_never_reads_a_test_image(tmp_path, small_screw_dir, monkeypatch):
    """Every photo decoded while fitting (preprocessing choice, memory bank and threshold) comes from
    train/good, even though train.py goes on to evaluate the test split of the same folder."""
    import train
    from models import patchcore, pipeline_selection

    monkeypatch.chdir(tmp_path)
    fitting, read_while_fitting = [0], []  # depth: preprocess auto fits candidate models inside the fit
    real_read, real_fit = patchcore.read_image, patchcore.PatchCore.fit

    def recording_read(path, *args, **kwargs):
        if fitting[0]:
            read_while_fitting.append(Path(path))
        return real_read(path, *args, **kwargs)

    def flagged_fit(self, *args, **kwargs):
        fitting[0] += 1
        try:
            return real_fit(self, *args, **kwargs)
        finally:
            fitting[0] -= 1

    monkeypatch.setattr(patchcore, "read_image", recording_read)
    monkeypatch.setattr(pipeline_selection, "read_image", recording_read)
    monkeypatch.setattr(patchcore.PatchCore, "fit", flagged_fit)
    args = ["--data-dir", str(small_screw_dir), "--backbone", "efficientnet_lite0", "--image-size", "128", "--quiet"]
    assert train.main(args) == 0
    assert list((tmp_path / "outputs").glob("*/metrics.json")), "the test split was evaluated after the fit"
    assert set(read_while_fitting) == set(train_images(small_screw_dir))  # every training photo, nothing else
    assert all(path.parent == small_screw_dir / "train" / "good" for path in read_while_fitting)


def test_every_bad_training_photo_is_listed_and_nothing_is_fitted(tmp_path, small_screw_dir, monkeypatch, capsys):
    """A truncated or corrupt photo must not silently enter the memory bank: the fit is refused, naming each."""
    import train
    from config import run_cli
    from models.patchcore import PatchCore

    good = tmp_path / "parts" / "train" / "good"
    good.mkdir(parents=True)
    for image in sorted((small_screw_dir / "train" / "good").iterdir())[:4]:
        (good / image.name).symlink_to(image.resolve())
    data = (small_screw_dir / "train" / "good" / "000.png").resolve().read_bytes()
    (good / "cut.png").write_bytes(data[: len(data) // 2])
    (good / "text.png").write_text("hello")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(PatchCore, "fit", lambda *a, **k: pytest.fail("fitted despite bad training photos"))
    assert run_cli(lambda: train.main(["--data-dir", "parts", "--backbone", "efficientnet_lite0"])) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: 2 of 6 training photos cannot be used; remove or replace them: ")
    assert "parts/train/good/cut.png: truncated PNG" in line and "parts/train/good/text.png: not a readable image" in line
    assert not (tmp_path / "saved_models").exists() or not list((tmp_path / "saved_models").iterdir())


def test_a_fit_learns_from_the_photos_of_folders_linked_into_train_good(tmp_path, small_screw_dir, monkeypatch):
    """A folder linked into train/good is part of it: the bank learns from its photos too, each photo once
    even when a link leads back up (a loop)."""
    import train
    from models.patchcore import PatchCore

    good, cam2 = tmp_path / "parts" / "train" / "good", tmp_path / "cam2"
    good.mkdir(parents=True)
    cam2.mkdir()
    photos = [path.resolve() for path in train_images(small_screw_dir)[:5]]
    for folder, photo in zip([good, good, cam2, cam2, cam2], photos):
        (folder / photo.name).symlink_to(photo)
    (good / "cam2").symlink_to(cam2)
    (cam2 / "back").symlink_to(good)
    fitted: list[Path] = []

    class Fitted(Exception):
        """Raised in place of the fit, once its photos are known."""

    def record(self, paths, *args, **kwargs):
        fitted.extend(Path(path) for path in paths)
        raise Fitted

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(PatchCore, "fit", record)
    with pytest.raises(Fitted):
        train.main(["--data-dir", "parts", "--backbone", "efficientnet_lite0"])
    assert sorted(path.resolve() for path in fitted) == sorted(photos)


def test_a_broken_link_to_a_folder_in_train_good_refuses_the_fit_naming_it(tmp_path, small_screw_dir):
    """Its photos cannot be learnt from: the model would learn from fewer photos than the folder holds."""
    good = tmp_path / "parts" / "train" / "good"
    good.mkdir(parents=True)
    for image in train_images(small_screw_dir)[:3]:
        (good / image.name).symlink_to(image.resolve())
    (good / "cam2").symlink_to(tmp_path / "unmounted")
    message = one_line_error(run_train("--data-dir", "parts", "--backbone", "efficientnet_lite0", cwd=tmp_path))
    assert message.startswith("error: 1 of 4 training photos cannot be used") and "parts/train/good/cam2: broken" in message


@pytest.mark.parametrize(
    "output, named, reason",
    [
        ("folder", "folder", "is a folder; give a file name"),
        ("/dev/null", "/dev/null", "is a device, FIFO or socket, not a file"),
        ("blocker/model.pkl", "blocker/model.pkl", "cannot be written (Not a directory)"),
        ("taken.pkl", "taken.onnx", "is a folder; give a file name"),  # where the network's export goes
        ("model.onnx", "model.onnx", "a model file cannot end in .onnx"),  # it would be saved over its export
    ],
)
def test_an_unwritable_output_is_refused_before_the_fit(
    tmp_path, small_screw_dir, monkeypatch, capsys, output, named, reason
):
    import train
    from config import run_cli
    from models.patchcore import PatchCore

    (tmp_path / "folder").mkdir()
    (tmp_path / "taken.onnx").mkdir()
    (tmp_path / "blocker").write_text("a file where a folder should be")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(PatchCore, "fit", lambda *a, **k: pytest.fail("fitted before checking the output"))
    argv = ["--data-dir", str(small_screw_dir), "--backbone", "efficientnet_lite0", "--output", output]
    assert run_cli(lambda: train.main(argv)) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {named}: {reason}")
    assert os.stat("/dev/null").st_mode == DEV_NULL_MODE


@pytest.mark.parametrize("command, long_work", [("--add-good", "add_good"), ("--recalibrate", "recalibrate")])
def test_an_update_refuses_an_unwritable_export_path_before_scoring(
    tmp_path, fitted_model, small_screw_dir, monkeypatch, capsys, command, long_work
):
    import train
    from config import run_cli
    from models.patchcore import PatchCore

    fitted_model.save(tmp_path / "model.pkl")
    (tmp_path / "taken.onnx").mkdir()  # where the updated model's export goes
    monkeypatch.setattr(PatchCore, long_work, lambda *a, **k: pytest.fail("scored before checking the output"))
    argv = [command, "--model", str(tmp_path / "model.pkl"), "--data-dir", str(small_screw_dir / "train" / "good"),
            "--output", str(tmp_path / "taken.pkl"), "--quiet"]
    assert run_cli(lambda: train.main(argv)) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'taken.onnx'}: is a folder; give a file name")


DEV_NULL_MODE = os.stat("/dev/null").st_mode


def test_a_read_only_output_folder_is_refused_before_the_fit(tmp_path, small_screw_dir):
    from test_io import without_root_powers

    (tmp_path / "read_only").mkdir()
    (tmp_path / "read_only").chmod(0o555)
    command = [sys.executable, str(ROOT / "train.py"), "--data-dir", str(small_screw_dir), "--backbone",
               "efficientnet_lite0", "--output", "read_only/model.pkl"]
    result = subprocess.run(without_root_powers(command), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    line = one_line_error(result)
    assert line == "error: read_only/model.pkl: cannot be written (Permission denied); any previous file is unchanged"
    assert "fitting" not in result.stdout


def test_settings_are_checked_before_any_work(tmp_path, small_screw_dir, monkeypatch, capsys):
    import train
    from config import run_cli
    from models.patchcore import PatchCore

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(PatchCore, "fit", lambda *a, **k: pytest.fail("fitted with a bad setting"))
    (tmp_path / "settings.yaml").write_text("false_alarm_rate: 1.5\nclahe: 'no'\n")
    argv = ["--data-dir", str(small_screw_dir), "--config", "settings.yaml", "--target-dim", "0"]
    assert run_cli(lambda: train.main(argv)) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: invalid settings: target_dim must be 1 to 8192, got 0; false_alarm_rate must be between 0 "
        "and 0.5, both excluded, got 1.5; clahe must be true or false, got 'no'"
    ]


def test_recalibrate_moves_the_threshold_and_keeps_the_memory_bank(tmp_path, fitted_model, screw_dir):
    from models.patchcore import PatchCore

    model_path = tmp_path / "model.pkl"
    fitted_model.save(model_path)
    new_camera = tmp_path / "new camera"
    new_camera.mkdir()
    healthy = train_images(screw_dir)[-6:]  # photos the model was not fitted on; enough to hold 1 in 10
    for index, path in enumerate(healthy):
        (new_camera / f"{index}.png").symlink_to(path.resolve())
    result = run_train("--recalibrate", "--model", str(model_path), "--data-dir", str(new_camera), "--quiet",
                       "--false-alarm-rate", "0.1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    recalibrated = PatchCore.load(model_path)
    assert recalibrated.memory_bank.tobytes() == fitted_model.memory_bank.tobytes()
    assert recalibrated.calibration_scores.size == len(healthy)
    # the rule at 1 in 10: the law through the scores' quartile and 90th percentile, read where that many
    # photos flag 1 in 10 on average
    law = fit_tail(recalibrated.calibration_scores)
    assert law.threshold(0.1) == pytest.approx(float(np.quantile(recalibrated.calibration_scores, 0.9)), rel=1e-5)
    expected = law.threshold(read_at(len(healthy), 0.1)[0])
    assert recalibrated.threshold == pytest.approx(expected, rel=1e-5)
    assert recalibrated.calibration_method == f"re-calibrated on {len(healthy)} healthy photos from {new_camera}"
    assert f"threshold {fitted_model.threshold:.3f} -> {recalibrated.threshold:.3f}" in result.stdout
    # what the new threshold promises, as after a fit; --quiet: no progress bars
    assert f"threshold {recalibrated.threshold:.3f}: {promise(recalibrated.calibration)}" in result.stdout
    assert result.stderr == ""


def test_recalibrate_on_the_photos_the_model_was_fitted_on_is_refused(tmp_path, fitted_model, small_screw_dir):
    """The training folder is the folder at hand, but a bank scores its own photos low: the threshold would drop
    and flag healthy parts by the dozen, under a promise that still read 1 in 100."""
    model_path = tmp_path / "model.pkl"
    fitted_model.save(model_path)
    original = model_path.read_bytes()
    result = run_train("--recalibrate", "--model", str(model_path), "--data-dir", str(small_screw_dir), "--quiet",
                       "--false-alarm-rate", "0.1", cwd=tmp_path)  # 12 photos hold 1 in 10
    count = len(train_images(small_screw_dir))
    assert one_line_error(result).startswith(
        f"error: {count} of {count} photos are in the memory bank already (the model was fitted on them or learnt "
        "them)")
    assert model_path.read_bytes() == original


def test_recalibrate_of_a_model_file_without_fingerprints_warns_that_it_cannot_refuse_its_own_photos(
        tmp_path, fitted_model, screw_dir):
    import pickle

    model_path = tmp_path / "model.pkl"
    fitted_model.save(model_path)
    state = pickle.loads(model_path.read_bytes())  # our own file: trusted here
    del state["learnt_photos"]  # as every file saved before models kept them
    model_path.write_bytes(pickle.dumps(state))
    photos = tmp_path / "new_light"
    photos.mkdir()
    for image in train_images(screw_dir)[-13:]:  # enough to hold 1 in 100
        (photos / image.name).symlink_to(image.resolve())
    result = run_train("--recalibrate", "--model", str(model_path), "--data-dir", str(photos), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == (
        f"warning: {model_path} keeps no fingerprints of the photos in its memory bank (it was saved before models "
        "kept them): it cannot tell them from new ones, so make sure these are photos it was not fitted on")


def test_recalibrate_with_a_rate_alone_reads_the_threshold_off_the_scores_the_model_keeps(tmp_path, fitted_model):
    """Another promise needs no photos: the held-out scores of the fit are in the model file."""
    from models.patchcore import PatchCore

    model_path, other = tmp_path / "model.pkl", tmp_path / "other.pkl"
    fitted_model.save(model_path)
    result = run_train("--recalibrate", "--model", str(model_path), "--false-alarm-rate", "0.1", "--quiet",
                       "--output", str(other), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # written elsewhere, with the network's export beside it: a line PC without torch scores with it
    assert other.with_suffix(".onnx").read_bytes() == model_path.with_suffix(".onnx").read_bytes()
    changed = PatchCore.load(other, runtime="onnx")
    assert changed.threshold == pytest.approx(fitted_model.threshold_for(0.1), rel=1e-6)
    assert changed.threshold < fitted_model.threshold and changed.config.false_alarm_rate == 0.1
    np.testing.assert_array_equal(changed.calibration_scores, fitted_model.calibration_scores)
    np.testing.assert_array_equal(changed.memory_bank, fitted_model.memory_bank)
    assert changed.calibration_method == fitted_model.calibration_method
    assert changed.calibration["false_alarm_rate"] == 0.1
    assert result.stdout.splitlines()[0] == (
        f"false_alarm_rate 0.1, read off the {fitted_model.calibration_scores.size} held-out healthy scores the "
        f"model keeps: threshold {fitted_model.threshold:.3f} -> {changed.threshold:.3f}; saved to {other} (memory bank "
        "unchanged)")


@pytest.mark.parametrize("args", [["--recalibrate", "--data-dir", "x"], ["--recalibrate", "--model", "m.pkl"],
                                  ["--recalibrate", "--model", "m.pkl", "--category", "screw", "--false-alarm-rate",
                                   "0.05"],
                                  ["--recalibrate", "--model", "m.pkl", "--data-dir", "x", "--image-size", "128"],
                                  ["--data-dir", "x", "--model", "m.pkl"],
                                  ["--recalibrate", "--model", "m.pkl", "--data-dir", "x", "--config", "s.yaml"],
                                  ["--recalibrate", "--model", "m.pkl", "--data-dir", "x", "--drop-unlike"],
                                  ["--recalibrate", "--model", "m.pkl", "--data-dir", "x", "--clahe", "false"],
                                  ["--data-dir", "x", "--preprocess-only", "--drop-unlike"],
                                  ["--recalibrate", "--model", "m.pkl", "--data-dir", "x", "--preprocess-only"],
                                  ["--add-good", "--model", "m.pkl", "--data-dir", "x", "--preprocess-only"],
                                  ["--data-dir", "x", "--preprocess-only", "--output", "m.pkl"]])
def test_recalibrate_usage_errors(args, tmp_path):
    """A combination train.py cannot honour is a usage error, never a run that ignores part of it
    (a setting given as false counts as given)."""
    result = run_train(*args, cwd=tmp_path)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_a_training_photo_unlike_the_rest_is_listed_with_its_heatmap_and_drop_unlike_fits_without_it(
    tmp_path, small_screw_dir
):
    """A defective part in the "healthy" folder: train.py names it, shows its held-out heatmap, and
    --drop-unlike fits again without it, recording what it left out."""
    from models.patchcore import PatchCore

    good = tmp_path / "part" / "train" / "good"
    good.mkdir(parents=True)
    for path in train_images(small_screw_dir):
        (good / path.name).symlink_to(path.resolve())
    photo = cv2.imread(str(train_images(small_screw_dir)[0]))
    noise = np.random.default_rng(0).integers(0, 256, (24, 24, 3)).astype(np.uint8)
    photo[300:700, 300:700] = cv2.resize(noise, (400, 400), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(good / "odd.png"), photo)
    model_path = tmp_path / "model.pkl"
    args = ["--data-dir", str(tmp_path / "part"), "--backbone", "efficientnet_lite0", "--image-size", "128",
            "--preprocess", "on", "--quiet", "--output", str(model_path)]
    result = run_train(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "check these 1 training photos" in result.stdout
    listed = [line for line in result.stdout.splitlines() if line.startswith("  ")]
    assert len(listed) == 1 and "odd.png" in listed[0] and "heatmap" in listed[0]
    assert list((tmp_path / "outputs" / "model" / "unlike_the_rest").glob("odd.png_heatmap.png"))
    fitted = PatchCore.load(model_path)
    (entry,) = fitted.calibration["unlike_the_rest"]
    assert Path(entry["photo"]).name == "odd.png"
    assert f": score {entry['score']:.3f} ({entry['score'] / fitted.threshold:.2f} x threshold)" in listed[0]

    result = run_train(*args, "--drop-unlike", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    refitted = PatchCore.load(model_path)
    assert refitted.n_train == len(train_images(small_screw_dir))
    assert [Path(photo).name for photo in refitted.calibration["left_out"]] == ["odd.png"]


def test_a_heatmap_that_cannot_be_written_costs_the_listing_its_picture_not_the_fit(
    fitted_model, small_screw_dir, tmp_path, capsys
):
    """The listed photo is still named with its score, one warning says why its heatmap is missing, and
    the model file records no heatmap: a blocked outputs folder never throws away a finished fit."""
    import copy

    import train

    model = copy.copy(fitted_model)
    photo = str(train_images(small_screw_dir)[0])
    model.calibration = {**fitted_model.calibration, "unlike_the_rest": [{"photo": photo, "score": 99.0}]}
    model.held_out_maps = {photo: np.full((1024, 1024), 99.0, np.float32)}
    (tmp_path / "outputs").write_text("a file where the folder would go")
    assert train.print_unlike_the_rest(model, tmp_path / "outputs" / "unlike_the_rest") == [photo]
    shown = capsys.readouterr()
    assert shown.out.splitlines()[-1] == f"  {photo}: score 99.000 ({99.0 / model.threshold:.2f} x threshold)"
    assert shown.err.startswith("warning: ") and shown.err.endswith("; listed without its heatmap\n")
    assert "heatmap" not in model.calibration["unlike_the_rest"][0]


def test_a_blank_or_tiny_training_photo_is_refused_naming_each(tmp_path, small_screw_dir, monkeypatch, capsys):
    """A 1x1 frame or a blank one would teach the bank that an empty view is a healthy part."""
    import cv2

    import train
    from config import run_cli
    from models.patchcore import PatchCore

    good = tmp_path / "parts" / "train" / "good"
    good.mkdir(parents=True)
    for image in sorted((small_screw_dir / "train" / "good").iterdir())[:4]:
        (good / image.name).symlink_to(image.resolve())
    cv2.imwrite(str(good / "dot.png"), np.zeros((1, 1, 3), np.uint8))
    cv2.imwrite(str(good / "blank.png"), np.full((256, 256, 3), 128, np.uint8))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(PatchCore, "fit", lambda *a, **k: pytest.fail("fitted on a blank photo"))
    assert run_cli(lambda: train.main(["--data-dir", "parts", "--backbone", "efficientnet_lite0"])) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: 2 of 6 training photos cannot be used; remove or replace them: ")
    assert "parts/train/good/dot.png: 1x1 pixels is too small to show a part (at least 32 on each side)" in line
    assert "parts/train/good/blank.png: blank: its pixels vary by 0.00 grey levels" in line


def test_a_full_disk_for_the_model_file_is_refused_before_the_fit(tmp_path, small_screw_dir):
    """The file-size limit makes the kernel refuse writes as a full disk would: found before fitting."""
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import train\nfrom config import run_cli\n"
        f"sys.exit(run_cli(lambda: train.main(['--data-dir', {str(small_screw_dir)!r}, '--backbone', "
        "'efficientnet_lite0', '--output', 'model.pkl'])))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    line = one_line_error(result)
    assert line == "error: model.pkl: cannot be written (File too large); any previous file is unchanged"
    assert "fitting" not in result.stdout


def test_a_recalibration_never_saves_over_an_update_the_line_saved_meanwhile(tmp_path, fitted_model, screw_dir,
                                                                             monkeypatch, capsys):
    """The service learnt a photo and saved while train.py scored new photos: saving the re-calibration over it
    would lose what the line learnt, with no copy kept."""
    import train
    from config import run_cli
    from models.patchcore import PatchCore

    model_path = tmp_path / "model.pkl"
    fitted_model.save(model_path)
    photos = tmp_path / "new_light"
    photos.mkdir()
    for image in train_images(screw_dir)[-13:]:  # enough to hold 1 in 100
        (photos / image.name).symlink_to(image.resolve())
    scoring = PatchCore.recalibrate

    def while_the_line_learns(self, *args, **kwargs):
        scoring(self, *args, **kwargs)
        model_path.write_bytes(model_path.read_bytes() + b"")  # the line's update, saved anew
        os.utime(model_path, ns=(1, 1))

    monkeypatch.setattr(PatchCore, "recalibrate", while_the_line_learns)
    saved_by_the_line = model_path.read_bytes()
    argv = ["--recalibrate", "--model", str(model_path), "--data-dir", str(photos), "--quiet"]
    assert run_cli(lambda: train.main(argv)) == 2
    assert capsys.readouterr().err.startswith(f"error: {model_path}: replaced on disk since it was loaded")
    assert model_path.read_bytes() == saved_by_the_line and list(tmp_path.glob("*.before-update-*")) == []
