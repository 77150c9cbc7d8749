# treesearch: `make demo` runs the main job on the embedded default; `make test` runs every test.
# Both set up a local virtual environment (.venv) first. On this kind of CPU machine the CPU build
# of torch lies on disk (torch==2.13.0); on a GPU machine run `make setup TORCH=torch` (or install
# torch and vllm yourself into .venv) before anything else.

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m experiments.demo

test: setup
	$(BIN)/python -m pytest

clean-demo:
	rm -rf outputs/demo
