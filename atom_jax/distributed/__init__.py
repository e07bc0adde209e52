"""Multi-host data parallelism: one process per host joins through `jax.distributed`; process
0 runs the front end and the scheduler and broadcasts every step's plan; the others run the
same steps (see cluster.py)."""

from atom_jax.distributed.init import DistributedConfig, add_distributed_args, resolve

__all__ = ["DistributedConfig", "add_distributed_args", "initialize", "resolve"]


def __getattr__(name):
    # Joining imports jax (through the cluster); flags and `resolve` must not.
    if name == "initialize":
        from atom_jax.distributed.join import initialize

        return initialize
    raise AttributeError(f"module 'atom_jax.distributed' has no attribute {name!r}")
