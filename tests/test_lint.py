"""The code is held to the ruff rules that pyproject.toml selects (``[tool.ruff.lint]``), with the ruff version the
test bed pins (scripts/setup.sh), so that a lint finding fails the suite like any other regression."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


PINNED = re.search(r'"ruff==([\d.]+)"', _read("pyproject.toml"))[1]  # the test extra's pin


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


def test_the_test_bed_installs_the_pinned_ruff():
    assert f'RUFF_VERSION="{PINNED}"' in _read("scripts/setup.sh"), f"scripts/setup.sh must pin ruff {PINNED}"


def test_the_pinned_ruff_is_installed():
    version = _ruff("--version")
    assert version.returncode == 0 and version.stdout.split() == ["ruff", PINNED], (
        f"ruff {PINNED} is needed in {sys.executable} ({version.stdout.strip() or version.stderr.strip()}): "
        f"run `bash scripts/setup.sh` or `{sys.executable} -m pip install ruff=={PINNED}`")


def test_ruff_finds_nothing():
    found = _ruff("check", "--no-cache", "--output-format", "concise", ".")
    assert found.returncode == 0, f"ruff check (fix with `python -m ruff check --fix .`):\n{found.stdout}{found.stderr}"
