"""benchmarks/coreset_curve.py: a row per ratio and scheme, measured by real fits on cached features."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.coreset_curve import main


def test_each_ratio_and_scheme_gets_a_row_with_its_accuracy_size_and_coverage(small_screw_dir: Path, tmp_path: Path):
    out = tmp_path / "curve"
    assert main(["--data-dir", str(small_screw_dir), "--preprocess", "false", "--ratios", "0.01", "0.2",
                 "--schemes", "default", "exact", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    # exact greedy is measured up to ratio 0.01 (--exact-max-ratio)
    assert [(row["ratio"], row["scheme"]) for row in rows] == [(0.01, "default"), (0.01, "exact"), (0.2, "default")]
    for row in rows:
        assert 0.0 <= row["image_auroc"] <= 1.0 and 0.5 < row["pixel_auroc"] <= 1.0
        assert abs(row["bank"] - row["ratio"] * 12 * 1024) <= 3 and row["covering_radius"] > 0  # rounded per chunk
    small, exact, large = rows
    assert small["covering_radius"] == exact["covering_radius"]  # 41 picks a chunk: the default pass is exact
    assert large["covering_radius"] < small["covering_radius"]
    table = out.with_suffix(".md").read_text()
    assert "| off | 0.01 | exact |" in table and "| off | 0.2 | default |" in table
