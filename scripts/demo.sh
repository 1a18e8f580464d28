#!/usr/bin/env bash
# Demo: set up the test bed, start a real ComfyUI (CPU, headless) with this pack, run an example workflow and print
# the absolute path of its output (the PNG last), then stop the server.
#
#   bash scripts/demo.sh [WORKFLOW] [--out DIR]
#
# WORKFLOW: a file in workflows/ (default: $NEXTSCALE_DEMO_WORKFLOW, else nextscale_generate.json).
# Outputs are copied to .testbed/demo-output/ (git-ignored) unless --out says otherwise.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
PY="${NEXTSCALE_PYTHON:-$ROOT/.testbed/venv/bin/python}"
exec "$PY" "$ROOT/tests/harness/demo.py" "$@"
