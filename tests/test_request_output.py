"""A request's outputs cost O(the step's new tokens), not O(the output so far): over a long
output, the engine's per-step output work reads only the new tokens of the request's token and
logprob lists, never the text so far; each output still reads back, in full and on request,
exactly what it held at its step (later steps do not change it), and a stream that skips
outputs (the server's) gets every token, logprob and character once."""

from __future__ import annotations

import random

from atom_jax.engine.engine import Engine, _Tracked
from atom_jax.engine.info import EngineInfo
from atom_jax.scheduler import SamplingParams, Sequence
from atom_jax.serve.prepare import PreparedRequest
from atom_jax.serve.responses import Deltas
from atom_jax.tokenizer import ByteTokenizer


class CountingList(list):
    """A list that records how many items each slice or whole-list iteration read."""

    def __init__(self, *a):
        super().__init__(*a)
        self.reads: list[int] = []

    def __getitem__(self, i):
        out = super().__getitem__(i)
        if isinstance(i, slice):
            self.reads.append(len(out))
        return out

    def __iter__(self):
        self.reads.append(len(self))
        return super().__iter__()


def test_long_output_per_step_work_reads_only_new_tokens():
    rng = random.Random()
    tok = ByteTokenizer()
    seq = Sequence("r", [1, 2, 3], SamplingParams(max_tokens=5000, logprobs=True))
    tr = _Tracked(seq, tok)
    seq.output_token_ids = CountingList()
    tr.logprobs = CountingList()
    tr.detok.text = None  # the O(length) full text: not to be called per step
    outs, steps = [], []
    while len(seq.output_token_ids) < 3000:
        new = [rng.randrange(32, 127) for _ in range(rng.choice((1, 1, 1, 2, 3)))]  # 1-3 per step
        seq.output_token_ids.extend(new)
        tr.logprobs.extend(-rng.random() for _ in new)
        tr.detok.add(new)
        seq.output_token_ids.reads.clear()
        tr.logprobs.reads.clear()
        out = Engine._output(None, tr)
        assert out.new_token_ids == new
        assert max(seq.output_token_ids.reads, default=0) <= len(new), "the token list was copied"
        assert not tr.logprobs.reads, "the logprob list was copied"
        outs.append(out)
        steps.append((list(seq.output_token_ids), list(tr.logprobs)))
    full = bytes(seq.output_token_ids).decode()
    # each output reads back what it held then (its prefix), built only when asked
    for i in sorted(rng.sample(range(len(outs)), 20)) + [len(outs) - 1]:
        toks, lps = steps[i]
        assert outs[i].token_ids == toks and outs[i].logprobs == lps and outs[i].num_tokens == len(toks)
        assert full.startswith(outs[i].text) and outs[i].text_len == len(outs[i].text)
    # what the deltas hand out adds up to the text so far
    assert "".join(o.delta_text for o in outs) == outs[-1].text
    # the server's stream may skip outputs: it reads what follows the part sent
    info = EngineInfo("m", 256, 4096, tok, 1, 2, 8, 16, (8,))
    req = PreparedRequest("r", "completion", [1, 2, 3], seq.params, False, True, False, False, 0.0)
    d, text, ids, lps = Deltas(req, info), "", [], []
    for out in outs[::7] + outs[-1:]:
        t, i, lp = d.update(out)
        text, ids, lps = text + t, ids + i, lps + lp
    assert text == outs[-1].text and ids == steps[-1][0] and lps == steps[-1][1]


def test_given_values_read_back_as_given():
    """Outputs made from plain values (tests, fakes): the same objects come back."""
    from atom_jax.engine.outputs import RequestOutput

    ids, lps = [5, 6, 7], [-0.1, -0.2, -0.3]
    out = RequestOutput("r", [1], ids, [7], "h\u00e9llo", "o", False, None, lps)
    assert out.token_ids is ids and out.logprobs is lps and out.text == "h\u00e9llo"
    assert out.token_ids_since(1) == [6, 7] and out.logprobs_since(1, 2) == [-0.2]
    assert out.text_since(2) == "llo" and out.text_since(9) == ""
    none = RequestOutput("r", [1], [], [], None, None, True, "stop", [])
    assert none.text is None and none.text_since(0) == "" and none.text_len == 0
