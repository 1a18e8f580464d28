"""The code is held to the ruff rules that pyproject.toml selects (``[tool.ruff.lint]``), with the ruff version the
test bed pins (scripts/setup.sh), so that a lint finding fails the suite like any other regression."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PINNED = "0.17.6"  # as scripts/setup.sh and pyproject.toml's test extra


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


def test_the_pinned_ruff_is_installed():
    version = _ruff("--version")
    assert version.returncode == 0 and version.stdout.split() == ["ruff", PINNED], (
        f"ruff {PINNED} is needed in {sys.executable} ({version.stdout.strip() or version.stderr.strip()}): "
        f"run `bash scripts/setup.sh` or `{sys.executable} -m pip install ruff=={PINNED}`")


def test_ruff_finds_nothing():
    found = _ruff("check", "--no-cache", "--output-format", "concise", ".")
    assert found.returncode == 0, f"ruff check (fix with `python -m ruff check --fix .`):\n{found.stdout}{found.stderr}"
