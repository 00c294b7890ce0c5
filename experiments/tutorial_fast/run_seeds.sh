#!/usr/bin/env bash
# Times the whole `cnnlab train` command of a config for seeds 0 1 2 (after one warm-up run that
# fills the image cache and the convolution-formulation cache) and prints each run's final test
# metrics and wall time, then mean and spread. Usage (from the project root):
#   CALTECH101_DIR=../shared/data/caltech101/101_ObjectCategories \
#     bash experiments/tutorial_fast/run_seeds.sh configs/tutorial_fast.py runs/tutorial_fast
set -euo pipefail
config=$1
out=$2
shift 2
mkdir -p "$out"
rm -rf "$out/warmup"
cnnlab train --config="$config" --workdir="$out/warmup" --config.num_epochs=1 --config.progress=False "$@" >/dev/null
for seed in 0 1 2; do
  rm -rf "$out/seed$seed"
  start=$(date +%s.%N)
  cnnlab train --config="$config" --workdir="$out/seed$seed" --config.seed=$seed --config.progress=False "$@" \
    >"$out/seed$seed.log" 2>&1
  end=$(date +%s.%N)
  python - "$out/seed$seed" "$start" "$end" "$seed" <<'PY'
import json, sys
run, start, end, seed = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
final = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
final = [r for r in final if r.get("kind") == "epoch"][-1]
row = {"seed": int(seed), "wall_s": round(end - start, 1), "epoch": final["epoch"],
       **{k: round(final[k], 4) for k in ("val/accuracy", "test/accuracy", "test/mean_per_class_accuracy",
                                           "test/top5_accuracy") if k in final}}
print(json.dumps(row))
with open(f"{run}/../seeds.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
PY
done
python - "$out/seeds.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])][-3:]
for key in ("wall_s", "test/accuracy", "test/mean_per_class_accuracy", "test/top5_accuracy"):
    values = [r[key] for r in rows if key in r]
    if values:
        print(f"{key}: mean {statistics.mean(values):.4f}  min {min(values):.4f}  max {max(values):.4f}  "
              f"std {statistics.stdev(values):.4f}")
PY
