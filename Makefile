# Two commands do all the set-up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv test lint demo clean

venv: $(VENV)/.installed

# torch first, pinned: 2.13.0 satisfies our range, so pip never swaps it for another build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Test files on TEST_WORKERS pytest-xdist workers (docs/development.md: where the time goes); each file
# stays on one worker (--dist loadfile), in the order tests/conftest.py gives (the longest first).
TEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The offline demo: no hub, no server, no cluster. Tables land in runs/demo/tables/.
demo: venv
	HF_HUB_OFFLINE=1 $(BIN)/layertime plan deployments/demo.yaml
	HF_HUB_OFFLINE=1 $(BIN)/layertime run deployments/demo.yaml

clean:
	rm -rf runs/demo .cache/demo-hub
