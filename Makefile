# avidfast developer commands. `make test` and `make demo` work on a fresh machine with Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
MAX_JOBS ?= $(shell nproc)
BIN := $(VENV)/bin

# CUDA compile check: a torch CUDA build in a venv cached outside the checkout.
CUDA_TORCH_SPEC ?= torch==2.14.1
CACHE_DIR ?= $(HOME)/.cache/avidfast
CUDA_VENV ?= $(CACHE_DIR)/cuda-venv
CUDA_BUILD ?= $(CACHE_DIR)/cuda-build
CUDA_HOME ?= /usr/local/cuda
DEFAULT_CUDA_ARCHS := 8.0;9.0+PTX
CUDA_ARCHS ?= $(DEFAULT_CUDA_ARCHS)
CMAKE_BUILD ?= .cmake-build

SOURCES := setup.py pyproject.toml $(shell find csrc -type f)
PACKAGE_FILES := MANIFEST.in $(shell git ls-files --cached --others --exclude-standard avidfast docs 2>/dev/null)
DIST ?= dist

.PHONY: help venv install media test wheel wheel-check gpu-check demo demo-eval bench cuda-check cmake-check clean

help:
	@echo "make test         build into $(VENV) (TORCH_SPEC=$(TORCH_SPEC)) and run the whole test suite"
	@echo "make demo         the main job: synthetic data, Cross-AVID training on this CPU, probes (runs/demo)"
	@echo "make demo-eval    every evaluation protocol on the demo checkpoint and on a random network (after make demo)"
	@echo "make wheel        build the sdist and the wheel into $(DIST)/ (python -m build --no-isolation)"
	@echo "make wheel-check  install the wheel into a fresh venv and use it from outside the checkout"
	@echo "make gpu-check    on a machine with an NVIDIA GPU: build with CUDA, CUDA tests, GPU benchmarks, report"
	@echo "make bench        the pytest-benchmark suites in benchmarks/"
	@echo "make media        fetch the real test clips into $(CACHE_DIR)/media (the tests skip without them)"
	@echo "make cuda-check   compile every .cu against $(CUDA_TORCH_SPEC) (venv: $(CUDA_VENV)), check the kernels' resource table"
	@echo "make cmake-check  configure and build the operator library with CMake"

$(BIN)/.torch-ready:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)" setuptools wheel ninja
	touch $@

venv: $(BIN)/.torch-ready

# Editable install: Python edits apply at once; C++ edits rebuild on the next make.
$(BIN)/.avidfast-installed: $(BIN)/.torch-ready $(SOURCES)
	MAX_JOBS=$(MAX_JOBS) $(BIN)/pip install -q --no-build-isolation -e ".[test]"
	touch $@

install: $(BIN)/.avidfast-installed

# Real media for the tests (Big Buck Bunny from MoviePy's sdist, cached outside the checkout);
# without a network the tests that need it skip and say so.
media: install
	-$(BIN)/python scripts/fetch_media.py

test: install media $(DIST)/.built
	AVIDFAST_DIST=$(DIST) $(BIN)/python -m pytest tests

# The sdist and the wheel, built from the checkout against the venv's torch (no isolation: an
# isolated build would download another torch).
$(DIST)/.built: $(BIN)/.torch-ready $(SOURCES) $(PACKAGE_FILES)
	rm -rf $(DIST)
	$(BIN)/pip install -q build
	MAX_JOBS=$(MAX_JOBS) AVIDFAST_CUDA=0 $(BIN)/python -m build --no-isolation --sdist --wheel -o $(DIST) . > $(DIST).log 2>&1 \
	  || { tail -30 $(DIST).log; exit 1; }
	touch $@

wheel: $(DIST)/.built

wheel-check: $(DIST)/.built
	bash scripts/wheel_check.sh $(DIST)/avidfast-*.whl $(PYTHON) "$(TORCH_SPEC)"

gpu-check:
	$(PYTHON) scripts/gpu_check.py --report gpu-report.md

demo: install
	$(BIN)/avidfast demo --out runs/demo

demo-eval: install
	bash scripts/demo_eval.sh runs/demo $(BIN)/avidfast

bench: install
	$(BIN)/python -m pytest benchmarks --benchmark-columns=median,iqr,rounds

$(CUDA_VENV)/.torch-ready:
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install -q "$(CUDA_TORCH_SPEC)" numpy setuptools wheel ninja
	touch $@

# Builds outside the checkout (so the CPU build in build/ is untouched), then checks that the
# library loads, registers CUDA kernels and runs a CPU op; last, the kernels' resource table
# (registers, static shared memory: scripts/resource_usage.py, cuobjdump) is regenerated and
# compared with the committed csrc/ops/cuda/resource_usage.json, which tests/test_launch_plan.py
# reads: when they differ the new table is written in its place and the check fails (commit
# it). Archs other than the default are not compared (their table goes to $(CUDA_BUILD)).
cuda-check: $(CUDA_VENV)/.torch-ready
	AVIDFAST_CUDA=1 CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" MAX_JOBS=$(MAX_JOBS) \
	  $(CUDA_VENV)/bin/python setup.py -q build_ext --build-temp $(CUDA_BUILD)/temp --build-lib $(CUDA_BUILD)/lib
	cp -r avidfast/*.py avidfast/ops avidfast/losses $(CUDA_BUILD)/lib/avidfast/
	cd $(CUDA_BUILD)/lib && $(CUDA_VENV)/bin/python -c "import torch, avidfast.ops as ops; \
	  assert ops.has_cuda_kernels(), 'no CUDA kernels registered'; \
	  ops.sample_negatives(torch.arange(4), 100, 8, 0, 0); \
	  print('cuda-check: every .cu compiled with nvcc for', '$(CUDA_ARCHS)', 'against torch', torch.__version__)"
	if [ "$(CUDA_ARCHS)" = "$(DEFAULT_CUDA_ARCHS)" ]; then \
	  CUDA_HOME=$(CUDA_HOME) $(CUDA_VENV)/bin/python scripts/resource_usage.py --check $(CUDA_BUILD)/lib/avidfast/_C*.so; \
	else \
	  CUDA_HOME=$(CUDA_HOME) $(CUDA_VENV)/bin/python scripts/resource_usage.py --table $(CUDA_BUILD)/resource_usage.json $(CUDA_BUILD)/lib/avidfast/_C*.so; \
	fi

cmake-check: venv
	cmake -S . -B $(CMAKE_BUILD) -DPython3_EXECUTABLE=$(abspath $(BIN)/python) -DCMAKE_BUILD_TYPE=Release
	cmake --build $(CMAKE_BUILD) -j $(MAX_JOBS)
	$(BIN)/python scripts/check_cmake_library.py $(CMAKE_BUILD)

clean:
	rm -rf build $(CMAKE_BUILD) $(DIST) $(DIST).log avidfast/_C*.so *.egg-info
