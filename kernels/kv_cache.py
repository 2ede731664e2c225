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
    """One index_copy_ for keys and values together: rows are addressed in the flattened cache."""
    num_layers, _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    per_half = num_blocks * block_size
    rows = torch.cat([slots + (2 * layer) * per_half, slots + (2 * layer + 1) * per_half])
    kv_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, rows, torch.cat([k, v]).to(kv_cache.dtype))


@triton_op("llama_aot::write_kv", mutates_args={"kv_cache"})
def write_kv(kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    write_kv_reference(kv_cache, layer, k, v, slots)
