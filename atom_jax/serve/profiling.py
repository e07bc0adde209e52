"""POST /start_profile and /stop_profile: jax.profiler traces of engine steps, on demand.

Off unless the server starts with --enable-profiling (the routes do not exist otherwise).
Every trace goes under the one directory given at start (--profile-dir); a request may name
only a sub-directory of it (one path component), never a path of its own choosing.
A profiler failure (a trace that cannot be written) is reported to the caller of
/stop_profile or logged, never fails a request, and leaves the profiler usable.
"""

from __future__ import annotations

import os
import re

from fastapi import FastAPI, Request

from atom_jax.engine.profiling import ProfilerBusy
from atom_jax.serve.body import json_body, read_json
from atom_jax.serve.errors import SERVER_ERROR, OpenAIError, bad_request
from atom_jax.serve.protocol import ProfileRequest

DEFAULT_PROFILE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "atom_jax", "profiles")
_SUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def trace_dir(root: str, name: str | None) -> str:
    """`root` itself, or `root/name` for a plain sub-name (400 for anything else: separators,
    '..', absolute paths)."""
    if name is None:
        return root
    if not _SUB_NAME.fullmatch(name) or ".." in name:
        raise bad_request("dir must be a plain sub-directory name (letters, digits, '.', '_', "
                          f"'-'; no '/' or '..'): traces go under {root}", param="dir",
                          code="invalid_profile_dir")
    return os.path.join(root, name)


def add_profile_routes(app: FastAPI, engine_loop, profile_dir: str) -> None:
    root = os.path.abspath(profile_dir)

    @app.post("/start_profile", summary="Start a jax.profiler trace of engine steps (under "
              "--profile-dir)", openapi_extra=json_body(ProfileRequest, required=False))
    async def start_profile(request: Request):
        body = await read_json(request, ProfileRequest, optional=True) or ProfileRequest()
        log_dir = trace_dir(root, body.dir)
        try:
            await engine_loop.start_profile(log_dir, body.steps)
        except ProfilerBusy as e:
            raise OpenAIError(400, f"could not start the profiler: {e}", code="profile_running")
        except ValueError as e:  # the dir cannot hold a trace (a file there, no permission)
            raise OpenAIError(400, f"could not start the profiler: {e}", param="dir",
                              code="profile_dir_unusable")
        return {"dir": log_dir, "steps": body.steps}

    @app.post("/stop_profile", summary="Stop the profiler trace and write it; its dir")
    async def stop_profile():
        try:
            log_dir = await engine_loop.stop_profile()
        except RuntimeError as e:  # writing failed; the profiler was reset and can start again
            raise OpenAIError(500, str(e), type=SERVER_ERROR, code="profile_write_failed")
        if log_dir is None:
            raise OpenAIError(400, "no profiler trace is running", code="profile_not_running")
        return {"dir": log_dir}
