"""FP8 weights (`llama-compile --fp8`): the e4m3 rounding and its bound, the fp8_linear op's two
ways of computing, the quantize pass's matches and what its program computes, and a whole CPU build
whose compiled program agrees with the quantized program and whose manifest says how it was
quantized."""
import dataclasses
import io
import json

import pytest
import torch

from llama_aot.artifacts.config import BuildConfig
from llama_aot.artifacts.errors import ConfigError
from llama_aot.artifacts.step_abi import SequenceChunk, build_step_inputs, call_step
from llama_aot.compiler.build import Progress, build_artifact
from llama_aot.compiler.checkpoint import load_weights, open_checkpoint
from llama_aot.compiler.export import export_model
from llama_aot.compiler.model import build_model
from llama_aot.kernels.fp8_linear import (FP8, MODES, PER_TOKEN, PER_TOKEN_EPILOGUE, PER_TOKEN_TILES, WEIGHT_ONLY,
                                          dequantize_rows, fp8_linear, quantize_rows)
from llama_aot.passes import quantize_fp8 as quantize_module
from llama_aot.passes.graph_pass import PassContext
from llama_aot.passes.pipeline import run_pipeline
from llama_aot.runtime.artifact import load_artifact

from test_cli import assert_nothing_left, assert_refused

LAYERS = 2
E4M3_RELATIVE_STEP = 2 ** -3  # 3 mantissa bits: a rounded value is within half of this of the value


def test_rows_round_to_e4m3_within_half_a_step_and_zero_rows_survive():
    w = torch.randn(64, 96) * torch.logspace(-3, 2, 64)[:, None]  # rows of very different magnitude
    w[5] = 0
    q, scale = quantize_rows(w)
    assert q.dtype == FP8 and scale.shape == (64,) and scale.dtype == torch.float32
    back = dequantize_rows(q, scale, torch.float32)
    assert torch.equal(back[5], torch.zeros(96))
    normal = w.abs() >= scale[:, None] * 2 ** -6  # e4m3's normal range, relative to each row's scale
    assert ((back - w).abs() <= w.abs() * E4M3_RELATIVE_STEP / 2 + 1e-12)[normal].all()
    assert (back.abs().amax(1) - w.abs().amax(1)).abs().max() <= 1e-5 * w.abs().max()  # row maxima exact


@pytest.mark.parametrize("mode", [WEIGHT_ONLY, PER_TOKEN])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_computes_the_product_with_rounded_operands(mode, dtype):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 256, generator=g).to(dtype), torch.randn(96, 256, generator=g)
    q, scale = quantize_rows(w)
    y = fp8_linear(x, q, scale, mode)
    assert y.dtype == dtype and y.shape == (7, 96)
    if mode == WEIGHT_ONLY:
        expected = x @ dequantize_rows(q, scale, dtype).T
    else:
        xq, xs = quantize_rows(x)
        expected = (dequantize_rows(xq, xs, torch.float32) @ dequantize_rows(q, scale, torch.float32).T).to(dtype)
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)
    exact = x.float() @ w.T
    assert (y.float() - exact).norm() / exact.norm() < 0.06  # e4m3's rounding, not a wrong scale


@pytest.fixture(scope="module")
def fused(tiny_checkpoint, tiny_build):
    ckpt = open_checkpoint(tiny_checkpoint)
    build = tiny_build.resolved(ckpt.config)
    model = build_model(ckpt.config, load_weights(ckpt, torch.float32))
    ep, _ = run_pipeline(export_model(model, build), PassContext(build))
    return ep, build, model


def modes_used(record) -> set[str]:
    return {mode for by_step in record["modes_by_weight_shape"].values() for mode in by_step.values()}


def fp8_build(build, **changes):
    return dataclasses.replace(build, weight_quant="fp8", passes=None, **changes)


def logits(program, build, num_blocks=12):
    example = program.example_inputs[0][-1]
    shape = example.shape[:2] + (num_blocks,) + example.shape[3:]
    chunks = [SequenceChunk((3, 1, 4, 1, 5), 0, (1, 2), True), SequenceChunk((9, 2, 6), 0, (3, 4), True)]
    return call_step(program.module(), build_step_inputs(chunks, build.block_size), torch.zeros(shape))


def test_quantize_pass_replaces_every_decoder_matmul_and_keeps_the_lm_head(fused):
    ep, build, _ = fused
    result = quantize_module.quantize_fp8(ep, PassContext(fp8_build(build)))
    assert result.matches == 4 * LAYERS  # qkv, o, gate_up, down after the fusions
    sd = result.program.state_dict
    for i in range(LAYERS):
        for module in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            name = f"model.layers.{i}.{module}"
            assert sd[f"{name}.weight"].dtype == FP8 and sd[f"{name}.weight_scale"].dtype == torch.float32
            assert f"{name}.weight" in result.weights and f"{name}.weight_scale" in result.weights
    assert sd["lm_head.weight"].dtype == torch.float32 and "lm_head.weight_scale" not in sd
    assert result.record["lm_head"] is False and modes_used(result.record) == {WEIGHT_ONLY}
    # down_proj takes the MLP's activation as its operands: no silu or mul is left to run.
    targets = [n.target for n in result.program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.llama_aot.fp8_gated_linear.default) == LAYERS
    assert torch.ops.aten.silu.default not in targets
    with_head = quantize_module.quantize_fp8(ep, PassContext(fp8_build(build, fp8_lm_head=True)))
    assert with_head.matches == 4 * LAYERS + 1 and with_head.program.state_dict["lm_head.weight"].dtype == FP8


def test_ignored_matmuls_stay_in_the_model_dtype(fused):
    """`--fp8-ignore`: by substring of the weight's (post-fusion) name, or by regex."""
    ep, build, _ = fused
    for patterns, kept in ((("gate_up_proj",), ["mlp.gate_up_proj"]),
                           (("re:layers\\.1\\..*(qkv|o)_proj",), ["self_attn.qkv_proj", "self_attn.o_proj"])):
        result = quantize_module.quantize_fp8(ep, PassContext(fp8_build(build, fp8_ignore=patterns)))
        sd = result.program.state_dict
        plain = [n for n, w in sd.items() if n.endswith("proj.weight") and w.dtype == torch.float32]
        expected = [f"model.layers.{i}.{m}.weight" for i in range(LAYERS) for m in kept
                    if patterns[0] == "gate_up_proj" or i == 1]
        assert sorted(plain) == sorted(expected) and result.matches == 4 * LAYERS - len(expected)
        assert result.record["ignored"] == list(patterns)
    with pytest.raises(ConfigError, match="needs --fp8"):
        BuildConfig(fp8_ignore=("gate_up_proj",))
    with pytest.raises(ConfigError, match="not a regular expression"):
        BuildConfig(weight_quant="fp8", fp8_ignore=("re:(",))


def test_a_shape_the_gpu_fp8_kernels_cannot_take_is_refused_by_name():
    cuda = PassContext(BuildConfig(target="cuda"))
    with pytest.raises(ConfigError, match="weight shape 96x100 cannot take FP8 on the GPU.*--fp8-ignore"):
        quantize_module.choose_modes(cuda, (96, 100))


def test_weight_only_program_is_the_model_with_rounded_weights(fused):
    """What --fp8 computes on CPU, exactly: the same model with each quantized weight replaced by its
    e4m3 rounding. The logits then differ from the unquantized model's by the rounding alone."""
    ep, build, model = fused
    quantized = quantize_module.quantize_fp8(ep, PassContext(fp8_build(build))).program
    rounded = {n: dequantize_rows(*quantize_rows(w), w.dtype) if n in quantized.state_dict
               and quantized.state_dict[n].dtype == FP8 else w for n, w in ep.state_dict.items()}
    torch.testing.assert_close(logits(quantized, build), logits(_with_weights(ep, rounded), build),
                               rtol=1e-5, atol=1e-5)


def test_gpu_choices_by_step_size_become_conds_on_the_token_count(fused, monkeypatch):
    """The CUDA target times the modes per shape and step size (kernels/fp8_timing.py); where the
    bands of step sizes take different modes, the matmul becomes nested conds between them. Their
    structure and numerics are checked here on CPU, with the timing replaced: an 8-token step
    (this test's logits) takes the second band's branch, and per-token quantization moves it."""
    ep, build, _ = fused
    choice = quantize_module.ModeChoice(((4, PER_TOKEN), (16, WEIGHT_ONLY), (None, PER_TOKEN_EPILOGUE)),
                                        {"rows=1": {WEIGHT_ONLY: 1.0, PER_TOKEN: 2.0}})
    monkeypatch.setattr(quantize_module, "choose_modes", lambda ctx, shape: choice)
    cuda = dataclasses.replace(build, target="cuda", passes=None)
    result = quantize_module.quantize_fp8(ep, PassContext(cuda))
    conds = [n for n in result.program.graph.nodes if n.target is torch.ops.higher_order.cond]
    assert result.matches == len(conds) == 4 * LAYERS
    nested = [n for n in getattr(result.program.graph_module, conds[0].args[2].target).graph.nodes
              if n.target is torch.ops.higher_order.cond]
    assert len(nested) == 1  # rows <= 4; else rows <= 16; else the rest
    assert modes_used(result.record) == {WEIGHT_ONLY, PER_TOKEN, PER_TOKEN_EPILOGUE}
    assert all(by_step == {"steps of <= 4 tokens": PER_TOKEN, "steps of 5-16 tokens": WEIGHT_ONLY,
                           "steps of > 16 tokens": PER_TOKEN_EPILOGUE}
               for by_step in result.record["modes_by_weight_shape"].values())
    assert result.record["chosen_by"].startswith("timing on the building GPU")
    assert all(t == choice.timings_us for t in result.record["timings_us_by_weight_shape"].values())
    weight_only = quantize_module.quantize_fp8(ep, PassContext(fp8_build(build))).program
    small = logits(weight_only, build)
    torch.testing.assert_close(logits(result.program, build), small, rtol=1e-5, atol=1e-5)
    first_band_per_token = dataclasses.replace(choice, bands=((8, PER_TOKEN), *choice.bands[1:]))
    monkeypatch.setattr(quantize_module, "choose_modes", lambda ctx, shape: first_band_per_token)
    per_token = quantize_module.quantize_fp8(ep, PassContext(cuda)).program
    assert not torch.allclose(logits(per_token, build), small, rtol=1e-5, atol=1e-5)


def test_a_tp_build_times_the_shapes_each_rank_multiplies(fused, monkeypatch):
    """The pass runs before sharding; under --tp 2 the GPU's kernels see half of each weight:
    the rows of qkv and gate_up, the columns of o and down."""
    ep, build, model = fused
    timed = []
    monkeypatch.setattr(quantize_module, "choose_modes",
                        lambda ctx, shape: timed.append(shape) or quantize_module.ModeChoice.everywhere(WEIGHT_ONLY))
    tp2 = dataclasses.replace(build, target="cuda", tp=2, passes=None)
    result = quantize_module.quantize_fp8(ep, PassContext(fp8_build(tp2)))
    cfg = model.config
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    h, i = cfg.hidden_size, cfg.intermediate_size
    assert sorted(set(timed)) == sorted({(qkv // 2, h), (h, cfg.num_heads * cfg.head_dim // 2), (i, h), (h, i // 2)})
    assert set(result.record["modes_by_weight_shape"]) == {f"{n}x{k}" for n, k in set(timed)}


def test_the_gpu_takes_each_step_sizes_fastest_mode_by_its_timings(monkeypatch):
    """Summed over the step sizes each band covers; weight-only is never a candidate beyond
    FP8_MAX_ROWS rows (its CUDA kernel stops there), however fast a timing says it is."""
    from llama_aot.kernels import fp8_timing

    table = {1: {WEIGHT_ONLY: 10.0, PER_TOKEN: 30.0, PER_TOKEN_EPILOGUE: 20.0},
             16: {WEIGHT_ONLY: 30.0, PER_TOKEN: 30.0, PER_TOKEN_EPILOGUE: 25.0},
             32: {WEIGHT_ONLY: 40.0, PER_TOKEN: 35.0, PER_TOKEN_EPILOGUE: 40.0},
             128: {PER_TOKEN: 50.0, PER_TOKEN_EPILOGUE: 60.0}, 2048: {PER_TOKEN: 400.0, PER_TOKEN_EPILOGUE: 380.0}}
    asked = []

    def fake(shape, dtype, rows):
        asked.append((shape, dtype, rows))
        return {r: {m: t for m, t in table[r].items() if m in fp8_timing.candidate_modes(r)} for r in rows}
    monkeypatch.setattr(fp8_timing, "time_modes", fake)
    assert fp8_timing.candidate_modes(32) == MODES
    assert PER_TOKEN_TILES in fp8_timing.candidate_modes(128) and WEIGHT_ONLY not in fp8_timing.candidate_modes(128)
    assert PER_TOKEN_TILES not in fp8_timing.candidate_modes(2048)
    # The table has no per_token_tiles timings, as when that mode failed on the GPU (time_modes
    # leaves such a mode out): the bands are chosen among the others.
    cuda = PassContext(BuildConfig(target="cuda", weight_quant="fp8"))
    choice = quantize_module.choose_modes(cuda, (64, 128))
    assert asked == [((64, 128), torch.bfloat16, (1, 16, 32, 128, 2048))]
    # Weight-only is slower than per-token at 32 rows: steps of 17-32 tokens take per-token, as
    # do those up to 128 (one band), and the prefill chunks the epilogue form.
    assert choice.bands == ((16, WEIGHT_ONLY), (128, PER_TOKEN), (None, PER_TOKEN_EPILOGUE))
    table[32][WEIGHT_ONLY] = 30.0
    assert quantize_module.choose_modes(cuda, (64, 128)).bands == (
        (32, WEIGHT_ONLY), (128, PER_TOKEN), (None, PER_TOKEN_EPILOGUE))
    table[2048][PER_TOKEN_EPILOGUE] = 500.0  # adjacent bands with one mode are one band
    assert quantize_module.choose_modes(cuda, (64, 128)).bands == ((32, WEIGHT_ONLY), (None, PER_TOKEN))
    assert choice.timings_us["rows=128"] == {PER_TOKEN: 50.0, PER_TOKEN_EPILOGUE: 60.0}
    with pytest.raises(ConfigError, match="--fp8-ignore"):
        quantize_module.choose_modes(PassContext(BuildConfig(target="cuda", weight_quant="fp8")), (64, 120))


def test_the_modes_are_timed_as_inductor_compiles_them_and_compute_the_same():
    """kernels/fp8_timing.py times each mode compiled (Inductor fuses the per-token quantization
    into one kernel); compiled with a dynamic row count, each mode still computes the op's product."""
    from llama_aot.kernels.fp8_timing import compiled_mode

    q, scale = quantize_rows(torch.randn(32, 64))
    for mode in MODES:
        matmul = compiled_mode(mode)
        for rows in (3, 7):
            x = torch.randn(rows, 64).to(torch.bfloat16)
            torch._dynamo.mark_dynamic(x, 0)
            torch.testing.assert_close(matmul(x, q, scale), fp8_linear(x, q, scale, mode), rtol=1e-2, atol=1e-2)
    torch._dynamo.reset()


def _with_weights(ep, weights):
    module = ep.module()
    module.load_state_dict({**module.state_dict(), **weights}, strict=False)
    return type("Program", (), {"module": lambda self: module, "example_inputs": ep.example_inputs})()


def test_fp8_requires_its_pass():
    with pytest.raises(ConfigError, match="disagree"):
        BuildConfig(weight_quant="fp8", passes=("fuse_qkv",))


@pytest.mark.parametrize("flags", [["--fp8"], ["--kv-cache-dtype", "fp8_e4m3"]])
def test_fp8_on_a_gpu_without_fp8_is_refused_before_any_work(capsys, tmp_path, monkeypatch, flags):
    """An A100 (sm_80) has no FP8 tensor cores: one line naming the GPU, nothing written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert_refused(capsys, [*flags, "--target", "cuda", "-o", str(tmp_path / "out")],
                   "sm_89 or newer", "A100-SXM4-80GB is sm_80")
    assert_nothing_left(tmp_path, "out")
    assert BuildConfig(weight_quant="fp8").passes[-1] == "quantize_fp8"


@pytest.mark.parametrize("mode", [WEIGHT_ONLY, PER_TOKEN])
def test_fp8_build_verifies_and_records_its_quantization(tiny_checkpoint, tiny_build, tiny_artifact, tmp_path,
                                                        monkeypatch, mode):
    """Through AOTInductor's C++ backend: per-token mode takes torch's CPU `_scaled_mm`."""
    monkeypatch.setattr(quantize_module, "choose_modes", lambda ctx, shape: quantize_module.ModeChoice.everywhere(mode))
    build = fp8_build(tiny_build)
    # The weight-only build is the default one, which other tests may have cached; per-token must compile.
    manifest = build_artifact(tiny_checkpoint, build, tmp_path / "fp8", Progress(io.StringIO()),
                              use_cache=mode == WEIGHT_ONLY)
    assert manifest.verification["passed"] and manifest.verification["relative_error"] < 1e-4
    assert {"name": "quantize_fp8", "phase": "quantize", "matches": 4 * LAYERS} in manifest.passes
    record = manifest.quantization["quantize_fp8"]
    assert record["weights"] == "float8_e4m3fn" and modes_used(record) == {mode}
    artifact, plain = load_artifact(tmp_path / "fp8"), load_artifact(tiny_artifact)
    weights = artifact.weights["step"]
    quantized = [t for t in weights.values() if t.dtype == FP8]
    scales = [t for n, t in weights.items() if n.endswith(".weight_scale")]
    assert len(quantized) == len(scales) == 4 * LAYERS
    # each float32 weight became one byte, plus a float32 scale per output channel
    assert plain.weight_bytes - artifact.weight_bytes == sum(3 * t.numel() for t in quantized) - \
        sum(4 * t.numel() for t in scales)


def test_sensitivity_tool_predicts_the_fp8_artifacts_perplexity(tiny_checkpoint, tiny_build, tmp_path, capsys):
    """bench/fp8_sensitivity.py rounds HF's weights as --fp8 does: its "all" row is the perplexity
    `llama-bench accuracy` measures on the weight-only FP8 artifact, on the same texts."""
    from test_bench_accuracy import _dataset

    from llama_aot.bench import cli, fp8_sensitivity

    dataset, out = _dataset(tmp_path), tmp_path / "out"
    build_artifact(tiny_checkpoint, fp8_build(tiny_build), tmp_path / "fp8", Progress(io.StringIO()))
    texts = ["--prompts", "3", "--ppl-texts", "3", "--max-len", "100", "--dataset-path", str(dataset),
             "--out-dir", str(out)]
    assert cli.main(["accuracy", "--artifact", str(tmp_path / "fp8"), "--checkpoint", str(tiny_checkpoint),
                     "--new-tokens", "8", *texts]) == 0
    assert fp8_sensitivity.main([str(tiny_checkpoint), *texts]) == 0
    [accuracy] = json.loads(next(out.glob("accuracy-*.json")).read_text())
    rows = {r["configuration"]: r for r in json.loads(next(out.glob("fp8-sensitivity-*.json")).read_text())}
    assert len(rows) == 2 + 4 + LAYERS and rows["none"]["relative_change"] == 0
    assert rows["all"]["quantized_matmuls"] == 7 * LAYERS  # q, k, v, o, gate, up, down in HF's layout
    assert abs(rows["all"]["perplexity"] / accuracy["perplexity_artifact"] - 1) < 1e-4
    assert abs(rows["none"]["perplexity"] / accuracy["perplexity_hf"] - 1) < 1e-4
    assert "all but gate_up" in capsys.readouterr().out
