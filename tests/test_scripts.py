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
