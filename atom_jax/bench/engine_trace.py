"""`bench engine --trace DIR`: a profiler trace of a saturated run's engine steps and its compact
summary. `SaturatedTrace` starts the engine's own profiler (`Engine.start_profile(dir, steps)`,
which stops itself after that many model steps that did not compile) at the first step once the
run is saturated: the requests in flight reached min(max concurrency, prompts) and none of them
waits for a slot (or every slot is taken), after `skip` more steps and, with `decode_only`, at
the first of those in which no running sequence still prefills (a wave of long prompts is
saturated first while it prefills). `summarize` keeps, per device, what says where a step's
time goes (atom_jax.trace.report: step time, device-busy time and share, each category's union
time, the top kernels)."""

from __future__ import annotations

import os

TOP_KERNELS = 10


class SaturatedTrace:
    """Traces `steps` engine steps of one run into `log_dir` once it is saturated."""

    def __init__(self, log_dir: str, steps: int, target_in_flight: int, skip: int = 0, decode_only: bool = False):
        self.log_dir, self.steps, self.target, self.skip = log_dir, steps, target_in_flight, skip
        self.decode_only = decode_only
        self.saturated_at_step: int | None = None  # the engine's step count when saturation began
        self.started: dict | None = None  # the engine's state when the trace began

    @staticmethod
    def saturated(engine, in_flight: int, target: int) -> bool:
        sched = engine.scheduler
        if in_flight < target:
            return False
        slots = engine.config.num_slots * engine.config.dp
        return sched.num_waiting == 0 or sched.num_running >= slots

    def before_step(self, engine, in_flight: int) -> None:
        """Called before each engine step of the run: starts the trace `skip` steps after the
        first saturated one (with `decode_only`, at the first such step with no prefill)."""
        if self.started is not None:
            return
        step = engine.stats()["steps"]
        if self.saturated_at_step is None and self.saturated(engine, in_flight, self.target):
            self.saturated_at_step = step
        if self.saturated_at_step is None or step < self.saturated_at_step + self.skip:
            return
        running = [s for r in engine.scheduler.ranks for s in r.running]
        prefilling = sum(s.is_prefilling for s in running)
        if not (self.decode_only and (prefilling or engine.scheduler.num_waiting)):
            self.started = {"started_at_step": step, "saturated_at_step": self.saturated_at_step,
                            "in_flight": in_flight, "running": len(running), "prefilling": prefilling}
            engine.start_profile(self.log_dir, self.steps)

    def finish(self, engine) -> dict:
        """After the run: stop the trace if the run ended first; -> its summary (or why none)."""
        if self.started is None:
            if self.saturated_at_step is None:
                why = f"the run never had {self.target} requests in flight, all holding a slot"
            else:
                why = (f"the run ended within {self.skip} steps of saturating"
                       + (" or before a step with no prefill" if self.decode_only else ""))
            return {"dir": self.log_dir, "taken": False, "why": why}
        engine.stop_profile()  # None when it already stopped itself after `steps` steps
        from atom_jax.trace.report import report

        return {"dir": self.log_dir, "taken": True, **self.started,
                **summarize(report(self.log_dir, top=TOP_KERNELS))}


def summarize(rep: dict) -> dict:
    """A trace report (atom_jax.trace.report.report) cut to what the benchmark's JSON keeps."""
    devices = {}
    for name, d in rep["devices"].items():
        step = d["step_time_ms"]
        devices[name] = {
            "steps": d["steps"], "step_time_ms": step, "busy_ms": d["busy_ms"],
            "busy_share": round(d["busy_ms"] / step, 4) if step else None,
            "step_period_ms": d["step_period_ms"], "busy_share_of_period": d["busy_share_of_period"],
            "categories_union_ms": {c: v["union_ms"] for c, v in d["categories"].items()},
            "communication_exposed_ms": d["communication"]["exposed_ms"],
            "top_kernels": [{k: t[k] for k in ("name", "category", "count", "per_step_ms", "mean_us")}
                            for t in d["top_kernels"][:TOP_KERNELS]],
        }
    return {"annotated_steps": len(rep["annotated_steps"]), "compiled_steps": rep["compiled_steps"],
            "devices": devices}


def format_summary(trace: dict, kernels: int = 3) -> list[str]:
    """A few lines per device for the console."""
    if not trace["taken"]:
        return [f"trace: not taken ({trace['why']})"]
    lines = [f"trace of {trace['annotated_steps']} saturated steps from engine step {trace['started_at_step']} "
             f"({trace['running']} running, {trace['prefilling']} of them prefilling) in {os.path.abspath(trace['dir'])}"]
    if trace["compiled_steps"]:
        lines.append(f"  WARNING: traced steps {trace['compiled_steps']} compiled: their times are not run times")
    for name, d in trace["devices"].items():
        share = "-" if d["busy_share"] is None else f"{d['busy_share']:.0%}"
        cats = sorted(d["categories_union_ms"].items(), key=lambda kv: -kv[1])
        period = ("" if d.get("busy_share_of_period") is None else
                  f", period {d['step_period_ms']:.2f} ms ({d['busy_share_of_period']:.0%} busy)")
        lines.append(f"  {name}: step {d['step_time_ms']:.2f} ms, busy {d['busy_ms']:.2f} ms ({share}){period}; "
                     + ", ".join(f"{c} {ms:.2f}" for c, ms in cats[:4]))
        for k in d["top_kernels"][:kernels]:
            lines.append(f"    {k['per_step_ms']:8.3f} ms/step  {k['category']:<10} {k['name'][:70]}")
    return lines
