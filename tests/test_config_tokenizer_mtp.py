"""Config from DeepSeek's official keys, tokenizers from a model directory, the MTP block."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from atom_jax.config import ConfigError, tiny, v4_flash
from atom_jax.engine import Engine, EngineConfig, SamplingParams
from atom_jax.loader import random_model
from atom_jax.tokenizer import load_tokenizer
from atom_jax.weights.config_io import from_hf_dict, read_config, to_hf_dict
from hf_reference import make_hf_model
from test_weights_io import V4_FLASH_OFFICIAL


def test_official_config_gives_the_flash_preset(tmp_path):
    (tmp_path / "inference").mkdir()
    (tmp_path / "inference" / "config.json").write_text(json.dumps(V4_FLASH_OFFICIAL))
    assert read_config(str(tmp_path)) == v4_flash()


def test_legacy_and_converted_hf_keys_agree():
    converted = from_hf_dict(to_hf_dict(v4_flash()))
    legacy = to_hf_dict(v4_flash())
    legacy.pop("layer_types")
    legacy.pop("mlp_layer_types")
    legacy["compress_ratios"] = [{"sliding": 0, "csa": 4, "hca": 128}[k] for k in v4_flash().attn_kinds]
    legacy["num_hash_layers"] = 3
    assert from_hf_dict(legacy) == converted == v4_flash()
    with pytest.raises(ConfigError, match="model_type"):
        from_hf_dict({**legacy, "model_type": "deepseek_v3"})


def _write_word_tokenizer(path, vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<bos>", "<eos>", "[UNK]"] + [f"w{i}" for i in range(vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<bos>", "<eos>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>",
        "chat_template": "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}w7{% endif %}"}))


def test_model_directory_tokenizer_and_chat_template(tmp_path):
    hf = make_hf_model("a", 3)
    hf.save_pretrained(tmp_path)
    _write_word_tokenizer(tmp_path, hf.config.vocab_size)
    tok = load_tokenizer(str(tmp_path))
    assert tok.encode("w5 w9") == [0, 8, 12] and tok.decode([0, 8, 12]) == "w5 w9"
    assert tok.eos_token_id == 1
    eng = Engine(EngineConfig(model=str(tmp_path), num_slots=2, num_pages=16, page_tokens=32,
                              max_pages_per_seq=8, max_tokens_per_step=32, buckets=(16, 32)))
    rid = eng.add_request(messages=[{"role": "user", "content": "w2 w3"}], params=SamplingParams(max_tokens=3))
    assert eng._requests[rid].seq.prompt_token_ids == [0, 2, 5, 6, 10]  # "user" is [UNK] here
    out = []
    while eng.has_unfinished():
        out += [o for o in eng.step() if o.finished]
    assert out[0].text == tok.decode(out[0].token_ids)
    # no tokenizer.json: token-id prompts only
    assert load_tokenizer(str(tmp_path / "nope")) is None


def test_mtp_block_predicts_from_streams_and_next_tokens():
    cfg = tiny()
    model = random_model(cfg, seed=1, with_mtp=True)
    ids = np.random.default_rng().integers(0, cfg.vocab_size, size=(1, 24))
    streams = model.hidden_streams(jnp.asarray(ids))
    nxt = jnp.asarray(np.roll(ids, -1, axis=1))
    logits = model.mtp_logits(nxt, streams)
    assert logits.shape == (1, 24, cfg.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))
    # causal: changing the last next-token only changes the last position
    changed = nxt.at[0, -1].set((nxt[0, -1] + 1) % cfg.vocab_size)
    other = model.mtp_logits(changed, streams)
    assert np.allclose(logits[0, :-1], other[0, :-1], atol=1e-6) and not np.allclose(logits[0, -1], other[0, -1])
