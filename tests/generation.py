"""Greedy generation over a compiled or eager model through the step ABI.

A test helper, deliberately independent of the serving engine: all prompts are prefilled in one
mixed step, then decoded together, so it also exercises batching.
"""
import torch

from llama_aot.artifacts.kv_layout import KVCacheLayout
from llama_aot.artifacts.step_abi import SequenceChunk, build_step_inputs, call_step


def greedy_generate(step, layout: KVCacheLayout, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """`step`: a loaded step program or the eager model; `layout`: the cache it was built for."""
    per_seq = layout.blocks_for(max(map(len, prompts)) + new_tokens)
    tables = [tuple(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(len(prompts))]
    cache = layout.allocate(1 + len(prompts) * per_seq, "cpu")
    outputs = [[] for _ in prompts]
    chunks = [SequenceChunk(tuple(p), 0, t) for p, t in zip(prompts, tables)]
    for _ in range(new_tokens):
        inputs = build_step_inputs(chunks, layout.block_size)
        with torch.no_grad():
            logits = call_step(step, inputs, cache)
        for out, row in zip(outputs, logits):
            out.append(int(row.argmax()))
        chunks = [SequenceChunk((out[-1],), len(p) + len(out) - 1, t) for p, out, t in zip(prompts, outputs, tables)]
    return outputs
