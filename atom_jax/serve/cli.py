"""`python -m atom_jax.serve`: the OpenAI-compatible HTTP server (FastAPI on uvicorn).

    python -m atom_jax.serve                      # embedded tiny trained model, 127.0.0.1:8000
    python -m atom_jax.serve --model /models/DeepSeek-V4-Flash --dp 8 --port 8000

Start-up compiles the step for every token bucket before /health turns ok (--no-warmup skips
that: then each new bucket compiles on the request that first needs it), with a persistent
compilation cache in ~/.cache/atom_jax/xla so a restart skips compiling.

SIGTERM / Ctrl-C: new requests get 503, in-flight ones are aborted (streams end with
finish_reason "abort"), then the engine thread stops and the process exits.

Multi-host: run the same command on every host with --coordinator-address / --num-processes /
--process-id (or under SLURM's srun); process 0 serves HTTP and schedules, the others run its
steps. If a process dies, the others fail their requests with 503 and exit with status 3.

A model that cannot load (a bad --model, too little memory) ends the process with status 1
after logging why, so a supervisor sees it.

Profiling is off unless asked for. `--enable-profiling` adds POST /start_profile {"dir": NAME,
"steps": N} and POST /stop_profile; every trace goes under --profile-dir (default
~/.cache/atom_jax/profiles), a request's "dir" naming only a sub-directory of it.
`--profile-steps N` traces the first N model steps after warm-up into --profile-dir. Read a
trace with `python -m atom_jax.trace report DIR`.

Security: the server answers only requests whose Host (and Origin, when sent) is its bind
address, a localhost name or a literal IP (a DNS-rebinding defence); --allowed-hosts adds names.
JSON endpoints require 'Content-Type: application/json'. A client must send a whole request
within --read-timeout seconds.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import uvicorn

from atom_jax.distributed import add_distributed_args
from atom_jax.engine.args import add_engine_args, configure_logging, positive_int, start_engine
from atom_jax.serve.http import protocol_with_timeout

log = logging.getLogger("atom_jax.serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m atom_jax.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    m = p.add_argument_group("served model")
    m.add_argument("--served-model-name", default=None, help="name in /v1/models and the "
                   "'model' field (default: the model directory's name, or atom-jax-tiny)")
    m.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="compile every step shape before /health reports ready, so no request "
                        "waits for a compile (default: on; --no-warmup to skip)")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    s.add_argument("--api-key", default=os.environ.get("ATOM_JAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1, /debug and the profile routes "
                        "(default: $ATOM_JAX_API_KEY; unset: no auth)")
    s.add_argument("--max-waiting", type=positive_int, default=None,
                   help="requests that may wait for a slot; more get 503 + Retry-After "
                        "(default: unbounded)")
    s.add_argument("--max-body-bytes", type=positive_int, default=4 * 1024 * 1024,
                   help="largest request body; larger ones get 413 (default: 4194304)")
    s.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds to wait for in-flight work on shutdown (default: 10)")
    s.add_argument("--enable-profiling", action="store_true",
                   help="add POST /start_profile and /stop_profile (default: off)")
    s.add_argument("--profile-dir", "--profile", dest="profile", metavar="DIR", default=None,
                   help="the directory every trace goes under (default: "
                        "~/.cache/atom_jax/profiles)")
    s.add_argument("--profile-steps", type=positive_int, default=None, metavar="N",
                   help="trace the first N model steps after warm-up into --profile-dir "
                        "(default: none)")
    s.add_argument("--allowed-hosts", type=_host_list, default=(), metavar="NAMES",
                   help="comma list of more Host / Origin names to answer ('*': any); the bind "
                        "address, localhost names and literal IPs are always allowed (default: none)")
    s.add_argument("--read-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a client must send a whole request (headers and body) within this "
                        "(default: 30)")
    s.add_argument("--print-memory", action="store_true",
                   help="print the memory plan (weight bytes per GPU, KV bytes per token, KV tokens "
                   "that fit) from the checkpoint's headers and exit, loading nothing (default: "
                   "serve)")
    s.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"),
                   help="log level of atom_jax and uvicorn (default: info)")
    s.add_argument("--no-access-log", action="store_true",
                   help="do not log each HTTP request (default: logged)")
    add_distributed_args(p)
    return p


def _host_list(text: str) -> tuple[str, ...]:
    return tuple(h.strip() for h in text.split(",") if h.strip())


def served_model_name(args) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.model and args.model != "random":
        return os.path.basename(os.path.normpath(args.model))
    return "atom-jax-tiny"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.read_timeout <= 0:
        parser.error("--read-timeout must be > 0")
    configure_logging(args.log_level)
    try:
        start = start_engine(args)
    except ValueError as e:
        parser.error(str(e))
    if args.print_memory:
        from atom_jax.sharding.memory import engine_memory_plan

        try:
            print(engine_memory_plan(start.config).format())
        except ValueError as e:  # ConfigError / CheckpointError: name the file, no traceback
            parser.error(str(e))
        return 0
    if not start.is_leader:
        start.follow()
        return 0

    from atom_jax.serve.app import ServerSettings, create_app

    def build_engine():
        engine = start.build()
        if start.cluster is not None:  # a lost process fails every request in flight, then exits
            start.cluster.add_failure_hook(app.state.engine_loop.cluster_failed)
        return engine

    settings = ServerSettings(model_name=served_model_name(args), api_key=args.api_key,
                              max_waiting=args.max_waiting, max_body_bytes=args.max_body_bytes,
                              warmup=args.warmup, shutdown_timeout=args.shutdown_timeout,
                              enable_profiling=args.enable_profiling, profile_dir=args.profile,
                              profile_steps=args.profile_steps, host=args.host,
                              allowed_hosts=args.allowed_hosts,
                              on_start_failure=lambda reason: server.exit_now())
    app = create_app(settings, build_engine)
    server = AbortingServer(uvicorn.Config(app, host=args.host, port=args.port,
                                           http=protocol_with_timeout(args.read_timeout),
                                           log_level=args.log_level,
                                           access_log=not args.no_access_log,
                                           timeout_graceful_shutdown=args.shutdown_timeout),
                            on_exit=app.state.engine_loop.begin_shutdown)
    server.run()
    failure = app.state.engine_loop.failure
    if failure and not app.state.engine_loop.ready.is_set():
        print(f"atom_jax.serve: the engine could not start: {failure}", file=sys.stderr, flush=True)
        return 1
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

    def exit_now(self) -> None:
        """From any thread (the engine thread, when the model cannot load): stop serving; the
        server loop polls this flag."""
        self.should_exit = True
