#!/usr/bin/env bash
# The one script that validates and times everything on an NVIDIA GPU, with no network.
#
#   bash bench/device_check.sh [OUT_DIR]             the first run  (default OUT_DIR: bench/results)
#   bash bench/device_check.sh --second [OUT_DIR]    the second run (or RUN=2)
#
# Each run fits one GPU command of 9 minutes: every step after the build is capped, and the caps
# shrink to what is left of RUN_BUDGET (540 s). A capped step gets SIGINT (`timeout -s INT -k
# 20`), so pytest still writes its junit XML and its summary and the bench its table; every
# test's outcome is logged as it ends (-v). docs/benchmarks.md ("GPU runs") lists the steps, their
# caps and expected times.
#
# The first run: device, carried wheels and their check, build (kept between runs), build gate
# (stops at once when sdvae._C lacks CUDA or the cuDNN graph conv), the cuda tests (in parallel,
# TEST_WORKERS of them), the `serial` ones (tens of GiB each) alone, the stream and graph tests
# again under TORCH_CUDA_SANITIZER=1, tune (attention configs, cuDNN plans), `sdvae profile`
# (1024², fp16), and the bench in the order of the decisions it informs: ceiling, conv,
# pad_conv2d; decode at 1024² fp16 with every provider; attention; group_norm.
# The second run: device, wheels, build (kept), gate, then the rest of the bench: vae_sample and
# attention_block; decode (bf16) and encode at 1024² with the FLUX.2 rows; decode_large; the
# 512² and batch-4 rows; the Wan family's rows (suite `wan`). Its rows are added to the day's CSV when OUT_DIR already has it.
#
# OUT_DIR gets at most 6 files: device_check.log (device_check-run2.log), <date>-<gpu>.csv and
# .md (the bench), tune-<date>-<gpu>.jsonl, profile-1024.txt, and device_check.tar.gz
# (device_check-run2.tar.gz) holding everything else: the junit XMLs, the profile's Chrome
# traces, the GPU memory samples of the test step. The archive is rewritten after every step, so
# a run stopped from outside keeps what the finished steps wrote.
#
# Settings (environment):
#   RUN_BUDGET=540       seconds for the whole run; each cap is cut to what is left of it
#   SKIP_BUILD=1|0       keep / rebuild sdvae._C; unset: kept when build/device_check.stamp says
#                        it was built from these very sources against this torch
#   SDVAE_COMMIT         the bench's and tune's commit column; default: git rev-parse (+ -dirty)
#                        where .git is there. Give it literally where the tree travels without it.
#   WHL_DIR=.whl         wheels to install first (bench/fetch_wheels.sh), into SITE_DIR
#                        (/tmp/sdvae-site), which goes on PYTHONPATH for the build and every step
#   TEST_WORKERS=8       pytest-xdist processes on the one GPU (the test step logs the GPU
#                        memory it saw: peak in all and per process, to size this)
#   TEST_PATHS=tests     what the test steps collect; SANITIZER_TESTS (tests/test_stream.py
#                        tests/test_graphs.py) what runs under TORCH_CUDA_SANITIZER=1; SANITIZER=0
#                        leaves that step out
#   BUILD_TIMEOUT TEST_TIMEOUT SERIAL_TEST_TIMEOUT SANITIZER_TIMEOUT TUNE_TIMEOUT PROFILE_TIMEOUT
#   BENCH_TIMEOUT        the caps (240 125 35 30 50 45 150 s)
#   TUNE_SUITES TUNE_BUDGET TUNE_REPS TUNE_MAX_PLANS   the tune step (attention conv, 35, 10, 4)
#   BENCH_SUITES         the first run's bench suites instead of its list; COMPILE_MODE (default)
#                        and REP_MS (100) as in `sdvae bench`
#   SIMULATE=1           on a machine without a GPU, run every step anyway at CPU sizes (the
#                        cuda tests skip, saying so; tune writes its skipped rows; the profile is
#                        32², the bench --quick): a check of this script, not of the GPU
set -uo pipefail
cd "$(dirname "$0")/.."

RUN=${RUN:-1}
OUT_ARG=
for arg in "$@"; do
  case $arg in
    --second) RUN=2 ;;
    --first) RUN=1 ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "device_check.sh: unknown option $arg (--first, --second, --help)" >&2; exit 2 ;;
    *) OUT_ARG=$arg ;;
  esac
done
if [[ $RUN != 1 && $RUN != 2 ]]; then echo "device_check.sh: RUN must be 1 or 2, got $RUN" >&2; exit 2; fi

OUT_DIR=$(mkdir -p "${OUT_ARG:-bench/results}" && cd "${OUT_ARG:-bench/results}" && pwd) || exit 2
NAME=device_check
[[ $RUN == 2 ]] && NAME=device_check-run2
LOG=$OUT_DIR/$NAME.log
TAR=$OUT_DIR/$NAME.tar.gz
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sdvae-device-check.XXXXXX") || exit 2
PY=${PYTHON:-python3}
BUDGET=${RUN_BUDGET:-540}
START=$SECONDS
KILL_GRACE=20
export PYTHONUNBUFFERED=1 SDVAE_TRITON_GPU=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
unset TRITON_INTERPRET

if [[ -z ${SDVAE_COMMIT:-} ]] && git rev-parse --is-inside-work-tree > /dev/null 2>&1; then
  SDVAE_COMMIT=$(git rev-parse --short=12 HEAD 2> /dev/null)
  if [[ -n $SDVAE_COMMIT ]] && ! git diff --quiet HEAD -- 2> /dev/null; then SDVAE_COMMIT+=-dirty; fi
fi
[[ -n ${SDVAE_COMMIT:-} ]] && export SDVAE_COMMIT

# A background job of a non-interactive shell ignores SIGINT, and the child would inherit that:
# give each capped command SIGINT's default back where env can.
DFL=()
env --default-signal=INT true 2> /dev/null && DFL=(env --default-signal=INT)

left() { echo $((BUDGET - (SECONDS - START))); }
T_STEP=$SECONDS
step() { T_STEP=$SECONDS; echo; echo "=== $* ($(date +%T), t=$((SECONDS - START)) s, $(left) s left)"; }
note() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$WORK/steps.tsv"; }  # step, outcome, seconds

# capped NAME CAP CMD...: CMD under `timeout -s INT -k 20`, its cap cut to the budget left.
capped() {
  local name=$1 cap=$2 t0=$SECONDS rc room
  shift 2
  room=$(($(left) - KILL_GRACE - 5))
  ((room < cap)) && cap=$room
  if ((cap < 5)); then
    echo "SKIPPED $name: the run's ${BUDGET} s budget is spent"
    note "$name" "skipped (no time left)" 0
    return 124
  fi
  echo "($name: capped at $cap s)"
  timeout -s INT -k "$KILL_GRACE" "$cap" "${DFL[@]}" "$@"
  rc=$?
  if ((rc == 124 || rc == 137)); then
    echo "TIMED OUT $name at its $cap s cap: it was sent SIGINT; its partial results are above"
    note "$name" "timed out at $cap s" $((SECONDS - t0))
  elif ((rc == 5)) && [[ " $* " == *" pytest "* ]]; then
    echo "($name: no test was selected)"
    note "$name" "ok (no test selected)" $((SECONDS - t0))
    rc=0
  elif ((rc != 0)); then
    echo "FAILED $name (exit $rc)"
    note "$name" "failed (exit $rc)" $((SECONDS - t0))
  else
    note "$name" ok $((SECONDS - t0))
  fi
  return $rc
}

# Everything but the kept files goes into one .tar.gz beside them, rewritten after each step.
# Over 15 MiB (a GPU machine returns files of 16 MiB at most), the Chrome traces are left out.
pack() {
  local tmp=$WORK.tar.gz
  tar -czf "$tmp" -C "$WORK" . 2> /dev/null || return 0
  if (($(stat -c %s "$tmp") > 15 * 1024 * 1024)); then
    echo "(the archive is over 15 MiB: the Chrome traces are left out of it)"
    tar -czf "$tmp" --exclude='*.trace.json' -C "$WORK" . 2> /dev/null
  fi
  mv -f "$tmp" "$TAR"
}

summary() {
  echo
  echo "=== summary (run $RUN, commit ${SDVAE_COMMIT:-unknown}, $((SECONDS - START)) s of $BUDGET)"
  [[ -f $WORK/steps.tsv ]] && awk -F'\t' '{ printf "  %-50s %-24s %5s s\n", $1, $2, $3 }' "$WORK/steps.tsv"
  echo "files in $OUT_DIR:"
  ls -l "$OUT_DIR" | tail -n +2
}

stop() {
  echo
  echo "STOPPED: $*"
  note "run" "stopped" $((SECONDS - START))
  pack
  summary
  exit 1
}

gpu_memory_start() {  # samples of the GPU's memory in use, overall and per process
  SAMPLERS=()
  [[ $GPU == 1 ]] && command -v nvidia-smi > /dev/null || return 0
  nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader,nounits -lms 500 \
    > "$WORK/gpu-memory.csv" 2> /dev/null &
  SAMPLERS+=($!)
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits -lms 500 \
    > "$WORK/gpu-memory-per-process.csv" 2> /dev/null &
  SAMPLERS+=($!)
}

gpu_memory_stop() {  # $1: how many worker processes ran
  local pid
  for pid in "${SAMPLERS[@]}"; do kill "$pid" 2> /dev/null; wait "$pid" 2> /dev/null; done
  [[ -s $WORK/gpu-memory.csv ]] || return 0
  awk -F', *' -v workers="$1" '
    FILENAME ~ /per-process/ { if ($2 + 0 > proc) proc = $2 + 0; next }
    { if ($1 + 0 > used) used = $1 + 0; total = $2 + 0 }
    END {
      printf "GPU memory during the tests: peak %d of %d MiB in all with %d worker(s)", used, total, workers
      if (proc > 0) printf "; the largest process %d MiB, so about %d workers fit", proc, int(total / proc)
      else printf "; no per-process figures (the driver shows no processes here)"
      print " (TEST_WORKERS sets it)"
    }' "$WORK/gpu-memory.csv" "$WORK/gpu-memory-per-process.csv" 2> /dev/null
}

{
  echo "bench/device_check.sh, run $RUN, commit ${SDVAE_COMMIT:-unknown}, budget $BUDGET s, into $OUT_DIR"

  step "device, carried wheels, install check"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
  else
    echo "no nvidia-smi on PATH"
  fi
  WHL_DIR=${WHL_DIR:-.whl}
  if compgen -G "$WHL_DIR/*.whl" > /dev/null; then
    SITE=${SITE_DIR:-/tmp/sdvae-site}
    echo "carried wheels: $(cd "$WHL_DIR" && echo *.whl)"
    rm -rf "$SITE"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHL_DIR"/*.whl \
      || stop "the wheels of $WHL_DIR did not install (two versions of one package? bench/fetch_wheels.sh starts from an empty folder)"
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    [[ -f $SITE/include/cudnn_frontend.h ]] && export CUDNN_FRONTEND_INCLUDE=$SITE/include
    echo "installed into $SITE; PYTHONPATH=$PYTHONPATH"
  else
    echo "no wheels in $WHL_DIR: the image's own packages only"
  fi
  # One interpreter for all of it (each start imports torch): versions, the GPU, and whether
  # what the build and the tests need imports (diffusers) and is found (cudnn_frontend.h).
  info=$($PY -c '
import os, sys
import torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "none"
gpu = torch.cuda.is_available()
name = torch.cuda.get_device_name() if gpu else "no GPU visible (torch.cuda.is_available() is False)"
print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", tv, "|", name)
print("gpu=%d" % gpu)
problems = []
try:
    import diffusers
    print("diffusers", diffusers.__version__, "from", os.path.dirname(diffusers.__file__))
except Exception as exc:
    problems.append("diffusers does not import (%s: %s): no eager whole-model rows, no diffusers tests" % (type(exc).__name__, exc))
dirs = [os.environ.get("CUDNN_FRONTEND_INCLUDE", "")] + [os.path.join(d, "include") for d in sys.path if d]
found = [d for d in dirs if d and os.path.isfile(os.path.join(d, "cudnn_frontend.h"))]
if found:
    print("cudnn_frontend.h in", found[0])
else:
    problems.append("no cudnn_frontend.h on sys.path (the nvidia-cudnn-frontend wheel): a build would have no graph conv")
try:
    import accelerate
    print("accelerate", accelerate.__version__)
except ImportError:
    print("no accelerate: the offload-hook tests will skip, saying so")
for p in problems:
    print("INSTALL PROBLEM:", p)
' 2>&1)
  echo "$info" | grep -v '^gpu='
  GPU=0
  grep -q '^gpu=1$' <<< "$info" && GPU=1
  TORCH_VERSION=$(sed -n 's/^torch \([^ ]*\) .*/\1/p' <<< "$info")
  [[ -n $TORCH_VERSION ]] || stop "python ($PY) could not import torch (above)"
  if grep -q '^INSTALL PROBLEM' <<< "$info"; then
    stop "the install check failed (above): carry the wheels of bench/fetch_wheels.sh as .whl/"
  fi
  if [[ $GPU != 1 ]]; then
    [[ ${SIMULATE:-0} == 1 ]] || stop "no GPU is visible here, so nothing can be checked (SIMULATE=1 runs every step at CPU sizes to check this script)"
    echo "SIMULATE=1 without a GPU: every step runs at CPU sizes to check this script; the cuda tests skip, saying so"
  fi
  note "device, install" ok $((SECONDS - T_STEP))
  pack

  step "build"
  nvcc --version 2>&1 | tail -n 2 || echo "no nvcc on PATH"
  echo "ninja: $(command -v ninja || echo 'none (the build is serial and slow without it)')"
  STAMP=build/device_check.stamp
  want=$({ echo "torch $TORCH_VERSION"; find csrc setup.py pyproject.toml -type f | LC_ALL=C sort | xargs sha256sum; } | sha256sum | cut -c1-16)
  so=$(ls sdvae/_C*.so 2> /dev/null | head -n 1)
  if [[ ${SKIP_BUILD:-} == 1 || (-z ${SKIP_BUILD:-} && -n $so && -f $STAMP && $(cat "$STAMP") == "$want") ]]; then
    if [[ ${SKIP_BUILD:-} == 1 ]]; then
      echo "kept: ${so:-no sdvae/_C*.so at all} (SKIP_BUILD=1)"
    else
      echo "kept: $so, built from these very sources against torch $TORCH_VERSION (build/device_check.stamp; SKIP_BUILD=0 rebuilds)"
    fi
    note build kept 0
  else
    capped build "${BUILD_TIMEOUT:-240}" $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . \
      || stop "BUILD FAILED (above): nothing after it would measure this code"
    mkdir -p build && echo "$want" > "$STAMP"
  fi

  step "build gate"
  $PY -m sdvae.cli build-info --require cuda graph_conv \
    || { note "build gate" failed $((SECONDS - T_STEP)); false; } \
    || stop "the build lacks what this run measures (above): the tests, tune and bench would spend their minutes on the fallbacks"
  note "build gate" ok $((SECONDS - T_STEP))
  pack

  if [[ $RUN == 1 ]]; then
    workers=()
    if $PY -c 'import xdist' 2> /dev/null; then
      workers=(-n "${TEST_WORKERS:-8}")
    else
      echo "no pytest-xdist: the tests run in one process (slower; their cap may cut them)"
    fi
    read -ra TEST_PATHS_A <<< "${TEST_PATHS:-tests}"
    pytest_args=(-p no:cacheprovider -v -rfE --durations=25)

    step "tests: the cuda-marked ones (every op test parametrised over cuda too), ${workers[*]:-one process}"
    gpu_memory_start
    capped tests "${TEST_TIMEOUT:-125}" $PY -m pytest "${pytest_args[@]}" "${TEST_PATHS_A[@]}" \
      -m "cuda and not serial" "${workers[@]}" --junitxml="$WORK/tests.xml"
    gpu_memory_stop "${workers[1]:-1}"
    pack

    step "tests: the serial ones (tens of GiB each), one at a time"
    capped tests-serial "${SERIAL_TEST_TIMEOUT:-35}" $PY -m pytest "${pytest_args[@]}" "${TEST_PATHS_A[@]}" \
      -m "cuda and serial" --junitxml="$WORK/tests-serial.xml"
    pack

    if [[ ${SANITIZER:-1} == 1 ]]; then
      read -ra SAN_A <<< "${SANITIZER_TESTS:-tests/test_stream.py tests/test_graphs.py}"
      step "tests under TORCH_CUDA_SANITIZER=1 (stream-ordering errors): ${SAN_A[*]}"
      capped tests-sanitizer "${SANITIZER_TIMEOUT:-30}" env TORCH_CUDA_SANITIZER=1 \
        $PY -m pytest "${pytest_args[@]}" "${SAN_A[@]}" -m "cuda and not serial" "${workers[@]}" \
        --junitxml="$WORK/tests-sanitizer.xml"
      pack
    fi

    step "tune: every candidate timed (${TUNE_SUITES:-attention conv}), one JSON line each"
    read -ra TUNE_A <<< "${TUNE_SUITES:-attention conv}"
    capped tune "${TUNE_TIMEOUT:-50}" $PY -m sdvae.bench.tune --out "$OUT_DIR" --budget-s "${TUNE_BUDGET:-35}" \
      --suites "${TUNE_A[@]}" --reps "${TUNE_REPS:-10}" --max-plans "${TUNE_MAX_PLANS:-4}"
    pack

    if [[ $GPU == 1 ]]; then psize=${PROFILE_SIZE:-1024} pdtype=${PROFILE_DTYPE:-fp16}; else psize=${PROFILE_SIZE:-32} pdtype=${PROFILE_DTYPE:-fp32}; fi
    step "sdvae profile --size $psize --dtype $pdtype (time by category and per kernel, eager beside sdvae)"
    capped profile "${PROFILE_TIMEOUT:-45}" $PY -m sdvae.cli profile --size "$psize" --dtype "$pdtype" \
      --out "$WORK/profile-traces" 2>&1 | tee "$OUT_DIR/profile-$psize.txt"
    pack

    read -ra SUITES_A <<< "${BENCH_SUITES:-ceiling conv pad_conv2d decode attention group_norm_silu group_norm_fused}"
    step "sdvae bench (first run): ${SUITES_A[*]}; decode at 1024² fp16 only"
    capped bench "${BENCH_TIMEOUT:-150}" env SDVAE_BENCH_VAE_SIZES="${SDVAE_BENCH_VAE_SIZES-1024}" \
      SDVAE_BENCH_VAE_BATCH4="${SDVAE_BENCH_VAE_BATCH4-}" SDVAE_BENCH_FLUX2_SIZES="${SDVAE_BENCH_FLUX2_SIZES-}" \
      SDVAE_BENCH_VAE_DTYPES="${SDVAE_BENCH_VAE_DTYPES-fp16}" \
      $PY -m sdvae.cli bench --out "$OUT_DIR" --compile-mode "${COMPILE_MODE:-default}" --rep-ms "${REP_MS:-100}" \
      "${SUITES_A[@]}"
    pack
  else
    bench2() {  # bench2 NAME CAP [VAR=value ...] -- ARGS...: one part, its rows added to the CSV
      local name=$1 cap=$2 vars=()
      shift 2
      while [[ $# -gt 0 && $1 != -- ]]; do vars+=("$1"); shift; done
      shift
      step "sdvae bench (second run): $name"
      capped "bench: $name" "$cap" env "${vars[@]}" $PY -m sdvae.cli bench --out "$OUT_DIR" --append \
        --compile-mode "${COMPILE_MODE:-default}" --rep-ms "${REP_MS:-100}" "$@"
      pack
    }
    # The first run measured decode 1x4x128x128 -> 1024x1024 fp16 and its 2048² peak-memory rows.
    bench2 "vae_sample, attention_block" 60 -- vae_sample attention_block
    bench2 "decode bf16 and encode at 1024², with FLUX.2" 300 \
      SDVAE_BENCH_VAE_SIZES=1024 SDVAE_BENCH_VAE_BATCH4= -- decode encode \
      --skip '^decode 1x4x128x128 -> 1024x1024 fp16 ' --skip '^decode 1x4x256x256 -> 2048x2048 \(peak memory\) fp16 '
    bench2 "decode_large" 150 -- decode_large
    bench2 "decode and encode at 512² and 4x512²" 300 \
      SDVAE_BENCH_VAE_SIZES=512 SDVAE_BENCH_VAE_BATCH4=512 SDVAE_BENCH_FLUX2_SIZES= -- decode encode --skip 'peak memory'
    # The Wan family (issue 28): Wan 2.1 81 frames at 480x832 and 720x1280, Qwen-Image 1024²
    # and 2048², bf16 (alone, when the run has no time left for it: `sdvae bench wan --out DIR`).
    bench2 "wan" 240 -- wan
  fi

  pack
  summary
  # exit 1 when a step failed, timed out or was skipped
  awk -F'\t' '$2 !~ /^(ok|kept)/ { bad = 1 } END { exit bad }' "$WORK/steps.tsv"
} 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
pack
rm -rf "$WORK"
exit "$status"
