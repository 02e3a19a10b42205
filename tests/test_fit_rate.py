"""benchmarks/fit_rate.py: photos/s per block of a fit's memory-bank pass, from the batches as they are handed on."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import UserError
from benchmarks.fit_rate import block_rates, main, runs_summary


def test_block_rates_follow_a_fit_that_slows_down_because_it_does_more_work():
    # batches of 2 photos: one a second on 1.5 CPU seconds for the first 10 photos, then one every
    # 2 seconds on 4 CPU seconds
    stamps, clock, cpu = [], 0.0, 0.0
    for batch in range(10):
        clock += 1.0 if batch < 5 else 2.0
        cpu += 1.5 if batch < 5 else 4.0
        stamps.append((clock, cpu, 2))
    rates = block_rates(stamps, 10)
    assert [(rate.first, rate.last) for rate in rates] == [(0, 9), (10, 19)]
    assert rates[0].photos_per_second == pytest.approx(2.0)  # from the first batch's stamp on: 8 photos in 4 s
    assert rates[1].photos_per_second == pytest.approx(1.0)  # 10 photos in 10 s
    assert rates[0].cpu_ms_per_photo == pytest.approx(750.0) and rates[0].cpu_use == pytest.approx(1.5)
    assert rates[1].cpu_ms_per_photo == pytest.approx(2000.0) and rates[1].cpu_use == pytest.approx(2.0)


def test_real_fits_print_every_block_each_run_s_ratio_and_their_median(small_screw_dir: Path, capsys):
    assert main(["--data-dir", str(small_screw_dir), "--block", "4", "--backbone", "efficientnet_lite0",
                 "--image-size", "128", "--batch-size", "2", "--quiet", "--runs", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    blocks = [line for line in lines if line.startswith("photos ")]
    assert len(blocks) == 6 and all(float(line.split()[2]) > 0 and float(line.split()[4]) > 0 for line in blocks)
    per_run = [line for line in lines if line.startswith("last block / first block: ")]
    assert len(per_run) == 2 and all("(CPU per photo, last / first: " in line for line in per_run)
    ratios = [float(line.split()[5]) for line in per_run]
    for run, ratio in enumerate(ratios):  # each run's last block's photos/s over its first block's
        first, last = (float(blocks[3 * run + block].split()[2]) for block in (0, 2))
        assert ratio == pytest.approx(last / first, abs=0.006)
    assert f"last block / first block over 2 runs: {ratios[0]:.2f}, {ratios[1]:.2f} (median " in "\n".join(lines)
    assert any(line.startswith("bank ") and "peak resident memory over the 2 runs" in line for line in lines)


def test_the_runs_summary_gives_the_median_ratio_that_one_outlying_run_cannot_move():
    summary = runs_summary([0.89, 0.60, 0.83, 0.74, 0.80], [1.08, 1.69, 1.17, 1.29, 1.24])
    assert summary == ("last block / first block over 5 runs: 0.89, 0.60, 0.83, 0.74, 0.80 (median 0.80; "
                       "CPU per photo, last / first: median 1.24)")


def test_fewer_than_one_run_is_refused(small_screw_dir: Path):
    with pytest.raises(SystemExit) as refused:
        main(["--data-dir", str(small_screw_dir), "--runs", "0"])
    assert refused.value.code == 2


def test_too_few_photos_for_two_blocks_is_refused_before_fitting(small_screw_dir: Path):
    with pytest.raises(UserError, match="12 training photos; at least two blocks of 300"):
        main(["--data-dir", str(small_screw_dir), "--block", "300", "--backbone", "efficientnet_lite0"])
