from atom_jax.models.deepseek_v4 import Block, DeepseekV4, MTPBlock, jit_forward

__all__ = ["Block", "DeepseekV4", "MTPBlock", "jit_forward"]
