# Sourced by the LLaMA-Factory benchmarks (vs_llamafactory.sh, dpo_vs_llamafactory.sh), from the repository
# root: sets PY (unift's python) and LF (LLaMA-Factory 0.9.5's virtual environment, built on first use under
# $UNIFT_BENCH_DIR, default ~/.cache/unift/bench, with the same torch as unift's .venv so both use the same
# kernels), and the environment both sides run in.
PY=.venv/bin/python
[ -x "$PY" ] || { echo "run 'make install' first" >&2; exit 2; }
BENCH_DIR=${UNIFT_BENCH_DIR:-$HOME/.cache/unift/bench}
LF=$BENCH_DIR/llamafactory-0.9.5
if [ ! -x "$LF/bin/llamafactory-cli" ]; then
    echo "setting up LLaMA-Factory 0.9.5 in $LF (once)" >&2
    mkdir -p "$BENCH_DIR"
    python3 -m venv "$LF"
    TORCH=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
    "$LF/bin/pip" install -q "torch==$TORCH"
    echo "torch==$TORCH" > "$LF/torch-constraint.txt"
    "$LF/bin/pip" install -q -c "$LF/torch-constraint.txt" "llamafactory==0.9.5"
    # Its pins pull torchvision/torchaudio builds that do not match this torch; text training needs neither
    "$LF/bin/pip" uninstall -y -q torchvision torchaudio >/dev/null 2>&1 || true
fi
if ! "$LF/bin/python" -c "import torchaudio" 2>/dev/null; then
    # LLaMA-Factory imports torchaudio at start-up (multimodal plugins) and never uses it for text
    SITE=$("$LF/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    mkdir -p "$SITE/torchaudio"
    echo "# empty stand-in: LLaMA-Factory imports torchaudio at start-up; text training never calls it" \
        > "$SITE/torchaudio/__init__.py"
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
