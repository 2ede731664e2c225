"""Weight matmuls `x @ W.T` in Triton for CUDA, with the tile shape chosen by the token count at run time.

At decode a step has one token per sequence, so every matmul is a thin slab of activations
against a large weight: bound by reading the weight once, and cuBLAS's GEMV reaches only ~74% of
the H100's copy bandwidth there. Prefill steps are the opposite, bound by tensor-core throughput.
One tile shape cannot serve both, and the exported program has a single symbolic token count.

So the op launches one kernel per regime, each with its own tile shape, and gives every launch a
grid that is zero outside its regime's token range. The grid is an integer expression of the
symbolic token count (`min(m // (hi + 1), 1)`, no Python branch, hence no export guard), and
AOTInductor's launcher skips a launch whose grid is empty, so exactly one kernel runs per call, the
choice costs nothing at run time, and it survives CUDA-graph capture.

Imported only where Triton is; `llama_aot::linear` dispatches here for CUDA tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton


@dataclass(frozen=True)
class Tiles:
    """One regime: token counts in (previous regime's max_m, max_m] use these tiles."""

    max_m: int | None  # None: no upper bound
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def regimes(n: int, k: int, elem_bytes: int = 2) -> tuple[Tiles, ...]:
    """The tile shapes per token-count range for an [n, k] weight of `elem_bytes`-wide elements.

    Thin regimes use narrow weight tiles so that even a 4096-row weight spreads over ~256
    programs (two per SM) and a long K loop keeps several tiles in flight per program; the last
    regime is a conventional tensor-core tiling for prefill. The K depth is sized for 2-byte
    types and scaled by 2 / elem_bytes, so the pipelined stages still fit in
    shared memory (fp32 builds, which the correctness checks use)."""
    narrow = 16 if n <= 8192 else 32

    def depth(k_for_2_bytes: int) -> int:
        return k_for_2_bytes * 2 // elem_bytes

    return (
        Tiles(16, 16, narrow, depth(256 if narrow == 32 else 512), 4, 4),
        Tiles(64, 64, 32 if n <= 8192 else 64, depth(128), 4, 4),
        Tiles(None, 128, 128, depth(64), 8, 3),
    )


@triton.jit
def _linear_kernel(X, W, Out, M, stride_xm, stride_om,
                   N: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    # Consecutive programs walk GROUP_M row tiles of one weight column tile, so it is read from
    # HBM once and from L2 after that.
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = X + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
    w_ptrs = W + rn[:, None].to(tl.int64) * K + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if K % BLOCK_K == 0:  # decided at compile time; a K mask would cost 16-byte loads
            x = tl.load(x_ptrs, mask=rm[:, None] < M, other=0.0)
            w = tl.load(w_ptrs, mask=rn[:, None] < N, other=0.0)
        else:
            k_ok = rk[None, :] < K - k0
            x = tl.load(x_ptrs, mask=(rm[:, None] < M) & k_ok, other=0.0)
            w = tl.load(w_ptrs, mask=(rn[:, None] < N) & k_ok, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out_ptrs = Out + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def _in_range(m, low: int, high: int | None):
    """1 when low < m <= high, else 0, as integer arithmetic on a possibly symbolic m (m >= 1)."""
    above = torch.sym_min(m // (low + 1), 1) if low else 1
    below = 1 - torch.sym_min(m // (high + 1), 1) if high is not None else 1
    return above * below


def launch_linear(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, tiles: Tiles, active=1) -> None:
    """Launches one regime's kernel over all of `x`; `active` (0 or 1) scales its grid."""
    m, k = x.shape
    n = weight.shape[0]
    grid = (triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n) * active,)
    wrap_triton(_linear_kernel)[grid](
        x, weight, out, m, x.stride(0), out.stride(0),
        N=n, K=k, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=8,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def linear_triton(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    x = x.reshape(-1, shape[-1]).contiguous()
    weight = weight.contiguous()
    m, n = x.shape[0], weight.shape[0]
    out = x.new_empty(m, n)
    low = 0
    for tiles in regimes(n, x.shape[1], x.element_size()):
        launch_linear(x, weight, out, tiles, _in_range(m, low, tiles.max_m))
        low = tiles.max_m
    return out.view(*shape[:-1], n)
