"""The loop of every process but 0: receive a plan, run the same step, repeat until STOP."""

from __future__ import annotations

import logging

from atom_jax.distributed.plan_channel import NOOP, STEP, STOP

log = logging.getLogger("atom_jax.distributed")


def follow(cluster, channel) -> int:
    cfg = cluster.cfg
    steps = 0
    # Before the first plan process 0 may still be loading, reading input or compiling.
    wait = cfg.init_timeout + cfg.compile_timeout
    while True:
        with cluster.guarded(wait + cfg.step_timeout, f"waiting for plan {channel.seq} from process 0"):
            kind, inputs = channel.recv()
        wait = cfg.keepalive
        if kind == STOP:
            log.info("process %d: stop after %d steps", cluster.process_id, steps)
            return steps
        if kind == NOOP:
            continue
        assert kind == STEP
        cluster.run_step(inputs, f"step {channel.seq - 1} (bucket {inputs.bucket}, tbo {inputs.tbo})")
        steps += 1
