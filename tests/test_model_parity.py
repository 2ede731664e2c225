"""Logit parity with HF transformers' LlamaForCausalLM (fp32, CPU) on the tiny random Llama 3.1:
llama3 RoPE scaling, GQA, untied embeddings, a sharded checkpoint. Both our eager model and the
compiled artifact are held to max |diff| <= 1e-4 x the logits' scale, on batches that mix prefill
chunks and decode steps of different lengths."""
import pytest
import torch
from transformers import LlamaForCausalLM

from llama_aot.artifacts.kv_layout import KVCacheLayout
from llama_aot.artifacts.step_abi import SequenceChunk, build_step_inputs, call_step
from llama_aot.compiler.checkpoint import load_weights, open_checkpoint
from llama_aot.compiler.model import build_model
from llama_aot.runtime.artifact import load_artifact

from generation import greedy_generate

PROMPTS = [[11, 7, 300, 42, 5, 9, 123, 77, 250, 31, 8], [5, 400, 19], list(range(100, 160)), [64, 3, 99, 12, 501]]
# Each step: (sequence, number of new tokens). Step 1 mixes whole prompts with the first chunk of a
# long one; step 2 mixes its second chunk with single-token continuations; step 3 is all decodes.
SCHEDULE = [[(0, 11), (1, 3), (2, 25)], [(2, 35), (0, 1), (1, 1), (3, 5)], [(0, 1), (1, 1), (2, 1), (3, 1)]]
BLOCK = 4


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    return LlamaForCausalLM.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def eager(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint)
    return build_model(ckpt.config, load_weights(ckpt, torch.float32))


def sequences():
    """Each sequence's full token list: prompt, then the continuation tokens the schedule feeds."""
    seqs = [list(p) for p in PROMPTS]
    for i, extra in enumerate([[17, 23], [88, 2], [61], [4]]):
        seqs[i] += extra
    return seqs


def layout(cfg) -> KVCacheLayout:
    return KVCacheLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, BLOCK, "float32")


def run_schedule(model, cfg):
    seqs = sequences()
    tables = [tuple(range(1 + 20 * i, 21 + 20 * i)) for i in range(len(seqs))]
    cache = layout(cfg).allocate(1 + 20 * len(seqs), "cpu")
    done = [0] * len(seqs)
    rows = {i: [] for i in range(len(seqs))}
    for step in SCHEDULE:
        chunks = []
        for i, n in step:
            chunks.append(SequenceChunk(tuple(seqs[i][done[i]:done[i] + n]), done[i], tables[i], all_logits=True))
            done[i] += n
        inputs = build_step_inputs(chunks, BLOCK)
        with torch.no_grad():
            logits = call_step(model, inputs, cache)
        for (i, _), part in zip(step, logits.split([n for _, n in step])):
            rows[i].append(part)
    return {i: torch.cat(r) for i, r in rows.items()}, done


def hf_logits(hf_model, seq):
    with torch.no_grad():
        return hf_model(torch.tensor([seq])).logits[0].float()


@pytest.mark.parametrize("which", ["eager", "compiled"])
def test_logits_match_hf(which, hf_model, eager, tiny_artifact):
    model = eager if which == "eager" else load_artifact(tiny_artifact).step
    ours, lengths = run_schedule(model, eager.config)
    for i, seq in enumerate(sequences()):
        assert lengths[i] == len(seq)
        ref = hf_logits(hf_model, seq)
        scale = ref.abs().max().item()
        err = (ours[i] - ref).abs().max().item()
        assert err <= 1e-4 * scale, f"sequence {i}: max |diff| {err:.3g} vs scale {scale:.3g}"
        assert torch.equal(ours[i].argmax(-1), ref.argmax(-1))


def test_greedy_tokens_match_hf_generate(hf_model, eager, tiny_artifact):
    prompts = PROMPTS[:3]
    ours = greedy_generate(load_artifact(tiny_artifact).step, layout(eager.config), prompts, 12)
    for prompt, tokens in zip(prompts, ours):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert tokens == ref
    assert len({tuple(t) for t in ours}) > 1, "degenerate model: every prompt gave the same tokens"
