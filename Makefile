# The two commands: `make test` and `make bench`. Both create .venv when it is missing and
# install sdvae into it (editable, built against the venv's torch, no build isolation).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sdvae-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cpp)

.PHONY: test bench install lint device-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python $(SOURCES)
	$(BIN)/python -m pip install -q "setuptools>=64" wheel ninja packaging numpy safetensors "torch>=2.6"
	# cudnn-frontend's header-only C++ graph API for the cuDNN conv (headers only: no deps).
	$(BIN)/python -m pip install -q --no-deps "nvidia-cudnn-frontend>=1.32"
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test,plot]"
	$(BIN)/python -c "import sdvae, sdvae._ext as e; print('sdvae', sdvae.__version__, '|', e.build_info())"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/sdvae bench

lint: $(STAMP)
	$(BIN)/python -m pip install -q ruff
	$(BIN)/ruff check sdvae kernels tests bench setup.py

device-check:
	bash bench/device_check.sh

clean:
	rm -rf build *.egg-info sdvae/_C*.so
