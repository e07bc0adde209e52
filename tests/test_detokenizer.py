"""The incremental detokenizer against a full decode: random text (multi-byte characters
included) fed in random token runs through the byte tokenizer and a trained byte-level BPE;
pieces handed out are final, add up to the full decode, and stop strings cut where they start."""

from __future__ import annotations

import random

import pytest

from atom_jax.engine.detokenizer import IncrementalDetokenizer
from atom_jax.tokenizer import ByteTokenizer, HFTokenizer

ALPHABET = "abcdef ghij,.\n\u00e9\u00fc\u4e2d\u6587\U0001f600"


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A small byte-level BPE (its tokens split multi-byte characters; its decoder needs the
    neighbouring tokens), trained here on random text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_text(rng, 200) for _ in range(50)], trainer)
    path = tmp_path_factory.mktemp("bpe")
    tok.save(str(path / "tokenizer.json"))
    return HFTokenizer(str(path))


def _runs(rng, ids):
    i = 0
    while i < len(ids):
        n = rng.randint(1, 3)
        yield ids[i:i + n]
        i += n


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_pieces_are_final_and_add_up_to_the_full_decode(which, bpe):
    tok = ByteTokenizer() if which == "byte" else bpe
    rng = random.Random()
    for _ in range(20):
        ids = tok.encode(_text(rng, rng.randint(1, 40)), add_bos=False)
        full = tok.decode(ids)
        d = IncrementalDetokenizer(tok)
        pieces = []
        for run in _runs(rng, ids):
            d.add(run)
            pieces.append(d.delta(finished=False))
            assert full.startswith(d.text(False)) and "\ufffd" not in d.text(False)
        d.finish()
        pieces.append(d.delta(finished=True))
        assert "".join(pieces) == d.text(True) == full


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_stop_strings_cut_where_they_start_and_are_never_streamed(which, bpe):
    tok = ByteTokenizer() if which == "byte" else bpe
    rng = random.Random()
    for _ in range(20):
        ids = tok.encode(_text(rng, 40), add_bos=False)
        full = tok.decode(ids)
        at = rng.randrange(0, len(full) - 3)
        stop = full[at:at + rng.randint(1, 3)]
        if "\ufffd" in stop:
            continue
        other = "\u00e9\u00e9\u00e9xyz"  # a second stop string that does not occur
        d = IncrementalDetokenizer(tok, (other, stop))
        pieces = []
        for run in _runs(rng, ids):
            if d.add(run):
                break
            pieces.append(d.delta(finished=False))
        assert d.stopped
        want = full[:full.find(stop)]
        assert want.startswith("".join(pieces))  # nothing past the cut was handed out
        pieces.append(d.delta(finished=True))
        assert "".join(pieces) == d.text(True) == want
