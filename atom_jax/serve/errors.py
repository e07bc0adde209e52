"""OpenAI-style error bodies: `{"error": {"message", "type", "param", "code"}}` for every
failure the server reports, including FastAPI's own validation and routing errors."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("atom_jax.serve")

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable_error"


class OpenAIError(Exception):
    """An error to report to the client as-is (status code + OpenAI error body)."""

    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str = INVALID_REQUEST, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def unavailable(message: str, code: str, retry_after: int = 1) -> OpenAIError:
    # Retry-After tells well-behaved clients (and the openai SDK) when to come back.
    return OpenAIError(503, message, type=UNAVAILABLE, code=code,
                       headers={"Retry-After": str(retry_after)})


def _param_of(loc) -> str | None:
    """("body", "messages", 0, "content") -> "messages.0.content"; None for the body itself."""
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> OpenAIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "invalid JSON")
        return bad_request(f"Malformed JSON body: {detail}", code="invalid_json")
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return bad_request("The request needs a JSON body", code="missing_body")
    if first.get("type") in ("model_attributes_type", "model_type", "dict_type") and len(first.get("loc", ())) <= 1:
        return bad_request("The request body must be a JSON object (Content-Type: application/json)",
                           code="invalid_body")
    # A union field reports one error per member; the first names the field well enough.
    messages, seen = [], set()
    for e in errors:
        param = _param_of(e.get("loc", ()))
        if param in seen:
            continue
        seen.add(param)
        messages.append(f"{param}: {e.get('msg')}" if param else str(e.get("msg")))
    # The top-level field names the parameter (union member tags only clutter it).
    loc = [p for p in first.get("loc", ()) if p != "body"]
    param = str(loc[0]) if loc else None
    return bad_request("Invalid request: " + "; ".join(messages[:5]), param=param,
                       code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        etype = INVALID_REQUEST if exc.status_code < 500 else SERVER_ERROR
        return JSONResponse(error_body(str(exc.detail), etype, None, code),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error while serving a request")
        return JSONResponse(error_body(f"Internal server error: {type(exc).__name__}",
                                       SERVER_ERROR, None, "internal_error"), status_code=500)
