"""Request bodies of the OpenAI-compatible endpoints (pydantic; they also make /openapi.json).

Types are strict (no "5" for 5, no 1 for true), as OpenAI's API is. Unknown fields are
ignored, so clients that send extra OpenAI or vendor fields (`user`, `metadata`, ...) keep
working; fields that exist but would change the result in a way this server cannot honour
(`best_of` other than `n`, `logit_bias`, `functions`, penalties, `echo`, ...) are rejected with a 400
naming the parameter (see `prepare.reject_unsupported`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from atom_jax.scheduler.validation import CHAT_ROLES


def _integral_float_to_int(value):
    # JSON Schema counts 3.0 as an integer and some clients send it; strict mode would not.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def Int(**constraints):  # noqa: N802 - reads like a type in the field declarations
    return Annotated[int, Field(**constraints), BeforeValidator(_integral_float_to_int)]


def unsupported(**schema) -> dict:
    """Advertise only the supported values in /openapi.json; out-of-range values are still
    parsed and then refused by `prepare.reject_unsupported` with a message saying why."""
    return {"json_schema_extra": schema}


# Bounds keep every accepted value meaningful for the sampler (float32 / uint32 on device).
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
TopK = Int(ge=-1, le=2**31 - 1)  # -1 or 0: off (vLLM's convention)
Seed = Int(ge=-(2**63), le=2**64 - 1)
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
MAX_N = 128  # completions per prompt (OpenAI's bound for chat), and prompts per batch
MAX_CHOICES = 256  # completions per request: a batch of prompts times n
MaxTokens = Int(ge=1, le=2**31 - 1)
StopString = Annotated[str, Field(min_length=1)]
Stop = Union[StopString, Annotated[list[StopString], Field(max_length=16)]]
TokenIds = list[Int(ge=-(2**63), le=2**63 - 1)]

_TOKEN_LIST = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
PROMPT_SCHEMA = {
    "description": f"A string, a list of token ids, or a batch: a list of up to {MAX_N} of either "
                   f"(choice i * n + j is prompt i's j-th completion; at most {MAX_CHOICES} "
                   "completions in all).",
    "anyOf": [{"type": "string", "minLength": 1}, _TOKEN_LIST,
              {"type": "array", "minItems": 1, "maxItems": MAX_N,
               "items": {"type": "string", "minLength": 1}},
              {"type": "array", "minItems": 1, "maxItems": MAX_N, "items": _TOKEN_LIST}]}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields shared by both endpoints."""

    model: str | None = Field(None, description="Served model name; optional (defaults to it).")
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    stop_token_ids: list[Int(ge=0, le=2**63 - 1)] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Int(ge=1, le=MAX_N) = Field(1, description="How many completions to sample for the prompt "
                                     "(each its own sequence; with a seed, choice i samples from "
                                     "a seed derived from it and i).")
    presence_penalty: Penalty | None = Field(None, **unsupported(minimum=0, maximum=0))
    frequency_penalty: Penalty | None = Field(None, **unsupported(minimum=0, maximum=0))
    logit_bias: dict[str, float] | None = Field(None, **unsupported(maxProperties=0))
    user: str | None = None
    return_token_ids: bool = Field(
        False, description="Extension: add the generated token ids to each choice (and stream "
                           "a chunk for every step that produced tokens, even with no text).")


class CompletionRequest(_SamplingFields):
    prompt: Annotated[Union[str, TokenIds, list[str], list[TokenIds]], WithJsonSchema(PROMPT_SCHEMA)]
    logprobs: Union[bool, Int(ge=0, le=20), None] = Field(
        None, description="true or an int: return the chosen tokens' logprobs "
                          "(top_logprobs is always null: alternatives are not computed).")
    echo: bool = Field(False, **unsupported(enum=[False]))
    suffix: str | None = Field(None, **unsupported(maxLength=0))
    best_of: Int(ge=0, le=MAX_N) | None = Field(
        None, description="Only as many as n (the default): every sampled completion is returned.")


class ContentPart(_Strict):
    model_config = ConfigDict(json_schema_extra={"required": ["type", "text"]})
    type: str = Field(..., **unsupported(enum=["text"]))
    text: str | None = Field(None, **unsupported(type="string"))


class FunctionCall(_Strict):
    name: str
    arguments: str = Field(..., description="the arguments as a JSON object in a string")


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal[CHAT_ROLES]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="assistant turns: the calls made")
    tool_call_id: str | None = Field(None, description="tool turns: the call this answers")
    reasoning_content: str | None = Field(None, description="assistant turns: the reasoning "
                                          "(kept in the prompt only where V4's format keeps it)")


class FunctionDefinition(_Strict):
    name: str = Field(..., min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: Int(ge=0, le=20) | None = Field(None, **unsupported(maximum=0))
    tools: list[Tool] | None = Field(None, description="functions the model may call (rendered "
                                     "into the prompt in DeepSeek-V4's DSML; needs the V4 "
                                     "chat encoding)")
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = Field(
        None, description="'required' and a named function force a call by starting the answer "
                          "with the tool-call block (thinking off only)")
    parallel_tool_calls: bool | None = Field(None, description="accepted; the model decides")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="{'thinking': bool} (V4 thinking mode; default: the server's "
                          "--thinking), {'reasoning_effort': 'high' | 'max'}")
    functions: list[dict[str, Any]] | None = Field(None, **unsupported(maxItems=0))
    response_format: dict[str, Any] | None = Field(
        None, **unsupported(properties={"type": {"enum": ["text"]}}))


class ProfileRequest(_Strict):
    """Body of POST /start_profile (optional)."""

    dir: str | None = Field(None, min_length=1, description="trace log dir (default: --profile "
                            "or a new temporary dir)")
    steps: Int(ge=1, le=2**31 - 1) | None = Field(None, description="stop by itself after this "
                                                   "many model steps (default: at /stop_profile)")
