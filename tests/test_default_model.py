"""The embedded default, SmolLM2-135M-Instruct, compiled in float32 (`--dtype float32`; what
`make serve` builds on this machine is tested in test_machine_default.py): its pass report, its
verification, and greedy parity with HF transformers' `generate` on the same dequantized weights
(fp32), token for token."""

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from llama_aot.artifacts.kv_layout import KVCacheLayout
from llama_aot.artifacts.manifest import read_manifest
from llama_aot.runtime.artifact import load_artifact

from generation import greedy_generate

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a compiler does in one sentence.",
    "How many legs does a spider have?",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def manifest(smollm2_artifact):
    return read_manifest(smollm2_artifact)


def test_manifest_reports_fusions_per_layer(manifest):
    assert manifest.model.num_layers == 30
    matches = {p["name"]: p["matches"] for p in manifest.passes}
    assert matches == {"fuse_qkv": 30, "fuse_gate_up": 30, "fuse_add_rmsnorm": 60}
    assert manifest.verification["passed"] and manifest.verification["greedy_agreement"] == 1.0


def test_greedy_chat_matches_hf_generate(smollm2_checkpoint, smollm2_artifact):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    hf = LlamaForCausalLM.from_pretrained(smollm2_checkpoint, torch_dtype=torch.float32).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for c in CHATS]
    artifact = load_artifact(smollm2_artifact)
    ours = greedy_generate(artifact.step, KVCacheLayout.of(artifact.model_config, artifact.build_config), prompts,
                           NEW_TOKENS)
    eos = tokenizer.eos_token_id
    for chat, prompt, tokens in zip(CHATS, prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(prompt):].tolist()
        ours_until_eos = tokens[:tokens.index(eos) + 1] if eos in tokens else tokens
        assert ours_until_eos == ref, f"{chat!r}: {tokenizer.decode(tokens)!r} != {tokenizer.decode(ref)!r}"
    answer = tokenizer.decode(ours[0])
    assert "Paris" in answer
