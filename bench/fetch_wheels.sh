#!/usr/bin/env bash
# Download the wheels that bench/device_check.sh installs on a GPU machine with no network, into
# .whl/ (git-ignored; WHL_DIR moves it): carry that folder to the GPU.
#
#   bash bench/fetch_wheels.sh
#
# Only what the GPU image lacks, each at one pinned version (two versions of one package stop
# the one `pip install` of all of them, so the folder is emptied first):
# * diffusers: the `eager` whole-model rows and the equivalence tests. Its own requirements
#   are the image's already (huggingface-hub 1.33, filelock, numpy, regex, requests, Pillow,
#   safetensors 0.8), except importlib_metadata, which diffusers imports only on Python < 3.8
#   (the image has 3.12; the carried importlib_metadata 10.2.0 did not even import there).
# * nvidia-cudnn-frontend: its header-only C++ graph API builds sdvae._C's cuDNN conv. Only its
#   include/ folder is used, so none of its own requirements (the Python API's) is carried.
# accelerate (the offload-hook tests), psutil and pyyaml are in the image: not carried.
# device_check.sh checks the install (diffusers imports, cudnn_frontend.h is found) before the
# build and stops, saying why, when it does not hold.
#
# Another version: DIFFUSERS_VERSION=... / CUDNN_FRONTEND_VERSION=... (still one pin each).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHL_DIR=${WHL_DIR:-.whl}
PINS=(
  "diffusers==${DIFFUSERS_VERSION:-0.42.1}"
  "nvidia-cudnn-frontend==${CUDNN_FRONTEND_VERSION:-1.32.0}"
)
for pin in "${PINS[@]}"; do
  [[ $pin =~ ^[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.+!-]*$ ]] || { echo "fetch_wheels.sh: not a pinned version: $pin" >&2; exit 2; }
done

# Download into a fresh folder first: a failed download leaves the old wheels as they were.
tmp=$(mktemp -d "${TMPDIR:-/tmp}/sdvae-wheels.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$tmp" \
  "${PINS[@]}"
mkdir -p "$WHL_DIR"
rm -f "$WHL_DIR"/*.whl  # start from an empty folder: no second version of anything
mv "$tmp"/*.whl "$WHL_DIR"/
ls -l "$WHL_DIR"
