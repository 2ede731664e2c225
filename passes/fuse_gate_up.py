"""Fuse the MLP's gate and up projections into one matmul.

    silu(linear(x, Wg)) * linear(x, Wu)
 -> g, u = split(linear(x, cat([Wg, Wu])), [I, I], -1);  silu(g) * u

One GEMM of twice the width instead of two; the fused weight is `<mlp module>.gate_up_proj.weight`,
gate rows first. A pre-quantized checkpoint's fp8_linear pair fuses the same way, scales with
their rows.
"""
import torch

from llama_aot.passes.graph_pass import PassContext, PassResult, graph_pass
from llama_aot.passes.matching import common_module, is_call, sibling_linears
from llama_aot.passes.program import ProgramEditor

aten = torch.ops.aten


def _gate_and_up(pair):
    """Orders a sibling pair as (gate, up) if it feeds `silu(gate) * up`, else None."""
    for gate, up in (pair, pair[::-1]):
        for silu in gate.users:
            if is_call(silu, aten.silu.default) and any(
                    is_call(m, aten.mul.Tensor) and set(m.args) == {silu, up} for m in silu.users):
                return [gate, up]
    return None


@graph_pass(phase="fuse")
def fuse_gate_up(ep, ctx: PassContext) -> PassResult:
    editor = ProgramEditor(ep)
    matches = 0
    for group in sibling_linears(editor):
        ordered = _gate_and_up(group) if len(group) == 2 else None
        module = ordered and common_module([editor.weight_name(n.args[1]) for n in ordered])
        if not module:
            continue
        editor.fuse_linears(ordered, f"{module}.gate_up_proj.weight")
        matches += 1
    return PassResult(editor.finish(), matches, editor.new_weights)
