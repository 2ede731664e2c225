"""How long each way of computing an FP8 matmul takes on this GPU, for one weight shape and one
step size: what the quantize pass chooses by at build time (kernels differ per shape and per batch
size by up to 2x, see kernels/fp8_linear.py, so the choice is measured, not assumed).

Each mode is timed through the fp8_linear op itself, graph-replayed (kernels/graph_timing.py),
with enough weight copies that the weights stream from memory as in a real step rather than sit
in L2.
"""
from __future__ import annotations

import torch

from llama_aot.kernels.decode_linear import MAX_ROWS
from llama_aot.kernels.fp8_linear import FP8, MODES, WEIGHT_ONLY, fp8_linear
from llama_aot.kernels.graph_timing import graph_time_us

STREAMED_BYTES = 256 << 20  # weight copies per timing together exceed any L2


def candidate_modes(rows: int) -> tuple[str, ...]:
    """The modes worth timing at `rows` rows: weight-only's CUDA kernel takes at most MAX_ROWS."""
    return MODES if rows <= MAX_ROWS else tuple(m for m in MODES if m != WEIGHT_ONLY)


def time_modes(shape: tuple[int, int], dtype: torch.dtype, rows: tuple[int, ...]) -> dict[int, dict[str, float]]:
    """Microseconds per call of `fp8_linear(x, W, s, mode)` for W of `shape`, by x's row count in
    `rows`, then by mode (each row count's candidate_modes)."""
    n, k = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    copies = max(1, -(-STREAMED_BYTES // (n * k)))
    weights = [torch.randn(n, k, device="cuda", generator=gen).to(FP8) for _ in range(copies)]
    scale = torch.rand(n, device="cuda", generator=gen) + 0.5
    times = {}
    for r in rows:
        x = torch.randn(r, k, device="cuda", generator=gen).to(dtype)
        times[r] = {mode: graph_time_us(lambda i: fp8_linear(x, weights[i], scale, mode), copies)
                    for mode in candidate_modes(r)}
    del weights
    torch.cuda.empty_cache()
    return times
