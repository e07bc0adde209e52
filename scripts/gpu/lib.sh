# Sourced by the GPU session plans in this folder; they run on the device machine (one `run`
# call each, 10 minutes at most) from the repo root, with $OUT the folder that comes back.
#   step NAME MAXSEC CMD...   runs CMD with its output in $OUT/NAME.log, stopped at MAXSEC or at
#                             the call's DEADLINE (whichever is first); skipped when < 20 s remain
# Results: every step's log and whatever it writes under $OUT (JSON: --json $OUT/...), packed at
# exit into $OUT/res.tgz beside $OUT/summary.txt; files named *.keep.gz come back on their own (the tool
# brings back at most 8 files, 16 MiB each).
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
: "${OUT:?run me through the device tool: \$OUT must be set}"
: "${DEADLINE:=$(( $(date +%s) + 570 ))}"  # the call's own 600 s less a margin to bring $OUT back
SUMMARY=$OUT/summary.txt
# JAX's persistent compilation cache across calls (each call may get a fresh machine): a carried
# .gpu/jc.tgz (the previous call's $OUT/jc.tgz, copied here; carry [".gpu"]) seeds it, and this
# call's cache comes back as $OUT/jc.tgz when it fits the tool's 16 MiB per file.
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=2
mkdir -p "$JAX_COMPILATION_CACHE_DIR"
[ -f .gpu/jc.tgz ] && tar xzf .gpu/jc.tgz -C "$JAX_COMPILATION_CACHE_DIR"

step() {
  local name=$1 max=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  if (( left < 20 )); then echo "SKIP $name: ${left} s left" | tee -a "$SUMMARY"; return 0; fi
  local limit=$(( max < left ? max : left )) t0=$(date +%s) rc=0
  echo "== $name (limit ${limit} s): $*" | tee -a "$SUMMARY"
  # through bash -c, so that CMD may be an exported shell function (gpu_tests, next.sh's base): timeout alone
  # execs CMD and cannot find those (exit 127, as s22a's first call found)
  timeout -k 5 "$limit" bash -c '"$@"' step "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  echo "   rc=$rc after $(( $(date +%s) - t0 )) s" | tee -a "$SUMMARY"
  tail -n 4 "$OUT/$name.log" | sed 's/^/   | /' | tee -a "$SUMMARY"
}

# GPU-marked tests of the named files (the CPU suite runs in CI; these are the ones that skip there)
gpu_tests() { JAX_PLATFORMS=cuda python -m pytest -q -x -m gpu -p no:cacheprovider "$@"; }
export -f gpu_tests

pack() {  # at exit: everything but the summary into one archive; the compile cache beside it
  tar czf /tmp/jc.tgz -C "$JAX_COMPILATION_CACHE_DIR" . && (( $(stat -c %s /tmp/jc.tgz) < 15000000 )) \
    && mv /tmp/jc.tgz "$OUT/jc.tgz" || echo "compile cache not brought back (too large or failed)" >>"$SUMMARY"
  ( cd "$OUT" && find . -mindepth 1 -maxdepth 1 ! -name summary.txt ! -name res.tgz ! -name jc.tgz ! -name "*.keep.gz" -print0 \
      | xargs -0 -r tar czf res.tgz --remove-files ) || echo "pack failed" >>"$SUMMARY"
}
trap pack EXIT
