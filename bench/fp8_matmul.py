"""FP8 weight matmuls against bf16 on the Llama-3.1-8B weight shapes: each `fp8_linear` mode
(kernels/fp8_linear.py) checked against the weight-only reference, then timed as the build times
it (kernels/fp8_timing.py) next to cuBLAS bf16, at decode and prefill step sizes. What
`quantize_fp8` would choose on this GPU, and what FP8 weights buy per matmul.

    python -m llama_aot.bench.fp8_matmul [--rows 1,16,128,2048] [--shapes qkv,o,...] [--out-dir DIR]
    python -m llama_aot.bench.fp8_matmul --tiles [--rows 1,16]   the weight-only kernel's tiles
    python -m llama_aot.bench.fp8_matmul --row-tiles [--rows 8,16,32,128] [--save-tuned]   the per_token_tiles
        kernel's; --save-tuned records each shape's best tile over those row counts in
        kernels/tuned/fp8_row_tiles.json for this GPU, which builds on it then use
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
import triton

from llama_aot.bench.matmul import SHAPES
from llama_aot.bench.results import save_results
from llama_aot.compiler.package import git_sha
from llama_aot.kernels.decode_linear import FP8_MAX_ROWS, MAX_ROWS
from llama_aot.kernels.fp8_linear import FP8, MODES, WEIGHT_ONLY, fp8_linear, fp8_linear_reference, quantize_rows
from llama_aot.kernels.fp8_timing import STREAMED_BYTES, time_modes
from llama_aot.kernels.triton_decode_linear import FP8_TILES, Tiles, fp8_tiles, launch_decode_linear
from llama_aot.kernels.triton_fp8_rows import RowTiles, fp8_rows_triton, row_tiles, save_tuned_row_tiles
from llama_aot.kernels.graph_timing import graph_time_us


def check_modes(rows: int) -> dict[str, float]:
    """Each mode's relative error against the weight-only product, at `rows` rows (per-token
    modes add the activations' e4m3 rounding, about 2-3 %; a wrong scale shows as ~100 %)."""
    gen = torch.Generator(device="cuda").manual_seed(rows)
    q, scale = quantize_rows(torch.randn(1024, 4096, device="cuda", generator=gen))
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    ref = fp8_linear_reference(x, q, scale, WEIGHT_ONLY).float()
    return {mode: ((fp8_linear(x, q, scale, mode).float() - ref).norm() / ref.norm()).item() for mode in MODES}


def time_shape(name: str, rows: list[int]) -> list[dict]:
    n, k = SHAPES[name]
    copies = max(1, -(-STREAMED_BYTES // (2 * n * k)))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    bf16 = {}
    for r in rows:
        x = torch.randn(r, k, device="cuda", dtype=torch.bfloat16)
        bf16[r] = graph_time_us(lambda i: x @ weights[i].T, copies)
    del weights
    results = []
    for r, fp8 in time_modes((n, k), torch.bfloat16, tuple(rows)).items():
        best = min(fp8, key=fp8.get)
        print(f"{name:8s} rows {r:5d}: bf16 {bf16[r]:8.1f} us; " + ", ".join(f"{m} {t:.1f}" for m, t in fp8.items())
              + f"; best {best} ({bf16[r] / fp8[best]:.2f}x)", flush=True)
        results.append({"shape": name, "n": n, "k": k, "rows": r, "bf16_us": bf16[r], "fp8_us": fp8, "best": best})
    return results


# The FP8 weight-only kernel's tiles to sweep (block_k counts 2-byte elements: an FP8 tile reads
# twice as many e4m3 values), around kernels/triton_decode_linear.py's FP8_TILES.
# 8 warps never won in fp8-tiles-20261206-020920.
TILE_SWEEP = [Tiles(bn, bk, st, 4, first) for bn in (16, 32, 64) for bk in (128, 256, 512) for st in (3, 4)
              for first in (False, True)]
# Steps of more than MAX_ROWS rows: two 16-row programs per column tile, or one 32-row tile. The
# 4096- and 6144-wide weights read at 1.1-1.3 TB/s with 32 columns (fp8-tiles-20261206-113656):
# 16 columns give them twice the programs.
WIDE_TILE_SWEEP = [dataclasses.replace(FP8_TILES, num_stages=st, wide_block_n=bn, wide_block_k=bk, wide_block_m=m)
                   for bn in (16, 32, 64) for bk in (128, 256) for st in (3, 4) for m in (MAX_ROWS, FP8_MAX_ROWS)]


# The decode-batch FP8 x FP8 kernel's tiles (fp8_linear's per_token_tiles mode), around
# kernels/triton_fp8_rows.py's row_tiles: split-K for the 4096-wide weights is the question.
ROW_TILE_SWEEP = [RowTiles(bn, bk, split, st) for bn in (32, 64, 128) for bk in (128, 256)
                  for split in (1, 2, 4, 8) for st in (3, 4)]


def sweep_tiles(name: str, rows: int, decode_batch_kernel: bool) -> list[dict]:
    """The weight-only kernel (decode_linear's) with every TILE_SWEEP tile (WIDE_TILE_SWEEP past
    MAX_ROWS rows), or with `decode_batch_kernel` the per_token_tiles kernel with every
    ROW_TILE_SWEEP tile: each checked against the shipped tile's output, graph-replayed over
    streamed weight copies."""
    n, k = SHAPES[name]
    copies = max(1, -(-STREAMED_BYTES // (n * k)))
    weights = [torch.randn(n, k, device="cuda").to(FP8) for _ in range(copies)]
    scale = torch.rand(n, device="cuda") + 0.5
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    if decode_batch_kernel:
        xq, x_scale = quantize_rows(x)
        candidates, shipped_tiles = ROW_TILE_SWEEP, row_tiles(n, k, x.device)

        def run(weight, tiles):
            return fp8_rows_triton(xq, x_scale, weight, scale, torch.bfloat16, tiles)
    else:
        out = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
        candidates = TILE_SWEEP if rows <= MAX_ROWS else WIDE_TILE_SWEEP
        shipped_tiles = dataclasses.replace(fp8_tiles(n), row_block_n=0, row_block_k=0)  # the sweep's have no single-row tile

        def run(weight, tiles):
            launch_decode_linear(x, weight, out, tiles, scale)
            return out
    ref = run(weights[0], shipped_tiles).float().clone()
    timed = []
    for tiles in candidates:
        try:
            got = run(weights[0], tiles)
        except triton.runtime.errors.OutOfResources:
            continue
        if not ((got.float() - ref).norm() / ref.norm()).item() < 1e-3:
            print(f"{name} rows {rows} {tiles}: WRONG", flush=True)
            continue
        us = graph_time_us(lambda i: run(weights[i], tiles), copies)
        timed.append({"shape": name, "rows": rows, "tiles": dataclasses.asdict(tiles), "us": us,
                      "weight_gbps": n * k / us / 1e3, "shipped": tiles == shipped_tiles})
    del weights
    best = min(timed, key=lambda r: r["us"])
    shipped = next((r["us"] for r in timed if r["shipped"]), float("nan"))
    print(f"{name:8s} rows {rows:3d}: shipped tile {shipped:6.1f} us, best {best['us']:6.1f} us "
          f"({best['weight_gbps']:.0f} GB/s) with {best['tiles']}", flush=True)
    return timed


def best_overall(timed: list[dict]) -> RowTiles:
    """The tile with the least total time relative to each row count's best, among the tiles timed
    at every row count: one tile serves every step size of a band, so none may be far off at any."""
    row_counts = {r["rows"] for r in timed}
    best = {rows: min(r["us"] for r in timed if r["rows"] == rows) for rows in row_counts}
    cost: dict[tuple, list[float]] = {}
    for r in timed:
        cost.setdefault(tuple(sorted(r["tiles"].items())), []).append(r["us"] / best[r["rows"]])
    complete = {tiles: sum(c) for tiles, c in cost.items() if len(c) == len(row_counts)}
    return RowTiles(**dict(min(complete, key=complete.get)))


def sweep_row_tiles(shapes: list[str], rows: list[int], device: str, save_tuned: bool) -> list[dict]:
    """Every shape's ROW_TILE_SWEEP at each row count; with `save_tuned`, each shape's best_overall
    tile goes into the tuned table as soon as its sweep ends, so a sweep cut short keeps those."""
    swept = []
    for name in shapes:
        timed = [r for n_rows in rows for r in sweep_tiles(name, n_rows, decode_batch_kernel=True)]
        swept += timed
        if save_tuned and timed:
            tiles = best_overall(timed)
            path = save_tuned_row_tiles(device, {SHAPES[name]: tiles})
            print(f"{name}: {tiles} saved in {path}", flush=True)
    return swept


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", help="step sizes (default 1,16,32,128,2048; with --tiles 1,16)")
    p.add_argument("--shapes", default="qkv,o,gate_up,down", help=f"some of {', '.join(SHAPES)}")
    p.add_argument("--out-dir", type=Path, help="where the JSON goes (default bench/results)")
    p.add_argument("--tiles", action="store_true", help="instead, sweep the weight-only kernel's tiles")
    p.add_argument("--row-tiles", action="store_true",
                   help="instead, sweep the per_token_tiles kernel's tiles (default rows 8,16,32,128)")
    p.add_argument("--save-tuned", action="store_true",
                   help="with --row-tiles: record each shape's best tile for this GPU in the kernels' tuned table")
    args = p.parse_args(argv)
    device, sha = torch.cuda.get_device_name(), git_sha()
    default_rows = "8,16,32,128" if args.row_tiles else "1,16" if args.tiles else "1,16,32,128,2048"
    rows = [int(r) for r in (args.rows or default_rows).split(",")]
    if args.save_tuned and not args.row_tiles:
        p.error("--save-tuned goes with --row-tiles")
    if args.tiles or args.row_tiles:
        shapes = args.shapes.split(",")
        swept = sweep_row_tiles(shapes, rows, device, args.save_tuned) if args.row_tiles else \
            [r for name in shapes for n_rows in rows for r in sweep_tiles(name, n_rows, decode_batch_kernel=False)]
        kind = "fp8-row-tiles" if args.row_tiles else "fp8-tiles"
        print(save_results(kind, [{"device": device, "git_sha": sha, **r} for r in swept], args.out_dir))
        return 0
    checks = {n_rows: check_modes(n_rows) for n_rows in (1, 5, MAX_ROWS)}
    for n_rows, errors in checks.items():
        print(f"check at {n_rows} rows: " + ", ".join(f"{m} {e:.2e}" for m, e in errors.items()))
    results = [r for name in args.shapes.split(",") for r in time_shape(name, rows)]
    print(save_results("fp8-matmul", [{"device": device, "git_sha": sha, "checks": checks, **r} for r in results],
                       args.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
