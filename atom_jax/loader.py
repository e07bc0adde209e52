"""Build a DeepSeekV4 model from a checkpoint directory (HF or DeepSeek-official layout), or from
an orbax checkpoint written by `save_orbax`; random initialisation for any config."""

from __future__ import annotations

import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from atom_jax.config import ModelConfig
from atom_jax.models import DeepseekV4
from atom_jax.models.param_map import MTP_NAME, param_map
from atom_jax.weights.config_io import read_config, to_hf_dict
from atom_jax.weights.reader import CheckpointError, iter_checkpoint

ORBAX_SUBDIR = "orbax"


def random_model(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32, with_mtp: bool = False) -> DeepseekV4:
    return DeepseekV4(cfg, nnx.Rngs(seed), dtype=dtype, with_mtp=with_mtp)


def abstract_model(cfg: ModelConfig, dtype=jnp.float32, with_mtp: bool = False) -> DeepseekV4:
    """Shapes only, no memory: the skeleton that loading fills."""
    return nnx.eval_shape(lambda: DeepseekV4(cfg, nnx.Rngs(0), dtype=dtype, with_mtp=with_mtp))


def _variable(model, path):
    node = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


def _np_dtype(dtype):
    return np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)


def load_model(path: str, dtype=jnp.float32, with_mtp: bool = False, cfg: ModelConfig | None = None) -> DeepseekV4:
    """Stream a safetensors checkpoint into the model, tensor by tensor.

    Every tensor must map to a parameter with the right shape and every parameter must be
    filled; otherwise a CheckpointError names the tensor (and its file)."""
    if os.path.isdir(os.path.join(path, ORBAX_SUBDIR)):
        return restore_orbax(path, dtype=dtype, with_mtp=with_mtp)
    cfg = cfg or read_config(path)
    model = abstract_model(cfg, dtype, with_mtp)
    targets = param_map(cfg, with_mtp)
    ignore = [] if with_mtp else [MTP_NAME.pattern]
    staged: dict[tuple, np.ndarray] = {}  # stacked expert params being filled
    remaining_experts: dict[tuple, int] = {}
    filled: set[str] = set()
    for t in iter_checkpoint(path, dtype=_np_dtype(dtype), ignore=ignore):
        target = targets.get(t.name)
        if target is None:
            raise CheckpointError(t.source, t.source_name, f"does not belong to this model (canonical name {t.name!r})")
        if t.name in filled:
            raise CheckpointError(t.source, t.source_name, "appears twice in the checkpoint")
        var = _variable(model, target.path)
        want = var.get_value().shape if target.expert is None else var.get_value().shape[1:]
        value = target.transform(np.asarray(t.array))
        if value.shape != tuple(want):
            raise CheckpointError(t.source, t.source_name, f"shape {tuple(t.array.shape)} does not fit parameter "
                                  f"{'.'.join(map(str, target.path))} {tuple(want)}")
        np_dtype = np.int32 if target.integer else np.dtype(var.get_value().dtype)
        if target.integer and (value.min() < 0 or value.max() >= cfg.n_routed_experts):
            raise CheckpointError(t.source, t.source_name, f"expert ids outside [0, {cfg.n_routed_experts})")
        if target.expert is None:
            var.set_value(jnp.asarray(value.astype(np_dtype)))
        else:
            key = target.path
            if key not in staged:
                staged[key] = np.zeros(var.get_value().shape, np_dtype)
                remaining_experts[key] = var.get_value().shape[0]
            staged[key][target.expert] = value
            remaining_experts[key] -= 1
            if remaining_experts[key] == 0:  # whole stack read: move it to the device, free host copy
                var.set_value(jnp.asarray(staged.pop(key)))
        filled.add(t.name)
    missing = sorted(set(targets) - filled)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(path, missing[0], f"missing from the checkpoint: {', '.join(missing[:5])}{more}")
    return model


def save_orbax(model: DeepseekV4, out_dir: str) -> str:
    """Write the loaded parameters with orbax (plus config.json) so later loads skip conversion."""
    import json

    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(to_hf_dict(model.cfg), f, indent=1)
    _, state = nnx.split(model)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(out_dir, ORBAX_SUBDIR), state, force=True)
    return out_dir


def restore_orbax(path: str, dtype=jnp.float32, with_mtp: bool = False) -> DeepseekV4:
    import orbax.checkpoint as ocp

    cfg = read_config(path)
    abstract = abstract_model(cfg, dtype, with_mtp)
    graphdef, abstract_state = nnx.split(abstract)
    with ocp.StandardCheckpointer() as ckpt:
        state = ckpt.restore(os.path.join(os.path.abspath(path), ORBAX_SUBDIR), abstract_state)
    return nnx.merge(graphdef, state)
