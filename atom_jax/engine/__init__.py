"""The engine: `Engine` (offline API), its config and the model runner. Names load lazily so
that jax-free parts (`atom_jax.engine.args`, `atom_jax.engine.info`) import without jax."""

__all__ = ["Engine", "EngineConfig", "RequestOutput", "SamplingParams"]


def __getattr__(name):
    if name == "EngineConfig":
        from atom_jax.engine.args import EngineConfig

        return EngineConfig
    if name in ("Engine", "RequestOutput"):
        from atom_jax.engine import engine

        return getattr(engine, name)
    if name == "SamplingParams":
        from atom_jax.scheduler import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'atom_jax.engine' has no attribute {name!r}")
