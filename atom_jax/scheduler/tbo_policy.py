"""Where `--tbo auto` turns two-batch overlap on: per dp, the smallest step (tokens per rank)
from which TBO is measured or predicted to beat one chain.

The table is `tbo_crossover.json` beside this module, written by
`python -m atom_jax.bench tbo-model --calibration <dp-step JSONs> --crossover-out
atom_jax/scheduler/tbo_crossover.json` from the calibrated step model (docs/design.md, "Where
TBO pays"). A dp missing from the table takes the entry of the nearest smaller dp in it (more
ranks receive more bytes per all-gather, so TBO pays at least as early), else `default`.
`min_tokens` None means never. The decision itself stays in `DPScheduler.use_tbo`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

CROSSOVER_PATH = Path(__file__).with_name("tbo_crossover.json")
# Used when the table has no entry at or below dp: on 2 GPUs TBO lost at every measured size
# up to 8K tokens per rank (1.29x at 1K, 1.16x at 4K, 1.04-1.08x at 8K; docs/benchmarks.md).
TBO_MIN_TOKENS = 16384


@functools.lru_cache(maxsize=None)
def load_crossover(path: str = str(CROSSOVER_PATH)) -> dict:
    with open(path) as f:
        data = json.load(f)
    table = {int(k): v for k, v in data["min_tokens"].items()}
    return {"min_tokens": table, "default": data.get("default", TBO_MIN_TOKENS)}


def crossover_min_tokens(dp: int, path: str = str(CROSSOVER_PATH)) -> int | None:
    """Smallest bucket (tokens per rank) from which `auto` runs TBO at this dp; None: never."""
    data = load_crossover(path)
    below = [d for d in data["min_tokens"] if d <= dp]
    return data["min_tokens"][max(below)] if below else data["default"]
