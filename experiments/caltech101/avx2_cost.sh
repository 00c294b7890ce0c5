#!/usr/bin/env bash
# Training rate of configs/caltech101.py (1 epoch, all classes) and tutorial_fast's wall time,
# natively and under the AVX2 limits. Run from the repo root with the venv active.
set -u
mkdir -p "${OUT:-runs/avx2_cost}"
export CALTECH101_DIR=${CALTECH101_DIR:-../shared/data/caltech101/101_ObjectCategories}
export CNNLAB_CACHE_DIR=${CNNLAB_CACHE_DIR:-$HOME/.cache/cnnlab}
AVX2="ONEDNN_MAX_CPU_ISA=AVX2 XLA_FLAGS=--xla_cpu_max_isa=AVX2"
rate() {  # median images_per_sec of the step windows after the first
  python - "$1" <<'PY'
import json, sys, statistics
recs = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
r = [x["images_per_sec"] for x in recs if x.get("kind") == "train"][1:]
print(f"median {statistics.median(r):.1f} img/s over {len(r)} windows of 10 steps (min {min(r):.1f}, max {max(r):.1f})")
PY
}
for variant in "native:auto:" "avx2:auto:$AVX2" "avx2:True:$AVX2" "native:False:"; do
  IFS=: read -r where mp envs <<< "$variant"
  wd=${OUT:-runs/avx2_cost}/c101-$where-$mp; rm -rf $wd
  start=$(date +%s)
  env $envs cnnlab train --config=configs/caltech101.py --workdir=$wd --config.num_epochs=1 \
    --config.schedule.warmup_epochs=0 --config.mixed_precision=$mp --config.progress=False \
    --config.log_every_steps=10 > $wd.log 2>&1
  echo "caltech101 $where mixed_precision=$mp: exit $? in $(( $(date +%s) - start )) s; $(grep -o 'mixed_precision=[^)]*)' $wd.log | head -1); $(rate $wd)"
done
for where in native avx2; do
  envs=""; [ $where = avx2 ] && envs=$AVX2
  wd=${OUT:-runs/avx2_cost}/tf-$where; rm -rf $wd
  env $envs cnnlab train --config=configs/tutorial_fast.py --workdir=$wd --config.progress=False > /dev/null 2>&1  # warm caches
  rm -rf $wd; start=$(date +%s.%N)
  env $envs cnnlab train --config=configs/tutorial_fast.py --workdir=$wd --config.progress=False > $wd.log 2>&1
  echo "tutorial_fast $where: exit $? in $(python -c "print(round($(date +%s.%N) - $start, 1))") s; $(grep '^final' $wd.log | grep -o 'test/accuracy=[0-9.]*')"
done
