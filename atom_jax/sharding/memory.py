"""The memory plan of a DP deployment, from shapes alone (nothing is allocated): weight bytes per
GPU (experts sharded over dp, everything else replicated), KV-cache bytes per token and per
sequence slot, and how many tokens of KV fit in what is left of a GPU.

The cache has a paged part (compressed entries: grows with tokens), a per-slot part (the
sliding-window ring and the compressor tails: fixed per resident sequence) and, with prefix
caching, the window-state pool (a fixed number of pages' window state, by default
STATE_PAGES_PER_SLOT per slot, never more than the pages the plan has); all come from `cache.layout.init_layer_cache` through
`jax.eval_shape`, so the plan follows the cache code."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from atom_jax.cache.layout import CacheLayout, init_cache
from atom_jax.config import ModelConfig
from atom_jax.loader import abstract_model
from atom_jax.scheduler.pages import default_state_pages
from atom_jax.sharding.mesh import DP
from atom_jax.sharding.placement import BY_EXPERT, param_specs

GiB = 1024 ** 3


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    dp: int
    weights: str
    weight_bytes_per_gpu: int
    weight_bytes_by_part: dict  # per GPU: experts / attention / shared / embed+head / other
    kv_bytes_per_token: float  # paged compressed entries, all layers
    kv_bytes_per_slot: int  # ring + compressor tails, all layers
    gpu_bytes: int
    reserve_bytes: int  # activations, workspace, compiled programs (an engine's: its largest step's temporaries)
    num_slots: int
    state_pages: int = 0  # prefix caching: pages whose window state is kept at once
    state_bytes_per_page: int = 0  # one page's window state (ring rows, CSA tails), all layers

    @property
    def state_bytes(self) -> int:
        return self.state_pages * self.state_bytes_per_page

    @property
    def kv_budget_bytes(self) -> int:
        return (self.gpu_bytes - self.weight_bytes_per_gpu - self.reserve_bytes - self.num_slots * self.kv_bytes_per_slot
                - self.state_bytes)

    @property
    def kv_tokens_per_gpu(self) -> int:
        return max(0, int(self.kv_budget_bytes // self.kv_bytes_per_token)) if self.kv_bytes_per_token else 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(kv_budget_bytes=self.kv_budget_bytes, kv_tokens_per_gpu=self.kv_tokens_per_gpu,
                 state_bytes=self.state_bytes)
        return d

    def format(self) -> str:
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.weight_bytes_by_part.items())
        lines = [
            f"weights ({self.weights}) per GPU at dp={self.dp}: {fmt_bytes(self.weight_bytes_per_gpu)} ({parts})",
            f"KV cache: {self.kv_bytes_per_token:.0f} bytes per token (paged compressed entries) + "
            f"{fmt_bytes(self.kv_bytes_per_slot)} per sequence slot (windows, tails) x {self.num_slots} slots",
            (f"prefix cache window state: {self.state_pages} pages x {fmt_bytes(self.state_bytes_per_page)} = "
             f"{fmt_bytes(self.state_bytes)}" if self.state_pages else "prefix cache off: no window state"),
            f"GPU {fmt_bytes(self.gpu_bytes)} - weights - {fmt_bytes(self.reserve_bytes)} reserve - slots"
            f"{' - window state' if self.state_pages else ''} = "
            f"{fmt_bytes(self.kv_budget_bytes)} for KV: {self.kv_tokens_per_gpu:,} tokens per GPU "
            f"({self.kv_tokens_per_gpu * self.dp:,} over dp={self.dp})",
        ]
        if self.kv_budget_bytes < 0:
            lines.append("DOES NOT FIT: the weights and slots exceed the GPU")
        return "\n".join(lines)


def _part(path: tuple) -> str:
    keys = [str(k) for k in path]
    if "ffn" in keys:
        leaf = keys[-1].removesuffix("_scale")
        if leaf in ("w1", "w2", "w3"):
            return "experts"
        if leaf.startswith("s_w"):
            return "shared"
        return "other"
    if "attn" in keys:
        return "attention"
    if keys[0] in ("embed", "head"):
        return "embed+head"
    return "other"


def weight_bytes(cfg: ModelConfig, dp: int, weights: str, dtype=jnp.bfloat16, mode: str = BY_EXPERT,
                 with_mtp: bool = False) -> dict:
    """{part: bytes per GPU}: a leaf sharded over dp counts 1/dp of its bytes."""
    model = abstract_model(cfg, dtype, with_mtp, weights)
    pure = nnx.state(model).to_pure_dict()
    specs = param_specs(pure, mode)
    out: dict[str, int] = {}
    leaves = jax.tree_util.tree_leaves_with_path(pure)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    for (path, leaf), spec in zip(leaves, spec_leaves):
        n = math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
        if DP in tuple(spec):
            n //= dp
        key = _part(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path))
        out[key] = out.get(key, 0) + n
    return out


def kv_bytes(cfg: ModelConfig, page_tokens: int, dtype=jnp.bfloat16) -> tuple[float, int, int]:
    """(bytes per token of the paged part, bytes per sequence slot, bytes of one page's window
    state in the prefix cache's pool), all layers."""
    def total(slots, pages, states):
        layout = CacheLayout(slots, pages, page_tokens, 1, state_pages=states)
        shapes = jax.eval_shape(lambda: init_cache(cfg, layout, dtype))
        return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(shapes))

    base = total(1, 1, 0)
    return (total(1, 2, 0) - base) / page_tokens, total(2, 1, 0) - base, total(1, 1, 1) - base


def memory_plan(cfg: ModelConfig, dp: int, weights: str, gpu_bytes: int, dtype=jnp.bfloat16,
                page_tokens: int = 128, num_slots: int = 64, reserve_bytes: int = 8 * GiB,
                mode: str = BY_EXPERT, prefix_caching: bool = True, state_pages: int | None = None,
                num_pages: int | None = None) -> MemoryPlan:
    """`state_pages`: the prefix cache's window-state pool (None: STATE_PAGES_PER_SLOT per slot,
    the engine's default; ignored without `prefix_caching`). A pool larger than the pages it
    keeps state for would reserve memory no page can use: it is capped at `num_pages` (the
    engine's pages per rank; None: as many as fit) and at the pages that fit beside it."""
    parts = weight_bytes(cfg, dp, weights, dtype, mode)
    per_token, per_slot, per_state = kv_bytes(cfg, page_tokens, dtype)
    states = 0
    if prefix_caching:
        # s state entries leave (free - s * per_state) // per_page pages: s fits while it is
        # at most that many, i.e. s * (per_page + per_state) <= free
        free = gpu_bytes - sum(parts.values()) - reserve_bytes - num_slots * per_slot
        fit = max(0, int(free // (per_token * page_tokens + per_state)))
        pages = fit if num_pages is None else min(fit, num_pages)
        states = default_state_pages(num_slots, pages) if state_pages is None else min(state_pages, pages)
    return MemoryPlan(dp, weights, sum(parts.values()), parts, per_token, per_slot, gpu_bytes,
                      reserve_bytes, num_slots, states, per_state)


def measured_bytes_per_device(tree) -> dict:
    """{device: bytes of the tree's shards on it} for placed arrays."""
    out: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def program_temp_bytes(compiled) -> int | None:
    """Temporary device memory one run of a compiled program allocates (XLA's memory analysis:
    its activations and workspace, one block per device), or None where the backend does not
    report it."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def free_device_bytes(devices) -> tuple[int, int] | None:
    """(free, limit) bytes of the device with the least free memory among `devices` (its
    allocator's limit less the bytes in use), or None where the devices report none (CPU)."""
    worst = None
    for d in devices:
        try:
            stats = d.memory_stats() or {}
        except Exception:
            stats = {}
        if "bytes_limit" not in stats:
            continue
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        if worst is None or free < worst[0]:
            worst = (free, int(stats["bytes_limit"]))
    return worst


class ProgramMemoryError(RuntimeError):
    """A compiled step program needs more temporary memory than its devices have free."""


def check_program_fits(what: str, temp: int | None, free: tuple[int, int] | None, lower: str) -> None:
    """Raise ProgramMemoryError, naming `what` (e.g. 'the step of bucket 8192, TBO on'), its
    temporary bytes and the free memory, and what to `lower`, when `temp` exceeds the free bytes
    (nothing to check where either is unknown): before the program runs, instead of an
    allocator failure in its first run (and, with several ranks, the others waiting for it in a
    collective)."""
    if temp is None or free is None or temp <= free[0]:
        return
    raise ProgramMemoryError(
        f"{what} needs {fmt_bytes(temp)} of temporary device memory per GPU, but only "
        f"{fmt_bytes(free[0])} of {fmt_bytes(free[1])} is free once the weights and the KV cache are "
        f"placed ({fmt_bytes(temp - free[0])} short): {lower}")


def device_memory_bytes(default: int = int(139 * GiB)) -> int:
    """Memory of one accelerator (its allocator limit), or `default` where none is reported."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # CPU backends may not implement memory_stats
        stats = {}
    return int(stats.get("bytes_limit", default))


def engine_memory_plan(config, gpu_bytes: int | None = None, model=None,
                       reserve_bytes: int | None = None) -> MemoryPlan:
    """The plan for an `EngineConfig` before anything is loaded: the model's config and weight
    format from the checkpoint's headers (or the embedded / random model's); `model`: a built
    model's instead (`Engine.memory_plan`). `reserve_bytes`: the activations' share (default
    the fixed 8 GiB; an engine that compiled its steps reserves the largest one's temporaries)."""
    if model is not None:
        cfg, weights = model.cfg, model.weights
    else:
        from atom_jax.default_model import byte_model_config, resolve_model
        from atom_jax.loader import resolve_weights
        from atom_jax.weights.formats import random_format
        from atom_jax.weights.config_io import read_config

        source = resolve_model(config.model)
        if source.kind == "dir":
            cfg, weights = read_config(source.path), resolve_weights(source.path, config.weights)
        else:
            cfg, weights = byte_model_config(), random_format(config.weights)
    reserve = {} if reserve_bytes is None else {"reserve_bytes": reserve_bytes}
    return memory_plan(cfg, config.dp, weights, gpu_bytes or device_memory_bytes(), jnp.dtype(config.dtype),
                       page_tokens=config.page_tokens, num_slots=config.num_slots, mode=config.expert_mode,
                       prefix_caching=config.enable_prefix_caching, state_pages=config.state_pages(),
                       num_pages=config.num_pages, **reserve)
