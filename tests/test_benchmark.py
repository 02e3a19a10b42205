"""Smoke tests of scripts/benchmark.py on a few symlinked screw photos (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from config import UserError
from conftest import link_subset
import scripts.benchmark as benchmark
from scripts.benchmark import evaluation_split, fit_stages, format_table, parse_args, spread

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "benchmark.py"
TINY = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--batch-size", "4"]
TINY += ["--coreset-sampling-ratio", "0.05"]
FAST = ["--latency-runs", "2", "--warmup", "1", "--batch-sizes", "1", "2", "--throughput-images", "2"]


def run_benchmark(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_fit_stages_are_the_ones_the_model_clocked_and_add_up_to_the_fit(fitted_model):
    stages = fit_stages(fitted_model.timings)
    exclusive = ("load_preprocess_s", "feature_extraction_s", "coreset_s", "calibration_s")
    assert all(stages[key] > 0 for key in exclusive)
    assert sum(stages[key] for key in exclusive) <= fitted_model.fit_seconds
    assert stages["other_s"] < 0.2 * fitted_model.fit_seconds  # the clocked stages are nearly all of it


def test_a_prediction_clocks_its_stages(fitted_model):
    before = dict(fitted_model.timings)
    image = np.full((96, 80, 3), 128, dtype=np.uint8)
    fitted_model.predict([image, image])
    for key in ("predict_load_preprocess", "predict_features", "predict_knn_map"):
        assert fitted_model.timings[key] > before.get(key, 0.0)


def test_format_table_aligns_the_value_column():
    table = format_table([("short", "1.0 s"), ("a much longer name", "2 MiB"), ("HEADING:", "")])
    lines = table.splitlines()
    bars = {line.index("|") for line in lines if "|" in line}
    assert len(bars) == 1
    assert "HEADING:" in lines


def test_spread_keeps_both_ends():
    assert spread(list(range(10)), 3)[::2] == [0, 9]
    assert spread([1, 2], None) == [1, 2] and spread([1, 2], 5) == [1, 2]


def test_missing_test_split_skips_auroc_with_a_reason(tmp_path, screw_dir):
    folder = link_subset(screw_dir, tmp_path / "parts", n_train=3, n_test_per_kind=0)
    samples, note = evaluation_split(parse_args(["--data-dir", str(folder)]))
    assert samples == [] and "no test split" in note


def test_benchmark_end_to_end_writes_table_json_and_profile(tmp_path, small_screw_dir):
    out = tmp_path / "figures" / "bench.json"
    result = run_benchmark(
        "--data-dir", str(small_screw_dir), *TINY, *FAST, "--limit-train", "6", "--profile", "--quiet",
        "--runtimes", "torch", "onnx", "--cold-start-runs", "1",
        "--json-out", str(out), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    for row in ("feature extraction", "coreset", "calibration", "latency, batch 1", "images/s", "AUROC", "COLD START"):
        assert row in result.stdout
    assert "INFERENCE, torch" in result.stdout and "INFERENCE, onnx" in result.stdout
    assert "cumulative" in result.stdout  # the cProfile listing
    report = json.loads(out.read_text())
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left no temporary behind
    fit, infer, onnx = report["fit"], report["inference"]["torch"], report["inference"]["onnx"]
    assert fit["n_train_images"] == 6 and fit["memory_bank_patches"] > 0 and fit["model_file_mib"] > 0
    assert fit["rss_peak_mib"] > 0 and infer["rss_peak_mib"] > 0
    assert set(infer["throughput"]) == {"1", "2"} and infer["best_batch_size"] in (1, 2)
    assert 0 <= infer["image_auroc"] <= 1 and onnx["image_auroc"] == pytest.approx(infer["image_auroc"], abs=0.01)
    assert set(report["cold_start"]) == {"torch", "onnx"} and report["cold_start"]["onnx"]["cpu_s"] > 0
    assert report["machine"]["cpu_cores"] >= 1 and report["machine"]["torch"]
    assert Path(report["profile"]["stats_file"]).is_file()


def test_missing_folder_is_a_one_line_error(tmp_path):
    result = run_benchmark("--data-dir", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert result.returncode == 2
    assert "no such folder" in result.stderr and "Traceback" not in result.stderr


def parts_folder(tmp_path: Path) -> Path:
    """A data folder of two training photos that no phase reads (the refusals come first)."""
    data = tmp_path / "parts" / "train" / "good"
    data.mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (data / name).write_bytes(b"")
    return tmp_path / "parts"


@pytest.mark.parametrize("extra", [[], ["--profile"]])
def test_an_unwritable_output_is_refused_before_any_phase_runs(tmp_path, monkeypatch, capsys, extra):
    import scripts.benchmark as script
    from config import run_cli

    parts = parts_folder(tmp_path)
    (tmp_path / "out.prof").mkdir()  # with --profile the profile beside the JSON must be writable too
    target = tmp_path / "out.json" if extra else tmp_path  # a folder given as the JSON file
    monkeypatch.setattr(script, "spawn", lambda *args: pytest.fail("no phase may start"))
    monkeypatch.setattr(script, "machine_info", lambda: pytest.fail("no phase may start"))
    argv = ["--data-dir", str(parts), "--json-out", str(target), "--no-auroc", "--quiet", *extra]
    assert run_cli(lambda: script.main(argv)) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err


def test_a_gpu_asked_for_but_absent_is_refused_before_any_phase_in_the_words_of_every_door(
    tmp_path, monkeypatch, capsys
):
    import torch

    import scripts.benchmark as script
    from config import run_cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(script, "spawn", lambda *args: pytest.fail("no phase may start"))
    argv = ["--data-dir", str(parts_folder(tmp_path)), "--json-out", str(tmp_path / "b.json"), "--no-auroc",
            "--quiet", "--device", "cuda"]
    assert run_cli(lambda: script.main(argv)) == 2
    assert capsys.readouterr().err == "error: device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu or auto\n"



def phase_exiting_with(code: int, monkeypatch) -> None:
    monkeypatch.setattr(benchmark.subprocess, "run", lambda *args, **kwargs: subprocess.CompletedProcess(args, code))


def test_a_phase_that_said_what_to_fix_gets_no_second_guess(tmp_path, monkeypatch, capsys):
    """A phase that refused a photo or a setting has said why (its error line, exit 2): a second
    line guessing at missing weights sent users looking in the wrong place."""
    phase_exiting_with(2, monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        benchmark.spawn("fit", ["--data-dir", "x"], tmp_path)
    assert stopped.value.code == 2 and capsys.readouterr().err == ""


def test_a_phase_that_crashed_is_named(tmp_path, monkeypatch):
    phase_exiting_with(1, monkeypatch)
    with pytest.raises(UserError, match=r"^the fit phase failed \(exit code 1\); its error is printed above$"):
        benchmark.spawn("fit", ["--data-dir", "x"], tmp_path)
