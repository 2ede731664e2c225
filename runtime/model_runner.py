"""The model side of serving: the loaded programs, their weights, the KV cache, warm-up and CUDA
graphs, and running one planned step.

The engine hands the runner a `StepPlan` (which tokens of which sequences, which logit rows it will
sample) and gets logits back; it never sees programs, ranks or the cache tensor. That seam is where
the next capabilities attach without touching the engine: with tensor parallelism rank 0's runner
sends each plan to a runner per rank, which executes the same plan on its shard, and an EAGLE draft
is a second program this runner owns.

On CUDA, steps of a fixed shape replay CUDA graphs captured by `warmup` (runtime/decode_graphs.py);
the artifact must then have been loaded with `single_threaded=True`. Other steps run the step
program eagerly, with the LM head applied only to the rows that will be sampled.

An artifact with an EAGLE draft program (llama-compile --speculative-algorithm) speculates: the
runner keeps the target's hidden output of each step (`last_hidden`), owns the draft's one-layer
cache, which shares the target's block ids, and drafts on request (`draft`); runtime/speculative.py
decides what to draft and what to accept. It drafts the runtime's `speculative_num_steps` (K)
tokens a step: the build's, unless the server overrides it; with 0 the draft program stays unused
and the artifact serves as a plain one, plain decode graphs included. The graphed shapes of a
speculating runner are the verify step (every sequence feeds its last token and K drafts) and
both kinds of draft call (the first, which reads the 1 to K + 1 tokens each sequence's step
computed, and the K - 1 after it, one token each), and plain decode steps, where no sequence feeds
drafts (requests that do not speculate: logprobs, penalties, a grammar; or all near their limit).
A step that mixes shapes (a prefill chunk; a decode with fewer drafts beside full ones; drafting
and non-drafting sequences) runs eagerly, as does a draft call that reads a prefill chunk's tokens.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from llama_aot.artifacts.config import ModelConfig, torch_dtype
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
    CUDA graphs (none on CPU or with graphs disabled; a speculating runner captures each size for
    the verify step and for its kinds of draft call: `graph_count` graphs in all) with the seconds
    capture took."""

    first_step_s: float
    graph_batch_sizes: tuple[int, ...] = ()
    capture_s: float = 0.0
    graph_count: int = 0


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
        draft = artifact.programs.get(DRAFT_PROGRAM)
        self.num_speculative_steps = runtime.speculative_num_steps if draft is not None else 0
        self.draft_program = draft if self.num_speculative_steps else None
        self.last_hidden: torch.Tensor | None = None
        if self.draft_program is not None:
            draft_layout = KVCacheLayout.draft_of(artifact.model_config, artifact.build_config)
            self.draft_cache = _allocate_kv_cache(draft_layout, runtime, self.device)
        self.step_graphs: list[DecodeGraphs] = []
        self.first_draft_graphs = self.next_draft_graphs = None
        # As many sequences as the engine runs at once: a verify step must fit in the step's tokens.
        graph_bs = min(runtime.cuda_graph_max_bs, runtime.max_num_tokens // (1 + self.num_speculative_steps))
        if graph_bs:
            self._build_graphs(batch_buckets(graph_bs))

    def _build_graphs(self, buckets: tuple[int, ...]) -> None:
        """The step program's graphs (decode steps; when speculating, verify steps first, and
        decode steps for those where no sequence feeds drafts: requests that do not speculate, or
        near their limit) and the draft program's (its first call, ragged, and the later ones).
        Without a GPU they run the padded steps eagerly, which is how CPU tests check them."""
        runtime, k = self.runtime, self.num_speculative_steps
        shape = dict(buckets=buckets, block_size=runtime.block_size, context_length=runtime.context_length)
        decode = DecodeGraphs(self.artifact.step, self.kv_cache, **shape)
        if self.draft_program is None:
            self.step_graphs = [decode]
            return
        self.step_graphs = [DecodeGraphs(self.artifact.step, self.kv_cache, tokens_per_seq=k + 1, all_logits=True,
                                         **shape), decode]
        hidden = (self.model_config.hidden_size, torch_dtype(self.artifact.build_config.dtype))
        self.first_draft_graphs = DecodeGraphs(self.draft_program, self.draft_cache, tokens_per_seq=k + 1,
                                               hidden_input=hidden, **shape)
        if k > 1:
            self.next_draft_graphs = DecodeGraphs(self.draft_program, self.draft_cache, hidden_input=hidden, **shape)

    @property
    def model_config(self) -> ModelConfig:
        return self.artifact.model_config

    def warmup(self) -> Warmup:
        """Runs one step of one token through the program before serving, so that the first
        request does not pay for lazy initialisation, then captures the graphs on a GPU. The
        token's K/V go to the reserved block 0, which no request reads."""
        inputs = build_step_inputs([SequenceChunk((0,), 0, (0,))], self.runtime.block_size, self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            call_step(self.artifact.step, inputs, self.kv_cache)
        first_step_s = time.perf_counter() - start
        if not self.step_graphs or not self.kv_cache.is_cuda:
            return Warmup(first_step_s)
        graphs = [*self.step_graphs, *(g for g in (self.first_draft_graphs, self.next_draft_graphs) if g is not None)]
        capture_s = sum(g.capture() for g in graphs)
        return Warmup(first_step_s, self.step_graphs[0].captured, capture_s, sum(len(g.captured) for g in graphs))

    def execute(self, plan: StepPlan) -> torch.Tensor:
        """The logits of the plan's sampled rows (all rows if it samples none): a graph replay for
        a step of a graphed shape whose rows are all sampled, else an eager call that skips
        unsampled rows' LM head. A replay's logits, and the `last_hidden` it leaves, are valid
        until the next call."""
        chunks = list(plan.chunks)
        outputs = None
        for graphs in self.step_graphs:
            if len(plan.sample_rows) == len(chunks) * graphs.logits_rows_per_seq:
                outputs = graphs.run(chunks)
            if outputs is not None:
                break
        if outputs is None:
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
        after each chunk's last position, greedily, one position further per draft call. Each call
        reads the hidden rows the one before left, which the next replays overwrite only after
        they have been copied in."""
        with torch.inference_mode():
            logits, hidden = self._call_draft(self.first_draft_graphs, chunks, hidden)
            drafted = [[t] for t in greedy_tokens(logits).tolist()]
            for j in range(1, steps):
                step = [SequenceChunk((d[-1],), c.start + len(c.tokens) + j - 1, c.block_table)
                        for c, d in zip(chunks, drafted)]
                logits, hidden = self._call_draft(self.next_draft_graphs, step, hidden)
                for d, t in zip(drafted, greedy_tokens(logits).tolist()):
                    d.append(t)
        return drafted

    def _call_draft(self, graphs: DecodeGraphs | None, chunks: list[SequenceChunk],
                    hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The draft program's (logits, hidden) at each chunk's last token: a graph replay for a
        call of the graphs' shape, else an eager call."""
        outputs = graphs.run(chunks, hidden) if graphs is not None else None
        if outputs is not None:
            return outputs
        inputs = build_step_inputs(chunks, self.runtime.block_size, self.device)
        logits, hidden = call_draft(self.draft_program, inputs, hidden, self.draft_cache)
        return logits, hidden[inputs["logits_index"]]
