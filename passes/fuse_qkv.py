"""Fuse the query, key and value projections into one matmul.

    q = linear(x, Wq)                      qkv = linear(x, cat([Wq, Wk, Wv]))
    k = linear(x, Wk)             ->       q, k, v = split(qkv, [nq, nk, nv], -1)
    v = linear(x, Wv)

x is read once and one GEMM replaces three skinny ones, which matters most at decode, where each
is bound by reading its weight. Matches three sibling projections of one input that all flow into
the attention ops; the fused weight is `<attention module>.qkv_proj.weight`. The FP8 projections
of a pre-quantized checkpoint (`fp8_linear(x, W8, s, mode)`) fuse the same way, their per-row
scales concatenated into `qkv_proj.weight_scale`.
"""
import torch

import llama_aot.kernels.ops  # noqa: F401  (registers the ops this pass matches and emits)
from llama_aot.passes.graph_pass import PassContext, PassResult, graph_pass
from llama_aot.passes.matching import common_module, reaches, sibling_linears
from llama_aot.passes.program import ProgramEditor

_ATTENTION = (torch.ops.llama_aot.rope_write_kv.default, torch.ops.llama_aot.paged_attention.default)


@graph_pass(phase="fuse")
def fuse_qkv(ep, ctx: PassContext) -> PassResult:
    editor = ProgramEditor(ep)
    matches = 0
    for group in sibling_linears(editor):
        if len(group) != 3 or not all(reaches(n, _ATTENTION) for n in group):
            continue
        module = common_module([editor.weight_name(n.args[1]) for n in group])
        if module is None:
            continue
        editor.fuse_linears(group, f"{module}.qkv_proj.weight")
        matches += 1
    return PassResult(editor.finish(), matches, editor.new_weights)
