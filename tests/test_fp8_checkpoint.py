"""Pre-quantized compressed-tensors FP8 checkpoints, in the layouts of RedHatAI's
"Meta-Llama-3.1-8B-Instruct-FP8-dynamic" (per-channel weight scales, dynamic per-token activations)
and "-FP8" (per-tensor weight scales, static input scales, here with K/V cache scales as well).

compressed-tensors' own compressor writes them from the tiny checkpoint. The loader must return
their FP8 bytes and scales unchanged, and the fusions must match them as they match unquantized
weights. The oracle is HF transformers' LlamaForCausalLM loading the same directory through
compressed-tensors: our eager model must give its logits, and a CPU build of it verifies against
that eager model.
"""
import io
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_aot.artifacts.config import BuildConfig
from llama_aot.compiler import cli
from llama_aot.compiler.build import Progress, build_artifact
from llama_aot.compiler.checkpoint import load_kv_scales, load_weights, open_checkpoint
from llama_aot.compiler.errors import BuildError
from llama_aot.compiler.export import export_model
from llama_aot.compiler.model import Fp8Linear, build_model
from llama_aot.kernels.fp8_linear import FP8, PER_TOKEN, WEIGHT_ONLY
from llama_aot.passes import quantize_fp8 as quantize_module
from llama_aot.passes.graph_pass import PassContext
from llama_aot.passes.pipeline import run_pipeline

from conftest import TINY_BUILD
from test_fp8 import modes_used
from test_model_parity import hf_logits, run_schedule, sequences

LAYERS = 2
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
INPUT_SCALE = 0.02  # a static activation scale, which the build ignores
KV_SCALES = torch.tensor([[0.011, 0.021], [0.031, 0.041]])  # [layer, (K, V)]
FP8_BUILD = BuildConfig(**TINY_BUILD, weight_quant="fp8")


def write_fp8_checkpoint(src, dst, strategy: str):
    """Quantizes the checkpoint at `src` with compressed-tensors' FP8_DYNAMIC ("channel") or FP8
    ("tensor") preset, lm_head ignored, as llm-compressor does: scales from each weight's min and
    max, then the model compressor, save_pretrained and the config update."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
    preset = PRESET_SCHEMES["FP8_DYNAMIC" if strategy == "channel" else "FP8"]
    scheme = QuantizationScheme(targets=["Linear"], **preset)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]),
                              show_progress=False)
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        dims = {"dim": -1, "keepdim": True} if strategy == "channel" else {}
        scale, _ = calculate_qparams(module.weight.amin(**dims), module.weight.amax(**dims), scheme.weights)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "input_scale"):
            module.input_scale.data.fill_(INPUT_SCALE)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(dst, max_shard_size="200KB" if strategy == "channel" else "50GB")
    compressor.update_config(dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / name, dst / name)
    if strategy == "tensor":
        _add_kv_cache_scales(dst)
    return dst


def _add_kv_cache_scales(path):
    """A kv_cache_scheme and its per-layer `self_attn.{k,v}_scale`, written by hand in the layout
    llm-compressor saves: compressed-tensors 0.20 finds attention modules by a `past_key_values`
    argument, which transformers 5 renamed, so its own path does not reach this model."""
    from compressed_tensors.quantization import QuantizationArgs

    tensors = load_file(path / "model.safetensors")
    for layer in range(LAYERS):
        for i, kv in enumerate(("k_scale", "v_scale")):
            tensors[f"model.layers.{layer}.self_attn.{kv}"] = KV_SCALES[layer, i].reshape(1)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    kv = QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False)
    _edit_quantization(path, kv_cache_scheme=kv.model_dump())


def _edit_quantization(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def fp8_checkpoints(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8-ckpt")
    return {s: write_fp8_checkpoint(tiny_checkpoint, root / s, s) for s in ("channel", "tensor")}


def _hf(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_fp8_dynamic(fp8_checkpoints):
    """HF's LlamaForCausalLM on the per-channel checkpoint as loaded: compressed-tensors quantizes
    each token's activations to e4m3 on the fly, as the FP8_DYNAMIC scheme says."""
    return _hf(fp8_checkpoints["channel"])


@pytest.fixture(scope="module")
def hf_weight_only(fp8_checkpoints):
    """HF's model with compressed-tensors' activation quantization switched off: the checkpoint's
    FP8 weights, decompressed by compressed-tensors, and activations in float32."""
    from compressed_tensors.quantization import disable_quantization

    models = {strategy: _hf(path) for strategy, path in fp8_checkpoints.items()}
    for model in models.values():
        model.apply(disable_quantization)
    return models


@pytest.fixture(scope="module")
def programs(fp8_checkpoints, tiny_checkpoint):
    """Each checkpoint exported and passed with the FP8 pipeline, with the pass reports."""
    out = {}
    for name, path in {**fp8_checkpoints, "unquantized": tiny_checkpoint}.items():
        ckpt = open_checkpoint(path)
        build = FP8_BUILD.resolved(ckpt.config)
        out[name] = run_pipeline(export_model(build_model(ckpt.config, load_weights(ckpt, torch.float32)), build),
                                 PassContext(build))
    return out


def _eager(path):
    ckpt = open_checkpoint(path)
    return build_model(ckpt.config, load_weights(ckpt, torch.float32))


def _assert_logits_match(model, hf_model):
    """On test_model_parity's batches, which mix prefill chunks and decodes, and to its bound:
    max |diff| <= 1e-4 x the logits' scale. The two sides round the same values to e4m3, so only
    float32 summation order separates them."""
    ours, _ = run_schedule(model, open_checkpoint(hf_model.name_or_path).config)
    for i, seq in enumerate(sequences()):
        ref = hf_logits(hf_model, seq)
        err, scale = (ours[i] - ref).abs().max().item(), ref.abs().max().item()
        assert err <= 1e-4 * scale, f"sequence {i}: max |diff| {err:.3g} vs scale {scale:.3g}"


# ------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_loader_returns_the_checkpoints_fp8_bytes_and_scales(fp8_checkpoints, tiny_checkpoint, strategy):
    path = fp8_checkpoints[strategy]
    stored = {k: v for f in path.glob("*.safetensors") for k, v in load_file(f).items()}
    ckpt = open_checkpoint(path)
    assert ckpt.prequantized and not open_checkpoint(tiny_checkpoint).prequantized
    weights = load_weights(ckpt, torch.float32)
    for layer in range(LAYERS):
        for projection in PROJECTIONS:
            name = f"model.layers.{layer}.{projection}"
            weight, scale = weights[f"{name}.weight"], weights[f"{name}.weight_scale"]
            assert weight.dtype == FP8 and torch.equal(weight.view(torch.uint8), stored[f"{name}.weight"].view(torch.uint8))
            assert scale.dtype == torch.float32 and scale.shape == (weight.shape[0],)
            assert torch.equal(scale, stored[f"{name}.weight_scale"].float().reshape(-1).expand(weight.shape[0]))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(weights[name], stored[name])
    assert not any(name.endswith("input_scale") for name in weights)  # static input scales are not used
    kv = load_kv_scales(ckpt)
    assert kv is None if strategy == "channel" else torch.equal(kv, KV_SCALES)


def test_bf16_and_scalar_scales_load_exactly(fp8_checkpoints, tmp_path):
    """Other exporters' layouts: scales in the model's bf16 (llm-compressor on a bf16 model), and
    a per-tensor scale as a 0-d tensor (AutoFP8's)."""
    path = _copy(fp8_checkpoints, tmp_path)
    q_scale, o_scale = "model.layers.0.self_attn.q_proj.weight_scale", "model.layers.0.self_attn.o_proj.weight_scale"
    _edit_tensors(path, lambda t: t.update({q_scale: t[q_scale].bfloat16(), o_scale: t[o_scale].reshape(())}))
    stored = load_file(path / "model.safetensors")
    weights = load_weights(open_checkpoint(path), torch.float32)
    for name in (q_scale, o_scale):
        assert stored[name].dtype == (torch.bfloat16 if name == q_scale else torch.float32)
        assert torch.equal(weights[name], stored[name].float().reshape(1).expand(64))


def test_fp8_weights_become_fp8_linears(fp8_checkpoints):
    model = _eager(fp8_checkpoints["channel"])
    assert isinstance(model.model.layers[0].self_attn.q_proj, Fp8Linear)
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.dtype == torch.float32


# ------------------------------------------------------------------------------------------- passes


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_fp8_matmuls_fuse_and_quantize_like_unquantized_ones(programs, fp8_checkpoints, strategy):
    ep, reports = programs[strategy]
    matches = {r.name: r.matches for r in reports}
    assert matches == {r.name: r.matches for r in programs["unquantized"][1]}
    assert matches["fuse_qkv"] == matches["fuse_gate_up"] == LAYERS and matches["quantize_fp8"] == 4 * LAYERS
    record = next(r.record for r in reports if r.name == "quantize_fp8")
    assert record["from_checkpoint"] == 4 * LAYERS and modes_used(record) == {WEIGHT_ONLY}
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.llama_aot.fp8_linear.default) == 3 * LAYERS  # down_proj: fp8_gated_linear
    assert targets.count(torch.ops.llama_aot.fp8_gated_linear.default) == LAYERS
    assert targets.count(torch.ops.aten.linear.default) == 1  # the LM head, which the checkpoint ignores
    stored = {k: v for f in fp8_checkpoints[strategy].glob("*.safetensors") for k, v in load_file(f).items()}
    rows = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    for layer in range(LAYERS):
        for fused, parts in rows.items():
            module = f"model.layers.{layer}.{'self_attn' if fused == 'qkv_proj' else 'mlp'}"
            weight = ep.state_dict[f"{module}.{fused}.weight"]
            expected = torch.cat([stored[f"{module}.{p}.weight"] for p in parts])
            assert weight.dtype == FP8 and torch.equal(weight.view(torch.uint8), expected.view(torch.uint8))
            scales = torch.cat([stored[f"{module}.{p}.weight_scale"].float().reshape(-1).expand(
                stored[f"{module}.{p}.weight"].shape[0]) for p in parts])
            assert torch.equal(ep.state_dict[f"{module}.{fused}.weight_scale"], scales)


# ------------------------------------------------------------------- HF transformers as the oracle


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_eager_model_matches_hf_on_the_checkpoints_weights(fp8_checkpoints, hf_weight_only, strategy):
    """Weight-only, what the CPU build computes: the same FP8 weights, activations unquantized."""
    hf = hf_weight_only[strategy]
    _assert_logits_match(_eager(fp8_checkpoints[strategy]), hf)
    assert hf.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # decompressed, not fp8


def test_per_token_mode_matches_hf_fp8_dynamic(fp8_checkpoints, hf_fp8_dynamic, monkeypatch):
    """The FP8-dynamic scheme as its config states it: each token's activations quantized to e4m3
    with their own scale, which is our per-token mode."""
    monkeypatch.setattr(quantize_module, "choose_modes", lambda ctx, shape: quantize_module.ModeChoice.everywhere(PER_TOKEN))
    ckpt = open_checkpoint(fp8_checkpoints["channel"])
    build = FP8_BUILD.resolved(ckpt.config)
    model = build_model(ckpt.config, load_weights(ckpt, torch.float32))
    ep, _ = run_pipeline(export_model(model, build), PassContext(build))
    _assert_logits_match(ep.module(), hf_fp8_dynamic)


def test_a_plain_build_of_an_fp8_checkpoint_is_fp8_and_takes_its_kv_scales(fp8_checkpoints, tmp_path):
    """No --fp8 given: the checkpoint's FP8 weights make it an FP8 build, as vLLM loads one; and
    with --kv-cache-dtype fp8_e4m3 its k_scale/v_scale are used instead of a calibration. The
    compiled program passed the build's verification against the eager model, which the tests
    above hold to HF's on the same weights."""
    progress = Progress(io.StringIO())
    build = BuildConfig(**TINY_BUILD, kv_dtype="fp8_e4m3")
    manifest = build_artifact(fp8_checkpoints["tensor"], build, tmp_path / "art", progress, use_cache=False)
    assert "the checkpoint's weights are FP8" in progress.stream.getvalue()
    assert manifest.build.weight_quant == "fp8" and manifest.verification["passed"]
    assert manifest.quantization["quantize_fp8"]["from_checkpoint"] == 4 * LAYERS
    kv = manifest.quantization["quantize_kv_cache"]
    assert kv["scales_from"] == "checkpoint"
    torch.testing.assert_close(torch.tensor([kv["k_scales"], kv["v_scales"]]).T, KV_SCALES)


# ----------------------------------------------------------------------------------------- refusals


def _copy(fp8_checkpoints, tmp_path, strategy="tensor"):
    return shutil.copytree(fp8_checkpoints[strategy], tmp_path / strategy)


def _edit_tensors(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _refused(path, match):
    with pytest.raises(BuildError, match=match) as e:
        load_weights(open_checkpoint(path), torch.float32)
    assert "\n" not in str(e.value)


def test_missing_weight_scale_is_refused(fp8_checkpoints, tmp_path):
    path = _copy(fp8_checkpoints, tmp_path)
    _edit_tensors(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight_scale"))
    _refused(path, r"missing model.layers.1.mlp.up_proj.weight_scale \(shape \[1\]\)")


def test_misshaped_weight_scale_is_refused(fp8_checkpoints, tmp_path):
    path = _copy(fp8_checkpoints, tmp_path)
    _edit_tensors(path, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight_scale": torch.ones(64, 1)}))
    _refused(path, r"^model.layers.0.self_attn.q_proj.weight_scale in model.safetensors is F32 of shape "
                   r"\[64, 1\] but config.json's quantization_config implies shape \[1\]")


def test_unquantized_weight_where_the_config_says_fp8_is_refused(fp8_checkpoints, tmp_path):
    path = _copy(fp8_checkpoints, tmp_path)
    _edit_tensors(path, lambda t: t.update({"model.layers.0.mlp.down_proj.weight": torch.zeros(64, 128)}))
    _refused(path, r"^model.layers.0.mlp.down_proj.weight in model.safetensors is stored as F32 but "
                   r"config.json's quantization_config quantizes it to F8_E4M3")


def test_missing_kv_cache_scale_is_refused(fp8_checkpoints, tmp_path):
    path = _copy(fp8_checkpoints, tmp_path)
    _edit_tensors(path, lambda t: t.pop("model.layers.1.self_attn.v_scale"))
    with pytest.raises(BuildError, match=r"missing model.layers.1.self_attn.v_scale \(shape \[1\]\)"):
        load_kv_scales(open_checkpoint(path))


@pytest.mark.parametrize("weights, match", [
    ({"strategy": "group", "group_size": 32}, "group-wise weight scales are not supported"),
    ({"strategy": "block", "block_structure": [32, 32]}, "block-wise weight scales are not supported"),
    ({"type": "int", "num_bits": 4, "strategy": "group", "group_size": 32},
     "int4, group strategy weights are not supported"),
    ({"type": "int", "num_bits": 8, "strategy": "channel"}, "int8, channel strategy weights are not supported"),
    ({"symmetric": False}, "asymmetric weight quantization is not supported"),
])
def test_unsupported_schemes_are_refused_at_open(fp8_checkpoints, tmp_path, weights, match):
    path = _copy(fp8_checkpoints, tmp_path, "channel")
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    config["config_groups"]["group_0"]["weights"].update(weights)
    _edit_quantization(path, config_groups=config["config_groups"])
    with pytest.raises(BuildError, match=f"^config.json: quantization_config group 'group_0': {match}; "
                                         "llama-aot loads FP8") as e:
        open_checkpoint(path)
    assert "\n" not in str(e.value)


def test_other_quantization_methods_are_refused(fp8_checkpoints, tmp_path, capsys):
    path = _copy(fp8_checkpoints, tmp_path, "channel")
    _edit_quantization(path, quant_method="awq")
    assert cli.main(["--model", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("llama-compile: error: config.json: quantization_config quant_method 'awq' is not supported; "
                   "llama-aot loads FP8 (float8_e4m3fn) weights with per-channel or per-tensor scales in the "
                   "compressed-tensors format")
