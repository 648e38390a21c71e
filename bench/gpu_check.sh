#!/usr/bin/env bash
# LoRA and QLoRA train -> generate -> merge -> predict on a CUDA GPU (see bench/gpu_check.py).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec "${PYTHON:-python3}" "$here/gpu_check.py" "$@"
