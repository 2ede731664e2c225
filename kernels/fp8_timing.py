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

import warnings

import torch

from llama_aot.kernels.decode_linear import FP8_MAX_ROWS
from llama_aot.kernels.fp8_linear import (FP8, MODES, PER_TOKEN_TILES, WEIGHT_ONLY, fp8_linear,
                                          fp8_linear_reference)
from llama_aot.kernels.graph_timing import graph_time_us

STREAMED_BYTES = 256 << 20  # weight copies per timing together exceed any L2
# The most rows each mode is timed at: weight-only's CUDA kernel takes at most FP8_MAX_ROWS, and
# the decode-batch tile is made for decode batches (llama-compile's default --max-num-seqs on CUDA).
MODE_MAX_ROWS = {WEIGHT_ONLY: FP8_MAX_ROWS, PER_TOKEN_TILES: 128}
# A mode whose compiled product is further than this from the reference's (relative, in norm)
# computes something else on this GPU: e4m3's rounding stays well under it.
MAX_RELATIVE_ERROR = 2e-2


def candidate_modes(rows: int) -> tuple[str, ...]:
    """The modes worth timing at `rows` rows (MODE_MAX_ROWS)."""
    return tuple(m for m in MODES if rows <= MODE_MAX_ROWS.get(m, rows))


def time_modes(shape: tuple[int, int], dtype: torch.dtype, rows: tuple[int, ...]) -> dict[int, dict[str, float]]:
    """Microseconds per call of `fp8_linear(x, W, s, mode)` for W of `shape`, by x's row count in
    `rows`, then by mode (each row count's candidate_modes). A mode that fails to compile or run
    on this GPU, or computes another product, is left out of every row count with a warning: one
    kernel that this GPU or toolchain cannot take must not stop an FP8 build."""
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
            times[r] = {}
            for mode in candidate_modes(r):
                if mode not in compiled:
                    continue
                try:
                    _check_product(compiled[mode], x, weights[0], scale, mode)
                    times[r][mode] = graph_time_us(lambda i: compiled[mode](x, weights[i], scale), copies)
                except Exception as error:  # Triton's and Inductor's errors share no narrower type
                    warnings.warn(f"--fp8: the {mode} mode fails for a {n}x{k} weight at {r} rows on this GPU, "
                                  f"so it is not a candidate: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
                    del compiled[mode]
    for by_mode in times.values():  # a mode left out at any row count is left out at all
        for mode in set(by_mode) - set(compiled):
            del by_mode[mode]
    del weights, compiled
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return times


def _check_product(compiled, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, mode: str) -> None:
    expected = fp8_linear_reference(x, weight, scale, mode).float()
    error = ((compiled(x, weight, scale).float() - expected).norm() / expected.norm()).item()
    if not error <= MAX_RELATIVE_ERROR:
        raise ValueError(f"relative error {error:.3g} against the reference")


def compiled_mode(mode: str):
    """fp8_linear in `mode`, compiled by Inductor as the artifact's program is."""
    def matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, weight, scale, mode)
    return torch.compile(matmul, fullgraph=True)
