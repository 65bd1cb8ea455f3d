"""BlockManager: allocation, ref counts, prefix caching, eviction, collision safety."""

from __future__ import annotations

import pytest

from kubellm.engine.block_manager import BlockManager
from kubellm.engine.sequence import Sequence
from kubellm.protocol.messages import SamplingParams

BS = 4


def make_seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence.new(rid, tokens, SamplingParams(max_tokens=8))


def admit(bm: BlockManager, seq: Sequence) -> int:
    """Admit seq like the scheduler does (whole prompt at once); returns the cached tokens."""
    hits = bm.find_cached_blocks(seq)
    assert bm.can_allocate(hits, seq.num_tokens)
    cached = bm.take_cached_blocks(seq, hits)
    assert bm.allocate_slots(seq, seq.num_tokens)
    return cached


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """Pretend the model computed every token of seq and register its full blocks."""
    before = seq.num_computed_tokens
    seq.num_computed_tokens = seq.num_tokens
    bm.register_full_blocks(seq, before)


def test_allocate_free_and_ref_counts() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(list(range(10)))
    assert bm.allocate_slots(seq, 10)
    assert len(seq.block_ids) == 3
    assert len(set(seq.block_ids)) == 3
    assert all(bm.ref_count(b) == 1 for b in seq.block_ids)
    assert bm.num_free_blocks == 5
    assert bm.usage == pytest.approx(3 / 8)
    # growing within the last block allocates nothing; crossing it allocates one more
    assert bm.allocate_slots(seq, 12)
    assert len(seq.block_ids) == 3
    assert bm.allocate_slots(seq, 13)
    assert len(seq.block_ids) == 4
    blocks = list(seq.block_ids)
    bm.free(seq)
    assert seq.block_ids == []
    assert bm.num_free_blocks == 8
    assert bm.usage == 0.0
    assert all(bm.ref_count(b) == 0 for b in blocks)


def test_allocation_fails_atomically_when_short() -> None:
    bm = BlockManager(num_blocks=3, block_size=BS)
    a, b = make_seq(list(range(8)), "a"), make_seq(list(range(8)), "b")
    assert bm.allocate_slots(a, 8)
    assert not bm.allocate_slots(b, 8)
    assert b.block_ids == []
    assert bm.num_free_blocks == 1


def test_prefix_hit_shares_blocks() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    prompt = list(range(100, 110))  # 2 full blocks + 2 tokens
    a = make_seq(prompt, "a")
    assert admit(bm, a) == 0
    compute_all(bm, a)
    b = make_seq(prompt, "b")
    assert admit(bm, b) == 2 * BS
    assert b.num_computed_tokens == 2 * BS
    assert b.block_ids[:2] == a.block_ids[:2]
    assert b.block_ids[2] != a.block_ids[2]
    assert [bm.ref_count(x) for x in a.block_ids] == [2, 2, 1]
    assert bm.prefix_queries == 20
    assert bm.prefix_hits == 8
    # freeing one sharer keeps the blocks for the other
    bm.free(a)
    assert [bm.ref_count(x) for x in b.block_ids] == [1, 1, 1]


def test_last_token_is_never_a_hit() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    prompt = list(range(2 * BS))  # exactly two full blocks
    a = make_seq(prompt, "a")
    admit(bm, a)
    compute_all(bm, a)
    b = make_seq(prompt, "b")
    # the block with the last token is recomputed, so the step has a token to sample from
    assert admit(bm, b) == BS
    assert b.num_computed_tokens < b.num_tokens


def test_no_hit_across_different_prefixes() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a")
    admit(bm, a)
    compute_all(bm, a)
    # same second block, different first block: the chained hash differs
    b = make_seq([9, 9, 9, 9, 5, 6, 7, 8, 9], "b")
    assert bm.find_cached_blocks(b) == []
    # same first block only: one block hits
    c = make_seq([1, 2, 3, 4, 0, 0, 0, 0, 0], "c")
    assert bm.find_cached_blocks(c) == a.block_ids[:1]


def test_colliding_hash_with_other_tokens_is_no_hit() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS, hash_fn=lambda parent, tokens: 0)
    a = make_seq([1, 2, 3, 4, 0], "a")
    admit(bm, a)
    compute_all(bm, a)
    assert bm.find_cached_blocks(make_seq([1, 2, 3, 4, 9], "same")) == a.block_ids[:1]
    # every block hashes to 0, yet different tokens never hit
    assert bm.find_cached_blocks(make_seq([9, 9, 9, 9, 0], "b")) == []


def test_colliding_chain_with_other_prefix_is_no_hit() -> None:
    # a hash that ignores the parent: block 1 of a and c collide although their prefixes differ
    bm = BlockManager(num_blocks=16, block_size=BS, hash_fn=lambda parent, tokens: hash(tokens))
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 0], "a")
    admit(bm, a)
    compute_all(bm, a)
    c = make_seq([9, 9, 9, 9, 5, 6, 7, 8, 0], "c")
    admit(bm, c)
    compute_all(bm, c)
    # d's block 0 is a's, but the block registered for [5, 6, 7, 8] now is c's, whose K/V were
    # computed after [9, 9, 9, 9]: it must not be reused
    d = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 0], "d")
    assert bm.find_cached_blocks(d) == a.block_ids[:1]


def test_freed_blocks_stay_cached_until_evicted_lru() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(list(range(9)), "a")  # 3 blocks, 2 full
    admit(bm, a)
    compute_all(bm, a)
    a_blocks = list(a.block_ids)
    bm.free(a)
    assert bm.num_free_blocks == 4
    assert bm.num_cached_free_blocks == 2
    # a fresh allocation prefers blocks without a hash
    x = make_seq([50] * 8, "x")
    assert bm.allocate_slots(x, 2 * BS)
    assert not set(x.block_ids) & set(a_blocks[:2])
    assert bm.num_cached_free_blocks == 2
    # the cached prefix is still found
    b = make_seq(list(range(9)), "b")
    assert bm.find_cached_blocks(b) == a_blocks[:2]
    # under pressure the least recently freed cached block (the tail) is evicted first
    assert bm.allocate_slots(x, 3 * BS)
    assert x.block_ids[2] == a_blocks[1]
    assert bm.block_hash(a_blocks[1]) is None
    assert bm.find_cached_blocks(b) == a_blocks[:1]
    assert bm.allocate_slots(x, 4 * BS)
    assert bm.find_cached_blocks(b) == []
    assert bm.num_free_blocks == 0


def test_reviving_a_cached_free_block_counts_against_capacity() -> None:
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = make_seq(list(range(9)), "a")
    admit(bm, a)
    compute_all(bm, a)
    bm.free(a)
    b = make_seq(list(range(9)), "b")
    hits = bm.find_cached_blocks(b)
    assert len(hits) == 2
    assert bm.can_allocate(hits, 9)
    assert not bm.can_allocate(hits, 13)  # 2 revived + 2 new > 3
    bm.take_cached_blocks(b, hits)
    assert bm.num_free_blocks == 1
    assert bm.num_cached_free_blocks == 0


def test_blocks_filled_by_decode_are_registered() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq([7, 7, 7], "a")
    admit(bm, a)
    compute_all(bm, a)
    for t in (8, 9):  # decode two tokens: the first block becomes full and computed
        a.token_ids.append(t)
        assert bm.allocate_slots(a, a.num_tokens)
        compute_all(bm, a)
    b = make_seq([7, 7, 7, 8, 9], "b")
    assert bm.find_cached_blocks(b) == a.block_ids[:1]


def test_reset_prefix_cache_and_disabled_caching() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(list(range(9)), "a")
    admit(bm, a)
    compute_all(bm, a)
    assert bm.reset_prefix_cache()
    assert bm.find_cached_blocks(make_seq(list(range(9)), "b")) == []
    bm.free(a)
    assert bm.num_cached_free_blocks == 0
    assert bm.num_free_blocks == 8

    off = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    c = make_seq(list(range(9)), "c")
    admit(off, c)
    compute_all(off, c)
    assert off.find_cached_blocks(make_seq(list(range(9)), "d")) == []
    assert off.prefix_queries == 0


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=BS)
