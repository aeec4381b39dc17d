#!/usr/bin/env bash
# The one script that validates and times everything on an NVIDIA GPU, with no network.
#
#   bash bench/device_check.sh [OUT_DIR]        (default OUT_DIR: bench/results)
#
# 1. builds the extension for the visible GPU, 2. runs the test suite with CUDA tensors
# (`-m cuda`: the GPU tests and every op test parametrised over cuda; Triton compiled for the
# device, not interpreted; the CPU-only tests are CI's job), 3. runs `sdvae bench` at the real
# sizes, most important suites first, writing the CSV row by row so a timeout keeps what ran.
# Writes <date>-<gpu>.csv, the markdown table, profile-1024.txt (`sdvae profile --size 1024`,
# its Chrome traces under profile-traces/) and device_check.log to OUT_DIR, and prints the
# table last.
# BENCH_SUITES narrows the benchmark, e.g. `BENCH_SUITES="ceiling conv pad_conv2d"` to settle
# the convolution issue alone (cuDNN's bare conv, sdvae's graph bare / unfused / with its fused
# epilogue, and eager), and TEST_TIMEOUT / SERIAL_TEST_TIMEOUT / TUNE_TIMEOUT / PROFILE_TIMEOUT /
# BENCH_TIMEOUT move the caps (140 + 40 + 75 + 60 + 140 s, with the ~60 s build: about 515 s,
# under the 540 s of one GPU call; the tests usually end well before their cap). The tune step writes tune-<date>-<gpu>.jsonl: every cuDNN plan of each conv
# and every attention config, timed (sdvae/bench/tune.py; TUNE_SUITES picks suites).
# Wheels for packages the GPU image lacks (diffusers; accelerate, for the offload-hook tests;
# nvidia-cudnn-frontend, whose headers the build needs for the cuDNN graph conv) are taken from .whl/ when present (see
# bench/fetch_wheels.sh); without cudnn-frontend the build goes on and conv2d runs eager, which
# the build line and `sdvae check` say. The whole-model suites time the image sizes in
# SDVAE_BENCH_VAE_SIZES (batch 1) and SDVAE_BENCH_VAE_BATCH4 (batch 4; empty: none), see
# sdvae/bench/cases_vae.py: each torch.compile provider compiles once per size and dtype, so
# e.g. `BENCH_SUITES="ceiling decode encode" SDVAE_BENCH_VAE_SIZES=1024 SDVAE_BENCH_VAE_BATCH4=`
# is the short whole-model run. Target: under 8 minutes on an H100, which is why the
# whole-model `compile` rows use torch.compile's default mode here (COMPILE_MODE=...
# overrides; `sdvae bench` alone defaults to max-autotune-no-cudagraphs, whose autotuning of
# every conv shape takes longer than this whole script may). `decode_large` (last: 2048^2 to
# 8192^2 decodes within a memory budget, diffusers' tiling beside sdvae full and streamed;
# SDVAE_BENCH_LARGE_SIZES narrows it) takes minutes: give it a larger BENCH_TIMEOUT, or run
# `BENCH_SUITES=decode_large` alone.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=$(mkdir -p "${1:-bench/results}" && cd "${1:-bench/results}" && pwd)
LOG="$OUT_DIR/device_check.log"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 SDVAE_TRITON_GPU=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
unset TRITON_INTERPRET
step() { echo; echo "=== $* ($(date +%T))"; }

{
  step "device"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
  $PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__, "|", torch.cuda.get_device_name())'

  if compgen -G ".whl/*.whl" > /dev/null; then
    step "carried wheels"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/sdvae-site .whl/*.whl && export PYTHONPATH=/tmp/sdvae-site${PYTHONPATH:+:$PYTHONPATH}
  fi

  step "build"
  t0=$SECONDS
  if ! $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . ; then
    echo "BUILD FAILED"
  fi
  $PY -c 'import sdvae._ext as e; print("sdvae._C:", e.build_info())'
  $PY -c 'import sdvae.ops as o, sys; sys.exit(0 if o._GRAPH_CONV else 1)' \
    || echo "NO CUDNN GRAPH CONV: sdvae._C was built without cudnn-frontend (carry .whl/, see bench/fetch_wheels.sh); conv2d and pad_conv2d run eager"
  echo "build took $((SECONDS - t0)) s"

  $PY -c 'import diffusers; print("diffusers", diffusers.__version__)' \
    || echo "NO DIFFUSERS: the eager/compile whole-model rows and the diffusers tests will be missing (carry .whl/, see bench/fetch_wheels.sh)"

  step "tests (CUDA: the cuda-marked tests, which include every op test parametrised over cuda)"
  # In parallel (pytest-xdist, TEST_WORKERS processes on the one GPU: most of the time is
  # Triton's and cuDNN's compiles, on the CPU), except the `serial` ones (tens of GiB each),
  # which run one at a time afterwards.
  t0=$SECONDS
  workers=()
  if $PY -c 'import xdist' 2>/dev/null; then workers=(-n "${TEST_WORKERS:-8}"); else
    echo "no pytest-xdist: the cuda tests run in one process (slower; TEST_TIMEOUT may cut them)"; fi
  timeout ${TEST_TIMEOUT:-140} $PY -m pytest -q -p no:cacheprovider tests -m "cuda and not serial" \
    "${workers[@]}" -rfE --junitxml="$OUT_DIR/tests.xml" || echo "TESTS FAILED OR TIMED OUT"
  timeout ${SERIAL_TEST_TIMEOUT:-40} $PY -m pytest -q -p no:cacheprovider tests -m "cuda and serial" \
    -rfE --junitxml="$OUT_DIR/tests-serial.xml" || echo "TESTS FAILED OR TIMED OUT (serial)"
  echo "tests took $((SECONDS - t0)) s"

  step "tune: every candidate timed (attention configs, cuDNN plans per conv${TUNE_SUITES:+: $TUNE_SUITES})"
  # Data for the next decisions, one JSON line per measurement (sdvae/bench/tune.py): attention
  # first (~20 s, mostly compiling its configs), then the convs until TUNE_BUDGET seconds (each
  # fused candidate is a runtime-compiled cuDNN engine, ~1 s to build: all 17 shapes need
  # several minutes, `TUNE_SUITES=conv TUNE_BUDGET=400` in a run of its own). The GroupNorm
  # launch-constant sweep compiles a kernel per variant: TUNE_SUITES="group_norm" likewise.
  t0=$SECONDS
  timeout ${TUNE_TIMEOUT:-75} $PY -m sdvae.bench.tune --out "$OUT_DIR" --budget-s "${TUNE_BUDGET:-55}" \
    --suites ${TUNE_SUITES:-attention conv} --reps "${TUNE_REPS:-10}" --max-plans "${TUNE_MAX_PLANS:-4}" \
    || echo "TUNE FAILED OR TIMED OUT (what ran is in tune-*.jsonl)"
  echo "tune took $((SECONDS - t0)) s"

  step "sdvae profile --size 1024 (fp16: GPU time by category and per kernel, eager beside sdvae)"
  t0=$SECONDS
  timeout ${PROFILE_TIMEOUT:-60} $PY -m sdvae.cli profile --size 1024 --dtype fp16 \
    --out "$OUT_DIR/profile-traces" > "$OUT_DIR/profile-1024.txt" 2>&1 \
    || echo "PROFILE FAILED OR TIMED OUT (see profile-1024.txt)"
  echo "profile took $((SECONDS - t0)) s"

  step "sdvae bench"
  t0=$SECONDS
  # Most important first: the CSV is written row by row, so a timeout keeps what ran.
  timeout ${BENCH_TIMEOUT:-140} $PY -m sdvae.cli bench --out "$OUT_DIR" \
    --compile-mode "${COMPILE_MODE:-default}" --rep-ms "${REP_MS:-100}" \
    ${BENCH_SUITES:-ceiling decode encode conv pad_conv2d attention attention_block group_norm_silu group_norm_fused vae_sample decode_large} \
    > "$OUT_DIR/bench_table.txt" || echo "BENCH FAILED OR TIMED OUT"
  echo "bench took $((SECONDS - t0)) s"
} 2>&1 | tee "$LOG"
status=0
grep -q -E "^(BUILD FAILED|TESTS FAILED|BENCH FAILED)" "$LOG" && status=1

echo
echo "=== results (also in $OUT_DIR)"
cat "$OUT_DIR/bench_table.txt" 2>/dev/null
exit $status
