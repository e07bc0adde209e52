"""atom_jax: a JAX/XLA inference engine for DeepSeek-V4 mixture-of-experts models."""

from atom_jax.config import ModelConfig

__all__ = ["ModelConfig"]
__version__ = "0.1.0"
