"""One request's tokens and its place in the KV cache, as the scheduler and block manager see it.

A `Sequence` is mutable and shared by reference between the scheduler, the block manager and the
engine, so equality is identity: two requests with the same prompt are still two sequences.
Ownership of the fields is split to keep the interfaces narrow:

- the engine creates it and appends nothing; it reads `output_token_ids` and `status`;
- the scheduler owns `status`, `num_computed_tokens`, `num_cached_tokens`, `num_preemptions` and
  appends to `output_token_ids` when a step is committed;
- the block manager owns `block_table` and `block_hashes`.
"""
from __future__ import annotations

import enum
import itertools

_next_seq_id = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """`max_total_tokens` is the prompt plus the most new tokens the request may produce (already
    bounded by the context length); the scheduler sizes the request's cache needs from it, and the
    engine must `finish` the sequence once `num_tokens` reaches it (`reached_max_tokens`).

    `num_computed_tokens` counts the tokens whose K/V are in the cache, so the next step feeds
    `token_ids[num_computed_tokens:]`. After a token is sampled it is known but not yet computed,
    which is why a decoding sequence has exactly one uncomputed token.

    `num_cached_tokens` is how many prompt tokens the prefix cache served at the first admission:
    the figure the API reports as `usage.prompt_tokens_details.cached_tokens`. A preempted
    sequence is recomputed later, possibly with more cache hits, but the client's prompt was
    processed once, so the first figure stands.
    """

    __slots__ = ("seq_id", "request_id", "prompt_token_ids", "output_token_ids", "max_total_tokens",
                 "block_table", "block_hashes", "num_computed_tokens", "num_cached_tokens",
                 "num_preemptions", "status")

    def __init__(self, request_id: str, prompt_token_ids: list[int], max_total_tokens: int):
        if not prompt_token_ids:
            raise ValueError(f"request {request_id}: the prompt is empty; send at least one token")
        self.seq_id = next(_next_seq_id)
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.max_total_tokens = max_total_tokens
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        self.status = SequenceStatus.WAITING

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def reached_max_tokens(self) -> bool:
        return self.num_tokens >= self.max_total_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def tokens(self, start: int, end: int) -> list[int]:
        """`token_ids[start:end]` without concatenating the whole sequence (decode reads one token
        of a possibly 100k-token sequence every step)."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, request={self.request_id!r}, {self.status.value}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"blocks={len(self.block_table)})")
