"""Full-sequence logits against transformers' DeepseekV4ForCausalLM (float32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest

from atom_jax.config import CSA, HCA, SLIDING
from atom_jax.loader import load_model
from atom_jax.models import jit_forward
from hf_reference import hf_logits, make_hf_model

# (variant, sequence length): long enough for the window, several CSA entries picked by the
# indexer (topk < visible entries), several HCA windows, hash and learned routing
CASES = [("a", 150), ("b", 400)]


@pytest.mark.parametrize("variant,seq", CASES)
def test_logits_match_transformers(tmp_path, variant, seq, capsys):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    hf = make_hf_model(variant, seed)
    hf.save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    cfg = model.cfg
    assert {SLIDING, CSA, HCA} <= set(cfg.attn_kinds) and any(cfg.hash_layers) and not all(cfg.hash_layers)
    assert seq > cfg.sliding_window and seq // cfg.hca_ratio >= 3 and seq // cfg.csa_ratio > cfg.index_topk

    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(2, seq))
    ref = hf_logits(hf, ids)
    ours = np.asarray(jit_forward(model)(ids))
    err = float(np.max(np.abs(ours - ref)))
    with capsys.disabled():
        print(f"\n[parity] variant {variant} seq {seq} seed {seed}: max |logit diff| = {err:.3e} "
              f"(logit scale {np.abs(ref).max():.2f})")
    assert err < 1e-4, f"max abs logit error {err} at seed {seed}"


def test_transformers_module_layout_loads_the_same(tmp_path):
    """A state_dict saved with transformers' module names (layout B) loads to the same logits."""
    from safetensors.torch import save_file

    hf = make_hf_model("a", 7)
    hf.save_pretrained(tmp_path / "saved")
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "modules" / "model.safetensors"))
    ids = np.random.default_rng(0).integers(0, 256, size=(1, 64))
    a = np.asarray(load_model(str(tmp_path / "saved"))(ids))
    b = np.asarray(load_model(str(tmp_path / "modules"))(ids))
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, hf_logits(hf, ids), atol=1e-4)
