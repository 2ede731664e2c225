"""Whether one artifact decodes faster than another by more than the machine's noise.

The kernel changes weighed for issue 4 were worth 0.01-0.05 ms a step, while one artifact's
batch-1 step moved between 4.55 and 4.67 ms from one H200 session to the next (docs/measuring.md, "Noise between sessions").
Figures from separate runs cannot settle such a change. `llama-bench decode` given several
artifacts times them in alternation in one process, so that each round's pair of runs shares the
machine's state, and compares them round by round.

The test is Wilcoxon's signed-rank test, exact: under "no difference" each round's difference is as
likely to have had the other sign, and the statistic sums the differences' ranks by size, not the
differences, so that one round disturbed by something else on the machine cannot carry it (on the
CPU, comparing an artifact with itself, one round's difference was 15x the others', and a sign-flip
test of the mean called the artifact faster, p = 0.02). It assumes nothing about how the times are
spread, and few rounds cannot fool it: with 4 rounds the smallest possible p-value is 1/8, so 4
rounds never claim a difference; 6 are the fewest that can. What it cannot see is a difference
between two loaded copies of one program (where their weights and caches landed in memory): give the
first artifact twice to measure that.
"""
from __future__ import annotations

import itertools
import random
import statistics
from dataclasses import dataclass

REPEATS = 3  # timed runs of one artifact alone (and of HF); bench/decode.py reports the best
COMPARE_ROUNDS = 10  # rounds per artifact when comparing; a batch-1 round of 256 tokens is ~1.2 s on the H200
SIGNIFICANCE = 0.05
EXACT_UP_TO = 16  # rounds; beyond, the sign flips are sampled
SAMPLED_FLIPS = 1 << 16


@dataclass(frozen=True)
class PairedDifference:
    """`other - base`, round by round, and the two-sided p-value of "the two take the same time"."""

    differences: tuple[float, ...]
    p_value: float

    @property
    def median(self) -> float:
        return statistics.median(self.differences)

    def verdict(self) -> str:
        if self.p_value >= SIGNIFICANCE:
            return "no difference beyond the rounds' scatter"
        return "faster" if self.median < 0 else "slower"


def signed_ranks(values: tuple[float, ...]) -> list[float]:
    """Each value's rank by absolute size (1 = smallest; ties share their mean rank), with its sign."""
    order = sorted(range(len(values)), key=lambda i: abs(values[i]))
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and abs(values[order[end + 1]]) == abs(values[order[start]]):
            end += 1
        for i in order[start:end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    return [r if v > 0 else -r if v < 0 else 0.0 for r, v in zip(ranks, values)]


def paired_difference(base: list[float], other: list[float], seed: int = 0) -> PairedDifference:
    if len(base) != len(other):
        raise ValueError(f"paired rounds differ in number: {len(base)} and {len(other)}")
    if len(base) < 2:
        raise ValueError("a paired difference needs at least 2 rounds")
    diffs = tuple(o - b for b, o in zip(base, other))
    signed = signed_ranks(diffs)
    ranks, observed = [abs(r) for r in signed], abs(sum(signed))

    def as_extreme(signs) -> bool:  # ranks are multiples of 1/2, so the sums compare exactly
        return abs(sum(s * r for s, r in zip(signs, ranks))) >= observed

    if len(diffs) <= EXACT_UP_TO:
        hits = sum(map(as_extreme, itertools.product((1, -1), repeat=len(diffs))))
        return PairedDifference(diffs, hits / 2 ** len(diffs))
    # Sampled: seeded, so a result file's p-value can be recomputed from its rounds; the observed
    # signs count as one of the samples, so the p-value is never 0.
    rng = random.Random(seed)
    hits = sum(as_extreme([rng.choice((1, -1)) for _ in diffs]) for _ in range(SAMPLED_FLIPS))
    return PairedDifference(diffs, (hits + 1) / (SAMPLED_FLIPS + 1))
