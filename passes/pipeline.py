"""The one ordered pipeline of graph passes, run in phases: fuse -> quantize -> shard -> route.

Each pass lives in a file of its own named for what it does and declares its phase
(passes/graph_pass.py). PIPELINE lists them in the order they run, which must follow the phases'
order. The build config names the passes to enable; their order is fixed here, never by the caller,
because later passes match the graph earlier ones leave.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from llama_aot.artifacts.errors import ConfigError
from llama_aot.passes.fuse_add_rmsnorm import fuse_add_rmsnorm
from llama_aot.passes.fuse_gate_up import fuse_gate_up
from llama_aot.passes.fuse_qkv import fuse_qkv
from llama_aot.passes.graph_pass import GraphPass, PassContext
from llama_aot.passes.quantize_fp8 import quantize_fp8
from llama_aot.passes.quantize_int8 import quantize_int8
from llama_aot.passes.quantize_kv_cache import quantize_kv_cache
from llama_aot.passes.route_decode_linears import route_decode_linears
from llama_aot.passes.shard_tensor_parallel import shard_tensor_parallel

PIPELINE: tuple[GraphPass, ...] = (fuse_qkv, fuse_gate_up, fuse_add_rmsnorm, quantize_fp8, quantize_int8, quantize_kv_cache,
                                   shard_tensor_parallel, route_decode_linears)


@dataclass(frozen=True)
class PassReport:
    """What the manifest records of a pass that ran; `record` (a quantizing pass's choices) goes to
    its `quantization` section."""

    name: str
    phase: str
    matches: int
    record: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "phase": self.phase, "matches": self.matches}


def run_pipeline(ep, ctx: PassContext, enabled: tuple[str, ...] | None = None):
    """Runs the enabled passes (default: the build config's) in pipeline order; returns the program
    and one report per pass that ran. Each pass's new weights must be in the program it returns."""
    enabled = ctx.build.passes if enabled is None else enabled
    known = {p.name for p in PIPELINE}
    unknown = sorted(set(enabled) - known)
    if unknown:
        raise ConfigError(f"unknown passes {unknown}; known passes: {sorted(known)}")
    reports = []
    for graph_pass in PIPELINE:
        if graph_pass.name in enabled:
            result = graph_pass(ep, ctx)
            stray = sorted(set(result.weights) - set(result.program.state_dict))
            if stray:
                raise AssertionError(f"pass {graph_pass.name} returned weights {stray[:3]} its program lacks")
            ep = result.program
            reports.append(PassReport(graph_pass.name, graph_pass.phase, result.matches, result.record))
    return ep, reports
