"""The model side of serving: the loaded programs, their weights, the KV cache, warm-up and CUDA
graphs, and running one planned step.

The engine hands the runner a `StepPlan` (which tokens of which sequences, which logit rows it will
sample) and gets logits back; it never sees programs, ranks or the cache tensor. That seam is where
the next capabilities attach without touching the engine: with tensor parallelism rank 0's runner
sends each plan to a runner per rank, which executes the same plan on its shard, and an EAGLE draft
is a second program this runner owns.

On CUDA, decode-only steps replay CUDA graphs captured by `warmup` (runtime/decode_graphs.py); the
artifact must then have been loaded with `single_threaded=True`. Other steps run the step program
eagerly, with the LM head applied only to the rows that will be sampled.

An artifact with an EAGLE draft program (llama-compile --speculative-algorithm) speculates: the
runner keeps the target's hidden output of each step (`last_hidden`), owns the draft's one-layer
cache, which shares the target's block ids, and drafts on request (`draft`); runtime/speculative.py
decides what to draft and what to accept. Its steps run eagerly for now: the decode graphs capture
one token per sequence and the logits alone.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from llama_aot.artifacts.config import ModelConfig
from llama_aot.artifacts.kv_layout import KVCacheLayout
from llama_aot.artifacts.manifest import DRAFT_PROGRAM
from llama_aot.artifacts.step_abi import SequenceChunk, build_step_inputs, call_draft, call_step, step_outputs
from llama_aot.runtime.artifact import Artifact
from llama_aot.runtime.config import ResolvedRuntime, RuntimeConfigError
from llama_aot.runtime.decode_graphs import DecodeGraphs, batch_buckets
from llama_aot.runtime.sampling import greedy_tokens


class RunnerFailure(RuntimeError):
    """The runner can run no more steps (a rank of a tensor-parallel server died); whoever owns
    it reports why, so the engine fails its requests without logging a traceback of its own."""


@dataclass(frozen=True)
class StepPlan:
    """One step, as every rank must run it: the chunks in row order, and the logit rows the engine
    will sample (empty: all rows)."""

    chunks: tuple[SequenceChunk, ...]
    sample_rows: tuple[int, ...] = ()


@dataclass(frozen=True)
class Warmup:
    """What `ModelRunner.warmup` did: the first step's duration, and the batch sizes it captured as
    CUDA graphs (none on CPU or with graphs disabled) with the seconds capture took."""

    first_step_s: float
    graph_batch_sizes: tuple[int, ...] = ()
    capture_s: float = 0.0


def _allocate_kv_cache(layout: KVCacheLayout, runtime: ResolvedRuntime, device: str) -> torch.Tensor:
    """The zeroed cache, or a RuntimeConfigError saying which flag to lower: a cache sized by
    --kv-cache-blocks, or memory taken between sizing and allocating, must not end the server in a
    traceback. (A CPU allocation that fails says "can't allocate memory" in a plain RuntimeError.)"""
    try:
        return layout.allocate(runtime.num_blocks, device)
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if not isinstance(e, torch.OutOfMemoryError) and "allocate memory" not in str(e):
            raise
    raise RuntimeConfigError(
        f"the KV cache of {runtime.num_blocks} blocks ({runtime.num_blocks * layout.block_bytes / 2**30:.2f} "
        f"GiB) does not fit in the {device}'s free memory; lower --kv-cache-blocks or --mem-fraction-static")


class ModelRunner:
    def __init__(self, artifact: Artifact, runtime: ResolvedRuntime, device: str | None = None):
        self.artifact, self.runtime = artifact, runtime
        self.device = device or artifact.device_type
        self.layout = KVCacheLayout.of(artifact.model_config, artifact.build_config)
        self.kv_cache = _allocate_kv_cache(self.layout, runtime, self.device)
        self.draft_program = artifact.programs.get(DRAFT_PROGRAM)
        self.num_speculative_steps = artifact.build_config.speculative_num_steps if self.draft_program else 0
        self.last_hidden: torch.Tensor | None = None
        if self.draft_program is not None:
            draft_layout = dataclasses.replace(self.layout, num_layers=1, dtype=artifact.build_config.dtype)
            self.draft_cache = _allocate_kv_cache(draft_layout, runtime, self.device)
        self.decode_graphs = None
        if runtime.cuda_graph_max_bs and self.kv_cache.is_cuda and self.draft_program is None:
            self.decode_graphs = DecodeGraphs(artifact.step, self.kv_cache, batch_buckets(runtime.cuda_graph_max_bs),
                                              runtime.block_size, runtime.context_length)

    @property
    def model_config(self) -> ModelConfig:
        return self.artifact.model_config

    def warmup(self) -> Warmup:
        """Runs one step of one token through the program before serving, so that the first
        request does not pay for lazy initialisation, then captures the decode graphs. The
        token's K/V go to the reserved block 0, which no request reads."""
        inputs = build_step_inputs([SequenceChunk((0,), 0, (0,))], self.runtime.block_size, self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            call_step(self.artifact.step, inputs, self.kv_cache)
        first_step_s = time.perf_counter() - start
        if self.decode_graphs is None:
            return Warmup(first_step_s)
        capture_s = self.decode_graphs.capture()
        return Warmup(first_step_s, self.decode_graphs.captured, capture_s)

    def execute(self, plan: StepPlan) -> torch.Tensor:
        """The logits of the plan's sampled rows (all rows if it samples none): a graph replay for
        a decode step that fits a bucket, else an eager call that skips unsampled rows' LM head.
        A replay's logits are valid until the next call."""
        chunks = list(plan.chunks)
        graphs = self.decode_graphs
        if graphs is not None and len(plan.sample_rows) == len(chunks) and graphs.bucket_for(chunks):
            return graphs.run(chunks)
        inputs = build_step_inputs(chunks, self.runtime.block_size, self.device)
        if plan.sample_rows:
            inputs["logits_index"] = inputs["logits_index"][list(plan.sample_rows)]
        with torch.inference_mode():
            outputs = step_outputs(self.artifact.step, inputs, self.kv_cache)
        if self.draft_program is not None:
            self.last_hidden = outputs[1]
        return outputs[0]

    def draft(self, chunks: list[SequenceChunk], hidden: torch.Tensor, steps: int) -> list[list[int]]:
        """Writes the draft cache at each chunk's positions (a chunk's tokens are those after its
        positions; `hidden`: the target's rows for them, in order), then drafts `steps` tokens
        after each chunk's last position, greedily, one position further per draft call."""
        block_size = self.runtime.block_size
        with torch.inference_mode():
            inputs = build_step_inputs(chunks, block_size, self.device)
            logits, hidden = call_draft(self.draft_program, inputs, hidden, self.draft_cache)
            drafted = [[t] for t in greedy_tokens(logits).tolist()]
            hidden = hidden[inputs["logits_index"]]
            for j in range(1, steps):
                step = [SequenceChunk((d[-1],), c.start + len(c.tokens) + j - 1, c.block_table)
                        for c, d in zip(chunks, drafted)]
                logits, hidden = call_draft(self.draft_program, build_step_inputs(step, block_size, self.device), hidden,
                                            self.draft_cache)
                for d, t in zip(drafted, greedy_tokens(logits).tolist()):
                    d.append(t)
        return drafted
