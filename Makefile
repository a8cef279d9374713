# neoxrt: `make demo` and `make test` do all the set-up on a fresh machine (Python 3.11 and pip).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
MODEL ?= neoxrt/assets/pythia-14m-sotu
OUT ?= artifacts/default-fp32

.PHONY: venv demo test lint

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: this machine's CPU wheel; an unpinned torch pulls a CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[export,dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/python -m neoxrt.demo

test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: venv
	$(BIN)/ruff check .
