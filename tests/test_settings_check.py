"""Comparing settings (evaluation/settings_check.py, scripts/compare_settings.py): every candidate is
fitted on the same training photos, meets the same held-out photos and painted copies, and is counted
at its own threshold; a bad candidate is refused before any fit."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

import evaluation.settings_check as settings_check
from config import run_cli
from conftest import small_config
from evaluation.metrics import wilson_interval
from evaluation.settings_check import Trial, compare_settings
from synthetic.defects import MAX_SCALE

SIDE = 200


def healthy_part() -> np.ndarray:
    """A grey disc on a dark table: every training photo is this one, so any painted pixel stands out."""
    image = np.full((SIDE, SIDE, 3), 30, np.uint8)
    cv2.circle(image, (SIDE // 2, SIDE // 2), 70, (150, 150, 150), -1)
    return image


class DifferenceModel:
    """Stands in for PatchCore: a photo's score is how far it is from the healthy disc; it records
    what each instance was fitted on and shown."""

    instances: list[DifferenceModel] = []

    def __init__(self, config) -> None:
        self.config, self.threshold = config, 0.01
        self.fitted: list[str] = []
        self.shown: list[np.ndarray] = []
        DifferenceModel.instances.append(self)

    def fit(self, photos, progress=True) -> None:
        self.fitted = [Path(photo).name for photo in photos]

    def predict(self, images):
        self.shown = list(images)
        return [SimpleNamespace(score=float(np.abs(image.astype(int) - healthy_part()).mean())) for image in images]


@pytest.fixture
def disc_photos(tmp_path: Path) -> list[Path]:
    photos = []
    for number in range(10):
        photos.append(tmp_path / f"{number:03d}.png")
        cv2.imwrite(str(photos[-1]), cv2.cvtColor(healthy_part(), cv2.COLOR_RGB2BGR))
    return photos


def test_every_candidate_meets_the_same_photos_and_painted_copies_and_is_counted_at_its_threshold(
    disc_photos, monkeypatch
):
    monkeypatch.setattr(settings_check, "PatchCore", DifferenceModel)
    DifferenceModel.instances = []
    candidates = {"as set": small_config(), "larger": small_config(image_size=160)}
    results = compare_settings(disc_photos, candidates, splits=2, defect_scale=1.0, seed=0, progress=False)
    first, second, third, fourth = DifferenceModel.instances  # split 1: both candidates, then split 2
    for same_split in ((first, second), (third, fourth)):
        one, other = same_split
        assert one.fitted == other.fitted and len(one.fitted) == 7  # 70 % of 10
        assert len(one.shown) == 6 and all(np.array_equal(a, b) for a, b in zip(one.shown, other.shown))
        healthy, painted = one.shown[:3], one.shown[3:]
        assert all(np.array_equal(image, healthy_part()) for image in healthy)  # held out, as read
        assert all(not np.array_equal(image, healthy_part()) for image in painted)  # each copy has a defect
        assert len(set(one.fitted)) == 7 and set(one.fitted) <= {photo.name for photo in disc_photos}
    assert first.fitted != third.fitted  # another seeded split
    for result in results.values():
        assert (result["painted_caught"], result["healthy_flagged"], result["photos"]) == (6, 0, 6)
        assert result["recall"] == 1.0 and result["recall_interval"] == wilson_interval(6, 6)
        assert result["auroc"] == 1.0 and result["cpu_seconds"] >= 0


def test_a_painted_copy_at_the_threshold_is_not_caught(disc_photos, monkeypatch):
    """Counted strictly above each model's own threshold, as every verdict is."""
    monkeypatch.setattr(settings_check, "PatchCore", DifferenceModel)
    monkeypatch.setattr(DifferenceModel, "predict", lambda self, images: [
        SimpleNamespace(score=0.01 if number >= len(images) // 2 else 0.0) for number in range(len(images))])
    result = compare_settings(disc_photos, {"as set": small_config()}, 1, 1.0, 0, progress=False)["as set"]
    assert (result["painted_caught"], result["healthy_flagged"], result["auroc"]) == (0, 0, 1.0)


def test_the_held_out_photos_are_never_among_those_fitted(disc_photos, monkeypatch):
    """A held-out photo the model also learnt from would pass by memory, and the false alarms would look rarer."""
    monkeypatch.setattr(settings_check, "PatchCore", DifferenceModel)
    DifferenceModel.instances = []
    held_out: list[str] = []
    reading = settings_check.read_image
    monkeypatch.setattr(settings_check, "read_image", lambda path: held_out.append(Path(path).name) or reading(path))
    compare_settings(disc_photos, {"as set": small_config()}, splits=2, defect_scale=1.0, seed=0, progress=False)
    for model, held in zip(DifferenceModel.instances, (held_out[:3], held_out[3:]), strict=True):
        assert sorted([*held, *model.fitted]) == [photo.name for photo in disc_photos]  # each photo once: held or fitted


def test_counts_add_up_over_the_splits_and_the_auroc_is_their_mean(disc_photos, monkeypatch):
    """Split 1 flags a healthy photo and catches the 3 copies (AUROC 1); split 2 flags none and misses a copy
    scoring as the healthy ones do (AUROC (3 x 0.5 + 6) / 9). Each fit and its scoring take 1 s of CPU."""
    scores = iter([[0.5, 0.0, 0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]])
    monkeypatch.setattr(settings_check, "PatchCore", DifferenceModel)
    monkeypatch.setattr(DifferenceModel, "predict", lambda self, images: [SimpleNamespace(score=s) for s in next(scores)])
    clock = itertools.count()
    monkeypatch.setattr(settings_check.time, "process_time", lambda: float(next(clock)))
    result = compare_settings(disc_photos, {"as set": small_config()}, 2, 1.0, 0, progress=False)["as set"]
    assert (result["painted_caught"], result["healthy_flagged"], result["photos"]) == (5, 1, 6)
    assert result["recall"] == pytest.approx(5 / 6) and result["false_alarm_rate"] == pytest.approx(1 / 6)
    assert result["auroc"] == pytest.approx((1.0 + 7.5 / 9) / 2)
    assert result["cpu_seconds"] == 2.0


def test_the_defect_scale_sets_the_size_of_the_painted_defects(disc_photos, monkeypatch):
    """--defect-scale is how a user makes the synthetic defects harder to catch: smaller ones cover fewer pixels."""
    monkeypatch.setattr(settings_check, "PatchCore", DifferenceModel)
    painted_pixels = []
    for scale in (0.3, 1.0):
        DifferenceModel.instances = []
        compare_settings(disc_photos, {"as set": small_config()}, 1, scale, 0, progress=False)
        (model,) = DifferenceModel.instances
        painted_pixels.append(sum(int((image != healthy_part()).any(axis=-1).sum()) for image in model.shown[3:]))
    assert 0 < painted_pixels[0] < painted_pixels[1]


@pytest.mark.parametrize("count", [4, 2])
def test_too_few_photos_are_refused(count, disc_photos):
    with pytest.raises(ValueError, match=f"at least 5 training photos, got {count}"):
        compare_settings(disc_photos[:count], {"as set": small_config()}, 1, 1.0, 0, progress=False)


def test_a_copy_with_no_room_for_its_defect_is_not_counted_as_a_missed_defect(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """At 3 x their usual size a chip or a dent finds no room on the disc: those copies are left out of the
    painted ones, so a model that sees every painted pixel catches every painted copy (recall and AUROC 1)."""
    monkeypatch.setattr(settings_check, "PatchCore", DifferenceModel)
    photos = []
    for number in range(20):
        photos.append(tmp_path / f"{number:03d}.png")
        cv2.imwrite(str(photos[-1]), cv2.cvtColor(healthy_part(), cv2.COLOR_RGB2BGR))
    result = compare_settings(photos, {"as set": small_config()}, 1, 3.0, 0, progress=False)["as set"]
    assert result["photos"] == 6 and 0 < result["painted"] < 6
    assert result["painted_caught"] == result["painted"] and result["recall"] == 1.0 and result["auroc"] == 1.0
    with pytest.raises(ValueError, match=r"^no synthetic defect at 0.01 x its usual size fits the parts of split 1"):
        compare_settings(photos, {"as set": small_config()}, 1, 0.01, 0, progress=False)


@pytest.mark.parametrize(("count", "defect_scale", "held"), [(5, 1.0, 2), (10, MAX_SCALE, 3)],
                         ids=["5 photos", "largest defect scale"])
def test_the_limits_the_refusals_name_are_themselves_accepted(count: int, defect_scale: float, held: int,
                                                              disc_photos: list[Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """"needs at least 5 training photos" and "must be at most 1000" mean what they say: 5 photos, and a defect
    scale of exactly 1000, are compared, not refused."""
    monkeypatch.setattr(settings_check, "PatchCore", DifferenceModel)
    result = compare_settings(disc_photos[:count], {"as set": small_config()}, 1, defect_scale, 0, progress=False)
    assert result["as set"]["photos"] == held


def test_the_seed_chooses_which_photos_are_held_out(disc_photos: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """--seed makes a comparison repeatable and another seed another one: the same seed holds out the same
    photos again, a different seed other photos."""
    monkeypatch.setattr(settings_check, "PatchCore", DifferenceModel)

    def held_out(seed: int) -> list[str]:
        DifferenceModel.instances = []
        compare_settings(disc_photos, {"as set": small_config()}, 1, 1.0, seed, progress=False)
        (model,) = DifferenceModel.instances
        return sorted({photo.name for photo in disc_photos} - set(model.fitted))

    assert held_out(3) == held_out(3) != held_out(4)


def test_the_defects_are_painted_on_the_part_the_chosen_segmentation_finds(disc_photos: list[Path],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """--segmentation-method grabcut is the method that finds the part each split's defects are painted on."""
    monkeypatch.setattr(settings_check, "PatchCore", DifferenceModel)
    methods: list[str] = []
    painting = settings_check.paint_defects
    monkeypatch.setattr(settings_check, "paint_defects",
                        lambda photos, method, *args: methods.append(method) or painting(photos, method, *args))
    compare_settings(disc_photos, {"as set": small_config()}, 2, 1.0, 0, progress=False, segmentation_method="grabcut")
    assert methods == ["grabcut", "grabcut"]


def test_the_auroc_over_three_splits_is_their_mean(disc_photos: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Over the default 3 splits, AUROCs of 1, 1 and 0.5 (a split whose scores are all equal) show as 0.833,
    not as the middle one, 1."""
    scores = iter([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]] * 2 + [[0.0] * 6])
    monkeypatch.setattr(settings_check, "PatchCore", DifferenceModel)
    monkeypatch.setattr(DifferenceModel, "predict", lambda self, images: [SimpleNamespace(score=s) for s in next(scores)])
    result = compare_settings(disc_photos, {"as set": small_config()}, 3, 1.0, 0, progress=False)["as set"]
    assert result["auroc"] == pytest.approx(2.5 / 3)


def test_the_settings_come_back_in_the_order_given(disc_photos: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The table lists the settings as given, the baseline first and each --try as typed, not sorted by name."""
    monkeypatch.setattr(settings_check, "PatchCore", DifferenceModel)
    names = ["as set", "image_size=160", "heatmap_sigma=2"]
    results = compare_settings(disc_photos, {name: small_config() for name in names}, 1, 1.0, 0, progress=False)
    assert list(results) == names


def test_the_progress_bar_counts_every_fit_and_quiet_hides_it(disc_photos: list[Path], monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Two settings over two splits are four fits: the bar counts up to 4/4; without progress (--quiet) nothing
    is written."""
    monkeypatch.setattr(settings_check, "PatchCore", DifferenceModel)
    candidates = {"as set": small_config(), "larger": small_config(image_size=160)}
    compare_settings(disc_photos, candidates, 2, 1.0, 0, progress=False)
    assert capsys.readouterr().err == ""
    compare_settings(disc_photos, candidates, 2, 1.0, 0, progress=True)
    bar = capsys.readouterr().err
    assert "comparing settings" in bar and "4/4" in bar


def test_a_candidate_is_the_settings_given_with_its_changes():
    from scripts.compare_settings import candidate

    changed = candidate(small_config(), "image_size=320, heatmap_sigma=6,clahe=false,false_alarm_rate=1e-3")
    assert (changed.image_size, changed.heatmap_sigma, changed.clahe) == (320, 6.0, False)
    assert changed.false_alarm_rate == 0.001  # read as a config file reads it, exponent and all
    listed = candidate(small_config(), "layers=[_blocks.3, _blocks.7], heatmap_sigma=2")
    assert (listed.layers, listed.heatmap_sigma) == (["_blocks.3", "_blocks.7"], 2.0)  # a list keeps its commas
    assert changed.backbone == small_config().backbone  # the rest as given


@pytest.mark.parametrize("text, reason", [
    ("image_size", "expected SETTING=VALUE"),
    ("imagesize=320", "unknown config key(s): imagesize"),
    ("image_size=250", "image_size must be 32 to 1024, a multiple of 16, got 250"),
    ("false_alarm_rate=[1",
     "'[1' is not a value YAML can read (line 1, column 3: expected ',' or ']', but got '<stream end>')"),
    ("false_alarm_rate=" + "[" * 5000, "is not a value YAML can read (nested too deeply)"),
])
def test_a_bad_candidate_is_one_error_line_before_any_fit(text, reason, monkeypatch, capsys):
    import scripts.compare_settings as script

    fitted = []
    monkeypatch.setattr(settings_check, "compare_settings", lambda *args, **kwargs: fitted.append(args))
    assert run_cli(lambda: script.main(["--data-dir", "x", "--try", "heatmap_sigma=2", "--try", text])) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: --try {text}: ") and reason in line and not fitted


def test_the_script_compares_real_fits_on_training_photos_alone(small_screw_dir, tmp_path, capsys):
    """Two real settings on the 12-photo screw subset, one split: 4 photos held out, 4 painted copies."""
    import scripts.compare_settings as script

    out = tmp_path / "settings.json"
    assert script.main(["--data-dir", str(small_screw_dir), "--splits", "1", "--backbone", "efficientnet_lite0",
                        "--image-size", "64", "--preprocess", "off", "--quiet", "--try", "heatmap_sigma=2",
                        "--json", str(out)]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert list(settings) == ["as set", "heatmap_sigma=2"]
    for result in settings.values():
        assert result["photos"] == 4 and 0 <= result["painted_caught"] <= 4 and 0 <= result["auroc"] <= 1
    printed = capsys.readouterr().out
    assert "12 training photos, 1 seeded split, each holding out 4 healthy photos" in printed
    assert "\nheatmap_sigma=2 " in printed


@pytest.fixture
def screw_folder(disc_photos: list[Path], tmp_path: Path) -> Path:
    """The disc photos as a part's training photos, in a folder named after the screw category."""
    folder = tmp_path / "screw"
    (folder / "train" / "good").mkdir(parents=True)
    for photo in disc_photos:
        (folder / "train" / "good" / photo.name).symlink_to(photo)
    return folder


@pytest.mark.parametrize("flags, reason", [
    (["--splits", "0"], "{folder}: splits must be at least 1, got 0"),
    (["--defect-scale", "0"], "{folder}: the defect scale must be above 0, got 0.0"),
    (["--defect-scale", "1e400"], "{folder}: the defect scale must be at most 1000, got inf"),
    (["--defect-scale", "1e9"], "{folder}: the defect scale must be at most 1000, got 1000000000.0"),
    (["--json", "{folder}"], "{folder}: is a folder"),
])
def test_a_setting_of_the_comparison_itself_is_one_error_line_before_any_fit(flags, reason, screw_folder, monkeypatch,
                                                                           capsys):
    import scripts.compare_settings as script

    monkeypatch.setattr(settings_check, "PatchCore", DifferenceModel)
    DifferenceModel.instances = []
    flags = [flag.format(folder=screw_folder) for flag in flags]
    assert run_cli(lambda: script.main(["--data-dir", str(screw_folder), "--quiet", *flags])) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {reason.format(folder=screw_folder)}") and not DifferenceModel.instances


@pytest.mark.parametrize("tried, reason", [
    ("weights_path={folder}/missing.pth", "{folder}/missing.pth"),
    ("device=cuda", "device cuda was asked for but PyTorch sees no CUDA GPU"),
], ids=["weights file", "device"])
def test_a_candidate_whose_network_cannot_be_built_is_refused_before_any_fit(tried, reason, screw_folder, monkeypatch,
                                                                          capsys):
    """A --try naming a weights file that is not there, or a GPU this machine lacks, is one error line before the
    baseline's fits, not after them (minutes on a real part)."""
    import torch

    import scripts.compare_settings as script

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(settings_check, "PatchCore", DifferenceModel)
    DifferenceModel.instances = []
    argv = ["--data-dir", str(screw_folder), "--backbone", "efficientnet_lite0", "--quiet",
            "--try", tried.format(folder=screw_folder)]
    assert run_cli(lambda: script.main(argv)) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: --try {tried.format(folder=screw_folder)}: ") and not DifferenceModel.instances
    assert reason.format(folder=screw_folder) in line


def test_the_script_compares_what_the_user_set_and_says_so(screw_folder, tmp_path, monkeypatch, capsys):
    """The category's defaults, --seed, --defect-scale, --segmentation-method and a --try spelt like its flag reach
    the comparison; the table and the JSON say how many photos each split held out and at what defect scale."""
    import scripts.compare_settings as script

    calls = []

    def compare(photos, candidates, splits, defect_scale, seed, progress, segmentation_method):
        calls.append((candidates, splits, defect_scale, seed, segmentation_method))
        # 2 splits of 3 held-out photos; one part had no room for its defect
        trial = Trial(painted_caught=4, healthy_flagged=1, photos=6, painted=5, aurocs=[0.9], cpu_seconds=1.0)
        return {name: trial.summary() for name in candidates}

    monkeypatch.setattr(settings_check, "compare_settings", compare)
    out = tmp_path / "settings.json"
    assert script.main(["--data-dir", str(screw_folder), "--splits", "2", "--seed", "7", "--defect-scale", "0.8",
                        "--segmentation-method", "grabcut", "--quiet", "--try", "image-size=160",
                        "--json", str(out)]) == 0
    ((candidates, splits, defect_scale, seed, segmentation_method),) = calls
    assert (splits, defect_scale, seed, segmentation_method) == (2, 0.8, 7, "grabcut")
    assert candidates["as set"].preprocess == "on"  # the screw category's default, as train.py gives it
    assert candidates["image-size=160"].image_size == 160
    printed = capsys.readouterr().out
    assert "10 training photos, 2 seeded splits, each holding out 3 healthy photos" in printed
    assert "note: 1 of 6 copies left unpainted: their parts have no room for the defect at this scale" in printed
    assert "\nas set                        4 of 5 (80.0%" in printed
    record = json.loads(out.read_text())
    assert (record["splits"], record["defect_scale"]) == (2, 0.8)
