"""Quantize the decoder's weight matmuls to FP8, one scale per output channel.

    y = linear(x, W)                      y = fp8_linear(x, W8, s, mode)
                                 ->       W8 = round_e4m3(W / s),  s = max|W[row]| / 448

Runs after the fusions, so it quantizes the fused qkv_proj and gate_up_proj weights (each row's
scale is its own, so fusing first loses nothing). The fp8 weight keeps the weight's name and the
scale is `<module>.weight_scale`, as in compressed-tensors' FP8 checkpoints. The LM head stays in
the model dtype unless the build asks for `fp8_lm_head`, and a weight that something besides the
matmul reads (an LM head tied to the embedding) is never quantized.

Which way each matmul computes (kernels/fp8_linear.py: weight-only, or per-token FP8 activations
through `_scaled_mm`) is chosen per weight shape. On the CPU target speed is not the aim and the
weight-only form is the accurate one, so it is taken everywhere; the GPU target will choose by
timing on the building GPU. The choices go to the manifest's `quantization` section.
"""
from __future__ import annotations

import torch

import llama_aot.kernels.ops  # noqa: F401  (registers the ops this pass matches and emits)
from llama_aot.kernels.fp8_linear import FP8, WEIGHT_ONLY, quantize_rows
from llama_aot.passes.graph_pass import PassContext, PassResult, graph_pass
from llama_aot.passes.matching import is_call
from llama_aot.passes.program import ProgramEditor

aten = torch.ops.aten
DECODER_PREFIX = "model.layers."
LM_HEAD = "lm_head.weight"


def choose_mode(ctx: PassContext, shape: tuple[int, int]) -> str:
    """How a matmul of this weight shape computes (see the module docstring)."""
    return WEIGHT_ONLY


def _quantizable(editor: ProgramEditor, node, ctx: PassContext) -> str | None:
    """The weight's name if `node` is a bias-free matmul by a parameter this build quantizes."""
    if not (is_call(node, aten.linear.default) and len(node.args) == 2 and not node.kwargs):
        return None
    weight = node.args[1]
    name = editor.weight_name(weight)
    wanted = name is not None and (name.startswith(DECODER_PREFIX) or (name == LM_HEAD and ctx.build.fp8_lm_head))
    return name if wanted and len(weight.users) == 1 else None


@graph_pass(phase="quantize")
def quantize_fp8(ep, ctx: PassContext) -> PassResult:
    editor = ProgramEditor(ep)
    modes: dict[str, str] = {}
    matches = 0
    for node in list(editor.graph.nodes):
        name = _quantizable(editor, node, ctx)
        if name is None:
            continue
        x, weight = node.args
        q, scale = quantize_rows(editor.weight(weight))
        editor.replace_weight(weight, q)
        scale_node = editor.add_weight(name.removesuffix("weight") + "weight_scale", scale)
        mode = modes.setdefault("x".join(map(str, q.shape)), choose_mode(ctx, tuple(q.shape)))
        matmul = editor.call(torch.ops.llama_aot.fp8_linear.default, (x, weight, scale_node, mode), before=node)
        node.replace_all_uses_with(matmul)
        editor.graph.erase_node(node)
        matches += 1
    record = {"weights": str(FP8).removeprefix("torch."), "weight_scale": "per output channel",
              "lm_head": any(n == LM_HEAD for n in editor.new_weights), "modes_by_weight_shape": modes,
              "chosen_by": "rule: weight-only on the CPU target (not timed)"}
    return PassResult(editor.finish(), matches, editor.new_weights, record if matches else {})
