"""Joining a multi-host run: `jax.distributed.initialize` with the settings `init.resolve`
found, then the `Cluster` the engine uses. Separate from init.py (flags and environment, no
jax) so that neither init.py nor cluster.py imports the other's importer."""

from __future__ import annotations

import inspect
import logging

from atom_jax.distributed.cluster import Cluster
from atom_jax.distributed.init import DistributedConfig

log = logging.getLogger("atom_jax.distributed")


def initialize(cfg: DistributedConfig):
    """Join the run (before anything else touches jax's backends) and return the Cluster."""
    import jax

    # CPU hosts need a cross-process collectives implementation; GPUs use NCCL / RCCL and
    # ignore this setting.
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # No preemption sync points are used; leave SIGTERM to the front end's own shutdown
    # (abort requests, release the followers) rather than jax's preemption notifier.
    try:
        jax.config.update("jax_enable_preemption_service", False)
    except (AttributeError, KeyError):  # a jax without the option
        pass
    kwargs = dict(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                  process_id=cfg.process_id, initialization_timeout=cfg.init_timeout,
                  heartbeat_timeout_seconds=cfg.heartbeat_timeout)
    if cfg.local_device_ids is not None:
        kwargs["local_device_ids"] = list(cfg.local_device_ids)
    known = inspect.signature(jax.distributed.initialize).parameters
    dropped = [k for k in kwargs if k not in known]
    if dropped:  # an older or newer jax without one of the timeouts: its default applies
        log.warning("jax %s: jax.distributed.initialize has no %s; using its defaults",
                    jax.__version__, ", ".join(dropped))
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if k in known})
    cluster = Cluster(cfg, jax.process_index(), jax.process_count())
    log.info("joined a %d-process run as process %d (%d local of %d devices)", cluster.num_processes,
             cluster.process_id, jax.local_device_count(), jax.device_count())
    return cluster
