#!/usr/bin/env bash
# A training step's time budget, unift beside LLaMA-Factory's fastest configuration (a benchmark, not a test).
#   bench/step_budget.sh --data alpaca_en_demo.json [--workloads standard scale] [--json OUT]
# The first run builds LLaMA-Factory's own virtual environment (bench/llamafactory_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/llamafactory_env.sh
exec "$PY" bench/step_budget.py --llamafactory "$LF" "$@"
