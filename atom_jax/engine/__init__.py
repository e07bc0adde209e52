from atom_jax.engine.engine import Engine, EngineConfig, RequestOutput
from atom_jax.scheduler import SamplingParams

__all__ = ["Engine", "EngineConfig", "RequestOutput", "SamplingParams"]
