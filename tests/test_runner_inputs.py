"""The model runner's host-to-device path: each step sends one input block and writes only the
page-table entries that changed on the device (the whole table when more changed than a step
carries, or before a restore), so the device's page table always equals the host's."""

from __future__ import annotations

import numpy as np

from atom_jax.engine import Engine, EngineConfig, SamplingParams


def test_device_page_table_follows_the_host_table():
    # 16-token pages: a 144-token first chunk takes 9 pages, two of them in one step overflow
    # the 16 entries a step carries (whole-table upload); decodes then add one entry at a time
    eng = Engine(EngineConfig(num_slots=2, num_pages=40, page_tokens=16, max_pages_per_seq=16,
                              max_tokens_per_step=288, chunk_size=144, buckets=(288,),
                              enable_prefix_caching=False))
    runner = eng.runner
    assert runner.page_updates == 16
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
