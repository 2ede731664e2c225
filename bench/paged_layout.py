"""Step inputs over scattered cache blocks, for the kernel tests and bench/attention.py.

`blocks_for(seqs, block_size)` sizes a cache for `seqs`, each `(cached prefix, new tokens)`, with
block 0 left unused as the runtime leaves it; `scattered_step` then gives each sequence enough
blocks, drawn from a random permutation of the others, so block tables are neither contiguous nor
ordered, and returns `build_step_inputs` for one step that adds the new tokens."""
import torch

from llama_aot.artifacts.step_abi import SequenceChunk, build_step_inputs


def _blocks(start: int, n: int, block_size: int) -> int:
    """Blocks a sequence with `start` cached tokens needs once `n` more are added."""
    return -(-(start + n) // block_size)


def blocks_for(seqs: list[tuple[int, int]], block_size: int) -> int:
    return 2 + sum(_blocks(start, n, block_size) for start, n in seqs)


def scattered_step(seqs: list[tuple[int, int]], block_size: int, num_blocks: int, gen: torch.Generator,
                   device) -> dict[str, torch.Tensor]:
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    chunks, used = [], 0
    for start, n in seqs:
        blocks = _blocks(start, n, block_size)
        chunks.append(SequenceChunk(tuple(range(n)), start, tuple(perm[used:used + blocks])))
        used += blocks
    return build_step_inputs(chunks, block_size, device)
