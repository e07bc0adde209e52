"""Reading and validating the input JSONL, in two passes so `--strict` can refuse a file
before any work: `parse_input` checks syntax and field types without the engine (fast, runs
before the model loads); `encode_requests` then asks the engine to tokenise each prompt and
checks it against the model. Both use the validation the server and the Engine API use
(`atom_jax.scheduler.validation`, SamplingParams, the chat plan), so a line is accepted exactly
when the server would accept the same request."""

from __future__ import annotations

import array
import dataclasses
import json
import zlib

from atom_jax.engine.args import REQUEST_DEFAULT_TEMPERATURE
from atom_jax.scheduler import SamplingParams
from atom_jax.scheduler.validation import InvalidRequest, check_messages, check_request, check_text

PROMPT_FIELDS = ("prompt", "messages", "prompt_token_ids")
CHAT_FIELDS = ("tools", "tool_choice", "chat_template_kwargs")  # with messages, as the server takes them
# A line's own sampling fields; SamplingParams checks their types and ranges.
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
                   "ignore_eos")


@dataclasses.dataclass
class BadLine:
    line_no: int
    reason: str


@dataclasses.dataclass
class InputRequest:
    line_no: int
    id: str | int  # as given, echoed in the output
    key: str  # json.dumps(id): 1 and "1" stay different ids
    params: SamplingParams
    prompt: dict  # the prompt field given (and chat fields), e.g. {"messages": [...]}; dropped once encoded
    prompt_token_ids: array.array | None = None  # set by encode_requests (compact: many prompts)
    chat: object | None = None  # messages: the ChatPlan parsing the output (its prompt text dropped)


@dataclasses.dataclass
class ParsedInput:
    requests: list[InputRequest]
    bad: list[BadLine]
    skipped: int  # ids already in the output (a resumed run)
    total_lines: int  # non-blank lines


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    """The flag values; a line's own fields override them."""

    max_tokens: int = 256
    temperature: float = REQUEST_DEFAULT_TEMPERATURE
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # base seed: each request gets its own, derived from it and its id

    def params_for(self, fields: dict, key: str) -> SamplingParams:
        values = {"max_tokens": self.max_tokens, "temperature": self.temperature,
                  "top_p": self.top_p, "top_k": self.top_k, "seed": self.request_seed(key)}
        values.update(fields)
        return SamplingParams(**values)  # validates every field (InvalidRequest names it)

    def request_seed(self, key: str) -> int | None:
        # One shared seed would give identical samples for identical prompts; a seed derived
        # from the id differs per request yet is the same on a rerun (resume stays reproducible).
        if self.seed is None:
            return None
        return zlib.crc32(f"{self.seed}:{key}".encode())


def parse_input(path: str, defaults: SamplingDefaults, done_keys=frozenset()) -> ParsedInput:
    requests, bad = [], []
    first_line_of: dict[str, int] = {}
    skipped = total = 0
    with open(path, "rb") as f:  # bytes, so one line of bad UTF-8 is one bad line
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            total += 1
            try:
                req = _parse_line(raw, line_no, defaults)
            except ValueError as e:
                bad.append(BadLine(line_no, str(e)))
                continue
            if req.key in first_line_of:
                bad.append(BadLine(line_no, f"duplicate id {req.id!r} (first on line {first_line_of[req.key]})"))
                continue
            first_line_of[req.key] = line_no
            if req.key in done_keys:
                skipped += 1
                continue
            requests.append(req)
    return ParsedInput(requests, bad, skipped, total)


def _parse_line(raw: bytes, line_no: int, defaults: SamplingDefaults) -> InputRequest:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8: {e.reason} at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        raise ValueError("missing id" if rid is None else f"id must be a non-empty string or an int, got {rid!r}")
    given = [k for k in PROMPT_FIELDS if obj.get(k) is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(PROMPT_FIELDS)} (got {', '.join(given) or 'none'})")
    prompt = {given[0]: _check_prompt(given[0], obj[given[0]])}
    chat_fields = [k for k in CHAT_FIELDS if obj.get(k) is not None]
    if chat_fields and given[0] != "messages":
        raise ValueError(f"{', '.join(chat_fields)} need messages")
    prompt.update({k: obj[k] for k in chat_fields})
    key = json.dumps(rid)
    fields = _sampling_fields(obj)
    params = defaults.params_for(fields, key)
    return InputRequest(line_no, rid, key, params, prompt)


def _check_prompt(field: str, value):
    if field == "prompt":
        if not isinstance(value, str) or not value:
            raise ValueError("prompt must be a non-empty string")
        check_text("prompt", value)
    elif field == "prompt_token_ids":
        if (not isinstance(value, list) or not value
                or any(isinstance(t, bool) or not isinstance(t, int) for t in value)):
            raise ValueError("prompt_token_ids must be a non-empty list of ints")
    else:
        check_messages(value)  # roles and Unicode; the rest is checked by the engine's chat encoding
    return value


def _sampling_fields(obj: dict) -> dict:
    return {name: obj[name] for name in SAMPLING_FIELDS if obj.get(name) is not None}


def encode_requests(requests: list[InputRequest], engine) -> tuple[list[InputRequest], list[BadLine]]:
    """Tokenise every prompt with the engine (chat template for messages) and make the checks
    `Engine.add_request` makes (token ids in the vocabulary, prompt + max_tokens within the
    context), so a bad line is reported with its number before any generation."""
    ok, bad = [], []
    for req in requests:
        try:
            if "messages" in req.prompt:
                req.chat = engine.plan_chat(**req.prompt)
                ids = engine.encode_prompt(chat=req.chat)
                req.chat = dataclasses.replace(req.chat, prompt="")  # only the parsing is kept
            else:
                ids = engine.encode_prompt(**req.prompt)
            check_request(len(ids), req.params, engine.model.cfg.vocab_size, engine.max_context)
        except InvalidRequest as e:
            bad.append(BadLine(req.line_no, str(e)))
            continue
        except Exception as e:  # a chat template may raise anything (jinja, KeyError)
            bad.append(BadLine(req.line_no, f"rejected by the engine: {e}"))
            continue
        req.prompt_token_ids = array.array("i", ids)
        req.prompt = {}
        ok.append(req)
    return ok, bad
