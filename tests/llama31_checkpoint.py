"""Tiny random Llama 3.1 checkpoints with the real Llama 3 tokenizer (a helper, not a test file).

`write_llama31_checkpoint` writes what a Hugging Face Llama-3.1-Instruct directory holds, at toy size:
- a random transformers LlamaForCausalLM with Llama 3.1's shape in miniature (hidden 64, 4 query
  heads and 2 KV heads of 16, llama3 RoPE scaling with 3.1's parameters, untied embeddings) and its
  real vocabulary of 128256, saved in bfloat16 like the real checkpoint: about 33 MB, nearly all of
  it the two 128256 x 64 embedding matrices;
- tokenizer.json converted from Meta's tiktoken file in the `llama-models` package
  (`llama3/tokenizer.model`) with transformers' TikTokenConverter, plus the 256 special tokens that
  Meta's `Tokenizer` class defines, in its order, so ids match Meta's (<|begin_of_text|> 128000,
  <|eom_id|> 128008, <|eot_id|> 128009, <|python_tag|> 128010). Meta's list names 128005 and 128011
  <|step_id|> and <|image|> where the 3.1 release on the Hub has reserved tokens; chat never uses them;
- tokenizer_config.json with the official Llama 3.1 Instruct chat template (tool calling included),
  bos <|begin_of_text|> and eos <|eot_id|>; `clean_up_tokenization_spaces` is false, the fix for the
  3.1 release's true, which makes transformers drop spaces before punctuation when decoding;
- generation_config.json with 3.1's sampling defaults and eos ids [128001, 128008, 128009].

The converted tokenizer (bench/llama3_tokenizer.py) takes a couple of seconds, so it is built once per
process.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from llama_aot.bench.llama3_tokenizer import (BOS_ID, LLAMA31_CHAT_TEMPLATE, VOCAB_SIZE,  # noqa: F401
                                             llama3_tokenizer_json, llama31_tokenizer_config,
                                             meta_tokenizer_path)

EOS_IDS = [128001, 128008, 128009]  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}



def write_llama31_checkpoint(path, num_layers: int = 2, seed: int = 0,
                             dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the tiny Llama 3.1 Instruct checkpoint directory and return its path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=224, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=dict(ROPE_SCALING),
        # 0.2, not HF's 0.02: peaked logits, so greedy decoding is not a near-tie everywhere.
        initializer_range=0.2, bos_token_id=BOS_ID, eos_token_id=list(EOS_IDS), tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(dtype).eval().save_pretrained(path)
    (path / "tokenizer.json").write_text(llama3_tokenizer_json(), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(llama31_tokenizer_config(), encoding="utf-8")
    (path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": BOS_ID, "do_sample": True, "eos_token_id": list(EOS_IDS), "temperature": 0.6,
        "top_p": 0.9}, indent=2) + "\n", encoding="utf-8")
    return path
