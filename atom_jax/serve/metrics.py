"""Prometheus metrics on a registry of the server's own (not the process-global one, so two
apps in one process, as in tests, do not collide).

Latency histograms and token counters are observed by the engine thread as outputs appear;
scheduler-derived values (running / waiting, KV usage, padding waste, delayer outcomes, TBO
steps) are read at scrape time from the snapshot the engine thread publishes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "atom_jax_"

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


class EngineStatsCollector:
    """Yields gauges and counters from `snapshot()` (EngineLoop.snapshot) on every scrape."""

    def __init__(self, snapshot):
        self.snapshot = snapshot  # settable: the engine loop is made after the metrics

    def describe(self):
        return self._families({})

    def collect(self):
        return self._families(self.snapshot())

    def _families(self, snap: dict):
        stats = snap.get("stats") or {}
        ranks = snap.get("ranks") or []

        def gauge(name, doc, value):
            return GaugeMetricFamily(PREFIX + name, doc, value=value)

        yield gauge("engine_ready", "1 once the engine is built and warmed up", 1.0 if snap.get("ready") else 0.0)
        yield gauge("num_requests_running", "Requests holding a slot (prefilling or decoding)",
                    snap.get("num_running", 0))
        yield gauge("num_requests_waiting", "Requests queued for a slot", snap.get("num_waiting", 0))
        used = sum(r["num_pages"] - r["free_pages"] for r in ranks)
        total = sum(r["num_pages"] for r in ranks)
        yield gauge("kv_cache_usage_ratio", "Fraction of KV cache pages in use, all ranks",
                    used / total if total else 0.0)
        free = GaugeMetricFamily(PREFIX + "kv_cache_free_pages", "Free KV cache pages per rank",
                                 labels=["rank"])
        for r in ranks:
            free.add_metric([str(r["rank"])], r["free_pages"])
        yield free
        yield gauge("padding_waste_ratio", "Padded share of all step token slots so far "
                    "(token-weighted, 1 - real / (dp * bucket))", stats.get("padding_waste", 0.0))
        last = stats.get("last_step") or {}
        yield gauge("last_step_padding_waste_ratio", "Padding waste of the last step",
                    last.get("padding_waste", 0.0))
        delayer = CounterMetricFamily(PREFIX + "delayer_decisions", "Prefill gate outcomes per "
                                      "scheduler tick", labels=["outcome"])
        for outcome, n in sorted((stats.get("delayer") or {}).items()):
            delayer.add_metric([outcome], n)
        yield delayer
        tbo = CounterMetricFamily(PREFIX + "tbo_steps", "Engine steps by two-batch overlap",
                                  labels=["tbo"])
        tbo.add_metric(["on"], stats.get("tbo_on_steps", 0))
        tbo.add_metric(["off"], stats.get("tbo_off_steps", 0))
        yield tbo
        yield CounterMetricFamily(PREFIX + "engine_steps", "Steps that ran the model",
                                  value=stats.get("steps", 0))
        yield CounterMetricFamily(PREFIX + "preemptions", "Sequences preempted for KV pages",
                                  value=stats.get("num_preemptions", 0))
        pc = stats.get("prefix_cache") or {}
        for name, key, doc in (
                ("prefix_cache_queries", "queries", "Admissions that looked the prefix cache up"),
                ("prefix_cache_hits", "hits", "Admissions that reused cached prefix pages"),
                ("prefix_cache_queried_tokens", "queried_tokens", "Tokens to compute at those "
                 "admissions without the cache"),
                ("prefix_cache_hit_tokens", "hit_tokens", "Tokens reused from the prefix cache "
                 "instead of computed"),
                ("prefix_cache_evictions", "evictions", "Cached pages evicted for new ones"),
                ("prefix_cache_state_evictions", "state_evictions", "Cached pages whose window "
                 "state was dropped for new pages (no longer a reuse point)")):
            yield CounterMetricFamily(PREFIX + name, doc, value=pc.get(key, 0))
        yield gauge("prefix_cache_pages", "Pages in the prefix cache (held or not), all ranks",
                    pc.get("cached_pages", 0))
        buckets = CounterMetricFamily(PREFIX + "bucket_steps", "Steps per token bucket",
                                      labels=["bucket"])
        for b, n in (stats.get("bucket_steps") or {}).items():
            buckets.add_metric([str(b)], n)
        yield buckets


class ServeMetrics:
    def __init__(self, snapshot=lambda: {}):
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Request arrival to first "
                              "output token", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between output tokens "
                             "of a request", buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Request arrival to its "
                             "last token", buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of admitted "
                                     "requests", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens",
                                         registry=r)
        self.requests_finished = Counter(PREFIX + "requests_finished", "Finished requests",
                                         ["finish_reason"], registry=r)
        self.requests_rejected = Counter(PREFIX + "requests_rejected", "Requests refused before "
                                         "reaching the engine", ["reason"], registry=r)
        self.engine_stats = EngineStatsCollector(snapshot)
        r.register(self.engine_stats)

    def render(self) -> bytes:
        return generate_latest(self.registry)
