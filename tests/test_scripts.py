"""Every command-line script answers --help from the project root, as the README runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
