"""``nextscale.models`` and ``nextscale.kernels`` import with only torch: no ComfyUI module is loaded.

Each check runs in a fresh, isolated interpreter (``python -I``, cwd outside the repository): the test bed's venv
python when there is one (it has ComfyUI's dependencies installed, but ComfyUI is not on its path), else this one.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from harness.testbed import REPO_ROOT, find_testbed_python

COMFY_MODULES = (
    "comfy",
    "comfy_api",
    "folder_paths",
    "nodes",
    "server",
    "execution",
    "comfy_execution",
    "nextscale.nodes",
)

CHECK = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    root, shadow, all_submodules = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    if shadow:
        sys.path.insert(0, shadow)  # a triton that fails to import
    sys.path.insert(0, root + "/scripts")
    from packbootstrap import register_pack
    register_pack(root)
    import nextscale.models, nextscale.kernels
    packages = [nextscale.models] + ([nextscale.kernels] if all_submodules else [])
    for pkg in packages:
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            importlib.import_module(info.name)
    loaded = sorted(m for m in COMFY if m in sys.modules or any(k.startswith(m + ".") for k in sys.modules))
    assert not loaded, f"ComfyUI modules imported: {loaded}"
    assert "torch" in sys.modules
    print("ok", sorted(k for k in sys.modules if k.startswith("nextscale.")))
    """
).replace("COMFY", repr(COMFY_MODULES))


def run_check(tmp_path, shadow: str = "", all_submodules: bool = True) -> subprocess.CompletedProcess:
    python = find_testbed_python() or sys.executable
    return subprocess.run(
        [python, "-I", "-c", CHECK, str(REPO_ROOT), shadow, "1" if all_submodules else "0"],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )


def test_models_and_kernels_import_without_comfyui(tmp_path):
    result = run_check(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nextscale.models" in result.stdout and "nextscale.kernels" in result.stdout


def test_models_and_kernels_import_without_triton(tmp_path):
    shadow = tmp_path / "shadow"
    (shadow / "triton").mkdir(parents=True)
    (shadow / "triton" / "__init__.py").write_text('raise ImportError("no triton here (NextScale test)")\n')
    # Every models/ module, and the kernels package itself (its Triton modules may be imported lazily).
    result = run_check(tmp_path, shadow=str(shadow), all_submodules=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["comfy", "folder_paths"])
def test_comfyui_is_not_on_the_isolated_path(tmp_path, name):
    """The check above means something only if ComfyUI cannot be imported by accident."""
    python = find_testbed_python() or sys.executable
    result = subprocess.run(
        [python, "-I", "-c", f"import {name}"], check=False, cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode != 0
