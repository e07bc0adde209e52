"""The multi-host run as the engine sees it.

Process 0 (the leader) owns the front end and the scheduler. For every model step it builds
the step's host inputs (`ModelRunner.host_inputs`), broadcasts them (`PlanChannel`), then runs
the step like every other process; sampled tokens come back replicated, so only the leader's
copy is used. While idle it broadcasts an empty plan every `keepalive` seconds, so followers
know it is alive and a dead follower is noticed even without traffic.

Failure: a process that dies makes the others' next collective raise (CPU collectives see the
closed connection at once) or hang (NCCL may wait forever). Every broadcast and step runs under
a watchdog, so either way a surviving process stops within `step_timeout` (+ `compile_timeout`
for a shape not compiled yet; a follower waiting for a plan allows `keepalive` more): it runs
its failure hooks (the server fails every request in flight with a 503), logs why, and exits
with EXIT_CLUSTER_FAILURE. Behind it, jax's coordination service terminates every process
`heartbeat_timeout` seconds after one stopped sending heartbeats.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time

from atom_jax.distributed.init import DistributedConfig
from atom_jax.distributed.plan_channel import NOOP, STEP, STOP, PlanChannel, inline_capacity

log = logging.getLogger("atom_jax.distributed")

EXIT_CLUSTER_FAILURE = 3


class Watchdog:
    """One guarded section at a time; `on_expire(message)` runs on the watchdog thread when
    a section outlives its deadline (the guarded thread is then stuck in a collective)."""

    def __init__(self, on_expire, poll: float = 0.1):
        self._on_expire, self._poll = on_expire, poll
        self._lock = threading.Lock()
        self._deadline: float | None = None
        self._what = ""
        self._seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="atom-jax-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def guard(self, seconds: float, what: str):
        with self._lock:
            self._deadline, self._what, self._seconds = time.monotonic() + seconds, what, seconds
        try:
            yield
        finally:
            with self._lock:
                self._deadline = None

    def _run(self) -> None:
        while True:
            time.sleep(self._poll)
            with self._lock:
                expired = self._deadline is not None and time.monotonic() > self._deadline
                what, seconds = self._what, self._seconds
            if expired:
                self._on_expire(f"{what} did not finish within {seconds:.0f} s")
                return


class _GuardedResult:
    """A dispatched step's result whose read waits under the cluster's watchdog (a dead peer
    shows up there: the step's collectives never finish)."""

    def __init__(self, cluster, result, timeout: float, what: str):
        self._cluster, self._result, self._timeout, self._what = cluster, result, timeout, what

    def fetch(self):
        with self._cluster.guarded(self._timeout, f"{self._what}: reading its tokens"):
            return self._result.fetch()


class Cluster:
    def __init__(self, cfg: DistributedConfig, process_id: int, num_processes: int):
        self.cfg, self.process_id, self.num_processes = cfg, process_id, num_processes
        self.failed: str | None = None
        self._hooks: list = []
        self._fail_lock = threading.Lock()
        self._channel: PlanChannel | None = None
        self._compiled: set = set()  # (bucket, tbo) shapes this process has run
        self._last_send = 0.0
        self._stopped = False
        self.watchdog = Watchdog(self.fail)

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0

    def attach(self, runner, engine_config) -> None:
        """Bind to the engine's runner (every process builds the same engine)."""
        import jax

        if runner.dp != jax.device_count():
            raise ValueError(f"a multi-host run uses every device: dp must be {jax.device_count()} "
                             f"({self.num_processes} processes), got {runner.dp}")
        cap = inline_capacity(runner.dp, engine_config.num_slots, engine_config.max_tokens_per_step)
        self._channel = PlanChannel(runner.dp, cap, is_source=self.is_leader)
        self._runner = runner
        self._handshake()

    def _handshake(self) -> None:
        """Start together: wait until every process has built its engine, then run one
        collective over all devices and one plan message while all are present. The first
        collective over a group of devices sets up its communicator, and on CPU (gloo) that
        set-up gives up after 30 s if a peer is late (later waits are unbounded)."""
        from jax._src import distributed
        from jax.experimental import multihost_utils

        timeout = self.cfg.init_timeout + self.cfg.compile_timeout
        client = distributed.global_state.client
        with self.guarded(timeout + self.cfg.step_timeout, "waiting for every process's engine",
                          failure="start-up handshake failed"):
            if client is not None and hasattr(client, "wait_at_barrier"):
                client.wait_at_barrier("atom_jax_engine_ready", int(timeout * 1000))
            multihost_utils.sync_global_devices("atom_jax_engine_ready")
            self._probe_dp_group()
            if self.is_leader:
                self._send(NOOP)
            else:
                kind, _ = self._channel.recv()
                if kind != NOOP:
                    raise RuntimeError(f"expected the opening message, got kind {kind}")

    def _probe_dp_group(self) -> None:
        """One all-reduce over the engine's `dp` mesh: the group every model step uses."""
        import jax
        import numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P

        runner = self._runner
        ones = runner.global_array(np.ones((runner.dp, 1), np.int32))
        total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(runner.mesh, P()))(ones)
        if int(total) != runner.dp:
            raise RuntimeError(f"all-reduce over dp={runner.dp} gave {int(total)}")

    def add_failure_hook(self, fn) -> None:
        """`fn(reason)` runs when the run fails, before the process exits (any thread)."""
        self._hooks.append(fn)

    def fail(self, reason: str):
        """Stop this process: the run cannot go on. Never returns."""
        with self._fail_lock:  # the watchdog and the stepping thread may both get here
            self.failed = reason
            message = (f"atom_jax multi-host: process {self.process_id} of {self.num_processes} stops: "
                       f"{reason}. Another process died or hung (see its log); requests in flight "
                       f"were failed. Restart every process to recover.")
            if logging.getLogger().handlers:  # the front end configured logging (serve)
                log.error("%s", message)
            else:
                print(message, file=sys.stderr, flush=True)
            for hook in self._hooks:
                try:
                    hook(reason)
                except Exception:  # noqa: BLE001 - exit regardless
                    log.exception("failure hook raised")
            if self._hooks:
                time.sleep(1.0)  # let the front end's error responses leave
            sys.stdout.flush()
            sys.stderr.flush()
            # Not sys.exit: jax's atexit shutdown would wait for the dead peer.
            os._exit(EXIT_CLUSTER_FAILURE)

    def _timeout(self, shape=None) -> float:
        t = self.cfg.step_timeout
        if shape is not None and shape not in self._compiled:
            t += self.cfg.compile_timeout
        return t

    @contextlib.contextmanager
    def guarded(self, seconds: float, what: str, failure: str | None = None):
        """Run the block under the watchdog; any exception in it stops the run (`fail`)."""
        try:
            with self.watchdog.guard(seconds, what):
                yield
        except Exception as e:
            self.fail(f"{failure or what + ' failed'}: {type(e).__name__}: {e}")

    def run_step(self, inputs, what: str, before=None):
        """Dispatch one model step (every process) under the watchdog; `before()` runs first
        inside the same guard (the leader's broadcast). -> the runner's StepResult, whose
        `fetch()` (the wait for the device) runs under the watchdog too."""
        shape = (inputs.bucket, inputs.tbo)
        timeout = self._timeout(shape)
        with self.guarded(timeout, what):
            if before is not None:
                before()
            out = self._runner.run(inputs)
        self._compiled.add(shape)
        return _GuardedResult(self, out, timeout, what)

    def _send(self, kind, inputs=None) -> None:
        self._channel.send(kind, inputs)
        self._last_send = time.monotonic()

    # ---- leader --------------------------------------------------------------------------
    def lead_step(self, inputs):
        """Leader: broadcast the step's inputs, dispatch the step. -> its (guarded) StepResult."""
        what = f"step {self._channel.seq} (bucket {inputs.bucket}, tbo {inputs.tbo})"
        return self.run_step(inputs, what, before=lambda: self._send(STEP, inputs))

    def keepalive(self, force: bool = False) -> None:
        """Leader: an empty plan if none was sent for `keepalive` seconds."""
        if self._channel is None or self.failed:
            return
        if not force and time.monotonic() - self._last_send < self.cfg.keepalive:
            return
        what = f"keepalive {self._channel.seq}"
        with self.guarded(self._timeout(), what):
            self._send(NOOP)

    def stop(self) -> None:
        """Leader: release the followers (they return from `follow`). Safe to call twice."""
        if self._channel is None or self.failed or not self.is_leader or self._stopped:
            return
        self._stopped = True
        with self.guarded(self._timeout(), "stop message"):
            self._channel.send(STOP)
        self.shutdown()

    def shutdown(self) -> None:
        """Leave the run now, together with the others (jax's shutdown barrier): a front end
        that dies of its signal afterwards (uvicorn re-raises SIGTERM) must not leave the
        followers waiting at that barrier for a process that never comes."""
        import jax

        try:
            with self.watchdog.guard(self.cfg.init_timeout, "leaving the run"):
                jax.distributed.shutdown()
        except Exception:  # noqa: BLE001 - the run is over either way
            log.exception("jax.distributed.shutdown failed")

    # ---- followers -----------------------------------------------------------------------
    def follow(self) -> int:
        """Follower: run every step process 0 plans until it says stop. -> steps run."""
        from atom_jax.distributed.follower import follow

        steps = follow(self, self._channel)
        self.shutdown()
        return steps
