"""The paged KV cache's bookkeeping: which cache blocks each sequence owns, and which blocks hold a
known token prefix that a new sequence can reuse instead of recomputing.

Pure Python and tensor-free: the cache itself is a tensor the engine owns, indexed by the block ids
handed out here. Block 0 is never handed out: the runtime points padding tokens' K/V writes at it,
so it holds garbage by design.

Prefix caching works on full blocks only. A full block's key chains its tokens to the key of the
block before it, so equal keys mean equal whole prefixes, not merely equal blocks. Keys are SHA-256
digests: the cache is shared by every request, and with a 64-bit hash a crafted or unlucky prompt
could collide with another user's prefix and be served their K/V. SHA-256 makes that infeasible, so
matching needs no token comparison. A block is registered when it becomes full *and* computed
(`commit_full_blocks`), never earlier, so a hit always points at K/V that was written.

A block referenced by nobody but still registered stays cached and is evicted only when a free
block is needed, least recently released first. A sequence releases its blocks tail first, so its
prefix blocks, which any later hit needs first, are evicted last.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from llama_aot.runtime.sequence import Sequence


def block_key(parent: bytes, tokens: list[int]) -> bytes:
    """The prefix-cache key of a full block: SHA-256 over the parent block's key and the tokens as
    little-endian int64 (token ids are vocabulary indices, far inside int64)."""
    data = array("q", tokens)
    if data.itemsize != 8:
        raise RuntimeError("array('q') is not 64-bit on this platform")
    return hashlib.sha256(parent + data.tobytes()).digest()


class BlockManager:
    """Reference-counted cache blocks with a free list and an LRU of cached, unreferenced blocks.

    `num_free_blocks` counts both truly free and evictable blocks: either can be handed out."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"num_blocks {num_blocks}: need at least 2 (block 0 is reserved)")
        if block_size < 1:
            raise ValueError(f"block_size {block_size}: must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._key: list[bytes | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[bytes, int] = {}
        self.prefix_queries = 0
        self.prefix_hits = 0

    # -- stats -----------------------------------------------------------------------------------

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, referenced or not."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_usable_blocks

    @property
    def prefix_hit_rate(self) -> float:
        """Prompt tokens served from the cache over prompt tokens looked up, at every admission."""
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def is_cached(self, block_id: int) -> bool:
        """Whether the block is registered in the prefix cache (and so must never be written)."""
        key = self._key[block_id]
        return key is not None and self._cached.get(key) == block_id

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- admission -------------------------------------------------------------------------------

    def blocks_needed(self, seq: Sequence) -> int:
        """Free blocks that `allocate(seq)` would consume: new blocks for the uncached tokens, plus
        cached hits that nobody references (reusing them takes them off the evictable list)."""
        hits = self._match_prefix(seq)
        idle_hits = sum(1 for b in hits if self._ref[b] == 0)
        return self.blocks_for(seq.num_tokens) - len(hits) + idle_hits

    def allocate(self, seq: Sequence) -> int:
        """Give a sequence without blocks a block table covering all its known tokens, reusing the
        longest cached prefix. Returns the number of tokens served from the cache: the caller
        starts computing there. Raises RuntimeError if the blocks are not free (check
        `blocks_needed` first)."""
        if seq.block_table:
            raise RuntimeError(f"{seq} already has blocks")
        need = self.blocks_needed(seq)
        if need > self.num_free_blocks:
            raise RuntimeError(f"{seq} needs {need} free blocks, {self.num_free_blocks} are free")
        hits = self._match_prefix(seq)
        for b in hits:
            if self._ref[b] == 0:
                del self._evictable[b]
            self._ref[b] += 1
        table = list(hits)
        for _ in range(self.blocks_for(seq.num_tokens) - len(hits)):
            table.append(self._take_block())
        seq.block_table = table
        cached = len(hits) * self.block_size
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += cached
        return cached

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks that hold `seq`'s leading full blocks, up to the first miss.

        The block holding the last known token is never matched even when it is cached: that
        token must be computed to produce the logits of the next one, and its K/V write would
        land in a block that other sequences read. Recomputing that one block is the price."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            block = self._cached.get(self._seq_key(seq, i))
            if block is None:
                break
            hits.append(block)
        return hits

    def _seq_key(self, seq: Sequence, i: int) -> bytes:
        """The key of `seq`'s i-th full block, memoised on the sequence: full blocks never change,
        and a waiting sequence is matched again at every step until it is admitted."""
        while len(seq.block_hashes) <= i:
            j = len(seq.block_hashes)
            parent = seq.block_hashes[j - 1] if j else b""
            bs = self.block_size
            seq.block_hashes.append(block_key(parent, seq.tokens(j * bs, (j + 1) * bs)))
        return seq.block_hashes[i]

    # -- growth ----------------------------------------------------------------------------------

    def ensure_capacity(self, seq: Sequence, num_tokens: int) -> bool:
        """Append blocks until the table holds `num_tokens` tokens. All or nothing: returns False,
        allocating nothing, when too few blocks are free."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            seq.block_table.append(self._take_block())
        return True

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Register every block of `seq` that is full of computed tokens and not yet registered.

        If an equal block is already cached (two sequences computed the same prefix at once), the
        existing one stays canonical; this one keeps its key and may take over the entry when it is
        released after the other was evicted."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        first = full
        while first > 0 and self._key[seq.block_table[first - 1]] is None:
            first -= 1
        for i in range(first, full):
            block, key = seq.block_table[i], self._seq_key(seq, i)
            self._key[block] = key
            self._cached.setdefault(key, block)

    # -- release ---------------------------------------------------------------------------------

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references, tail first, and empty its block table. Registered blocks
        nobody else references become evictable; the rest become free."""
        for block in reversed(seq.block_table):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                self._release(block)
        seq.block_table = []

    def _release(self, block: int) -> None:
        key = self._key[block]
        if key is not None and self._cached.setdefault(key, block) == block:
            self._evictable[block] = None
            return
        self._key[block] = None
        self._free.append(block)

    def _take_block(self) -> int:
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._key[block]]
            self._key[block] = None
        else:
            raise RuntimeError("no free KV cache block")
        self._ref[block] = 1
        return block
