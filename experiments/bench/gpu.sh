#!/usr/bin/env bash
# Issue 13's GPU table as one script, for a lent GPU machine (the `device` tool):
#   OUT=<results folder> CALTECH101_DIR=<101_ObjectCategories> bash experiments/bench/gpu.sh
# Needs an environment with cnnlab installed (`pip install -e ".[test]"`), a CUDA jaxlib
# (`pip install "jax[cuda12]"`), keras and torch: the device machine reaches no package index,
# so the environment has to be there already or be carried along. Writes, under $OUT:
#   bench_gpu.json / .runs.jsonl  cnnlab, hand-written Flax, Keras 3 on JAX, PyTorch eager and
#                                 torch.compile, batch 32/128/512, 3 interleaved rounds
#   sweeps_gpu.json               the 8-learning-rate sweep: sequential `cnnlab train` (a) vs
#                                 one packed `cnnlab sweep` (b), and the packed step for K = 1..16
# and a log of each. Goals (issue 13): cnnlab >= 2x Keras 3 on JAX; packed sweep >= 5x (a).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:?set OUT to a results folder}
mkdir -p "$OUT"
python -c "import jax; assert jax.default_backend() == 'gpu', jax.devices(); print(jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python experiments/bench/run.py --systems cnnlab,flax,keras-jax,torch-eager,torch-compile \
  --repeats 3 --batches 32,128,512 --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
python experiments/sweeps/bench.py --epochs 2 --methods a,b --ks 1,2,4,8,16 \
  --json "$OUT/sweeps_gpu.json" 2>&1 | tee "$OUT/sweeps_gpu.log"
