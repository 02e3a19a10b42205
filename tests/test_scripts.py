"""Every command-line script answers --help from the project root, as the README runs them."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from config import run_cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(  # every file a user can run: it has a __main__ block
    str(path.relative_to(ROOT))
    for path in [*ROOT.glob("*.py"), *(ROOT / "scripts").glob("*.py")]
    if '__name__ == "__main__"' in path.read_text()
)


def test_the_scripts_are_found():
    assert {"train.py", "inference.py", "verify_setup.py", "scripts/synthetic_fasteners.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_works_from_the_project_root(script):
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:") and "Traceback" not in result.stderr


@pytest.mark.parametrize("pair, reason", [
    ("foo=1", "unknown config key(s): foo"),
    ("image_size", "'image_size': expected SETTING=VALUE"),
    ("image_size=[1", "'[1' is not a value YAML can read"),
])
def test_the_ablation_refuses_a_bad_extra_setting_in_one_line_before_any_fit(pair, reason, monkeypatch, capsys):
    import scripts.ablate_preprocessing as script

    monkeypatch.setattr(sys, "argv", ["ablate_preprocessing.py", "--data-dir", "x", "--set", pair])
    monkeypatch.setattr(script, "train_images", lambda *args: pytest.fail("no fit may start"))
    with pytest.raises(SystemExit) as stopped:
        script.main()
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"ablate_preprocessing.py: error: --set: {reason}")


@pytest.mark.parametrize("flag", ["--throughput-seconds", "--soak-seconds"])
@pytest.mark.parametrize("value", ["nan", "inf", "1e400"])
def test_the_service_benchmark_refuses_a_duration_that_is_not_a_finite_number(flag, value, capsys):
    from scripts.benchmark_service import parse_args

    with pytest.raises(SystemExit) as stopped:  # inf would never end, nan ended at once and crashed on no figures
        parse_args(["--model", "m.pkl", flag, value])
    assert stopped.value.code == 2
    assert "the durations positive" in capsys.readouterr().err


def test_the_service_benchmark_refuses_an_unwritable_output_before_starting_the_service(tmp_path, monkeypatch, capsys):
    import scripts.benchmark_service as script

    (tmp_path / "model.pkl").write_bytes(b"")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(b"")
    monkeypatch.setattr(script, "start_service", lambda *args: pytest.fail("no service may start"))
    argv = ["--model", str(tmp_path / "model.pkl"), "--photos", str(tmp_path / "photos"), "--json-out", str(tmp_path)]
    assert run_cli(lambda: script.main(argv)) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: is a folder; give a file name"


def test_the_service_benchmark_says_so_when_no_photo_is_scored(tmp_path, monkeypatch, capsys):
    import httpx

    import scripts.benchmark_service as script

    class Service:
        terminated = False

        def terminate(self):
            Service.terminated = True

        def wait(self, timeout):
            return 0

    (tmp_path / "model.pkl").write_bytes(b"")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "empty.png").write_bytes(b"")  # the service refuses every one
    monkeypatch.setattr(script, "start_service", lambda *args: (Service(), "http://127.0.0.1:9"))
    monkeypatch.setattr(httpx, "get", lambda *args, **kwargs: httpx.Response(200, json={"runtime": "torch"}))
    monkeypatch.setattr(script, "post", lambda *args: (0.01, 422))
    argv = ["--model", str(tmp_path / "model.pkl"), "--photos", str(tmp_path / "photos"), "--sequential", "2",
            "--json-out", str(tmp_path / "figures.json")]
    assert run_cli(lambda: script.main(argv)) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'photos'}: none of the 2 requests one at a time "
                                               "was scored (HTTP status 422); are the photos readable?")
    assert Service.terminated and not (tmp_path / "figures.json").exists()


def run_script(script: str, *args: str) -> int:
    """Run a script as its command line does (its ``__main__`` block), in this process: fast, torch already imported."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [script, *args])
        with pytest.raises(SystemExit) as stopped:
            runpy.run_path(str(ROOT / script), run_name="__main__")
    return stopped.value.code


def test_the_ablation_names_a_missing_data_folder_in_one_line(tmp_path, capsys):
    assert run_script("scripts/ablate_preprocessing.py", "--data-dir", str(tmp_path / "nowhere")) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nowhere'}: no such folder"


def test_the_ablation_refuses_an_unwritable_output_folder_before_any_fit(tmp_path, monkeypatch, capsys):
    import scripts.ablate_preprocessing as script

    (tmp_path / "train" / "good").mkdir(parents=True)
    (tmp_path / "train" / "good" / "a.png").write_bytes(b"")
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(script, "evaluate", lambda *args: pytest.fail("no fit may start"))
    argv = ["--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "file"), "--variants", "pipeline off"]
    assert run_cli(lambda: script.main(argv)) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'file' / 'ablation_'}")


def test_the_soak_test_refuses_an_out_folder_it_cannot_make_new_in_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    for out, reason in ((tmp_path, "already exists; --out must be a new folder"), (tmp_path / "file" / "soak", "Not a directory")):
        assert run_script("scripts/soak_watch.py", "--out", str(out)) == 2
        assert capsys.readouterr().err.strip() == f"error: {out}: {reason}"


@pytest.mark.parametrize("flags", [
    ["--photos", "0"], ["--photos", "-3"], ["--reused", "nan"], ["--slow", "-0.1"], ["--unreadable", "1.5"],
    ["--slow", "0.6", "--unreadable", "0.6"], ["--timeout", "nan"], ["--timeout", "0"], ["--timeout", "1e400"],
])
def test_the_soak_test_refuses_bad_numbers_before_any_work(flags, tmp_path, capsys):
    """--photos 0 crashed after the watcher started; NaN shares and timeouts were taken without a word."""
    with pytest.raises(SystemExit) as stopped:
        from scripts.soak_watch import parse_args

        parse_args(["--out", str(tmp_path / "soak"), *flags])
    assert stopped.value.code == 2 and "error: --" in capsys.readouterr().err
    assert not (tmp_path / "soak").exists()


def test_the_soak_test_passes_on_the_watchers_error_and_exit_status(tmp_path, monkeypatch, capsys):
    import scripts.soak_watch as script

    class Watcher:  # inference.py --watch refusing the model file, as it does in one line with exit 2
        returncode = 2

        def __init__(self, command, stdout, stderr):
            stdout.write("error: bad.pkl: not a model file or truncated\n")
            stdout.flush()

        def poll(self):
            return self.returncode

    monkeypatch.setattr(script.subprocess, "Popen", Watcher)
    assert script.main(["--out", str(tmp_path / "soak"), "--model", "bad.pkl", "--photos", "1"]) == 2
    assert capsys.readouterr().err == "error: bad.pkl: not a model file or truncated\n"


@pytest.mark.parametrize("flags, reason", [
    (["--coreset-sampling-ratio", "nan"], "invalid settings: coreset_sampling_ratio must be a finite number"),
    (["--backbone", "nope"], "invalid settings: backbone must be one of"),
])
def test_the_ablation_blames_its_own_flag_not_set(flags, reason, monkeypatch, capsys):
    import scripts.ablate_preprocessing as script

    monkeypatch.setattr(script, "train_images", lambda *args: pytest.fail("no fit may start"))
    with pytest.raises(SystemExit) as stopped:
        script.main(["--data-dir", "x", *flags])
    assert stopped.value.code == 2
    assert f"error: {reason}" in capsys.readouterr().err.strip().splitlines()[-1]  # was "error: --set: ..."


def small_set(folder: Path) -> Path:
    """A readable MVTec-layout set of two training photos and one test photo per kind (healthy and four defects)."""
    from scripts.synthetic_fasteners import SyntheticSettings, generate

    generate(SyntheticSettings(n_train=2, n_test_per_kind=1, size=64), folder)
    return folder


def run_ablation(data: Path, out: Path, *flags: str) -> int:
    import scripts.ablate_preprocessing as script

    return run_cli(lambda: script.main(["--data-dir", str(data), "--output-dir", str(out), *flags]))


def no_fit(*args):
    pytest.fail("no fit may start")


@pytest.mark.parametrize("kept, reason", [
    ([], "{data}: no test split (expected photos in {test}/good/ and {test}/<defect kind>/)"),
    (["good"], "{test}: the 1 test photos evaluated are all healthy; AUROC needs defective ones in a folder per "
               "defect kind too"),
])
def test_the_ablation_refuses_a_test_split_without_healthy_and_defective_photos_before_any_fit(
    kept, reason, tmp_path, monkeypatch, capsys
):
    """It fitted first and then failed without naming a folder (no test/), or wrote a table of nan (good/ alone)."""
    import shutil

    import scripts.ablate_preprocessing as script

    data = small_set(tmp_path / "set")
    for kind in (data / "test").iterdir():
        if kind.name not in kept:
            shutil.rmtree(kind)
    if not kept:
        (data / "test").rmdir()
    monkeypatch.setattr(script, "evaluate", no_fit)
    assert run_ablation(data, tmp_path / "out", "--variants", "pipeline off") == 2
    assert capsys.readouterr().err.strip() == "error: " + reason.format(data=data, test=data / "test")
    assert not (tmp_path / "out" / "ablation_set.json").exists()


def test_the_ablation_names_each_unreadable_test_photo_before_any_fit(tmp_path, monkeypatch, capsys):
    import scripts.ablate_preprocessing as script

    data = small_set(tmp_path / "set")
    (data / "test" / "rust" / "000.png").write_bytes(b"not a photo")
    monkeypatch.setattr(script, "evaluate", no_fit)
    assert run_ablation(data, tmp_path / "out", "--variants", "pipeline off") == 2
    assert capsys.readouterr().err.strip() == (
        "error: 1 of 5 test photos cannot be used; remove or replace them: "
        f"{data / 'test' / 'rust' / '000.png'}: not a readable image (corrupt or unsupported format)"
    )


def test_an_interrupted_ablation_keeps_its_finished_rows_and_update_runs_the_rest(tmp_path, monkeypatch, capsys):
    import json

    import scripts.ablate_preprocessing as script

    data, out = small_set(tmp_path / "set"), tmp_path / "out"
    figures = {"image_auroc": 0.9, "f1_at_threshold": 0.8, "pixel_auroc": None, "seconds": 5.0}

    def first_row_then_ctrl_c(config, *args):
        if config.preprocess == "on":
            raise KeyboardInterrupt
        return figures

    monkeypatch.setattr(script, "evaluate", first_row_then_ctrl_c)
    assert run_ablation(data, out, "--variants", "pipeline off", "all steps on") == 130
    assert capsys.readouterr().err.strip() == "interrupted"

    def strict(constant):
        pytest.fail(f"{constant} is not JSON")

    record = json.loads((out / "ablation_set.json").read_text(encoding="utf-8"), parse_constant=strict)
    assert record["results"] == {"pipeline off": figures}
    assert "| pipeline off | 0.900 | 0.800 | n/a | 5 |" in (out / "ablation_set.md").read_text(encoding="utf-8")

    monkeypatch.setattr(script, "evaluate", lambda *args: figures)
    assert run_ablation(data, out, "--update", "--variants", "all steps on") == 0
    table = (out / "ablation_set.md").read_text(encoding="utf-8")
    assert "| pipeline off |" in table and "| all steps on |" in table


@pytest.mark.parametrize("content, reason", [
    (b"[1, 2]", "not a record of an earlier ablation (expected settings and results of each row"),
    (b'{"settings": "x", "results": {"pipeline off": 1}}', "not a record of an earlier ablation (expected"),
    (b"\xff\xfe", "not a record of an earlier ablation ('utf-8' codec can't decode byte 0xff"),
    (b"{", "not a record of an earlier ablation (Expecting property name"),
])
def test_the_ablation_refuses_an_update_record_it_cannot_read_in_one_line(
    content, reason, tmp_path, monkeypatch, capsys
):
    import scripts.ablate_preprocessing as script

    data, out = small_set(tmp_path / "set"), tmp_path / "out"
    out.mkdir()
    (out / "ablation_set.json").write_bytes(content)
    monkeypatch.setattr(script, "evaluate", no_fit)
    assert run_ablation(data, out, "--update", "--variants", "pipeline off") == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {out / 'ablation_set.json'}: {reason}") and error.count("\n") == 1
