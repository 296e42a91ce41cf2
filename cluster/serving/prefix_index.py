"""PrefixIndex: which replica recently saw which prompt prefix — the data structure behind
prefix-affinity routing, kept apart from the policy (cluster/serving/routing_policy.py) and free of
Ray imports so the simulator uses the very same code.

A prompt is cut into blocks of `block_size` tokens; block i's hash chains the hash of block i-1, so
one hash stands for the whole prefix up to the end of its block (as vLLM's prefix cache keys its
blocks). The index maps each hash to the replicas that were sent a prompt holding it, and keeps a
bounded LRU per replica (an approximation of what its KV cache still holds). Because a chained hash
implies all earlier ones, "some replica holds block i" is monotone in i and the longest cached
prefix is found by binary search: O(log blocks) lookups per request, independent of replica count.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Iterable, Sequence


def block_hashes(token_ids: Sequence[int], block_size: int) -> tuple[int, ...]:
    """Chained hashes of the full blocks of `token_ids` (a partial last block is not cached)."""
    hashes = []
    prev = 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        prev = hash((prev, tuple(token_ids[start:start + block_size])))
        hashes.append(prev)
    return tuple(hashes)


class PrefixIndex:
    """Block hash -> replicas that recently received it, with an LRU of `blocks_per_replica` each."""

    def __init__(self, blocks_per_replica: int) -> None:
        self.blocks_per_replica = blocks_per_replica
        self._owners: dict[int, set[Hashable]] = {}
        self._lru: dict[Hashable, OrderedDict[int, None]] = {}

    def insert(self, replica: Hashable, hashes: Sequence[int]) -> None:
        """Record that `replica` now caches the prefix `hashes` (touching it as most recent)."""
        lru = self._lru.setdefault(replica, OrderedDict())
        # Touch the last block first so earlier blocks end up more recent and are evicted later:
        # eviction then trims prefixes from their tail, keeping the chain property.
        for h in reversed(hashes):
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                self._owners.setdefault(h, set()).add(replica)
        while len(lru) > self.blocks_per_replica:
            old, _ = lru.popitem(last=False)
            owners = self._owners.get(old)
            if owners is not None:
                owners.discard(replica)
                if not owners:
                    del self._owners[old]

    def longest_match(self, hashes: Sequence[int]) -> tuple[int, frozenset]:
        """(blocks matched, replicas holding that many) for the longest cached prefix of `hashes`."""
        lo, hi = 0, len(hashes)  # invariant: some replica holds hashes[:lo]; none holds hashes[:hi+1]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if hashes[mid - 1] in self._owners:
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            return 0, frozenset()
        return lo, frozenset(self._owners[hashes[lo - 1]])

    def remove_replica(self, replica: Hashable) -> None:
        for h in self._lru.pop(replica, ()):
            owners = self._owners.get(h)
            if owners is not None:
                owners.discard(replica)
                if not owners:
                    del self._owners[h]

    def retain(self, replicas: Iterable[Hashable]) -> None:
        """Forget every replica not in `replicas` (after the replica set changed)."""
        keep = set(replicas)
        for replica in [r for r in self._lru if r not in keep]:
            self.remove_replica(replica)

    def blocks(self, replica: Hashable) -> int:
        return len(self._lru.get(replica, ()))
