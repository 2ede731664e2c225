"""Turning one step's logits into next tokens: per-request sampling parameters and the sampler.

Two properties drive the design:
- Batch invariance: a request's token depends only on its own logits row, its parameters and its
  own generator, never on which other requests share the batch. Every operation here is row-wise
  (elementwise maths, per-row topk/sort/softmax/cumsum/argmax; no shape-dependent reductions),
  every choice between code paths is made per row, and randomness comes from the row's own
  `torch.Generator`, drawing the same amount (one number per vocab entry) every step. So a
  seeded request replays exactly, alone or batched, and greedy rows are exactly argmax.
- Sampling is the exponential race, `argmax(probs / E)` with `E ~ Exp(1)` i.i.d. per token, which
  picks token i with probability probs[i] and needs no cumulative sums that could differ by batch.

Processing order (vLLM's): penalties on the raw logits -> the grammar's token mask for constrained
rows (runtime/structured_output.py) -> greedy argmax for temperature-0 rows -> temperature -> min_p
-> top_k -> top_p -> race. Logprobs are "processed" logprobs: log_softmax of the logits after
penalties and temperature (temperature 1 for greedy rows), before the grammar's mask and the min_p /
top_k / top_p truncation, so every token, sampled or listed, has a finite logprob that describes
the distribution the request actually asked for. The mask is row-wise like everything else: a
constrained row never changes another row's token.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from llama_aot.runtime.structured_output import CompiledConstraint

MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20
# Below this a temperature is treated as 0: dividing by it would overflow float32 logits.
GREEDY_TEMPERATURE = 1e-5
# How many of the most likely tokens top_k / top_p look at before falling back to a full sort.
TOP_P_CANDIDATES = 1024
_SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts


class SamplingParamsError(ValueError):
    """A sampling parameter out of range; `param` is the OpenAI field name, for the HTTP 400's
    `error.param`."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _number(name: str, value, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SamplingParamsError(f"{name} must be a number, got {value!r}", name)
    if value < lo or (lo_open and value == lo) or value > hi:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise SamplingParamsError(f"{name} must be in {interval}, got {value!r}", name)
    return float(value)


def _integer(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamsError(f"{name} must be an integer, got {value!r}", name)
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise SamplingParamsError(f"{name} must be {bound}, got {value!r}", name)
    return value


def _boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise SamplingParamsError(f"{name} must be true or false, got {value!r}", name)
    return value


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling parameters, with OpenAI's names, ranges and defaults plus vLLM's
    extensions (top_k, min_p, repetition_penalty, stop_token_ids, ignore_eos).

    `stop` accepts a string or a list of up to 4 non-empty strings and is stored as a tuple;
    `stop_token_ids` likewise. `max_tokens=None` means "until the context is full". A temperature
    below GREEDY_TEMPERATURE (0 included) means greedy decoding, where top_p/top_k/min_p/seed do
    not apply.
    `repetition_penalty` follows vLLM (divides positive / multiplies negative logits of every token
    seen in prompt or output); presence and frequency penalties follow OpenAI (output tokens only).
    `constraint` is a compiled grammar the output must match (runtime/structured_output.py).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    constraint: CompiledConstraint | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        put("temperature", _number("temperature", self.temperature, 0.0, 2.0))
        put("top_p", _number("top_p", self.top_p, 0.0, 1.0, lo_open=True))
        _integer("top_k", self.top_k, -1)
        put("min_p", _number("min_p", self.min_p, 0.0, 1.0))
        if self.seed is not None:
            _integer("seed", self.seed, *_SEED_RANGE)
        put("repetition_penalty",
            _number("repetition_penalty", self.repetition_penalty, 0.0, math.inf, lo_open=True))
        put("presence_penalty", _number("presence_penalty", self.presence_penalty, -2.0, 2.0))
        put("frequency_penalty", _number("frequency_penalty", self.frequency_penalty, -2.0, 2.0))
        if self.max_tokens is not None:
            _integer("max_tokens", self.max_tokens, 1)
        put("stop", self._stop_strings(self.stop))
        if isinstance(self.stop_token_ids, (str, bytes)) or not hasattr(self.stop_token_ids, "__iter__"):
            raise SamplingParamsError("stop_token_ids must be a list of token ids", "stop_token_ids")
        put("stop_token_ids", tuple(_integer("stop_token_ids", t, 0) for t in self.stop_token_ids))
        _boolean("ignore_eos", self.ignore_eos)
        _boolean("logprobs", self.logprobs)
        _integer("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.top_logprobs and not self.logprobs:
            raise SamplingParamsError("top_logprobs requires logprobs to be true", "top_logprobs")
        if self.constraint is not None:
            from llama_aot.runtime.structured_output import CompiledConstraint

            if not isinstance(self.constraint, CompiledConstraint):
                raise TypeError(f"constraint must be a CompiledConstraint, got {type(self.constraint).__name__}")

    @staticmethod
    def _stop_strings(stop) -> tuple[str, ...]:
        if stop is None:
            return ()
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise SamplingParamsError("stop must be a string or a list of strings", "stop")
        if len(stop) > MAX_STOP_STRINGS:
            raise SamplingParamsError(
                f"stop takes at most {MAX_STOP_STRINGS} sequences, got {len(stop)}", "stop")
        if any(s == "" for s in stop):
            raise SamplingParamsError("stop sequences must not be empty strings", "stop")
        return tuple(stop)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A request's own random stream: seeded for reproducible requests, else from OS entropy.
    `device` must be the device the logits live on."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


@dataclass(frozen=True)
class SampleOutput:
    """Per row: the chosen token; its logprob and the `top_logprobs` best (token, logprob) pairs,
    most likely first, or None where the request did not ask for logprobs."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


@dataclass(frozen=True)
class TokenMask:
    """The tokens some rows of a step's logits may take: `bits[j]` (int32 words, on the logits'
    device) is row `rows[j]`'s, token t allowed when bit t % 32 of word t // 32 is set."""

    rows: list[int]
    bits: torch.Tensor


def apply_token_mask(logits: torch.Tensor, mask: TokenMask) -> torch.Tensor:
    """Sets the tokens the mask disallows to -inf in its rows, in place; returns `logits`.
    On CPU the words are unpacked by numpy (a torch shift-and-compare costs ~10x more there)."""
    vocab, dev = logits.shape[1], logits.device
    if dev.type == "cpu":
        words = mask.bits.numpy().view(np.uint8)
        blocked = torch.from_numpy(np.unpackbits(~words, axis=-1, count=vocab, bitorder="little").view(np.bool_))
    else:
        shifts = torch.arange(32, device=dev, dtype=torch.int32)
        blocked = ((mask.bits.unsqueeze(-1) >> shifts) & 1).view(len(mask.rows), -1)[:, :vocab] == 0
    with torch.inference_mode():  # the runner's logits are inference tensors
        if mask.rows == list(range(logits.shape[0])):
            return logits.masked_fill_(blocked, -math.inf)
        index = torch.tensor(mask.rows, device=dev)
        return logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(blocked, -math.inf))


def _flat_positions(rows: list[list[int]], vocab: int, device) -> torch.Tensor:
    """`row * vocab + token` for every token of every row, to count into a flat [rows * vocab]
    tensor. Goes through numpy: turning long Python lists into a tensor is ~7x faster that way,
    and prompts can be thousands of tokens per request, every step."""
    lengths = [len(r) for r in rows]
    ids = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=sum(lengths))
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"token ids must be in [0, {vocab}), got {ids.min()}..{ids.max()}")
    offsets = np.repeat(np.arange(len(rows), dtype=np.int64) * vocab, lengths)
    return torch.from_numpy(ids + offsets).to(device)


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams],
                    prompt_ids: list[list[int]], output_ids: list[list[int]]) -> torch.Tensor:
    """Returns new logits with repetition (vLLM), then frequency and presence (OpenAI) penalties:
    `l' = (l / r if l > 0 else l * r) for tokens seen in prompt or output`, then
    `l' -= frequency * count_in_output + presence * (count_in_output > 0)`. Rows without
    penalties are returned bit-identical; the input is not modified."""
    rows = [i for i, p in enumerate(params) if p.has_penalties]
    if not rows:
        return logits
    num, vocab = len(rows), logits.shape[1]
    dev = logits.device
    index = torch.tensor(rows, device=dev)
    sub = logits.index_select(0, index)

    out_pos = _flat_positions([output_ids[i] for i in rows], vocab, dev)
    counts = torch.zeros(num * vocab, device=dev).index_add_(
        0, out_pos, torch.ones(out_pos.numel(), device=dev)).view(num, vocab)
    in_output = counts > 0

    def column(attr):
        return torch.tensor([getattr(params[i], attr) for i in rows], device=dev).unsqueeze(1)

    if any(params[i].repetition_penalty != 1.0 for i in rows):
        # Prompts can be long: only requests that use the repetition penalty pay to upload theirs.
        prompt_pos = _flat_positions(
            [prompt_ids[i] if params[i].repetition_penalty != 1.0 else [] for i in rows], vocab, dev)
        seen = torch.zeros(num * vocab, dtype=torch.bool, device=dev).index_fill_(
            0, prompt_pos, True).view(num, vocab) | in_output
        rep = column("repetition_penalty")
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - column("frequency_penalty") * counts - column("presence_penalty") * in_output
    return logits.index_copy(0, index, sub)


def _apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drops tokens less likely than min_p times the most likely one (min_p 0 drops nothing)."""
    probs = logits.softmax(-1)
    threshold = probs.amax(-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, -math.inf)


def _sorted_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keeps the top_k largest logits (ties with the k-th kept, like vLLM and HF), then the
    smallest most-likely set whose renormalised mass reaches top_p. k = vocab and p = 1 keep all."""
    ordered, order = logits.sort(-1, descending=True)
    kth = ordered.gather(1, (top_k - 1).unsqueeze(1))
    ordered = ordered.masked_fill(ordered < kth, -math.inf)
    probs = ordered.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    ordered = ordered.masked_fill(drop, -math.inf)
    return torch.empty_like(logits).scatter_(1, order, ordered)


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`_sorted_top_k_top_p` without sorting the whole vocabulary when it can be avoided.

    A full sort of 128k logits costs ~20 ms a row on CPU, but top_k rarely exceeds a few hundred
    and the top_p set nearly always lies among the first TOP_P_CANDIDATES tokens. So each row first
    works on its `topk(TOP_P_CANDIDATES)` head; a row whose k exceeds the head, or whose head holds
    less than p of the mass (then the cut may lie beyond it), is redone with the full sort. The
    choice depends only on the row itself, which keeps results batch-invariant.
    """
    vocab = logits.shape[1]
    head = min(TOP_P_CANDIDATES, vocab)
    values, ids = logits.topk(head, dim=-1)
    k_on = (top_k < vocab).unsqueeze(1)
    kth = values.gather(1, (top_k.clamp(max=head) - 1).unsqueeze(1))
    kth = torch.where(k_on, kth, -math.inf)
    kept_k = logits.masked_fill(logits < kth, -math.inf)
    values = values.masked_fill(values < kth, -math.inf)
    # softmax, not logsumexp: CUDA's generic reductions pick their split by tensor shape, so a
    # row's sum could round differently in another batch; softmax reduces each row on its own.
    probs = kept_k.softmax(-1).gather(1, ids)
    mass = probs.cumsum(-1)
    p_on = top_p < 1.0
    kept_p = torch.full_like(logits, -math.inf).scatter_(
        1, ids, values.masked_fill(mass - probs >= top_p.unsqueeze(1), -math.inf))
    out = torch.where(p_on.unsqueeze(1), kept_p, kept_k)
    redo = (k_on.squeeze(1) & (top_k > head)) | (p_on & (mass[:, -1] < top_p))
    if redo.any():
        rows = redo.nonzero().squeeze(1)
        out[rows] = _sorted_top_k_top_p(logits[rows], top_k[rows], top_p[rows])
    return out


def exponential_race(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """argmax(probs / E), E ~ Exp(1) drawn as -log(U) from each row's own generator (None: torch's
    default); torch's exponential_ is ~10x slower on CPU. U = 0 gives E = inf, a token that
    cannot win: a bias of 2**-24 at most."""
    noise = torch.empty_like(probs)
    for row, gen in zip(noise, generators):
        row.uniform_(generator=gen)
    return probs.div_(noise.log_().neg_()).argmax(-1)


def _rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t[rows], without a copy when that is every row in order (the common all-sampled batch)."""
    if rows == list(range(t.shape[0])):
        return t
    return t.index_select(0, torch.tensor(rows, device=t.device))


ARGMAX_GROUP = 1024  # the smallest group greedy_tokens' first stage reduces


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(-1)` (the first maximum wins, as there), in two stages: the maximum of each
    group of consecutive entries (`_argmax_group` of them), then the argmax of those maxima.

    Why: torch's argmax of a single row ran as one 27 us kernel for Llama 3's 128K vocabulary on
    the H200, in a 4.6 ms decode step; split into groups, the first stage spreads the row over as
    many thread blocks as there are groups, and both stages take 13.8 us (bench/matmul.py). Each
    row is still reduced on its own, so the result does not depend on the batch. A vocabulary
    with no divisor in range keeps the single argmax."""
    vocab = logits.shape[-1]
    group = _argmax_group(vocab)
    if group is None:
        return logits.argmax(-1)
    values, index = logits.reshape(*logits.shape[:-1], vocab // group, group).max(-1)
    best = values.argmax(-1, keepdim=True)
    return (best * group + index.gather(-1, best)).squeeze(-1)


@functools.cache  # a Python scan of up to vocab / 8 candidates: once per vocabulary, not per step
def _argmax_group(vocab: int) -> int | None:
    """The smallest divisor of `vocab` from ARGMAX_GROUP up that leaves at least 8 groups."""
    return next((g for g in range(ARGMAX_GROUP, vocab // 8 + 1) if vocab % g == 0), None)


class Sampler:
    """Stateless: everything a step needs comes in as arguments, so the engine owns request state
    (generators, token histories) and the sampler can be called from any runner."""

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None], prompt_ids: list[list[int]],
               output_ids: list[list[int]], mask: TokenMask | None = None) -> SampleOutput:
        """`logits` is [N, V] (one row per request, float32; other dtypes are upcast); the lists
        hold one entry per row. A sampled row's generator must live on the logits' device (see
        `make_generator`); greedy rows do not use theirs, which may be None. `mask` holds the
        constrained rows' allowed tokens; it is applied to `logits` in place."""
        num = logits.shape[0]
        if not len(params) == len(generators) == len(prompt_ids) == len(output_ids) == num:
            raise ValueError(
                f"{num} logit rows but {len(params)} params, {len(generators)} generators, "
                f"{len(prompt_ids)} prompts and {len(output_ids)} outputs")
        dev = logits.device
        if not any(p.logprobs or p.has_penalties or not p.greedy for p in params):
            # The common all-greedy batch: one greedy_tokens, no upcast (bf16 to float32 is exact,
            # so the argmax is the same) and no index uploads; each small op saved is a launch per step.
            if mask is not None:
                apply_token_mask(logits, mask)
            return SampleOutput(token_ids=greedy_tokens(logits).tolist(), logprobs=[None] * num,
                                top_logprobs=[None] * num)
        logits = apply_penalties(logits.float(), params, prompt_ids, output_ids)
        wanted = [i for i, p in enumerate(params) if p.logprobs]
        if wanted:  # before the mask: logprobs describe the model's distribution, as with top_k
            log_probs = (_rows(logits, wanted) / _temperatures([params[i] for i in wanted], dev)).log_softmax(-1)
        if mask is not None:
            apply_token_mask(logits, mask)

        tokens = torch.empty(num, dtype=torch.long, device=dev)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        if greedy:
            tokens.index_copy_(0, torch.tensor(greedy, device=dev), greedy_tokens(_rows(logits, greedy)))
        rand = [i for i, p in enumerate(params) if not p.greedy]
        if rand:
            chosen = self._sample_random(_rows(logits, rand), [params[i] for i in rand],
                                         [generators[i] for i in rand])
            tokens.index_copy_(0, torch.tensor(rand, device=dev), chosen)

        logprobs: list[float | None] = [None] * num
        top: list[list[tuple[int, float]] | None] = [None] * num
        if wanted:
            index = torch.tensor(wanted, device=dev)
            chosen_lp = log_probs.gather(1, tokens[index].unsqueeze(1)).squeeze(1).tolist()
            best_values, best_ids = log_probs.topk(max(params[i].top_logprobs for i in wanted), dim=-1)
            best_values, best_ids = best_values.tolist(), best_ids.tolist()
            for row, i in enumerate(wanted):
                n_top = params[i].top_logprobs
                logprobs[i] = chosen_lp[row]
                top[i] = list(zip(best_ids[row][:n_top], best_values[row][:n_top]))
        return SampleOutput(token_ids=tokens.tolist(), logprobs=logprobs, top_logprobs=top)

    @staticmethod
    def _sample_random(logits: torch.Tensor, params: list[SamplingParams],
                       generators: list[torch.Generator | None]) -> torch.Tensor:
        return exponential_race(token_probabilities(logits, params), generators)


def token_probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """What a sampled row draws from: each row's logits with its temperature, min_p, top_k and
    top_p applied, as probabilities (penalties are the caller's). Speculative verification
    (runtime/speculative.py) accepts drafts against these."""
    dev = logits.device
    vocab = logits.shape[1]
    logits = logits.float() / _temperatures(params, dev)
    if any(p.min_p > 0 for p in params):
        logits = _apply_min_p(logits, torch.tensor([p.min_p for p in params], device=dev))
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if any(k < vocab for k in top_k) or any(p.top_p < 1.0 for p in params):
        logits = _apply_top_k_top_p(logits, torch.tensor(top_k, device=dev),
                                    torch.tensor([p.top_p for p in params], device=dev))
    return logits.softmax(-1)


def _temperatures(params: list[SamplingParams], device) -> torch.Tensor:
    """A column of temperatures to divide logits by; greedy rows count as temperature 1."""
    return torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=device).unsqueeze(1)
