#!/usr/bin/env bash
# Issue 26's CPU tables, as one interleaved run per model (3 rounds, batch 32 and 128, 2 threads):
#   bash experiments/bench/portable.sh            # about 45 minutes on 2 cores
# StridedNet: `cnnlab train` (bench_cnnlab.py), cnnlab's layers in a plain jitted step
# (bench_flax.py --model cnnlab) and PyTorch eager (channels_last); the caltech101 ResNet at 96 px
# (no augmentation, no test-time flip): cnnlab against PyTorch eager in float32, and in bfloat16
# (cnnlab mixed_precision=True, PyTorch bfloat16 autocast) where the CPU has it natively.
# Each also runs under AVX2 limits (XLA's --xla_cpu_max_isa and ONEDNN_MAX_CPU_ISA for cnnlab;
# ATen's ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA for PyTorch), which emulate an AVX2-only CPU
# on a newer one. Writes experiments/bench/results_portable_{stridednet,resnet}.json (+ .runs.jsonl);
# ratios.py prints the ratio tables of the README from them.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
AVX2_JAX='XLA_FLAGS=--xla_cpu_max_isa=AVX2;ONEDNN_MAX_CPU_ISA=AVX2'
AVX2_TORCH='ATEN_CPU_CAPABILITY=avx2;ONEDNN_MAX_CPU_ISA=AVX2'
ROUNDS=${ROUNDS:-3}
lscpu | grep -E "Model name|Flags" | tee experiments/bench/results_portable_cpu.txt

"$PY" experiments/bench/run.py --systems '' --repeats "$ROUNDS" --batches 32,128 \
  --variant 'cnnlab:cnnlab::' \
  --variant 'cnnlab-step:flax::--model cnnlab' \
  --variant 'torch-eager:torch-eager::--channels-last' \
  --variant "cnnlab-avx2:cnnlab:$AVX2_JAX:" \
  --variant "cnnlab-step-avx2:flax:$AVX2_JAX:--model cnnlab" \
  --variant "torch-eager-avx2:torch-eager:$AVX2_TORCH:--channels-last" \
  --out experiments/bench/results_portable_stridednet.json

RESNET='--config configs/caltech101.py --set data.image_size=96 --set eval_flip=False --set schedule.warmup_epochs=0'
TORCH_RESNET='--channels-last --model resnet'
BF16=()
if grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo; then
  BF16=(--variant "cnnlab-bf16:cnnlab::$RESNET --set mixed_precision=True"
        --variant "torch-eager-bf16:torch-eager::$TORCH_RESNET --bf16")
fi
"$PY" experiments/bench/run.py --systems '' --repeats "$ROUNDS" --batches 32,128 --eval-images 512 \
  --variant "cnnlab:cnnlab::$RESNET --set mixed_precision=False" \
  --variant "torch-eager:torch-eager::$TORCH_RESNET" \
  "${BF16[@]}" \
  --variant "cnnlab-avx2:cnnlab:$AVX2_JAX:$RESNET --set mixed_precision=False" \
  --variant "torch-eager-avx2:torch-eager:$AVX2_TORCH:$TORCH_RESNET" \
  --out experiments/bench/results_portable_resnet.json
"$PY" experiments/bench/ratios.py experiments/bench/results_portable_stridednet.json \
  experiments/bench/results_portable_resnet.json
