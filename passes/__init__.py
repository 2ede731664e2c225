"""Graph passes over the exported program, applied in one ordered pipeline.

Each pass is a pure function `ExportedProgram -> (ExportedProgram, matches)` in a file of its own
named for what it does. The match count is each pass's tested contract: a pass whose pattern
silently stops matching fails its test instead of quietly costing speed. The build config names
the passes to run; their order is fixed here, because later passes match the graph earlier ones
leave (the fusions run before any quantization or sharding would).
"""
from __future__ import annotations

from dataclasses import dataclass

from llama_aot.compiler.errors import BuildError
from llama_aot.passes.fuse_add_rmsnorm import fuse_add_rmsnorm
from llama_aot.passes.fuse_gate_up import fuse_gate_up
from llama_aot.passes.fuse_qkv import fuse_qkv
from llama_aot.passes.route_decode_linears import route_decode_linears

PIPELINE = (
    ("fuse_qkv", fuse_qkv),
    ("fuse_gate_up", fuse_gate_up),
    ("fuse_add_rmsnorm", fuse_add_rmsnorm),
    ("route_decode_linears", route_decode_linears),
)


@dataclass(frozen=True)
class PassReport:
    name: str
    matches: int

    def to_dict(self) -> dict:
        return {"name": self.name, "matches": self.matches}


def run_pipeline(ep, enabled: tuple[str, ...]):
    """Runs the enabled passes in pipeline order; returns the program and one report per pass."""
    known = {name for name, _ in PIPELINE}
    unknown = sorted(set(enabled) - known)
    if unknown:
        raise BuildError(f"unknown passes {unknown}; known passes: {sorted(known)}")
    reports = []
    for name, run in PIPELINE:
        if name in enabled:
            ep, matches = run(ep)
            reports.append(PassReport(name, matches))
    return ep, reports
