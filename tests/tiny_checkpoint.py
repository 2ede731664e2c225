"""Tiny random Llama 3.1 checkpoints for tests (a helper module, not a test file).

`write_tiny_llama` saves a real transformers LlamaForCausalLM (so the weights, config.json and
shard index are exactly what Hugging Face writes) with Llama 3.1's llama3 RoPE scaling, GQA, a
byte-level BPE tokenizer whose vocabulary matches the model, a Llama-3-style chat template and a
generation_config.json. `write_big_random_checkpoint` writes a larger one straight through the
reference safetensors writer, for memory tests where building a transformers model would be slow.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB_SIZE = 512
SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>")
# Llama 3's template, shortened: no system-prompt date preamble and no tool calling.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
_CORPUS = """\
The quick brown fox jumps over the lazy dog. Hello, world! How are you today? I am fine, thank you.
Llama is a family of large language models. This tiny model has random weights, so what it says
means nothing, but its tokens are real and its numbers are exact. The system prompt sets the tone;
the user asks a question and the assistant answers it. Once upon a time there was a small compiler
that turned a checkpoint into an artifact, and a server that loaded it in seconds.
def main():
    for i in range(10):
        print(f"step {i}: loss = {0.5 * i:.3f}")
    return {"ok": True, "values": [1, 2, 3]}
SELECT name, count(*) FROM users WHERE age >= 21 GROUP BY name ORDER BY 2 DESC;
0123456789 + - * / = < > ( ) [ ] { } # @ $ % ^ & | ~ ` ' " ; : , . ? !
"""


def build_tokenizer():
    """A byte-level BPE with exactly VOCAB_SIZE ids: learned tokens first, then the Llama 3
    special tokens, then reserved special tokens as padding (Llama 3's layout, in miniature)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    n_regular = VOCAB_SIZE - 64
    trainer = trainers.BpeTrainer(vocab_size=n_regular, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True) * 4, trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(VOCAB_SIZE - tok.get_vocab_size())]
    tok.add_special_tokens(reserved)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def special_ids(tok) -> dict[str, int]:
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


def _write_tokenizer_files(path: Path, tok) -> dict[str, int]:
    ids = special_ids(tok)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>", "model_max_length": 512, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE}, indent=2))
    (path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|begin_of_text|>"], "do_sample": True, "temperature": 0.6, "top_p": 0.9,
        "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]}, indent=2))
    return ids


def tiny_hf_config(*, tie_word_embeddings: bool = False, num_layers: int = 2):
    """The transformers LlamaConfig of the tiny model. initializer_range 0.2 (not HF's 0.02) makes
    logits peaked enough that greedy decoding is varied and not a near-tie everywhere."""
    from transformers import LlamaConfig

    tok_ids = special_ids(build_tokenizer())
    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=500000.0, initializer_range=0.2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        bos_token_id=tok_ids["<|begin_of_text|>"], eos_token_id=tok_ids["<|end_of_text|>"],
        tie_word_embeddings=tie_word_embeddings)


def _shard_size_for(state_dict: dict, shards: int) -> int:
    """The max_shard_size for which transformers' sharding (huggingface_hub's next-fit, monotone in
    the size) gives exactly `shards` files; binary search over the byte size."""
    from huggingface_hub import split_torch_state_dict_into_shards

    def count(size: int) -> int:
        return len(split_torch_state_dict_into_shards(state_dict, max_shard_size=size).filename_to_tensors)

    lo, hi = 1, sum(t.numel() * t.element_size() for t in state_dict.values())
    while lo < hi:  # smallest size giving at most `shards` files
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if count(mid) <= shards else (mid + 1, hi)
    if count(lo) != shards:
        raise ValueError(f"cannot split this state dict into exactly {shards} shards")
    return lo


def write_tiny_llama(path, *, tie_word_embeddings: bool = False, shards: int = 2, num_layers: int = 2,
                     seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write a random tiny Llama 3.1 checkpoint directory and return its path."""
    from transformers import LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_hf_config(tie_word_embeddings=tie_word_embeddings,
                                            num_layers=num_layers)).to(dtype).eval()
    kwargs = {}
    if shards > 1:
        kwargs["max_shard_size"] = _shard_size_for(model.state_dict(), shards)
    model.save_pretrained(path, **kwargs)
    _write_tokenizer_files(path, build_tokenizer())
    n = len(list(path.glob("*.safetensors")))
    assert n == shards, f"wrote {n} safetensors files, wanted {shards}"
    return path


def write_big_random_checkpoint(path, approx_bytes: int = 256 << 20, *, dtype: torch.dtype = torch.float32,
                                shards: int = 2, seed: int = 0) -> Path:
    """A Llama checkpoint of about `approx_bytes` of random weights, written directly with
    safetensors (hidden 1024, 8 heads of 128, intermediate 4096, as many layers as fit)."""
    from safetensors.torch import save_file

    from llama_aot.compiler.checkpoint import expected_shapes, model_config_from_hf

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_layer = (4 * 1024 * 1024 + 3 * 1024 * 4096 + 2 * 1024) * itemsize
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB_SIZE,
          "hidden_size": 1024, "intermediate_size": 4096,
          "num_hidden_layers": max(1, round(approx_bytes / per_layer)), "num_attention_heads": 8,
          "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 512,
          "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
          "torch_dtype": str(dtype).removeprefix("torch.")}
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    ids = _write_tokenizer_files(path, build_tokenizer())
    shapes = expected_shapes(model_config_from_hf(hf, {"eos_token_id": ids["<|eot_id|>"]}))
    gen = torch.Generator().manual_seed(seed)
    names = list(shapes)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        part = {n: (torch.randn(shapes[n], generator=gen) * 0.02).to(dtype)
                for n in names[s * per_shard:(s + 1) * per_shard]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
        del part
    if shards > 1:
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return path
