#!/usr/bin/env bash
# The GPU session in one command, for the device machine (Python 3.12 at
# python3, torch 2.11 cu130, triton 3.6, no internet), run from the repository
# root with the peers' wheels carried in .whl/ (see bench/README.md):
#
#   NNK_GIT_COMMIT=<git describe --always --dirty --abbrev=12> bash bench/gpu_session.sh [OUT_DIR]  # OUT_DIR: $OUT, else bench_out/gpu
#
# Plan for ONE device call: a session has 15 minutes of device time, the
# machine's start (1-2 min) included, and no machine starts with under 4
# minutes left, so after a full call (600 s) there is no second one. Give the
# machine back after it; a second call fits only if the first was short.
#
# Stages, in this order, each time-boxed, all within SESSION_S seconds (default
# 540: the device tool stops a command at 600 s, and the EXIT trap still has to
# pack the outputs); after each one the outputs are packed into OUT_DIR:
#   env    nvidia-smi, versions, CUDA_HOME and nvcc, and the error of the device's
#          float32 exp / expm1 / log1p (python -m bench.device_math)      -> env.txt
#   peers  pip install --no-index --no-deps --target /tmp/site .whl/*.whl -> peers.log
#   build  pip install --no-build-isolation --no-deps -e . with NNK_REQUIRE_CUDA=1
#          (a build without the CUDA sources fails rather than passing) (BUILD_S, 240) -> build.log
#   test   pytest --device cuda --gpu-only -m "not slow": only the tests that run on the GPU
#          (the device fixture or the gpu marker; the rest runs the same in CPU CI), the
#          kernels' files first; --timeout=120 per test where pytest-timeout is installed,
#          -n TEST_WORKERS (8) where pytest-xdist is (carried in .whl/ with the peers);
#          NNK_TRITON_NO_AUTOTUNE=1 (one config per Triton kernel: autotuning each of the
#          ~100 keys the tests reach would compile ~550 kernels, 1-4 s each; test_large_gpu
#          still autotunes, and the bench stage does); SIGINT at the box, so that pytest
#          still prints its summary.
#          Box: TEST_S (150), cut so that the bench keeps BENCH_MIN_S (200) + TAIL_S (60), at least 30 -> tests.log
#   bench  python -m bench --suite full --device cuda --dtype bf16, in two runs:
#          1. the headline shapes (SHAPES: LLM C = 131072, face C = 1M CosFace and ArcFace),
#             fwd+bwd only (HEAD_MODES), against the providers the issue names (PROVIDERS:
#             nnk's Triton and CUDA impls and their variants, the PyTorch reference and the
#             16-bit PyTorch head, each eager and under torch.compile, torch-lce where this
#             torch has it, liger, cce, the GEMM bound; not nnk-torch or pml)
#                                                              -> <slug>_full_headline.csv, bench_headline.log
#          2. if time is left, the other shapes with every provider but paper-loop
#             (REST_SHAPES, REST_PROVIDERS; REST_SHAPES= skips it) -> <slug>_full.csv, bench.log
#          each with a time budget of the time left minus TAIL_S (later builds and modes are
#          skipped) and SIGINT 30 s past it (the CSV keeps every finished row)
#   ncfp32 the NC case in float32 (nnk's providers and the bound), if time is left -> *_nc-fp32.csv
#   report summary + plots rewritten from the CSVs, within the time left; skipped under 15 s
#          (python -m bench.report <csv> does it anywhere from the CSVs)
# and, only when named in STAGES (it needs a call of its own):
#   sanitize  compute-sanitizer memcheck (cuda, triton) and racecheck (cuda) over
#             python -m bench.sanitize, each time-boxed (SANITIZE_S, 150)  -> sanitize-*.log
#
# Timeline of the default call (estimates: nothing has run on a GPU yet):
#     0-15 s  env, peers
#   ~15-120   build (its 11 compile jobs took 164 s on a 2-core CPU machine; 16 cores there; box 240)
#   ~120-270  test (150 s box; 513 GPU tests collected at 069c119: they may not all finish); the box
#             shrinks (to 30 s at least) so that the bench keeps its 200 s unless env and
#             build take over 250 s
#   ~270-480  bench: headline (3 cases; builds: Triton autotuning, two torch.compile per
#             case), then the rest with what the headline leaves
#   ~480-525  ncfp32
#   ~525-540  report; then the EXIT trap packs OUT_DIR (a few s, before the 600 s kill)
#
# Every file goes to WORK (default /tmp/nnk_gpu_session); OUT_DIR receives
# session.tgz (all of WORK) and copies of session.log, tests.log, the CSVs and
# the summaries, the headline's first: at most 8 files, what the device tool returns.
# Environment: STAGES (comma list, default all but sanitize), SESSION_S, BUILD_S, TEST_S,
# BENCH_MIN_S, TAIL_S, SANITIZE_S, TEST_FILES (pytest's file list), TEST_ARGS (more pytest
# arguments, e.g. -k triton), SHAPES, PROVIDERS, HEAD_MODES, HEAD_CASE_S (the
# headline run), REST_SHAPES, REST_PROVIDERS, REST_CASE_S, NC_PROVIDERS, WORK, CUDA_HOME,
# NNK_REQUIRE_CUDA (default 1), NNK_GIT_COMMIT (the commit to record: the device gets a copy
# of the tree without .git), BENCH_DEVICE (default cuda; cpu dry-runs the bench stages anywhere).
set -uo pipefail
OUT_DIR="${1:-${OUT:-bench_out/gpu}}"
# Every stage writes into WORK; OUT_DIR gets session.tgz (all of WORK) plus
# the few files read first (the device tool returns at most 8 files from
# $OUT), after every stage and on exit, also when a stage is cut short.
WORK="${WORK:-/tmp/nnk_gpu_session}"
mkdir -p "$OUT_DIR" "$WORK"
pack() {
  # Written beside WORK and moved: a tar cut short never replaces the last good one.
  # tar exits 1 for a file that grew while read (a log still being written
  # when the EXIT trap packs): the archive is complete up to then, keep it.
  tar --warning=no-file-changed -czf "$WORK.tgz" -C "$WORK" . 2>/dev/null
  (( $? <= 1 )) && mv -f "$WORK.tgz" "$OUT_DIR/session.tgz"
  local f n
  n=$(find "$OUT_DIR" -maxdepth 1 -type f | wc -l)
  for f in "$WORK"/session.log "$WORK"/tests.log "$WORK"/*_headline.csv "$WORK"/*_headline_summary.md \
           "$WORK"/*_nc-fp32.csv "$WORK"/*.csv "$WORK"/*_summary.md; do
    [[ -e "$f" ]] || continue
    if [[ -e "$OUT_DIR/${f##*/}" ]]; then
      cp "$f" "$OUT_DIR"/
    elif (( n < 8 )); then
      cp "$f" "$OUT_DIR"/ && n=$((n + 1))
    fi
  done
  true
}
trap pack EXIT
exec > >(tee -a "$WORK/session.log") 2>&1

START=$(date +%s)
SESSION_S="${SESSION_S:-540}"
BENCH_MIN_S="${BENCH_MIN_S:-200}"
TAIL_S="${TAIL_S:-60}"   # ncfp32 and report, after the bench
STAGES=",${STAGES:-env,peers,build,test,bench,ncfp32,report},"
PY="${PYTHON:-python3}"
# The toolkit: CUDA_HOME if set, else /usr/local/cuda when it holds nvcc, else
# the nvcc on PATH (the image may ship it in a pip package). Left unset when
# none is found: setup.py then fails under NNK_REQUIRE_CUDA=1, saying so.
if [[ -z "${CUDA_HOME:-}" ]]; then
  if [[ -x /usr/local/cuda/bin/nvcc ]]; then
    CUDA_HOME=/usr/local/cuda
  elif nvcc_path=$(command -v nvcc); then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")
  fi
fi
[[ -n "${CUDA_HOME:-}" ]] && export CUDA_HOME
export MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONUNBUFFERED=1

left() { echo $(( START + SESSION_S - $(date +%s) )); }
# min(stage box, time left), at least 1 (timeout 0 would mean no limit)
box() { local l; l=$(left); (( l < 1 )) && l=1; (( $1 < l )) && echo "$1" || echo "$l"; }
# timeout, and SIGKILL 15 s after its signal: a kernel that never returns
# (a spin lock) blocks Python's signal handlers.
tbox() { timeout -k 15 "$@"; }
want() { [[ "$STAGES" == *",$1,"* ]]; }
stage() { echo; echo "=== $1 ($(date -u +%H:%M:%S), $(left) s left)"; }
# " (time box reached...)" for timeout's exit status (124: its signal, 137: the SIGKILL after it)
boxed() { (( $1 == 124 || $1 == 137 )) && echo " (time box reached: incomplete)"; }

if want env; then
  stage env
  { echo "NNK_GIT_COMMIT=${NNK_GIT_COMMIT:-unset (the results will record commit 'unknown')}"
    tbox 30 nvidia-smi; tbox 60 "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
    tbox 60 "$PY" -c 'import triton, setuptools; print("triton", triton.__version__, "setuptools", setuptools.__version__)'
    echo "CUDA_HOME=${CUDA_HOME:-unset}"; [[ -n "${CUDA_HOME:-}" ]] && "$CUDA_HOME/bin/nvcc" --version | tail -n 2
    "$PY" -c 'import pytest_timeout' 2>/dev/null && echo "pytest-timeout (before the peers stage): yes" \
      || echo "pytest-timeout (before the peers stage): no"
    tbox 60 "$PY" -m bench.device_math --device "${BENCH_DEVICE:-cuda}"; } > "$WORK/env.txt" 2>&1
  cat "$WORK/env.txt"
  pack
fi

if want peers; then
  stage peers
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > "$WORK/peers.log" 2>&1 \
      && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" && echo "peers installed: $(ls .whl)" \
      || echo "peers: install failed (see peers.log); the bench reports them unavailable"
  else
    echo "peers: no .whl/ carried; the bench reports them unavailable"
  fi
  pack
fi

if want build; then
  stage build
  # NNK_REQUIRE_CUDA=1: without nvcc or with a CPU torch, setup.py would
  # quietly build the CPU kernels only and the CUDA impl would be missing.
  # NNK_CUDA_ARCHS=90a: the H100 / H200 only (the default 80;90a also
  # compiles every kernel for sm_80, time the build box does not have).
  tbox "$(box "${BUILD_S:-240}")" env NNK_REQUIRE_CUDA="${NNK_REQUIRE_CUDA:-1}" \
    NNK_CUDA_ARCHS="${NNK_CUDA_ARCHS:-90a}" "$PY" -m pip install --no-index \
    --disable-pip-version-check --no-build-isolation --no-deps -e . > "$WORK/build.log" 2>&1
  rc=$?
  echo "build: exit $rc$(boxed $rc) ($(tail -n 1 "$WORK/build.log"))"
  ((rc != 0)) && grep -m 5 -E 'error|NNK_REQUIRE_CUDA' "$WORK/build.log"
  tbox 60 "$PY" -m nnk info
  pack
fi

if want test; then
  stage test
  # Only the tests that run on the GPU (--gpu-only, tests/conftest.py): the
  # others run the same in CPU CI. The kernels' files first (pytest keeps the
  # order given), so that a box reached late cuts the least informative ones.
  # The bench smoke test is left to CPU CI: the bench stage runs the real thing.
  files=(tests/test_triton_cce.py tests/test_extension_cce.py tests/test_triton_grad_filter.py tests/test_ops_nc.py
         tests/test_extreme.py tests/test_nc.py)
  for f in tests/test_*.py; do
    [[ " ${files[*]} tests/test_bench_smoke.py " == *" $f "* ]] || files+=("$f")
  done
  [[ -n "${TEST_FILES:-}" ]] && read -ra files <<< "$TEST_FILES"
  extra=()
  # A hung test fails alone (120 s: a test's first launches may compile a dozen kernels).
  "$PY" -c 'import pytest_timeout' 2>/dev/null && extra+=(--timeout=120)
  # Worker processes (pytest-xdist, carried in .whl/): the stage is mostly
  # Triton compiling kernels at their first launch, one at a time per process,
  # with 16 cores there; they share the GPU and Triton's on-disk cache.
  "$PY" -c 'import xdist' 2>/dev/null && extra+=(-n "${TEST_WORKERS:-8}")
  echo "pytest options: ${extra[*]:-none}"
  # Shortened so that the bench keeps BENCH_MIN_S and the stages after it TAIL_S; at least 30 s.
  tb=$(( $(left) - BENCH_MIN_S - TAIL_S ))
  (( tb > ${TEST_S:-150} )) && tb=${TEST_S:-150}
  (( tb < 30 )) && tb=30
  echo "test: ${#files[@]} files, box $(box "$tb") s"
  # SIGINT at the box: pytest stops and prints its summary (SIGTERM would lose it).
  NNK_TRITON_NO_AUTOTUNE=1 tbox -s INT "$(box "$tb")" "$PY" -m pytest --device cuda --gpu-only -m "not slow" -q -p no:cacheprovider \
    --maxfail=20 -rfEs --durations=15 ${extra[@]+"${extra[@]}"} "${files[@]}" ${TEST_ARGS:-} > "$WORK/tests.log" 2>&1
  rc=$?
  echo "tests: exit $rc$(boxed $rc)"
  # The summary lines (xdist's workers print their tracebacks after it when
  # the box interrupts them).
  # A usage error or an INTERNALERROR has no summary line: the log's end then.
  grep -E '^(FAILED|ERROR) |^[0-9]+ (passed|failed|skipped)|^=+ .*(passed|failed|error)' "$WORK/tests.log" \
    | tail -n 40 | grep . || tail -n 30 "$WORK/tests.log"
  pack
fi

if want sanitize; then
  stage sanitize
  SAN="${CUDA_HOME:+$CUDA_HOME/bin/compute-sanitizer}"
  [[ -x "$SAN" ]] || SAN=$(command -v compute-sanitizer)
  if [[ -x "$SAN" ]]; then
    for run in "memcheck cuda" "racecheck cuda" "memcheck triton"; do
      set -- $run
      tbox "$(box "${SANITIZE_S:-150}")" "$SAN" --tool "$1" --error-exitcode 9 \
        "$PY" -m bench.sanitize --impl "$2" > "$WORK/sanitize-$1-$2.log" 2>&1
      rc=$?
      echo "sanitize $1 $2: exit $rc$(boxed $rc) ($(grep -c '^=========' "$WORK/sanitize-$1-$2.log") sanitizer lines)"
      tail -n 3 "$WORK/sanitize-$1-$2.log"
    done
  else
    echo "sanitize: no compute-sanitizer (CUDA_HOME=${CUDA_HOME:-unset}, none on PATH)"
  fi
  pack
fi

DEVICE="${BENCH_DEVICE:-cuda}"
SLUG=""
if want bench || want ncfp32; then
  SLUG=$(tbox 60 "$PY" -c 'import sys, torch; from bench.meta import device_slug; print(device_slug(torch.device(sys.argv[1])))' "$DEVICE")
  SLUG="${SLUG:-$DEVICE}"
fi
# bench_run LOG BUDGET ARGS...: python -m bench on the full suite with a time
# budget (no build starts after it; what was built is still warmed and timed,
# its minimum rounds) and SIGINT 30 s past it (a warm-up may still be
# compiling a backward): the CSV keeps every finished row, and the
# interrupted case its finished modes and the samples of what was warm.
bench_run() {
  local log=$1 budget=$2
  shift 2
  tbox -s INT "$(box $(( budget + 30 )))" "$PY" -m bench --suite full --device "$DEVICE" --out "$WORK" \
    --time-budget "$budget" "$@" 2>&1 | tee "$WORK/$log" | grep --line-buffered -v '^|'
}
if want bench; then
  stage bench
  budget=$(( $(left) - TAIL_S ))   # leave time for the NC float32 case and the report
  if (( budget > 30 )); then
    # The issue's targets first: fwd+bwd time and peak memory at its two shapes
    # in bf16 against its baselines (ref-* is the specification with float32
    # GEMMs, torch-* the usual 16-bit head; torch-lce is a row saying whether
    # this torch has it). Not nnk-torch, pml or paper-loop: no issue target.
    bench_run bench_headline.log "$budget" --dtype bf16 --tag "${SLUG}_full_headline" \
      --shapes "${SHAPES:-llm-*-C131072,face-*-C1000000}" \
      --providers "${PROVIDERS:-nnk-triton*,nnk-cuda*,ref-*,torch-*,liger,cce*,bound-gemm}" \
      --modes "${HEAD_MODES:-fwdbwd}" --case-budget "${HEAD_CASE_S:-15}"
  else
    echo "bench: no time left"
  fi
  pack
  budget=$(( $(left) - TAIL_S ))
  REST_SHAPES="${REST_SHAPES-llm-*-C32000,llm-*-C262144,face-*-C100000,vision,nc}"
  if [[ -n "$REST_SHAPES" ]] && (( budget > 30 )); then
    # The rest of the suite, every mode; paper-loop would outlast the stage on the NC case.
    bench_run bench.log "$budget" --dtype bf16 --shapes "$REST_SHAPES" \
      --providers "${REST_PROVIDERS:-nnk-*,ref-*,torch-*,liger,cce*,pml,bound-gemm}" --case-budget "${REST_CASE_S:-30}"
  else
    echo "bench: the rest not run (${REST_SHAPES:-REST_SHAPES empty}; $(left) s left)"
  fi
  pack
fi

if want ncfp32; then
  stage ncfp32
  if (( $(left) > 40 )); then
    # Without paper-loop: ~200k per-class iterations with host syncs per call
    # (15-25 s each, 5 calls) would outlast this stage.
    tbox -s INT "$(( $(left) - 15 ))" "$PY" -m bench --suite full --device "$DEVICE" --out "$WORK" --dtype fp32 \
      --shapes nc --providers "${NC_PROVIDERS:-nnk-*,bound-gemm}" --tag "${SLUG}_full_nc-fp32" \
      --case-budget 30 --time-budget "$(( $(left) - 30 ))" 2>&1 | tee "$WORK/bench_nc_fp32.log" | grep --line-buffered -v '^|'
  else
    echo "ncfp32: no time left"
  fi
  pack
fi

if want report; then
  stage report
  # The bench runs write their summaries and plots themselves; this rewrites
  # them for a run killed before it could. Not worth the risk with under 15 s.
  if (( $(left) < 15 )); then
    echo "report: skipped ($(left) s left); python -m bench.report <csv> rewrites them from the CSVs"
  else
    for csv in "$WORK"/*.csv; do
      [[ -e "$csv" ]] || continue
      if (( $(left) < 10 )); then
        echo "report: no time left for $csv"
        continue
      fi
      tbox "$(box $(( $(left) - 5 )))" "$PY" -m bench.report "$csv" > /dev/null && echo "report: $csv"
    done
  fi
  pack
fi
echo "=== done in $(( $(date +%s) - START )) s; outputs in $WORK, packed into $OUT_DIR/session.tgz"
