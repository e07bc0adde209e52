"""The demo's fixed-length padding must not change greedy tokens (the model is causal)."""

import numpy as np

from atom_jax.config import tiny
from atom_jax.demo import greedy
from atom_jax.loader import random_model
from atom_jax.models import jit_forward


def test_padded_greedy_equals_unpadded():
    model = random_model(tiny(), seed=5)
    fwd = jit_forward(model)
    prompt = list(np.random.default_rng().integers(0, 500, size=9))
    padded = greedy(fwd, prompt, 3, pad_to=40)
    seq, plain = list(prompt), []
    for _ in range(3):  # no padding: recompute on the exact sequence each step
        tok = int(np.argmax(np.asarray(fwd(np.array([seq], np.int32)))[0, -1]))
        plain.append(tok)
        seq.append(tok)
    assert padded == plain
