"""compiler/lazy_weights.py: the passes run on fake weights and record how each new weight is
computed; materializing a recorded weight gives exactly what the passes compute on real ones."""
import dataclasses

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from llama_aot.artifacts.tensor_parallel import fake_group
from llama_aot.compiler.checkpoint import load_weights, open_checkpoint
from llama_aot.compiler.export import export_model
from llama_aot.compiler.lazy_weights import LazyWeights
from llama_aot.compiler.lower import program_constants
from llama_aot.compiler.model import build_model
from llama_aot.passes.graph_pass import PassContext
from llama_aot.passes.pipeline import run_pipeline


@pytest.fixture(scope="module")
def model_and_build(tiny_checkpoint, tiny_build):
    ckpt = open_checkpoint(tiny_checkpoint)
    build = dataclasses.replace(tiny_build, tp=2, weight_quant="fp8", passes=None).resolved(ckpt.config)
    return build_model(ckpt.config, load_weights(ckpt, torch.float32)), build


@pytest.mark.parametrize("rank", [0, 1])
def test_recorded_weights_materialize_to_what_the_passes_compute(model_and_build, rank):
    """Fused, FP8-quantized and sharded: every weight of the program, bit for bit."""
    model, build = model_and_build
    with fake_group(build.tp):
        eager, _ = run_pipeline(export_model(model, build), PassContext(build, rank=rank))
        ep = export_model(model, build)
        lazy = LazyWeights(ep)
        with lazy.recording():
            recorded, _ = run_pipeline(ep, PassContext(build, rank=rank))
    expected, got = program_constants(eager), program_constants(recorded)
    assert sorted(got) == sorted(expected)
    fused = "model.layers.0.self_attn.qkv_proj.weight"
    assert isinstance(got[fused], FakeTensor) and lazy.is_lazy(got[fused])  # recorded, not computed
    for name, value in got.items():
        torch.testing.assert_close(lazy.materialize(value), expected[name], rtol=0, atol=0, msg=name)


def test_a_pass_that_mutates_a_weight_in_place_is_refused(model_and_build):
    model, build = model_and_build
    ep = export_model(model, dataclasses.replace(build, tp=1, weight_quant="none", passes=None))
    lazy = LazyWeights(ep)
    weight = next(iter(ep.state_dict.values()))
    with lazy.recording(), pytest.raises(RuntimeError, match="in place"):
        weight.mul_(2)
