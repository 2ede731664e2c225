"""Hand every weight matmul to the `llama_aot::linear` op.

    y = linear(x, W)      ->      y = llama_aot.linear(x, W)

On CUDA the op picks a tile shape per token count at run time (thin weight-streaming tiles for
decode, tensor-core tiles for prefill; see kernels/triton_linear.py), which Inductor's one matmul
per shape cannot. It runs after the fusions, which match `aten.linear`, so the fused QKV and
gate/up weights are what it lowers. Only weights (program parameters) are matched: a matmul of two
activations has no weight to stream.
"""
import torch

from llama_aot.passes.matching import is_call
from llama_aot.passes.program import ProgramEditor

aten = torch.ops.aten


def lower_linears(ep):
    editor = ProgramEditor(ep)
    matches = 0
    for node in list(editor.graph.nodes):
        if not (is_call(node, aten.linear.default) and len(node.args) == 2 and not node.kwargs
                and editor.weight_name(node.args[1]) is not None):
            continue
        lowered = editor.call(torch.ops.llama_aot.linear.default, node.args, before=node)
        node.replace_all_uses_with(lowered)
        editor.graph.erase_node(node)
        matches += 1
    return editor.finish(), matches
