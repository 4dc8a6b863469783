# The two README commands: `make demo` (main job) and `make test` (environment + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fastbd-installed
# Test worker processes (pytest-xdist), one torch thread each; a test file stays on one worker.
TEST_JOBS ?= 2

.PHONY: env test demo bench lint clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

env: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 \
		-n $(TEST_JOBS) --dist loadfile tests bench --benchmark-disable

demo: $(STAMP)
	$(BIN)/fastbd demo

bench: $(STAMP)
	FASTBD_FULL_SWEEPS=1 $(BIN)/python -m pytest -q bench --benchmark-json=bench/results/cpu-latest.json

clean:
	rm -rf $(VENV) build *.egg-info
