"""Weight matmuls `x @ W.T` for the few rows of a decode step, in Triton for CUDA.

At batch 1-16 a matmul is bound by reading its weight once. cuBLAS cuts the two narrow ones of a
Llama layer (o_proj, down_proj: 4096 outputs) along K and adds a second kernel that reduces the
pieces (1.7 us a call on the H200, 64 calls a step). Here each program owns BLOCK_N output
columns over the whole of K instead: 32-column tiles give a 4096-row weight 128 programs, about
one per SM, and the pipelined K loop keeps several weight tiles in flight per program. One
16-row tensor-core tile covers all the step's rows, so the weight is read once.

An FP8 weight (float8_e4m3fn, one float32 scale per output column: `--fp8`'s weight-only mode) is
read at half the bytes, widened to the activations' dtype in registers (exact), and its column
scales multiply the float32 accumulator once at the end: a W8A16 GEMV with the same tiles, since
the K loop's tile is sized in bytes.

Imported only where Triton is; `decode_linear` dispatches here for CUDA tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from llama_aot.kernels.decode_linear import MAX_ROWS


@dataclass(frozen=True)
class Tiles:
    block_n: int
    block_k: int  # for 2-byte elements; halved for float32 so the pipelined stages still fit
    num_stages: int
    num_warps: int = 4
    # The weight tile as the dot's first operand (out^T = W x^T), so that the large operand is not
    # transposed through shared memory; a candidate for FP8 weights, which are widened first.
    weight_first: bool = False


# From bench/matmul.py on the H200 (us at batch 1; cuBLAS 13.5 and 31.3): o_proj 13.3 with 16
# columns, 11.3 with 32; down_proj 37.3 and 30.0. 64 columns or 1024-deep K steps were within 2%
# of 32 x 512 for both shapes, so one tile serves both.
TILES = Tiles(block_n=32, block_k=512, num_stages=3)
# FP8 weights (bench/fp8_matmul.py --tiles, fp8-tiles-20261206-020920 on the H200, us at batch 1 with
# the bf16 tile -> this one): qkv 20.4 -> 15.4, gate_up 66.2 -> 44.8, down 30.0 -> 30.0.
FP8_TILES = Tiles(block_n=32, block_k=256, num_stages=3)


@triton.jit
def _decode_linear_kernel(X, W, Scale, Out, M, stride_xm, stride_om, N: tl.constexpr, K: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          SCALED: tl.constexpr, WEIGHT_FIRST: tl.constexpr):
    rm = tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = X + rm[:, None] * stride_xm + rk[None, :]
    w_ptrs = W + rn[:, None].to(tl.int64) * K + rk[None, :]
    row_ok, col_ok = rm[:, None] < M, rn[:, None] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk[None, :] < K - k0
        w = tl.load(w_ptrs, mask=col_ok & k_ok, other=0.0)
        x = tl.load(x_ptrs, mask=row_ok & k_ok, other=0.0)
        if SCALED:
            w = w.to(x.dtype)
        if WEIGHT_FIRST:
            acc_t = tl.dot(w, tl.trans(x), acc_t, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if WEIGHT_FIRST:
        acc = tl.trans(acc_t)
    if SCALED:
        acc = acc * tl.load(Scale + rn, mask=rn < N, other=0.0)[None, :]
    out_ptrs = Out + rm[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok & (rn[None, :] < N))


def launch_decode_linear(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, tiles: Tiles,
                         weight_scale: torch.Tensor | None = None) -> None:
    """out = x @ weight.T for x of M <= MAX_ROWS rows, read through their stride; with
    `weight_scale` (float32 [N]) an FP8 weight's columns are scaled by it."""
    n, k = weight.shape
    block_k = tiles.block_k * 2 // weight.element_size()
    scaled = weight_scale is not None
    wrap_triton(_decode_linear_kernel)[(triton.cdiv(n, tiles.block_n),)](
        x, weight, weight_scale if scaled else out, out, x.shape[0], x.stride(0), out.stride(0), N=n, K=k,
        BLOCK_M=MAX_ROWS, BLOCK_N=tiles.block_n, BLOCK_K=block_k, SCALED=scaled,
        WEIGHT_FIRST=tiles.weight_first, num_stages=tiles.num_stages,
        num_warps=tiles.num_warps)


def decode_linear_triton(x: torch.Tensor, weight: torch.Tensor,
                         weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    tiles = TILES if weight_scale is None else FP8_TILES
    launch_decode_linear(x, weight.contiguous(), out, tiles, weight_scale)
    return out
