#!/usr/bin/env bash
# README "Models in and out": a keras.applications architecture fine-tuned by cnnlab on the
# tutorial's 4 classes. With internet, weights="imagenet" gives the pretrained start; here
# (no internet) the file holds random weights, and the code path is the same.
#   CALTECH101_DIR=../shared/data/caltech101/101_ObjectCategories bash experiments/interop/finetune_application.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/finetune_mobilenetv2}
mkdir -p "$OUT"
KERAS_BACKEND=jax python - "$OUT/mobilenetv2.keras" <<'PY'
import sys, keras
# ImageNet's head (1000 classes), as a pretrained file has; cnnlab replaces it (new_head=True)
keras.applications.MobileNetV2(input_shape=(96, 96, 3), weights=None, classes=1000).save(sys.argv[1])
PY
python -m cnnlab train --config=experiments/interop/keras_tutorial4.py --workdir="$OUT/run" \
  --config.model.kwargs.path="$OUT/mobilenetv2.keras" --config.seed="${SEED:-0}" \
  --config.num_epochs="${EPOCHS:-15}"
python -m cnnlab summary --workdir="$OUT/run" | tail -4
