"""Which tokens of which sequences the next model step computes: continuous batching under a
per-step token budget, with chunked prefill, FIFO admission by free cache blocks, and preemption
by recompute.

The engine drives it, one call at a time (no locks here):

    step = scheduler.schedule()
    if not step.items: wait for requests
    inputs = build_step_inputs(step.chunks(), block_size)      # row i of the logits <-> items[i]
    logits = model(...)
    tokens = {item.seq.seq_id: sample(logits[row]) for row, item in zip(step.sample_rows,
                                                                        step.sampled_items())}
    for seq in scheduler.commit(step, tokens): check stops; scheduler.finish(seq) if done

Why the policy is what it is:
- Decodes go first, one token each, so a long prompt arriving never stalls streams in flight; the
  budget left over goes to prefill, split into chunks, so the step's latency stays bounded.
- A sequence is admitted only when blocks for all its known tokens are free (beyond a watermark
  kept for running sequences' growth), and only the head of the queue: strict FIFO, so a long
  prompt is not starved by short ones slipping past it.
- When a decode needs a block and none is free, the most recently arrived running sequence gives
  all of its blocks back and waits at the front of the queue; its tokens are recomputed on
  readmission, which its own blocks, left in the prefix cache, often make cheap. Preempting the
  newest keeps the oldest always progressing, so every request finishes.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import count

from llama_aot.artifacts.step_abi import SequenceChunk
from llama_aot.runtime.block_manager import BlockManager
from llama_aot.runtime.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    """`max_num_tokens` is the step's token budget and `max_num_seqs` its batch size; both
    must not exceed what the compiled program accepts (the artifact's max_num_tokens and
    max_num_seqs), and `max_model_len` must fit its block tables. `max_prefill_chunk` caps one
    sequence's prefill piece per step (default: the whole budget). `watermark` is the fraction of
    the cache admission leaves free for running sequences to grow into."""

    max_num_seqs: int
    max_num_tokens: int
    max_model_len: int
    max_prefill_chunk: int | None = None
    watermark: float = 0.01
    # Speculative decoding: each decode reserves this many more slots and tokens of the budget,
    # for the draft tokens the step verifies (runtime/speculative.py).
    num_lookahead_slots: int = 0

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs {self.max_num_seqs}: must be at least 1")
        if self.max_num_tokens < self.max_num_seqs * (1 + self.num_lookahead_slots):
            raise ValueError(f"max_num_tokens {self.max_num_tokens} is below max_num_seqs {self.max_num_seqs} "
                             f"times {1 + self.num_lookahead_slots}: every running sequence needs room for its "
                             "decode token (and its draft tokens) in each step; raise the budget or lower the seqs")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len {self.max_model_len}: must be at least 2")
        if self.max_prefill_chunk is None:
            object.__setattr__(self, "max_prefill_chunk", self.max_num_tokens)
        if not 1 <= self.max_prefill_chunk <= self.max_num_tokens:
            raise ValueError(f"max_prefill_chunk {self.max_prefill_chunk}: must be between 1 and "
                             f"max_num_tokens ({self.max_num_tokens})")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark {self.watermark}: must be a fraction in [0, 1)")


@dataclass(frozen=True, eq=False)
class ScheduledItem:
    """`num_tokens` tokens of `seq` from position `start`. `sample` is true iff the piece ends at
    the sequence's last known token (it completes the prefill, or it is a decode), i.e. iff its
    logits row is a next-token distribution. `chunk` is the piece as the program consumes it,
    taken when scheduled so that an abort before the step runs cannot change the step.
    `lookahead`: for a decode, the draft tokens it has slots and budget for (at most
    num_lookahead_slots, fewer near the sequence's token limit)."""

    seq: Sequence
    start: int
    num_tokens: int
    sample: bool
    chunk: SequenceChunk
    lookahead: int = 0


@dataclass(frozen=True, eq=False)
class ScheduledStep:
    """One model step. Every item yields exactly one logits row from `build_step_inputs`, so row i
    belongs to `items[i]`; the rows of items with `sample=False` (prefill chunks that stop short of
    the prompt's end) are to be ignored. `sample_rows` lists the rows to sample, in item order.

    The engine may instead cut `inputs["logits_index"]` down to `sample_rows` before the call, to
    skip the LM head for those chunks; row j then belongs to `sampled_items()[j]`. The program
    needs at least one logits row, so a step that samples nothing keeps the full index."""

    step_id: int
    items: tuple[ScheduledItem, ...]

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.items)

    @property
    def sample_rows(self) -> tuple[int, ...]:
        return tuple(i for i, item in enumerate(self.items) if item.sample)

    def sampled_items(self) -> list[ScheduledItem]:
        return [item for item in self.items if item.sample]

    def chunks(self) -> list[SequenceChunk]:
        return [item.chunk for item in self.items]


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._by_request: dict[str, Sequence] = {}
        self._step_ids = count()
        self._last_step: ScheduledStep | None = None
        self._watermark_blocks = int(config.watermark * block_manager.num_usable_blocks)
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    # -- requests --------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence. Raises ValueError, saying why, for one that could never run: it
        would otherwise wait forever."""
        if seq.status is not SequenceStatus.WAITING or seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"{seq} is not a new sequence")
        if seq.request_id in self._by_request:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        limit, n_prompt = self.config.max_model_len, seq.num_prompt_tokens
        if n_prompt >= limit:
            raise ValueError(f"the prompt has {n_prompt} tokens but this model's context is "
                             f"{limit} tokens, which leaves no room for output; shorten the prompt")
        if seq.max_total_tokens <= n_prompt:
            raise ValueError(f"max_total_tokens {seq.max_total_tokens} leaves no room for output "
                             f"after the {n_prompt}-token prompt; ask for at least one new token")
        if seq.max_total_tokens > limit:
            raise ValueError(f"this model's context is {limit} tokens, but the request asks for "
                             f"{seq.max_total_tokens} ({n_prompt} in the prompt, "
                             f"{seq.max_total_tokens - n_prompt} to generate); lower max_tokens or "
                             "shorten the prompt")
        bm = self.block_manager
        # The last token is sampled, never fed back, so it needs no K/V slot.
        need = bm.blocks_for(seq.max_total_tokens - 1)
        if need > bm.num_usable_blocks:
            raise ValueError(f"the request needs up to {need} KV cache blocks but the cache has "
                             f"{bm.num_usable_blocks}; lower max_tokens, shorten the prompt, or "
                             "serve with a larger KV cache")
        self._waiting.append(seq)
        self._by_request[seq.request_id] = seq

    def finish(self, seq: Sequence) -> None:
        """Retire a sequence (stop condition met, or aborted) and release its blocks; a no-op for
        one already finished."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self._running.remove(seq)
        else:
            self._waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        del self._by_request[seq.request_id]

    def abort(self, request_id: str) -> bool:
        """Finish a request at any point, even between `schedule` and `commit` (its items in that
        step are then ignored). Returns False if no unfinished request has that id."""
        seq = self._by_request.get(request_id)
        if seq is None:
            return False
        self.finish(seq)
        return True

    # -- steps -----------------------------------------------------------------------------------

    def schedule(self) -> ScheduledStep:
        """The next step; empty only when nothing is queued. A step that is never committed (the
        model failed, say) advances no sequence, so the next `schedule` computes its tokens again."""
        budget = self.config.max_num_tokens
        items: list[ScheduledItem] = []
        preempted = False

        for seq in list(self._running):
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncomputed_tokens != 1:
                continue
            if seq.reached_max_tokens:
                raise RuntimeError(f"{seq} reached max_total_tokens but was not finished; the "
                                   "engine must finish a sequence once seq.reached_max_tokens")
            # Drafts beyond the last token the request may produce would never be used.
            lookahead = max(0, min(self.config.num_lookahead_slots, seq.max_total_tokens - seq.num_tokens - 1))
            while not self.block_manager.ensure_capacity(seq, seq.num_tokens + lookahead):
                victim = self._running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                items.append(self._item(seq, 1, lookahead))
                budget -= 1 + lookahead

        for seq in self._running:
            if budget == 0:
                break
            if seq.num_uncomputed_tokens > 1:
                n = min(seq.num_uncomputed_tokens, budget, self.config.max_prefill_chunk)
                items.append(self._item(seq, n))
                budget -= n

        while (self._waiting and budget > 0 and not preempted
               and len(self._running) < self.config.max_num_seqs):
            seq = self._waiting[0]
            if not self._admit(seq):
                break
            n = min(seq.num_uncomputed_tokens, budget, self.config.max_prefill_chunk)
            items.append(self._item(seq, n))
            budget -= n

        step = ScheduledStep(next(self._step_ids), tuple(items))
        self._last_step = step
        return step

    def commit(self, step: ScheduledStep, tokens: dict[int, int | list[int]]) -> list[Sequence]:
        """Record that `step` ran: its tokens' K/V are in the cache, and `tokens` maps the seq_id
        of each sampling item to its new token, or, for a decode that verified drafts, to its
        accepted drafts and the target's token after them (whose K/V the step computed too, but
        for the last). Items of sequences finished or aborted since `schedule` are skipped.
        Returns the sequences that got tokens, in item order, for the engine's stop checks. Only
        the latest step can be committed, and only once."""
        if step is not self._last_step:
            raise ValueError(f"step {step.step_id} is not the latest scheduled step or was "
                             "already committed; commit each step once, before scheduling again")
        live = [item for item in step.items if item.seq.status is SequenceStatus.RUNNING]
        stray = set(tokens) - {item.seq.seq_id for item in step.items if item.sample}
        if stray:
            raise ValueError(f"tokens for seq ids {sorted(stray)} that sample nothing in this step")
        missing = [item.seq for item in live if item.sample and item.seq.seq_id not in tokens]
        if missing:
            raise ValueError(f"no sampled token for {missing}")
        self._last_step = None
        got = []
        for item in live:
            seq = item.seq
            seq.num_computed_tokens += item.num_tokens
            if item.sample:
                new = tokens[seq.seq_id]
                new = [new] if isinstance(new, int) else list(new)
                if not 1 <= len(new) <= 1 + item.lookahead:
                    raise ValueError(f"{len(new)} tokens for {seq}, whose step had room for 1 to {1 + item.lookahead}")
                seq.output_token_ids.extend(new)
                seq.num_computed_tokens += len(new) - 1  # the accepted drafts' K/V were computed too
                got.append(seq)
            self.block_manager.commit_full_blocks(seq)
        return got

    # -- internals -------------------------------------------------------------------------------

    def _item(self, seq: Sequence, n: int, lookahead: int = 0) -> ScheduledItem:
        start = seq.num_computed_tokens
        sample = start + n == seq.num_tokens
        chunk = SequenceChunk(tuple(seq.tokens(start, start + n)), start, tuple(seq.block_table))
        return ScheduledItem(seq, start, n, sample, chunk, lookahead)

    def _admit(self, seq: Sequence) -> bool:
        """Admit the queue's head if its blocks fit. The watermark is waived when nothing runs:
        `add` guaranteed the sequence fits in the empty cache, and waiting for more is forever."""
        bm = self.block_manager
        reserve = self._watermark_blocks if self._running else 0
        if bm.blocks_needed(seq) > bm.num_free_blocks - reserve:
            return False
        cached = bm.allocate(seq)
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = cached
        seq.num_computed_tokens = cached
        seq.status = SequenceStatus.RUNNING
        self._waiting.popleft()
        self._running.append(seq)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Give back all of `seq`'s blocks and queue it first for recompute; its output so far is
        kept, so it resumes where it was. Registered blocks stay in the prefix cache."""
        self._running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._waiting.appendleft(seq)
