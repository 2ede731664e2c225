"""How the runtime uses a loaded artifact: batch limits, context, and the KV cache's size.

The artifact fixes upper bounds (its compiled program accepts at most `max_num_tokens` tokens and
`max_num_seqs` sequences per step, and block tables for its context length); the runtime config
picks values within them. Each limit has one name from the build config to the scheduler
(`max_num_seqs`, `max_num_tokens`); only `llama-serve`'s flags use SGLang's names for them, and
errors name the flag the user typed (FLAGS).

`speculative_num_steps` overrides, for one server, how many tokens an EAGLE artifact drafts per step
(SGLang's --speculative-num-steps is a server flag too): the draft program and the step program
take any number of tokens, so K only shapes the verify step and the draft calls, which the runner
captures at start-up. 0 serves the artifact without speculation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from llama_aot.artifacts.config import MAX_SPECULATIVE_STEPS, BuildConfig, ModelConfig
from llama_aot.artifacts.errors import ConfigError
from llama_aot.artifacts.kv_layout import KVCacheLayout


DEFAULT_MEM_FRACTION = {"cuda": 0.85, "cpu": 0.1}
DEFAULT_CUDA_GRAPH_MAX_BS = 160  # SGLang's largest default bucket: beyond it, launches no longer dominate
FLAGS = {"max_num_seqs": "--max-running-requests", "max_num_tokens": "--chunked-prefill-size",
         "context_length": "--context-length", "kv_cache_blocks": "--kv-cache-blocks",
         "cuda_graph_max_bs": "--cuda-graph-max-bs"}


class RuntimeConfigError(ConfigError):
    """A runtime setting the artifact or the machine cannot honour; worded for a CLI user."""


@dataclass(frozen=True)
class RuntimeConfig:
    """0 means "the artifact's value" for the limits, and "size from memory" for the cache;
    `mem_fraction_static` None means 0.85 of a GPU, 0.1 of a CPU machine's RAM.
    `cuda_graph_max_bs` 0 means max_num_seqs, capped at 160; CPU artifacts never use graphs.
    `speculative_num_steps` None means the artifact's (its build's, or 0 without a draft program)."""

    max_num_seqs: int = 0
    max_num_tokens: int = 0
    context_length: int = 0
    mem_fraction_static: float | None = None
    kv_cache_blocks: int = 0
    enable_prefix_caching: bool = True
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int = 0
    speculative_num_steps: int | None = None

    def __post_init__(self):
        for name, flag in FLAGS.items():
            if getattr(self, name) < 0:
                raise RuntimeConfigError(f"{flag} must not be negative")
        steps = self.speculative_num_steps
        if steps is not None and not 0 <= steps <= MAX_SPECULATIVE_STEPS:
            raise RuntimeConfigError(f"--speculative-num-steps {steps}: must be between 0 (no speculation) and "
                                     f"{MAX_SPECULATIVE_STEPS}")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise RuntimeConfigError(f"--mem-fraction-static {self.mem_fraction_static}: must be in (0, 1)")

    def resolve(self, model: ModelConfig, build: BuildConfig, weight_bytes: int) -> "ResolvedRuntime":
        """Checks the settings against the artifact and sizes the KV cache."""
        def within(name):
            value, limit = getattr(self, name), getattr(build, name)
            if value > limit:
                raise RuntimeConfigError(f"{FLAGS[name]} {value} exceeds what the artifact was compiled for "
                                         f"({limit}); rebuild it with a larger limit or lower the flag")
            return value or limit

        seqs, chunk, context = within("max_num_seqs"), within("max_num_tokens"), within("context_length")
        if chunk < seqs:
            raise RuntimeConfigError(f"--chunked-prefill-size {chunk} is below --max-running-requests {seqs}: "
                                     "each running request needs room for a token in every step")
        steps = self._speculative_steps(build)
        if chunk < steps + 1:
            raise RuntimeConfigError(f"--chunked-prefill-size {chunk} cannot hold a verify step's {steps + 1} "
                                     f"tokens (--speculative-num-steps {steps} and the last token); raise it or "
                                     "lower the steps")
        if self.cuda_graph_max_bs > seqs:
            raise RuntimeConfigError(f"--cuda-graph-max-bs {self.cuda_graph_max_bs} exceeds --max-running-requests "
                                     f"{seqs}, the largest batch a step can hold; lower it")
        layout = KVCacheLayout.of(model, build)
        block_bytes = layout.block_bytes
        # A speculating server's draft cache has a block for each of the target's: it shares the budget.
        budget_block_bytes = block_bytes + (KVCacheLayout.draft_of(model, build).block_bytes if steps else 0)
        needed = 1 + seqs * layout.blocks_for(context)
        memory = ""
        if self.kv_cache_blocks:
            blocks = self.kv_cache_blocks
        else:
            fraction = self.mem_fraction_static or DEFAULT_MEM_FRACTION[build.target]
            budget, memory = _kv_budget(build.target, fraction, weight_bytes)
            blocks = min(needed, budget // budget_block_bytes)
        min_blocks = 1 + layout.blocks_for(context)
        if blocks < min_blocks:
            raise RuntimeConfigError(
                f"the KV cache would hold {max(blocks, 0)} blocks but one {context}-token request needs "
                f"{min_blocks}{memory}; raise --mem-fraction-static, set "
                "--kv-cache-blocks, or lower --context-length")
        graph_bs = 0
        if build.target == "cuda" and not self.disable_cuda_graph:
            graph_bs = self.cuda_graph_max_bs or min(seqs, DEFAULT_CUDA_GRAPH_MAX_BS)
        return ResolvedRuntime(max_num_seqs=seqs, max_num_tokens=chunk, context_length=context,
                               num_blocks=blocks, block_size=build.block_size, block_bytes=block_bytes,
                               enable_prefix_caching=self.enable_prefix_caching, cuda_graph_max_bs=graph_bs,
                               speculative_num_steps=steps)

    def _speculative_steps(self, build: BuildConfig) -> int:
        """Tokens drafted per step: the override, else the build's; 0 without a draft program."""
        if build.speculative_algorithm is None:
            if self.speculative_num_steps:
                raise RuntimeConfigError(f"--speculative-num-steps {self.speculative_num_steps}: the artifact has no "
                                         "draft program; build it with llama-compile --speculative-algorithm EAGLE3 "
                                         "--speculative-draft-model-path DIR, or leave the flag out")
            return 0
        return build.speculative_num_steps if self.speculative_num_steps is None else self.speculative_num_steps


@dataclass(frozen=True)
class ResolvedRuntime:
    """The settings the engine runs with; `cuda_graph_max_bs` 0 means decode runs eagerly,
    `speculative_num_steps` 0 that nothing is drafted (the artifact's draft program is left unused)."""

    max_num_seqs: int
    max_num_tokens: int
    context_length: int
    num_blocks: int
    block_size: int
    block_bytes: int
    enable_prefix_caching: bool
    cuda_graph_max_bs: int = 0
    speculative_num_steps: int = 0


def _kv_budget(target: str, fraction: float, weight_bytes: int) -> tuple[int, str]:
    """Bytes the KV cache may take, and a note on the memory for an error message.

    On a GPU it is measured, as SGLang does it: the memory free now, less the share of the card
    that `fraction` leaves for activations and CUDA graphs. The weights are loaded by the time the
    runtime is resolved, so they are already missing from the free memory, and so is anything
    another process holds: sized from the card's total instead, a server that shares its GPU
    failed with an out-of-memory traceback. On CPU: the fraction of RAM, less the weights."""
    if target == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        note = f" ({free / 2**30:.1f} GiB of the GPU's {total / 2**30:.1f} GiB are free)"
        return free - int(total * (1 - fraction)), note
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram * fraction) - weight_bytes, ""
