#!/usr/bin/env bash
# unift beside LLaMA-Factory 0.9.5 on the standard workload, in one run (a benchmark, not a test).
#   bench/vs_llamafactory.sh --data alpaca_en_demo.json [--rounds 3]
# The first run builds LLaMA-Factory's own virtual environment (bench/llamafactory_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/llamafactory_env.sh
exec "$PY" bench/vs_llamafactory.py --llamafactory "$LF" "$@"
