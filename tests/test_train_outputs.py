"""train.py's choices before any fitting: the defaults a folder's name selects, and where its model and
report go; --recalibrate checks its output and its photos before scoring anything."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest

from config import run_cli
from models.patchcore import PatchCore
from evaluation.mvtec import train_images


class Stop(Exception):
    """Raised in place of a fit: what matters here is what the fit was given."""


def link_folder(source: Path, target: Path, n_train: int = 3, with_test: bool = False) -> Path:
    (target / "train" / "good").mkdir(parents=True)
    for image in train_images(source)[:n_train]:
        (target / "train" / "good" / image.name).symlink_to(image.resolve())
    if with_test:
        (target / "test" / "good").mkdir(parents=True)
        (target / "test" / "good" / "000.png").symlink_to(train_images(source)[-1].resolve())
    return target


@pytest.fixture()
def fit_configs(monkeypatch) -> list:
    configs = []

    def recording_fit(self, *args, **kwargs):
        configs.append(self.config)
        raise Stop

    monkeypatch.setattr(PatchCore, "fit", recording_fit)
    return configs


@pytest.mark.parametrize("folder, preprocess, clahe", [("screw", "on", False), ("fasteners", "auto", False)])
def test_a_data_folder_named_after_a_category_gets_that_categorys_defaults(
    small_screw_dir, tmp_path, monkeypatch, fit_configs, folder, preprocess, clahe
):
    import train

    link_folder(small_screw_dir, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Stop):
        train.main(["--data-dir", folder, "--backbone", "efficientnet_lite0"])
    (config,) = fit_configs
    assert (config.preprocess, config.clahe) == (preprocess, clahe)


@pytest.mark.parametrize("data, where, argv, model_file", [
    ("data/mvtec_ad/screw", ".", ["--category", "screw"], "saved_models/patchcore_mvtec_screw.pkl"),
    ("bolts", "bolts", ["--data-dir", "."], "saved_models/patchcore_bolts.pkl"),  # '.': the folder's own name
])
def test_without_output_the_model_file_is_named_after_the_category_or_the_folder(
    small_screw_dir, tmp_path, monkeypatch, capsys, fit_configs, data, where, argv, model_file
):
    """Where the README's commands look for it; found before the fit: a folder in its place stops it, named."""
    import train

    link_folder(small_screw_dir, tmp_path / data)
    monkeypatch.chdir(tmp_path / where)
    Path(model_file).mkdir(parents=True)
    assert run_cli(lambda: train.main([*argv, "--backbone", "efficientnet_lite0"])) == 2
    assert capsys.readouterr().err.startswith(f"error: {model_file}: is a folder; give a file name")
    assert fit_configs == []


def test_the_report_of_a_fit_goes_to_outputs_named_after_its_output_file(
    small_screw_dir, tmp_path, monkeypatch, capsys, fit_configs
):
    """Checked before the fit: a file where outputs/bolts_v2/ must go stops it, naming that path."""
    import train

    link_folder(small_screw_dir, tmp_path / "bolts", with_test=True)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "bolts_v2").write_text("in the way")
    monkeypatch.chdir(tmp_path)
    argv = ["--data-dir", "bolts", "--backbone", "efficientnet_lite0", "--output", "models/bolts_v2.pkl"]
    assert run_cli(lambda: train.main(argv)) == 2
    assert "outputs/bolts_v2/metrics.json" in capsys.readouterr().err
    assert fit_configs == []


def test_recalibrate_checks_its_output_and_every_photo_before_scoring(
    fitted_model, small_screw_dir, tmp_path, monkeypatch, capsys
):
    import train

    model_file = tmp_path / "model.pkl"
    fitted_model.save(model_file)
    before = model_file.read_bytes()
    photos = link_folder(small_screw_dir, tmp_path / "new_light")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(PatchCore, "recalibrate", lambda *a, **k: pytest.fail("scored before the checks"))
    (tmp_path / "taken").mkdir()
    common = ["--recalibrate", "--model", str(model_file), "--data-dir", str(photos), "--quiet"]
    assert run_cli(lambda: train.main([*common, "--output", "taken"])) == 2
    assert "taken: is a folder" in capsys.readouterr().err
    (photos / "train" / "good" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    assert run_cli(lambda: train.main(common)) == 2
    assert "cut.png" in capsys.readouterr().err
    assert model_file.read_bytes() == before


@pytest.mark.parametrize("command, photo", [("fit", "train/good/000.png"), ("fit", "test/good/000.png"),
                                            ("fit", "ground_truth/rust/000_mask.png"),
                                            ("--recalibrate", "train/good/000.png"),
                                            ("--add-good", "train/good/000.png")])
def test_a_model_output_named_as_a_photo_the_run_reads_is_refused_before_the_work(
    fitted_model, small_screw_dir, tmp_path, monkeypatch, capsys, fit_configs, command, photo
):
    """--output train/good/000.png would write the model over a training photo (and the next fit on that folder
    would find an unreadable photo): refused, naming it, before anything is fitted or scored."""
    import train

    data = tmp_path / "bolts"
    (data / "train" / "good").mkdir(parents=True)
    (data / "test" / "good").mkdir(parents=True)
    (data / "test" / "rust").mkdir(parents=True)
    (data / "ground_truth" / "rust").mkdir(parents=True)
    for name, source in (("train/good/000.png", train_images(small_screw_dir)[0]),
                         ("test/good/000.png", train_images(small_screw_dir)[-1]),
                         ("test/rust/000.png", train_images(small_screw_dir)[1]),
                         ("ground_truth/rust/000_mask.png", train_images(small_screw_dir)[2])):  # read as a mask
        (data / name).write_bytes(source.read_bytes())
    before = (data / photo).read_bytes()
    model_file = tmp_path / "model.pkl"
    fitted_model.save(model_file)
    for update in ("recalibrate", "add_good"):
        monkeypatch.setattr(PatchCore, update, lambda *a, **k: pytest.fail("scored before the checks"))
    argv = ([] if command == "fit" else [command, "--model", str(model_file)]) + [
        "--data-dir", str(data), "--output", str(data / photo), "--quiet"]
    if command == "fit":
        argv += ["--backbone", "efficientnet_lite0"]
    assert run_cli(lambda: train.main(argv)) == 2
    assert capsys.readouterr().err == f"error: {data / photo}: is {data / photo}, one of the photos this run reads; " \
                                      "give another file name\n"
    assert (data / photo).read_bytes() == before and fit_configs == []


def test_training_photos_that_are_copies_of_others_are_fitted_once_and_named(small_screw_dir, tmp_path, monkeypatch,
                                                                             capsys):
    """A photo copied twice into train/good: in another calibration fold, a copy scores its twin as a photo the bank
    has seen, and the threshold falls below new healthy parts. Each photo is fitted once, and the copies named."""
    import train

    fitted: list[list[Path]] = []

    def recording_fit(self, images, *args, **kwargs):
        fitted.append(list(images))
        raise Stop

    monkeypatch.setattr(PatchCore, "fit", recording_fit)
    good = link_folder(small_screw_dir, tmp_path / "bolts") / "train" / "good"
    originals = sorted(good.iterdir())
    (good / "copy_a.png").write_bytes(originals[0].read_bytes())
    cv2.imwrite(str(good / "copy_b.bmp"), cv2.imread(str(originals[0]), cv2.IMREAD_UNCHANGED))  # same pixels
    with pytest.raises(Stop):
        train.main(["--data-dir", str(tmp_path / "bolts"), "--backbone", "efficientnet_lite0", "--quiet"])
    assert fitted == [originals]
    assert capsys.readouterr().out == (f"note: 2 training photos are copies of others, used once each: "
                                       f"{good / 'copy_a.png'} = {originals[0]}; {good / 'copy_b.bmp'} = {originals[0]}\n")
