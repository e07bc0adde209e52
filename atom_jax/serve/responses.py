"""Engine outputs -> OpenAI response bodies and stream chunks (completions and chat)."""

from __future__ import annotations

import json
import math

from atom_jax.engine.info import EngineInfo
from atom_jax.serve.prepare import PreparedRequest

# Finish reasons pass through ("stop", "length"); "abort" (client gone, server stopping) is
# vLLM's spelling. "error" never reaches here: the engine loop turns it into a failure.


def usage(outs: list, n: int = 1) -> dict:
    """The finished outputs of a request's choices, n per prompt (choice i * n + j: prompt i):
    each prompt counted once (as OpenAI and vLLM count them), the completions summed."""
    firsts = outs[::n]  # one choice of each prompt
    prompt, completion = sum(len(o.prompt_token_ids) for o in firsts), sum(o.num_tokens for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            # prompt tokens served from the prefix cache (OpenAI's field), for each prompt's first choice
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in firsts)}}


def _finite(lp: float) -> float:
    # JSON has no -inf; OpenAI reports impossible tokens as -9999.0.
    return lp if math.isfinite(lp) else -9999.0


class Deltas:
    """What is new in each cumulative output: text, token ids and their logprobs. The engine's
    `out.text` only grows (its detokenizer holds back what a stop string or an incomplete
    UTF-8 character may still change), so the new text is what follows the part sent. The
    stream may skip outputs (it keeps the newest), so this reads what follows the part sent
    (`*_since`: O(what is new), never the whole output per chunk), not the output's deltas."""

    def __init__(self, request: PreparedRequest, info: EngineInfo):
        self.tokenizer = info.tokenizer
        self.sent_text = 0
        self.sent_tokens = 0

    def update(self, out) -> tuple[str, list[int], list[float]]:
        n = out.num_tokens
        ids = out.token_ids_since(self.sent_tokens)
        lps = [_finite(x) for x in out.logprobs_since(self.sent_tokens, n)]
        self.sent_tokens = n
        delta, self.sent_text = out.text_since(self.sent_text), max(out.text_len, self.sent_text)
        return delta, ids, lps

    def token_text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])


def completion_logprobs(deltas: Deltas, ids: list[int], lps: list[float], offset: int,
                        end: int | None = None) -> dict:
    """`end`: where the text ends when a stop string was cut from it; the tokens that only
    spelled that stop string (starting at or after `end`) are left out, as the text leaves
    them out."""
    tokens, kept_lps, offsets, pos = [], [], [], offset
    for t, lp in zip((deltas.token_text(t) for t in ids), lps):
        if end is not None and t and pos >= end:
            break
        tokens.append(t)
        kept_lps.append(lp)
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": kept_lps, "top_logprobs": None, "text_offset": offsets}


def _text_end(out, offset: int, text: str) -> int | None:
    """The end of a finished completion's text when a stop ended it (else None)."""
    return offset + len(text) if out.finished and out.finish_reason == "stop" else None


def chat_logprobs(deltas: Deltas, ids: list[int], lps: list[float]) -> dict:
    content = []
    for t, lp in zip(ids, lps):
        s = deltas.token_text(t)
        content.append({"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")),
                        "top_logprobs": []})
    return {"content": content}


def _envelope(req: PreparedRequest, model: str, obj: str, choices: list) -> dict:
    return {"id": req.request_id, "object": obj, "created": req.created, "model": model,
            "choices": choices}


def full_response(req: PreparedRequest, info: EngineInfo, outs: list) -> dict:
    """The non-streaming body for the finished outputs of the request's choices, in order."""
    choices = [_choice(req, info, out, index) for index, out in enumerate(outs)]
    obj = "text_completion" if req.kind == "completion" else "chat.completion"
    body = _envelope(req, info.model_name, obj, choices)
    body["usage"] = usage(outs, req.n)
    return body


def _choice(req: PreparedRequest, info: EngineInfo, out, index: int) -> dict:
    deltas = Deltas(req, info)
    text, ids, lps = deltas.update(out)
    if req.kind == "completion":
        choice = {"index": index, "text": text, "finish_reason": out.finish_reason,
                  "logprobs": completion_logprobs(deltas, ids, lps, 0, _text_end(out, 0, text))
                  if req.logprobs else None}
    else:
        message, finish = {"role": "assistant", "content": text}, out.finish_reason
        if req.chat is not None:
            message, parser = req.chat.message(text)
            finish = parser.finish_reason(out.finish_reason)
        choice = {"index": index, "message": message, "finish_reason": finish,
                  "logprobs": chat_logprobs(deltas, ids, lps) if req.logprobs else None}
    if req.return_token_ids:
        choice["token_ids"] = ids
    return choice


def _chunk_object(req: PreparedRequest) -> str:
    return "text_completion" if req.kind == "completion" else "chat.completion.chunk"


def sse(data) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, allow_nan=False)
    return f"data: {payload}\n\n"


class ChunkWriter:
    """Stream chunks for one choice (`index`) of a request, in OpenAI's order: (chat: a role
    chunk,) content chunks, a chunk carrying finish_reason; then, once for the request
    (`end_chunks`), with include_usage a usage chunk, and [DONE]."""

    def __init__(self, req: PreparedRequest, info: EngineInfo, index: int = 0):
        self.req, self.info, self.index = req, info, index
        self.deltas = Deltas(req, info)
        self.obj = _chunk_object(req)
        self.text_offset = 0
        self.pending_ids: list[int] = []  # tokens not yet sent in a chunk
        self.pending_lps: list[float] = []
        self.chat = req.chat.parser() if req.kind == "chat" and req.chat is not None else None

    def _chunk(self, choice: dict) -> str:
        body = _envelope(self.req, self.info.model_name, self.obj, [choice])
        if self.req.include_usage:
            body["usage"] = None
        return sse(body)

    def start(self) -> list[str]:
        if self.req.kind == "chat":
            return [self._chunk({"index": self.index, "delta": {"role": "assistant", "content": ""},
                                 "finish_reason": None, "logprobs": None})]
        return []

    def _chat_delta(self, text: str, finished: bool) -> dict:
        """The text delta split into reasoning_content, content and tool_calls (markup held
        back until it is decided)."""
        if self.chat is None:
            return {"content": text} if text else {}
        d = self.chat.feed(text)
        if finished:
            d.extend(self.chat.finish())
        delta = {}
        if d.reasoning:
            delta["reasoning_content"] = d.reasoning
        if d.content:
            delta["content"] = d.content
        if d.tool_calls:
            delta["tool_calls"] = d.tool_calls
        return delta

    def output(self, out) -> list[str]:
        text, ids, lps = self.deltas.update(out)
        self.pending_ids += ids
        self.pending_lps += lps
        delta = self._chat_delta(text, out.finished) if self.req.kind == "chat" else None
        visible = delta if delta is not None else text
        if not (visible or out.finished or (self.req.return_token_ids and self.pending_ids)):
            return []  # nothing a text client could see yet: carry the tokens to the next chunk
        ids, lps, self.pending_ids, self.pending_lps = self.pending_ids, self.pending_lps, [], []
        finish = out.finish_reason if out.finished else None
        if self.chat is not None and finish is not None:
            finish = self.chat.finish_reason(finish)
        if self.req.kind == "completion":
            logprobs = None
            if self.req.logprobs:
                logprobs = completion_logprobs(self.deltas, ids, lps, self.text_offset,
                                               _text_end(out, self.text_offset, text))
            choice = {"index": self.index, "text": text, "finish_reason": finish, "logprobs": logprobs}
        else:
            logprobs = chat_logprobs(self.deltas, ids, lps) if self.req.logprobs else None
            choice = {"index": self.index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        if self.req.return_token_ids:
            choice["token_ids"] = ids
        self.text_offset += len(text)
        return [self._chunk(choice)]



def end_chunks(req: PreparedRequest, info: EngineInfo, finals: list) -> list[str]:
    """The stream's end: with include_usage (and every choice finished) the usage chunk, then
    [DONE]."""
    chunks = []
    if req.include_usage and finals and all(f is not None for f in finals):
        body = _envelope(req, info.model_name, _chunk_object(req), [])
        body["usage"] = usage(finals, req.n)
        chunks.append(sse(body))
    return chunks + [sse("[DONE]")]
