"""dp emulation: M real devices each run one rank of a dp=N model (N > M) with that rank's real
shapes, so a host of 2 GPUs can measure what a rank of dp=8 does (`bench dp-step --emulate-dp`).

Device e plays rank e of N. Per layer and chain of T tokens it runs what rank e would:
attention on its own T tokens; an all-gather after which it holds N x T tokens (in rank order:
the M real ranks' tokens, then (N - M) x T stand-in tokens) having received (N - 1) x T rows
over the link; the grouped GEMM of its E / N experts over all N x T tokens; and a
reduce-scatter that sends (N - 1) x T rows of partial sums and receives as many, keeping its
own T rows. The stand-in tokens are copies of each sender's own tokens (real routing
statistics); their results are dropped. On an NVSwitch host a GPU's link bandwidth does not
depend on how many peers send to it, so the per-rank volume is the fair part to emulate.

Left out: switch contention and stragglers among N ranks; the sender-side copy of the
stand-in rows (one local copy of (N - 1) x T rows per all-gather, not in a real step); with M
devices only experts of ranks 0..M-1 exist, so a token's choices of other ranks' experts add
nothing (the real step would add their results). With those experts' weights zero the real
dp=N step computes exactly what the emulation does for ranks 0..M-1 (tests/test_emulate_dp.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from atom_jax.sharding.mesh import DP
from atom_jax.sharding.overlap import RankStep, pack_rows, unpack_rows
from atom_jax.sharding.placement import BY_EXPERT, param_specs


def check_emulation(n_experts: int, real_dp: int, virtual_dp: int, expert_mode: str) -> None:
    if expert_mode != BY_EXPERT:
        raise ValueError("dp emulation shards experts by expert (expert_mode 'expert')")
    if real_dp < 2 or virtual_dp < real_dp:
        raise ValueError(f"emulating dp={virtual_dp} needs 2 <= devices ({real_dp}) <= dp")
    if (virtual_dp - 1) % (real_dp - 1):
        raise ValueError(f"emulated dp={virtual_dp} on {real_dp} devices: each peer must send an equal share "
                         f"of the (dp - 1) missing ranks' tokens ((dp - 1) % (devices - 1) == 0)")
    if n_experts % virtual_dp:
        raise ValueError(f"{n_experts} experts do not split over emulated dp={virtual_dp}")


def held_experts(n_experts: int, real_dp: int, virtual_dp: int) -> int:
    """Experts the M devices hold together: those of ranks 0..M-1 of dp=N."""
    return real_dp * (n_experts // virtual_dp)


class EmulatedDP:
    """Mixin over a RankStep: dispatch / experts / combine of rank `axis_index` of dp=N."""

    def __init__(self, *args, virtual_dp: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.virtual_dp = virtual_dp

    def _share(self, t: int) -> int:
        """Rows each device contributes to a collective: (N - 1) x T over M - 1 peers."""
        return (self.virtual_dp - 1) * t // (self.dp - 1)

    def dispatch(self, chain):
        mid = chain.mid
        extras = [mid.weights, mid.idx] if self.opts.gather_routing else [chain.ids[:, None]]
        own = pack_rows([mid.x, *extras])
        t, m = own.shape[0], self.dp
        s = self._share(t)
        sent = jnp.tile(own, (s // t, 1))  # own tokens + stand-ins for (N - M) ranks
        g = jax.lax.all_gather(sent, DP, axis=0, tiled=True)  # [M * s]
        me = jax.lax.axis_index(DP)
        real = [g[j * s: j * s + t] for j in range(m)]
        stand_in = [jax.lax.dynamic_slice_in_dim(g, ((me + k) % m) * s + t, s - t) for k in range(1, m)]
        packed = jnp.concatenate(real + stand_in, axis=0)  # [N * t] in rank order
        parts = unpack_rows(packed, [mid.x, *extras])
        if self.opts.gather_routing:
            return {"x": parts[0], "weights": parts[1], "idx": parts[2]}
        return {"x": parts[0], "ids": parts[1][:, 0]}

    def expert_offset(self):
        return jax.lax.axis_index(DP) * (self.cfg.n_routed_experts // self.virtual_dp)

    def combine(self, partial):
        m = self.dp
        t = partial.shape[0] // self.virtual_dp
        s = self._share(t)
        real = [partial[j * t: (j + 1) * t] for j in range(m)]
        rest = partial[m * t:]  # the stand-in ranks' rows, (M - 1) x (s - t)
        fill = [rest[k * (s - t): (k + 1) * (s - t)] for k in range(m - 1)]
        blocks = [jnp.concatenate([real[j], fill[j % (m - 1)]], axis=0) for j in range(m)]
        out = jax.lax.psum_scatter(jnp.concatenate(blocks, axis=0), DP, scatter_dimension=0, tiled=True)
        return out[:t]


def emulated(rank_step_cls: type[RankStep]) -> type[RankStep]:
    """`rank_step_cls` running as one rank of an emulated dp=N (construct with virtual_dp=N)."""
    return type("Emulated" + rank_step_cls.__name__, (EmulatedDP, rank_step_cls), {})


def emulated_params(params, mesh, virtual_dp: int):
    """A dp=N model's parameters (any placement) as the M devices of `mesh` hold them when
    emulating dp=N: the expert stacks cut to ranks 0..M-1's experts, sharded by expert."""
    m = mesh.shape[DP]
    specs = param_specs(params, BY_EXPERT)

    def cut(x, spec):
        if spec != P():
            x = x[: held_experts(x.shape[0], m, virtual_dp)]
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(cut, params, specs)
