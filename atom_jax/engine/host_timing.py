"""`HostClock`: where the engine loop's host time goes, by phase, measured with
`time.perf_counter` (a few laps per step: cheap enough to stay always on; works the same on
CPU and GPU). `python -m atom_jax.bench decode` prints it per case.

Phases of one engine iteration (`Engine.step`), in the order they run:
  schedule  planning the step (scheduler: delayer, decodes, prefill chunks, admissions)
  pack      the step's numpy inputs (`ModelRunner.host_inputs`, then `prepare`: the packed
            token buffer and sampling block, page-table rows)
  transfer  host-to-device copies made before the call: a whole page table when a step
            replaces it; a multi-process run's input block (a multi-host leader's plan
            broadcast counts in pack). One process: the input block is copied by the call
            itself (jax's C++ dispatch), inside launch
  launch    the call of the compiled step: jit dispatch, the input block's copy, and on GPU
            XLA's kernel launches (it returns before the device has run the step; on CPU, a
            step whose inputs are all ready may run inline here). With the dispatch thread,
            the engine thread's launch is the hand-off; the thread's own clock times the call
  wait      blocked on the device, reading a step's sampled tokens (synchronous loop: the whole
            device step; overlap schedule: the part of it the host did not hide)
  resolve   the read tokens into the scheduler (stop checks, `max_tokens`, page bookkeeping)
  outputs   stop strings, detokenisation and the `RequestOutput`s
Host time per step is everything but `wait`. Each phase is also timed in the thread's own
CPU time (`time.thread_time`): what the host worked, without the time other threads or
processes held the core (on a shared or busy CPU the wall times swell, the CPU times less)."""

from __future__ import annotations

import time

PHASES = ("schedule", "pack", "transfer", "launch", "wait", "resolve", "outputs")


class HostClock:
    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.cpu_seconds = dict.fromkeys(PHASES, 0.0)
        self.steps = 0
        self._t = self._cpu = None

    def start(self) -> None:
        """A step begins: laps measure from here."""
        self._t, self._cpu = time.perf_counter(), time.thread_time()

    def lap(self, phase: str) -> None:
        """Charge the time since the last lap (or `start`) to `phase`. No-op outside a step."""
        t, c = self._t, self._cpu  # read once: another thread's reset may clear them meanwhile
        if t is None:
            return
        now, cpu = time.perf_counter(), time.thread_time()
        self.seconds[phase] += now - t
        self.cpu_seconds[phase] += cpu - c
        self._t, self._cpu = now, cpu

    def stop(self, phase: str) -> None:
        """The step ends; the time since the last lap goes to `phase`."""
        self.lap(phase)
        if self._t is not None:
            self.steps += 1
        self._t = None

    def snapshot(self) -> dict:
        """ms per step by phase since `reset`, plus `host` (all but `wait`) and `total`; the
        same in thread CPU time under "cpu"."""
        out = _per_step(self.seconds, self.steps)
        out["steps"] = self.steps
        out["cpu"] = _per_step(self.cpu_seconds, self.steps)
        return out


def _per_step(seconds: dict, steps: int) -> dict:
    n = max(steps, 1)
    out = {p: round(1e3 * s / n, 4) for p, s in seconds.items()}
    out["host"] = round(sum(v for p, v in out.items() if p != "wait"), 4)
    out["total"] = round(out["host"] + out["wait"], 4)
    return out
