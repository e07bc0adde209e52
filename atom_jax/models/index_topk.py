"""The lightning indexer's top-k selection: how a step scores its tokens' visible compressed
entries and selects the top k of each, chosen in ONE place (`plan_topk`) by the step's token
count and the cache capacity. Every policy is exact and keeps the tie rule of
models/cache_reads.py (among equal scores the LOWER entry index wins); only the order of the
selected indices differs (score order for the top_k policies, entry order for "select" and
"rowselect").

Policies:
- "loop": `cache_reads.running_topk` over blocks of `outer_block` entries up to the longest
  visible prefix, each merged into a running top-k (lax.top_k over [T, k + block]). Its trip
  count follows the context, but each iteration is a kernel call plus a top_k (a sort on GPU)
  in sequence: latency bound at small T (16 iterations per CSA layer at a 1M-token decode step).
- "single": ONE scorer call over a width W >= the longest visible prefix, ONE lax.top_k over
  [T, W].
- "two-stage": one scorer call over W; each row cut into sub-blocks of SUB_BLOCK entries, the
  top k of every sub-block (one batched top_k over [T, W / SUB_BLOCK, SUB_BLOCK]), then one
  top_k over the [T, W / SUB_BLOCK * k] survivors. Ties: a sub-block's survivors come out
  lowest index first among equal scores and sub-blocks are concatenated in entry order, so the
  final top_k's lowest-position rule is still the lowest-entry rule.
- "select": one scorer call over W and no sort at all: the k-th largest score of each row is
  found by a radix search over the scores' bits (8 passes; each counts, per row, the entries at
  or above 16 candidate thresholds), then every entry above it plus the lowest-index entries
  equal to it are kept and compacted (cumsum + scatter) in entry order (`select=` of
  `index_topk`: the engine's kernel path passes kernels/topk_select.py's, see "Prefill").
- "rowselect" (prefill): "select" in windows of query rows: at each rung width W the step's
  tokens are cut into windows of R rows (R x W <= SCORE_BUDGET, `row_chunk`; the last window
  padded with rows of no visible entry), each ONE scorer call writing [R, W] and one sort-free
  selection of it, over a static count of windows (lax.map). Selection: `select=` of
  `index_topk` (default `radix_select`; a Pallas kernel may stand in). Rungs x ROW_RUNG_RATIO.
- "flat" (decode at long context): "rowselect" at ONE width, the capacity: no rung switch, so
  nothing in the step branches on the device. On the kernel path the work still follows the
  context: the scorer skips the sub-blocks past a tile's visible prefix and the Pallas selection
  reads each row's visible prefix only (the jnp `radix_select` reads the whole width).

Width of the one-call policies: a ladder of static widths (RUNG_MIN, x RUNG_RATIO, ... up to
the capacity; `lax.switch` takes the smallest rung holding the step's longest visible prefix),
so the work follows the context within a factor RUNG_RATIO, and only rungs with
tokens x width <= SCORE_BUDGET float32 scores exist: longer prefixes fall back to "loop"
("rowselect" keeps every rung and cuts the rows instead).

No device-side branch in a decode step (`auto`, AUTO_SWITCH_FREE): where AUTO_POLICY's plan
would branch on the device (more than one rung: a `lax.switch`, i.e. an XLA conditional, or the
loop with a trip count that follows the data), `auto` plans "flat" instead for steps of at most
AUTO_MAX_TOKENS tokens. XLA's GPU conditional (and such a while loop) copies its branch index
(predicate) to the host and waits for it, so the launch of every decode step past 16K tokens of
context would block until the device reached the first CSA layer's switch, and the host could
not prepare the next step meanwhile (issue 27; `atom_jax.trace.host_sync` lists such ops, and
tests/test_step_program.py keeps them out of the engine's decode step).

Prefill (steps of more than AUTO_MAX_TOKENS tokens): bytes and sorts per policy at T = 8192
tokens, k = 512, each token seeing V = 32K (a 128K-token context) or 128K (512K) entries:
- "single", "two-stage", "select": no rung fits the budget (8192 x 4096 scores > SCORE_BUDGET),
  so they run the loop.
- "loop": blocks of 4096 entries (`outer_block`): V / 4096 = 8 / 32 iterations, each a scorer
  call writing [8192, 4096] float32 (128 MiB) and a lax.top_k over [8192, 4608]: k = 512 is
  past XLA's small-k GPU TopK, so a SORT of 8192 rows of 4608 (value, index) pairs per block:
  8 / 32 sorts, 1 / 4 GiB of scores. Measured on an H200 (docs/benchmarks.md, "the heads
  scorer on every path"): 19 ms at V = 16K (4 blocks), 147 ms at V = 128K (32 blocks), ~4.6 ms
  per block against ~0.7 ms of scorer FLOPs per block: the sorts are most of it.
- "rowselect": width W = V (rungs x2: 32K / 128K), windows of 512 / 128 rows, 16 / 64 scorer
  calls of 64 MiB each: the same 1 / 4 GiB of scores written once, NO sort; the radix search
  reads them 8 times and the compaction ~2 more (jnp `radix_select`: ~10 / 40 GiB, ~2.5 / 10 ms
  at 4 TB/s). The kernel path selects with kernels/topk_select.py instead: a row per program,
  its visible prefix read twice (a lower bound of its k-th score from strided groups' maxima,
  then the entries at or above it: 2 / 8 GiB, mostly from L2), the radix passes over those
  ~k-2k survivors only. The rung switch is one conditional per CSA layer (as for decode), the
  window loop a static trip count. Measured on an H200 (2026-12-01, docs/benchmarks.md, "Sort-free
  prefill top-k"): at 8192 tokens "rowselect" takes 4.4 / 14.0 / 62.8 ms against the loop's
  9.2 / 36.4 / 144.2 ms for 8K / 32K / 128K visible entries (2.1-2.6x), the same selections, so it
  is `auto`'s choice above AUTO_MAX_TOKENS (AUTO_LARGE_POLICY).

The defaults below are meant to be changed after a GPU run of `python -m atom_jax.bench
indexer` (which times every policy against "loop" in one run)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from atom_jax.models.cache_reads import NO_ENTRY, running_topk

POLICIES = ("loop", "single", "two-stage", "select", "rowselect", "flat")

# ---- the defaults (one place; see the module docstring) ------------------------------------
AUTO_POLICY = "single"  # the one-call policy `auto` uses while a rung fits the budget
AUTO_MAX_TOKENS = 512  # steps with more tokens than this use AUTO_LARGE_POLICY under `auto`
AUTO_LARGE_POLICY = "rowselect"  # prefill steps: no sort, 2.1-2.6x the loop on an H200 (module docstring)
# what `auto` plans for a decode step where AUTO_POLICY's plan would branch on the device
# (module docstring); None: AUTO_POLICY's plan as it is (a named policy always is)
AUTO_SWITCH_FREE = "flat"
SCORE_BUDGET = 1 << 24  # float32 scores one scorer call may write ([T, width]: 64 MiB)
RUNG_MIN, RUNG_RATIO = 4096, 4  # widths of the one-call policies: 4K, 16K, 64K, 256K entries...
# "rowselect"'s widths: 4K, 8K, 16K, ... Finer than RUNG_RATIO because its radix passes read the
# whole width (x1.44 the visible prefix on average instead of x2.16), at 2x the branches.
ROW_RUNG_RATIO = 2
SUB_BLOCK = 16384  # "two-stage": entries per sub-block (at least k)
MIN_OUTER_BLOCK, MAX_OUTER_BLOCK = 4096, 16384  # "loop": entries per call and merge
# "loop" over at most this many blocks to the capacity: a static trip count. A data-dependent
# one makes XLA's GPU while loop copy its predicate to the host each iteration, so the launch of
# the step blocks until the device reaches the loop (measured on an H200: a 4-layer prefill step
# took 19 ms to launch, the whole step, so the host could not prepare the next one meanwhile).
# Blocks past the longest visible prefix cost one merge of -inf scores each (the scorer skips
# their sub-blocks).
STATIC_LOOP_TRIPS = 4


@dataclasses.dataclass(frozen=True)
class TopkPlan:
    """method: one of POLICIES; rungs: widths of the one-call branches (ascending; empty for
    "loop"); loop_block: the loop's block for prefixes longer than every rung (0: none);
    loop_trips: the loop's static trip count (blocks to the capacity) when that is at most
    STATIC_LOOP_TRIPS, else 0 (the trip count follows the step's longest visible prefix)."""
    method: str
    rungs: tuple[int, ...] = ()
    loop_block: int = 0
    loop_trips: int = 0
    row_chunks: tuple[int, ...] = ()  # "rowselect": query rows per scorer call, one per rung


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def outer_block(capacity: int, tokens: int, align: int = 128) -> int:
    """The loop's entries per call (and per running top-k merge of [T, k + block]): as many as
    SCORE_BUDGET allows within [MIN_OUTER_BLOCK, MAX_OUTER_BLOCK], at most the capacity rounded
    up to `align` (the kernel's entry tile)."""
    per_token = 1 << max(0, (SCORE_BUDGET // max(tokens, 1)).bit_length() - 1)
    per_token = min(MAX_OUTER_BLOCK, max(MIN_OUTER_BLOCK, per_token))
    return min(per_token, _round_up(capacity, align))


def row_chunk(tokens: int, width: int, align: int = 8) -> int:
    """"rowselect": query rows per scorer call of `width` entries, so one call writes at most
    SCORE_BUDGET scores (at least one row), the step's tokens split into equal chunks (rounded
    up to `align` rows) so the last one is not mostly padding."""
    n = -(-tokens * width // SCORE_BUDGET)  # calls
    rows = -(-tokens // max(n, 1))
    return max(1, min(tokens, _round_up(rows, align) if rows > align else rows))


def plan_topk(tokens: int, capacity: int, k: int, policy: str = "auto", align: int = 128) -> TopkPlan:
    """How a step of `tokens` tokens selects k of at most `capacity` entries per token. `align`:
    widths are multiples of it (the scorer's entry tile)."""
    if policy not in POLICIES + ("auto",):
        raise ValueError(f"unknown indexer top-k policy {policy!r}; known: {['auto', *POLICIES]}")
    if policy == "auto":
        if tokens > AUTO_MAX_TOKENS:
            policy = AUTO_LARGE_POLICY
        else:
            plan = plan_topk(tokens, capacity, k, AUTO_POLICY, align)
            if AUTO_SWITCH_FREE and branches_on_device(plan):
                return plan_topk(tokens, capacity, k, AUTO_SWITCH_FREE, align)
            return plan
    top = _round_up(capacity, align)
    if policy == "flat":
        return TopkPlan("rowselect", (top,), row_chunks=(row_chunk(tokens, top),))
    block = outer_block(capacity, tokens, align)
    trips = -(-capacity // block)
    loop = TopkPlan("loop", (), block, trips if trips <= STATIC_LOOP_TRIPS else 0)
    if policy == "loop":
        return loop
    rungs, w = [], _round_up(max(RUNG_MIN, k), align)
    ratio = ROW_RUNG_RATIO if policy == "rowselect" else RUNG_RATIO
    while w < top:
        rungs.append(w)
        w = _round_up(w * ratio, align)
    rungs.append(top)
    if policy == "rowselect":  # every rung: the rows per call shrink instead
        return TopkPlan(policy, tuple(rungs), row_chunks=tuple(row_chunk(tokens, r) for r in rungs))
    rungs = tuple(r for r in rungs if tokens * r <= SCORE_BUDGET)
    if not rungs:
        return loop
    if rungs[-1] < top:
        return TopkPlan(policy, rungs, loop.loop_block, loop.loop_trips)
    return TopkPlan(policy, rungs)


def branches_on_device(plan: TopkPlan) -> bool:
    """Whether `index_topk` under `plan` decides on the device what runs next: a switch over
    more than one branch (rungs, the loop fallback) or a loop whose trip count follows the data."""
    branches = len(plan.rungs) + (1 if plan.loop_block else 0)
    return branches > 1 or bool(plan.loop_block and not plan.loop_trips)


def index_topk(make_scorer, n_visible, k: int, plan: TopkPlan, select=None):
    """Top-k entry indices per token under `plan`. make_scorer(width) -> (e0 -> [T, width]
    float32 scores of entries e0.. of each token's slot; values at or past a token's visible
    count are ignored); "rowselect" calls make_scorer(width, rows) -> ((e0, r0) -> [rows, width]
    scores of the buffer's tokens r0 .. r0 + rows - 1; rows past T: anything). select(s, k):
    select(s, k, n_valid): the selection of "select" and "rowselect" over [rows, width] scores
    of which the first n_valid [rows] of each row are eligible, `radix_select`'s contract;
    default radix_select (a Pallas kernel may stand in).
    -> (idx [T, k] int32, ok [T, k] bool): ok marks real visible entries, other places hold
    NO_ENTRY."""
    n_visible = n_visible.astype(jnp.int32)
    if plan.method == "rowselect":
        branches = [functools.partial(_row_select, make_scorer(w, r), w, r, k, select or radix_select)
                    for w, r in zip(plan.rungs, plan.row_chunks)]
    else:
        branches = [functools.partial(_one_call, make_scorer(w), w, k, plan.method, select or radix_select)
                    for w in plan.rungs]
    if plan.loop_block:
        branches.append(lambda nv: running_topk(make_scorer(plan.loop_block), nv, k, plan.loop_block,
                                                plan.loop_trips))
    if len(branches) == 1:
        return branches[0](n_visible)
    longest = jnp.max(n_visible, initial=0)
    # a few rungs: compare all (jnp's default searchsorted is a while loop of tiny GPU kernels)
    i = jnp.minimum(jnp.sum(jnp.asarray(plan.rungs, jnp.int32) < longest), len(branches) - 1)
    return jax.lax.switch(i, branches, n_visible)


def _one_call(scorer, width: int, k: int, method: str, select, n_visible):
    t = n_visible.shape[0]
    if method == "select":
        idx = select(scorer(0), k, n_visible)
    else:
        e = jnp.arange(width, dtype=jnp.int32)
        s = jnp.where(e[None, :] < n_visible[:, None], scorer(0), -jnp.inf)
        if method == "two-stage" and width > max(SUB_BLOCK, k):
            sub = max(SUB_BLOCK, k)
            nb = -(-width // sub)
            s = jnp.pad(s, ((0, 0), (0, nb * sub - width)), constant_values=-jnp.inf)
            v, j = jax.lax.top_k(s.reshape(t * nb, sub), k)  # each sub-block's survivors
            j = (j.reshape(t, nb, k) + (jnp.arange(nb, dtype=jnp.int32) * sub)[:, None]).reshape(t, nb * k)
            v, jj = jax.lax.top_k(v.reshape(t, nb * k), k)
            idx = jnp.take_along_axis(j, jj, axis=1)
        elif method in ("single", "two-stage"):
            v, idx = jax.lax.top_k(s, k)
        else:
            raise ValueError(f"{method!r} is not a one-call policy")
        idx = jnp.where(v > -jnp.inf, idx.astype(jnp.int32), NO_ENTRY)
    return idx, idx < n_visible[:, None]


def _row_select(scorer, width: int, rows: int, k: int, select, n_visible):
    """"rowselect" at one width: the step's rows in chunks of `rows` (the last one padded with
    rows of no visible entry), each ONE scorer call and one sort-free selection, over a static
    count of chunks (lax.map: a loop whose trip count XLA knows)."""
    t = n_visible.shape[0]
    n = -(-t // rows)
    nv = jnp.pad(n_visible, (0, n * rows - t))

    def chunk(r0):
        return select(scorer(0, r0), k, jax.lax.dynamic_slice_in_dim(nv, r0, rows))

    if n == 1:
        idx = chunk(jnp.int32(0))
    else:
        idx = jax.lax.map(chunk, jnp.arange(n, dtype=jnp.int32) * rows).reshape(n * rows, k)[:t]
    return idx, idx < n_visible[:, None]


def _ordered_keys(s):
    """float32 -> uint32 whose unsigned order is the floats' order (-inf lowest)."""
    bits = jax.lax.bitcast_convert_type(s, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | np.uint32(1 << 31))


def radix_select(s, k: int, n_valid=None, digit_bits: int = 4):
    """Indices of the k largest entries of each row of s [T, W] float32 (-inf: not eligible),
    lowest index first among equal scores, listed in entry order; NO_ENTRY fills rows with fewer
    than k eligible entries. n_valid [T]: only each row's first n_valid entries are eligible
    (the others may hold anything). No sort: tau, the k-th largest ordered key of a row, is the
    largest threshold with at least k keys at or above it, built digit by digit from the top
    bit."""
    if n_valid is not None:
        s = jnp.where(jnp.arange(s.shape[1])[None, :] < n_valid[:, None], s, -jnp.inf)
    t, width = s.shape
    if width < k:
        raise ValueError(f"{width} entries cannot hold a top-{k}")
    key = _ordered_keys(s)
    tau = jnp.zeros((t,), jnp.uint32)
    digits = jnp.arange(1 << digit_bits, dtype=jnp.uint32)
    for shift in range(32 - digit_bits, -1, -digit_bits):
        cand = tau[:, None] | (digits << shift)[None, :]  # [T, 2^bits], ascending
        count = jnp.sum(key[:, None, :] >= cand[:, :, None], axis=2)  # non-increasing along digits
        d = jnp.sum(count >= k, axis=1) - 1  # the largest digit keeping >= k keys (0 always does)
        tau = tau | (d.astype(jnp.uint32) << shift)
    above = key > tau[:, None]
    tie = key == tau[:, None]
    need = k - jnp.sum(above, axis=1, dtype=jnp.int32)
    tie_rank = jnp.cumsum(tie, axis=1, dtype=jnp.int32) - tie
    keep = (above | (tie & (tie_rank < need[:, None]))) & (s > -jnp.inf)
    col = jnp.where(keep, jnp.cumsum(keep, axis=1, dtype=jnp.int32) - 1, k)
    rows = jnp.arange(t, dtype=jnp.int32)[:, None]
    e = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (t, width))
    return jnp.full((t, k), NO_ENTRY, jnp.int32).at[rows, col].set(e, mode="drop")
