"""Build a DeepSeekV4 model from a checkpoint directory (HF or DeepSeek-official layout), or from
an orbax checkpoint written by `save_orbax`; random initialisation for any config."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from atom_jax.config import ModelConfig
from atom_jax.models import DeepseekV4
from atom_jax.kernels.packed import FP8_BLOCK
from atom_jax.models.packed_params import FP4_EXPERTS as FP4_EXPERT_NAMES, FUSED, SCALE, fp8_rows
from atom_jax.models.param_map import FP4, FP8, MTP_NAME, param_map
from atom_jax.weights import quant
from atom_jax.weights.formats import (AUTO, BF16, EXPERT_LAYOUTS, FP4_EXPERTS_ONLY, KMAJOR, NATIVE, NMAJOR,
                                      WEIGHT_FORMATS, model_layout, packed_dense, packed_experts)
from atom_jax.weights.config_io import read_config, to_hf_dict
from atom_jax.weights.reader import CheckpointError, iter_checkpoint, plan_checkpoint

ORBAX_SUBDIR = "orbax"
WEIGHTS_FILE = "atom_jax_weights.json"  # beside an orbax checkpoint: {"weights": <model format>}


def random_model(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32, with_mtp: bool = False,
                 weights: str = BF16, expert_layout: str = NMAJOR) -> DeepseekV4:
    return DeepseekV4(cfg, nnx.Rngs(seed), dtype=dtype, with_mtp=with_mtp, weights=weights,
                      expert_layout=expert_layout)


class _ShapeOnlyRngs:
    """`abstract_model`'s stand-in for nnx.Rngs (the modules only call `params()`): one fixed
    key, no counter. The values are never used, and an nnx.Rngs counter written while traced
    asks each new tracer for its sharding, whose error message walks every equation traced so
    far: quadratic in the parameters (20 s for 43 V4-Flash layers, 0.8 s without)."""

    def params(self):
        return jax.random.key(0)


def abstract_model(cfg: ModelConfig, dtype=jnp.float32, with_mtp: bool = False, weights: str = BF16,
                   expert_layout: str = NMAJOR) -> DeepseekV4:
    """Shapes only, no memory: the skeleton that loading fills."""
    return nnx.eval_shape(lambda: DeepseekV4(cfg, _ShapeOnlyRngs(), dtype=dtype, with_mtp=with_mtp, weights=weights,
                                             expert_layout=expert_layout))


def abstract_like(model: DeepseekV4) -> DeepseekV4:
    """`abstract_model` of `model`'s own config, dtype, MTP, weight format and expert layout."""
    return abstract_model(model.cfg, model.dtype, len(model.mtp) > 0, model.weights, model.expert_layout)


def with_expert_layout(model: DeepseekV4, layout: str) -> DeepseekV4:
    """`model` with its routed experts in `layout` ("nmajor" / "kmajor": one transpose of each
    expert stack, FP4 codes [E, K/2, N] <-> [E, N, K/2], dense [E, K, N] <-> [E, N, K]; arrays
    stay where they are, numpy or device). The same model when it already holds that layout."""
    layout = model_layout(model.weights, layout)
    if layout == model.expert_layout:
        return model
    pure = nnx.state(model).to_pure_dict()

    def swap(node, in_ffn=False):
        if isinstance(node, dict):
            for name, child in node.items():
                if in_ffn and name in FP4_EXPERT_NAMES and isinstance(child, (np.ndarray, jax.Array)):
                    node[name] = (np.ascontiguousarray(np.swapaxes(child, -1, -2)) if isinstance(child, np.ndarray)
                                  else jnp.swapaxes(child, -1, -2))
                else:
                    swap(child, name == "ffn")

    swap(pure)
    graphdef, state = nnx.split(abstract_model(model.cfg, model.dtype, len(model.mtp) > 0, model.weights, layout))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _variable(model, path):
    node = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


def _np_dtype(dtype):
    return np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)


def resolve_weights(path: str, weights: str = AUTO) -> str:
    """`auto` -> native when the checkpoint stores FP4 experts (its headers say so), else bf16."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"--weights {weights!r}: choose from {WEIGHT_FORMATS}")
    if weights != AUTO:
        return weights
    if os.path.isdir(os.path.join(path, ORBAX_SUBDIR)):
        return _orbax_weights(path)
    return NATIVE if any(p.kind == FP4 for p in plan_checkpoint(path).tensors) else BF16


def _e8m0_bytes(scale: np.ndarray, source, name) -> np.ndarray:
    """FP4 scales as raw ue8m0 bytes (float scales must be powers of two to stay packed)."""
    if scale.dtype in (np.dtype(ml_dtypes.float8_e8m0fnu), np.dtype(np.uint8)):
        return scale.view(np.uint8)
    f = quant.scale_to_float32(scale)
    e = np.round(np.log2(f)).astype(np.int32)
    if not np.array_equal(np.ldexp(np.float32(1), e), f):
        raise CheckpointError(source, name, "FP4 scales that are not powers of two cannot stay packed; "
                                            "load with --weights bf16")
    return (e + 127).astype(np.uint8)


def _packed(t, native: str, expert_layout: str = NMAJOR) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scales) in the model's packed layout (packed_params) for one checkpoint tensor:
    as stored when its format matches, else quantised from its float values. FP4 codes: the
    checkpoint's [out, in/2] kept as is for the K-major layout, else transposed."""
    if native == FP4:
        if t.kind == FP4:
            codes, scales = t.array, _e8m0_bytes(t.scale, t.source, t.source_name)
        else:
            q, sc = quant.quantize_fp4(np.asarray(t.array, np.float32))
            codes, scales = q.view(np.uint8), sc.view(np.uint8)
        codes = codes if expert_layout == KMAJOR else codes.T  # [out, in/2] (K-major) or [in/2, out]
        return np.ascontiguousarray(codes), np.ascontiguousarray(scales.T)  # scales [in/32, out]
    if t.kind == FP8:
        return t.array, quant.scale_to_float32(t.scale)
    q, sc = quant.quantize_fp8(np.asarray(t.array, np.float32))
    return q.view(np.uint8), quant.scale_to_float32(sc)


class _Filler:
    """Puts values into the abstract model's variables. A parameter filled in parts (expert
    slices of a stack, blocks of a fused projection: `Target.expert` / `Target.part`) is
    staged on the host and moved to the device once every part is read (`host`: left in host
    memory)."""

    def __init__(self, model, host: bool = False):
        self.model = model
        self.to_value = (lambda a: a) if host else jnp.asarray
        self.staged: dict[tuple, np.ndarray] = {}
        self.remaining: dict[tuple, int] = {}

    def put(self, t, path: tuple, value: np.ndarray, where=None, parts: int = 1, np_dtype=None):
        """Set the parameter at `path` to `value`, or (`where`: an index into it) one of the
        `parts` pieces that together fill it."""
        var = _variable(self.model, path)
        full = tuple(var.get_value().shape)
        # the shape of full[where] without allocating full
        want = full if where is None else np.lib.stride_tricks.as_strided(np.zeros(1), full, (0,) * len(full))[where].shape
        if value.shape != want:
            raise CheckpointError(t.source, t.source_name, f"shape {tuple(t.array.shape)} does not fit parameter "
                                  f"{'.'.join(map(str, path))} {want}")
        np_dtype = np_dtype or np.dtype(var.get_value().dtype)
        if where is None:
            var.set_value(self.to_value(value.astype(np_dtype)))
            return
        if path not in self.staged:
            self.staged[path] = np.zeros(full, np_dtype)
            self.remaining[path] = parts
        self.staged[path][where] = value
        self.remaining[path] -= 1
        if self.remaining[path] == 0:  # every part read: move it to the device, free host copy
            var.set_value(self.to_value(self.staged.pop(path)))


def _where(target, model, kind: str | None = None):
    """(index into the parameter, pieces that fill it) for a target filled in parts, else
    (None, 1). kind: None for the float form; "codes" / "scales" for an FP8 packed one (rows of
    the [out, in] codes, row blocks of the scales)."""
    if target.expert is not None:  # one [E, ...] stack's entry
        return target.expert, _variable(model, target.path).get_value().shape[0]
    if target.part is None:
        return None, 1
    n = len(target.part[1])
    if kind is None:
        return (Ellipsis, slice(*target.span())), n
    start, stop = target.span(fp8=True)
    if kind == "codes":
        return slice(start, stop), n
    b = FP8_BLOCK
    return slice(start // b, -(-stop // b)), n


def load_model(path: str, dtype=jnp.float32, with_mtp: bool = False, cfg: ModelConfig | None = None,
               weights: str = AUTO, host: bool = False, expert_layout: str = NMAJOR) -> DeepseekV4:
    """Stream a safetensors checkpoint into the model, tensor by tensor.

    `weights`: "bf16" dequantises FP8/FP4 tensors to `dtype`; "native" keeps the experts FP4 and
    the attention / shared-expert projections FP8 (packed_params; float tensors there are
    quantised); "fp4-experts" keeps the experts FP4 and dequantises the FP8 projections to
    `dtype` (once, here); "auto" is native when the checkpoint's experts are FP4. `expert_layout`: the
    routed experts' layout, "nmajor" or "kmajor" (weights.formats; kmajor keeps each expert's
    [out, in] as stored, FP4 codes and dense weights alike). `host`: parameters stay
    numpy arrays in host memory, for a caller that places them sharded (the engine: a model
    larger than one GPU never lands whole on device 0).
    Every tensor must map to a parameter with the right shape and every parameter must be
    filled; otherwise a CheckpointError names the tensor (and its file)."""
    weights = resolve_weights(path, weights)
    if os.path.isdir(os.path.join(path, ORBAX_SUBDIR)):
        return restore_orbax(path, dtype=dtype, with_mtp=with_mtp, weights=weights, host=host,
                             expert_layout=expert_layout)
    cfg = cfg or read_config(path)
    model = abstract_model(cfg, dtype, with_mtp, weights, expert_layout)
    targets = param_map(cfg, with_mtp)
    kept = {FP4} if packed_experts(weights) else set()  # the packed kinds the model keeps
    if packed_dense(weights):
        kept.add(FP8)

    def packed(target):
        return target.native in kept

    def keep_packed(name, kind):  # stored in the format the model keeps: no decode, no re-encode
        return name in targets and packed(targets[name]) and targets[name].native == kind

    ignore = [] if with_mtp else [MTP_NAME.pattern]
    filler = _Filler(model, host)
    filled: set[str] = set()
    for t in iter_checkpoint(path, dtype=_np_dtype(dtype), ignore=ignore, keep_packed=keep_packed):
        target = targets.get(t.name)
        if target is None:
            raise CheckpointError(t.source, t.source_name, f"does not belong to this model (canonical name {t.name!r})")
        if t.name in filled:
            raise CheckpointError(t.source, t.source_name, "appears twice in the checkpoint")
        if packed(target):
            try:
                codes, scales = _packed(t, target.native, model.expert_layout)
            except ValueError as e:
                raise CheckpointError(t.source, t.source_name, str(e)) from None
            scale_path = target.path[:-1] + (target.path[-1] + SCALE,)
            filler.put(t, target.path, codes, *_where(target, model, "codes"), np.dtype(np.uint8))
            filler.put(t, scale_path, scales, *_where(target, model, "scales"))
            filled.add(t.name)
            continue
        stored = np.asarray(t.array).dtype
        if (stored.kind in "biu") != bool(target.integer):  # I64 read as a float weight: refuse
            raise CheckpointError(t.source, t.source_name, f"stored as {stored} but the parameter is "
                                  f"{'an integer table' if target.integer else 'floating point'}")
        if target.expert is not None and model.expert_layout == KMAJOR:  # dense expert: [out, in] as stored
            value = np.asarray(t.array)
        else:
            value = target.transform(np.asarray(t.array))
        if target.integer and (value.min() < 0 or value.max() >= cfg.n_routed_experts):
            raise CheckpointError(t.source, t.source_name, f"expert ids outside [0, {cfg.n_routed_experts})")
        filler.put(t, target.path, value, *_where(target, model), np.dtype(np.int32) if target.integer else None)
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
    with open(os.path.join(out_dir, WEIGHTS_FILE), "w") as f:
        json.dump({"weights": getattr(model, "weights", BF16),
                   "expert_layout": getattr(model, "expert_layout", NMAJOR)}, f)
    _, state = nnx.split(model)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(out_dir, ORBAX_SUBDIR), state, force=True)
    return out_dir


def decode_fp8_projections(model: DeepseekV4, host: bool = False) -> DeepseekV4:
    """A native model as fp4-experts: every FP8 projection decoded (codes x block scales, the
    loader's own dequantisation and layout transform) into a dense `model.dtype` parameter; the
    FP4 experts and everything else unchanged. `host`: the decoded arrays stay numpy."""
    if model.weights != NATIVE:
        raise ValueError(f"decode_fp8_projections takes a native model, not {model.weights!r}")
    with_mtp = len(model.mtp) > 0
    pure = nnx.state(model).to_pure_dict()
    fused: dict[tuple, tuple] = {}  # a fused parameter's path -> (its decoded [out, in] rows, dense [in, out])
    for target in param_map(model.cfg, with_mtp).values():
        if target.native != FP8:
            continue
        *parents, leaf = target.path
        node = pure
        for p in parents:
            node = node[p]
        if target.part is None:
            codes, scale = np.asarray(node[leaf]), np.asarray(node.pop(leaf + SCALE))
            dense = target.transform(quant.dequantize_fp8(codes, scale, _np_dtype(model.dtype)))
            node[leaf] = dense if host else jnp.asarray(dense)
            continue
        if target.path not in fused:  # decode the whole fused parameter once; its parts fill `dense`
            rows = quant.dequantize_fp8(np.asarray(node[leaf]), np.asarray(node.pop(leaf + SCALE)),
                                        _np_dtype(model.dtype))
            dense = np.zeros((rows.shape[1], sum(target.part[1])), rows.dtype)
            fused[target.path] = rows, dense
            node[leaf] = dense
        rows, dense = fused[target.path]
        dense[:, slice(*target.span())] = target.transform(rows[slice(*target.span(fp8=True))])
    if not host:
        for path, (_, dense) in fused.items():
            node = pure
            for p in path[:-1]:
                node = node[p]
            node[path[-1]] = jnp.asarray(dense)
    graphdef, state = nnx.split(abstract_model(model.cfg, model.dtype, with_mtp, FP4_EXPERTS_ONLY, model.expert_layout))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _orbax_record(path: str) -> dict:
    """`WEIGHTS_FILE` beside an orbax checkpoint ({} when it predates the record)."""
    import json

    f = os.path.join(path, WEIGHTS_FILE)
    if not os.path.exists(f):
        return {}
    with open(f) as fh:
        return json.load(fh)


def _orbax_weights(path: str) -> str:
    """The weight format an orbax checkpoint was saved in (bf16 when it predates the record)."""
    return _orbax_record(path).get("weights", BF16)


def _orbax_layout(path: str) -> str:
    """The FP4 experts' code layout an orbax checkpoint was saved in (nmajor when not recorded)."""
    layout = _orbax_record(path).get("expert_layout", NMAJOR)
    if layout not in EXPERT_LAYOUTS:
        raise CheckpointError(path, WEIGHTS_FILE, f"unknown expert_layout {layout!r}")
    return layout


def restore_orbax(path: str, dtype=jnp.float32, with_mtp: bool = False, weights: str = AUTO,
                  host: bool = False, expert_layout: str | None = None) -> DeepseekV4:
    """Restore as saved: the packed form stays packed; a native checkpoint can also be restored
    as fp4-experts (its FP8 projections decoded here). Asking for any other format than the saved
    one is an error (convert from the safetensors checkpoint instead). `expert_layout` ("nmajor" /
    "kmajor"; None: as saved): FP4 experts saved in the other layout are transposed after the
    restore. `host`: numpy arrays in host memory (as `load_model(host=True)`)."""
    saved = _orbax_weights(path)
    if expert_layout is not None and expert_layout != _orbax_layout(path):
        model = restore_orbax(path, dtype, with_mtp, weights, host)
        return with_expert_layout(model, expert_layout)
    if weights == FP4_EXPERTS_ONLY and saved == NATIVE:
        return decode_fp8_projections(restore_orbax(path, dtype, with_mtp, NATIVE, host), host)
    if weights not in (AUTO, saved):
        raise CheckpointError(path, None, f"this orbax checkpoint holds {saved!r} weights, not {weights!r}")
    cfg = read_config(path)
    abstract = abstract_model(cfg, dtype, with_mtp, saved, _orbax_layout(path))
    graphdef, abstract_state = nnx.split(abstract)
    where = os.path.join(os.path.abspath(path), ORBAX_SUBDIR)
    try:
        state = _restore_as(where, abstract_state, host)
    except ValueError:  # saved before the compressor projections were fused?
        state = _restore_unfused(where, abstract_state, host)
    return nnx.merge(graphdef, state)


def _restore_as(where: str, abstract_state, host: bool):
    """The saved state in the structure of `abstract_state` (`host`: numpy arrays)."""
    import jax
    import orbax.checkpoint as ocp

    if host:
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract_state)
        with ocp.PyTreeCheckpointer() as ckpt:
            return ckpt.restore(where, args=ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args))
    # Every leaf onto this process's first device: without a sharding orbax falls back to the
    # saved one, whose devices (e.g. the CPU the embedded model was saved on) may not exist here.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract_state)
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(where, target)


def _restore_unfused(where: str, abstract_state, host: bool = False):
    """Restore an orbax checkpoint saved before matrices that take the same input became one
    fused parameter (each compressed layer's compressor and indexer head-weight projections:
    `wcomp`, models/compressor.py; packed_params.FUSED: the attention's wq_a | wkv and the
    shared expert's gate | up): read the tree as saved, fuse them as the loader would, fill the
    model's state. A tree that does not hold that older layout raises orbax's own error again."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckpt:  # as numpy: the saved devices may not exist here
        saved = ckpt.metadata(where)
        saved = getattr(saved, "item_metadata", saved)
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
        tree = ckpt.restore(where, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    value = lambda v: np.asarray(v["value"])  # noqa: E731 (a saved leaf: {"value": array})
    fused = False

    def fuse(node):
        nonlocal fused
        if not isinstance(node, dict):
            return
        comp = node.get("compressor", {})
        if "wkv" in comp:  # an attention module
            parts = [comp.pop("wkv"), comp.pop("wgate")]
            if "indexer" in node:
                idx = node["indexer"]
                parts += [idx["compressor"].pop("wkv"), idx["compressor"].pop("wgate"), idx.pop("weights_proj")]
            node["wcomp"] = {"value": np.concatenate([value(p) for p in parts], axis=-1)}
            fused = True
        for name, members in FUSED.items():
            if all(m in node for m in members):
                mats = [value(node.pop(m)) for m in members]
                if all(m + SCALE in node for m in members):  # FP8 [out, in]: rows padded to whole blocks
                    scales = [value(node.pop(m + SCALE)) for m in members]
                    mats = [np.pad(c, ((0, fp8_rows(c.shape[0]) - c.shape[0]), (0, 0))) for c in mats]
                    node[name + SCALE] = {"value": np.concatenate(scales, axis=0)}
                    node[name] = {"value": np.concatenate(mats, axis=0)}
                else:
                    node[name] = {"value": np.concatenate(mats, axis=-1)}
                fused = True
        for child in list(node.values()):
            fuse(child)

    fuse(tree)
    if not fused:
        return _restore_as(where, abstract_state, host)
    to_value = np.asarray if host else jnp.asarray
    pure = jax.tree.map(lambda v: to_value(v["value"]), tree,
                        is_leaf=lambda v: isinstance(v, dict) and set(v) == {"value"})
    nnx.replace_by_pure_dict(abstract_state, pure)
    return abstract_state
