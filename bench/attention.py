"""Decode attention alone: how fast the paged-attention kernel reads the KV cache, by context.

    python -m llama_aot.bench.attention [--batch 1,16] [--context 128,2048,8192] [--out-dir DIR]

Times one layer's decode attention (Llama-3.1-8B heads: 32 query and 8 KV heads of 128, bf16,
16-token blocks scattered over the cache) for each batch and context, with the key loop compiled
both ways (the software-pipelined `for` the artifacts use, and the `while` the interpreter needs)
and each context cut into --splits ranges (the artifacts use 16).
It reports microseconds per call and the cache bytes read per second as a fraction of the device's
copy bandwidth, the figure a long-context decode step is bound by, and writes the table as JSON.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llama_aot.bench.decode import copy_bandwidth
from llama_aot.bench.results import save_results
from llama_aot.compiler.package import git_sha
from llama_aot.runtime.step_inputs import SequenceChunk, build_step_inputs

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16


def _decode_inputs(batch: int, context: int, gen: torch.Generator):
    """A decode step of `batch` sequences at `context` tokens over randomly placed blocks, and a
    one-layer cache holding them."""
    per_seq = -(-context // BLOCK_SIZE)
    num_blocks = 1 + batch * per_seq
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    chunks = [SequenceChunk((0,), context - 1, tuple(order[i * per_seq:(i + 1) * per_seq])) for i in range(batch)]
    step = build_step_inputs(chunks, BLOCK_SIZE, "cuda")
    cache = torch.randn(1, 2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=gen).to("cuda", torch.bfloat16)
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen).to("cuda", torch.bfloat16)
    return q, cache, step


def time_attention(batch: int, context: int, pipelined: bool, splits: int, iters: int = 50) -> float:
    """Microseconds per call, from CUDA events around `iters` back-to-back calls."""
    from llama_aot.kernels.triton_paged_attention import paged_attention_triton

    q, cache, step = _decode_inputs(batch, context, torch.Generator().manual_seed(0))

    def call():
        return paged_attention_triton(q, cache, 0, step["block_tables"], step["context_lens"], step["query_index"],
                                      step["positions"], HEAD_DIM ** -0.5, pipelined=pipelined, splits=splits)
    for _ in range(3):
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default="1,16")
    p.add_argument("--context", default="128,2048,8192")
    p.add_argument("--splits", default="8,16,32")
    p.add_argument("--out-dir", type=Path, help="where the JSON goes (default bench/results)")
    args = p.parse_args(argv)
    bandwidth = copy_bandwidth()
    device, sha = torch.cuda.get_device_name(), git_sha()
    rows = []
    for batch in map(int, args.batch.split(",")):
        for context in map(int, args.context.split(",")):
            kv_bytes = batch * context * 2 * KV_HEADS * HEAD_DIM * 2
            for splits in map(int, args.splits.split(",")):
                for pipelined in (True, False):
                    us = time_attention(batch, context, pipelined, splits)
                    fraction = kv_bytes / (us * 1e-6) / bandwidth
                    rows.append({"device": device, "git_sha": sha, "batch": batch, "context": context,
                                 "splits": splits, "loop": "for" if pipelined else "while", "us_per_layer": us,
                                 "kv_bandwidth_fraction": fraction})
                    print(f"batch {batch:3d} context {context:6d} splits {splits:3d} {rows[-1]['loop']:>5} loop: "
                          f"{us:8.1f} us, {fraction:5.0%} of copy bandwidth")
    print(save_results("attention", rows, args.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
