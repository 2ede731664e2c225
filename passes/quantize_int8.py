"""Quantize the CPU target's weight matmuls to int8, one scale per output channel.

    y = linear(x, W)          ->       y = _weight_int8pack_mm(x, W8, s)
                                       W8 = round(W / s),  s = max|W[row]| / 127

At batch 1 a CPU decode step is bound by reading the weights: SmolLM2-135M in float32 reads 540 MB
a token, 20 ms at this machine's 27 GB/s. torch's own int8 weight-only matmul
(`aten._weight_int8pack_mm`, AVX-512 on x86) reads a quarter of that, and with bfloat16
activations it ran SmolLM2's 30 layers and LM head in 10.6 ms against float32's 33.6 and
bfloat16's 30.1 (eager, 2 threads; with float32 activations it was 3x slower than float32, so
BuildConfig pairs int8 with bfloat16).

Every decoder matmul and the LM head: on a 135M model the LM head is a fifth of the weight bytes
(49152 x 576). An LM head tied to the embedding keeps its float weight for the embedding's rows and
gets an int8 copy (`lm_head.weight_int8`) for the matmul. Runs after the fusions, like quantize_fp8,
so the fused qkv and gate_up weights quantize per row as the separate ones would.
"""
from __future__ import annotations

import torch

from llama_aot.passes.graph_pass import PassContext, PassResult, graph_pass
from llama_aot.passes.matching import linear_weight_name
from llama_aot.passes.program import DECODER_PREFIX, LM_HEAD, ProgramEditor, weight_scale_name

aten = torch.ops.aten
INT8_MAX = 127
TIED_HEAD_COPY = "lm_head.weight_int8"


def quantize_rows_int8(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, scales of shape [rows] in `scale_dtype`): each row's largest magnitude maps to
    127; an all-zero row gets a tiny scale, not a division by zero."""
    scale = weight.abs().amax(dim=1).float().clamp(min=1e-12) / INT8_MAX
    rows = (weight.float() / scale[:, None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return rows, scale.to(scale_dtype)


@graph_pass(phase="quantize")
def quantize_int8(ep, ctx: PassContext) -> PassResult:
    editor = ProgramEditor(ep)
    quantized, tied_head = [], False
    for node in list(editor.graph.nodes):
        name = linear_weight_name(editor, node)
        if name is None or not (name.startswith(DECODER_PREFIX) or name == LM_HEAD):
            continue
        x, weight = node.args
        rows, scale = quantize_rows_int8(editor.weight(weight), x.meta["val"].dtype)
        if len(weight.users) == 1:
            editor.replace_weight(weight, rows)
            int8_weight = weight
        else:  # the LM head tied to the embedding: the embedding keeps reading the float rows
            int8_weight, tied_head = editor.add_weight(TIED_HEAD_COPY, rows), True
        scale_node = editor.add_weight(weight_scale_name(name), scale)
        matmul = editor.call(aten._weight_int8pack_mm.default, (x, int8_weight, scale_node), before=node)
        node.replace_all_uses_with(matmul)
        editor.graph.erase_node(node)
        quantized.append(name)
    record = {"weights": "int8", "weight_scale": "per output channel", "matmul": "aten._weight_int8pack_mm",
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX512: its vectorized kernel
              "lm_head": LM_HEAD in quantized, "lm_head_tied_copy": tied_head, "matmuls": len(quantized)}
    return PassResult(editor.finish(), len(quantized), editor.new_weights, record if quantized else {})
