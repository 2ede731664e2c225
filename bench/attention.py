"""Paged attention alone: how fast the kernel reads the KV cache, by batch, context and split count.

    python -m llama_aot.bench.attention [--batch 1,16,64] [--context 128,2048,8192] [--splits 8,16,32]
                                        [--prefill 512] [--tiles 16x32,16x64,...] [--out-dir DIR]
                                        [--kv-cache-dtype fp8_e4m3]

Times one layer's attention (Llama-3.1-8B heads: 32 query and 8 KV heads of 128, bf16, 16-token
blocks scattered over the cache) for decode steps of each batch and context, and for the same
steps with one --prefill-token chunk mixed in, as a serving step that admits a request has it.
With `--kv-cache-dtype fp8_e4m3` the cache holds e4m3 with a K and a V scale, as an artifact built
with that flag has it (half the bytes to read).
Each context is cut into --splits ranges, and into the artifacts' count for the step (`split_count`:
32 at batch 1, 8 from batch 4 and in steps with a chunk). Then, at the artifacts' split count,
each --tiles shape (query rows x keys per loop step) is timed at every batch and context, against
the artifacts' tile for that kind of step (kernels/triton_paged_attention.py: DECODE_TILE, or
FP8_DECODE_TILE for an FP8 cache, for decode steps, CHUNK_TILE for mixed ones).

The calls are replayed from a CUDA graph, as the runtime's decode steps are: launched one by one
from Python, a call costs ~0.4 ms of launch overhead whatever its size, which hides the kernel.
It reports microseconds per layer and the cache bytes read per second as a fraction of the
device's copy bandwidth, the figure a long-context decode step is bound by, and writes the table
as JSON.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llama_aot.bench.decode import copy_bandwidth
from llama_aot.bench.paged_layout import blocks_for, scattered_step
from llama_aot.bench.results import save_results
from llama_aot.compiler.package import git_sha
from llama_aot.kernels.graph_timing import graph_time_us

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
PREFILL_START = 1000  # tokens already cached ahead of the mixed-in prefill chunk


def _step(batch: int, context: int, prefill: int, gen: torch.Generator, fp8_cache: bool = False):
    """A step of `batch` decode tokens at `context`, plus a `prefill`-token chunk if nonzero, over
    randomly placed blocks, with a one-layer cache holding them (e4m3 with `fp8_cache`)."""
    seqs = [(context - 1, 1)] * batch + ([(PREFILL_START, prefill)] if prefill else [])
    num_blocks = blocks_for(seqs, BLOCK_SIZE)
    step = scattered_step(seqs, BLOCK_SIZE, num_blocks, gen, "cuda")
    values = torch.Generator("cuda").manual_seed(0)  # drawn on the device: 64 x 8K tokens is a 2 GB cache
    cache = torch.randn(1, 2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=values, device="cuda",
                        dtype=torch.bfloat16)
    if fp8_cache:
        cache = cache.to(torch.float8_e4m3fn)
    q = torch.randn(len(step["tokens"]), HEADS, HEAD_DIM, generator=values, device="cuda", dtype=torch.bfloat16)
    return q, cache, step


def time_attention(batch: int, context: int, prefill: int = 0, fp8_cache: bool = False, **tile) -> float:
    """Microseconds per call, graph-timed (kernels/graph_timing.py). `tile` (splits, decode_tile,
    chunk_tile) goes to the kernel; its defaults are the op's."""
    from llama_aot.kernels.triton_paged_attention import paged_attention_triton

    q, cache, step = _step(batch, context, prefill, torch.Generator().manual_seed(0), fp8_cache)
    scales = {"k_scale": torch.ones(1, device="cuda"), "v_scale": torch.ones(1, device="cuda")} if fp8_cache else {}
    return graph_time_us(lambda _: paged_attention_triton(
        q, cache, 0, step["block_tables"], step["context_lens"], step["query_index"], step["positions"],
        HEAD_DIM ** -0.5, **scales, **tile))


def main(argv=None) -> int:
    from llama_aot.kernels import triton_paged_attention as kernel

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default="1,16,64")
    p.add_argument("--context", default="128,2048,8192")
    p.add_argument("--splits", default="8,16,32")
    p.add_argument("--prefill", type=int, default=512, help="tokens of the mixed-in prefill chunk (0: none)")
    p.add_argument("--tiles", default="16x32,16x64,16x128,32x64,64x128",
                   help="query rows x keys per step, timed at the artifacts' split count")
    p.add_argument("--out-dir", type=Path, help="where the JSON goes (default bench/results)")
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8_e4m3"), default="auto")
    args = p.parse_args(argv)
    fp8_cache = args.kv_cache_dtype == "fp8_e4m3"
    bandwidth = copy_bandwidth()
    device, sha = torch.cuda.get_device_name(), git_sha()
    tiles = [tuple(map(int, t.split("x"))) for t in args.tiles.split(",") if t]
    records = []
    for prefill in sorted({0, args.prefill}):
        default = kernel.CHUNK_TILE if prefill else kernel.FP8_DECODE_TILE if fp8_cache else kernel.DECODE_TILE
        for batch in map(int, args.batch.split(",")):
            step_splits = kernel.split_count(batch, 0 if prefill else 1)  # the op's count for this step
            shapes = [(step_splits, *tile) for tile in [default, *tiles]]
            shapes += [(int(n), *default) for n in args.splits.split(",")]
            for context in map(int, args.context.split(",")):
                kv_bytes = ((batch * context + (PREFILL_START + prefill if prefill else 0)) * 2 * KV_HEADS * HEAD_DIM
                            * (1 if fp8_cache else 2))
                for splits, tile_rows, block_n in dict.fromkeys(shapes):
                    tile = (tile_rows, block_n)  # only the step's kind of launch runs
                    us = time_attention(batch, context, prefill, fp8_cache, splits=splits, decode_tile=tile,
                                        chunk_tile=tile)
                    fraction = kv_bytes / (us * 1e-6) / bandwidth
                    records.append({"device": device, "git_sha": sha, "batch": batch, "context": context,
                                    "prefill_tokens": prefill, "splits": splits, "rows": tile_rows,
                                    "block_n": block_n, "us_per_layer": us, "kv_bandwidth_fraction": fraction,
                                    "kv_cache_dtype": args.kv_cache_dtype})
                    mixed = f" + {prefill}-token prefill" if prefill else ""
                    print(f"batch {batch:3d} context {context:6d}{mixed} splits {splits:3d} "
                          f"tile {tile_rows:3d}x{block_n:<3d}: {us:8.1f} us per layer, {fraction:5.0%} of copy "
                          "bandwidth")
    print(save_results("attention", records, args.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
