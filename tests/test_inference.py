from __future__ import annotations

import json
from pathlib import Path

import pytest

import inference
from preprocessing.io import load_test_split


@pytest.fixture(scope="module")
def model_file(fitted_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "patchcore_small.pkl"
    fitted_model.save(path)
    return path


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = inference.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_single_image_json_has_every_field(model_file, small_screw_dir, capsys):
    image = load_test_split(small_screw_dir)[0].path
    code, out, _ = run(["--model", str(model_file), "--image", str(image), "--json"], capsys)
    assert code == 0
    (record,) = json.loads(out)["results"]
    assert set(record) >= {"path", "score", "threshold", "is_anomalous", "sigma", "confidence", "warnings"}
    assert record["path"] == str(image)
    assert record["is_anomalous"] == (record["score"] > record["threshold"])


def test_unreadable_single_image_exits_non_zero(model_file, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"nope")
    code, out, err = run(["--model", str(model_file), "--image", str(broken), "--json"], capsys)
    assert code == 1
    assert json.loads(out)["results"] == [{"path": str(broken), "error": f"{broken}: not a readable image (corrupt or unsupported format)"}]
    assert f"error: {broken}" in err


def test_folder_with_a_bad_file_scores_the_rest(model_file, small_screw_dir, tmp_path, capsys):
    folder = tmp_path / "batch"
    (folder / "sub").mkdir(parents=True)
    samples = load_test_split(small_screw_dir)[:3]
    for index, sample in enumerate(samples):
        (folder / "sub" / f"{index}.png").symlink_to(sample.path.resolve())
    (folder / "corrupt.png").write_bytes(b"\x89PNG broken")
    code, out, err = run(["--model", str(model_file), "--dir", str(folder)], capsys)
    assert code == 3
    assert "corrupt.png" in err
    assert out.count("ANOMALOUS") + out.count(" ok ") == 3


def test_visualize_writes_one_overlay_per_image(model_file, small_screw_dir, tmp_path, capsys):
    image = load_test_split(small_screw_dir)[-1].path
    out_dir = tmp_path / "out"
    code, out, _ = run(
        ["--model", str(model_file), "--image", str(image), "--json", "--visualize", "--output-dir", str(out_dir)], capsys
    )
    assert code == 0
    heatmap = Path(json.loads(out)["results"][0]["heatmap"])
    assert heatmap.is_file() and heatmap.parent == out_dir / "heatmaps"


def test_missing_model_file_is_a_one_line_error(tmp_path):
    from config import run_cli

    assert run_cli(lambda: inference.main(["--model", str(tmp_path / "none.pkl"), "--image", "x.png"])) == 2


def test_evaluating_a_saved_model_repeats_the_fit_time_numbers(fitted_model, model_file, small_screw_dir, tmp_path, capsys):
    from evaluation.report import evaluate

    at_fit = evaluate(fitted_model, small_screw_dir, tmp_path / "fit", quiet=True)
    code, out, _ = run(
        ["--model", str(model_file), "--dir", str(small_screw_dir), "--evaluate", "--json", "--quiet",
         "--output-dir", str(tmp_path / "saved")], capsys
    )
    assert code == 0
    from_file = json.loads(out)
    for key in ("image_auroc", "image_ap", "pixel_auroc", "aupro", "per_defect_auroc", "threshold", "n_test"):
        assert from_file[key] == at_fit[key], key
    assert (tmp_path / "saved" / "report.html").is_file()
