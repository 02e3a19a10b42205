"""Smoke tests of scripts/benchmark.py on a few symlinked screw photos (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import link_subset
from scripts.benchmark import (
    CALIBRATION,
    FEATURES,
    LOAD,
    PREDICT,
    StageTimer,
    ThreadSums,
    evaluation_split,
    fit_stages,
    format_table,
    instrument,
    parse_args,
    spread,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "benchmark.py"
TINY = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--batch-size", "4"]
TINY += ["--coreset-sampling-ratio", "0.05"]
FAST = ["--latency-runs", "2", "--warmup", "1", "--batch-sizes", "1", "2", "--throughput-images", "2"]


def run_benchmark(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_stage_timer_is_exclusive_and_merges_reentry():
    timer = StageTimer()
    with timer.stage("outer"):
        time.sleep(0.02)
        with timer.stage("inner"):
            time.sleep(0.02)
            with timer.stage("inner"):  # re-entry: one stage, not nested
                pass
    assert set(timer.totals) == {("outer",), ("outer", "inner")}
    assert timer.counts[("outer", "inner")] == 1
    assert timer.totals[("outer",)] < 0.035  # the inner sleep is not counted twice
    assert timer.leaf("inner", under="outer") == timer.totals[("outer", "inner")]
    assert timer.leaf("inner", exclude="outer") == 0


def test_fit_stages_add_up_to_the_total():
    timer = StageTimer()
    timer.totals.update({(LOAD,): 1.0, (FEATURES,): 2.0, (CALIBRATION,): 0.5, (CALIBRATION, FEATURES): 0.25})
    stages = fit_stages(timer, total=4.0)
    assert stages["load_preprocess_s"] == 1.0 and stages["feature_extraction_s"] == 2.0
    assert stages["calibration_s"] == 0.75 and stages["calibration_features_s"] == 0.25
    exclusive = ("load_preprocess_s", "feature_extraction_s", "coreset_s", "index_build_s", "calibration_s", "other_s")
    assert sum(stages[key] for key in exclusive) == pytest.approx(4.0)


def test_format_table_aligns_the_value_column():
    table = format_table([("short", "1.0 s"), ("a much longer name", "2 MiB"), ("HEADING:", "")])
    lines = table.splitlines()
    bars = {line.index("|") for line in lines if "|" in line}
    assert len(bars) == 1
    assert "HEADING:" in lines


def test_spread_keeps_both_ends():
    assert spread(list(range(10)), 3)[::2] == [0, 9]
    assert spread([1, 2], None) == [1, 2] and spread([1, 2], 5) == [1, 2]


def test_instrumentation_times_a_prediction_and_restores_the_model(fitted_model):
    from models.feature_extractor import FeatureExtractor
    from models.patchcore import PatchCore

    original_call, original_predict = FeatureExtractor.__call__, PatchCore.__dict__["predict"]
    timer, threads = StageTimer(), ThreadSums()
    image = np.full((96, 80, 3), 128, dtype=np.uint8)
    with instrument(timer, threads, PREDICT):
        fitted_model.predict([image, image])
    assert timer.leaf(FEATURES, under=PREDICT) > 0 and timer.leaf(LOAD, under=PREDICT) > 0
    assert timer.totals[(PREDICT,)] > 0
    assert threads.calls["preprocess"] == 2 and threads.calls.get("decode", 0) == 0  # arrays: nothing to decode
    assert FeatureExtractor.__call__ is original_call and PatchCore.__dict__["predict"] is original_predict


def test_missing_test_split_skips_auroc_with_a_reason(tmp_path, screw_dir):
    folder = link_subset(screw_dir, tmp_path / "parts", n_train=3, n_test_per_kind=0)
    samples, note = evaluation_split(parse_args(["--data-dir", str(folder)]))
    assert samples == [] and "no test split" in note


def test_benchmark_end_to_end_writes_table_json_and_profile(tmp_path, small_screw_dir):
    out = tmp_path / "figures" / "bench.json"
    result = run_benchmark(
        "--data-dir", str(small_screw_dir), *TINY, *FAST, "--limit-train", "6", "--profile", "--quiet",
        "--json-out", str(out), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    for row in ("feature extraction", "coreset", "index build", "calibration", "latency, batch 1", "images/s", "AUROC"):
        assert row in result.stdout
    assert "cumulative" in result.stdout  # the cProfile listing
    report = json.loads(out.read_text())
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left no temporary behind
    fit, infer = report["fit"], report["inference"]
    assert fit["n_train_images"] == 6 and fit["memory_bank_patches"] > 0 and fit["model_file_mib"] > 0
    assert fit["rss_peak_mib"] > 0 and infer["rss_peak_mib"] > 0
    assert set(infer["throughput"]) == {"1", "2"} and infer["best_batch_size"] in (1, 2)
    assert 0 <= infer["image_auroc"] <= 1
    assert report["machine"]["cpu_cores"] >= 1 and report["machine"]["torch"]
    assert Path(report["profile"]["stats_file"]).is_file()


def test_missing_folder_is_a_one_line_error(tmp_path):
    result = run_benchmark("--data-dir", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert result.returncode == 2
    assert "no such folder" in result.stderr and "Traceback" not in result.stderr
