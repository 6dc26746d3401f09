# Every target builds its own virtualenv ($(VENV)) and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test test-fast lint bench clean

$(BIN)/xlaserve: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test-deps: $(BIN)/xlaserve
	$(BIN)/pip install -q -e ".[test]"
	touch $@

# The main job on the default model (pulled into the model cache on first use).
run: $(BIN)/xlaserve
	$(BIN)/xlaserve generate --chat "What is the capital of France?"

# Lint, pull the real model (required: the suite fails, never skips, without it), run every test.
test: $(VENV)/.test-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/xlaserve pull smollm2
	$(BIN)/xlaserve pull qwen2.5-coder-0.5b
	$(BIN)/xlaserve pull qwen2.5-coder-1.5b
	$(BIN)/python -m pytest -q

# The daily lane: lint and every test that compiles no real model (a few minutes on 2 cores).
test-fast: $(VENV)/.test-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/xlaserve pull smollm2
	$(BIN)/xlaserve pull qwen2.5-coder-0.5b
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(VENV)/.test-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# xlaserve against HF transformers on the same model, prompts and batch sizes; writes bench/results/.
bench: $(VENV)/.test-deps
	$(BIN)/python -m xlaserve.bench.compare_hf --batch-sizes 1,8 --new-tokens 128 --repeats 3

clean:
	rm -rf $(VENV) .ci-venv .pytest_cache .ruff_cache *.egg-info
