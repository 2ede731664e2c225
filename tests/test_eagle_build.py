"""`llama-compile --speculative-algorithm EAGLE3 --speculative-draft-model-path DIR`: the head built
as the artifact's draft program beside a step program that also returns the head's input, both
verified at build time, loaded and run by the runtime; and the refusals of a wrong head or flags."""
import dataclasses
import json

import pytest
import torch

from llama_aot.artifacts.kv_layout import KVCacheLayout
from llama_aot.artifacts.step_abi import SequenceChunk, build_step_inputs, call_draft, step_outputs
from llama_aot.compiler.checkpoint import load_weights, open_checkpoint
from llama_aot.compiler.eagle_head import build_head, read_head
from llama_aot.compiler.model import build_model
from llama_aot.runtime.artifact import load_artifact

from test_cli import assert_nothing_left, assert_refused


@pytest.fixture(scope="module")
def head_dir(tiny_eagle_head):
    return tiny_eagle_head


@pytest.fixture(scope="module")
def eagle_artifact(tiny_eagle_artifact):
    return tiny_eagle_artifact


def test_the_head_becomes_a_verified_draft_program(eagle_artifact):
    artifact = load_artifact(eagle_artifact)
    manifest = artifact.manifest
    assert [p.name for p in manifest.programs] == ["step", "draft"]
    assert manifest.build.speculative_algorithm == "EAGLE3" and manifest.build.speculative_num_steps == 3
    assert manifest.verification["passed"] and manifest.verification["draft"]["passed"]
    assert manifest.verification["draft"]["relative_error"] < 1e-4
    assert set(artifact.programs) == {"step", "draft"}


def test_the_step_returns_the_heads_input_and_the_draft_reads_it(eagle_artifact, tiny_checkpoint, head_dir):
    """The compiled step's second output is fc of the residual stream entering the tapped layers
    (checked against the eager model), and the compiled draft turns it into the eager head's logits."""
    artifact = load_artifact(eagle_artifact)
    ckpt = open_checkpoint(tiny_checkpoint)
    config, tensors = read_head(head_dir, ckpt.config)
    weights = load_weights(ckpt, torch.float32)
    eager = build_model(ckpt.config, {**weights, "eagle_fc.weight": tensors["fc.weight"]}, config.aux_layers)
    head = build_head(config, tensors, weights["model.embed_tokens.weight"])
    layout = KVCacheLayout.of(ckpt.config, artifact.build_config)
    draft_layout = dataclasses.replace(layout, num_layers=1)
    step = build_step_inputs([SequenceChunk((5, 9, 200, 31, 7), 0, (1, 2), all_logits=True)], layout.block_size)
    logits, hidden = step_outputs(artifact.step, step, layout.allocate(4, "cpu"))
    expected_logits, expected_hidden = step_outputs(eager, step, layout.allocate(4, "cpu"))
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hidden, expected_hidden, rtol=1e-4, atol=1e-4)
    drafted = call_draft(artifact.programs["draft"], step, hidden, draft_layout.allocate(4, "cpu"))
    expected = call_draft(head, step, hidden, draft_layout.allocate(4, "cpu"))
    for got, want in zip(drafted, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flags, message", [
    (["--speculative-algorithm", "EAGLE3"], "go together"),
    (["--speculative-algorithm", "EAGLE3", "--tp", "2", "--speculative-draft-model-path", "HEAD"],
     "with --tp above 1 is not built yet"),
    (["--speculative-algorithm", "EAGLE3", "--speculative-num-steps", "9", "--speculative-draft-model-path", "HEAD"],
     "--speculative-num-steps 9: must be between 1 and 8"),
])
def test_speculative_flags_that_cannot_build_are_refused(capsys, tiny_checkpoint, head_dir, tmp_path, flags, message):
    flags = [str(head_dir) if f == "HEAD" else f for f in flags]
    assert_refused(capsys, ["--model", str(tiny_checkpoint), *flags, "-o", str(tmp_path / "out")], message)
    assert_nothing_left(tmp_path, "out")


def test_a_head_for_another_model_is_refused_before_any_work(capsys, tiny_checkpoint, head_dir, tmp_path):
    other = tmp_path / "other-head"
    hf = json.loads((head_dir / "config.json").read_text())
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**hf, "hidden_size": 2 * hf["hidden_size"]}))
    (other / "model.safetensors").write_bytes((head_dir / "model.safetensors").read_bytes())
    line = assert_refused(capsys, ["--model", str(tiny_checkpoint), "--speculative-algorithm", "EAGLE3",
                                   "--speculative-draft-model-path", str(other), "-o", str(tmp_path / "out")],
                          "the head's hidden size is 128 but the target's is 64")
    assert str(other) in line
    assert_nothing_left(tmp_path, "out")
