"""How long each way of computing an FP8 matmul takes on this GPU, for one weight shape and one
step size: what the quantize pass chooses by at build time (kernels differ per shape and per batch
size by up to 2x, see kernels/fp8_linear.py, so the choice is measured, not assumed).

Each mode is timed as the artifact runs it: the fp8_linear op compiled by Inductor, which traces
into it, graph-replayed (kernels/graph_timing.py), with enough weight copies that the weights
stream from memory as in a real step rather than sit in L2. Compiled, because Inductor fuses the
per-token modes' activation quantization (abs, amax, divide, clamp, cast) into one kernel (in the
artifact, into the kernel that produces x: seen on the CPU backend, where silu * mul and all of the
quantization became one kernel before `_scaled_mm`), and their output scaling into the next op.
Run eagerly, each of those ops is a kernel of its own: ~20 us a call on the H200
(fp8-matmul-20261206-014432), more than the FP8 matmul saves, so eager timings ruled those modes out.
"""
from __future__ import annotations

import torch

from llama_aot.kernels.decode_linear import FP8_MAX_ROWS
from llama_aot.kernels.fp8_linear import FP8, MODES, WEIGHT_ONLY, fp8_linear
from llama_aot.kernels.graph_timing import graph_time_us

STREAMED_BYTES = 256 << 20  # weight copies per timing together exceed any L2


def candidate_modes(rows: int) -> tuple[str, ...]:
    """The modes worth timing at `rows` rows: weight-only's CUDA kernel takes at most FP8_MAX_ROWS."""
    return MODES if rows <= FP8_MAX_ROWS else tuple(m for m in MODES if m != WEIGHT_ONLY)


def time_modes(shape: tuple[int, int], dtype: torch.dtype, rows: tuple[int, ...]) -> dict[int, dict[str, float]]:
    """Microseconds per call of `fp8_linear(x, W, s, mode)` for W of `shape`, by x's row count in
    `rows`, then by mode (each row count's candidate_modes)."""
    n, k = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    copies = max(1, -(-STREAMED_BYTES // (n * k)))
    weights = [torch.randn(n, k, device="cuda", generator=gen).to(FP8) for _ in range(copies)]
    scale = torch.rand(n, device="cuda", generator=gen) + 0.5
    compiled = {mode: compiled_mode(mode) for mode in MODES}
    times = {}
    with torch._dynamo.config.patch(recompile_limit=64):  # a variant per mode, static at 1 row and dynamic
        for r in rows:
            x = torch.randn(r, k, device="cuda", generator=gen).to(dtype)
            if r > 1:
                torch._dynamo.mark_dynamic(x, 0)  # as in the artifact, where the step's token count is
            times[r] = {mode: graph_time_us(lambda i: compiled[mode](x, weights[i], scale), copies)
                        for mode in candidate_modes(r)}
    del weights, compiled
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return times


def compiled_mode(mode: str):
    """fp8_linear in `mode`, compiled by Inductor as the artifact's program is."""
    def matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, weight, scale, mode)
    return torch.compile(matmul, fullgraph=True)
