#!/usr/bin/env bash
# Set up everything napari-uda needs on a fresh Debian/Ubuntu machine (idempotent):
# system libraries for Qt + Xvfb + Mesa (when run as root or with sudo), a virtual environment
# in .venv, the CPU build of PyTorch *first* (so pip does not pull a multi-GB CUDA build),
# then the project with the extras named in $1 (default: napari).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-napari}"
PYTHON="${PYTHON:-python3}"

SYSTEM_PACKAGES=(xvfb xauth libgl1 libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-icccm4
  libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0
  libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1 libglib2.0-0)

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for package in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$package")
  done
fi
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing system packages: ${missing[*]}" >&2
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==2.13.0 (CPU)" >&2
  "${PIP[@]}" install "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
fi
echo "setup: installing napari-uda[$EXTRAS]" >&2
# Keep the installed torch: without this, pip would upgrade it to satisfy the newest torchvision
# (pulled in by nnunetv2's dependencies).
TORCH_PIN="$(mktemp)"
.venv/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" 2>/dev/null > "$TORCH_PIN"
"${PIP[@]}" install -c "$TORCH_PIN" -e ".[$EXTRAS]" 2>&1 | grep -v "^WARNING: Location" || true
rm -f "$TORCH_PIN"
.venv/bin/python -c "import torch, napari_uda" >/dev/null
