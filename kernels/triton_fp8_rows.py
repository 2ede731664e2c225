"""FP8 x FP8 matmul of a decode batch's rows, in Triton for CUDA: fp8_linear's PER_TOKEN_TILES mode.

`out = (xq @ W^T) * x_scale[:, None] * w_scale[None, :]` with xq the rows of x quantized per token
(e4m3, scales [M]) and W e4m3 with a scale per output channel: the per_token mode's product, with
the tensor cores taking both operands in e4m3 as they stand.

Why a kernel of our own for it: at 16-32 rows the FP8 forms the build could choose read the
weight at 1.3-2.7 TB/s on the H200 where one row reads it at 3.5 (docs/fp8.md, "Session 22"):
cuBLASLt's FP8 kernels pick tiles for large M, and the weight-only kernel widens every weight
element to bf16 in registers before its dot. Here a program owns one tile of BLOCK_N columns and
all of a row block's BLOCK_M rows, and reads its weight tile once, straight into the dot. A
4096-wide weight has only 4096 / BLOCK_N column tiles, too few programs to keep every SM's loads
in flight over K = 14336, so K is split into SPLIT_K ranges, each program writing float32 partial
sums that a second kernel adds in a fixed order (deterministic: the same sums whatever the
schedule), scales and casts.

The row count may be symbolic (an artifact's step size): the grids are computed from it with
floor divisions, and rows past it are masked. Imported only where Triton is.
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# The rows of one program's tile: a decode batch of up to 32 in one row block; more rows take
# more row blocks, adjacent in launch order so that they read the same weight tile from L2.
BLOCK_M = 32
REDUCE_BLOCK = 1024  # outputs per program of the split-K reduction


@dataclass(frozen=True)
class RowTiles:
    """One weight shape's tile: columns and K elements per step, and the K ranges."""

    block_n: int
    block_k: int
    split_k: int
    num_stages: int = 4
    num_warps: int = 4


# Programs enough to keep every SM of an H100 or H200 (132) loading: about four each, as the
# single-row kernel's 8-column tiles give down_proj (512 programs, 3.35 TB/s on the H200).
TARGET_PROGRAMS = 512


# Tiles measured best per GPU (by torch.cuda.get_device_name) and weight shape ("NxK"), written by
# `python -m llama_aot.bench.fp8_matmul --row-tiles --save-tuned` on that GPU. The build's source
# hash covers this file, so a new table rebuilds what it changes.
TUNED_ROW_TILES = Path(__file__).with_name("tuned") / "fp8_row_tiles.json"


@functools.cache
def tuned_row_tiles() -> dict[str, dict[str, dict]]:
    return json.loads(TUNED_ROW_TILES.read_text()) if TUNED_ROW_TILES.exists() else {}


def save_tuned_row_tiles(device_name: str, tiles_by_shape: dict[tuple[int, int], RowTiles]) -> Path:
    """Records `tiles_by_shape` as `device_name`'s tuned tiles, keeping other GPUs' and shapes'."""
    table = json.loads(TUNED_ROW_TILES.read_text()) if TUNED_ROW_TILES.exists() else {}
    entries = table.setdefault(device_name, {})
    entries.update({f"{n}x{k}": asdict(t) for (n, k), t in tiles_by_shape.items()})
    TUNED_ROW_TILES.parent.mkdir(exist_ok=True)
    TUNED_ROW_TILES.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    tuned_row_tiles.cache_clear()
    return TUNED_ROW_TILES


def row_tiles(n: int, k: int, device: torch.device | None = None) -> RowTiles:
    """The tile for a weight of `n` output columns and `k` inputs on `device`: the tuned table's
    where that GPU and shape were swept, else `default_row_tiles`."""
    if device is not None and device.type == "cuda":
        entry = tuned_row_tiles().get(torch.cuda.get_device_name(device), {}).get(f"{n}x{k}")
        if entry:
            return RowTiles(**entry)
    return default_row_tiles(n, k)


def default_row_tiles(n: int, k: int) -> RowTiles:
    """64 columns (32 where that gives fewer than half of TARGET_PROGRAMS), K in 128-element
    steps, and K split in two while that stays within TARGET_PROGRAMS and leaves at least four K
    steps a split: enough programs for every SM without a sweep."""
    block_n = 64 if triton.cdiv(n, 64) >= TARGET_PROGRAMS // 2 else 32
    block_k = 128
    columns = triton.cdiv(n, block_n)
    split_k = 1
    while columns * split_k * 2 <= TARGET_PROGRAMS and k // (block_k * split_k * 2) >= 4:
        split_k *= 2
    return RowTiles(block_n, block_k, split_k)


@triton.jit
def _fp8_rows_kernel(X, XScale, W, WScale, Out, M, stride_xm, stride_om, N: tl.constexpr, K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                     K_PER_SPLIT: tl.constexpr, ROW_BLOCKS):
    """One (row block, column tile, K range): with SPLIT_K 1 the scaled output, else float32
    partial sums into Out[split, M, N]."""
    pid = tl.program_id(0)
    split = pid % SPLIT_K
    tile = pid // SPLIT_K
    rm = (tile % ROW_BLOCKS) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (tile // ROW_BLOCKS) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = split * K_PER_SPLIT
    rk = k_start + tl.arange(0, BLOCK_K)
    x_ptrs = X + rm[:, None] * stride_xm + rk[None, :]
    w_ptrs = W + rn[:, None].to(tl.int64) * K + rk[None, :]
    row_ok, col_ok = rm[:, None] < M, rn[:, None] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        k_ok = rk[None, :] < K - k0
        w = tl.load(w_ptrs, mask=col_ok & k_ok, other=0.0)
        x = tl.load(x_ptrs, mask=row_ok & k_ok, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out_ok = row_ok & (rn[None, :] < N)
    if SPLIT_K == 1:
        acc = acc * tl.load(XScale + rm, mask=rm < M, other=0.0)[:, None]
        acc = acc * tl.load(WScale + rn, mask=rn < N, other=0.0)[None, :]
        tl.store(Out + rm[:, None] * stride_om + rn[None, :], acc.to(Out.dtype.element_ty), mask=out_ok)
    else:
        tl.store(Out + (split * M + rm[:, None]) * N + rn[None, :], acc, mask=out_ok)


@triton.jit
def _reduce_splits_kernel(Partial, XScale, WScale, Out, M, stride_om, N: tl.constexpr, SPLIT_K: tl.constexpr,
                          BLOCK: tl.constexpr):
    """Out[m, n] = sum over the splits, in order, of Partial[split, m, n], times both scales."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < M * N
    total = tl.load(Partial + offsets, mask=ok, other=0.0)
    for split in range(1, SPLIT_K):
        total += tl.load(Partial + split * M * N + offsets, mask=ok, other=0.0)
    m, n = offsets // N, offsets % N
    total = total * tl.load(XScale + m, mask=ok, other=0.0) * tl.load(WScale + n, mask=ok, other=0.0)
    tl.store(Out + m * stride_om + n, total.to(Out.dtype.element_ty), mask=ok)


def fp8_rows_triton(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    out_dtype: torch.dtype, tiles: RowTiles | None = None) -> torch.Tensor:
    """xq: [M, K] e4m3 (read through its row stride); x_scale: [M]; weight: [N, K] e4m3;
    weight_scale: [N]. Returns [M, N] in out_dtype. `tiles`: row_tiles' choice unless given."""
    rows, k = xq.shape
    n = weight.shape[0]
    if xq.stride(-1) != 1:
        xq = xq.contiguous()
    weight = weight.contiguous()
    tiles = tiles or row_tiles(n, k, xq.device)
    out = torch.empty(rows, n, dtype=out_dtype, device=xq.device)
    row_blocks = (rows + BLOCK_M - 1) // BLOCK_M
    k_per_split = triton.cdiv(triton.cdiv(k, tiles.split_k), tiles.block_k) * tiles.block_k
    target = out if tiles.split_k == 1 else torch.empty(tiles.split_k, rows, n, dtype=torch.float32,
                                                          device=xq.device)
    wrap_triton(_fp8_rows_kernel)[(triton.cdiv(n, tiles.block_n) * row_blocks * tiles.split_k,)](
        xq, x_scale, weight, weight_scale, target, rows, xq.stride(0), out.stride(0), N=n, K=k,
        BLOCK_M=BLOCK_M, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, SPLIT_K=tiles.split_k,
        K_PER_SPLIT=k_per_split, ROW_BLOCKS=row_blocks, num_stages=tiles.num_stages, num_warps=tiles.num_warps)
    if tiles.split_k > 1:
        wrap_triton(_reduce_splits_kernel)[((rows * n + REDUCE_BLOCK - 1) // REDUCE_BLOCK,)](
            target, x_scale, weight_scale, out, rows, out.stride(0), N=n, SPLIT_K=tiles.split_k, BLOCK=REDUCE_BLOCK)
    return out
