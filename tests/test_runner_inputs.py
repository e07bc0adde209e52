"""The model runner's host-to-device path: each step sends one input block and writes only the
page-table entries that changed on the device (the whole table when more changed than a step
carries, or before a restore), so the device's page table always equals the host's."""

from __future__ import annotations

import functools

import numpy as np

from atom_jax.engine import Engine, EngineConfig, SamplingParams
from atom_jax.engine.runner import input_block_len
from failing_launch import first_launch_fails


def test_device_page_table_follows_the_host_table():
    # 16-token pages: a 144-token first chunk takes 9 pages, two of them in one step overflow
    # the 16 entries a step carries (whole-table upload); decodes then add one entry at a time
    eng = Engine(EngineConfig(num_slots=2, num_pages=40, page_tokens=16, max_pages_per_seq=16,
                              max_tokens_per_step=288, chunk_size=144, buckets=(288,),
                              enable_prefix_caching=False))
    runner = eng.runner
    assert runner.page_updates == 16
    for tbo in (False, True):  # what bench hlo-ops builds the step program from (abstract shapes)
        assert input_block_len(runner.layout, runner.dp, 288, tbo) == runner._input_block(
            runner.empty_inputs(288, tbo), None).size
    kinds = []
    real = runner._update_page_table

    def spy(page_rows):
        out = real(page_rows)
        kinds.append("none" if not page_rows else "table" if out is None else "entries")
        return out

    runner._update_page_table = spy
    rng = np.random.default_rng()
    for n, new in ((170, 8), (150, 4), (40, 4)):  # the third reuses a slot with a longer row
        eng.add_request(prompt_token_ids=list(map(int, rng.integers(0, 256, n))),
                        params=SamplingParams(max_tokens=new, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
        np.testing.assert_array_equal(np.asarray(runner._page_table_dev), runner.page_table)
    assert {"table", "entries"} <= set(kinds), kinds
    # a row that shrank was zeroed past its pages
    for (r, slot), pages in runner._row_pages.items():
        assert not runner.page_table[r, slot, len(pages):].any()


def test_a_launch_failing_in_the_dispatch_thread_fails_its_requests_and_the_engine_recovers():
    # the first launch (both prefills: slot 0 gets pages [0, 1], slot 1 page [2]) fails before
    # its rows reach the table; the next request gets slot 0 and pages [0, 1] again, so its row
    # must be sent again (`ModelRunner.forget_rows`), or it would run on an empty row
    eng = Engine(EngineConfig(num_slots=2, num_pages=8, page_tokens=16, max_pages_per_seq=4,
                              max_tokens_per_step=32, chunk_size=32, buckets=(32,), dispatch_thread=True,
                              enable_prefix_caching=False))
    rng = np.random.default_rng()
    prompts = [list(map(int, rng.integers(0, 256, n))) for n in (20, 9, 20)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    with first_launch_fails(eng):  # on the dispatch thread
        outs = eng.generate(prompts[:2], params)
    assert [o.finish_reason for o in outs] == ["error", "error"], outs
    assert all("launch fell over" in o.error for o in outs)
    assert [(r.pages.num_free, r.slots.num_free) for r in eng.scheduler.ranks] == [(8, 2)]
    got = eng.generate([prompts[2]], params)[0].token_ids
    assert eng.runner.page_table[0, 0, :2].tolist() == [0, 1]
    np.testing.assert_array_equal(np.asarray(eng.runner._page_table_dev), eng.runner.page_table)
    eng.close()
    eng.config.overlap_schedule = False  # the oracle: the synchronous loop
    assert eng.generate([prompts[2]], params)[0].token_ids == got


def test_the_first_steps_page_table_is_not_the_host_table(monkeypatch):
    # on CPU, device_put may alias (not copy) a numpy array (here it always does): the table
    # placed at construction must be a copy, or the first step (which sends only the changed
    # entries) runs on the host table, which the host rewrites for the next step while the
    # first one may not have run yet
    import atom_jax.engine.runner as runner_mod
    from atom_jax.cache import CacheLayout
    from atom_jax.config import tiny
    from atom_jax.loader import random_model
    from atom_jax.sharding import make_dp_mesh

    monkeypatch.setattr(runner_mod, "place", lambda x, sharding: x)  # zero-copy placement
    layout = CacheLayout(num_slots=2, num_pages=8, page_tokens=16, max_pages_per_seq=4)
    runner = runner_mod.ModelRunner(random_model(tiny(), seed=0), make_dp_mesh(1), layout)
    seen = []

    def step(params, cache, page_table, last_out, block, tbo):
        seen.append((page_table, np.array(page_table)))  # the table, and its contents at dispatch
        return cache, np.array(page_table), last_out

    runner.program = lambda bucket, tbo: functools.partial(step, tbo=tbo)  # the step stands in for the program
    rows = runner_mod.SamplingRows(*(np.zeros(0, t) for t in (np.int32, np.float32, np.int32, np.float32,
                                                               np.uint32, np.uint32)))
    for page_rows in ([(0, 1, np.array([3, 4], np.int32))], [(0, 1, np.array([5], np.int32))]):
        runner.run(runner_mod.StepInputs(16, False, [[]], page_rows, rows))
    table, at_dispatch = seen[0]
    assert not at_dispatch.any()  # the entries come in the input block, the device writes them
    np.testing.assert_array_equal(table, at_dispatch)  # the 2nd step's rows never reach it


def test_small_buckets_sample_only_the_rows_they_can_hold():
    """A step of `bucket` tokens per rank computes logits and samples for min(bucket, num_slots)
    rows per rank, not for every slot: decode at bucket 4 with 8 slots (sequences on both of
    2 ranks, the second rank's rows remapped) gives the tokens a bucket holding every slot
    gives, greedy and seeded sampling alike."""
    rng = np.random.default_rng()
    prompts = [list(map(int, rng.integers(0, 256, n))) for n in (9, 14, 5, 11, 7, 3)]
    params = [SamplingParams(max_tokens=5, ignore_eos=True),
              SamplingParams(max_tokens=5, ignore_eos=True, temperature=0.9, top_p=0.8, seed=7)]
    outs = []
    for buckets in ((4, 32), (32,)):
        eng = Engine(EngineConfig(dp=2, num_slots=8, num_pages=16, page_tokens=16, max_pages_per_seq=4,
                                  max_tokens_per_step=32, chunk_size=32, buckets=buckets,
                                  enable_prefix_caching=False))
        outs.append([o.token_ids for p in params for o in eng.generate(prompts, p)])
        eng.close()
    assert outs[0] == outs[1]


def test_small_buckets_with_tbo_and_several_chunks_per_rank():
    """The row remap under TBO with prefix caching: 16 slots, a 4-token bucket per rank below
    the slot count (its steps sample up to 4 chunks per rank, split between TBO's halves), 4-token
    chunks; the second round restores cached pages. Equals one bucket holding every slot (and
    fails without the remap)."""
    rng = np.random.default_rng()
    prompts = [list(map(int, rng.integers(0, 256, n))) for n in (9, 21, 5, 19, 7, 3, 2, 6)]
    params = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.9, top_p=0.8, seed=3)
    outs = []
    for buckets in ((4, 16), (16,)):
        eng = Engine(EngineConfig(dp=2, num_slots=16, num_pages=48, page_tokens=16, max_pages_per_seq=2,
                                  max_tokens_per_step=16, chunk_size=4, buckets=buckets, tbo=True))
        outs.append([o.token_ids for _ in range(2) for o in eng.generate(prompts, params)])
        assert eng.stats()["prefix_cache"]["hit_tokens"] > 0
        eng.close()
    assert outs[0] == outs[1]


def test_a_chunk_without_tokens_is_refused():
    """The decode step samples at most one row per token of the bucket (min(bucket, slots) per
    rank): every chunk holds a token, so a chunk of none (which would also sample the token
    before it) is refused, with or without the TBO split."""
    import pytest

    from atom_jax.cache import pack_chunks

    chunks = [(0, 4, [5], True), (1, 0, [], True)]
    for split in (False, True):
        with pytest.raises(ValueError, match="no tokens"):
            pack_chunks(chunks, 4, 8, split=split)
    b = pack_chunks([(0, 4, [5], True), (1, 0, [6, 7, 8], True)], 4, 8, split=True)
    assert b.num_samples == 2 and list(b.sample_idx[:2]) == [0, 3]


def test_command_buffer_modes_name_their_compile_options_and_keep_outputs():
    """--command-buffers: every choice maps to the step program's XLA options ("off" clears the
    GPU command-buffer set; a no-op on CPU), the runner rebuilds its program when switched, and
    greedy outputs do not change; an unknown mode is refused by name."""
    import pytest

    from atom_jax.engine.args import COMMAND_BUFFERS
    from atom_jax.engine.runner import COMMAND_BUFFER_OPTIONS, device_step_program

    assert set(COMMAND_BUFFERS) == set(COMMAND_BUFFER_OPTIONS)
    assert COMMAND_BUFFER_OPTIONS["off"] == {"xla_gpu_enable_command_buffer": ""}
    assert COMMAND_BUFFER_OPTIONS["concurrent"] == {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}
    rng = np.random.default_rng()
    prompts = [list(map(int, rng.integers(0, 256, n))) for n in (23, 9)]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    outs = {}
    for mode in COMMAND_BUFFERS:
        eng = Engine(EngineConfig(num_slots=2, num_pages=16, page_tokens=16, max_pages_per_seq=4,
                                  max_tokens_per_step=32, chunk_size=32, buckets=(32,), command_buffers=mode))
        assert eng.runner.command_buffers == mode
        outs[mode] = [o.token_ids for o in eng.generate(prompts, params)]
    assert outs["off"] == outs["xla"] == outs["concurrent"]
    runner = eng.runner
    runner.precompile([(32, False)], workers=1)
    assert runner._compiled
    runner.use_command_buffers("xla")  # a switch drops what was built with the other options
    assert runner.command_buffers == "xla" and not runner._compiled
    with pytest.raises(ValueError, match="unknown command_buffers 'graphs'"):
        device_step_program(runner.model, runner.mesh, runner.layout, runner.opts, "graphs")


def test_a_failed_launch_makes_the_next_launch_upload_the_host_table(monkeypatch):
    # the overlap schedule with the dispatch thread prepares step N+1 (its page-table entries
    # computed against the host table, which already holds step N's rows) before step N's
    # launch fails: step N's entries never reached the device, so step N+1's launch must
    # upload the host table whole rather than trust its entries alone
    import atom_jax.engine.runner as runner_mod
    from atom_jax.cache import CacheLayout
    from atom_jax.config import tiny
    from atom_jax.loader import random_model
    from atom_jax.sharding import make_dp_mesh

    layout = CacheLayout(num_slots=2, num_pages=8, page_tokens=16, max_pages_per_seq=4)
    runner = runner_mod.ModelRunner(random_model(tiny(), seed=0), make_dp_mesh(1), layout)
    seen = []

    def step(params, cache, page_table, last_out, block, tbo):
        seen.append(np.array(page_table))  # the device table the program starts from
        if len(seen) == 1:
            raise RuntimeError("launch fell over")
        return cache, page_table, last_out

    runner.program = lambda bucket, tbo: functools.partial(step, tbo=tbo)  # the step stands in for the program
    rows = runner_mod.SamplingRows(*(np.zeros(0, t) for t in (np.int32, np.float32, np.int32, np.float32,
                                                               np.uint32, np.uint32)))
    first = runner.prepare(runner_mod.StepInputs(16, False, [[]], [(0, 1, np.array([3, 4], np.int32))], rows))
    second = runner.prepare(runner_mod.StepInputs(16, False, [[]], [(0, 0, np.array([5], np.int32))], rows))
    assert first.table is None and second.table is None  # both carry entries only
    try:
        runner.launch(first)
    except RuntimeError:
        pass
    runner.launch(second)
    assert not seen[0].any()
    np.testing.assert_array_equal(seen[1][0, 1], [3, 4, 0, 0])  # the failed step's row, from the host
    third = runner.prepare(runner_mod.StepInputs(16, False, [[]], [], rows))
    runner.launch(third)
    np.testing.assert_array_equal(seen[2], runner.page_table)  # the device table is the host table again
