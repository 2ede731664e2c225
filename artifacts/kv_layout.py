"""The paged KV cache's layout, which the compiled program, the runtime and the benchmarks share.

The cache is one tensor, `[num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]`,
a graph input that the program updates in place, so the runtime owns its memory and its size. A
token's slot is `block * block_size + offset` where `block` is the sequence's `position //
block_size`-th block; block 0 is reserved for padding tokens and no sequence reads it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llama_aot.artifacts.config import BuildConfig, ModelConfig, torch_dtype


def slot_of(block_table, position: int, block_size: int) -> int:
    """The cache slot of the token at `position` of a sequence whose blocks are `block_table`."""
    return block_table[position // block_size] * block_size + position % block_size


@dataclass(frozen=True)
class KVCacheLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str

    @classmethod
    def of(cls, model: ModelConfig, build: BuildConfig, whole: bool = False) -> "KVCacheLayout":
        """One rank's cache: with --tp N each rank holds N-th of the key/value heads. `whole`: the
        unsharded model's, which the build exports and calibrates before sharding."""
        heads = model.num_kv_heads if whole else model.num_kv_heads // build.tp
        return cls(model.num_layers, heads, model.head_dim, build.block_size, build.kv_dtype)

    @classmethod
    def draft_of(cls, model: ModelConfig, build: BuildConfig) -> "KVCacheLayout":
        """An EAGLE draft program's cache: one layer with the target's key/value heads (the build
        checks the head has them), in the model dtype (the draft is never quantized). It shares
        the target's block ids, so it has as many blocks."""
        return cls(1, model.num_kv_heads // build.tp, model.head_dim, build.block_size, build.dtype)

    def shape(self, num_blocks: int) -> tuple[int, ...]:
        return (self.num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def block_bytes(self) -> int:
        """Bytes one block takes across every layer, K and V."""
        return (self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim
                * self.torch_dtype.itemsize)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, num_blocks: int, device: torch.device | str) -> torch.Tensor:
        return torch.zeros(self.shape(num_blocks), dtype=self.torch_dtype, device=device)
