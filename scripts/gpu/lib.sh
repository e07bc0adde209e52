# Sourced by the GPU session plans in this folder; they run on the device machine (one `run`
# call each, 10 minutes at most) from the repo root, with $OUT the folder that comes back.
#   step NAME MAXSEC CMD...   runs CMD with its output in $OUT/NAME.log, stopped at MAXSEC or at
#                             the call's DEADLINE (whichever is first); skipped when < 20 s remain
# Results: every step's log and whatever it writes under $OUT (JSON: --json $OUT/...).
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
: "${OUT:?run me through the device tool: \$OUT must be set}"
: "${DEADLINE:=$(( $(date +%s) + 570 ))}"  # the call's own 600 s less a margin to bring $OUT back
SUMMARY=$OUT/summary.txt

step() {
  local name=$1 max=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  if (( left < 20 )); then echo "SKIP $name: ${left} s left" | tee -a "$SUMMARY"; return 0; fi
  local limit=$(( max < left ? max : left )) t0=$(date +%s) rc=0
  echo "== $name (limit ${limit} s): $*" | tee -a "$SUMMARY"
  timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  echo "   rc=$rc after $(( $(date +%s) - t0 )) s" | tee -a "$SUMMARY"
  tail -n 4 "$OUT/$name.log" | sed 's/^/   | /' | tee -a "$SUMMARY"
}

# GPU-marked tests of the named files (the CPU suite runs in CI; these are the ones that skip there)
gpu_tests() { JAX_PLATFORMS=cuda python -m pytest -q -x -m gpu -p no:cacheprovider "$@"; }
