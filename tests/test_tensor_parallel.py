"""`llama-compile --tp N`: the shard pass's rewrite, the refusals, and a --tp 2 artifact whose two
ranks (gloo on CPU) compute the --tp 1 artifact's logits."""
import dataclasses
from collections import Counter

import pytest
import torch

from llama_aot.artifacts.config import BuildConfig
from llama_aot.artifacts.errors import ConfigError
from llama_aot.artifacts.kv_layout import KVCacheLayout
from llama_aot.artifacts.manifest import read_manifest
from llama_aot.artifacts.program import attach_weights, load_package
from llama_aot.artifacts.tensor_parallel import fake_group
from llama_aot.artifacts.weights_file import read_weights
from llama_aot.compiler.checkpoint import load_weights, open_checkpoint
from llama_aot.compiler.export import export_model
from llama_aot.compiler.model import build_model
from llama_aot.compiler.rank_run import compiled_run_on_ranks
from llama_aot.compiler.verify import compare, compiled_run, reference_run
from llama_aot.passes.graph_pass import PassContext
from llama_aot.passes.pipeline import run_pipeline

from test_cli import assert_nothing_left, assert_refused

TP = 2


@pytest.fixture(scope="module")
def model_and_program(tiny_checkpoint, tiny_build):
    ckpt = open_checkpoint(tiny_checkpoint)
    build = dataclasses.replace(tiny_build, tp=TP, passes=None).resolved(ckpt.config)
    model = build_model(ckpt.config, load_weights(ckpt, torch.float32))
    return model, export_model(model, build), build


def sharded(ep, build, rank):
    with fake_group(TP):
        return run_pipeline(ep, PassContext(build, rank=rank))


def test_each_rank_keeps_its_heads_mlp_units_and_vocabulary(model_and_program):
    model, ep, build = model_and_program
    cfg = model.config
    heads, kv, d, inter = cfg.num_heads // TP, cfg.num_kv_heads // TP, cfg.head_dim, cfg.intermediate_size // TP
    full = dict(model.state_dict())
    for rank in range(TP):
        program, reports = sharded(ep, build, rank)
        shard = next(r for r in reports if r.name == "shard_tensor_parallel")
        assert shard.matches == 4 * cfg.num_layers + 1  # qkv, o, gate_up, down per layer; the LM head
        ops = Counter(str(n.target) for n in program.graph.nodes if n.op == "call_function")
        assert ops["_c10d_functional.all_reduce.default"] == 2 * cfg.num_layers
        assert ops["_c10d_functional.all_gather_into_tensor.default"] == 1
        w = program.state_dict
        prefix = "model.layers.1."
        q, k, v = (full[f"{prefix}self_attn.{n}_proj.weight"] for n in "qkv")
        rows = lambda t, n: t[rank * n * d:(rank + 1) * n * d]  # noqa: E731  (a rank's heads of a projection)
        torch.testing.assert_close(w[prefix + "self_attn.qkv_proj.weight"],
                                   torch.cat([rows(q, heads), rows(k, kv), rows(v, kv)]), rtol=0, atol=0)
        o = full[prefix + "self_attn.o_proj.weight"]
        torch.testing.assert_close(w[prefix + "self_attn.o_proj.weight"], o[:, rank * heads * d:(rank + 1) * heads * d])
        assert w[prefix + "mlp.gate_up_proj.weight"].shape == (2 * inter, cfg.hidden_size)
        assert w[prefix + "mlp.down_proj.weight"].shape == (cfg.hidden_size, inter)
        assert w["lm_head.weight"].shape == (cfg.vocab_size // TP, cfg.hidden_size)
        assert w["model.embed_tokens.weight"].shape == (cfg.vocab_size, cfg.hidden_size)  # the embedding stays whole
        cache = next(n for n in program.graph.nodes if n.name == "kv_cache").meta["val"]
        assert cache.shape[4] == kv
        assert program.graph_module.code == sharded(ep, build, 0)[0].graph_module.code  # one program for all ranks


def test_a_tp_that_does_not_divide_the_heads_is_refused(capsys, tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="--tp 3 does not divide the model's 4 attention heads"):
        BuildConfig(tp=3).resolved(open_checkpoint(tiny_checkpoint).config)
    assert_refused(capsys, ["--model", str(tiny_checkpoint), "--tp", "3", "-o", str(tmp_path / "out")],
                   "--tp 3 does not divide")
    assert_nothing_left(tmp_path, "out")


def test_a_tp_beyond_the_visible_gpus_is_refused_before_any_work(capsys, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert_refused(capsys, ["--model", str(tiny_checkpoint), "--target", "cuda", "--tp", "2", "-o", str(tmp_path / "out")],
                   "--tp 2 needs 2 GPUs on the build machine", "and 1 is visible")
    assert_nothing_left(tmp_path, "out")


def test_the_tp2_artifact_computes_the_tp1_artifacts_logits(tiny_tp2_artifact, tiny_artifact, model_and_program):
    """Both ranks run over gloo, each with half the heads and its own half of the KV cache."""
    model, _, build = model_and_program
    manifest = read_manifest(tiny_tp2_artifact)
    assert manifest.world_size == TP and manifest.build.tp == TP
    assert manifest.verification["passed"] and manifest.verification["relative_error"] < 1e-5
    step = manifest.programs[0]
    sizes = [(tiny_tp2_artifact / w).stat().st_size for w in step.weights]
    one_rank = (tiny_artifact / read_manifest(tiny_artifact).programs[0].weights[0]).stat().st_size
    assert len(sizes) == TP and all(s < 0.75 * one_rank for s in sizes)

    schedule = reference_run(model, build, model.config)
    tp1 = load_package(tiny_artifact / "step.pt2")
    weights = read_weights(tiny_artifact / "step.rank0.safetensors", "cpu")
    attach_weights(tp1, weights, tiny_artifact)
    whole = compiled_run(tp1, schedule, KVCacheLayout.of(model.config, build, whole=True), "cpu")
    ranks = compiled_run_on_ranks(tiny_tp2_artifact / step.package, [tiny_tp2_artifact / w for w in step.weights],
                                  schedule, KVCacheLayout.of(model.config, build), "cpu")
    result = compare(dataclasses.replace(schedule, eager_rows=whole), ranks, build)
    assert result["relative_error"] < 1e-5 and result["greedy_agreement"] == 1.0


def test_the_gpu_still_routes_the_residual_projections_after_their_all_reduce(model_and_program):
    model, ep, build = model_and_program
    cuda = dataclasses.replace(build, target="cuda", passes=None)
    program, reports = sharded(ep, cuda, 0)
    assert next(r for r in reports if r.name == "route_decode_linears").matches == 2 * model.config.num_layers


def test_tp2_composes_with_fp8_weights_and_the_fp8_kv_cache(tiny_tp2_fp8_artifact):
    """Per-row scales go with their rows (column-parallel) or stay whole (row-parallel); the
    per-layer KV scales are every rank's."""
    manifest = read_manifest(tiny_tp2_fp8_artifact)
    assert manifest.verification["passed"] and manifest.world_size == TP
    assert manifest.quantization["quantize_fp8"]["modes_by_weight_shape"]
    ranks = [read_weights(tiny_tp2_fp8_artifact / w, "cpu") for w in manifest.programs[0].weights]
    for name in ("model.layers.0.self_attn.qkv_proj.weight_scale", "model.layers.0.mlp.down_proj.weight_scale"):
        assert ranks[0][name].shape[0] == ranks[0][name.replace("_scale", "")].shape[0]
    torch.testing.assert_close(ranks[0]["model.layers.0.mlp.down_proj.weight_scale"],
                               ranks[1]["model.layers.0.mlp.down_proj.weight_scale"], rtol=0, atol=0)
    assert ranks[0]["model.layers.0.self_attn.k_scale"] == ranks[1]["model.layers.0.self_attn.k_scale"]


def test_fp8_ranks_keep_gate_and_up_rows_when_down_proj_takes_gate_up_whole(model_and_program, monkeypatch):
    """As on the GPU, each FP8 matmul is a cond between two modes, and down_proj's fp8_gated_linear
    takes gate_up's output whole (no split follows it): each rank still keeps its block of the
    gate rows and its block of the up rows, and the same rows of their scales."""
    from llama_aot.kernels.fp8_linear import PER_TOKEN, WEIGHT_ONLY
    from llama_aot.passes import quantize_fp8

    choice = quantize_fp8.ModeChoice(((16, WEIGHT_ONLY), (None, PER_TOKEN)))
    monkeypatch.setattr(quantize_fp8, "choose_modes", lambda ctx, shape: choice)
    model, ep, build = model_and_program
    inter = model.config.intermediate_size
    fp8 = dataclasses.replace(build, target="cuda", weight_quant="fp8", passes=None)
    for rank in range(TP):
        program, reports = sharded(ep, fp8, rank)
        assert next(r for r in reports if r.name == "shard_tensor_parallel").matches == 4 * model.config.num_layers + 1
        whole = next(r for r in reports if r.name == "quantize_fp8")
        assert whole.matches == 4 * model.config.num_layers
        name = "model.layers.1.mlp.gate_up_proj"
        full = dict(model.state_dict())  # fuse_gate_up's rows: gate first, then up
        expected_rows = torch.cat([full["model.layers.1.mlp.gate_proj.weight"], full["model.layers.1.mlp.up_proj.weight"]])
        half = inter // TP
        keep = torch.cat([torch.arange(rank * half, (rank + 1) * half), inter + torch.arange(rank * half, (rank + 1) * half)])
        scale = program.state_dict[f"{name}.weight_scale"]
        weight = program.state_dict[f"{name}.weight"].float() * scale[:, None]
        torch.testing.assert_close(weight, expected_rows[keep], rtol=0.07, atol=1e-6)  # e4m3 rounds within 1/16
