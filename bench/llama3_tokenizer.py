"""Meta's Llama 3 tokenizer as a Hugging Face tokenizer.json, built from the tiktoken file in the
`llama-models` package: tests use it as the reference tokenizer, and GPU benchmarks ship it in
random-weight checkpoints so that prompt lengths are counted in real Llama 3 tokens (the GPU
machine cannot download the Hub's copy).
"""
from __future__ import annotations

import functools
from pathlib import Path

VOCAB_SIZE = 128256
BOS_ID = 128000


def meta_tokenizer_path() -> Path:
    """Meta's Llama 3 tiktoken file, shipped inside the llama-models package."""
    import llama_models.llama3

    return Path(llama_models.llama3.__file__).parent / "tokenizer.model"


@functools.lru_cache(maxsize=1)
def llama3_tokenizer_json() -> str:
    """tokenizer.json for Meta's tokenizer: byte-level BPE over its ranks, split by its regex, with
    its special tokens, and the post-processor of the Hub's Llama 3 tokenizer.json (which prepends
    <|begin_of_text|> when asked to add special tokens)."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    meta = MetaTokenizer(meta_tokenizer_path())
    specials = sorted(meta.special_tokens, key=meta.special_tokens.get)
    tok = TikTokenConverter(vocab_file=str(meta_tokenizer_path()), pattern=MetaTokenizer.pat_str,
                            extra_special_tokens=specials).converted()
    assert tok.get_vocab_size() == VOCAB_SIZE and tok.token_to_id("<|eot_id|>") == meta.eot_id
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                      special_tokens=[(bos, BOS_ID)]),
    ])
    return tok.to_str()
