"""The README and docs/ stay true where a machine can check it: every command they show names a script
that exists with flags it has and data under data/, the model files the README scores are the ones it
fits, its Python example runs, the package installs, and the text is short and about the present."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from evaluation.mvtec import load_test_split
from test_layers import project_modules

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = {path.name: path.read_text(encoding="utf-8") for path in sorted((ROOT / "docs").glob("*.md"))}
COMMAND = re.compile(r"(?:\.venv/bin/)?python ((?:scripts/|benchmarks/)?\w+\.py)([^`\n#]*)")
# Phrases that narrate how the project came to be; git log keeps that, the documents describe what is.
HISTORY = re.compile(r"\bsessions?\b|\bpreviously\b|\bprevious (?:version|run|code)|\bearlier (?:version|measurement)|"
                     r"\bno longer\b|\b(?:it|this|they|which) used to\b|\bfirst version\b|\btried\b|\bround of work|\bbefore the change", re.I)


def quoted_commands(text: str = README) -> list[tuple[str, str]]:
    """(script, arguments) of every `python X.py ...` a document shows, in code blocks or inline."""
    return [(script, arguments.strip()) for script, arguments in COMMAND.findall(text)]


@cache
def help_text(script: str) -> str:
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{script} --help: {result.stderr[-500:]}"
    return result.stdout


@pytest.mark.parametrize("name", ["README.md", *DOCS])
def test_every_command_names_a_script_and_flags_that_exist(name):
    text = README if name == "README.md" else DOCS[name]
    commands = quoted_commands(text)
    if name == "README.md":
        assert len(commands) > 15
    for script, arguments in commands:
        assert (ROOT / script).is_file(), f"{name}: {script} does not exist"
        for flag in re.findall(r"(?<!\S)--[a-z][a-z0-9-]*", arguments):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text(script)), f"{script} has no {flag}"


@pytest.mark.parametrize("name", ["README.md", *DOCS])
def test_documents_use_the_users_data_folder_and_the_project_venv(name):
    """A newcomer has data/ and .venv, not the developers' ../shared: every command runs as written."""
    text = README if name == "README.md" else DOCS[name]
    assert "../shared" not in text and "/tmp/" not in text
    bare = [line for line in text.splitlines() if re.match(r"\s*python \S+\.py", line)]
    assert not bare, f"{name}: bare `python` fails outside .venv (use .venv/bin/python): {bare}"


@pytest.mark.parametrize("name", ["README.md", *DOCS])
def test_documents_describe_the_present_not_their_history(name):
    text = README if name == "README.md" else DOCS[name]
    found = [line for line in text.splitlines() if HISTORY.search(line)]
    assert not found, f"{name} narrates history: {found}"


def test_the_readme_is_short_and_links_every_reference_file():
    assert len(README.splitlines()) <= 300
    assert DOCS and all(f"docs/{name}" in README for name in DOCS)


def test_usage_scores_the_model_files_it_fits():
    """A reader who follows the Usage section finds every model file it scores where train.py put it."""
    fitted = set()
    for script, arguments in quoted_commands():
        options = dict(re.findall(r"--([a-z-]+) (\S+)", arguments))
        if script != "train.py" or "recalibrate" in arguments:
            continue
        if "output" in options:
            fitted.add(options["output"])
        elif "category" in options:
            fitted.add(f"saved_models/patchcore_mvtec_{options['category']}.pkl")
        elif "data-dir" in options:
            fitted.add(f"saved_models/patchcore_{Path(options['data-dir']).name}.pkl")
    scored = {model for _, arguments in quoted_commands() for model in re.findall(r"--model (\S+)", arguments)}
    assert scored and scored <= fitted, f"scored but never fitted: {sorted(scored - fitted)}"


def python_api_example() -> str:
    section = README.split("\n## Python\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_python_api_example_runs(fitted_model, small_screw_dir, tmp_path):
    """The README's example, run as written from a folder of the user's own (the toolkit on the path,
    as `pip install -e .` puts it), with its model file and photos in place."""
    example = python_api_example()
    model_path = re.search(r'PatchCore\.load\("([^"]+)"\)', example).group(1)
    fitted_model.save(tmp_path / model_path)
    samples = {s.is_defective: s.path for s in load_test_split(small_screw_dir)}
    for photo in re.findall(r'"([\w/]+\.png)"', example):
        (tmp_path / photo).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / photo).symlink_to(samples[True].resolve())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"(ANOMALOUS|ok)", result.stdout), result.stdout


def test_the_package_installs_and_imports_from_anywhere(tmp_path):
    """`pip install .` of pyproject.toml carries every module (built from a copy: nothing lands in the tree)."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "data", "outputs", "saved_models",
                                                                "__pycache__", ".pytest_cache", "tests"))
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target",
         str(target), str(source)], capture_output=True, text=True, timeout=600)
    if install.returncode != 0 and "No module named" in install.stderr and "setuptools" in install.stderr:
        pytest.skip("setuptools is not installed in this environment")
    assert install.returncode == 0, install.stderr[-2000:]
    shipped = sorted(name for name in project_modules() if not name.startswith("benchmarks"))
    code = f"import importlib, models.patchcore\nfor name in {shipped!r}: importlib.import_module(name)\n" \
           "print(models.patchcore.__file__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(target)}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(target / "models" / "patchcore.py")
