"""Request bodies: Content-Type check, JSON parse, early size caps, Unicode check and model
validation, run in a worker thread so a big body (100,000 chat messages, a long token list)
never stalls the event loop that serves every other request (/health included).

The routes declare no pydantic body parameter (FastAPI would parse it on the event loop); they
call `read_json(request, Model)` and name the model in their OpenAPI document (`json_body`).
"""

from __future__ import annotations

import asyncio
import json

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from atom_jax.scheduler.validation import InvalidRequest, check_strings, check_text
from atom_jax.serve.errors import OpenAIError, bad_request, validation_error

# Before the model validates anything: a cap per list field that no real request reaches
# (each message costs prompt tokens; the context bounds the rest), so the cost of validating
# one body is bounded whatever its size.
MAX_MESSAGES = 4096
MAX_TOOLS = 1024


def json_body(model: type[BaseModel], required: bool = True) -> dict:
    """`openapi_extra` for a route that reads `model` with `read_json` (the schema itself is
    added to the document's components by the app)."""
    return {"requestBody": {"required": required, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_json(request: Request, model: type[BaseModel], *, optional: bool = False):
    """The validated body, or an OpenAIError (415 without a JSON Content-Type, 400 otherwise).
    With `optional`, an empty body gives None."""
    raw = await request.body()
    if optional and not raw.strip():
        return None
    if not _is_json(request.headers.get("content-type", "")):
        raise OpenAIError(415, "send the body as JSON with 'Content-Type: application/json'",
                          code="unsupported_media_type")
    return await asyncio.to_thread(parse, raw, model)


def parse(raw: bytes, model: type[BaseModel]):
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError as e:
        raise bad_request(f"Malformed JSON body: not UTF-8 ({e.reason} at byte {e.start})",
                          code="invalid_json") from None
    except RecursionError:
        raise bad_request("Malformed JSON body: nested too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, and integers too long to convert
        raise bad_request(f"Malformed JSON body: {e}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise bad_request("The request body must be a JSON object", code="invalid_body")
    for field, cap in (("messages", MAX_MESSAGES), ("tools", MAX_TOOLS)):
        value = obj.get(field)
        if isinstance(value, list) and len(value) > cap:
            raise bad_request(f"{field} holds {len(value)} entries; at most {cap} are accepted",
                              param=field, code="too_many_entries")
    check_unicode(obj)
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        errors = [dict(err, loc=("body", *err.get("loc", ()))) for err in e.errors()]
        raise validation_error(RequestValidationError(errors)) from None


def check_unicode(obj: dict) -> None:
    """400 naming the top-level field for a lone surrogate anywhere in the body: JSON allows
    `"\\ud800"`, but no tokenizer can encode it and no response can echo it."""
    for field, value in obj.items():
        try:
            check_text("a field name", field)
        except InvalidRequest as e:
            raise bad_request(str(e), code=e.code) from None
        try:
            check_strings(field, value)
        except InvalidRequest as e:
            raise bad_request(str(e), param=field, code=e.code) from None
