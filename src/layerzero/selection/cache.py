"""Plan caches.

:class:`PlanCache` is the runtime's cache: an insertion-ordered dict whose
current version is read without a lock (a dict read is atomic in CPython),
writes under a lock, eviction past ``capacity`` (oldest first: the hot paths of
``lz.*`` and ``dispatch()`` read ``data`` directly, or :meth:`PlanCache.peek`, and do
not refresh an entry's place; only the checked :meth:`PlanCache.get`, used with a
TTL and on the full path, moves it to the back), optional TTL, and O(1) invalidation by
swapping in a fresh dict (a version bump: readers holding the old version
finish on it).

:class:`MVCCPlanCache` shards the same design N ways so that concurrent
writers (many new shapes at once) do not contend on one lock; invalidation
bumps one version number and every shard is replaced lazily.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from layerzero import forksafe

__all__ = ["PlanCache", "MVCCPlanCache"]


class PlanCache:
    """LRU + TTL cache with lock-free reads.

    Args:
        capacity: most entries kept (0 disables caching).
        ttl_seconds: entries older than this are dropped (``None``: never).
        clock: injectable monotonic clock, for tests.
        on_evict: called with the number of entries evicted.
    """

    __slots__ = ("capacity", "ttl", "clock", "on_evict", "data", "_born", "_lock", "version", "evictions",
                 "_next_sweep", "__weakref__")

    def __init__(self, capacity: int = 10000, ttl_seconds: float | None = None,
                 clock: Callable[[], float] = time.monotonic, on_evict: Callable[[int], None] | None = None) -> None:
        self.capacity = int(capacity)
        self.ttl = ttl_seconds
        self.clock = clock
        self.on_evict = on_evict
        self.data: OrderedDict[Hashable, Any] = OrderedDict()
        self._born: dict[Hashable, float] = {}
        self._lock = forksafe.lock(self)
        self.version = 0
        self.evictions = 0
        self._next_sweep = 0.0

    def __len__(self) -> int:
        return len(self.data)

    def get(self, key: Hashable) -> Any:
        """Checked lookup: honours the TTL and refreshes LRU order. ``None`` on a miss."""
        data = self.data
        value = data.get(key)
        if value is None:
            return None
        if self.ttl is not None:
            born = self._born.get(key)
            if born is not None and self.clock() - born > self.ttl:
                self._expire(key, data)
                return None
        try:
            data.move_to_end(key)
        except KeyError:  # evicted by another thread between the two lines: still a valid hit
            pass
        return value

    def peek(self, key: Hashable) -> Any:
        """The hot paths' read: the entry, its LRU place left as it is (with a TTL: :meth:`get`)."""
        return self.data.get(key) if self.ttl is None else self.get(key)

    def put(self, key: Hashable, value: Any, version: int | None = None) -> None:
        """Store ``value``; with ``version`` (read before the value was computed), only if no
        invalidation happened since, so a plan made under a policy that changed meanwhile is dropped."""
        if self.capacity <= 0:
            return
        evicted = 0
        with self._lock:
            if version is not None and version != self.version:
                return
            data = self.data
            data[key] = value
            data.move_to_end(key)
            if self.ttl is not None:
                now = self.clock()
                self._born[key] = now
                if now >= self._next_sweep:
                    evicted += self._sweep(now)
            while len(data) > self.capacity:
                old, _ = data.popitem(last=False)
                self._born.pop(old, None)
                evicted += 1
            self.evictions += evicted
        if evicted and self.on_evict is not None:
            self.on_evict(evicted)

    def invalidate(self) -> None:
        """Drop every entry in O(1): readers still holding the old dict finish on it."""
        with self._lock:
            self.data = OrderedDict()
            self._born = {}
            self.version += 1

    clear = invalidate

    def sweep(self) -> int:
        """Drop expired entries now; returns how many."""
        with self._lock:
            n = self._sweep(self.clock())
            self.evictions += n
        if n and self.on_evict is not None:
            self.on_evict(n)
        return n

    def _sweep(self, now: float) -> int:
        assert self.ttl is not None
        self._next_sweep = now + max(self.ttl / 4, 0.05)
        dead = [k for k, born in self._born.items() if now - born > self.ttl]
        for k in dead:
            self.data.pop(k, None)
            self._born.pop(k, None)
        return len(dead)

    def _expire(self, key: Hashable, data: OrderedDict[Hashable, Any]) -> None:
        with self._lock:
            if data is self.data and key in data:
                data.pop(key, None)
                self._born.pop(key, None)
                self.evictions += 1
                if self.on_evict is not None:
                    self.on_evict(1)

    def discard(self, key: Hashable) -> None:
        """Drop one entry if present."""
        with self._lock:
            self.data.pop(key, None)
            self._born.pop(key, None)

    def keys(self) -> list[Hashable]:
        return list(self.data.keys())

    def stats(self) -> tuple[int, int]:
        return len(self.data), self.capacity


class _Shard:
    __slots__ = ("version", "data", "born", "lock", "__weakref__")

    def __init__(self, version: int) -> None:
        self.version = version
        self.data: OrderedDict[Hashable, Any] = OrderedDict()
        self.born: dict[Hashable, float] = {}
        self.lock = forksafe.lock(self, "lock")


class MVCCPlanCache:
    """A sharded multi-version plan cache: lock-free reads, per-shard writes, O(1) invalidation.

    Readers never lock: a read picks the shard by hash (``shards[hash(key) & mask]``)
    and checks the shard's version against the cache's; a stale shard reads as empty.
    ``invalidate()`` only increments the version. Each shard is an LRU of its share of ``capacity``
    (the shares sum to it: the cache never holds more; a capacity under ``shards`` uses fewer shards).
    """

    __slots__ = ("capacity", "ttl", "clock", "on_evict", "version", "mask", "_caps", "shards", "evictions",
                 "__weakref__")

    def __init__(self, capacity: int = 10000, ttl_seconds: float | None = None, shards: int = 16,
                 clock: Callable[[], float] = time.monotonic, on_evict: Callable[[int], None] | None = None) -> None:
        if shards < 1 or shards & (shards - 1):
            raise ValueError(f"MVCCPlanCache.shards: must be a power of two, got {shards}")
        self.capacity = int(capacity)
        self.ttl = ttl_seconds
        self.clock = clock
        self.on_evict = on_evict
        self.version = 0
        while shards > 1 and shards > self.capacity:
            shards //= 2
        self.mask = shards - 1
        n, extra = divmod(max(self.capacity, 0), shards)
        self._caps = tuple(n + (i < extra) for i in range(shards))  # per shard, summing to capacity
        self.shards = [_Shard(0) for _ in range(shards)]
        self.evictions = 0

    def __len__(self) -> int:
        v = self.version
        return sum(len(s.data) for s in self.shards if s.version == v)

    def get(self, key: Hashable) -> Any:
        shard = self.shards[hash(key) & self.mask]
        if shard.version != self.version:
            return None
        value = shard.data.get(key)
        if value is None:
            return None
        if self.ttl is not None:
            born = shard.born.get(key)
            if born is not None and self.clock() - born > self.ttl:
                with shard.lock:
                    shard.data.pop(key, None)
                    shard.born.pop(key, None)
                    self.evictions += 1
                if self.on_evict is not None:
                    self.on_evict(1)
                return None
        try:
            shard.data.move_to_end(key)
        except KeyError:
            pass
        return value

    def peek(self, key: Hashable) -> Any:
        """The hot paths' read: the entry, its LRU place left as it is (with a TTL: :meth:`get`)."""
        if self.ttl is not None:
            return self.get(key)
        shard = self.shards[hash(key) & self.mask]
        return shard.data.get(key) if shard.version == self.version else None

    def put(self, key: Hashable, value: Any, version: int | None = None) -> None:
        """Store ``value``; with ``version`` (read before the value was computed), only if no
        invalidation happened since."""
        if self.capacity <= 0:
            return
        i = hash(key) & self.mask
        evicted = 0
        if version is None:
            version = self.version
        elif version != self.version:
            return
        shard = self.shards[i]
        with shard.lock:
            if shard.version != version:
                shard = _Shard(version)
                self.shards[i] = shard
            shard.data[key] = value
            shard.data.move_to_end(key)
            if self.ttl is not None:
                shard.born[key] = self.clock()
            while len(shard.data) > self._caps[i]:
                old, _ = shard.data.popitem(last=False)
                shard.born.pop(old, None)
                evicted += 1
            self.evictions += evicted
        if evicted and self.on_evict is not None:
            self.on_evict(evicted)

    def invalidate(self) -> None:
        """O(1): bump the version; stale shards are replaced on their next write."""
        self.version += 1

    clear = invalidate

    def keys(self) -> list[Hashable]:
        v = self.version
        return [k for s in self.shards if s.version == v for k in list(s.data)]

    def stats(self) -> tuple[int, int]:
        return len(self), self.capacity
