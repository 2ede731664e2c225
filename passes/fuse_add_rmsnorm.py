"""Fuse each residual add into the RMSNorm that reads its sum.

    h = a + b                                  normed, h = add_rms_norm(a, b, w, eps)
    normed = w * cast(rmsnorm_f32(h))   ->     (h still feeds the next residual add)

The sum is produced and normalised in one pass over the hidden state instead of being written and
read back; `torch.ops.llama_aot.add_rms_norm` computes in the same order as the model's RMSNorm, so
the rewrite is exact. Every decoder layer has two matches except the first, whose input norm reads
the embedding directly, plus one for the final norm: 2 * num_layers in all.
"""
import operator

import torch

import llama_aot.kernels.ops  # noqa: F401  (registers the ops this pass matches and emits)
from llama_aot.passes.graph_pass import PassContext, PassResult, graph_pass
from llama_aot.passes.matching import is_call, match_rms_norm
from llama_aot.passes.program import ProgramEditor

aten = torch.ops.aten


@graph_pass(phase="fuse")
def fuse_add_rmsnorm(ep, ctx: PassContext) -> PassResult:
    editor = ProgramEditor(ep)
    matches = 0
    for node in list(editor.graph.nodes):
        found = match_rms_norm(node, editor)
        if found is None:
            continue
        h, weight, eps = found
        if not is_call(h, aten.add.Tensor) or h.kwargs or not all(
                isinstance(a, torch.fx.Node) for a in h.args):
            continue
        a, b = h.args
        if a.meta["val"].shape != b.meta["val"].shape:
            continue
        after_h = h.next
        fused = editor.call(torch.ops.llama_aot.add_rms_norm.default, (a, b, weight, eps), before=after_h)
        normed = editor.call(operator.getitem, (fused, 0), before=after_h)
        summed = editor.call(operator.getitem, (fused, 1), before=after_h)
        node.replace_all_uses_with(normed)
        h.replace_all_uses_with(summed)
        matches += 1
    return PassResult(editor.finish(), matches, editor.new_weights)
