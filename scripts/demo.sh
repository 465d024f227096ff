#!/usr/bin/env bash
# Set up (if needed) and run the demo: a pretrained brain-extraction model meets a head from a new
# scanner; napari-uda predicts, adapts without labels, and prints Dice before and after.
# Add --gui to open napari afterwards, ready to correct: the demo model and the new-scanner head
# loaded, the Adapt widget open and a first run started (then correct a few slices and press
# "Adapt with corrections").
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
  .venv/bin/python -m napari_uda._qt.demo_gui
fi
