"""Greedy generation over a compiled or eager model through the program's own inputs.

A test helper, deliberately independent of the serving engine: all prompts are prefilled in one
mixed step, then decoded together, so it also exercises batching.
"""
import torch

from llama_aot.compiler.model import kv_cache_shape
from llama_aot.runtime.step_inputs import INPUT_NAMES, SequenceChunk, build_step_inputs


def greedy_generate(model, cfg, prompts: list[list[int]], new_tokens: int, block_size: int,
                    kv_dtype=torch.float32) -> list[list[int]]:
    per_seq = -(-(max(map(len, prompts)) + new_tokens) // block_size)
    tables = [tuple(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(len(prompts))]
    cache = torch.zeros(kv_cache_shape(cfg, 1 + len(prompts) * per_seq, block_size), dtype=kv_dtype)
    outputs = [[] for _ in prompts]
    chunks = [SequenceChunk(tuple(p), 0, t) for p, t in zip(prompts, tables)]
    for _ in range(new_tokens):
        inputs = build_step_inputs(chunks, block_size)
        with torch.no_grad():
            logits = model(*[inputs[n] for n in INPUT_NAMES], cache)
        for out, row in zip(outputs, logits):
            out.append(int(row.argmax()))
        chunks = [SequenceChunk((out[-1],), len(p) + len(out) - 1, t) for p, out, t in zip(prompts, outputs, tables)]
    return outputs
