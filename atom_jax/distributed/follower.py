"""The loop of every process but 0: receive a plan, run the same step, repeat until STOP."""

from __future__ import annotations

import logging

from atom_jax.distributed.plan_channel import NOOP, STEP, STOP

log = logging.getLogger("atom_jax.distributed")


def follow(cluster, runner, channel) -> int:
    cfg = cluster.cfg
    steps = 0
    # Before the first plan process 0 may still be loading, reading input or compiling.
    wait = cfg.init_timeout + cfg.compile_timeout
    while True:
        what = f"waiting for plan {channel.seq} from process 0"
        try:
            with cluster.watchdog.guard(wait + cfg.step_timeout, what):
                kind, inputs = channel.recv()
        except Exception as e:
            cluster.fail(f"{what} failed: {type(e).__name__}: {e}")
        wait = cfg.keepalive
        if kind == STOP:
            log.info("process %d: stop after %d steps", cluster.process_id, steps)
            return steps
        if kind == NOOP:
            continue
        assert kind == STEP
        shape = (inputs.bucket, inputs.tbo)
        what = f"step {channel.seq - 1} (bucket {inputs.bucket}, tbo {inputs.tbo})"
        try:
            with cluster.watchdog.guard(cluster._timeout(shape), what):
                runner.run(inputs)
        except Exception as e:
            cluster.fail(f"{what} failed: {type(e).__name__}: {e}")
        cluster._compiled.add(shape)
        steps += 1
