"""Automatic prefix caching: KV blocks of shared prompt prefixes, reused across requests and evicted LRU.

vLLM V1 hashes each full KV block of a prompt (chained with the blocks before it) and keeps freed blocks in a free
queue ordered by when they were freed: a new request reuses the longest run of leading blocks still cached, and
allocation takes the least recently freed block, dropping its hash. SGLang's radix cache does the same per token.
Here a block is named by its prefix group and index (requests of a group start with the same tokens), blocks in
use are shared (counted once in the KV pool), and idle cached blocks occupy free KV memory until an allocation
needs it. A hit skips the prefill of the cached tokens; the rest of the prompt still attends to them.
"""

from __future__ import annotations

from collections import OrderedDict

# Block names: group * GROUP_STRIDE + block index (an int key is cheaper to hash than a tuple).
GROUP_STRIDE = 1 << 32


class PrefixCache:
    """Cached prefix blocks of one engine instance: referenced ones count once, idle ones are evicted LRU."""

    __slots__ = ("block_tokens", "capacity_blocks", "hit_tokens", "idle", "looked_up_tokens", "refs")

    def __init__(self, capacity_blocks: int, block_tokens: int) -> None:
        self.capacity_blocks = capacity_blocks
        self.block_tokens = block_tokens
        # Blocks some request holds, with how many hold them.
        self.refs: dict[int, int] = {}
        # Blocks no request holds, least recently freed first (the next to evict).
        self.idle: OrderedDict[int, None] = OrderedDict()
        self.hit_tokens = 0
        self.looked_up_tokens = 0

    @property
    def cached_blocks(self) -> int:
        """Blocks whose contents the cache knows (held or idle)."""
        return len(self.refs) + len(self.idle)

    @property
    def idle_tokens(self) -> int:
        """KV tokens that idle cached blocks occupy (free to the allocator, at the cost of their contents)."""
        return len(self.idle) * self.block_tokens

    @staticmethod
    def key(group: int, index: int) -> int:
        """Name of block ``index`` of prefix group ``group``."""
        return group * GROUP_STRIDE + index

    def contains(self, key: int) -> bool:
        """Whether the block is cached."""
        return key in self.refs or key in self.idle

    def acquire(self, group: int, max_blocks: int) -> list[int]:
        """Hold the longest run of leading cached blocks of ``group`` (at most ``max_blocks``); returns their keys."""
        keys: list[int] = []
        refs, idle = self.refs, self.idle
        base = group * GROUP_STRIDE
        for index in range(max_blocks):
            key = base + index
            held = refs.get(key)
            if held is not None:
                refs[key] = held + 1
            elif key in idle:
                del idle[key]
                refs[key] = 1
            else:
                break
            keys.append(key)
        return keys

    def add_held(self, key: int) -> bool:
        """Name a block its request just computed, held by that request; False when the name is taken."""
        if key in self.refs or key in self.idle:
            return False
        self.refs[key] = 1
        return True

    def release(self, keys: list[int]) -> int:
        """Drop one hold on each of ``keys`` (given tail first); returns how many blocks became idle."""
        freed = 0
        refs = self.refs
        for key in keys:
            held = refs[key] - 1
            if held:
                refs[key] = held
            else:
                del refs[key]
                self.idle[key] = None
                freed += 1
        return freed

    def add_idle(self, key: int) -> bool:
        """Keep a block its request computed and just freed; False when the name is taken (the copy is dropped)."""
        if key in self.refs or key in self.idle:
            return False
        self.idle[key] = None
        return True

    def warm(self, prefixes: list[tuple[int, int]]) -> int:
        """Hold each (group, tokens) prefix's leading full blocks idle while the cache has room; returns how many."""
        # The first prefix given is the first to evict, each tail first (as freed blocks are): an eviction never
        # leaves a prefix without its leading block.
        added = 0
        for group, tokens in prefixes:
            room = self.capacity_blocks - self.cached_blocks
            for index in reversed(range(min(tokens // self.block_tokens, room))):
                added += self.add_idle(self.key(group, index))
        return added

    def evict(self, blocks: int) -> int:
        """Drop up to ``blocks`` idle blocks, least recently freed first; returns how many went."""
        idle = self.idle
        dropped = min(blocks, len(idle))
        for _ in range(dropped):
            idle.popitem(last=False)
        return dropped
