#!/usr/bin/env bash
# The GPU session in one command, for the device machine (Python 3.12 at
# python3, torch 2.11 cu130, triton 3.6, no internet), run from the repository
# root with the peers' wheels carried in .whl/ (see bench/README.md):
#
#   bash bench/gpu_session.sh [OUT_DIR]          # OUT_DIR default: $OUT, else bench_out/gpu
#
# Stages, in this order, each time-boxed, all within SESSION_S seconds (default
# 570: the device tool stops a command at 600):
#   env    nvidia-smi and versions                              -> env.txt
#   peers  pip install --no-index --no-deps --target /tmp/site .whl/*.whl -> peers.log
#   build  pip install --no-build-isolation --no-deps -e .  (BUILD_S, 240) -> build.log
#   test   pytest --device cuda -m "not slow" $TEST_ARGS      (TEST_S, 150) -> tests.log
#   bench  python -m bench --suite full --device cuda --dtype bf16; headline
#          shapes first; stops starting cases when its time is used (rest)  -> CSV, PNG, summary, bench.log
#   ncfp32 the NC case in float32 (nnk's providers and the bound), if time is left -> *_nc-fp32.csv
#   report summary + plots rewritten from the CSVs (always; a cut run keeps its finished cases)
# and, only when named in STAGES (it needs a call of its own):
#   sanitize  compute-sanitizer memcheck (cuda, triton) and racecheck (cuda) over
#             python -m bench.sanitize, each time-boxed (SANITIZE_S, 150)  -> sanitize-*.log
# Two device calls cover it all (the machine is released between calls, so each builds):
#   STAGES=env,build,test,sanitize bash bench/gpu_session.sh $OUT
#   bash bench/gpu_session.sh $OUT        (with .whl/ carried)
# Every file goes to WORK (default /tmp/nnk_gpu_session); on exit OUT_DIR receives
# session.tgz (all of WORK) and copies of session.log, tests.log, the CSVs and
# the summaries: at most 8 files, what the device tool returns.
# Environment: STAGES (comma list, default all but sanitize), SESSION_S, BUILD_S, TEST_S, SANITIZE_S,
# SHAPES (bench --shapes), PROVIDERS (bench --providers), NC_PROVIDERS, WORK, NNK_GIT_COMMIT
# (the commit to record: the device gets a copy of the tree without .git),
# BENCH_DEVICE (default cuda; cpu dry-runs the script's bench stages anywhere).
set -uo pipefail
OUT_DIR="${1:-${OUT:-bench_out/gpu}}"
# Every stage writes into WORK; OUT_DIR gets session.tgz (all of WORK) plus
# the few files read first (the device tool returns at most 8 files from
# $OUT), on every exit, also when a stage is cut short.
WORK="${WORK:-/tmp/nnk_gpu_session}"
mkdir -p "$OUT_DIR" "$WORK"
pack() {
  tar czf "$OUT_DIR/session.tgz" -C "$WORK" . 2>/dev/null
  for f in "$WORK"/session.log "$WORK"/tests.log "$WORK"/*.csv "$WORK"/*_summary.md; do
    [[ -e "$f" ]] && cp "$f" "$OUT_DIR"/
  done
  true
}
trap pack EXIT
exec > >(tee -a "$WORK/session.log") 2>&1

START=$(date +%s)
SESSION_S="${SESSION_S:-570}"
STAGES=",${STAGES:-env,peers,build,test,bench,ncfp32,report},"
PY="${PYTHON:-python3}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
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

if want env; then
  stage env
  { nvidia-smi; "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
    "$PY" -c 'import triton; print("triton", triton.__version__)'; } > "$WORK/env.txt" 2>&1
  cat "$WORK/env.txt"
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
fi

if want build; then
  stage build
  tbox "$(box "${BUILD_S:-240}")" "$PY" -m pip install --no-index --disable-pip-version-check --no-build-isolation --no-deps -e . > "$WORK/build.log" 2>&1
  echo "build: exit $? ($(tail -n 1 "$WORK/build.log"))"
  "$PY" -m nnk info
fi

if want test; then
  stage test
  # The bench smoke test is left to CPU CI: the bench stage below runs the real thing.
  tbox "$(box "${TEST_S:-150}")" "$PY" -m pytest --device cuda -m "not slow" -q -p no:cacheprovider \
    --maxfail=20 -rfEs --durations=15 --ignore=tests/test_bench_smoke.py ${TEST_ARGS:-} > "$WORK/tests.log" 2>&1
  rc=$?
  echo "tests: exit $rc$( ((rc == 124)) && echo ' (time box reached: incomplete)')"
  tail -n 30 "$WORK/tests.log"
fi

if want sanitize; then
  stage sanitize
  SAN="$CUDA_HOME/bin/compute-sanitizer"
  if [[ -x "$SAN" ]]; then
    for run in "memcheck cuda" "racecheck cuda" "memcheck triton"; do
      set -- $run
      tbox "$(box "${SANITIZE_S:-150}")" "$SAN" --tool "$1" --error-exitcode 9 \
        "$PY" -m bench.sanitize --impl "$2" > "$WORK/sanitize-$1-$2.log" 2>&1
      rc=$?
      echo "sanitize $1 $2: exit $rc$( ((rc == 124)) && echo ' (time box reached)') ($(grep -c '^=========' "$WORK/sanitize-$1-$2.log") sanitizer lines)"
      tail -n 3 "$WORK/sanitize-$1-$2.log"
    done
  else
    echo "sanitize: no $SAN"
  fi
fi

DEVICE="${BENCH_DEVICE:-cuda}"
BENCH_ARGS=(--suite full --device "$DEVICE" --out "$WORK" --case-budget 45)
[[ -n "${PROVIDERS:-}" ]] && BENCH_ARGS+=(--providers "$PROVIDERS")
if want bench; then
  stage bench
  budget=$(( $(left) - 60 ))   # leave time for the NC float32 case and the report
  if (( budget > 30 )); then
    # SIGINT at the hard limit: the CSV keeps every finished case.
    tbox -s INT "$(( budget + 40 ))" "$PY" -m bench "${BENCH_ARGS[@]}" --dtype bf16 --time-budget "$budget" \
      ${SHAPES:+--shapes "$SHAPES"} 2>&1 | tee "$WORK/bench.log" | grep -v '^|'
  else
    echo "bench: no time left"
  fi
fi

if want ncfp32; then
  stage ncfp32
  if (( $(left) > 40 )); then
    # Without paper-loop: ~200k per-class iterations with host syncs per call
    # (15-25 s each, 5 calls) would outlast this stage and lose every row.
    tbox -s INT "$(( $(left) - 15 ))" "$PY" -m bench "${BENCH_ARGS[@]}" --dtype fp32 --shapes nc \
      --providers "${NC_PROVIDERS:-nnk-*,bound-gemm}" \
      --tag "$("$PY" -c 'import sys, torch; from bench.meta import device_slug; print(device_slug(torch.device(sys.argv[1])))' "$DEVICE")_full_nc-fp32" \
      --time-budget "$(( $(left) - 30 ))" 2>&1 | tee "$WORK/bench_nc_fp32.log" | grep -v '^|'
  else
    echo "ncfp32: no time left"
  fi
fi

if want report; then
  stage report
  for csv in "$WORK"/*.csv; do
    [[ -e "$csv" ]] && tbox 60 "$PY" -m bench.report "$csv" > /dev/null && echo "report: $csv"
  done
fi
echo "=== done in $(( $(date +%s) - START )) s; outputs in $WORK, packed into $OUT_DIR/session.tgz"
