"""Request streams with SGLang bench_serving's `random` dataset semantics (lengths only)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class SimRequest:
    request_id: str
    input_len: int
    output_len: int
    arrival_time: float  # seconds of modelled time; 0 for all when the rate is infinite


def random_requests(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                    request_rate: float = math.inf, seed: int = 0) -> list[SimRequest]:
    """Lengths uniform in [len * range_ratio, len] (at least 1); Poisson arrivals at
    `request_rate` requests per modelled second (exponential gaps), all at 0 if infinite."""
    if not 0.0 <= range_ratio <= 1.0:
        raise ValueError(f"random-range-ratio must be in [0, 1], got {range_ratio}")
    rng = np.random.default_rng(seed)
    ins = rng.integers(max(int(input_len * range_ratio), 1), input_len + 1, size=num_prompts)
    outs = rng.integers(max(int(output_len * range_ratio), 1), output_len + 1, size=num_prompts)
    if math.isinf(request_rate):
        arrivals = np.zeros(num_prompts)
    else:
        if request_rate <= 0:
            raise ValueError(f"request rate must be > 0, got {request_rate}")
        arrivals = np.cumsum(rng.exponential(1.0 / request_rate, size=num_prompts))
    return [SimRequest(f"req-{i}", int(ins[i]), int(outs[i]), float(arrivals[i]))
            for i in range(num_prompts)]


def random_prompt_ids(requests: list[SimRequest], vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Random token ids of each request's input length (the same for `bench serve` and
    `bench engine` given the same seed)."""
    rng = np.random.default_rng(seed + 1)
    return [rng.integers(0, vocab_size, size=r.input_len).tolist() for r in requests]
