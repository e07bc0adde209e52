"""One request as the scheduler sees it: tokens, state, and the cache resources it holds."""

from __future__ import annotations

import enum

from atom_jax.scheduler.pages import chain_key
from atom_jax.scheduler.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # holds no slot and no pages
    RUNNING = "running"  # holds a slot and pages (prefilling or decoding)
    FINISHED = "finished"


FINISH_REASONS = ("stop", "length", "abort", "error")

# An output token sampled by a step whose result the host has not read yet (the engine's
# overlap schedule): it counts as a token (positions, lengths, the sampler's counter) and is
# fed from the device's copy; its value, and the stop checks on it, come with `resolve`.
PENDING = -1


class Sequence:
    """A request's token history and scheduling state.

    Token positions: the known tokens are prompt + output (`total_len`). `num_computed` of them
    have their KV in the cache. Work left before the next sample is `total_len - num_computed`
    tokens; it is 1 while decoding (the last sampled token) and more while prefilling. A
    preempted sequence loses its cache and recomputes prompt + output as one long prefill.
    """

    def __init__(self, request_id: str, prompt_token_ids, params: SamplingParams | None = None,
                 arrival_time: float | None = None, *, copy: bool = True):
        """`copy=False`: keep `prompt_token_ids` itself, a list no one else holds (the engine's own
        copy of a request's ids: a 128K-token prompt is not copied twice)."""
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: prompt must hold at least one token")
        self.request_id = request_id
        self.prompt_token_ids: list[int] = list(prompt_token_ids) if copy else prompt_token_ids
        self.output_token_ids: list[int] = []
        self.params = params if params is not None else SamplingParams()
        self.status = SeqStatus.WAITING
        self.finish_reason: str | None = None
        self.rank: int | None = None
        self.slot: int | None = None
        self.pages: list[int] = []
        self.num_computed = 0
        self.arrival_tick: int | None = None
        self.arrival_time = arrival_time
        self.num_preemptions = 0
        # tokens placement expected it to reuse on its rank (cached, or computed by another
        # request there first): while it waits, its prefill work counts as the rest
        self.reuse_hint = 0
        # prefix cache: prompt tokens found cached at the first admission (None: not admitted
        # yet), block keys computed so far, how many of `pages` are registered, and how many
        # (the first ones) were reused from the cache at this admission (the rest it computes)
        self.num_cached_tokens: int | None = None
        self._block_keys: list[bytes] = []
        self.num_registered_pages = 0
        self.num_reused_pages = 0

    # -- lengths -------------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def total_len(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        """Known tokens whose KV is not cached yet (what the next chunks must feed)."""
        return self.total_len - self.num_computed

    @property
    def is_prefilling(self) -> bool:
        # Prefill until the prompt (or, after preemption, everything but the newest token)
        # is cached; from then on each step feeds exactly one token.
        n = len(self.prompt_token_ids)  # (lengths inlined: the scheduler asks per sequence per step)
        return self.num_computed < max(n, n + len(self.output_token_ids) - 1)

    @property
    def remaining_prefill_tokens(self) -> int:
        return self.num_uncomputed if self.is_prefilling else 0

    @property
    def has_pending(self) -> bool:
        """The newest output token is still on the device (see PENDING)."""
        return bool(self.output_token_ids) and self.output_token_ids[-1] == PENDING

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def token_at(self, pos: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[pos] if pos < n else self.output_token_ids[pos - n]

    def token_ids(self, start: int, num: int) -> list[int]:
        """Known tokens [start, start+num): what the engine feeds for a chunk."""
        n, end = len(self.prompt_token_ids), start + num
        if num == 1 and start >= n:  # a decode's token (the host's hot path)
            return self.output_token_ids[start - n: end - n]
        head = self.prompt_token_ids[start:end] if start < n else []
        tail = self.output_token_ids[max(start - n, 0):max(end - n, 0)] if end > n else []
        return head + tail

    def block_keys(self, page_tokens: int, num_blocks: int) -> list[bytes]:
        """Prefix-cache keys of the first `num_blocks` full blocks of the known tokens."""
        return list(self.iter_block_keys(page_tokens, num_blocks))

    def iter_block_keys(self, page_tokens: int, num_blocks: int):
        """`block_keys` one at a time, each computed (and kept) only when asked for: a prefix-cache
        lookup stops at its first miss, so a new 128K-token prompt hashes one block on arrival, not
        512 (the rest are hashed as its chunks complete, while the device runs)."""
        keys = self._block_keys
        for k in range(num_blocks):
            if k == len(keys):
                keys.append(chain_key(keys[-1] if keys else b"", self.token_ids(k * page_tokens, page_tokens)))
            yield keys[k]

    def __repr__(self):
        return (f"Sequence({self.request_id!r}, {self.status.value}, rank={self.rank}, "
                f"slot={self.slot}, prompt={self.num_prompt_tokens}, "
                f"out={self.num_output_tokens}, computed={self.num_computed}, "
                f"pages={len(self.pages)}, finish={self.finish_reason})")
