"""Locate the ComfyUI test bed: the user's own ComfyUI, or ``.testbed/`` made by ``scripts/setup.sh``."""

from __future__ import annotations

import os
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTBED_DIR = REPO_ROOT / ".testbed"
# Folder name of the pack inside custom_nodes (= its Comfy Registry id). ComfyUI imports the pack by this name and
# serves its files under /extensions/<PACK_NAME>/.
PACK_NAME = "comfyui-nextscale"
CHROMIUM = "/usr/bin/chromium"


@dataclass(frozen=True)
class Testbed:
    comfy_dir: Path  # the ComfyUI folder (has main.py)
    python: Path  # the interpreter that runs main.py
    origin: str  # "NEXTSCALE_COMFYUI_DIR" or ".testbed"


def find_testbed() -> tuple[Testbed | None, str]:
    """``(testbed, "")`` when one is usable, else ``(None, why)``."""
    comfy = os.environ.get("NEXTSCALE_COMFYUI_DIR")
    python = os.environ.get("NEXTSCALE_PYTHON")
    if comfy or python:
        if not (comfy and python):
            return None, "set both NEXTSCALE_COMFYUI_DIR and NEXTSCALE_PYTHON"
        tb = Testbed(Path(comfy).resolve(), Path(shutil.which(python) or python), "NEXTSCALE_COMFYUI_DIR")
    else:
        tb = Testbed(TESTBED_DIR / "comfyui", TESTBED_DIR / "venv" / "bin" / "python", ".testbed")
    if not (tb.comfy_dir / "main.py").is_file():
        return None, f"no ComfyUI at {tb.comfy_dir} (run: bash scripts/setup.sh)"
    if not os.access(tb.python, os.X_OK):
        return None, f"no python at {tb.python} (run: bash scripts/setup.sh)"
    return tb, ""


def e2e_required() -> bool:
    """``scripts/test.sh`` sets NEXTSCALE_REQUIRE_E2E=1: a missing test bed then fails instead of skipping."""
    return os.environ.get("NEXTSCALE_REQUIRE_E2E", "") not in ("", "0")


def find_testbed_python() -> str | None:
    tb, _ = find_testbed()
    return str(tb.python) if tb else None


WORKFLOWS_DIR = REPO_ROOT / "workflows"


def example_workflows(runnable_only: bool = True) -> list[Path]:
    """The pack's example workflows (UI format): ``workflows/*.json``. ``runnable_only`` leaves out those that need
    files a user brings (``extra.nextscale.needs_user_files``, e.g. a Stable Diffusion checkpoint)."""
    paths = sorted(WORKFLOWS_DIR.glob("*.json"))
    if runnable_only:
        paths = [p for p in paths if not load_json(p).get("extra", {}).get("nextscale", {}).get("needs_user_files")]
    return paths


def load_json(path: Path) -> dict:
    import json

    return json.loads(Path(path).read_text())


def boot_comfyui(comfy_dir: str, root: str) -> None:
    """Set up ComfyUI's modules in this interpreter as ``main.py --cpu`` would (its argument parser on, so
    ``comfy.cli_args.args`` holds the defaults plus ``--cpu``) and register the pack at ``root`` as ``nextscale``.
    ``comfy_dir``, ``scripts/`` and ``tests/`` go first on ``sys.path``, in that order."""
    import sys

    sys.argv = [sys.argv[0], "--cpu"]
    sys.path[:0] = [comfy_dir, os.path.join(root, "scripts"), os.path.join(root, "tests")]
    import comfy.options

    comfy.options.enable_args_parsing()
    from packbootstrap import register_pack

    register_pack(root)


# What every script run by :func:`run_in_comfyui_python` starts with: ``comfy_dir``, ``root`` and ``script_args`` (the
# script's own arguments) from the command line, then :func:`boot_comfyui`.
COMFYUI_BOOT = """\
import sys
comfy_dir, root, *script_args = sys.argv[1:]
sys.path.insert(0, root + "/tests")
from harness.testbed import boot_comfyui
boot_comfyui(comfy_dir, root)
"""


def run_in_comfyui_python(script: str, *args: str, cwd: Path, timeout: float = 300.0):
    """Run ``script`` (node code that needs ComfyUI's modules, called directly) after :data:`COMFYUI_BOOT` as
    ``python -c ... comfy_dir repo_root *args`` with the test bed's interpreter; the script sees ``comfy_dir``,
    ``root`` and ``args`` as ``script_args``. Returns the ``CompletedProcess``, output captured. Without a test bed
    the calling test is skipped, or fails when NEXTSCALE_REQUIRE_E2E is set (``scripts/test.sh``, CI)."""
    import subprocess

    import pytest

    tb, why = find_testbed()
    if tb is None:
        if e2e_required():
            pytest.fail(f"{why} (NEXTSCALE_REQUIRE_E2E is set)", pytrace=False)
        pytest.skip(why)
    return subprocess.run(
        [str(tb.python), "-c", COMFYUI_BOOT + textwrap.dedent(script), str(tb.comfy_dir), str(REPO_ROOT), *args],
        check=False, cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
