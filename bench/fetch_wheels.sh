#!/usr/bin/env bash
# Download the wheels that bench/device_check.sh needs on a GPU machine with no network:
# diffusers (the `eager` provider and the equivalence tests) and the one dependency of it
# that the GPU image lacks, and nvidia-cudnn-frontend (its header-only C++ graph API builds the
# cuDNN conv of sdvae._C; only its include/ folder is used, so no dependencies), and accelerate
# with the two of its dependencies the image may lack (psutil, pyyaml) for the cuda tests of a
# patched model under accelerate's offload hooks (they skip, saying so, without it). They land
# in .whl/ (git-ignored); carry that folder to the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
DIFFUSERS_VERSION=${DIFFUSERS_VERSION:-$(.venv/bin/python -c 'import diffusers; print(diffusers.__version__)' 2>/dev/null || echo 0.42.1)}
ACCELERATE_VERSION=${ACCELERATE_VERSION:-$(.venv/bin/python -c 'import accelerate; print(accelerate.__version__)' 2>/dev/null || echo 1.16.0)}
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl \
  "diffusers==${DIFFUSERS_VERSION}" importlib_metadata "nvidia-cudnn-frontend>=1.32" \
  "accelerate==${ACCELERATE_VERSION}" psutil pyyaml
ls -l .whl
