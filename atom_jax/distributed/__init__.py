"""Multi-host data parallelism: one process per host joins through `jax.distributed`; process
0 runs the front end and the scheduler and broadcasts every step's plan; the others run the
same steps (see cluster.py)."""

from atom_jax.distributed.init import (DistributedConfig, add_distributed_args, initialize,
                                       resolve)

__all__ = ["DistributedConfig", "add_distributed_args", "initialize", "resolve"]
