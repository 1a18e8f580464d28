"""Test configuration.

The repository root is the ComfyUI pack (ComfyUI imports it by folder name). For tests it is
registered as the package ``nextscale`` so that ``nextscale.models`` / ``nextscale.kernels`` import
with only torch installed, exactly as the pack's relative imports resolve inside ComfyUI.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
# The end-to-end harness (tests/harness: real ComfyUI server, websocket, frontend) is imported as ``harness``.
sys.path.insert(0, os.path.join(ROOT, "tests"))
# training/ (the embedded model's trainers and its measuring-stick classifier) is imported as ``training``.
if ROOT not in sys.path:
    sys.path.append(ROOT)

from packbootstrap import register_pack  # noqa: E402

register_pack(ROOT)
