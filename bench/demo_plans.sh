#!/usr/bin/env bash
# The demo recipe (configs/arith_lora.yaml) under each CPU dtype plan and several seeds: exact match on
# the 100 held-out problems, training seconds and peak memory, one row per run.
#   bench/demo_plans.sh [OUT_DIR]        PLANS="0 1" SEEDS="42 2 3" to choose (UNIFT_CPU_BF16 values)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/demo-plans}
BIN=${BIN:-.venv/bin}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
mkdir -p "$OUT"
echo "| plan | seed | exact match | train s | peak RSS MiB | allocator |"
echo "|---|---:|---:|---:|---:|---|"
for seed in ${SEEDS:-42 2 3}; do          # seeds outermost: the plans' runs interleave
  for plan in ${PLANS:-0 1}; do
    name=$([ "$plan" = 1 ] && echo bf16 || echo fp32)
    run="$OUT/$name-seed$seed"
    rm -rf "$run"
    UNIFT_CPU_BF16=$plan "$BIN/unift" train --config configs/arith_lora.yaml --output_dir "$run" --seed "$seed" \
      > "$run.train.log" 2>&1
    UNIFT_CPU_BF16=$plan "$BIN/unift" eval --adapter_dir "$run" --show 0 --max_new_tokens 56 --batch_size 100 \
      > "$run.eval.log" 2>&1
    "$BIN/python" - "$run" "$name" "$seed" <<'PY'
import json, sys
run, name, seed = sys.argv[1:]
m = json.load(open(f"{run}/metrics.json"))
card = json.load(open(f"{run}/unift_run.json"))
res = json.load(open(f"{run}/eval_results.json"))
text = json.dumps(res)
import re
em = re.search(r'"exact_match[^"]*":\s*([0-9.]+)', text)
print(f"| {name} (base {card['base_dtype']}, compute {card['compute_dtype']}) | {seed} | "
      f"{float(em.group(1)) * (100 if float(em.group(1)) <= 1 else 1):.0f}% | {m['wall_seconds']:.0f} | "
      f"{m['peak_rss_mib']:.0f} | {m['allocator']} |")
PY
  done
done
