#!/usr/bin/env bash
# Train the shipped demo bundle on the source-scanner head only (CPU, a few minutes).
# OUT=path writes elsewhere (to compare with the shipped bundle). The same command is stored in the bundle's provenance ("command").
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=src/napari_uda/assets/demo
NAPARI_UDA=${NAPARI_UDA:-.venv/bin/napari-uda}
"$NAPARI_UDA" train \
    --images "$DEMO/source_head_t1.nii.gz" \
    --masks "$DEMO/source_head_brainmask.nii.gz" \
    --out "${OUT:-$DEMO/demo_model.safetensors}" \
    --classes background brain \
    --base-channels 8 --depth 4 --norm batch --dropout 0.1 --early-head-layers 1 \
    --spacing 2 2 2 --slice-axis 2 --normalization percentile_zscore \
    --set epochs=60 --set early_head_epochs=20 --set source_pack_size=24 \
    --seed 0 --device cpu "$@"
