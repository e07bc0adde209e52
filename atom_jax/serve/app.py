"""The FastAPI app: OpenAI-compatible routes over one EngineLoop.

    /v1/completions, /v1/chat/completions   (JSON, or SSE with "stream": true)
    /v1/models, /health, /metrics, /debug/engine
    /start_profile, /stop_profile           (with --enable-profiling: jax.profiler traces)

Bodies are parsed and validated off the event loop (serve/body.py); a Host / Origin check
guards against DNS rebinding (middleware.HostCheck).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from atom_jax.serve.engine_loop import EngineLoop, RequestStream, merged_outputs
from atom_jax.serve.errors import OpenAIError, install_error_handlers, unavailable
from atom_jax.serve.metrics import ServeMetrics
from atom_jax.serve.body import json_body, read_json
from atom_jax.serve.middleware import AllowedHosts, ApiKeyAuth, BodySizeLimit, HostCheck
from atom_jax.serve.prepare import PreparedRequest, prepare_chat, prepare_completion
from atom_jax.serve.profiling import DEFAULT_PROFILE_DIR, add_profile_routes
from atom_jax.serve.protocol import ChatCompletionRequest, CompletionRequest, ProfileRequest
from atom_jax.serve.responses import ChunkWriter, end_chunks, full_response, sse
from atom_jax.serve.streaming import EventStreamResponse, result_or_disconnect


@dataclasses.dataclass
class ServerSettings:
    model_name: str = "atom-jax-tiny"
    api_key: str | None = None
    max_waiting: int | None = None  # requests queued for a slot; None: unbounded
    max_body_bytes: int = 4 * 1024 * 1024
    warmup: bool = False
    shutdown_timeout: float = 10.0  # seconds to wait for the engine thread on shutdown
    enable_profiling: bool = False  # POST /start_profile and /stop_profile exist
    profile_dir: str | None = None  # every trace goes under it (None: DEFAULT_PROFILE_DIR)
    profile_steps: int | None = None  # trace the first model steps after warm-up into profile_dir
    host: str = "127.0.0.1"  # the bind address (Host headers naming it are allowed)
    allowed_hosts: tuple[str, ...] = ()  # more Host / Origin names; "*": any
    on_start_failure: object = None  # called with the reason if the engine cannot start


def create_app(settings: ServerSettings, build_engine) -> FastAPI:
    """`build_engine()` is called once, on the engine thread, when the app starts."""
    def prepare(engine):
        if settings.warmup:
            engine.warmup()
        if settings.profile_steps:
            engine.start_profile(profile_dir, settings.profile_steps)

    profile_dir = settings.profile_dir or DEFAULT_PROFILE_DIR
    metrics = ServeMetrics()
    engine_loop = EngineLoop(build_engine, settings.model_name,
                             warmup=prepare if settings.warmup or settings.profile_steps else None,
                             max_waiting=settings.max_waiting, metrics=metrics,
                             on_start_failure=settings.on_start_failure)
    metrics.engine_stats.snapshot = engine_loop.snapshot
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine_loop.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.to_thread(engine_loop.shutdown, settings.shutdown_timeout)

    app = FastAPI(title="atom_jax", summary="OpenAI-compatible API over the atom_jax engine",
                  lifespan=lifespan)
    app.state.engine_loop = engine_loop
    app.state.metrics = metrics
    install_error_handlers(app)
    # The last added runs first: check the key before buffering any body.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyAuth, api_key=settings.api_key)
    app.add_middleware(HostCheck, allowed=AllowedHosts(settings.host, settings.allowed_hosts))

    default_openapi = app.openapi

    def openapi_with_engine_limits():
        """The generated document plus the bounds only the built engine knows (token ids below
        the vocabulary size, output within the context), so clients and fuzzers see them."""
        doc = copy.deepcopy(default_openapi())
        add_body_schemas(doc, (CompletionRequest, ChatCompletionRequest, ProfileRequest))
        document_error_responses(doc)
        if engine_loop.info is not None:
            apply_engine_limits(doc, engine_loop.info)
        return doc

    app.openapi = openapi_with_engine_limits

    def engine_info():
        if engine_loop.failure:
            raise OpenAIError(503, f"the engine is unavailable: {engine_loop.failure}",
                              type="service_unavailable_error", code="engine_failed")
        if not engine_loop.ready.is_set() or engine_loop.info is None:
            raise unavailable("the engine is still loading; retry shortly", "server_starting", 5)
        return engine_loop.info

    @app.get("/health", summary="200 once the engine is ready (after warm-up), else 503")
    async def health():
        if engine_loop.failure:
            return JSONResponse({"status": "failed", "error": engine_loop.failure}, status_code=503)
        if not engine_loop.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        if engine_loop.stopped.is_set() or not engine_loop.snapshot().get("accepting", True):
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models", summary="The served model")
    async def models():
        info = engine_loop.info
        card = {"id": settings.model_name, "object": "model", "created": started,
                "owned_by": "atom_jax",
                "max_model_len": info.max_context if info else None,
                "vocab_size": info.vocab_size if info else None}
        return {"object": "list", "data": [card]}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/debug/engine", summary="Free pages and slots per rank, running/waiting counts")
    async def debug_engine():
        return engine_loop.snapshot()

    if settings.enable_profiling:
        add_profile_routes(app, engine_loop, profile_dir)

    @app.post("/v1/completions", summary="Text completion (OpenAI legacy completions API)",
              openapi_extra=json_body(CompletionRequest))
    async def completions(request: Request):
        arrival = time.perf_counter()
        body = await read_json(request, CompletionRequest)
        info = engine_info()
        prepared = await asyncio.to_thread(prepare_completion, body, info, arrival)  # tokenizes
        return await _respond(prepared, request)

    @app.post("/v1/chat/completions", summary="Chat completion",
              openapi_extra=json_body(ChatCompletionRequest))
    async def chat_completions(request: Request):
        arrival = time.perf_counter()
        body = await read_json(request, ChatCompletionRequest)
        info = engine_info()
        prepared = await asyncio.to_thread(prepare_chat, body, info, arrival)  # renders, tokenizes
        return await _respond(prepared, request)

    async def _respond(prepared: PreparedRequest, request: Request):
        info = engine_loop.info
        streams = await engine_loop.submit_all(prepared.choice_requests())

        def abort_unfinished():
            for stream in streams:
                if not stream.finished:
                    engine_loop.abort(stream.request_id)

        if prepared.stream:
            return EventStreamResponse(_events(streams, prepared, info), abort_unfinished)
        result = asyncio.ensure_future(asyncio.gather(*(s.final_output() for s in streams)))
        try:
            finals = await result_or_disconnect(result, request)
        finally:
            abort_unfinished()  # client gone, a choice failed or handler cancelled: free the pages now
            result.cancel()
        if finals is None:  # the client is gone; nobody reads this
            return Response(status_code=499)
        if any(f.finish_reason == "abort" for f in finals):
            raise unavailable("the request was aborted: the server is shutting down",
                              "request_aborted", 5)
        return JSONResponse(full_response(prepared, info, finals))

    async def _events(streams: list[RequestStream], prepared: PreparedRequest, info):
        writers = [ChunkWriter(prepared, info, i) for i in range(len(streams))]
        for writer in writers:
            for chunk in writer.start():
                yield chunk
        finals = [None] * len(streams)
        try:
            async for i, out in merged_outputs(streams):
                for chunk in writers[i].output(out):
                    yield chunk
                if out.finished:
                    finals[i] = out
        except OpenAIError as e:  # headers are sent: report in-band, as OpenAI does
            for stream in streams:  # a failed choice ends the response: stop the other choices
                if not stream.finished:
                    engine_loop.abort(stream.request_id)
            yield sse(e.body())
            yield sse("[DONE]")
            return
        for chunk in end_chunks(prepared, info, finals):
            yield chunk

    return app


def _cap_integers(node, maximum: int) -> None:
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node["maximum"] = min(node.get("maximum", maximum), maximum)
        for value in node.values():
            _cap_integers(value, maximum)
    elif isinstance(node, list):
        for value in node:
            _cap_integers(value, maximum)


def add_body_schemas(doc: dict, models) -> None:
    """The request body models (read by `body.read_json`, so FastAPI does not list them)."""
    from pydantic.json_schema import models_json_schema

    _, top = models_json_schema([(m, "validation") for m in models],
                                ref_template="#/components/schemas/{model}")
    doc.setdefault("components", {}).setdefault("schemas", {}).update(top.get("$defs", {}))


def document_error_responses(doc: dict) -> None:
    """Invalid requests are 400s with an OpenAI error body here (not FastAPI's 422), and a
    body without a JSON Content-Type is a 415."""
    error = {"description": "Invalid request: {\"error\": {message, type, param, code}}"}
    for operations in doc.get("paths", {}).values():
        for op in operations.values():
            responses = op.get("responses", {})
            if responses.pop("422", None) is not None or "requestBody" in op:
                responses["400"] = error
            if "requestBody" in op:
                responses["415"] = {"description": "The body is not sent as application/json"}


def apply_engine_limits(doc: dict, info) -> None:
    caps = {"prompt": info.vocab_size - 1, "stop_token_ids": info.vocab_size - 1,
            "max_tokens": info.max_context - 1, "max_completion_tokens": info.max_context - 1}
    for component in doc.get("components", {}).get("schemas", {}).values():
        props = component.get("properties", {})
        for name, cap in caps.items():
            if name in props:
                _cap_integers(props[name], cap)
