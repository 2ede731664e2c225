"""The step ABI: how a scheduled step (which sequences, which of their tokens, where their cache
lives) becomes the compiled program's inputs, and how the program is called.

This is the one place that knows the program's calling convention, so the build-time verifier,
the benchmarks and the serving loop cannot drift apart. A step program is called as
`program(*inputs in INPUT_NAMES order, kv_cache) -> logits[len(logits_index), vocab]`; the manifest
lists each program's `STEP_INPUTS`, and the loader refuses a program whose list differs. See
kernels/paged_attention.py for the meaning of each tensor.

An artifact built with an EAGLE head (llama-compile --speculative-algorithm) has a second program,
the draft: `draft(tokens, hidden, *the other inputs, draft_kv_cache) -> (logits[len(logits_index),
vocab], hidden[tokens, H])`, and its step program returns the draft's input besides the logits,
`(logits, hidden[tokens, H])`. `call_step` returns the logits of either kind; `step_outputs` all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llama_aot.artifacts.kv_layout import slot_of

INPUT_NAMES = ("tokens", "positions", "slots", "block_tables", "context_lens", "query_index",
               "logits_index")
STEP_INPUTS = (*INPUT_NAMES, "kv_cache")
DRAFT_INPUTS = ("tokens", "hidden", *INPUT_NAMES[1:], "kv_cache")


@dataclass(frozen=True)
class SequenceChunk:
    """Some new tokens of one sequence: `tokens` sit at positions `start, start+1, ...`, the first
    `start` tokens are already cached, and `block_table` lists the cache blocks of the whole
    sequence in order. `all_logits` asks for a logit row per new token instead of the last only."""

    tokens: tuple[int, ...]
    start: int
    block_table: tuple[int, ...]
    all_logits: bool = False

    def __post_init__(self):
        if not self.tokens:
            raise ValueError("a chunk needs at least one new token")


def build_step_inputs(chunks: list[SequenceChunk], block_size: int,
                      device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Returns the step's inputs by name, in `INPUT_NAMES` order; the KV cache is added by the
    caller. Raises ValueError if a sequence's block table is too short for its new tokens."""
    tokens, positions, slots, query_rows, logits_index = [], [], [], [], []
    max_blocks = max(len(c.block_table) for c in chunks)
    for c in chunks:
        end = c.start + len(c.tokens)
        if end > len(c.block_table) * block_size:
            raise ValueError(f"block table of {len(c.block_table)} blocks cannot hold {end} tokens")
        first = len(tokens)
        for pos, tok in enumerate(c.tokens, start=c.start):
            tokens.append(tok)
            positions.append(pos)
            slots.append(slot_of(c.block_table, pos, block_size))
        rows = list(range(first, len(tokens)))
        query_rows.append(rows)
        logits_index.extend(rows if c.all_logits else rows[-1:])
    num_tokens = len(tokens)
    q_len = max(len(r) for r in query_rows)
    query_index = [r + [num_tokens] * (q_len - len(r)) for r in query_rows]
    block_tables = [list(c.block_table) + [0] * (max_blocks - len(c.block_table)) for c in chunks]
    context_lens = [c.start + len(c.tokens) for c in chunks]

    def t(data, dtype):
        return torch.tensor(data, dtype=dtype, device=device)

    return {
        "tokens": t(tokens, torch.int64),
        "positions": t(positions, torch.int64),
        "slots": t(slots, torch.int64),
        "block_tables": t(block_tables, torch.int32),
        "context_lens": t(context_lens, torch.int32),
        "query_index": t(query_index, torch.int64),
        "logits_index": t(logits_index, torch.int64),
    }


def call_step(program, inputs: dict[str, torch.Tensor], kv_cache: torch.Tensor) -> torch.Tensor:
    """Runs one step and returns its logits: `program` is a loaded step program or the eager model,
    `inputs` the step's tensors by name (extra names are ignored), `kv_cache` the cache it updates
    in place."""
    return step_outputs(program, inputs, kv_cache)[0]


def step_outputs(program, inputs: dict[str, torch.Tensor], kv_cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Runs one step and returns every output: (logits,), or (logits, the draft's hidden input)."""
    out = program(*[inputs[n] for n in INPUT_NAMES], kv_cache)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def call_draft(program, inputs: dict[str, torch.Tensor], hidden: torch.Tensor,
               kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the draft program (or the eager head) on a step's inputs, whose tokens are those after
    each position, with `hidden` [tokens, H]: (logits, hidden for the next draft step)."""
    logits, hidden = program(inputs["tokens"], hidden, *[inputs[n] for n in INPUT_NAMES[1:]], kv_cache)
    return logits, hidden
