#!/usr/bin/env bash
# The paper's experiments on one H200 in one call (REPRODUCTION.md): runs the reproduce_*.gin
# configs in priority order, each within its share of the time (experiment.max_seconds stops
# starting points, `timeout` stops a point that overruns), copies each config's rows to $OUT as
# soon as it ends, and prints the claims table (experiments/compare_paper.py) last.
#
#   OUT=/some/dir bash experiments/reproduce_h200.sh        # <= 8.3 minutes on one H200
#   REPRODUCE_TINY=1 REPRODUCE_SHARE_S=20 bash experiments/reproduce_h200.sh   # CPU smoke test
#
# REPRODUCE_ONLY="reproduce_hierarchical reproduce_throughput_8b" runs only the configs named
# (the others are listed as not selected and take no time); unset, all of them run.
#
# gin-config is installed from .whl/ when missing (`pip download --no-deps -d .whl
# gin-config==0.5.0` beforehand, and carry .whl). $OUT receives at most 8 files: log.txt, one
# <config>.csv per config, results.tar.gz (every results folder: config.gin, env.json,
# rows.csv, columns.md, plots), summary.md (the claims table) and claims.png.
set -u -o pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/results/reproduce_h200}
WORK=${REPRODUCE_WORK:-$(mktemp -d /tmp/hydrax_reproduce.XXXXXX)}
TOTAL=${REPRODUCE_TOTAL_S:-485}        # seconds for all configs (the call's limit is 9 minutes)
RESERVE=${REPRODUCE_RESERVE_S:-40}     # no point starts later than ~this before its deadline
mkdir -p "$OUT" "$WORK"
# JAX preallocates 75% of the GPU by default: give the caches 95% (the configs'
# memory_limit_bytes assume it).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG=$OUT/log.txt

if ! $PY -c "import gin" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "error: gin-config is not installed and .whl/ holds no wheel to install it from" >&2
    exit 2
  fi
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

BINDINGS=()
if [[ "${REPRODUCE_TINY:-0}" == 1 ]]; then
  mapfile -t tiny < <(PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} $PY -c \
    "from experiments.reproduce import TINY_BINDINGS; print('\n'.join(TINY_BINDINGS))")
  (( ${#tiny[@]} )) || { echo "error: could not read experiments.reproduce.TINY_BINDINGS" >&2; exit 2; }
  for b in "${tiny[@]}"; do BINDINGS+=("--gin_bindings=$b"); done
fi

# config:seconds, in priority order; time a config leaves unused goes to the next ones
# (REPRODUCE_SHARE_S=N gives each config N seconds instead: the CPU smoke test).
PLAN=(reproduce_hierarchical:140 reproduce_long_document:125 reproduce_throughput_13b:110
      reproduce_throughput_8b:110)
for want in ${REPRODUCE_ONLY:-}; do
  [[ " ${PLAN[*]%%:*} " == *" $want "* ]] || {
    echo "error: REPRODUCE_ONLY names '$want', not one of: ${PLAN[*]%%:*}" >&2; exit 2; }
done
echo "reproduce_h200: $(date -u +%FT%TZ), total ${TOTAL}s, results in $WORK, copies in $OUT" | tee -a "$LOG"
start=$SECONDS
deadline=0
for entry in "${PLAN[@]}"; do
  name=${entry%%:*}
  if [[ -n "${REPRODUCE_ONLY:-}" && " $REPRODUCE_ONLY " != *" $name "* ]]; then
    echo "== $name: not selected (REPRODUCE_ONLY)" | tee -a "$LOG"
    continue
  fi
  deadline=$(( deadline + ${REPRODUCE_SHARE_S:-${entry##*:}} ))
  (( deadline > TOTAL )) && deadline=$TOTAL
  left=$(( deadline - (SECONDS - start) ))
  if (( left < 15 )); then
    echo "== $name: not run (${left}s left of its share)" | tee -a "$LOG"
    continue
  fi
  max=$(( left - RESERVE )); (( max < 1 )) && max=1
  echo "== $name: ${left}s (points start within ${max}s)" | tee -a "$LOG"
  timeout -k 10 "$left" $PY experiments/run.py --gin_file="$name.gin" --results_root="$WORK" \
    "--gin.experiment.max_seconds=$max" "${BINDINGS[@]}" 2>"$WORK/$name.err" | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  (( rc == 124 || rc == 137 )) && echo "== $name: stopped at its time limit" | tee -a "$LOG"
  (( rc != 0 && rc != 124 && rc != 137 )) && echo "== $name: exit code $rc" | tee -a "$LOG"
  # Tracebacks of failed points, without the progress bar.
  tr '\r' '\n' <"$WORK/$name.err" | grep -v -e '^\[[#.]*\]' -e '^ *$' >>"$LOG"
  rows=$(ls -t "$WORK/$name"/*/rows.csv 2>/dev/null | head -1)
  if [[ -n "$rows" ]]; then cp "$rows" "$OUT/$name.csv"; else echo "== $name: no rows" | tee -a "$LOG"; fi
  tar -czf "$OUT/results.tar.gz" -C "$WORK" --exclude='*.err' . 2>/dev/null
done
echo "== done in $(( SECONDS - start ))s" | tee -a "$LOG"
$PY experiments/compare_paper.py --rows "$OUT" --out "$OUT/summary.md" --plot "$OUT/claims.png" 2>>"$LOG"
