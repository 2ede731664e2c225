"""Route the matmuls that cuBLAS splits along K to the decode_linear kernel when a step is small.

    y = linear(x, W)                        y added to the residual stream (o_proj, down_proj)
 -> y = cond(x.shape[0] <= MAX_ROWS,
             lambda x, W: decode_linear(x, W),
             lambda x, W: linear(x, W), (x, W))[0]

The two projections back into the residual stream have few output columns (the hidden size) and
long K. At decode batch sizes cuBLAS runs them as split-K plus a reduce kernel; decode_linear reads
the weight once with no reduce (bench/matmul.py on the H200: o_proj 13.5 -> 11.3 us, down_proj
31.3 -> 30.0 us at batch 1). Prefill steps are compute-bound, and cuBLAS keeps them.

The choice is a `torch.cond` on the step's token count (ProgramEditor.route_by_rows). Only the
CUDA target runs this pass; on CPU both branches would be the same matmul.
"""
from __future__ import annotations

import torch
from torch.fx import Node

import llama_aot.kernels.ops  # noqa: F401  (registers the ops this pass matches and emits)
from llama_aot.kernels.decode_linear import MAX_ROWS
from llama_aot.passes.graph_pass import PassContext, PassResult, graph_pass
from llama_aot.passes.matching import is_call
from llama_aot.passes.program import ProgramEditor

aten = torch.ops.aten


@graph_pass(phase="route")
def route_decode_linears(ep, ctx: PassContext) -> PassResult:
    editor = ProgramEditor(ep)
    matches = 0
    for node in list(editor.graph.nodes):
        if is_call(node, aten.linear.default) and len(node.args) == 2 and not node.kwargs \
                and editor.weight_name(node.args[1]) is not None and _writes_residual(node):
            _route(editor, node, matches)
            matches += 1
    return PassResult(editor.finish(), matches, editor.new_weights)


def _writes_residual(linear: Node) -> bool:
    """Whether the matmul's result is added to the residual stream: by the fused add + RMSNorm
    (fuse_add_rmsnorm's op), or by a plain add where that pass did not run; with --tp, after the
    all-reduce that sums the ranks' partial products."""
    users = list(linear.users)
    if len(users) == 1 and is_call(users[0], torch.ops._c10d_functional.all_reduce.default):
        users = [w for w in users[0].users if is_call(w, torch.ops._c10d_functional.wait_tensor.default)]
        users = [u for w in users for u in w.users]
    return any(is_call(user, torch.ops.llama_aot.add_rms_norm.default) or is_call(user, aten.add.Tensor)
               for user in users)


def _route(editor: ProgramEditor, linear: Node, index: int) -> None:
    editor.route_by_rows(linear, linear.args, ((MAX_ROWS, torch.ops.llama_aot.decode_linear.default, ()),
                                               (None, aten.linear.default, ())), f"linear_{index}")
