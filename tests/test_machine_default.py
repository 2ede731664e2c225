"""What `llama-compile` builds for this machine without --dtype, --int8 or --fp8
(compiler/machine_default.py): --int8 on a CPU with AVX-512, as given elsewhere; and the embedded
default built that way, as `make serve` builds it, against HF transformers in float32."""
import pytest
from transformers import AutoTokenizer

from llama_aot.artifacts.config import BuildConfig
from llama_aot.artifacts.manifest import read_manifest
from llama_aot.bench.accuracy import HFReference, artifact_greedy, teacher_forced
from llama_aot.compiler import machine_default as md
from llama_aot.compiler.cli import main
from llama_aot.runtime.artifact import load_artifact

from test_default_model import CHATS, NEW_TOKENS
from tiny_checkpoint import write_tiny_llama

# Teacher-forced greedy agreement of the --int8 default with HF float32 on CHATS (measured: see
# docs/cpu.md); float32 builds agree exactly (test_default_model.py).
MIN_INT8_AGREEMENT = 0.9


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("machine-default") / "ckpt", shards=1)


def test_an_avx512_cpu_builds_int8_with_bfloat16_activations(tiny, monkeypatch):
    monkeypatch.setattr(md, "cpu_capability", lambda: "AVX512")
    build, line = md.machine_default(BuildConfig(), tiny)
    assert build == BuildConfig(weight_quant="int8")  # exactly what `llama-compile --int8` builds
    assert (build.dtype, build.kv_dtype, build.passes[-1]) == ("bfloat16", "bfloat16", "quantize_int8")
    assert "AVX512" in line and "--dtype float32" in line
    fp8_kv, _ = md.machine_default(BuildConfig(kv_dtype="fp8_e4m3"), tiny)
    assert fp8_kv == BuildConfig(weight_quant="int8", kv_dtype="fp8_e4m3")


def test_other_cpus_and_other_builds_keep_what_they_asked_for(tiny, monkeypatch):
    monkeypatch.setattr(md, "cpu_capability", lambda: "AVX2")
    build, line = md.machine_default(BuildConfig(), tiny)
    assert build == BuildConfig() and "AVX2" in line
    monkeypatch.setattr(md, "cpu_capability", lambda: "AVX512")
    for asked in (BuildConfig(tp=2), BuildConfig(weight_quant="fp8")):
        assert md.machine_default(asked, tiny) == (asked, None)


def test_a_dtype_on_the_command_line_builds_that_dtype(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(md, "cpu_capability", lambda: "AVX512")
    tiny_flags = ["--max-num-tokens", "32", "--max-num-seqs", "4", "--context-length", "64", "--block-size", "4"]
    assert main(["--model", str(tiny), "--dtype", "float32", *tiny_flags, "-o", str(tmp_path / "f32")]) == 0
    manifest = read_manifest(tmp_path / "f32")
    assert (manifest.build.weight_quant, manifest.build.dtype) == ("none", "float32")
    assert "building --int8" not in capsys.readouterr().err


def test_the_default_build_is_int8_where_the_cpu_has_avx512(smollm2_default):
    manifest = read_manifest(smollm2_default)
    if md.cpu_capability() in md.INT8_CAPABILITIES:
        assert (manifest.build.weight_quant, manifest.build.dtype, manifest.build.kv_dtype) == ("int8", "bfloat16", "bfloat16")
        assert manifest.quantization["quantize_int8"]["cpu_capability"] == md.cpu_capability()
    else:
        assert (manifest.build.weight_quant, manifest.build.dtype) == ("none", "float32")
    assert manifest.verification["passed"]


def test_the_default_build_agrees_with_hf_on_the_test_chats(smollm2_checkpoint, smollm2_default):
    """Teacher-forced: each position of HF's greedy continuation is scored on HF's prefix, so one
    early difference does not count against every later token."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    artifact = load_artifact(smollm2_default)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": chat}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for chat in CHATS]
    agreement = teacher_forced(artifact, HFReference(smollm2_checkpoint, "cpu"), prompts, NEW_TOKENS).agreement
    print(f"greedy agreement of the default ({artifact.build_config.weight_quant}, {artifact.build_config.dtype}) "
          f"with HF float32, teacher-forced on {len(CHATS)} chats x {NEW_TOKENS} tokens: {agreement:.4f}")
    assert agreement >= (1.0 if artifact.build_config.weight_quant == "none" else MIN_INT8_AGREEMENT)
    assert "Paris" in tokenizer.decode(artifact_greedy(artifact, prompts[0], NEW_TOKENS))
