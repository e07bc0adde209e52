"""Write small checkpoints in DeepSeek's official layout (FP4 routed experts, FP8 projections
with ue8m0 scales) from a model's own parameters, for loader tests."""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file

from atom_jax.loader import _variable
from atom_jax.models.param_map import FP4, FP8, _t, param_map
from atom_jax.weights import quant
from atom_jax.weights.config_io import to_hf_dict


def write_safetensors_with_dtypes(path, tensors: dict, fp8_names: set, e8m0_names: set):
    """safetensors.numpy cannot write float8: write uint8 and patch the dtype strings in the header."""
    save_file(tensors, path)
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + n])
    for k in header:
        if k in fp8_names:
            header[k]["dtype"] = "F8_E4M3"
        elif k in e8m0_names:
            header[k]["dtype"] = "F8_E8M0"
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little") + hb + raw[8 + n:])


def _checkpoint_layout(target, value: np.ndarray, cfg) -> np.ndarray:
    """Our [in, out] parameter back to the checkpoint's [out, in] (wo_a: [G*o_lora, in/G])."""
    if target.path[-1] == "wo_a":
        return np.ascontiguousarray(value.transpose(0, 2, 1).reshape(-1, value.shape[1]))
    if target.transform is _t:
        return np.ascontiguousarray(value.T)
    return value


def write_official_checkpoint(model, path: str):
    """The float model's weights quantised as DeepSeek ships V4: FP4 experts (int8 codes + e8m0
    scale per 32 inputs), FP8 e4m3 attention / shared-expert projections (e8m0 128x128 scales)."""
    os.makedirs(path, exist_ok=True)
    cfg = model.cfg
    tensors, fp8, e8m0 = {}, set(), set()
    for name, target in param_map(cfg).items():
        value = np.asarray(_variable(model, target.path).get_value())
        if target.expert is not None:
            value = value[target.expert]
        if target.part is not None:  # one matrix of a fused projection (float form: columns)
            value = value[..., slice(*target.span())]
        w = _checkpoint_layout(target, value, cfg)
        scale_name = name[: -len("weight")] + "scale"
        if target.native == FP4:
            q, s = quant.quantize_fp4(w.astype(np.float32))
            tensors[name], tensors[scale_name] = q, s.view(np.uint8)
            e8m0.add(scale_name)
        elif target.native == FP8:
            q, s = quant.quantize_fp8(w.astype(np.float32))
            tensors[name], tensors[scale_name] = q.view(np.uint8), s.view(np.uint8)
            fp8.add(name)
            e8m0.add(scale_name)
        else:
            tensors[name] = np.ascontiguousarray(w.astype(np.int32 if target.integer else np.float32))
    write_safetensors_with_dtypes(os.path.join(path, "model.safetensors"), tensors, fp8, e8m0)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(to_hf_dict(cfg), f)
    return path
