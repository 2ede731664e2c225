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
the K loop's tile is sized in bytes. A single row (batch-1 decode, the case `--fp8` is bought for)
goes to a kernel of its own when the tiles name one: no tensor-core tile, whose 16 rows would be 15
of padding, but each weight element widened to float32 and multiplied by x's broadcast row into an
accumulator the size of the tile, summed across K once at the end, unpipelined. On the H100 it
read the FP8 gate_up weight at 2.8 TB/s (42.4 us; cuBLAS bf16 85.7) and down_proj's at 2.6 TB/s
(22.8 us against 44.6; fp8-gemv-candidates-20261206-081024). In an artifact the row count is
symbolic, so both kernels are launched, with grids that are empty except for the one the count
wants: one kernel holding both loops behind a run-time branch ran 11-25 % slower at one row, the
tensor-core loop's pipeline stages costing the single-row loop its occupancy (docs/fp8.md). FP8
weights also take steps of MAX_ROWS + 1 to FP8_MAX_ROWS rows, launched the same way (Tiles.wide_block_m).

Imported only where Triton is; `decode_linear` dispatches here for CUDA tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from llama_aot.kernels.decode_linear import FP8_MAX_ROWS, MAX_ROWS


@dataclass(frozen=True)
class Tiles:
    block_n: int
    block_k: int  # for 2-byte elements; halved for float32 so the pipelined stages still fit
    num_stages: int
    num_warps: int = 4
    # The weight tile as the dot's first operand (out^T = W x^T), so that the large operand is not
    # transposed through shared memory; a candidate for FP8 weights, which are widened first.
    weight_first: bool = False
    # The single-row kernel's tile (columns, and K elements of the weight's own dtype); 0: none, one
    # row goes through the tensor-core kernel like any other count.
    row_block_n: int = 0
    row_block_k: int = 0
    # Steps of MAX_ROWS + 1 to FP8_MAX_ROWS rows (FP8 weights only): the tile's columns, K elements
    # (for 2-byte elements, as block_k) and rows per program. MAX_ROWS rows give each column tile
    # two programs, adjacent, so the second reads the weight tile from L2; FP8_MAX_ROWS one
    # program with a tile that tall.
    wide_block_n: int = 32
    wide_block_k: int = 128
    wide_block_m: int = MAX_ROWS


# From bench/matmul.py on the H200 (us at batch 1; cuBLAS 13.5 and 31.3): o_proj 13.3 with 16
# columns, 11.3 with 32; down_proj 37.3 and 30.0. 64 columns or 1024-deep K steps were within 2%
# of 32 x 512 for both shapes, so one tile serves both.
TILES = Tiles(block_n=32, block_k=512, num_stages=3)
# FP8 weights (bench/fp8_matmul.py --tiles, fp8-tiles-20261206-020920 on the H200, us at batch 1 with
# the bf16 tile -> this one): qkv 20.4 -> 15.4, gate_up 66.2 -> 44.8, down 30.0 -> 30.0.
FP8_TILES = Tiles(block_n=32, block_k=256, num_stages=3)
# The single-row loop, by the weight's output width (fp8-gemv-candidates-20261206-080139, H100, us):
# a 4096-wide weight needs narrow tiles for enough programs to keep every SM reading (down_proj:
# 8 columns x 1024 21.9, the best of 54 variants); gate_up's 28672 columns take 32 x 256 (41.1; the
# best, 16 x 256, 40.9). Both read 8 KB of weight per step. Widths between take the narrow tile:
# qkv's 6144 columns 12.2 us (fp8-gemv-candidates-20261206-081024; its best FMA variant 11.4).
ROW_TILE_WIDE_FROM = 16384
# Steps of 17-32 rows (fp8-tiles-20261206-113656, H100, us at 32 rows): two 16-row programs per
# 32 x 128 tile for the 4096- and 6144-wide weights (o 15.0, down 45.3, qkv 20.6: 1.1-1.3 TB/s, as
# well as any tile swept did), one 32-row program per 64 x 128 tile for gate_up (60.9 against
# 76.3; 1.9 TB/s). The tiles of the steps up to 16 rows took o 15.6, down 46.1 and gate_up 84.7.
WIDE_TILES_NARROW_WEIGHT = {"wide_block_n": 32, "wide_block_k": 128, "wide_block_m": MAX_ROWS}
WIDE_TILES_WIDE_WEIGHT = {"wide_block_n": 64, "wide_block_k": 128, "wide_block_m": FP8_MAX_ROWS}
SILU_BLOCK = 1024  # values of the MLP's activation per program, for steps of 2 or more rows


def fp8_tiles(n: int) -> Tiles:
    """The tiles for an FP8 weight with `n` output columns."""
    wide_weight = n >= ROW_TILE_WIDE_FROM
    row_block_n = 32 if wide_weight else 8
    return replace(FP8_TILES, row_block_n=row_block_n, row_block_k=8192 // row_block_n,
                   **(WIDE_TILES_WIDE_WEIGHT if wide_weight else WIDE_TILES_NARROW_WEIGHT))


@triton.jit
def _silu_times(x, up):
    """The MLP's `silu(x) * up`, rounded where torch's two ops round (to x's dtype after each)."""
    g = x.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(x.dtype).to(tl.float32)
    return (silu * up.to(tl.float32)).to(x.dtype)


@triton.jit
def _silu_times_kernel(X, Up, Out, stride_xm, stride_um, K: tl.constexpr, BLOCK: tl.constexpr):
    """Out[m, :] = silu(X[m, :]) * Up[m, :], one program per BLOCK values of a row."""
    per_row: tl.constexpr = (K + BLOCK - 1) // BLOCK
    row = tl.program_id(0) // per_row
    cols = (tl.program_id(0) % per_row) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < K
    x = tl.load(X + row * stride_xm + cols, mask=ok, other=0.0)
    up = tl.load(Up + row * stride_um + cols, mask=ok, other=0.0)
    tl.store(Out + row * K + cols, _silu_times(x, up), mask=ok)


@triton.jit
def _single_row_kernel(X, W, Scale, Out, Up, N: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, SCALED: tl.constexpr, GATED: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = W + rn[:, None].to(tl.int64) * K + rk[None, :]
    x_ptrs = X + rk
    up_ptrs = Up + rk
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        w = tl.load(w_ptrs, mask=(rn[:, None] < N) & k_ok[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=k_ok, other=0.0)
        if GATED:
            x = _silu_times(x, tl.load(up_ptrs, mask=k_ok, other=0.0))
            up_ptrs += BLOCK_K
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1)
    if SCALED:
        y = y * tl.load(Scale + rn, mask=rn < N, other=0.0)
    tl.store(Out + rn, y.to(Out.dtype.element_ty), mask=rn < N)


@triton.jit
def _decode_linear_kernel(X, W, Scale, Out, M, stride_xm, stride_om, N: tl.constexpr, K: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          SCALED: tl.constexpr, WEIGHT_FIRST: tl.constexpr, ROW_BLOCKS: tl.constexpr):
    pid = tl.program_id(0)
    rm = (pid % ROW_BLOCKS) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid // ROW_BLOCKS) * BLOCK_N + tl.arange(0, BLOCK_N)
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
                         weight_scale: torch.Tensor | None = None, up: torch.Tensor | None = None) -> None:
    """out = x @ weight.T for x of M <= MAX_ROWS rows (FP8_MAX_ROWS with `weight_scale`), read
    through their stride; with `weight_scale` (float32 [N]) an FP8 weight's columns are scaled by it;
    with `up` (x's shape, read through its own row stride) the product is `(silu(x) * up) @ weight.T`.

    The row count may be symbolic (an artifact's step size), so each kernel is launched with a grid
    that is empty unless the count is in its band, computed with floor divisions only: `1 // rows`
    is 1 for one row, `(MAX_ROWS // rows + MAX_ROWS - 1) // MAX_ROWS` is 1 up to MAX_ROWS rows, and
    `(rows + FP8_MAX_ROWS - MAX_ROWS - 1) // FP8_MAX_ROWS` is 1 from MAX_ROWS + 1 to FP8_MAX_ROWS.
    An empty grid launches nothing, in Triton's launcher and in AOTInductor's.

    With `up`, only the single-row kernel computes the activation as it loads x. Steps of two or
    more rows get it from a small kernel of its own first (`1 - 1 // rows` is 1 from two rows
    on): the tensor-core kernel would recompute it for its whole [rows, BLOCK_K] tile in every
    column program, and hold that tile, gate and up, in registers."""
    n, k = weight.shape
    scaled = weight_scale is not None
    scale = weight_scale if scaled else out  # never read unless scaled: any tensor stands in
    rows = x.shape[0]
    gated = up is not None
    tile_input = x  # what the tensor-core kernels multiply: x, or with `up` the activation
    if gated:
        tile_input = torch.empty(rows, k, dtype=x.dtype, device=x.device)
        wrap_triton(_silu_times_kernel)[(rows * (1 - 1 // rows) * triton.cdiv(k, SILU_BLOCK),)](
            x, up, tile_input, x.stride(0), up.stride(0), K=k, BLOCK=SILU_BLOCK)

    def tensor_core_tile(block_m: int, block_n: int, block_k: int, row_blocks: int, band: int) -> None:
        """The band's programs: `row_blocks` adjacent ones per column tile, none unless band is 1."""
        wrap_triton(_decode_linear_kernel)[(triton.cdiv(n, block_n) * row_blocks * band,)](
            tile_input, weight, scale, out, rows, tile_input.stride(0), out.stride(0), N=n, K=k,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k * 2 // weight.element_size(), SCALED=scaled,
            WEIGHT_FIRST=tiles.weight_first, ROW_BLOCKS=row_blocks, num_stages=tiles.num_stages, num_warps=tiles.num_warps)

    up_to_max_rows = 1
    if tiles.row_block_n:
        wrap_triton(_single_row_kernel)[(triton.cdiv(n, tiles.row_block_n) * (1 // rows),)](
            x, weight, scale, out, up if gated else x, N=n, K=k, BLOCK_N=tiles.row_block_n,  # x: never read ungated
            BLOCK_K=tiles.row_block_k, SCALED=scaled, GATED=gated, num_stages=1, num_warps=tiles.num_warps)
        up_to_max_rows = (rows + MAX_ROWS - 2) // MAX_ROWS  # 0 at one row
    if scaled:
        up_to_max_rows = up_to_max_rows * ((MAX_ROWS // rows + MAX_ROWS - 1) // MAX_ROWS)
        tensor_core_tile(tiles.wide_block_m, tiles.wide_block_n, tiles.wide_block_k, FP8_MAX_ROWS // tiles.wide_block_m,
                         (rows + FP8_MAX_ROWS - MAX_ROWS - 1) // FP8_MAX_ROWS)
    tensor_core_tile(MAX_ROWS, tiles.block_n, tiles.block_k, 1, up_to_max_rows)


def decode_linear_triton(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None = None,
                         up: torch.Tensor | None = None) -> torch.Tensor:
    """`up`: the MLP's up projection, which makes x its gate (`fp8_gated_linear`)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if up is not None and up.stride(-1) != 1:
        up = up.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    tiles = TILES if weight_scale is None else fp8_tiles(weight.shape[0])
    launch_decode_linear(x, weight.contiguous(), out, tiles, weight_scale, up)
    return out
