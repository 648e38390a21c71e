#!/usr/bin/env bash
# unift's DPO beside LLaMA-Factory 0.9.5's on the bundled pairs, in one run (a benchmark, not a test).
#   bench/dpo_vs_llamafactory.sh [--pairs 16] [--rounds 3]
# The first run builds LLaMA-Factory's own virtual environment (bench/llamafactory_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/llamafactory_env.sh
exec "$PY" bench/dpo_vs_llamafactory.py --llamafactory "$LF" "$@"
