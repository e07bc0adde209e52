"""Engine: greedy parity with transformers' generate, incremental vs full-sequence logits,
pages and slots returned after finished / aborted / failed requests."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from atom_jax.cache import CacheLayout, init_cache, pack_chunks
from atom_jax.engine import Engine, EngineConfig, SamplingParams
from atom_jax.loader import random_model
from atom_jax.config import tiny
from atom_jax.models import jit_forward
from atom_jax.scheduler.validation import checked_token_ids
from cached_forward import as_jnp, cached_forward
from hf_reference import make_hf_model

SMALL = dict(num_slots=4, num_pages=48, page_tokens=32, max_pages_per_seq=8, max_tokens_per_step=32,
             buckets=(8, 16, 32))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_a")
    hf = make_hf_model("a", int(np.random.SeedSequence().entropy % 2**31))
    hf.save_pretrained(path)
    return hf, str(path)


def _hf_greedy(hf, prompt, n):
    """transformers' greedy generate with EOS neither stopping nor suppressed (as ignore_eos):
    min_new_tokens would forbid EOS and pick the runner-up instead."""
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
    assert out.shape[1] == len(prompt) + n
    return out[0, len(prompt):].tolist()


# prompts pass the 16-token window and several 16-token HCA windows; chunk sizes cut them at
# odd positions; dp 2 with TBO splits steps inside requests
@pytest.mark.parametrize("dp,tbo,chunk", [(1, False, 13), (2, True, 7), (2, False, 32)])
def test_greedy_matches_transformers_generate(hf_dir, dp, tbo, chunk):
    hf, path = hf_dir
    rng = np.random.default_rng()
    prompts = [list(map(int, rng.integers(0, 256, size=n))) for n in (3, 37, 70, 101)]
    eng = Engine(EngineConfig(model=path, dp=dp, tbo=tbo, chunk_size=chunk, **SMALL))
    outs = eng.generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.token_ids == _hf_greedy(hf, p, 10), f"prompt of {len(p)} tokens"
    assert all(o.finish_reason == "length" for o in outs)
    eng.scheduler.check_invariants()


# pallas: the kernels, interpreted; pallas-rowselect: the indexer's prefill top-k policy
# ("rowselect", models/index_topk.py) at every step, in windows of 16 of the 64 rows
@pytest.mark.parametrize("attn_backend", ["jnp", "pallas", "pallas-rowselect"])
def test_incremental_logits_equal_full_sequence(attn_backend, monkeypatch):
    if attn_backend == "pallas-rowselect":
        from atom_jax.models import index_topk

        monkeypatch.setattr(index_topk, "AUTO_MAX_TOKENS", 0)
        monkeypatch.setattr(index_topk, "AUTO_LARGE_POLICY", "rowselect")
        monkeypatch.setattr(index_topk, "SCORE_BUDGET", 16 * 128)  # 64 tokens x the 128-entry rung: 4 windows
        attn_backend = "pallas"
        short = True
    else:
        short = False
    cfg = tiny()
    model = random_model(cfg, seed=int(np.random.SeedSequence().entropy % 2**31))
    layout = CacheLayout(num_slots=3, num_pages=24, page_tokens=32, max_pages_per_seq=8)
    rng = np.random.default_rng()
    # shorter for the interpreted kernels (each step runs every Pallas program on the CPU);
    # both pass several windows, HCA entries and more CSA entries than the top-k keeps
    lengths = [70, 45, 101] if attn_backend == "jnp" else [40, 30, 45] if short else [50, 37, 70]
    seqs = [rng.integers(0, cfg.vocab_size, size=n) for n in lengths]
    full = [np.asarray(jit_forward(model)(s[None]))[0] for s in seqs]
    page_table = np.arange(24, dtype=np.int32).reshape(3, 8)
    import jax

    step = jax.jit(lambda c, b, p: cached_forward(model, c, b, p, layout, attn_backend=attn_backend))
    cache, done, worst, i = init_cache(cfg, layout), [0, 0, 0], 0.0, 0
    while any(d < n for d, n in zip(done, lengths)):
        chunks = []
        for s in range(3):
            if done[s] < lengths[s]:
                take = min((13, 1, 29, 5, 17)[(i + s) % 5], lengths[s] - done[s])
                chunks.append((s, done[s], seqs[s][done[s]: done[s] + take], True))
        logits, cache = step(cache, as_jnp(pack_chunks(chunks, 64, 3)), page_table)
        for j, (s, start, toks, _) in enumerate(chunks):
            worst = max(worst, float(np.abs(np.asarray(logits[j]) - full[s][start + len(toks) - 1]).max()))
            done[s] += len(toks)
        i += 1
    assert worst < 1e-4


def test_pages_return_after_finish_abort_and_failure(monkeypatch):
    eng = Engine(EngineConfig(dp=2, chunk_size=8, **SMALL))
    sched = eng.scheduler
    total = [(r.pages.num_free, r.slots.num_free) for r in sched.ranks]
    rng = np.random.default_rng()
    ids = [eng.add_request(prompt_token_ids=list(map(int, rng.integers(0, 256, size=n))),
                           params=SamplingParams(max_tokens=6, ignore_eos=True)) for n in (20, 40, 9, 33, 50)]
    for _ in range(3):
        eng.step()
    eng.abort(ids[1])  # aborted mid-prefill or decode
    # the next step raises inside the runner: the requests in it fail, the engine lives on
    real = eng.runner.run
    monkeypatch.setattr(eng.runner, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    failed = set()
    for o in eng.step():
        if o.finish_reason == "error":
            failed.add(o.request_id)
    monkeypatch.setattr(eng.runner, "run", real)
    while eng.has_unfinished():
        eng.step()
    assert failed, "the failing step should have failed the requests it carried"
    assert [(r.pages.num_free, r.slots.num_free) for r in sched.ranks] == total
    sched.check_invariants()
    # the engine still serves after the failure
    out = eng.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out[0].token_ids) == 3


def test_compilation_cache_dir_caches_every_compile(monkeypatch, tmp_path):
    """The engine (every front end, every multi-host process) sets the cache dir and drops the
    minimum compile time, so restarts reuse even fast compiles. Recorded, not applied: the
    settings are process-global."""
    import jax
    seen = {}
    monkeypatch.setattr(jax.config, "update", lambda name, value: seen.__setitem__(name, value))
    Engine(EngineConfig(compilation_cache_dir=str(tmp_path), **SMALL))
    assert seen == {"jax_compilation_cache_dir": str(tmp_path),
                    "jax_persistent_cache_min_compile_time_secs": 0}


def test_bad_requests_are_rejected_clearly():
    eng = Engine(EngineConfig(**SMALL))
    with pytest.raises(ValueError, match="empty"):
        eng.add_request(prompt_token_ids=[])
    with pytest.raises(ValueError, match="exceeds the context"):
        eng.add_request(prompt_token_ids=[1] * 200, params=SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="out of range"):
        eng.add_request(prompt_token_ids=[10**6])
    with pytest.raises(ValueError, match="max_tokens"):
        eng.add_request(prompt="hi", params=SamplingParams(max_tokens=0))
    assert not eng.has_unfinished()


def test_the_engine_keeps_its_own_copy_of_the_prompt_ids():
    """One copy (checked, then kept by the sequence): the caller's later changes cannot reach it;
    the outputs' prompt list is another, so a change to it cannot reach the scheduler either."""
    eng = Engine(EngineConfig(**SMALL))
    ids = [5, 6, 7]
    rid = eng.add_request(prompt_token_ids=ids, params=SamplingParams(max_tokens=1))
    ids[0] = 10**6
    seq = eng.scheduler.get(rid)
    assert seq.prompt_token_ids == [5, 6, 7] and seq.prompt_token_ids is not eng._requests[rid].prompt_ids


def test_checked_ids_are_taken_as_they_are_only_for_their_vocabulary():
    """The server checks and copies a prompt off the engine's thread (`checked_token_ids`); the
    engine keeps that list itself. CheckedIds made for another vocabulary are checked again."""
    eng = Engine(EngineConfig(**SMALL))
    vocab = eng.model.cfg.vocab_size
    checked = checked_token_ids("prompt", [5, 6, 7], vocab)
    rid = eng.add_request(prompt_token_ids=checked, params=SamplingParams(max_tokens=1))
    assert eng.scheduler.get(rid).prompt_token_ids is checked.ids
    other = checked_token_ids("prompt", [vocab + 1], vocab + 2)  # fine there, not here
    with pytest.raises(ValueError, match="out of range"):
        eng.add_request(prompt_token_ids=other)
    with pytest.raises(ValueError, match="out of range"):
        checked_token_ids("prompt", [1, vocab], vocab)


def test_streamed_delta_text_adds_up_to_the_final_text_with_a_stop_string():
    """A stop string whose first characters arrive one token before the rest: delta_text must
    hold them back (not stream then retract them), so the deltas join to the cut final text."""
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    eng = Engine(EngineConfig(model="random", **SMALL))  # byte tokenizer: one token per byte
    free = eng.generate(["Return the "], params)[0].text
    whole = [p for p in range(1, len(free) - 1) if "\ufffd" not in free[p:p + 2]]
    assert whole, free  # the seeded model's greedy text has a pair of whole characters
    p = whole[0]
    stop = free[p:p + 2]
    rid = eng.add_request("Return the ", SamplingParams(max_tokens=24, ignore_eos=True, stop=(stop,)))
    deltas, final = [], None
    while eng.has_unfinished():
        for out in eng.step():
            if out.request_id == rid:
                deltas.append(out.delta_text)
                final = out
    assert final.finished and final.finish_reason == "stop"
    assert final.text == free[:free.find(stop)]
    assert "".join(deltas) == final.text
    # One source of truth: the stop is counted, and nothing is left running, everywhere.
    snap = eng.snapshot()
    assert snap["stats"]["finished"] == {"length": 1, "stop": 1}
    assert snap["num_running"] == snap["stats"]["num_running"] == 0
    assert sum(r["running"] for r in snap["ranks"]) == 0


def test_a_warmed_engine_never_compiles_on_a_request():
    eng = Engine(EngineConfig(model="random", dp=2, **{**SMALL, "buckets": (16, 32)}))
    gc.unfreeze()
    eng.warmup()
    # what warm-up left alive is frozen, out of the collector's full passes while serving
    assert gc.get_freeze_count() > 0
    warm = eng.snapshot()["step_compiles"]
    assert warm["count"] > 0 and warm["after_warmup"] == 0  # (a persistent cache: count 0)
    rng = np.random.default_rng()
    lengths = [int(n) for n in rng.integers(1, 60, size=6)] + [1, 32, 33]
    prompts = [list(map(int, rng.integers(0, 256, size=n))) for n in lengths]
    outs = eng.generate(prompts, SamplingParams(max_tokens=int(rng.integers(2, 9)), ignore_eos=True,
                                                temperature=0.7, top_k=5))
    assert all(o.finished for o in outs)
    base = list(map(int, rng.integers(0, 256, size=70)))  # prefix-cache hits restore slot state
    for prompt in (base, base[:50] + [7, 8]):
        eng.generate([prompt], SamplingParams(max_tokens=2, ignore_eos=True))
    assert eng.stats()["prefix_cache"]["hit_tokens"] == 32
    assert eng.snapshot()["step_compiles"] == warm, "a request compiled after warm-up"
