#!/usr/bin/env bash
# GPU session plans (parts c1-c5 written in session 12, s13-s16 run in sessions 13-16; s15a-c name variants that were
# reverted after measuring (FP8 scorer: ffe57e1); s17a-e run in session 17; s18a-h in session 18 (s18a/s18h measured
# variants since removed: fold_tail, tokens_per_dot); n4 ran as s18b/s18c; n1 and n2 (partly run as s16a, its trace
# part as s18c) remain; n3 ran as s17b; s19a-b in session 19, s20a-d in session 20, s21a-d in session 21 (s21d cut short), s22a-e in session 22 (s22a ran without its tests and BASE steps: step could not run shell functions then; s22d's engine test cut at 150 s, its second case run as s22e); n5 is the next session's first call; c5 waits for the 2-GPU kind). One `run` call per part, each under 10 minutes:
#   run: bash scripts/gpu/next.sh c1        (carry [".gpu"] when BASE below is used)
# BASE: a git-ignored tree of an older commit for same-run baselines, made here before the call:
#   rm -rf .gpu/base && mkdir -p .gpu/base && git archive <commit> atom_jax | tar -x -C .gpu/base
# (echo /.gpu/ >> .git/info/exclude once). Parts:
#   c1  GPU-marked tests of the kernels and sampler changed since the last GPU run; bench sampler
#       (radix vs sorted, b1/64/256); bench attention at the candidate tiles; ncu's registers and
#       spill bytes of the attention kernels (if ncu reads counters there)
#   c2  bench long-context, 128K prompt, 1M cache: default vs $SPEC (the best of c1) [vs BASE]
#   c3  issue 27: batch-1 decode traced (busy share) with the radix sampler; batch-64 expert layouts
#   c4  issue 19: W4A16 decode sweep at 64/256 tokens (flash_up, flash_down)
#   c5  (kind nvidia-h200-x2, when lent) issue 27 at dp=2, 64 sequences per rank: off/on, traced
#       (busy share, on/off ratio), default client and the TFRT GPU client
source "$(dirname "$0")/lib.sh"
J=$OUT  # JSON results next to the logs
part=${1:?part: c1 c2 c3 c4 c5}

base() {  # run "$@" with the BASE tree's atom_jax first on the path
  PYTHONPATH="$PWD/.gpu/base:$PYTHONPATH" "$@"
}
export -f base

lc_traced() {  # PROMPT STEPS NAME MAXSEC: bench long-context with STEPS prefill chunks traced, `trace report` of
  # the trace ($J/NAME_report.json) and the raw xplane kept ($J/NAME.xplane.pb.keep.gz)
  step lc_trace "$4" python -m atom_jax.bench long-context --prompts "$1" --backends pallas --decode-tokens 4 \
    --trace /tmp/lctr --trace-steps "$2" --json "$J/$3.json"
  step report 90 bash -c 'python -m atom_jax.trace report "$(find /tmp/lctr -name "*.xplane.pb" | head -1)" --top 40 \
    --json "$0/$1_report.json"' "$J" "$3"
  step keep 30 bash -c 'find /tmp/lctr -name "*.xplane.pb" | head -1 | while read f; do
    gzip -c "$f" >"$0/$1.xplane.pb.keep.gz"; done; ls -la "$0"' "$J" "$3"
}

case $part in
c1)
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv >"$OUT/gpu.txt" 2>&1
  step tests 200 env JAX_PLATFORMS=cuda python -m pytest -q -x -m gpu -p no:cacheprovider \
    tests/test_sparse_kernels.py tests/test_sampling.py tests/test_step_program.py
  step sampler 60 python -m atom_jax.bench sampler --batches 1,64,256 --json "$J/sampler.json"
  step attention 220 python -m atom_jax.bench attention --iters 5 --json "$J/attention.json" --attention-tiles \
    default,64x32x8x2x0,64x64x8x1x0,64x128x8x1x0x1x1x4,64x128x8x1x0x1x1x4x1
  # the real compile's registers and local-memory (spill) bytes per kernel, against `bench sass`'s offline
  # table in AttentionTiles (which assumes XLA's Triton folds the P.V add into the dot, as pip Triton does)
  command -v ncu >/dev/null && step ncu_attention 120 ncu --clock-control none -k regex:sparse_attention \
    --metrics launch__registers_per_thread,l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum,l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum,gpu__time_duration.sum \
    python -m atom_jax.bench attention --modes all,list,none --iters 1 --attention-tiles default,64x128x8x1x0x1x1x4
  ;;
c2)
  SPEC=${SPEC:-64x128x8x1x0x1x1x4}
  step long_context 540 python -m atom_jax.bench long-context --prompts 131072 --backends pallas \
    --decode-tokens 16 --attention-tiles "default,$SPEC" --json "$J/long_context_128k.json"
  ;;
c3)
  step decode_b1_trace 280 env XLA_FLAGS=--xla_enable_command_buffers_during_profiling=true \
    python -m atom_jax.bench decode --dp 1 --layers 4 --batches 1 --modes off,on --steps 64 --replay 16 \
    --trace "$OUT/dtr" --json "$J/decode_b1_trace.json"  # JSON: busy_ms_per_step, device_busy_share
  rm -rf "$OUT/dtr"  # the traces are large; the JSON keeps the busy numbers
  for layout in nmajor kmajor; do  # bf16 experts' layout at batch 64 (BF16_KMAJOR_ON_GPU is still False)
    step "decode_b64_$layout" 130 python -m atom_jax.bench decode --dp 1 --layers 4 --batches 64 --modes on \
      --steps 32 --expert-layout "$layout" --json "$J/decode_b64_$layout.json"
  done
  ;;
c4)
  step w4a16_decode 540 python -m atom_jax.bench w4a16 --tokens 64,256 --shapes flash_up,flash_down \
    --decode-sweep --variants w4a16_kmajor,w4a16_1mul --json "$J/w4a16_decode.json"
  ;;
c5)
  for client in default tfrt; do
    tfrt=$([ $client = tfrt ] && echo 1 || echo 0)
    step "decode_dp2_b64_$client" 270 env XLA_PYTHON_CLIENT_USE_TFRT_GPU_CLIENT=$tfrt \
      XLA_FLAGS=--xla_enable_command_buffers_during_profiling=true \
      python -m atom_jax.bench decode --dp 2 --layers 4 --batches 64 --modes off,on --steps 48 --replay 16 \
      --trace "$OUT/dtr_$client" --json "$J/decode_dp2_b64_$client.json"
    rm -rf "$OUT/dtr_$client"
  done
  ;;
s13)  # session 13: the transposed attention tiles as the default (c1/c2 measured them first)
  step attention 150 python -m atom_jax.bench attention --iters 5 --json "$J/attention.json" --attention-tiles \
    default,64x128x8x1x0x1x1x4x1x1,64x128x8x1x0x2x1x1x1,64x32x8x2x0x2,64x64x8x2x0x2
  step long_context 300 python -m atom_jax.bench long-context --prompts 4096,16384,131072,1048559 \
    --baseline-cache-len 16448 --backends pallas --decode-tokens 16 --json "$J/long_context.json"
  step tests_attention 100 env JAX_PLATFORMS=cuda python -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_sparse_kernels.py -k compiled_attention
  step tests_sampling_step 150 env JAX_PLATFORMS=cuda python -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_sampling.py tests/test_step_program.py
  ;;
s14a)  # session 14: q's norm/RoPE and the output's inverse RoPE in the attention kernel (fuse_rope)
  step tests_attention 170 env JAX_PLATFORMS=cuda python -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_sparse_kernels.py -k compiled_attention
  step attention 120 python -m atom_jax.bench attention --iters 5 --json "$J/attention.json" --attention-tiles \
    default,64x128x8x1x0x1x1x4x1x0x1,64x128x8x1x0x1x1x4x1x1x1
  step long_context 260 python -m atom_jax.bench long-context --prompts 131072 --backends pallas --decode-tokens 16 \
    --attention-tiles default,64x128x8x1x0x1x1x4x1x0x1 --json "$J/long_context.json"
  ;;
s14b)  # fuse_rope on by default: heads per program (2 programs an SM?), then the issue's long-context rows
  step attention 170 python -m atom_jax.bench attention --iters 5 --json "$J/attention.json" --attention-tiles \
    default,32x128x8x1x0x1x1x4x1x0x1,32x64x8x1x0x1x1x4x1x0x1,32x128x4x1x0x1x1x4x1x0x1,16x128x4x1x0x1x1x4x1x0x1
  step long_context 330 python -m atom_jax.bench long-context --prompts 4096,16384,131072,1048559 \
    --baseline-cache-len 16448 --backends pallas --decode-tokens 16 --json "$J/long_context.json"
  ;;
s14c)  # where a 128K chunk goes now (trace), and issue 27's batch-1 decode with the fused attention
  step lc_trace 200 python -m atom_jax.bench long-context --prompts 131072 --backends pallas --decode-tokens 4 \
    --trace /tmp/lctr --trace-steps 2 --json "$J/long_context_trace.json"
  step decode_b1 220 python -m atom_jax.bench decode --dp 1 --layers 4 --batches 1 --modes off,on --steps 64 \
    --replay 16 --trace /tmp/dtr --json "$J/decode_b1.json"
  ;;
s14d)  # pipelined key blocks (2-3 stages of 64 keys fit shared memory in 4 pieces?); the best vs default at 128K
  step attention 220 python -m atom_jax.bench attention --iters 5 --json "$J/attention.json" --attention-tiles \
    default,64x64x8x1x0x1x1x4x1x0x1,64x64x8x2x0x1x1x4x0x0x1,64x64x8x2x0x1x1x4x1x0x1,64x64x8x2x0x1x1x2x0x0x1,64x64x8x3x0x1x1x4x0x0x1,64x128x8x2x0x1x1x4x0x0x1
  best=$(python - "$J/attention.json" <<'PY'
import json, sys, collections
rows = json.load(open(sys.argv[1]))["results"]
tot = collections.defaultdict(float); n = collections.Counter()
for r in rows:
    if "ms" in r:  # a chunk's attention: one HCA, one CSA, two sliding layers
        tot[r["tiles"]] += r["ms"] * (2 if r["mode"] == "none" else 1); n[r["tiles"]] += 1
ok = {t: v for t, v in tot.items() if n[t] == 3}
best = min(ok, key=ok.get)
print(best if best != "default" and ok[best] < 0.97 * ok["default"] else "")
PY
)
  echo "best attention tiles: ${best:-default}" | tee -a "$SUMMARY"
  [ -n "$best" ] && step long_context 240 python -m atom_jax.bench long-context --prompts 131072 --backends pallas \
    --decode-tokens 16 --attention-tiles "default,$best" --json "$J/long_context.json"
  ;;
s14f)  # the engine's kernel path (fused RoPE) compiled on the GPU against the full-sequence forward, float32; 128K
  # prefill with 8K and with 16K chunks, same machine
  step tests_engine 200 env JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest python -m pytest -q \
    -p no:cacheprovider tests/test_engine.py -k "incremental and pallas"
  step lc_8k 100 python -m atom_jax.bench long-context --prompts 131072 --backends pallas --decode-tokens 4 \
    --json "$J/long_context_8k.json"
  step lc_16k 100 python -m atom_jax.bench long-context --prompts 131072 --chunk 16384 --backends pallas \
    --decode-tokens 4 --json "$J/long_context_16k.json"
  ;;
n1)  # next session: the sampler per batch (radix 1.7x slower than sorted at b1 in s13: choose by batch?), b64 decode
  step sampler 200 python -m atom_jax.bench sampler --batches 1,8,64,256 --iters 10 --variants default \
    --json "$J/sampler.json"
  step decode_b64 300 python -m atom_jax.bench decode --dp 1 --layers 4 --batches 64 --modes off,on --steps 48 \
    --replay 16 --json "$J/decode_b64.json"
  ;;
s15a)  # session 15: the FP8 indexer scorer (tests, kernel alone, 128K prefill), a larger score budget
  step tests_fp8 150 env JAX_PLATFORMS=cuda python -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_sparse_kernels.py -k "fp8 or compiled_indexer"
  step indexer 120 python -m atom_jax.bench indexer --tokens 8192 --visible 8192,32768 --policies rowselect \
    --scorer pallas-prefill,pallas-fp8 --iters 5 --json "$J/indexer.json"
  step indexer_budget 90 python -m atom_jax.bench indexer --tokens 8192 --visible 32768 --policies rowselect \
    --scorer pallas-prefill,pallas-fp8 --iters 5 --score-budget 67108864 --json "$J/indexer_budget.json"
  step lc 250 python -m atom_jax.bench long-context --prompts 131072 --backends pallas --decode-tokens 4 \
    --indexer-paths auto,fp8 --json "$J/long_context.json"
  ;;
s15b)  # FP8 keys made before the kernel vs in it (is the e4m3 dot itself slow?); 16 warps for the attention kernel;
  # a 4x score budget (fewer, larger indexer calls) at 128K
  step tests_fp8 150 env JAX_PLATFORMS=cuda python -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_sparse_kernels.py -k "fp8"
  step indexer 100 python -m atom_jax.bench indexer --tokens 8192 --visible 32768 --policies rowselect \
    --scorer pallas-prefill,pallas-fp8,pallas-fp8pool --iters 5 --json "$J/indexer.json"
  step attention 130 python -m atom_jax.bench attention --iters 5 --json "$J/attention.json" --attention-tiles \
    default,64x128x16x1x0x1x1x4x1x0x1
  step lc 120 python -m atom_jax.bench long-context --prompts 131072 --backends pallas --decode-tokens 4 \
    --json "$J/long_context.json"
  step lc_budget 120 python -m atom_jax.bench long-context --prompts 131072 --backends pallas --decode-tokens 4 \
    --score-budget 67108864 --json "$J/long_context_budget.json"
  ;;
s15c)  # the indexer's heads path with the next token's queries loaded ahead (prefetch_q); selection tiles;
  # 128K prefill with it (PREFILL_TILES prefetch_q=True in this tree) against BASE (HEAD before it), same machine
  step tests_indexer 120 env JAX_PLATFORMS=cuda python -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_sparse_kernels.py -k "compiled_indexer or decode_batch"
  # pallas-prefill: PREFILL_TILES (prefetch_q on in this tree); pallas with these flags: the same tiles without it
  step indexer_ahead 100 python -m atom_jax.bench indexer --tokens 8192 --visible 8192,32768 --policies rowselect \
    --scorer pallas-prefill,pallas --block-e 256 --num-warps 8 --prefetch-q 0 --iters 5 --json "$J/indexer_ahead.json"
  step indexer_ahead64 80 python -m atom_jax.bench indexer --tokens 8192 --visible 32768 --policies rowselect \
    --scorer pallas-prefill,pallas --block-t 64 --block-e 256 --num-warps 8 --prefetch-q 1 --iters 5 \
    --json "$J/indexer_ahead64.json"
  step select_w1024 60 python -m atom_jax.bench indexer --tokens 8192 --visible 32768 --policies rowselect \
    --scorer none --select-block-w 1024 --iters 5 --json "$J/select_w1024.json"
  step select_default 60 python -m atom_jax.bench indexer --tokens 8192 --visible 32768 --policies rowselect \
    --scorer none --iters 5 --json "$J/select_default.json"
  step lc 110 python -m atom_jax.bench long-context --prompts 131072 --backends pallas --decode-tokens 4 \
    --json "$J/long_context.json"
  step lc_base 110 base python -m atom_jax.bench long-context --prompts 131072 --backends pallas --decode-tokens 4 \
    --json "$J/long_context_base.json"
  ;;
s15d)  # issue 27 at batch 1: the sampler per batch size (radix vs sorted: choose by rows?) and which kernels a
  # b1 decode step launches (command buffers kept under the profiler)
  step sampler 150 python -m atom_jax.bench sampler --batches 1,4,16,64 --iters 10 --variants default,8x1 \
    --json "$J/sampler.json"
  step decode_b1 200 env XLA_FLAGS=--xla_enable_command_buffers_during_profiling=true python -m atom_jax.bench \
    decode --dp 1 --layers 4 --batches 1 --modes on --steps 64 --replay 16 --trace /tmp/dtr --json "$J/decode_b1.json"
  step report 60 bash -c 'python -m atom_jax.trace report "$(ls -d /tmp/dtr/on_b1* | head -1)" --top 80 \
    --json "$0/decode_b1_report.json"' "$J"
  ;;
s15e)  # raw traces for the trace tool's kernel -> HLO op mapping (op_name empty for most kernels in s14's reports):
  # a b1 decode step (command buffers as by default under the profiler) and a 16K prefill chunk, xplane files kept
  step decode_b1 150 python -m atom_jax.bench decode --dp 1 --layers 4 --batches 1 --modes on --steps 16 --replay 0 \
    --trace-steps 4 --trace /tmp/dtr --json "$J/decode_b1.json"
  step lc_trace 150 python -m atom_jax.bench long-context --prompts 16384 --backends pallas --decode-tokens 4 \
    --trace /tmp/lctr --trace-steps 1 --json "$J/long_context_trace.json"
  step keep 30 bash -c 'for d in /tmp/dtr /tmp/lctr; do find $d -name "*.xplane.pb" | head -1 | while read f; do
    gzip -c "$f" >"$0/$(basename $d).xplane.pb.keep.gz"; done; done; ls -la "$0"' "$J"
  ;;
s16a)  # session 16: issue 27 at batch 1 with CONCURRENT command buffers (graph nodes ordered by data only: do
  # the ~280 small kernels' launch gaps overlap?), outputs equal across modes on the GPU, kernels per layer (n2's
  # name mapping on a real trace), host cost per argument count; one raw trace kept
  step cb_outputs 120 env JAX_PLATFORMS=cuda python -m pytest -q -x -p no:cacheprovider tests/test_runner_inputs.py \
    -k command_buffer_modes
  step decode_b1 260 env XLA_FLAGS=--xla_enable_command_buffers_during_profiling=true python -m atom_jax.bench \
    decode --dp 1 --layers 4 --batches 1 --modes on --steps 64 --replay 16 --command-buffers xla,concurrent \
    --trace /tmp/dtr --json "$J/decode_b1.json"
  for cb in xla concurrent; do
    step "report_$cb" 60 bash -c 'python -m atom_jax.trace report "$(ls -d /tmp/dtr/on_b1_cb$1* | head -1)" --top 120 \
      --json "$0/decode_b1_report_$1.json"' "$J" "$cb"
  done
  step leaf_dispatch 60 python scripts/gpu/leaf_dispatch.py
  step keep 30 bash -c 'find /tmp/dtr -path "*cbxla*" -name "*.xplane.pb" | head -1 | while read f; do
    gzip -c "$f" >"$0/decode_b1_xla.xplane.pb.keep.gz"; done; ls -la "$0"' "$J"
  ;;
s16b)  # CONCURRENT graphs made the host the bottleneck at b1 (launch 1.3 ms: the graph's update): the dispatch
  # thread beside them, and XLA's SKIP_TEMP command-buffer update mode (temporaries at stable addresses: fewer
  # node updates per launch) if this jaxlib has it; outputs equal across command-buffer modes on the GPU
  step cb_outputs 120 env JAX_PLATFORMS=cuda python -m pytest -q -x -p no:cacheprovider tests/test_runner_inputs.py \
    -k command_buffer_modes
  step decode_b1 230 env XLA_FLAGS=--xla_enable_command_buffers_during_profiling=true python -m atom_jax.bench \
    decode --dp 1 --layers 4 --batches 1 --modes on,thread --steps 64 --replay 16 --command-buffers xla,concurrent \
    --trace /tmp/dtr --json "$J/decode_b1.json"
  step decode_b1_skiptemp 230 env XLA_FLAGS="--xla_enable_command_buffers_during_profiling=true \
    --xla_gpu_command_buffer_update_mode=SKIP_TEMP" python -m atom_jax.bench decode --dp 1 --layers 4 --batches 1 \
    --modes on,thread --steps 64 --replay 16 --command-buffers xla,concurrent --trace /tmp/dtr2 \
    --json "$J/decode_b1_skiptemp.json"
  ;;
s16c)  # the README's quick start on the GPU (found in s16a: the embedded model's orbax restore failed with no CPU
  # device; fixed in ebc845c) and every GPU-marked test. carry [".gpu", ".whl"]: fastapi, uvicorn, pydantic as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site || exit
  step serve 300 bash scripts/gpu/serve_smoke.sh
  step gpu_tests 280 env JAX_PLATFORMS=cuda python -m pytest -q -m gpu -p no:cacheprovider -rs tests
  ;;
s16d)  # the GPU-marked tests s16c had no time for (it ran fp4_dequant, grouped_gemm, index_topk: 44 passed)
  step gpu_tests_rest 300 env JAX_PLATFORMS=cuda python -m pytest -q -m gpu -p no:cacheprovider -rs \
    tests/test_sparse_kernels.py tests/test_step_program.py tests/test_mhc.py tests/test_moe_route.py tests/test_sampling.py
  step gpu_tests_w4a16 300 env JAX_PLATFORMS=cuda python -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_w4a16_gpu.py
  ;;
n3)  # next session: the per-launch busy share (trace/executions.py, new in s16) on a second machine, default and
  # CONCURRENT command buffers with the dispatch thread; the 7 GPU tests s16 had no time for; raw trace kept
  step gpu_tests_last 200 env JAX_PLATFORMS=cuda python -m pytest -q -m gpu -p no:cacheprovider -rs \
    tests/test_mhc.py tests/test_moe_route.py tests/test_sampling.py
  step decode_b1 260 env XLA_FLAGS=--xla_enable_command_buffers_during_profiling=true python -m atom_jax.bench \
    decode --dp 1 --layers 4 --batches 1 --modes on,thread --steps 64 --replay 16 --command-buffers xla,concurrent \
    --trace /tmp/dtr --json "$J/decode_b1.json"
  step keep 30 bash -c 'find /tmp/dtr -path "*cbxla*" -name "*.xplane.pb" | head -1 | while read f; do
    gzip -c "$f" >"$0/decode_b1_xla.xplane.pb.keep.gz"; done' "$J"
  ;;
s17a)  # issue 19: the fused W4A16 kernel with the swap-AB product at 8K tokens per rank (decoded weights as wgmma's
  # register A operand) beside the seam's decode + bf16 path, same run; then the 7 GPU tests s16 had no time for
  step w4a16_swap_prefill 330 python -m atom_jax.bench w4a16 --tokens 8192 --shapes flash_up,flash_down,pro_up \
    --kernels dequant_pallas_kmajor_transpose --prefill-sweep --json "$J/w4a16_swap_prefill.json"
  step gpu_tests_last 180 env JAX_PLATFORMS=cuda python -m pytest -q -m gpu -p no:cacheprovider -rs \
    tests/test_mhc.py tests/test_moe_route.py tests/test_sampling.py
  ;;
s17b)  # the 7 GPU tests that never finished (s16, s17a): one file a step, each test's stacks dumped after 45 s;
  # then n3's batch-1 decode (per-launch busy share on a second machine)
  for f in test_sampling test_moe_route test_mhc; do
    step "gt_$f" 70 env JAX_PLATFORMS=cuda python -m pytest -v -m gpu -p no:cacheprovider -rs \
      -o faulthandler_timeout=45 --durations=0 "tests/$f.py"
  done
  step decode_b1 260 env XLA_FLAGS=--xla_enable_command_buffers_during_profiling=true python -m atom_jax.bench \
    decode --dp 1 --layers 4 --batches 1 --modes on,thread --steps 64 --replay 16 --command-buffers xla,concurrent \
    --trace /tmp/dtr --json "$J/decode_b1.json"
  step keep 30 bash -c 'find /tmp/dtr -path "*cbxla*" -name "*.xplane.pb" | head -1 | while read f; do
    gzip -c "$f" >"$0/decode_b1_xla.xplane.pb.keep.gz"; done' "$J"
  ;;
s17c)  # the mHC gradient fix (5615e55) on the GPU: test_mhc's GPU tests and the new CPU one; a short train_tiny run
  step gt_test_mhc 150 env JAX_PLATFORMS=cuda python -m pytest -v -p no:cacheprovider -rs -o faulthandler_timeout=60 \
    --durations=0 tests/test_mhc.py -k "on_gpu or unrolled"
  step train_tiny 200 python -m atom_jax.train_tiny --steps 20 --max-files 20 --save-every 1000 --out /tmp/tt_m \
    --work /tmp/tt_w --plot "$J/train_tiny_loss.png"
  ;;
s17d)  # half tails (cf88b2d) at dp=1's ~192 rows per expert: the tiles sweep's dp=1 cases, then the 128K prefill
  # with MID_TILES half_tail (this tree) vs BASE (cf88b2d: MID_TILES = PREFILL_TILES); first the mHC fix's GPU test
  step gt_test_mhc 80 env JAX_PLATFORMS=cuda python -m pytest -q -p no:cacheprovider -rs -o faulthandler_timeout=60 \
    tests/test_mhc.py tests/test_grouped_gemm_gpu.py -k "on_gpu or unrolled or half_tail"
  step gemm_tiles 120 python -m atom_jax.bench gemm --prefill-tiles --tile-cases up_dp1,down_dp1 --budget-s 70 \
    --json "$J/gemm_tiles_dp1.json"
  step lc_half 170 python -m atom_jax.bench long-context --prompts 131072 --backends pallas --decode-tokens 4 \
    --json "$J/lc128k_half_tail.json"
  step lc_base 170 base python -m atom_jax.bench long-context --prompts 131072 --backends pallas --decode-tokens 4 \
    --json "$J/lc128k_base.json"
  ;;
s17e)  # the 128K prefill three ways, one machine: half tails for gathered calls only (this tree), none (.gpu/base
  # = cf88b2d), everywhere in the mid tier (.gpu/base_ht); the dp=1 tile sweep again (its noise); then the GPU tests
  # s17d cut (half tails compiled, the mHC gradient)
  step gemm_tiles 60 python -m atom_jax.bench gemm --prefill-tiles --tile-cases up_dp1,down_dp1 --budget-s 40 \
    --json "$J/gemm_tiles_dp1_b.json"
  for v in gathered:. none:.gpu/base all:.gpu/base_ht; do
    step "lc_${v%%:*}" 110 env PYTHONPATH="$PWD/${v#*:}:$PYTHONPATH" python -m atom_jax.bench long-context \
      --prompts 131072 --backends pallas --decode-tokens 4 --json "$J/lc128k_${v%%:*}.json"
  done
  step gt 120 env JAX_PLATFORMS=cuda python -m pytest -v -p no:cacheprovider -rs tests/test_grouped_gemm_gpu.py \
    tests/test_mhc.py -k "half_tail or on_gpu"
  ;;
s18a)  # (run in session 18 at 0745942; fold_tail lost and was reverted, 23ae3a6) folded tails at dp=1's ~192 rows per expert: the GPU tests, the dp=1 tiles sweep with
  # the fold candidates, then the 128K prefill with MID_TILES folded (scripts/gpu/with_tiles.py) vs today's default
  step gt 120 env JAX_PLATFORMS=cuda python -m pytest -q -p no:cacheprovider -rs tests/test_grouped_gemm_gpu.py \
    -k "tail or pair"
  step gemm_tiles 160 python -m atom_jax.bench gemm --prefill-tiles --tile-cases up_dp1,down_dp1 --budget-s 100 \
    --json "$J/gemm_tiles_dp1_fold.json"
  for spec in ${SPECS:-default 128x256x64x8x4xft}; do
    step "lc_$spec" 115 python scripts/gpu/with_tiles.py "$spec" -- long-context --prompts 131072 --backends pallas \
      --decode-tokens 4 --json "$J/lc128k_$spec.json"
  done
  ;;
s18b)  # 256-row tiles at dp=1 (a ~192-row group in one item): the dp=1 sweep; the 128K prefill with the sweep's
  # best mid tiles (scripts/gpu/with_tiles.py) vs the default when they differ; then n4's train_tiny on the GPU
  step gemm_tiles 120 python -m atom_jax.bench gemm --prefill-tiles --tile-cases up_dp1,down_dp1 --budget-s 80 \
    --json "$J/gemm_tiles_dp1_256.json"
  spec=$(python -c 'import json,sys
from atom_jax.bench.gemm_tiles import best_tiles, tiles_spec
print(tiles_spec(best_tiles(json.load(open(sys.argv[1]))["rows"])))' "$J/gemm_tiles_dp1_256.json" 2>/dev/null)
  echo "best mid tiles: ${spec:-none}" | tee -a "$SUMMARY"
  if [ -n "$spec" ] && [ "$spec" != 128x256x64x8x4 ]; then
    for s in default "$spec"; do
      step "lc_$s" 115 python scripts/gpu/with_tiles.py "$s" -- long-context --prompts 131072 --backends pallas \
        --decode-tokens 4 --json "$J/lc128k_$s.json"
    done
  fi
  step train_tiny 200 python -m atom_jax.train_tiny --steps 30 --max-files 20 --save-every 1000 --out /tmp/tt_m \
    --work /tmp/tt_w --plot "$J/train_tiny_loss.png"
  ;;
s18c)  # the trace tool's kernel -> HLO op mapping on a real GPU trace (one 8K chunk of a 16K prompt: the report's
  # "HLO op known" share and op names), kept raw; then n4's W4A16 decode rows on this machine
  lc_traced 16384 1 lc16k 170
  step w4a16_decode 240 python -m atom_jax.bench w4a16 --tokens 64,256 --shapes flash_up,flash_down \
    --kernels w4a16_kmajor --json "$J/w4a16_decode.json"
  ;;
s18d)  # where the two largest kernels of a prefill chunk stall: ncu on one dp=1 grouped GEMM (down, ~192 rows an
  # expert) and one HCA attention call (8K tokens at 120K), if ncu is here and may read the counters
  step ncu_probe 20 bash -c 'command -v ncu; ncu --version; ls -d /usr/local/cuda*/ /opt/nvidia/nsight-compute* 2>/dev/null'
  if command -v ncu >/dev/null; then
    step ncu_gemm 200 ncu --clock-control none -k regex:grouped_gemm --launch-skip 1 --launch-count 1 --set full \
      python scripts/gpu/one_gemm.py --case down_dp1 --calls 3
    step ncu_attention 200 ncu --clock-control none -k regex:sparse_attention --launch-skip 1 --launch-count 1 \
      --set full python -m atom_jax.bench attention --modes all --iters 2
  fi
  ;;
s18e)  # why the folded tail (0745942, reverted) lost: ncu stall reasons of the dp=1 down GEMM, today's tiles vs folded
  # (.gpu/fold = git archive 0745942 atom_jax), both in one machine
  sec=(--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --section Occupancy --print-details all)
  step ncu_base 150 ncu --clock-control none -k regex:grouped_gemm --launch-skip 1 --launch-count 1 "${sec[@]}" \
    python scripts/gpu/one_gemm.py --case down_dp1 --calls 3 --tiles 128x256x64x8x4
  step ncu_fold 150 env PYTHONPATH="$PWD/.gpu/fold:$PYTHONPATH" ncu --clock-control none -k regex:grouped_gemm \
    --launch-skip 1 --launch-count 1 "${sec[@]}" python scripts/gpu/one_gemm.py --case down_dp1 --calls 3 \
    --tiles 128x256x64x8x4xft
  ;;
s18f)  # where the HCA attention kernel's warps stall, per SASS line (ncu's warp-state sampling with source counters),
  # for the next session's kernel work: one launch of bench attention's `all` mode, the report kept, its SASS table as CSV
  step ncu_att_src 240 ncu --clock-control none -k regex:sparse_attention --launch-skip 1 --launch-count 1 \
    --section WarpStateStats --section SourceCounters --section SpeedOfLight --import-source no -o "$J/att_all" \
    python -m atom_jax.bench attention --modes all --iters 2
  step ncu_att_csv 60 bash -c 'ncu --import "$0/att_all.ncu-rep" --page source --csv --print-source sass \
    >"$0/att_all_sass.csv" && gzip -c "$0/att_all_sass.csv" >"$0/att_all_sass.csv.keep.gz"; ls -la "$0"' "$J"
  ;;
s18g)  # does the GPU idle between the 128K prompt's prefill chunks? three chunks traced (the untraced rate is 60 ms a
  # chunk against ~55 ms of kernels), reported with the session's trace tool (10c67e7), the raw trace kept
  lc_traced 131072 3 lc128k_trace3 200
  ;;
s18h)  # (run at b94827f; tokens_per_dot lost and was removed) the indexer's heads path with 2 or 4 tokens per dot: compiled test at V4 dims,
  # then the prefill scorer + selection at 8K tokens x 32K entries against today's PREFILL_TILES
  step gt 100 env JAX_PLATFORMS=cuda python -m pytest -q -p no:cacheprovider -rs tests/test_sparse_kernels.py \
    -k "compiled_indexer and (heads or tiles2 or tiles4)"
  step indexer 170 python -m atom_jax.bench indexer --tokens 8192 --visible 32768 --policies rowselect --iters 5 \
    --scorer pallas-prefill,pallas-prefill:t2,pallas-prefill:e128:t2,pallas-prefill:e128:t4 \
    --json "$J/indexer_tokens_per_dot.json"
  ;;
n4)  # next session: train_tiny on a GPU after the mHC gradient fix (5615e55; the unrolled backward never compiled),
  # then the W4A16 and bf16 decode rows of issue 19 on a second machine
  step train_tiny 240 python -m atom_jax.train_tiny --steps 30 --max-files 20 --save-every 1000 --out /tmp/tt_m \
    --work /tmp/tt_w --plot "$J/train_tiny_loss.png"
  step w4a16_decode 240 python -m atom_jax.bench w4a16 --tokens 64,256 --shapes flash_up,flash_down \
    --kernels w4a16_kmajor --json "$J/w4a16_decode.json"
  ;;
n2)  # next session, first call: the trace tool's kernel-name mapping on real GPU traces (s15e's steps), then the
  # b1 decode's kernels per layer from the report (which layers' small kernels to cut: issue 27's busy share)
  step decode_b1 150 python -m atom_jax.bench decode --dp 1 --layers 4 --batches 1 --modes on --steps 16 --replay 0 \
    --trace-steps 4 --trace /tmp/dtr --json "$J/decode_b1.json"
  step report 60 bash -c 'python -m atom_jax.trace report "$(ls -d /tmp/dtr/on_b1* | head -1)" --top 120 \
    --json "$0/decode_b1_report.json"' "$J"
  step lc_trace 150 python -m atom_jax.bench long-context --prompts 16384 --backends pallas --decode-tokens 4 \
    --trace /tmp/lctr --trace-steps 1 --json "$J/long_context_trace.json"
  step leaf_dispatch 60 python scripts/gpu/leaf_dispatch.py
  step keep 30 bash -c 'for d in /tmp/dtr /tmp/lctr; do find $d -name "*.xplane.pb" | head -1 | while read f; do
    gzip -c "$f" >"$0/$(basename $d).xplane.pb.keep.gz"; done; done; ls -la "$0"' "$J"
  ;;
s19a)  # (run in session 19 at 15b1ab0; skip_tail and scripts/gpu/mosaic_ab.py were removed after: they lost) the
  # Mosaic grouped GEMM with skip_tail (a 64-row accumulator piece with no stored row issues no wgmmas): GPU tests;
  # mosaic_ab.py beside the Triton kernel at the engine's tiles (8K-token chunk cases); then the 128K prefill with
  # --moe-backend pallas and mosaic, same machine
  step gt 150 env JAX_PLATFORMS=cuda python -m pytest -q -p no:cacheprovider -rs tests/test_grouped_gemm_gpu.py -k mosaic
  step mosaic_ab 150 python scripts/gpu/mosaic_ab.py --json "$J/mosaic_ab.json" --cases ${CASES:-up_dp1,down_dp1,up_dp2,down_dp2}
  for moe in ${MOES:-pallas mosaic}; do
    step "lc_$moe" 130 python -m atom_jax.bench long-context --prompts 131072 --backends pallas --decode-tokens 4 \
      --moe-backend "$moe" --json "$J/lc128k_$moe.json"
  done
  ;;
s19b)  # every GPU-marked test at HEAD (119), files in the order given by FILES (default: all); -v lines show which ran
  step gpu_tests 540 env JAX_PLATFORMS=cuda python -m pytest -v -m gpu -p no:cacheprovider -rs --durations=25 \
    ${FILES:-tests}
  ;;
s22a)  # the MoE's SwiGLU through exp2 (layers.swiglu_clamped, all paths) and plain calls (the down projection) on the
  # Mosaic kernel at ~192 rows per expert (grouped_gemm.MOSAIC_PLAIN_ROWS_PER_GROUP): the grouped GEMMs' GPU tests;
  # the 128K prefill on BASE (c26f2c2), then this tree with every call on Triton (--moe-backend pallas: the SwiGLU
  # change alone) and auto (both), same machine; bench gemm's down shape across rows per expert, Triton vs Mosaic
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv >"$OUT/gpu.txt" 2>&1
  step tests 150 gpu_tests tests/test_grouped_gemm_gpu.py
  step lc_base 150 base python -m atom_jax.bench long-context --prompts 131072 --backends pallas --decode-tokens 4 \
    --moe-backend pallas --json "$J/lc128k_base.json"
  step lc 240 python -m atom_jax.bench long-context --prompts 131072 --backends pallas --decode-tokens 4 \
    --moe-backend pallas,auto --json "$J/lc128k_moe.json"
  step gemm 150 python -m atom_jax.bench gemm --shapes flash_down --tokens 2048,3072,4096,5120,6144,8192 \
    --backends pallas,mosaic,auto --sweep-tokens "" --json "$J/gemm_down.json"
  ;;
n5)  # next session, first call: session 22's review fixes on the GPU (swiglu_clamped divides before multiplying by up;
  # the FP4 dequant path under auto takes auto's bf16 choice, so N-major decoded experts in the window run on Mosaic):
  # the grouped-GEMM, MoE, W4A16 and FP4-decode GPU tests, then the 128K prefill twice per engine (auto only)
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv >"$OUT/gpu.txt" 2>&1
  step tests 240 gpu_tests tests/test_grouped_gemm_gpu.py tests/test_moe_route.py tests/test_w4a16_gpu.py \
    tests/test_fp4_dequant_gpu.py
  step lc128k 150 python -m atom_jax.bench long-context --prompts 131072,131072 --backends pallas --decode-tokens 4 \
    --json "$J/lc128k.json"
  # session 23: half tails on the mid tier again, now that the down call is Mosaic's (auto): they reach the gathered
  # gate / up calls only (session 17: +3-8% on those calls in bench gemm, end to end within one prompt's noise)
  step lc128k_ht 150 python scripts/gpu/with_tiles.py 128x256x64x8x4xht -- long-context --prompts 131072,131072 \
    --backends pallas --decode-tokens 4 --json "$J/lc128k_ht.json"
  ;;
s23a)  # session 23: the one-pass mHC merge + next mixes kernel (kernels/hc_merge_mix.py, models.hyper.after_merge),
  # the last layer's merge for the sampled rows only, half tails on the gathered mid-tier calls (8002674): the mHC GPU
  # tests; bench mhc (XLA vs the kernel's tiles); the 128K prefill, 3 prompts an engine: this tree, this tree with the
  # merge kernel off, BASE (b748c1c: session 22's HEAD), this tree again (the card heats: order effects)
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv >"$OUT/gpu.txt" 2>&1
  step tests 120 gpu_tests tests/test_mhc.py
  step mhc 90 python -m atom_jax.bench mhc --tokens 1024,8192 --json "$J/mhc.json"
  LC="long-context --prompts 131072,131072,131072 --backends pallas --decode-tokens 4"
  step lc 110 python -m atom_jax.bench $LC --json "$J/lc128k.json"
  step lc_jnp 110 python scripts/gpu/with_attrs.py "models.hyper.MERGE_MIX_BACKEND='jnp'" -- $LC --json "$J/lc128k_jnp.json"
  step lc_base 110 base python -m atom_jax.bench $LC --json "$J/lc128k_base.json"
  step lc2 110 python -m atom_jax.bench $LC --json "$J/lc128k_2.json"
  ;;
s23b)  # session 23, after s23a: the mHC GPU tests (the fn halves' accuracy on a GPU, the merge kernel's tolerance at
  # cancellation); the 128K prefill, 3 prompts (this tree: merge kernel off by default); the engine's float32
  # kernel-path parity (the restructured step: the next layer's mHC in finish, the last merge on sampled rows); bench
  # mhc with the kernel split over D chunks; if a tile beats XLA there, the 128K prefill with it on; one chunk traced
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv >"$OUT/gpu.txt" 2>&1
  step tests 90 gpu_tests tests/test_mhc.py
  LC="long-context --prompts 131072,131072,131072 --backends pallas --decode-tokens 4"
  step lc 110 python -m atom_jax.bench $LC --json "$J/lc128k.json"
  step tests_engine 150 env JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest python -m pytest -q \
    -p no:cacheprovider tests/test_engine.py -k "incremental and pallas and not rowselect"
  step mhc 70 python -m atom_jax.bench mhc --tokens 8192 --json "$J/mhc.json"
  best=$(python -c 'import json,sys; r=[x for x in json.load(open(sys.argv[1]))["rows"] if "ms" in x]
j=[x["ms"] for x in r if x["variant"]=="jnp"]; k=sorted((x["ms"],x["variant"]) for x in r if x["variant"]!="jnp")
v=k[0][1] if j and k and k[0][0] < 0.95*j[0] else ""
names=("BLOCK_T","BLOCK_D","NUM_WARPS","NUM_STAGES","CHUNK_D")
print(" ".join(f"kernels.hc_merge_mix.{a}={b}" for a,b in zip(names,v.split("x"))) if v not in ("","default") else v)' \
    "$J/mhc.json" 2>/dev/null)
  echo "best merge kernel tiles vs XLA: '${best}'" | tee -a "$SUMMARY"
  if [ -n "$best" ]; then
    [ "$best" = default ] && best=""
    step lc_kernel 90 python scripts/gpu/with_attrs.py "models.hyper.MERGE_MIX_BACKEND='auto'" $best -- $LC \
      --json "$J/lc128k_kernel.json"
  fi
  lc_traced 131072 1 lc128k_trace 100
  ;;
s23c)  # session 23's last call (~150 s of device time left): issue 26's rows at HEAD with one engine (1M cache): the 4K
  # and 1M prompts' prefill (the 1M prompt at 8K chunks) and decode at 4K and 1M context
  step lc_rows 140 python -m atom_jax.bench long-context --prompts 4096,1048559 --backends pallas --decode-tokens 16 \
    --json "$J/lc_rows.json"
  ;;
s22e)  # s22d's cut engine test, alone (session 22's last ~270 s of device time)
  env JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 python -m pytest -q -p no:cacheprovider \
    tests/test_engine.py -k "incremental and rowselect"
  ;;
s22d)  # the session's final state: the ceilings (old timer: median of 3 batches of 10 after 2 calls; new: best of 5
  # batches of 20 after 0.5 s) three times each in one process; issue 26's acceptance rows (4K, 16K, 128K twice, 1M with
  # a 1M cache; 4K, 16K with a 16K one); the engine's float32 kernel-path parity (SwiGLU through exp2, auto's Mosaic)
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv >"$OUT/gpu.txt" 2>&1
  step ceilings 60 python -c '
import json, jax, jax.numpy as jnp
from atom_jax.bench import timing
a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16); mm = jax.jit(lambda v: v @ v)
rows = []
for _ in range(3):
    old = 2 * 8192 ** 3 / timing.back_to_back_time(mm, [a], iters=10) / 1e12
    rows.append({"old_TFLOPs": old, **timing.device_ceilings()})
    print(json.dumps(rows[-1]), flush=True)
json.dump(rows, open("'"$J"'/ceilings.json", "w"), indent=1)'
  step lc_full 330 python -m atom_jax.bench long-context --prompts 4096,16384,131072,131072,1048559 \
    --baseline-cache-len 16448 --backends pallas --decode-tokens 16 --json "$J/lc_full.json"
  step tests_engine 150 env JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest python -m pytest -q \
    -p no:cacheprovider tests/test_engine.py -k "incremental and pallas"
  ;;
s22c)  # the selection's compaction in tiles of 2,048 entries (topk_select.COMPACT_W, default now; 0 = BLOCK_W's 512,
  # the old kernel): the selection alone and scores + selection at 8K tokens x 32K visible entries per compaction
  # width; the 128K prefill at 512 and 2,048, three prompts each; the GPU tests of the selection
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv >"$OUT/gpu.txt" 2>&1
  for cw in 0 2048 4096; do
    step sel_$cw 75 python -m atom_jax.bench indexer --tokens 8192 --visible 32768 --policies rowselect \
      --scorer none,pallas --select-compact-w $cw --iters 10 --json "$J/indexer_sel_cw$cw.json"
  done
  for cw in 0 2048; do
    step lc_cw$cw 100 python scripts/gpu/with_attrs.py kernels.topk_select.COMPACT_W=$cw -- long-context \
      --prompts 131072,131072,131072 --backends pallas --decode-tokens 4 --json "$J/lc128k_cw$cw.json"
  done
  step tests 150 gpu_tests tests/test_index_topk.py
  ;;
s22b)  # s22a's first call ran neither its tests nor BASE (step could not run shell functions): the grouped GEMMs'
  # GPU tests, then the 128K prompt three times per engine: BASE (c26f2c2), this tree on Triton only, auto
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv >"$OUT/gpu.txt" 2>&1
  step tests 150 gpu_tests tests/test_grouped_gemm_gpu.py tests/test_moe_route.py
  step lc_base 150 base python -m atom_jax.bench long-context --prompts 131072,131072,131072 --backends pallas \
    --decode-tokens 4 --moe-backend pallas --json "$J/lc128k_base_x3.json"
  step lc 240 python -m atom_jax.bench long-context --prompts 131072,131072,131072 --backends pallas --decode-tokens 4 \
    --moe-backend pallas,auto --json "$J/lc128k_moe_x3.json"
  step gemm 150 python -m atom_jax.bench gemm --shapes flash_down --tokens 2048,3072,4096,5120,6144,8192 \
    --backends pallas,mosaic,auto --sweep-tokens "" --json "$J/gemm_down.json"
  ;;
s21d)  # the engine's kernel path at the final default (window_fast, exp2, lazy_sum) against the full-sequence forward,
  # float32, compiled on the GPU (the last ~250 s of the session's device time)
  step tests_engine 140 env JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest python -m pytest -q \
    -p no:cacheprovider tests/test_engine.py -k "incremental and pallas"
  ;;
s21c)  # the default with lazy_sum on (window_fast 1, exp2, lazy_sum) against the window fast path in the sliding
  # kernel alone (..x2x1x1), same machine; the 128K prompt twice per engine; the GPU tests at the final default
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv >"$OUT/gpu.txt" 2>&1
  step attention 100 python -m atom_jax.bench attention --iters 10 --json "$J/attention.json" --attention-tiles \
    default,64x128x8x1x0x1x1x4x1x0x1x2x1x1
  step lc128k 200 python -m atom_jax.bench long-context --prompts 131072,131072 --backends pallas --decode-tokens 4 \
    --attention-tiles default,64x128x8x1x0x1x1x4x1x0x1x2x1x1 --json "$J/lc128k_lazy.json"
  step tests 170 env JAX_PLATFORMS=cuda python -m pytest -q -x -m gpu -p no:cacheprovider tests/test_sparse_kernels.py \
    -k compiled_attention
  ;;
s21b)  # the softmax in base 2 (AttentionTiles.exp2, default now) beside the window fast path alone and the
  # session-20 default, same machine; then the GPU tests of the attention kernel (TILES: both on)
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv >"$OUT/gpu.txt" 2>&1
  # (and the denominator summed once after the loop: AttentionTiles.lazy_sum, ...x1x1x1)
  step attention 150 python -m atom_jax.bench attention --iters 10 --json "$J/attention.json" --attention-tiles \
    64x128x8x1x0x1x1x4x1x0x1,64x128x8x1x0x1x1x4x1x0x1x1,default,64x128x8x1x0x1x1x4x1x0x1x1x1x1
  step lc128k 220 python -m atom_jax.bench long-context --prompts 131072 --backends pallas --decode-tokens 4 \
    --attention-tiles 64x128x8x1x0x1x1x4x1x0x1x1,default,64x128x8x1x0x1x1x4x1x0x1x1x1x1 --json "$J/lc128k_exp2.json"
  step tests 240 env JAX_PLATFORMS=cuda python -m pytest -q -x -m gpu -p no:cacheprovider tests/test_sparse_kernels.py \
    -k compiled_attention
  ;;
s21a)  # the window's one-load fast path (AttentionTiles.window_fast, default now): the GPU tests of the attention
  # kernel at V4-Flash dims, bench attention and the 128K prefill, old default (..x1x0x1) first, same machine
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv >"$OUT/gpu.txt" 2>&1
  step tests 150 env JAX_PLATFORMS=cuda python -m pytest -q -x -m gpu -p no:cacheprovider tests/test_sparse_kernels.py \
    -k compiled_attention
  step attention 120 python -m atom_jax.bench attention --iters 5 --json "$J/attention.json" --attention-tiles \
    64x128x8x1x0x1x1x4x1x0x1,default
  step lc128k 280 python -m atom_jax.bench long-context --prompts 131072 --backends pallas --decode-tokens 4 \
    --attention-tiles 64x128x8x1x0x1x1x4x1x0x1,default --json "$J/lc128k_fast.json"
  ;;
s20a)  # where the 128K prompt's prefill time goes: bench long-context's prefill_detail (add_request, each step's
  # return, the host clock by phase) at 16K and 128K; then every chunk of the 128K prompt but the last traced
  # (per-execution busy and span from `trace report`: which chunks cost more than the linear growth says)
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv >"$OUT/gpu.txt" 2>&1
  step lc128k 200 python -m atom_jax.bench long-context --prompts 16384,131072 --backends pallas --decode-tokens 4 \
    --json "$J/lc128k_detail.json"
  lc_traced 131072 15 lc128k_trace15 240
  step lc128k_c16k 150 python -m atom_jax.bench long-context --prompts 131072 --backends pallas --decode-tokens 4 \
    --chunk 16384 --json "$J/lc128k_c16k_detail.json"
  ;;
s20b)  # the 128K prompt after the add_request fix (two prompts in one engine: the second differs, no prefix hit),
  # 8K chunks, then 16K chunks on the same machine
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv >"$OUT/gpu.txt" 2>&1
  step lc128k_x2 240 python -m atom_jax.bench long-context --prompts 131072,131072 --backends pallas --decode-tokens 4 \
    --json "$J/lc128k_x2.json"
  step lc128k_c16k 150 python -m atom_jax.bench long-context --prompts 131072 --backends pallas --decode-tokens 4 \
    --chunk 16384 --json "$J/lc128k_c16k.json"
  ;;
s20c)  # the 128K prompt after the add_request and lazy-key fixes, three prompts in one engine (none a prefix hit)
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv >"$OUT/gpu.txt" 2>&1
  step lc128k_x3 240 python -m atom_jax.bench long-context --prompts 131072,131072,131072 --backends pallas \
    --decode-tokens 4 --json "$J/lc128k_x3.json"
  ;;
s20d)  # command-buffer variants for the 128K prefill (XLA_FLAGS; the step has 8 graph launches around cub sorts and
  # the rung switch's conditional, 0.57 ms of idle inside each chunk): conditionals and while loops in the graphs,
  # then the concurrent scheduling mode; two prompts each, default first, same machine
  for v in default cond concurrent; do
    case $v in
      default) f="" ;;
      cond) f="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE" ;;
      concurrent) f="--xla_gpu_command_buffer_scheduling_mode=CONCURRENT" ;;
    esac
    step "lc_$v" 150 env XLA_FLAGS="$f" python -m atom_jax.bench long-context --prompts 131072,131072 \
      --backends pallas --decode-tokens 4 --json "$J/lc128k_cb_$v.json"
  done
  ;;
*) echo "unknown part $part"; exit 2 ;;
esac
