"""What a graph pass is: a named rewrite in one phase of the pipeline, given a context, returning
a result.

    @graph_pass(phase="fuse")
    def fuse_qkv(ep: ExportedProgram, ctx: PassContext) -> PassResult: ...

The context says what is being built (the build config, and for tensor parallelism the world size
and this rank) and carries what the build measured before the passes (the KV cache's per-layer
scales), so that a quantizing or sharding pass needs no other input. The result carries the
program, the number of matches (each pass's tested contract: a pattern that silently stops matching
fails its test instead of quietly costing speed), the weights the pass added or changed, by their
names in the program's state dict, and what the manifest keeps of the choices it made (`record`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.export import ExportedProgram

from llama_aot.artifacts.config import BuildConfig

# The pipeline's phases, in order: later phases match the graph earlier ones leave (fusions before
# quantization, quantized matmuls before sharding, and kernel routing on the final matmuls).
PHASES = ("fuse", "quantize", "shard", "route")


@dataclass(frozen=True)
class PassContext:
    build: BuildConfig = field(default_factory=BuildConfig)
    rank: int = 0
    # [num_layers, 2] float32, each layer's K and V scale for an FP8 KV cache
    kv_scales: torch.Tensor | None = field(default=None, compare=False)

    @property
    def target(self) -> str:
        return self.build.target

    @property
    def world_size(self) -> int:
        return self.build.tp


@dataclass(frozen=True)
class PassResult:
    program: ExportedProgram
    matches: int
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    record: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GraphPass:
    name: str
    phase: str
    rewrite: Callable[[ExportedProgram, PassContext], PassResult]

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"pass {self.name}: phase {self.phase!r} is not one of {PHASES}")

    def __call__(self, ep: ExportedProgram, ctx: PassContext | None = None) -> PassResult:
        return self.rewrite(ep, ctx or PassContext())


def graph_pass(phase: str):
    """Declares a function `(ep, ctx) -> PassResult` a pass of `phase`, named after the function."""
    def declare(rewrite) -> GraphPass:
        return GraphPass(rewrite.__name__, phase, rewrite)
    return declare
