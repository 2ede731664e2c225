"""Each pass on the tiny 2-layer model: its match count, the op counts it leaves, exact numerics,
and weights that stay consistent with the program's signature. A pattern that stops matching
fails here by its count, not silently in a slower artifact."""
import dataclasses
from collections import Counter

import pytest
import torch
from torch.export.graph_signature import InputKind

from llama_aot.artifacts.config import TARGET_DEFAULTS
from llama_aot.artifacts.errors import ConfigError
from llama_aot.artifacts.step_abi import SequenceChunk, build_step_inputs, call_step
from llama_aot.compiler.checkpoint import load_weights, open_checkpoint
from llama_aot.compiler.export import export_model
from llama_aot.compiler.model import build_model
from llama_aot.passes.fuse_add_rmsnorm import fuse_add_rmsnorm
from llama_aot.passes.fuse_gate_up import fuse_gate_up
from llama_aot.passes.fuse_qkv import fuse_qkv
from llama_aot.passes.graph_pass import PHASES, PassContext
from llama_aot.passes.pipeline import PIPELINE, run_pipeline
from llama_aot.passes.route_decode_linears import route_decode_linears

LAYERS = 2


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tiny_build):
    ckpt = open_checkpoint(tiny_checkpoint)
    build = tiny_build.resolved(ckpt.config)
    model = build_model(ckpt.config, load_weights(ckpt, torch.float32))
    return export_model(model, build), build


def op_counts(ep) -> Counter:
    return Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function")


def run(ep, build):
    """Two steps (mixed prefill chunks, then prefill + decodes) on a fresh cache; logits and cache."""
    module = ep.module()
    chunks1 = [SequenceChunk((3, 1, 4, 1, 5), 0, (1, 2), True), SequenceChunk((9, 2, 6), 0, (3, 4), True)]
    chunks2 = [SequenceChunk((5,), 5, (1, 2), True), SequenceChunk((3, 5, 8), 3, (3, 4), True)]
    example_cache = ep.example_inputs[0][-1]
    cache = torch.zeros(example_cache.shape[:2] + (5,) + example_cache.shape[3:])
    outs = []
    for chunks in (chunks1, chunks2):
        inputs = build_step_inputs(chunks, build.block_size)
        outs.append(call_step(module, inputs, cache))
    return torch.cat(outs), cache


@pytest.mark.parametrize("fuse, matches, removed, added, new_weights", [
    (fuse_qkv, LAYERS, {"aten.linear.default": 2 * LAYERS}, {"aten.split_with_sizes.default": LAYERS},
     {f"model.layers.{i}.self_attn.qkv_proj.weight" for i in range(LAYERS)}),
    (fuse_gate_up, LAYERS, {"aten.linear.default": LAYERS}, {"aten.split_with_sizes.default": LAYERS},
     {f"model.layers.{i}.mlp.gate_up_proj.weight" for i in range(LAYERS)}),
    (fuse_add_rmsnorm, 2 * LAYERS, {"aten.rsqrt.default": 2 * LAYERS, "aten.add.Tensor": 2 * LAYERS * 2},
     {"llama_aot.add_rms_norm.default": 2 * LAYERS}, set()),
    (route_decode_linears, 2 * LAYERS, {"aten.linear.default": 2 * LAYERS}, {"cond": 2 * LAYERS}, set()),
])
def test_pass_matches_counts_and_numerics(exported, fuse, matches, removed, added, new_weights):
    ep, build = exported
    result = fuse(ep, PassContext(build))
    after = result.program
    assert result.matches == matches
    assert set(result.weights) == new_weights
    assert all(result.weights[n] is after.state_dict[n] for n in new_weights)
    before_ops, after_ops = op_counts(ep), op_counts(after)
    for op, n in removed.items():
        assert before_ops[op] - after_ops[op] == n, op
    for op, n in added.items():
        assert after_ops[op] - before_ops[op] == n, op
    (logits_a, cache_a), (logits_b, cache_b) = run(ep, build), run(after, build)
    torch.testing.assert_close(logits_b, logits_a, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cache_b, cache_a, atol=1e-6, rtol=1e-6)


def test_pipeline_keeps_weights_and_signature_consistent(exported):
    ep, build = exported
    fused, reports = run_pipeline(ep, PassContext(build))
    assert [r.to_dict() for r in reports] == [{"name": "fuse_qkv", "phase": "fuse", "matches": LAYERS},
                                              {"name": "fuse_gate_up", "phase": "fuse", "matches": LAYERS},
                                              {"name": "fuse_add_rmsnorm", "phase": "fuse", "matches": 2 * LAYERS}]
    params = {s.target for s in fused.graph_signature.input_specs if s.kind == InputKind.PARAMETER}
    assert params == set(fused.state_dict)
    assert {f"model.layers.{i}.self_attn.qkv_proj.weight" for i in range(LAYERS)} <= params
    assert {f"model.layers.{i}.mlp.gate_up_proj.weight" for i in range(LAYERS)} <= params
    assert not any(n.endswith((".q_proj.weight", ".gate_proj.weight", ".up_proj.weight")) for n in params)
    q = ep.state_dict["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(fused.state_dict["model.layers.1.self_attn.qkv_proj.weight"][:q.shape[0]], q)
    assert op_counts(fused)["llama_aot.rope_write_kv.default"] == LAYERS  # the mutating op survives
    (logits_a, cache_a), (logits_b, cache_b) = run(ep, build), run(fused, build)
    torch.testing.assert_close(logits_b, logits_a, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("num_tokens", [1, 16, 17, 40])
def test_route_decode_linears_branches_agree(exported, num_tokens):
    """Steps of up to 16 rows take the decode_linear branch, larger ones the plain matmul; both
    give the unrouted program's logits (on CPU both are the reference matmul, so this checks the
    rewrite's wiring; the kernel is tested against the reference in test_decode_linear.py)."""
    ep, build = exported
    routed = route_decode_linears(ep, PassContext(build)).program
    tokens = tuple(range(3, 3 + num_tokens))
    inputs = build_step_inputs([SequenceChunk(tokens, 0, tuple(range(1, 12)), True)], build.block_size)
    cache_shape = ep.example_inputs[0][-1].shape[:2] + (12,) + ep.example_inputs[0][-1].shape[3:]
    logits = [call_step(program.module(), inputs, torch.zeros(cache_shape)) for program in (ep, routed)]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-6, rtol=1e-6)


def test_cuda_pipeline_routes_both_residual_projections_after_the_fusions(exported):
    ep, build = exported
    routed, reports = run_pipeline(ep, PassContext(dataclasses.replace(build, passes=TARGET_DEFAULTS["cuda"].passes)))
    assert [(r.name, r.phase, r.matches) for r in reports][-1] == ("route_decode_linears", "route", 2 * LAYERS)
    (logits_a, _), (logits_b, _) = run(ep, build), run(routed, build)
    torch.testing.assert_close(logits_b, logits_a, atol=1e-6, rtol=1e-6)


def test_pipeline_runs_only_enabled_passes_in_order(exported):
    ep, build = exported
    _, reports = run_pipeline(ep, PassContext(build), ("fuse_add_rmsnorm", "fuse_qkv"))
    assert [r.name for r in reports] == ["fuse_qkv", "fuse_add_rmsnorm"]
    assert [p.name for p in PIPELINE][:2] == ["fuse_qkv", "fuse_gate_up"]
    with pytest.raises(ConfigError, match="unknown passes"):
        run_pipeline(ep, PassContext(build), ("fuse_everything",))


def test_pipeline_runs_in_phase_order():
    """fuse -> quantize -> shard -> route: a pass listed before one of an earlier phase would match
    a graph that the earlier phase has not produced yet."""
    order = [PHASES.index(p.phase) for p in PIPELINE]
    assert order == sorted(order)
    assert {p.phase for p in PIPELINE} <= set(PHASES) and PHASES == ("fuse", "quantize", "shard", "route")


def test_passes_are_pure(exported):
    ep, _ = exported
    before = op_counts(ep)
    fuse_qkv(ep)
    assert op_counts(ep) == before and "model.layers.0.self_attn.q_proj.weight" in ep.state_dict
