"""EAGLE speculative decoding in the serving loop: chain drafting, verified by the target.

Around each scheduled step (runtime/engine.py drives it):
- `plan`: every decode of a speculating request feeds its last token and the drafts made for it
  after the previous step, with a logits row for each (`all_logits`); the scheduler reserved the
  cache slots and the step's budget for them (`ScheduledItem.lookahead`).
- `accept`: verification. For a greedy request the target's choice after each fed token is its
  argmax; the drafts are accepted while each equals the target's choice before it, and the
  target's choice after the last accepted token comes with them: the target's greedy tokens
  exactly, whatever the drafts were. For a sampled request, rejection sampling (Leviathan et al.,
  Chen et al.) against the distribution the sampler would draw from, p (its temperature, top-k,
  top-p, min-p): draft d is accepted with probability p(d), since the draft is chosen greedily
  (its q puts all mass on d, so min(1, p/q) = p(d)); on rejection the token is drawn from p
  without d, renormalised (max(0, p - q)), and after every draft accepted, from the next row's p.
  Each token is then distributed as p exactly. The accepted drafts' K/V were computed by the step.
- `after_commit`: the draft program reads the target's hidden state at every position the step
  computed (next to the token after it) into its own cache, and from each sampled sequence's last
  computed position drafts `num_speculative_steps` tokens for the next step.

Which requests speculate: those without penalties (which depend on every token before),
logprobs or a constraint (structured output: verifying drafts would need a grammar mask per draft
position); the others decode one token a step beside them. A rejected
draft's K/V (target and draft caches) lie past the sequence's computed tokens and are overwritten
when those positions are computed again.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llama_aot.artifacts.step_abi import SequenceChunk
from llama_aot.runtime.block_manager import BlockManager
from llama_aot.runtime.model_runner import ModelRunner, StepPlan
from llama_aot.runtime.sampling import SamplingParams, exponential_race, greedy_tokens, token_probabilities
from llama_aot.runtime.scheduler import ScheduledStep
from llama_aot.runtime.sequence import SequenceStatus


def speculates(params: SamplingParams) -> bool:
    return not params.has_penalties and not params.logprobs and params.constraint is None


def verify_sampled(probs: torch.Tensor, drafts: tuple[int, ...], generator: torch.Generator | None) -> list[int]:
    """Rejection sampling of greedy drafts: `probs` [len(drafts) + 1, V], the target's sampling
    distribution after each fed token; returns the accepted drafts and one token drawn after them."""
    out = []
    for row, draft in zip(probs, drafts):
        if torch.rand((), generator=generator, device=probs.device) < row[draft]:
            out.append(draft)
            continue
        residual = row.clone()
        residual[draft] = 0
        return out + exponential_race(residual[None], [generator]).tolist()
    return out + exponential_race(probs[len(drafts)][None].clone(), [generator]).tolist()


@dataclass(frozen=True)
class SpeculativePlan:
    """A scheduled step with the drafts it verifies: `plan` for the runner; per sampled item (in
    order), the drafts it feeds and its logit rows in the runner's output."""
    step: ScheduledStep
    plan: StepPlan
    drafts: tuple[tuple[int, ...], ...]
    rows: tuple[slice, ...]


@dataclass
class SpeculationStats:
    """Verify steps (decodes that fed drafts) and the drafts they accepted; read by /metrics."""
    verify_steps: int = 0
    accepted_drafts: int = 0
    drafted: int = 0

    @property
    def mean_accept_length(self) -> float:
        """Tokens a verify step yields on average: the accepted drafts plus the target's own."""
        return 1 + self.accepted_drafts / self.verify_steps if self.verify_steps else 0.0


@dataclass
class Speculator:
    """The engine's speculative side: which requests speculate, the drafts each sequence carries
    between steps, and the counts /metrics reads. The runner owns the draft program and cache."""
    runner: ModelRunner
    blocks: BlockManager
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    _drafts: dict[int, list[int]] = field(default_factory=dict)
    _speculating: dict[int, bool] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return self.runner.num_speculative_steps

    def forget(self, seq_id: int) -> None:
        self._drafts.pop(seq_id, None)
        self._speculating.pop(seq_id, None)

    def plan(self, step: ScheduledStep, params: dict[int, SamplingParams]) -> SpeculativePlan:
        """`params`: the request's of every item's sequence, by seq_id."""
        chunks, sample_rows, drafts, rows = [], [], [], []
        row = 0
        for item in step.items:
            chunk, fed = item.chunk, ()
            seq_id = item.seq.seq_id
            self._speculating[seq_id] = speculates(params[seq_id])
            if item.sample and item.num_tokens == 1 and self._speculating[seq_id]:
                fed = tuple(self._drafts.pop(seq_id, ())[:item.lookahead])
            if fed:
                chunk = SequenceChunk(chunk.tokens + fed, chunk.start, chunk.block_table, all_logits=True)
            n_rows = len(chunk.tokens) if chunk.all_logits else 1
            if item.sample:
                rows.append(slice(len(sample_rows), len(sample_rows) + n_rows))
                sample_rows.extend(range(row, row + n_rows))
                drafts.append(fed)
            row += n_rows
            chunks.append(chunk)
        return SpeculativePlan(step, StepPlan(tuple(chunks), tuple(sample_rows)), tuple(drafts), tuple(rows))

    def accept(self, sp: SpeculativePlan, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> list[list[int] | None]:
        """Per sampled item (with its request's params and generator): the accepted drafts and the
        target's token after them, or None for an item that fed no drafts (the engine samples its
        one row as usual)."""
        out: list[list[int] | None] = []
        for fed, rows, p, gen in zip(sp.drafts, sp.rows, params, generators):
            if not fed:
                out.append(None)
                continue
            if p.greedy:
                choices = greedy_tokens(logits[rows]).tolist()
                accepted = 0
                while accepted < len(fed) and fed[accepted] == choices[accepted]:
                    accepted += 1
                tokens = list(fed[:accepted]) + [choices[accepted]]
            else:
                tokens = verify_sampled(token_probabilities(logits[rows], [p] * len(fed + (0,))), fed, gen)
            out.append(tokens)
            self.stats.verify_steps += 1
            self.stats.accepted_drafts += len(tokens) - 1
            self.stats.drafted += len(fed)
        return out

    def after_commit(self, sp: SpeculativePlan, committed: dict[int, list[int]]) -> None:
        """Runs the draft program over what the step computed (see the module docstring).
        `committed`: the tokens each sampled sequence got, by seq_id."""
        hidden = self.runner.last_hidden
        drafting, extending = [], []
        offset = 0
        for item, chunk in zip(sp.step.items, sp.plan.chunks):
            first_row, offset = offset, offset + len(chunk.tokens)
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING or not self._speculating.get(seq.seq_id):
                continue
            computed = item.num_tokens + (len(committed[seq.seq_id]) - 1 if item.sample else 0)
            last = item.start + computed - 1
            # Drafting writes the draft cache up to position last + num_steps - 1, which must stay
            # within the request's limit (and so the context); a request near it just extends.
            drafts = item.sample and seq.num_tokens + self.num_steps <= seq.max_total_tokens \
                and self.blocks.ensure_capacity(seq, last + self.num_steps)
            reads = SequenceChunk(tuple(seq.tokens(item.start + 1, last + 2)), item.start, tuple(seq.block_table))
            (drafting if drafts else extending).append((seq.seq_id, reads, hidden[first_row:first_row + computed]))
        if extending:
            self.runner.draft([c for _, c, _ in extending], torch.cat([h for _, _, h in extending]), 1)
        if drafting:
            made = self.runner.draft([c for _, c, _ in drafting], torch.cat([h for _, _, h in drafting]),
                                     self.num_steps)
            for (seq_id, _, _), tokens in zip(drafting, made):
                self._drafts[seq_id] = tokens
