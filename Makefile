# The whole set-up on a fresh machine is `make demo` or `make test`: each creates .venv and
# installs weightpool into it. TORCH_SPEC pins the CPU build of torch that lies on this kind of
# machine's disk; a GPU user sets TORCH_SPEC to the build they want (see README).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)")
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m policy.warmup  # compiles the control step once (its cache is on disk)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/weightpool demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q

test: lint unit

bench: $(STAMP)
	$(BIN)/python bench/codecs.py --quick --json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
