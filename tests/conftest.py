"""Test configuration.

The repository root is the ComfyUI pack (ComfyUI imports it by folder name). For tests it is
registered as the package ``nextscale`` so that ``nextscale.models`` / ``nextscale.kernels`` import
with only torch installed, exactly as the pack's relative imports resolve inside ComfyUI.
"""

import os
import sys

# Triton's interpreter (CPU) for the kernel tests: the switch is read when triton is first imported, and test modules
# import it at collection (tests/test_triton_kernels.py explains; a CUDA machine may set TRITON_INTERPRET=0).
os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
# The end-to-end harness (tests/harness: real ComfyUI server, websocket, frontend) is imported as ``harness``.
sys.path.insert(0, os.path.join(ROOT, "tests"))
# training/ (the embedded model's trainers and its measuring-stick classifier) is imported as ``training``.
if ROOT not in sys.path:
    sys.path.append(ROOT)

from packbootstrap import register_pack  # noqa: E402

register_pack(ROOT)


def _import_installed_kernels() -> None:
    """Import the installed ``kernels`` distribution (Hugging Face's, a dependency of transformers >= 5) under its
    own name before a test imports transformers: pytest runs from the repository root, whose ``kernels/`` folder
    (the pack's, ``nextscale.kernels``) would otherwise shadow it, and transformers' ``from kernels import ...``
    fails. Inside ComfyUI the pack's folder is not on ``sys.path``, so only the tests need this."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]
    try:
        import kernels  # noqa: F401  (cached in sys.modules under its name)
    except ImportError:
        pass  # a broken install fails where transformers imports it, with its own message
    finally:
        sys.path[:] = saved


_import_installed_kernels()
