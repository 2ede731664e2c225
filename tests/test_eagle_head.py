"""EAGLE-3 heads (compiler/eagle_head.py): the Hugging Face layout read and written, the refusals
a user meets with a wrong or damaged head, and the head run through the paged KV cache as the draft
program will run it."""
import json
import shutil

import pytest
import torch

from llama_aot.artifacts.config import BuildConfig
from llama_aot.artifacts.kv_layout import KVCacheLayout
from llama_aot.artifacts.step_abi import SequenceChunk, build_step_inputs, call_draft
from llama_aot.compiler.checkpoint import load_weights, open_checkpoint
from llama_aot.compiler.eagle_head import (EagleHeadConfig, build_head, default_aux_layers, read_head,
                                           write_head)
from llama_aot.compiler.errors import BuildError

DRAFT_VOCAB = 100


@pytest.fixture(scope="module")
def target(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint)
    return ckpt, load_weights(ckpt, torch.float32)


def random_head(cfg, draft_vocab=DRAFT_VOCAB, seed=0):
    import dataclasses

    config = EagleHeadConfig(dataclasses.replace(cfg, num_layers=1), draft_vocab, default_aux_layers(cfg.num_layers))
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: (torch.randn(shape, generator=gen) * 0.1 if len(shape) == 2 else 1 + 0.1 * torch.randn(shape, generator=gen))
               for name, shape in config.shapes().items() if name != "d2t"}
    if draft_vocab != cfg.vocab_size:  # every draft id onto an even target id
        tensors["d2t"] = torch.arange(draft_vocab, dtype=torch.int64)
    return config, tensors


@pytest.fixture(scope="module")
def head_dir(target, tmp_path_factory):
    ckpt, _ = target
    config, tensors = random_head(ckpt.config)
    path = tmp_path_factory.mktemp("heads") / "eagle3"
    write_head(path, config, tensors, json.loads((ckpt.path / "config.json").read_text()))
    return path


def test_a_written_head_reads_back_as_written(target, head_dir):
    ckpt, _ = target
    config, tensors = read_head(head_dir, ckpt.config)
    expected_config, expected = random_head(ckpt.config)
    assert config.shapes() == expected_config.shapes() and config.model.rope_scaling == ckpt.config.rope_scaling
    assert config.aux_layers == (0, 1, 1)  # the tiny target has 2 layers
    assert set(tensors) == set(expected) and all(torch.equal(tensors[n], expected[n]) for n in expected)
    hf = json.loads((head_dir / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLMEagle3"] and hf["draft_vocab_size"] == DRAFT_VOCAB


def test_a_head_in_pytorch_bin_layout_reads_too(target, head_dir, tmp_path):
    ckpt, _ = target
    copy = tmp_path / "bin-head"
    shutil.copytree(head_dir, copy)
    from safetensors.torch import load_file

    torch.save(load_file(str(copy / "model.safetensors")), copy / "pytorch_model.bin")
    (copy / "model.safetensors").unlink()
    assert read_head(copy, ckpt.config)[0] == read_head(head_dir, ckpt.config)[0]


def _edit(head_dir, tmp_path, config=None, tensors=None):
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "edited"
    shutil.copytree(head_dir, copy)
    if config:
        hf = json.loads((copy / "config.json").read_text())
        config(hf)
        (copy / "config.json").write_text(json.dumps(hf))
    if tensors:
        t = load_file(str(copy / "model.safetensors"))
        tensors(t)
        save_file(t, str(copy / "model.safetensors"))
    return copy


@pytest.mark.parametrize("config, tensors, message", [
    (lambda hf: hf.update(hidden_size=hf["hidden_size"] * 2), None, "the head's hidden size is"),
    (lambda hf: hf.update(vocab_size=hf["vocab_size"] + 1), None, "the head's vocabulary is"),
    (lambda hf: hf.update(architectures=["LlamaForCausalLM"]), None, "expected LlamaForCausalLMEagle3"),
    (lambda hf: hf.update(num_hidden_layers=2), None, "an EAGLE-3 head has one layer"),
    (lambda hf: hf.update(draft_vocab_size=0), None, "draft_vocab_size 0"),
    (lambda hf: hf["eagle_config"].update(eagle_aux_hidden_state_layer_ids=[1, 2, 99]), None, "three layers"),
    (None, lambda t: t.pop("fc.weight"), "missing tensor fc.weight"),
    (None, lambda t: t.update({"norm.weight": torch.ones(3)}), r"norm.weight has shape \[3\], expected \[64\]"),
    (None, lambda t: t.update({"d2t": t["d2t"] + 10_000}), "d2t must be int64 offsets"),
    (None, lambda t: t.update({"extra.weight": torch.ones(3)}), "unexpected tensor extra.weight"),
])
def test_a_head_that_does_not_fit_the_target_is_refused_by_name(target, head_dir, tmp_path, config, tensors, message):
    ckpt, _ = target
    with pytest.raises(BuildError, match=message):
        read_head(_edit(head_dir, tmp_path, config, tensors), ckpt.config)


def test_a_missing_or_damaged_head_is_refused(target, head_dir, tmp_path):
    ckpt, _ = target
    with pytest.raises(BuildError, match="no config.json"):
        read_head(tmp_path, ckpt.config)
    damaged = _edit(head_dir, tmp_path)
    (damaged / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BuildError, match="model.safetensors: cannot be read"):
        read_head(damaged, ckpt.config)
    (damaged / "model.safetensors").unlink()
    with pytest.raises(BuildError, match="the head's weights are missing"):
        read_head(damaged, ckpt.config)


def test_the_head_drafts_the_same_through_its_cache_in_any_chunking(target, head_dir):
    """All positions in one step, or a prefill then one token per step: the head's own KV cache
    must make both give the same logits and hidden states, as the draft program relies on."""
    ckpt, weights = target
    config, tensors = read_head(head_dir, ckpt.config)
    head = build_head(config, tensors, weights["model.embed_tokens.weight"])
    build = BuildConfig(block_size=4)
    layout = KVCacheLayout.of(config.model, build)
    assert layout.num_layers == 1
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, ckpt.config.vocab_size, (9,), generator=gen).tolist()
    hidden = head.mix(torch.randn(9, 3 * ckpt.config.hidden_size, generator=gen))
    table = (1, 2, 3)

    def run(chunks, cache):
        logits, states = [], []
        for start, end in chunks:
            step = build_step_inputs([SequenceChunk(tuple(tokens[start:end]), start, table, all_logits=True)], 4)
            out, h = call_draft(head, step, hidden[start:end], cache)
            logits.append(out)
            states.append(h)
        return torch.cat(logits), torch.cat(states)

    whole = run([(0, 9)], layout.allocate(4, "cpu"))
    stepped = run([(0, 5)] + [(i, i + 1) for i in range(5, 9)], layout.allocate(4, "cpu"))
    for a, b in zip(whole, stepped):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    logits, states = whole
    assert logits.shape == (9, ckpt.config.vocab_size) and states.shape == (9, ckpt.config.hidden_size)
    drafted = torch.arange(DRAFT_VOCAB) * 2  # d2t puts draft id i at target id 2i
    assert torch.isfinite(logits[:, drafted]).all() and logits.isinf().sum() == 9 * (ckpt.config.vocab_size - DRAFT_VOCAB)
