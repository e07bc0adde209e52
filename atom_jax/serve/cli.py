"""`python -m atom_jax.serve`: the OpenAI-compatible HTTP server (FastAPI on uvicorn).

    python -m atom_jax.serve                      # embedded tiny trained model, 127.0.0.1:8000
    python -m atom_jax.serve --model /models/DeepSeek-V4-Flash --dp 8 --warmup --port 8000

SIGTERM / Ctrl-C: new requests get 503, in-flight ones are aborted (streams end with
finish_reason "abort"), then the engine thread stops and the process exits.

Multi-host: run the same command on every host with --coordinator-address / --num-processes /
--process-id (or under SLURM's srun); process 0 serves HTTP and schedules, the others run its
steps. If a process dies, the others fail their requests with 503 and exit with status 3.

Profiling: `--profile DIR --profile-steps N` traces the first N model steps after warm-up;
POST /start_profile {"dir": ..., "steps": N} and POST /stop_profile trace on demand. Read a
trace with `python -m atom_jax.trace report DIR`.
"""

from __future__ import annotations

import argparse
import logging
import os

import uvicorn

from atom_jax.distributed import add_distributed_args, resolve as resolve_distributed
from atom_jax.kernels.names import MOE_BACKENDS
from atom_jax.scheduler import TBO_MIN_TOKENS

log = logging.getLogger("atom_jax.serve")


def _buckets(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--buckets takes a comma list of ints, got {text!r}")
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"--buckets needs positive ints, got {text!r}")
    return values


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected an int > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    # Defaults mirror EngineConfig's; it is not imported here because that imports jax.
    p = argparse.ArgumentParser(prog="python -m atom_jax.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, help="model directory (default: the embedded tiny "
                   "model trained on stdlib docstrings, byte tokenizer; 'random': the same shapes "
                   "with random weights)")
    m.add_argument("--served-model-name", default=None, help="name in /v1/models and the "
                   "'model' field (default: the model directory's name, or atom-jax-tiny)")
    m.add_argument("--dtype", default="float32")
    m.add_argument("--seed", type=int, default=0)
    e = p.add_argument_group("engine (per DP rank)")
    e.add_argument("--dp", type=_positive, default=None,
                   help="data-parallel ranks (devices; default 1, multi-host: every device)")
    e.add_argument("--max-tokens-per-step", type=_positive, default=256)
    e.add_argument("--chunk-size", type=_positive, default=256)
    e.add_argument("--buckets", type=_buckets, default=None,
                   help="comma list of step token buckets (default: powers of 2 up to the budget)")
    e.add_argument("--num-slots", type=_positive, default=16)
    e.add_argument("--num-pages", type=_positive, default=256)
    e.add_argument("--page-tokens", type=_positive, default=128)
    e.add_argument("--max-pages-per-seq", type=_positive, default=32,
                   help="context = page-tokens * max-pages-per-seq")
    e.add_argument("--tbo", choices=("on", "off", "auto"), default="auto",
                   help="two-batch overlap (auto: on for steps of >= --tbo-min-tokens per rank)")
    e.add_argument("--tbo-min-tokens", type=_positive, default=TBO_MIN_TOKENS)
    e.add_argument("--moe-backend", choices=MOE_BACKENDS, default="auto",
                   help="routed-expert grouped GEMM (auto: ragged_dot on CPU; on GPU tokamax for "
                   "small groups on Hopper when installed, else the Pallas kernel)")
    e.add_argument("--delayer", choices=("off", "on", "coalesce", "auto"), default="auto",
                   help="cross-rank prefill gate (auto: on for dp > 1)")
    e.add_argument("--compilation-cache-dir", default=None,
                   help="persistent XLA compilation cache (makes restarts fast)")
    e.add_argument("--warmup", action="store_true",
                   help="compile every step shape before /health reports ready")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("ATOM_JAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1, /debug and the profile routes "
                        "(default: $ATOM_JAX_API_KEY; unset: no auth)")
    s.add_argument("--max-waiting", type=_positive, default=None,
                   help="requests that may wait for a slot; more get 503 + Retry-After "
                        "(default: unbounded)")
    s.add_argument("--max-body-bytes", type=_positive, default=4 * 1024 * 1024)
    s.add_argument("--shutdown-timeout", type=float, default=10.0)
    s.add_argument("--profile", metavar="DIR", default=None,
                   help="default trace dir of POST /start_profile (default: a new temp dir)")
    s.add_argument("--profile-steps", type=_positive, default=None, metavar="N",
                   help="with --profile: trace the first N model steps after warm-up")
    s.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))
    s.add_argument("--no-access-log", action="store_true")
    add_distributed_args(p)
    return p


def _prepare_jax_env(dp: int) -> None:
    """Before jax is imported: give the CPU backend `dp` devices when asked for more than one
    (harmless on GPU hosts, where it only affects the unused host platform)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if dp > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={dp}".strip()


def engine_config(args):
    from atom_jax.engine.engine import EngineConfig

    return EngineConfig(
        model=args.model, dp=args.dp, dtype=args.dtype, num_slots=args.num_slots,
        num_pages=args.num_pages, page_tokens=args.page_tokens,
        max_pages_per_seq=args.max_pages_per_seq, max_tokens_per_step=args.max_tokens_per_step,
        chunk_size=args.chunk_size, buckets=args.buckets,
        tbo={"on": True, "off": False, "auto": None}[args.tbo], tbo_min_tokens=args.tbo_min_tokens,
        delayer=args.delayer, seed=args.seed, compilation_cache_dir=args.compilation_cache_dir,
        moe_backend=args.moe_backend)


def served_model_name(args) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.model and args.model != "random":
        return os.path.basename(os.path.normpath(args.model))
    return "atom-jax-tiny"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.profile_steps and not args.profile:
        parser.error("--profile-steps needs --profile DIR")
    try:
        dist = resolve_distributed(args)
    except ValueError as e:
        parser.error(str(e))
    if dist is None:
        args.dp = args.dp or 1
        _prepare_jax_env(args.dp)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cluster = None
    if dist is not None:
        from atom_jax.distributed import initialize

        cluster = initialize(dist)
        import jax

        args.dp = args.dp or jax.device_count()
        if not cluster.is_leader:
            return _follow(args, cluster)

    from atom_jax.serve.app import ServerSettings, create_app

    config = engine_config(args)

    def build_engine():
        from atom_jax.engine.engine import Engine

        engine = Engine(config, cluster=cluster)
        if cluster is not None:  # a lost process fails every request in flight, then exits
            cluster.add_failure_hook(app.state.engine_loop.cluster_failed)
        return engine

    settings = ServerSettings(model_name=served_model_name(args), api_key=args.api_key,
                              max_waiting=args.max_waiting, max_body_bytes=args.max_body_bytes,
                              warmup=args.warmup, shutdown_timeout=args.shutdown_timeout,
                              profile_dir=args.profile, profile_steps=args.profile_steps)
    app = create_app(settings, build_engine)
    server = AbortingServer(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level=args.log_level,
                                           access_log=not args.no_access_log,
                                           timeout_graceful_shutdown=args.shutdown_timeout),
                            on_exit=app.state.engine_loop.begin_shutdown)
    server.run()
    return 0


def _follow(args, cluster) -> int:
    """A process other than 0: build the same engine, run process 0's steps until it stops."""
    from atom_jax.engine.engine import Engine

    log.info("process %d of %d: following process 0 (dp=%d)", cluster.process_id,
             cluster.num_processes, args.dp)
    Engine(engine_config(args), cluster=cluster)
    steps = cluster.follow()
    log.info("process %d: process 0 stopped; exiting after %d steps", cluster.process_id, steps)
    return 0


class AbortingServer(uvicorn.Server):
    """uvicorn waits for open responses to finish before it runs the app's shutdown; a stream
    can run for minutes, so abort them all as soon as the signal arrives."""

    def __init__(self, config, on_exit):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame):
        self._on_exit()
        super().handle_exit(sig, frame)
