from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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

    for index in range(2):
        io.imsave(tmp_path / "parts" / "train" / "good" / f"{index}.png", data.coffee())
    env = {"TORCH_HOME": str(tmp_path / "torch"), "PATH": "/usr/bin:/bin", "no_proxy": "*", "https_proxy": "http://127.0.0.1:9"}
    message = one_line_error(run_train("--data-dir", "parts", "--backbone", "wide_resnet50_2", cwd=tmp_path, env=env))
    assert "--weights" in message and "efficientnet_lite0" in message


def test_unknown_setting_in_yaml_is_refused(tmp_path):
    (tmp_path / "settings.yaml").write_text("coreset_ratio: 0.1\n")
    (tmp_path / "parts" / "train" / "good").mkdir(parents=True)
    message = one_line_error(run_train("--data-dir", "parts", "--config", "settings.yaml", cwd=tmp_path))
    assert "coreset_ratio" in message


def test_fit_writes_the_model_file_named_after_the_folder(tmp_path, small_screw_dir):
    parts = tmp_path / "my_screws" / "train" / "good"
    parts.mkdir(parents=True)
    for image in sorted((small_screw_dir / "train" / "good").iterdir())[:6]:
        (parts / image.name).symlink_to(image.resolve())
    result = run_train(
        "--data-dir", "my_screws", "--backbone", "efficientnet_lite0", "--image-size", "128", "--quiet", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "saved_models" / "patchcore_my_screws.pkl").is_file()
    assert "model saved to saved_models/patchcore_my_screws.pkl" in result.stdout
    assert result.stderr == ""  # --quiet: no progress bars


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
    """Every photo decoded while fitting (memory bank and threshold) comes from train/good, even
    though train.py goes on to evaluate the test split of the same folder."""
    import train
    from models import patchcore

    monkeypatch.chdir(tmp_path)
    fitting, read_while_fitting = [0], []  # depth: preprocess auto fits candidate models inside the fit
    real_read, real_fit = patchcore.read_image, patchcore.PatchCore.fit

    def recording_read(path):
        if fitting[0]:
            read_while_fitting.append(Path(path))
        return real_read(path)

    def flagged_fit(self, *args, **kwargs):
        fitting[0] += 1
        try:
            return real_fit(self, *args, **kwargs)
        finally:
            fitting[0] -= 1

    monkeypatch.setattr(patchcore, "read_image", recording_read)
    monkeypatch.setattr(patchcore.PatchCore, "fit", flagged_fit)
    args = ["--data-dir", str(small_screw_dir), "--backbone", "efficientnet_lite0", "--image-size", "128", "--quiet"]
    assert train.main(args) == 0
    assert list((tmp_path / "outputs").glob("*/metrics.json")), "the test split was evaluated after the fit"
    assert len(read_while_fitting) == 12
    assert all(path.parent == small_screw_dir / "train" / "good" for path in read_while_fitting)
