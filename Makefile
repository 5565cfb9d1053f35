# The two entry points of the README: `make demo` and `make test`. Each sets up
# everything on a fresh machine: a virtual environment in .venv, torch 2.14.1
# (CUDA 13.0 build, so the CUDA sources compile and link even without a GPU),
# triton and the build/test tools, then the extension nnk._C built from csrc/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME
TORCH_VERSION ?= 2.14.1
DEPS := torch==$(TORCH_VERSION) triton numpy pybind11 ninja "setuptools>=77" wheel \
        pytest pytest-benchmark hypothesis scipy scikit-learn matplotlib tqdm
DEPS_STAMP := $(VENV)/.deps-$(TORCH_VERSION)
BUILD_STAMP := $(VENV)/.nnk-built
SOURCES := setup.py pyproject.toml $(shell find csrc -type f)

.PHONY: demo test install clean

demo: install
	$(BIN)/python -m nnk demo

test: install
	$(BIN)/python -m pytest -q --durations=15

install: $(BUILD_STAMP)

$(DEPS_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(DEPS)
	touch $@

# --no-build-isolation: build against the torch installed above (isolation
# would download a second torch and may build against the wrong one).
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	$(BIN)/python -m nnk info
	touch $@

clean:
	rm -rf build *.egg-info nnk/_C*.so $(BUILD_STAMP)
