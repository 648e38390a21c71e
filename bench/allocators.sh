#!/usr/bin/env bash
# Peak RSS and speed of `unift train` on each malloc library, interleaved rounds on the same short run:
# glibc's (UNIFT_ALLOCATOR=system), Debian's jemalloc, and mimalloc from PyPI's cmeel-mimalloc wheel
# (no apt needed). Missing libraries are left out. ROUNDS=3 STEPS=12 bench/allocators.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/allocators}
BIN=${BIN:-.venv/bin}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
jemalloc=$("$BIN/python" -c "from unift.allocator import find_jemalloc; print(find_jemalloc() or '')")
mimalloc=${MIMALLOC:-$("$BIN/python" -c "
import glob, site
found = [p for d in site.getsitepackages() for p in glob.glob(d + '/cmeel.prefix/lib/libmimalloc.so.*')]
print(min(found, key=len) if found else '')")}
declare -A libs=([glibc]=system)
[ -n "$jemalloc" ] && libs[jemalloc]=$jemalloc
[ -n "$mimalloc" ] && libs[mimalloc]=$mimalloc
mkdir -p "$OUT"
echo "| round | allocator | peak RSS MiB | tokens/s | train loss |"
echo "|---:|---|---:|---:|---:|"
for round in $(seq "${ROUNDS:-3}"); do
  for name in glibc jemalloc mimalloc; do
    [ -n "${libs[$name]:-}" ] || continue
    run="$OUT/$name-$round"
    rm -rf "$run"
    UNIFT_ALLOCATOR=${libs[$name]} "$BIN/unift" train --config configs/arith_lora.yaml --output_dir "$run" \
      --max_steps "${STEPS:-12}" --save_steps 100000 > "$run.log" 2>&1
    "$BIN/python" -c "
import json, sys
m = json.load(open('$run/metrics.json'))
print(f\"| $round | $name ({m['allocator']}) | {m['peak_rss_mib']:,.0f} | {m['tokens_per_second']:.0f} | {m['train_loss']:.4f} |\")"
  done
done
