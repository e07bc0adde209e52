"""Greedy generation with the embedded tiny model (or `--model random` / a model directory)
through the plain full-sequence forward: no cache, no scheduler, one prompt.

    python -m atom_jax.demo "Once upon a time" --max-tokens 32

The smallest path through the model, for a first look and as a check of the engine (which
caches, batches and samples: use `python -m atom_jax.serve` or `python -m atom_jax.generate`).
The sequence is padded to a fixed length so one compiled forward serves every step (the model
is causal, so padding after position t never changes the logits at t)."""

from __future__ import annotations

import argparse
import time

import numpy as np

from atom_jax.default_model import load_resolved, resolve_model
from atom_jax.engine.args import positive_int
from atom_jax.models import jit_forward
from atom_jax.tokenizer import ByteTokenizer


def greedy_batch(forward, prompts: list[list[int]], max_tokens: int, eos_ids=(),
                 width: int | None = None) -> list[list[int]]:
    """Greedy continuations of several prompts at once through one full-sequence `forward` over
    [len(prompts), width] (default: longest prompt + max_tokens). A row stops at an EOS id
    (kept in its output) or when it fills `width`."""
    width = width or max(map(len, prompts)) + max_tokens
    buf = np.zeros((len(prompts), width), np.int32)
    for i, ids in enumerate(prompts):
        buf[i, : len(ids)] = ids
    n = np.array([len(ids) for ids in prompts])
    out: list[list[int]] = [[] for _ in prompts]
    live = n < width
    for _ in range(max_tokens):
        if not live.any():
            break
        logits = np.asarray(forward(buf))
        nxt = logits[np.arange(len(prompts)), n - 1].argmax(-1)
        for i in np.flatnonzero(live):
            tok = int(nxt[i])
            out[i].append(tok)
            if tok in eos_ids:
                live[i] = False
                continue
            buf[i, n[i]] = tok
            n[i] += 1
            live[i] = n[i] < width
    return out


def greedy(forward, prompt_ids: list[int], max_tokens: int, eos_ids=(), pad_to: int | None = None) -> list[int]:
    return greedy_batch(forward, [prompt_ids], max_tokens, eos_ids, width=pad_to)[0]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m atom_jax.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", nargs="?", default="The quick brown fox",
                    help="text, or comma-separated token ids for a model without the byte "
                         "tokenizer (default: 'The quick brown fox')")
    ap.add_argument("--model", help="checkpoint directory (default: the embedded tiny model trained on "
                    "stdlib docstrings; 'random': random weights)")
    ap.add_argument("--max-tokens", type=positive_int, default=32,
                    help="tokens to generate (default: 32)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the random weights with --model random (default: 0)")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    tok = ByteTokenizer()
    source = resolve_model(args.model)
    model = load_resolved(source, seed=args.seed)
    if not source.byte_tokenizer and args.prompt[:1].isdigit():
        ids = [int(x) for x in args.prompt.split(",")]
    else:
        ids = tok.encode(args.prompt)
    t0 = time.time()
    out = greedy(jit_forward(model), ids, args.max_tokens, eos_ids=(tok.eos_token_id,))
    dt = time.time() - t0
    print(f"prompt: {args.prompt!r}")
    print(f"tokens: {out}")
    print(f"text:   {tok.decode(out)!r}")
    print(f"{len(out)} tokens in {dt:.2f}s (includes compile)")


if __name__ == "__main__":
    main()
