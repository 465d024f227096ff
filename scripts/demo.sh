#!/usr/bin/env bash
# Set up (if needed) and run the demo: a pretrained brain-extraction model meets a head from a new
# scanner; napari-uda predicts, adapts without labels, and prints Dice before and after.
# Add --gui to open napari with the demo loaded afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh napari
gui=0
args=()
for arg in "$@"; do
  if [ "$arg" = "--gui" ]; then gui=1; else args+=("$arg"); fi
done
.venv/bin/napari-uda demo "${args[@]+"${args[@]}"}"
if [ "$gui" = 1 ]; then
  .venv/bin/napari --with napari-uda
fi
