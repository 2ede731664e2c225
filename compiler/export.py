"""torch.export of the model with every batch dimension dynamic.

One program serves any step the runtime can schedule: the token count, the number of sequences,
the longest query, the block-table width, the number of logit rows and the cache's block count are
all symbolic, bounded by the build config. The example batch mixes two prefill chunks of different
lengths and gives every dimension a distinct size above 1, so export neither specializes a
dimension to 0/1 nor infers two of them to be equal.
"""
from __future__ import annotations

import torch
from torch.export import Dim, ExportedProgram

from llama_aot.artifacts.config import BuildConfig, ModelConfig
from llama_aot.artifacts.kv_layout import KVCacheLayout
from llama_aot.artifacts.step_abi import INPUT_NAMES, SequenceChunk, build_step_inputs
from llama_aot.compiler.eagle_head import Eagle3Head
from llama_aot.compiler.model import Llama


def _example_step(build: BuildConfig, cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """7 tokens, 2 sequences, query length 4, 5 logit rows, 3 (or 6) table blocks, 8 (or 14)
    cache blocks: all distinct and above 1. Returns the step's inputs and a cache for `cfg`'s layers."""
    bs = build.block_size
    table = 3 if bs >= 2 else 6
    chunks = [SequenceChunk(tuple(range(1, 5)), 0, tuple(range(1, 1 + table)), all_logits=True),
              SequenceChunk(tuple(range(5, 8)), 0, tuple(range(1 + table, 1 + 2 * table)))]
    step = build_step_inputs(chunks, bs, build.target)
    return step, KVCacheLayout.of(cfg, build, whole=True).allocate(2 * table + 2, build.target)


def example_inputs(build: BuildConfig, model: Llama) -> tuple[torch.Tensor, ...]:
    step, kv_cache = _example_step(build, model.config)
    return tuple(step[name] for name in INPUT_NAMES) + (kv_cache,)


def dynamic_shapes(build: BuildConfig) -> dict[str, dict[int, Dim]]:
    tokens = Dim("num_tokens", min=1, max=build.max_num_tokens)
    seqs = Dim("num_seqs", min=1, max=build.max_num_seqs)
    q_len = Dim("max_query_len", min=1, max=build.max_num_tokens)
    table = Dim("blocks_per_seq", min=1, max=build.max_blocks_per_seq)
    logits = Dim("num_logits", min=1, max=build.max_num_tokens)
    blocks = Dim("num_cache_blocks", min=2, max=1 << 24)
    return {
        "tokens": {0: tokens}, "positions": {0: tokens}, "slots": {0: tokens},
        "block_tables": {0: seqs, 1: table}, "context_lens": {0: seqs},
        "query_index": {0: seqs, 1: q_len}, "logits_index": {0: logits},
        "kv_cache": {2: blocks},
    }


def export_model(model: Llama, build: BuildConfig) -> ExportedProgram:
    with torch.no_grad():
        return torch.export.export(model, example_inputs(build, model),
                                   dynamic_shapes=dynamic_shapes(build), strict=False)


def export_draft(head: Eagle3Head, build: BuildConfig) -> ExportedProgram:
    """The EAGLE head as the draft program (artifacts/step_abi.py's DRAFT_INPUTS), with the step
    program's dynamic dimensions and its hidden input as long as the step's tokens."""
    step, kv_cache = _example_step(build, head.config.model)
    hidden = torch.zeros(step["tokens"].shape[0], head.config.model.hidden_size,
                         dtype=head.fc.weight.dtype, device=build.target)
    inputs = (step["tokens"], hidden, *(step[name] for name in INPUT_NAMES[1:]), kv_cache)
    shapes = dynamic_shapes(build)
    shapes["hidden"] = {0: shapes["tokens"][0]}
    with torch.no_grad():
        return torch.export.export(head, inputs, dynamic_shapes=shapes, strict=False)
