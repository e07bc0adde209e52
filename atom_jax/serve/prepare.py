"""Turn a validated request body into what the engine takes (prompt token ids + SamplingParams),
raising a 400 that names the parameter for everything the engine would refuse or misread.

Runs on the event loop, not the engine thread: it only reads `EngineInfo` (facts fixed once
the engine is built) and the tokenizer, never the engine itself."""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid

from atom_jax.chat import ChatPlan, EncodingError, plan_chat
from atom_jax.engine.args import REQUEST_DEFAULT_TEMPERATURE
from atom_jax.engine.info import EngineInfo
from atom_jax.scheduler import SamplingParams
from atom_jax.scheduler.validation import CheckedIds, InvalidRequest, check_request, checked_token_ids
from atom_jax.serve.errors import OpenAIError, bad_request
from atom_jax.serve.protocol import MAX_CHOICES, MAX_N, ChatCompletionRequest, CompletionRequest

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclasses.dataclass
class PreparedRequest:
    request_id: str
    kind: str  # "completion" | "chat"
    prompt_token_ids: CheckedIds  # checked here, taken by the engine without a second pass
    params: SamplingParams
    stream: bool
    include_usage: bool
    logprobs: bool
    return_token_ids: bool
    arrival: float  # time.perf_counter() when the request reached the handler
    chat: ChatPlan | None = None  # chat: how the output splits into reasoning, content, tool calls
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    n: int = 1  # choices per prompt: each its own engine request (`choice_requests`)
    batch: tuple[CheckedIds, ...] = ()  # /v1/completions' further prompts (the first is above)

    def choice_requests(self) -> list[PreparedRequest]:
        """What the engine runs for the choices: this request itself for one prompt and n = 1;
        else one request per choice i * n + j (prompt i, its j-th completion; OpenAI's and vLLM's
        order), ids `<id>-<index>`, the prompt ids as they are (nobody changes them), and with a
        seed, choice index's seed derived from it (choice 0 keeps it)."""
        prompts = (self.prompt_token_ids, *self.batch)
        if len(prompts) == 1 and self.n == 1:
            return [self]
        return [dataclasses.replace(self, request_id=f"{self.request_id}-{i * self.n + j}", n=1, batch=(),
                                    prompt_token_ids=ids, params=_choice_params(self.params, i * self.n + j))
                for i, ids in enumerate(prompts) for j in range(self.n)]


def _choice_params(params: SamplingParams, i: int) -> SamplingParams:
    if params.seed is None or i == 0:
        return params  # unseeded: the engine draws each request's seed
    return dataclasses.replace(params, seed=(params.seed + i * 0x9E3779B9) % 2**32)


def check_model(requested: str | None, info: EngineInfo) -> None:
    if requested is not None and requested != info.model_name:
        raise OpenAIError(404, f"The model '{requested}' does not exist; this server serves "
                               f"'{info.model_name}'", param="model", code="model_not_found")


def reject_unsupported(body) -> None:
    """400 for fields this server cannot honour (silently ignoring them would change results)."""
    checks = [
        ("logit_bias", bool(body.logit_bias), "logit_bias is not supported"),
        ("presence_penalty", bool(body.presence_penalty), "presence_penalty is not supported (only 0)"),
        ("frequency_penalty", bool(body.frequency_penalty), "frequency_penalty is not supported (only 0)"),
    ]
    if isinstance(body, CompletionRequest):
        checks += [
            ("best_of", body.best_of not in (None, body.n),
             "best_of other than n is not supported (every sampled completion is returned)"),
            ("echo", body.echo, "echo is not supported"),
            ("suffix", bool(body.suffix), "suffix is not supported"),
        ]
    else:
        checks += [
            ("functions", bool(body.functions), "functions are not supported"),
            ("response_format", bool(body.response_format)
             and body.response_format.get("type") not in (None, "text"),
             "response_format other than text is not supported"),
            ("top_logprobs", bool(body.top_logprobs),
             "top_logprobs is not supported: only the chosen tokens' logprobs are returned"),
        ]
    for param, bad, message in checks:
        if bad:
            raise bad_request(message, param=param, code="unsupported_parameter")


def _require_tokenizer(info: EngineInfo, what: str):
    if info.tokenizer is None:
        raise bad_request(f"this model has no tokenizer, so {what} cannot be used: send the "
                          "prompt as token ids to /v1/completions", code="no_tokenizer")
    return info.tokenizer


def completion_prompt_ids(body: CompletionRequest, info: EngineInfo) -> list[CheckedIds]:
    """The prompt's ids, or each prompt's of a batch (a list of strings or of token lists)."""
    prompt = body.prompt
    batch = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else [prompt]
    if len(batch) > MAX_N:
        raise bad_request(f"a batch of {len(batch)} prompts; at most {MAX_N} are accepted in one request",
                          param="prompt", code="too_many_entries")
    if len(batch) * body.n > MAX_CHOICES:
        raise bad_request(f"{len(batch)} prompts x n = {body.n} is {len(batch) * body.n} completions; at most "
                          f"{MAX_CHOICES} are accepted in one request", param="prompt", code="too_many_choices")
    out = []
    for i, one in enumerate(batch):
        name = "prompt" if len(batch) == 1 else f"prompt[{i}]"
        if isinstance(one, str):
            if not one:
                raise bad_request(f"{name} is empty", param="prompt", code="empty_prompt")
            one = _require_tokenizer(info, "a text prompt").encode(one)
        if not one:
            raise bad_request(f"{name} is empty", param="prompt", code="empty_prompt")
        try:
            out.append(checked_token_ids(name, one, info.vocab_size))
        except InvalidRequest as e:
            raise bad_request(str(e), param="prompt", code=e.code) from None
    return out


def chat_prompt_ids(body: ChatCompletionRequest, info: EngineInfo) -> tuple[CheckedIds, ChatPlan]:
    """The prompt ids and the plan for the output (reasoning / tool-call parsing)."""
    tok = _require_tokenizer(info, "chat messages")
    tool_choice = body.tool_choice
    if tool_choice is not None and not isinstance(tool_choice, str):
        tool_choice = tool_choice.model_dump()
    try:
        plan = plan_chat(info.chat, tok, [m.model_dump(exclude_none=True) for m in body.messages],
                         [t.model_dump(exclude_none=True) for t in body.tools or []],
                         tool_choice, body.chat_template_kwargs)
    except EncodingError as e:  # includes a template's raise_exception() or jinja error
        raise bad_request(str(e), param=e.param) from e
    ids = tok.encode(plan.prompt, add_bos=plan.add_bos)
    if not ids:
        raise bad_request("the chat prompt is empty", param="messages", code="empty_prompt")
    with _as_bad_request():
        return checked_token_ids("messages", ids, info.vocab_size), plan


def sampling_params(body, info: EngineInfo, prompt_len: int, max_tokens: int | None,
                    prompt_param: str, logprobs: bool) -> SamplingParams:
    """The request's SamplingParams (validated when built), checked against the model as the
    engine will check them (`check_request`), so a bad request is a 400 naming its field
    before it is queued."""
    if max_tokens is None:  # chat: whatever the context leaves
        max_tokens = max(info.max_context - prompt_len, 1)
    if body.stop:
        _require_tokenizer(info, "stop strings")
    temperature = REQUEST_DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
    with _as_bad_request():
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
            seed=body.seed, stop_token_ids=tuple(body.stop_token_ids or ()),
            stop=body.stop or (), ignore_eos=body.ignore_eos, logprobs=logprobs)
        check_request(prompt_len, params, info.vocab_size, info.max_context, prompt_param)
    return params


@contextlib.contextmanager
def _as_bad_request():
    """InvalidRequest (the shared validation, which names the field) -> a 400."""
    try:
        yield
    except InvalidRequest as e:
        raise bad_request(str(e), param=e.param, code=e.code or "invalid_value") from None


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def prepare_completion(body: CompletionRequest, info: EngineInfo, arrival: float) -> PreparedRequest:
    check_model(body.model, info)
    reject_unsupported(body)
    ids, *batch = completion_prompt_ids(body, info)
    max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    want_logprobs = body.logprobs is not None and body.logprobs is not False
    longest = max(len(p) for p in (ids, *batch))  # the context check holds for every prompt
    params = sampling_params(body, info, longest, max_tokens, "prompt", want_logprobs)
    return PreparedRequest(_new_id("cmpl"), "completion", ids, params, body.stream,
                           bool(body.stream_options and body.stream_options.include_usage),
                           want_logprobs, body.return_token_ids, arrival, n=body.n, batch=tuple(batch))


def prepare_chat(body: ChatCompletionRequest, info: EngineInfo, arrival: float) -> PreparedRequest:
    check_model(body.model, info)
    reject_unsupported(body)
    ids, plan = chat_prompt_ids(body, info)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = sampling_params(body, info, len(ids), max_tokens, "messages", body.logprobs)
    return PreparedRequest(_new_id("chatcmpl"), "chat", ids, params, body.stream,
                           bool(body.stream_options and body.stream_options.include_usage),
                           body.logprobs, body.return_token_ids, arrival, chat=plan, n=body.n)
