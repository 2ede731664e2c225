"""BlockManager: reference counts, the reserved block, prefix-cache hits by hash chain, LRU eviction,
and the stats the server reports."""
import hashlib

import pytest

from llama_aot.runtime.block_manager import BlockManager, block_key
from llama_aot.runtime.sequence import Sequence

BS = 16


def seq(tokens, max_new=16):
    return Sequence(f"r{id(tokens)}", list(tokens), len(tokens) + max_new)


def computed(bm, s):
    """Allocate `s`, pretend its known tokens were computed, and register its full blocks."""
    cached = bm.allocate(s)
    s.num_computed_tokens = s.num_tokens
    bm.commit_full_blocks(s)
    return cached


def test_block_key_is_a_sha256_chain():
    k0 = block_key(b"", [1, 2, 3])
    assert k0 == hashlib.sha256((1).to_bytes(8, "little") + (2).to_bytes(8, "little")
                                + (3).to_bytes(8, "little")).digest()
    assert block_key(k0, [4]) != block_key(b"", [4])


def test_block_zero_is_never_handed_out():
    bm = BlockManager(num_blocks=5, block_size=4)
    assert bm.num_free_blocks == 4 and bm.num_used_blocks == 0 and bm.usage == 0.0
    s = seq(range(16))
    assert bm.blocks_needed(s) == 4
    bm.allocate(s)
    assert sorted(s.block_table) == [1, 2, 3, 4]
    assert bm.num_free_blocks == 0 and bm.usage == 1.0
    assert not bm.ensure_capacity(s, 17)
    assert len(s.block_table) == 4


def test_ref_counts_follow_sharing():
    bm = BlockManager(num_blocks=32, block_size=BS)
    prefix = list(range(100, 148))                      # three full blocks
    a, b = seq(prefix + [1]), seq(prefix + [2, 3])
    assert computed(bm, a) == 0
    assert computed(bm, b) == 48
    shared = a.block_table[:3]
    assert b.block_table[:3] == shared
    assert all(bm.ref_count(x) == 2 for x in shared)
    assert bm.ref_count(a.block_table[3]) == 1 and bm.ref_count(b.block_table[3]) == 1
    assert bm.num_used_blocks == 5
    bm.free(a)
    assert a.block_table == [] and all(bm.ref_count(x) == 1 for x in shared)
    assert bm.num_used_blocks == 4
    bm.free(b)
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 31
    assert bm.num_cached_blocks == 3                    # kept for later hits, evictable


def test_prefix_hit_on_shared_200_token_prefix():
    bm = BlockManager(num_blocks=64, block_size=BS)
    prefix = [(7 * i) % 1000 for i in range(200)]
    a, b = seq(prefix + [1, 2, 3]), seq(prefix + [9] * 40)
    assert computed(bm, a) == 0
    cached = bm.allocate(b)
    assert cached == 192                                # 12 full blocks of the shared 200 tokens
    assert b.block_table[:12] == a.block_table[:12]
    assert b.block_table[12] != a.block_table[12]
    assert bm.prefix_queries == 203 + 240 and bm.prefix_hits == 192
    assert bm.prefix_hit_rate == pytest.approx(192 / 443)


def test_fully_cached_prompt_still_computes_its_last_block():
    """The last token's K/V must be written to produce logits, so its block is never reused."""
    bm = BlockManager(num_blocks=16, block_size=BS)
    prompt = list(range(32))
    a = seq(prompt)
    computed(bm, a)
    b = seq(prompt)
    assert bm.allocate(b) == 16
    assert b.block_table[0] == a.block_table[0]
    fresh = b.block_table[1]
    assert fresh != a.block_table[1] and bm.ref_count(fresh) == 1 and not bm.is_cached(fresh)


def test_partial_block_is_not_cached_until_full():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = seq(range(20), max_new=20)
    bm.allocate(a)
    a.num_computed_tokens = 20
    bm.commit_full_blocks(a)
    assert bm.num_cached_blocks == 1
    a.output_token_ids += [5] * 12                      # decode fills the second block
    assert bm.ensure_capacity(a, a.num_tokens)
    a.num_computed_tokens = 32
    bm.commit_full_blocks(a)
    assert bm.num_cached_blocks == 2
    b = seq(a.token_ids + [1])
    assert bm.allocate(b) == 32                         # output tokens are cached too


def test_lru_eviction_order_and_tail_first_release():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b, c = seq([1] * 4 + [0]), seq([2] * 4 + [0]), seq([3] * 8 + [0])
    for s in (a, b, c):
        computed(bm, s)
    a0, b0, (c0, c1) = a.block_table[0], b.block_table[0], c.block_table[:2]
    for s in (a, b, c):
        bm.free(s)
    assert bm.num_free_blocks == 7 and bm.num_cached_blocks == 4

    probes = [seq([0] * 12)]
    bm.allocate(probes[-1])                             # truly free blocks go first
    assert all(bm.is_cached(x) for x in (a0, b0, c0, c1))
    evicted_in_order = []
    for _ in range(3):
        probes.append(seq([0] * 4))
        bm.allocate(probes[-1])
        evicted_in_order += [x for x in (a0, b0, c0, c1) if not bm.is_cached(x)
                             and x not in evicted_in_order]
    assert evicted_in_order == [a0, b0, c1]             # released order; c's tail before its head
    assert bm.num_cached_blocks == 1
    for p in probes:
        bm.free(p)
    assert bm.allocate(seq([3] * 4 + [0])) == 4
    assert bm.allocate(seq([1] * 4 + [0])) == 0


def test_a_hit_refreshes_a_blocks_recency():
    bm = BlockManager(num_blocks=6, block_size=4)
    a, b = seq([1] * 4 + [0]), seq([2] * 4 + [0])
    computed(bm, a)
    computed(bm, b)
    a0, b0 = a.block_table[0], b.block_table[0]
    bm.free(a)
    bm.free(b)                                          # LRU: a's block, then b's
    again = seq([1] * 4 + [7])
    assert bm.allocate(again) == 4 and again.block_table[0] == a0
    bm.free(again)                                      # LRU: b's block, then a's
    bm.allocate(seq([0] * 16))                          # three free blocks and one eviction
    assert bm.is_cached(a0) and not bm.is_cached(b0)


def test_duplicate_blocks_computed_concurrently():
    """Two sequences compute the same block at once: one copy is canonical, the other is freed
    normally, and nothing is lost or double-counted."""
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = seq([5] * 8 + [1]), seq([5] * 8 + [2])
    bm.allocate(a)
    bm.allocate(b)
    for s in (a, b):
        s.num_computed_tokens = s.num_tokens
        bm.commit_full_blocks(s)
    assert bm.num_cached_blocks == 2
    assert all(bm.is_cached(x) for x in a.block_table[:2])
    assert not any(bm.is_cached(x) for x in b.block_table[:2])
    bm.free(a)
    bm.free(b)
    assert bm.num_used_blocks == 0 and bm.num_cached_blocks == 2 and bm.num_free_blocks == 7


def test_ensure_capacity_is_all_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(range(4), max_new=20)
    bm.allocate(s)
    assert not bm.ensure_capacity(s, 17)
    assert len(s.block_table) == 1 and bm.num_free_blocks == 2
    assert bm.ensure_capacity(s, 12) and len(s.block_table) == 3


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    a, b = seq(range(12)), seq(range(12))
    assert computed(bm, a) == 0 and computed(bm, b) == 0
    assert bm.num_cached_blocks == 0 and bm.prefix_hit_rate == 0.0
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 15


def test_allocate_refuses_when_full():
    bm = BlockManager(num_blocks=3, block_size=4)
    with pytest.raises(RuntimeError, match="free blocks"):
        bm.allocate(seq(range(9)))
