"""Checkpoint reading: safetensors views, FP8/FP4 dequantisation, canonical tensor names."""

from atom_jax.weights.errors import CheckpointError
from atom_jax.weights.names import (LAYOUT_HF_MODULES, LAYOUT_HF_SAVED, LAYOUT_OFFICIAL, detect_layout,
                                    is_canonical, map_name)
from atom_jax.weights.official_config import OfficialConfigError, official_to_hf_dict
from atom_jax.weights.quant import dequantize_fp4, dequantize_fp8, quantize_fp4, quantize_fp8
from atom_jax.weights.reader import (CheckpointPlan, CheckpointTensor, PlannedTensor, checkpoint_layout,
                                     checkpoint_names, iter_checkpoint, plan_checkpoint)
from atom_jax.weights.safetensors_io import SafetensorsFile, list_safetensors

__all__ = [
    "CheckpointError", "CheckpointPlan", "CheckpointTensor", "PlannedTensor", "SafetensorsFile",
    "OfficialConfigError", "LAYOUT_HF_MODULES", "LAYOUT_HF_SAVED", "LAYOUT_OFFICIAL",
    "checkpoint_layout", "checkpoint_names", "iter_checkpoint", "plan_checkpoint", "list_safetensors",
    "dequantize_fp4", "dequantize_fp8", "quantize_fp4", "quantize_fp8",
    "detect_layout", "is_canonical", "map_name", "official_to_hf_dict",
]
