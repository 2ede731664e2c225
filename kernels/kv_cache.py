"""Writing this step's keys and values into the paged KV cache.

The cache is one tensor, `[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`, passed
to the program as an input and updated in place, so the runtime owns its memory and its size. A
token's slot is `block * block_size + offset`; the runtime points padding tokens at a reserved
block that no sequence reads.
"""
import torch
from torch.library import triton_op


def write_kv_reference(kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
                       slots: torch.Tensor) -> None:
    """One `index_put_` on the cache tensor itself, keys and values together.

    Indexing the base tensor (not a reshaped view of it) matters: functionalization turns a write
    through a view into "copy the whole cache, scatter, copy back", which Inductor cannot undo, and
    every step would then copy the entire KV cache once per layer."""
    block_size = kv_cache.shape[3]
    blocks, offsets = slots // block_size, slots % block_size
    half = torch.cat([torch.zeros_like(slots), torch.ones_like(slots)])
    index = (torch.full_like(half, layer), half, torch.cat([blocks, blocks]), torch.cat([offsets, offsets]))
    kv_cache.index_put_(index, torch.cat([k, v]).to(kv_cache.dtype))


@triton_op("llama_aot::write_kv", mutates_args={"kv_cache"})
def write_kv(kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    write_kv_reference(kv_cache, layer, k, v, slots)
