"""`llama-compile --int8`: the CPU target's int8 weight-only matmuls (passes/quantize_int8.py).

The pass on the tiny model with an LM head tied to its embedding (as the default SmolLM2's is),
what the quantized program computes, and the flags' refusals."""
import dataclasses

import pytest
import torch

from llama_aot.artifacts.config import BuildConfig
from llama_aot.artifacts.errors import ConfigError
from llama_aot.artifacts.step_abi import SequenceChunk, build_step_inputs, call_step
from llama_aot.compiler.checkpoint import load_weights, open_checkpoint
from llama_aot.compiler.cli import main
from llama_aot.compiler.export import export_model
from llama_aot.compiler.model import build_model
from llama_aot.passes.graph_pass import PassContext
from llama_aot.passes.pipeline import run_pipeline
from llama_aot.passes.quantize_int8 import TIED_HEAD_COPY, quantize_int8, quantize_rows_int8

from conftest import TINY_BUILD
from test_cli import assert_refused
from tiny_checkpoint import write_tiny_llama

LAYERS = 2


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """The tiny tied-embedding model in bfloat16, exported and fused, and its int8 build config."""
    ckpt = open_checkpoint(write_tiny_llama(tmp_path_factory.mktemp("tied") / "ckpt", tie_word_embeddings=True,
                                            shards=1, num_layers=LAYERS))
    build = BuildConfig(**TINY_BUILD, weight_quant="int8").resolved(ckpt.config)
    fusions = dataclasses.replace(build, weight_quant="none", passes=("fuse_qkv", "fuse_gate_up", "fuse_add_rmsnorm"))
    model = build_model(ckpt.config, load_weights(ckpt, torch.bfloat16))
    ep, _ = run_pipeline(export_model(model, build), PassContext(fusions))
    return ep, build


def _logits(program, build, num_blocks=12):
    example = program.example_inputs[0][-1]
    cache = torch.zeros(example.shape[:2] + (num_blocks,) + example.shape[3:], dtype=example.dtype)
    chunks = [SequenceChunk((3, 1, 4, 1, 5), 0, (1, 2), True), SequenceChunk((9, 2, 6), 0, (3, 4), True)]
    return call_step(program.module(), build_step_inputs(chunks, build.block_size), cache).float()


def test_int8_builds_compute_in_bfloat16_on_the_cpu():
    build = BuildConfig(weight_quant="int8")
    assert build.dtype == "bfloat16" and build.passes[-1] == "quantize_int8"


def test_every_decoder_matmul_and_the_tied_lm_head_become_int8_and_the_embedding_keeps_its_rows(tied):
    ep, build = tied
    result = quantize_int8(ep, PassContext(build))
    assert result.matches == 4 * LAYERS + 1  # qkv, o, gate_up, down after the fusions; the LM head
    sd = result.program.state_dict
    for i in range(LAYERS):
        for module in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            assert sd[f"model.layers.{i}.{module}.weight"].dtype == torch.int8
            assert sd[f"model.layers.{i}.{module}.weight_scale"].dtype == torch.bfloat16
    assert sd[TIED_HEAD_COPY].dtype == torch.int8 and sd["lm_head.weight"].dtype == torch.bfloat16
    assert result.record == {"weights": "int8", "weight_scale": "per output channel",
                             "matmul": "aten._weight_int8pack_mm", "lm_head": True, "lm_head_tied_copy": True,
                             "matmuls": 4 * LAYERS + 1, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def test_the_int8_program_is_the_model_with_rounded_weights(tied):
    """Each row rounded to 127 steps of its largest magnitude: the logits move by about that."""
    ep, build = tied
    quantized = quantize_int8(ep, PassContext(build)).program
    rows, scale = quantize_rows_int8(torch.tensor([[0.0, 0.0], [-2.0, 1.0]]), torch.float32)
    assert rows.tolist() == [[0, 0], [-127, 64]] and scale[1].item() == pytest.approx(2 / 127)
    reference, got = _logits(ep, build), _logits(quantized, build)
    error = ((got - reference).norm() / reference.norm()).item()
    assert 0 < error < 0.05
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.75


@pytest.mark.parametrize("argv, needle", [
    (["--int8", "--target", "cuda"], "use --fp8"),
    (["--int8", "--dtype", "float32"], "slower than float32"),
    (["--int8", "--tp", "2"], "build --int8 on one rank"),
])
def test_int8_refusals(capsys, tmp_path, argv, needle):
    assert_refused(capsys, [*argv, "-o", str(tmp_path / "out")], needle)
    assert not (tmp_path / "out").exists()


def test_int8_and_fp8_together_are_refused_by_the_parser(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["--int8", "--fp8", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "not allowed with argument" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_int8_needs_its_pass():
    with pytest.raises(ConfigError, match="disagree"):
        BuildConfig(weight_quant="int8", passes=("fuse_qkv",))
