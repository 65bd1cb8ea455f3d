"""Paged KV block allocation with ref counts and prefix caching. Torch-free.

Blocks are fixed-size pages of the KV cache. A sequence owns `block_ids[i]` for token positions
[i * block_size, (i + 1) * block_size) (see `kubellm.engine.sequence`).

Prefix caching: once a block is full and its K/V computed, it is registered under a chained
hash of (parent block hash, the block's token ids). A later sequence with the same leading
tokens looks its full blocks up in order and shares the cached blocks (ref count + 1) instead
of recomputing them. Freed blocks that carry a hash stay cached and *evictable* (LRU order)
until a new allocation needs them; blocks without a hash are reused first.

Collision safety: a hit also requires the cached block's stored token ids to equal the
sequence's, and the cached block's recorded parent (block id and generation) to be exactly the
block matched for the previous position. By induction the whole prefix matches token for
token, whatever the hash function does.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from collections.abc import Sequence as Seq

from kubellm.engine.sequence import Sequence

logger = logging.getLogger(__name__)

_NO_PARENT = (-1, -1)

HashFn = Callable[[int | None, tuple[int, ...]], int]


def default_block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """Chained hash of one full block (tuples of ints hash deterministically in CPython)."""
    return hash((parent, tokens))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """A pool of `num_blocks` KV blocks of `block_size` tokens each."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        hash_fn: HashFn = default_block_hash,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._hash_fn = hash_fn
        self._ref_counts = [0] * num_blocks
        self._generation = [0] * num_blocks
        """Bumped whenever a block is (re)allocated; identifies one life of its contents."""
        self._hash: list[int | None] = [None] * num_blocks
        self._tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._parent: list[tuple[int, int]] = [_NO_PARENT] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        self._free: deque[int] = deque(range(num_blocks))
        """Free blocks without a hash: reused first."""
        self._evictable: OrderedDict[int, None] = OrderedDict()
        """Free blocks with a hash, least recently freed first."""
        self.prefix_queries = 0
        """Cumulative tokens looked up in the prefix cache."""
        self.prefix_hits = 0
        """Cumulative tokens found in the prefix cache."""

    # ---- capacity -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks not referenced by any sequence (including cached, evictable ones)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by sequences, 0..1."""
        return (self.num_blocks - self.num_free_blocks) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> int | None:
        return self._hash[block_id]

    # ---- prefix cache lookup --------------------------------------------------------------

    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """The chained hashes of seq's first `num_blocks` full blocks (cached on the seq)."""
        hashes = seq.block_hashes
        bs = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(self._hash_fn(parent, tuple(seq.token_ids[i * bs : (i + 1) * bs])))
        return hashes

    def find_cached_blocks(self, seq: Sequence) -> list[int]:
        """Cached blocks holding seq's leading full blocks, in order; changes nothing.

        The block holding seq's last token is never a hit, so that at least one token is
        computed and the step yields logits (and no shared block is ever written to).
        """
        if not self.enable_prefix_caching or seq.num_tokens < 2:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(seq, max_blocks)
        bs = self.block_size
        hits: list[int] = []
        parent = _NO_PARENT
        for i in range(max_blocks):
            block = self._hash_to_block.get(hashes[i])
            if block is None or self._parent[block] != parent:
                break
            if self._tokens[block] != tuple(seq.token_ids[i * bs : (i + 1) * bs]):
                break
            hits.append(block)
            parent = (block, self._generation[block])
        return hits

    def can_allocate(self, cached_blocks: Seq[int], num_tokens: int) -> bool:
        """Whether a sequence without blocks could take `cached_blocks` and then hold
        `num_tokens` tokens."""
        num_new = self.blocks_for(num_tokens) - len(cached_blocks)
        num_revived = sum(1 for b in cached_blocks if self._ref_counts[b] == 0)
        return num_new + num_revived <= self.num_free_blocks

    def take_cached_blocks(self, seq: Sequence, cached_blocks: Seq[int]) -> int:
        """Give seq (which holds no blocks) the prefix hits; returns the cached token count.

        Also counts the lookup in the prefix statistics and sets seq.num_computed_tokens.
        """
        if seq.block_ids:
            raise RuntimeError(f"sequence {seq.request_id!r} already holds blocks")
        for block in cached_blocks:
            if self._ref_counts[block] == 0:
                del self._evictable[block]
            self._ref_counts[block] += 1
        seq.block_ids = list(cached_blocks)
        num_cached = len(cached_blocks) * self.block_size
        seq.num_computed_tokens = num_cached
        if self.enable_prefix_caching:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += num_cached
        return num_cached

    # ---- allocation -----------------------------------------------------------------------

    def _pop_free_block(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            self._uncache(block)
        self._generation[block] += 1
        self._ref_counts[block] = 1
        return block

    def _uncache(self, block: int) -> None:
        h = self._hash[block]
        if h is not None and self._hash_to_block.get(h) == block:
            del self._hash_to_block[h]
        self._hash[block] = None
        self._tokens[block] = None
        self._parent[block] = _NO_PARENT

    def allocate_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Make seq hold blocks for its first `num_tokens` tokens.

        Returns False, allocating nothing, when too few blocks are free.
        """
        needed = self.blocks_for(num_tokens) - len(seq.block_ids)
        if needed <= 0:
            return True
        if needed > self.num_free_blocks:
            return False
        seq.block_ids.extend(self._pop_free_block() for _ in range(needed))
        return True

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks; hashed ones stay cached until reallocated.

        Blocks are released tail first, so that a prefix's tail is evicted before its head.
        """
        for block in reversed(seq.block_ids):
            count = self._ref_counts[block] - 1
            if count < 0:
                raise RuntimeError(f"block {block} freed more often than allocated")
            self._ref_counts[block] = count
            if count == 0:
                if self._hash[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        seq.block_ids = []

    # ---- registration ---------------------------------------------------------------------

    def register_full_blocks(self, seq: Sequence, num_computed_before: int) -> None:
        """Register the blocks that became full (and computed) since `num_computed_before`."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        first = num_computed_before // bs
        # Only blocks whose token ids are all known: with async scheduling, num_computed_tokens
        # may already count a step in flight whose input token is still pending.
        computed = min(seq.num_computed_tokens, seq.num_tokens)
        last = min(computed // bs, len(seq.block_ids))
        if last <= first:
            return
        hashes = self._block_hashes(seq, last)
        for i in range(first, last):
            block = seq.block_ids[i]
            if self._hash[block] is not None:
                continue  # a prefix hit: already registered
            if i == 0:
                parent = _NO_PARENT
            else:
                prev = seq.block_ids[i - 1]
                parent = (prev, self._generation[prev])
            self._hash[block] = hashes[i]
            self._tokens[block] = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            self._parent[block] = parent
            self._hash_to_block[hashes[i]] = block

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; blocks in use stay allocated but are no longer shared."""
        for block in range(self.num_blocks):
            self._uncache(block)
        self._hash_to_block.clear()
        self._free.extend(self._evictable)
        self._evictable.clear()
        logger.info("prefix cache reset")
        return True
