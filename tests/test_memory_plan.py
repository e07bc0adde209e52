"""The memory plan's window-state pool (prefix caching) never holds more pages than the plan
has: its default (4 per slot) and an explicit size are capped at the pages that fit beside it,
or at the engine's --num-pages."""

from __future__ import annotations

import jax.numpy as jnp

from atom_jax.config import tiny
from atom_jax.sharding.memory import kv_bytes, memory_plan, weight_bytes


def test_window_state_pool_is_capped_at_the_pages_of_the_plan():
    cfg, pt, slots = tiny(), 16, 8
    per_token, per_slot, per_state = kv_bytes(cfg, pt, jnp.bfloat16)
    per_page = per_token * pt
    weights = sum(weight_bytes(cfg, 1, "bf16", jnp.bfloat16).values())
    room = 80  # pages that fit when no window state is kept
    gpu = int(weights + slots * per_slot + room * per_page + per_page / 2)

    def plan(**kw):
        return memory_plan(cfg, 1, "bf16", gpu, jnp.bfloat16, page_tokens=pt, num_slots=slots, reserve_bytes=0, **kw)

    def pages(p):
        return p.kv_tokens_per_gpu // pt

    # the oracle: the most pages' state that fits with at least as many pages beside it
    best = max(s for s in range(4 * slots + 1) if s <= (gpu - weights - slots * per_slot - s * per_state) // per_page)
    assert 0 < best < 4 * slots  # the scenario: the default would not fit
    default = plan()
    assert default.state_pages == best and pages(default) >= best and default.kv_budget_bytes >= 0
    assert plan(state_pages=1000).state_pages == best
    assert plan(state_pages=3).state_pages == 3 and pages(plan(state_pages=3)) == (room * per_page - 3 * per_state) // per_page
    # the engine's --num-pages caps it too (as EngineConfig.state_pages does)
    assert plan(num_pages=5).state_pages == 5 and plan(num_pages=5, state_pages=9).state_pages == 5
    assert plan(prefix_caching=False).state_pages == 0 and pages(plan(prefix_caching=False)) == room
    roomy = memory_plan(cfg, 1, "bf16", 2**34, jnp.bfloat16, page_tokens=pt, num_slots=slots, reserve_bytes=0)
    assert roomy.state_pages == 4 * slots  # uncapped where the pages are there


def test_engine_plan_caps_the_pool_at_its_num_pages():
    from atom_jax.engine import EngineConfig
    from atom_jax.sharding.memory import engine_memory_plan

    config = EngineConfig(num_slots=64, num_pages=16, page_tokens=16, compilation_cache_dir=None)
    assert config.state_pages() == 16  # what the engine's cache layout gets
    assert engine_memory_plan(config, gpu_bytes=2**34).state_pages == 16  # (8 GiB reserved)
