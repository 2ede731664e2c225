"""Give every layer's KV-cache write and attention its FP8 scales.

    rope_write_kv(q, k, v, cos, sin, cache, i, slots)          ->  rope_write_kv(..., k_scale_i, v_scale_i)
    paged_attention(q, cache, i, tables, ..., scale)           ->  paged_attention(..., k_scale_i, v_scale_i)

The program is exported with the e4m3 cache as its input already (the KV-cache layout follows the
build's kv dtype), so this pass changes no tensor's type: it adds each layer's scales as weights
named as compressed-tensors checkpoints name them (`model.layers.{i}.self_attn.k_scale`,
`v_scale`: one float32 each, of shape (1,) rather than 0-dim, because AOTInductor inlines a 0-dim
constant as a literal, which the Triton kernels cannot take as the pointer they load the scale
through) and hands them to both ops, which then divide on write and multiply
on read (kernels/kv_cache.py). Without it an e4m3 cache would hold unscaled values, so the build
config runs it exactly when the cache is FP8. The scales come from the build (the checkpoint's,
or calibrated over prompts: compiler/calibration.py) through the pass context.
"""
from __future__ import annotations

import torch

import llama_aot.kernels.ops  # noqa: F401  (registers the ops this pass matches)
from llama_aot.passes.graph_pass import PassContext, PassResult, graph_pass
from llama_aot.passes.matching import is_call
from llama_aot.passes.program import ProgramEditor

ops = torch.ops.llama_aot
# The op and the position of its `layer` argument.
_LAYER_ARG = {ops.rope_write_kv.default: 6, ops.paged_attention.default: 2}


@graph_pass(phase="quantize")
def quantize_kv_cache(ep, ctx: PassContext) -> PassResult:
    if ctx.kv_scales is None:
        raise ValueError("quantize_kv_cache needs the KV cache's per-layer scales in the pass context")
    editor = ProgramEditor(ep)
    scales: dict[int, tuple] = {}
    matches = 0
    for node in list(editor.graph.nodes):
        arg = next((i for op, i in _LAYER_ARG.items() if is_call(node, op)), None)
        if arg is None:
            continue
        layer = node.args[arg]
        if layer not in scales:
            prefix = f"model.layers.{layer}.self_attn."
            # On the cache's device: AOTInductor takes a 0-dim CPU tensor in a GPU graph for a
            # scalar, which a Triton kernel cannot be handed as a pointer.
            cache = node.args[_LAYER_ARG[node.target] - 1]
            k_scale, v_scale = ctx.kv_scales[layer].float().to(cache.meta["val"].device).reshape(2, 1)
            scales[layer] = (editor.add_weight(prefix + "k_scale", k_scale.clone()),
                             editor.add_weight(prefix + "v_scale", v_scale.clone()))
        node.kwargs = {**node.kwargs, "k_scale": scales[layer][0], "v_scale": scales[layer][1]}
        matches += 1
    record = {"kv_cache": "float8_e4m3fn", "scale": "per layer, one for K and one for V",
              "k_scales": [float(ctx.kv_scales[i, 0]) for i in sorted(scales)],
              "v_scales": [float(ctx.kv_scales[i, 1]) for i in sorted(scales)]}
    return PassResult(editor.finish(), matches, editor.new_weights, record if matches else {})
