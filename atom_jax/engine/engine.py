"""`Engine`: the offline API (in the spirit of vLLM's `LLM`): add requests, step, stream
outputs, abort. Wires the DP scheduler (host), the model runner (device) and the tokenizer."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import logging
import os
import random

import jax.numpy as jnp

from atom_jax.cache import CacheLayout
from atom_jax.chat import ChatDelta, ChatPlan, ChatSettings, plan_chat
from atom_jax.default_model import load_resolved, load_resolved_tokenizer, model_format, resolve_model
from atom_jax.engine.args import EngineConfig
from atom_jax.engine.detokenizer import IncrementalDetokenizer
from atom_jax.engine.host_timing import HostClock
from atom_jax.engine.launcher import Launcher
from atom_jax.engine.outputs import Prefix, RequestOutput, TextPrefix
from atom_jax.engine.profiling import StepProfiler
from atom_jax.engine.runner import ModelRunner
from atom_jax.scheduler import PENDING, DPScheduler, RankConfig, SamplingParams, Sequence, make_delayer
from atom_jax.scheduler.validation import CheckedIds, check_request, check_text, checked_token_ids
from atom_jax.sharding import StepOptions, make_dp_mesh
from atom_jax.weights.formats import AUTO

log = logging.getLogger("atom_jax.engine")


class _Tracked:
    def __init__(self, seq: Sequence, tokenizer):
        self.seq, self.params = seq, seq.params
        self.prompt_ids = list(seq.prompt_token_ids)  # copied once, not per output
        self.logprobs: list[float] = []
        self.sent_tokens = 0
        # None without a tokenizer (token-id prompts only: no text, no stop strings)
        self.detok = IncrementalDetokenizer(tokenizer, seq.params.stop) if tokenizer is not None else None
        self.chat: ChatPlan | None = None
        self.chat_parser = None
        # the chat deltas so far, as pieces (joined once, for the finished message)
        self.chat_reasoning: list[str] = []
        self.chat_content: list[str] = []
        self.chat_calls: list = []
        self.error: str | None = None  # why the request failed (finish_reason "error")


class Engine:
    def __init__(self, config: EngineConfig | None = None, model=None, tokenizer="auto", cluster=None):
        """`cluster`: the `atom_jax.distributed` Cluster of a multi-host run (every process
        builds the same Engine; process 0 schedules, the others call `cluster.follow()`)."""
        self.config = cfg = config or EngineConfig()
        if cfg.compilation_cache_dir:
            import jax

            jax.config.update("jax_compilation_cache_dir", os.path.abspath(cfg.compilation_cache_dir))
            # A restart runs the same shapes: cache every compile, not only slow ones (here, so
            # every front end and every process of a multi-host run gets it).
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        dtype = jnp.dtype(cfg.dtype)
        source = resolve_model(cfg.model)  # the one place --model is interpreted
        import jax

        fmt = model.weights if model is not None else model_format(source, cfg.weights)
        layout = cfg.expert_layout_on(jax.default_backend(), fmt)  # the routed experts': kmajor / nmajor
        if model is None:
            # host: the runner places the parameters sharded (a model larger than one GPU must not
            # land whole on device 0 first)
            model = load_resolved(source, seed=cfg.seed, dtype=dtype, weights=cfg.weights, host=True,
                                  expert_layout=layout)
        elif cfg.expert_layout != AUTO:  # a given model keeps its own layout unless told otherwise
            from atom_jax.loader import with_expert_layout

            model = with_expert_layout(model, layout)
        self.model = model
        self.tokenizer = load_resolved_tokenizer(source) if tokenizer == "auto" else tokenizer
        self.chat_settings = ChatSettings(cfg.chat_template, cfg.reasoning_parser, cfg.thinking)
        # The one context limit (--max-model-len): a request must fit its page table and one
        # rank's pages; the page table is sized from it.
        self.max_context, pages_per_seq = cfg.context(model.cfg.max_position_embeddings)
        self.layout = CacheLayout(cfg.num_slots, cfg.num_pages, cfg.page_tokens, pages_per_seq,
                                  state_pages=cfg.state_pages())
        self.layout.check(model.cfg)
        opts = StepOptions(expert_mode=cfg.expert_mode, moe_backend=cfg.moe_backend,
                           attn_backend=cfg.attn_backend)
        self.mesh = make_dp_mesh(cfg.dp)
        self.clock = HostClock()  # host ms per step by phase (`host_times`)
        self.runner = ModelRunner(model, self.mesh, self.layout, opts, clock=self.clock,
                                  command_buffers=cfg.command_buffers)
        self.cluster = cluster
        if cluster is not None:
            cluster.attach(self.runner, cfg)
        self.reset_scheduler(cfg.delayer)
        self._ids = itertools.count()
        self._rng = random.Random(cfg.seed)
        self._profiler = StepProfiler()
        self._launcher = None  # the dispatch thread (`dispatch_thread`), started on first use
        self._warm = None  # compiles when warm-up ended

    def reset_scheduler(self, delayer: str = "auto", prefix_caching: bool | None = None):
        """A fresh scheduler (all requests dropped, prefix cache emptied) over the same compiled
        model runner: lets a benchmark compare scheduling policies without recompiling.
        `prefix_caching`: None keeps the config's; False turns the cache off; True needs an
        engine built with it."""
        cfg = self.config
        delayer = delayer if delayer != "auto" else ("on" if cfg.dp > 1 else "off")
        if prefix_caching is None:
            prefix_caching = cfg.enable_prefix_caching
        if prefix_caching and not self.layout.page_state:
            raise ValueError("prefix caching needs an engine built with enable_prefix_caching")
        rank = RankConfig(num_slots=cfg.num_slots, num_pages=cfg.num_pages, page_tokens=cfg.page_tokens,
                          max_tokens_per_step=cfg.max_tokens_per_step, chunk_size=cfg.chunk_size,
                          max_seq_len=self.max_context, enable_prefix_caching=prefix_caching,
                          prefix_state_pages=self.layout.state_pages,
                          window_pages=self.runner.window_pages)
        eos = set(self.model.cfg.eos_token_ids)
        if self.tokenizer is not None and getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.scheduler = DPScheduler(cfg.dp, rank, buckets=cfg.buckets, delayer=make_delayer(delayer),
                                     tbo=cfg.tbo, tbo_min_tokens=cfg.tbo_min_tokens,
                                     eos_token_ids=tuple(sorted(eos)))
        self._requests: dict[str, _Tracked] = {}
        self._in_flight = None  # overlap schedule: (StepPlan, StepResult) of the last step

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int] | None = None, params: SamplingParams | None = None,
                    request_id: str | None = None, prompt_token_ids: list[int] | None = None,
                    messages: list[dict] | None = None, tools: list[dict] | None = None,
                    tool_choice=None, chat_template_kwargs: dict | None = None,
                    chat: ChatPlan | None = None) -> str:
        """`messages` (OpenAI chat messages, with `tools`, `tool_choice`, `chat_template_kwargs`
        as the server takes them) are rendered by `plan_chat`; their outputs carry the parsed
        `chat` delta and, once finished, the assistant `message` (content, reasoning_content,
        tool_calls; finish_reason "tool_calls" when the model called tools). `chat`: a plan
        made earlier with `plan_chat` (then `prompt_token_ids` may be its encoded prompt)."""
        params = SamplingParams() if params is None else params  # validated when it was built
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if messages is not None:
            chat = self.plan_chat(messages, tools, tool_choice, chat_template_kwargs)
        ids = self.encode_prompt(prompt, prompt_token_ids, chat=chat)
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        check_request(len(ids), params, self.model.cfg.vocab_size, self.max_context)
        if params.seed is None:  # resolved now: the runner samples from seq.params alone
            params = dataclasses.replace(params, seed=self._rng.getrandbits(32))
        seq = Sequence(request_id, ids, params, copy=False)  # ids: encode_prompt's new list
        tracked = _Tracked(seq, self.tokenizer)
        if chat is not None and self.tokenizer is not None:
            tracked.chat, tracked.chat_parser = chat, chat.parser()
        self._requests[request_id] = tracked
        self.scheduler.add(seq)
        return request_id

    def plan_chat(self, messages: list[dict], tools=None, tool_choice=None,
                  chat_template_kwargs=None) -> ChatPlan:
        """The prompt and output parsing of a chat request (ValueError for bad input)."""
        return plan_chat(self.chat_settings, self._require_tokenizer(), messages, tools,
                         tool_choice, chat_template_kwargs)

    def encode_prompt(self, prompt=None, prompt_token_ids=None, messages=None,
                      chat: ChatPlan | None = None) -> list[int]:
        """The prompt's token ids, checked against the vocabulary, as a new list the caller owns
        (given ids are copied once and the copy is checked: a caller's later change to its list
        cannot reach the engine; a tokenizer's encode returns a new list). `CheckedIds` for this
        vocabulary were checked and copied already: their list is taken as it is."""
        if messages is not None:
            chat = self.plan_chat(messages)
        if chat is not None and prompt_token_ids is None:
            prompt_token_ids = self._require_tokenizer().encode(chat.prompt, add_bos=chat.add_bos)
        if prompt_token_ids is None and isinstance(prompt, list):
            prompt_token_ids = prompt
        if isinstance(prompt_token_ids, CheckedIds) and prompt_token_ids.vocab_size == self.model.cfg.vocab_size:
            ids = prompt_token_ids.ids  # checked and copied by the caller (the server, off this thread)
        elif prompt_token_ids is not None:
            ids = checked_token_ids("prompt", prompt_token_ids, self.model.cfg.vocab_size).ids
        elif isinstance(prompt, str):
            check_text("prompt", prompt)
            ids = self._require_tokenizer().encode(prompt)
        else:
            raise ValueError("give a prompt string, prompt_token_ids or messages")
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this model directory has no tokenizer: send prompt_token_ids")
        return self.tokenizer

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    # ---- stepping ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine iteration. Synchronous (`overlap_schedule` off): plan, run and read step
        N, then return its outputs. Overlap schedule (on): plan and dispatch step N+1 first (its
        decodes feed step N's tokens from the device), then read step N's tokens while step N+1
        runs, and return step N's outputs; a sequence that step N finished on a stop ran one
        step too many, whose token is dropped. Outputs are the same either way."""
        if not self.config.overlap_schedule:
            return self._step_sync()
        return self._step_overlap()

    def _step_sync(self) -> list[RequestOutput]:
        clock = self.clock
        clock.start()
        plan = self.scheduler.schedule()
        clock.lap("schedule")
        sampled = {}
        if not plan.is_empty:
            try:
                what = f"step bucket {plan.bucket}" + (" (TBO)" if plan.tbo else "")
                with self._profiler.step(lambda: self.runner.cache, what):
                    inputs = self.runner.host_inputs(plan)
                    clock.lap("pack")
                    result = self._run(inputs)
                    clock.lap("launch")
                    toks, lps = result.fetch()
                    clock.lap("wait")
            except Exception as e:
                self._fail(plan, e)  # a failed step fails the requests in it, never the engine
            else:
                for seq, tok, lp in zip(plan.sampled(), toks.tolist(), lps.tolist()):
                    sampled[seq.request_id] = tok
                    if seq.params.logprobs:
                        self._requests[seq.request_id].logprobs.append(lp)
        else:
            self.keepalive()
        out = self.scheduler.on_step_done(plan, sampled)
        clock.lap("resolve")
        outputs = self._outputs(out.new_tokens, out.finished)
        clock.stop("outputs")
        return outputs

    def _step_overlap(self) -> list[RequestOutput]:
        # decisions may use state one step old (README "Overlap schedule"): a sequence that step
        # N finishes still holds its slot and pages and is planned once more
        clock = self.clock
        clock.start()
        plan = self.scheduler.schedule()
        clock.lap("schedule")
        dispatched = failed = None
        # the annotation spans the whole iteration, so consecutive steps tile the timeline
        what = f"step bucket {plan.bucket}" + (" (TBO)" if plan.tbo else "")
        with self._profiler.step(None, what) if not plan.is_empty else contextlib.nullcontext():
            if not plan.is_empty:
                try:
                    inputs = self.runner.host_inputs(plan)
                    clock.lap("pack")
                    dispatched = (plan, self._run(inputs))
                except Exception as e:
                    failed = (plan, e)
                clock.lap("launch")
            # step N's tokens: step N+1 is queued behind it on the device
            outputs = self._resolve_in_flight()
        if plan.is_empty:
            self.keepalive()
        if failed is not None:
            self._fail(*failed)  # after step N resolved: a request it finished is not failed
        pending = {seq.request_id: PENDING for seq in plan.sampled()} if dispatched else {}
        out = self.scheduler.on_step_done(plan, pending)
        self._in_flight = dispatched
        clock.lap("resolve")
        outputs += self._outputs([], out.finished)
        clock.stop("outputs")
        return outputs

    def _resolve_in_flight(self) -> list[RequestOutput]:
        clock = self.clock
        if self._in_flight is None:
            return self._outputs([], self.scheduler.pop_finished())
        plan, result = self._in_flight
        self._in_flight = None
        try:
            toks, lps = result.fetch()
        except Exception as e:  # the step failed (on the device, or in the dispatch thread)
            self._fail(plan, e)  # as the synchronous loop: every request of the step
            return self._outputs([], self.scheduler.pop_finished())
        seqs = plan.sampled()
        clock.lap("wait")
        for seq, lp in zip(seqs, lps.tolist()):
            if seq.params.logprobs and seq.has_pending:  # (not finished, nor requeued since)
                tr = self._requests.get(seq.request_id)
                if tr is not None:
                    tr.logprobs.append(lp)
        out = self.scheduler.resolve(zip(seqs, toks.tolist()))
        clock.lap("resolve")
        outputs = self._outputs(out.new_tokens, out.finished)
        clock.lap("outputs")
        return outputs

    def _fail(self, plan, e: Exception) -> None:
        """Fail every request of `plan` (its step raised `e`); each says why. A request that
        was not in the step but reused the pages it offered to the prefix cache is recomputed."""
        if self._launcher is not None:
            # launches submitted after the failed one may still read the host page table (a
            # failed launch makes the next one upload it): none runs once planning goes on
            self._launcher.drain()
        self.runner.forget_rows()
        error = f"the model step failed: {type(e).__name__}: {e}"
        log.exception("model step failed; failing its %d request(s)", sum(len(work) for work in plan.per_rank),
                      exc_info=e)
        requeued = self.scheduler.forget_failed(plan)  # reused the step's unwritten pages
        if requeued:
            log.warning("%d request(s) admitted onto the failed step's pages are recomputed", len(requeued))
        for work in plan.per_rank:
            for w in work:
                tr = self._requests.get(w.request_id)
                if tr is not None and not w.seq.is_finished:
                    tr.error = error
                self.scheduler.fail(w.request_id)

    def _outputs(self, new_tokens, finished) -> list[RequestOutput]:
        touched = dict.fromkeys([seq.request_id for seq, _ in new_tokens] + [s.request_id for s in finished])
        outputs, requests = [], self._requests
        for rid in touched:  # (per request per step: the host's hot path)
            tr = requests.get(rid)
            if tr is None:
                continue
            if tr.detok is not None:
                self._check_stop_strings(tr)
            outputs.append(self._output(tr))
            if tr.seq.is_finished:
                del requests[rid]
        return outputs

    @property
    def idle_interval(self) -> float | None:
        """Multi-host: call `keepalive()` at least this often while idle (None: never needed)."""
        return self.cluster.cfg.keepalive if self.cluster is not None else None

    def keepalive(self) -> None:
        if self.cluster is not None:
            self.cluster.keepalive()

    def close(self) -> None:
        """Multi-host: release the other processes (their `follow()` returns). Ends the
        dispatch thread, if one runs."""
        if self._launcher is not None:
            self._launcher.close()
            self._launcher = None
        if self.cluster is not None:
            self.cluster.stop()

    def _run(self, inputs):
        """One model step on the device(s). Multi-host: the cluster broadcasts `inputs` first
        and runs the step under its watchdog (a failure there ends the process)."""
        if self.cluster is not None:
            return self.cluster.lead_step(inputs)
        if self.config.dispatch_thread and self.config.overlap_schedule:
            if self._launcher is None:
                self._launcher = Launcher(lambda step: self.runner.launch(step))
            # packed here, launched there: the dispatch thread only calls the step program
            return self._launcher.submit(self.runner.prepare(inputs))
        if self._launcher is not None:  # the thread was turned off: let its launches finish
            self._launcher.close()
            self._launcher = None
        return self.runner.run(inputs)

    def _check_stop_strings(self, tr: _Tracked):
        """Feed the request's new tokens to its detokenizer; a stop string ends it."""
        if tr.detok is None:
            return
        was_finished = tr.seq.is_finished
        new = tr.seq.output_token_ids[len(tr.detok.ids):]
        if tr.detok.add(new) and not was_finished:
            self.scheduler.finish(tr.seq.request_id, "stop")
        if tr.seq.is_finished:
            tr.detok.finish()

    def _output(self, tr: _Tracked) -> RequestOutput:
        """`text`: the request's text that is final so far (all of it once finished, cut at a
        stop string); `delta_text`: what of it is new since the last output. O(the new tokens):
        the cumulative fields are views of the request's history (`engine/outputs.py`)."""
        seq = tr.seq
        toks = seq.output_token_ids
        n = len(toks)
        if n and toks[-1] == PENDING:  # (not read yet: not an output token)
            n -= 1
        new = toks[tr.sent_tokens:n]
        tr.sent_tokens = n
        finished = seq.is_finished
        text = delta = None
        if tr.detok is not None:
            delta = tr.detok.delta(finished)
            text = TextPrefix(tr.detok.pieces, len(tr.detok.pieces), tr.detok.num_sent)
        reason, chat, message = seq.finish_reason, None, None
        if tr.chat_parser is not None:
            chat = tr.chat_parser.feed(delta or "")
            if finished:
                chat.extend(tr.chat_parser.finish())
                reason = tr.chat_parser.finish_reason(reason)
            tr.chat_reasoning.append(chat.reasoning)
            tr.chat_content.append(chat.content)
            tr.chat_calls.extend(chat.tool_calls)
            if finished:
                total = ChatDelta("".join(tr.chat_reasoning), "".join(tr.chat_content), list(tr.chat_calls))
                message = tr.chat.to_message(total)
        return RequestOutput(seq.request_id, tr.prompt_ids, Prefix(toks, n), new, text, delta,
                             finished, reason, Prefix(tr.logprobs), chat, message, seq.num_cached_tokens or 0,
                             tr.error if seq.finish_reason == "error" else None)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts (strings or token-id lists) to completion; outputs in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        final = {}
        while self.has_unfinished():
            for o in self.step():
                if o.finished:
                    final[o.request_id] = o
        return [final[i] for i in ids]

    def warmup(self) -> None:
        """Compile every bucket's step now (with `compilation_cache_dir`, later runs reuse it)."""
        from atom_jax.engine.warmup import warm_up

        warm_up(self)
        self.reset_scheduler(self.config.delayer)  # warm-up requests leave no trace in metrics
        self._warm = self._profiler.compiles
        # What is alive now (weights' pytrees, compiled programs, tokenizer) lives as long as the
        # engine: freeze it so the collector's full passes during serving do not walk it (a pause
        # in the engine loop is a step the device waits for; SGLang and vLLM freeze after warm-up).
        gc.collect()
        gc.freeze()

    def memory_plan(self, gpu_bytes: int | None = None):
        """The deployment's memory plan (`sharding.memory`) for this engine's model and settings,
        reserving the largest temporaries of the step programs compiled so far (XLA's memory
        analysis; the fixed default reserve before any, or where the backend reports none)."""
        from atom_jax.sharding.memory import engine_memory_plan

        temps = [t for t in self.runner.temp_bytes.values() if t is not None]
        return engine_memory_plan(self.config, gpu_bytes, model=self.model,
                                  reserve_bytes=max(temps) if temps else None)

    def start_profile(self, log_dir: str, steps: int | None = None) -> None:
        """Start a jax.profiler trace into `log_dir`; each model step is annotated. With `steps`,
        it stops by itself after that many model steps. ValueError if a trace is running."""
        self._profiler.start(log_dir, steps)

    def stop_profile(self) -> str | None:
        """Stop the trace and write it; its log dir, or None when none was running."""
        return self._profiler.stop()

    @property
    def buckets(self) -> tuple[int, ...]:
        """Token buckets a step is padded to (one compiled program each)."""
        return tuple(self.scheduler.buckets)

    def host_times(self, reset: bool = False) -> dict:
        """The engine loop's host time: ms per step by phase (`atom_jax.engine.host_timing`)
        since the last reset; `reset` starts a new count after reading this one."""
        out = self.clock.snapshot()
        if self._launcher is not None:  # its "launch": the runner's launch, timed on that thread
            out["dispatch_thread"] = self._launcher.clock.snapshot()
        if reset:
            self.clock.reset()
            if self._launcher is not None:
                self._launcher.clock.reset()
        return out

    def stats(self) -> dict:
        """The scheduler's counters (cumulative, plus the last step)."""
        return self.scheduler.metrics.snapshot()

    def snapshot(self) -> dict:
        """The engine's state in one consistent read, for /debug/engine and /metrics: per
        rank pages and slots, running / waiting totals and the scheduler's counters."""
        stats = self.stats()
        compiles = self._profiler.compiles  # inside model steps (warm-up included)
        after = None if self._warm is None else (compiles - self._warm).count
        return {"ranks": self.scheduler.rank_states(), "num_running": stats["num_running"],
                "num_waiting": stats["num_waiting"], "stats": stats,
                # after_warmup > 0: a step shape warm-up did not cover compiled on a request
                "step_compiles": {"count": compiles.count, "cached": compiles.cached,
                                  "seconds": round(compiles.seconds, 3), "after_warmup": after}}
