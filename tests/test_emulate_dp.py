"""dp emulation (atom_jax/sharding/emulate.py, `bench dp-step --emulate-dp N`): two simulated
devices each run one rank of dp=4 and compute what ranks 0 and 1 of the real dp=4 step on four
devices compute, given the same inputs and a model whose other experts (those of ranks 2, 3,
which no emulating device holds) are zero. The collectives move a dp=4 rank's volume."""

from __future__ import annotations

import numpy as np
import pytest

from atom_jax.config import tiny
from atom_jax.loader import random_model
from atom_jax.sharding import StepOptions, make_dp_mesh, make_step, shard_tokens
from atom_jax.sharding.emulate import check_emulation

N, M, ROWS, SEQ = 4, 2, 2, 8  # emulate dp=4 on 2 devices; 16 tokens per rank


@pytest.fixture(scope="module")
def model():
    m = random_model(tiny(), seed=int(np.random.SeedSequence().entropy % 2**31))
    held = M * m.cfg.n_routed_experts // N
    for block in m.layers:  # the experts of ranks M..N-1 contribute nothing
        for name in ("w1", "w2", "w3"):
            p = getattr(block.ffn, name)
            p[...] = p[...].at[held:].set(0)
    return m


@pytest.mark.parametrize("tbo", [False, True])
def test_emulated_ranks_equal_the_real_dp_step(model, tbo):
    ids = np.random.default_rng().integers(1, model.cfg.vocab_size, size=(N * ROWS, SEQ))
    opts = StepOptions(output="hidden")
    real_mesh, emu_mesh = make_dp_mesh(N), make_dp_mesh(M)
    real_step, real_params = make_step(model, real_mesh, opts)
    real = np.asarray(real_step(real_params, shard_tokens(ids, real_mesh), tbo=tbo))
    emu_step, emu_params = make_step(model, emu_mesh, opts, emulate_dp=N)
    # each device holds one dp=4 rank's experts: 8 / 4 = 2
    w1 = emu_params["layers"][0]["ffn"]["w1"]
    assert [s.data.shape[0] for s in w1.addressable_shards] == [2, 2]
    x = shard_tokens(ids[: M * ROWS], emu_mesh)
    emu = np.asarray(emu_step(emu_params, x, tbo=tbo))
    np.testing.assert_allclose(emu, real[: M * ROWS], rtol=1e-5, atol=1e-6)
    # the volume of a dp=4 rank: per all-gather each device contributes (N - 1) x T rows
    # (T = the chain's tokens) and holds N x T after it
    t = ROWS * SEQ // (2 if tbo else 1)
    hlo = emu_step.lower(emu_params, x, tbo=tbo).as_text()
    assert f"tensor<{M * (N - 1) * t}x" in hlo and "all_gather" in hlo


def test_emulation_checks_its_shapes():
    check_emulation(256, 2, 8, "expert")
    for args in ((256, 2, 8, "intermediate"), (256, 1, 8, "expert"), (256, 3, 8, "expert"), (256, 4, 2, "expert")):
        with pytest.raises(ValueError):
            check_emulation(*args)
