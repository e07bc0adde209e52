from atom_jax.sharding.mesh import DP, make_dp_mesh
from atom_jax.sharding.overlap import StepOptions
from atom_jax.sharding.placement import EXPERT_MODES, param_specs, shard_params
from atom_jax.sharding.step import make_step, random_params_on_mesh, shard_tokens

__all__ = ["DP", "make_dp_mesh", "EXPERT_MODES", "param_specs", "shard_params", "StepOptions", "make_step",
           "random_params_on_mesh", "shard_tokens"]
