"""Token buckets for platform rate limits (per number, per Page, per bot, per chat, …), and
`SharedLimiter` for limits every replica of a service must agree on (SDK sessions, link requests)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import nats.js.errors
from nats.js.kv import KeyValue

from shared.config import Rate


class TokenBucket:
    """A token bucket: `rate` tokens per second, up to `burst` saved (default: max(1, rate)).

    `try_take()` never waits (it says how long to wait); `acquire()` waits for a token. The clock
    is injectable so the arithmetic can be unit-tested without sleeping.
    """

    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self.tokens = self.burst
        self.clock = clock
        self.updated = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def try_take(self) -> float:
        """Take a token and return 0, or return how many seconds until one is available."""
        self._refill()
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    async def acquire(self) -> None:
        """Wait until a token is available and take it (waiters are served in arrival order)."""
        async with self._lock:
            while (wait := self.try_take()) > 0:
                await asyncio.sleep(wait)


class BucketMap:
    """Lazily created token buckets keyed by a string (one per Page, bot, chat, …)."""

    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.buckets: dict[str, TokenBucket] = {}

    def get(self, key: str) -> TokenBucket:
        """The bucket of `key`, created full on first use."""
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = TokenBucket(self.rate, self.burst, self.clock)
        return bucket


# --- limits every replica agrees on ----------------------------------------------------------

# Compare-and-set attempts on one key before a subject counts as over its limit (contention).
MAX_CAS_ROUNDS = 20


def gcra(tat: float | None, now: float, rate: Rate) -> tuple[float | None, float]:
    """One action under `rate` with GCRA (a token bucket kept as one timestamp).

    `tat` is the stored "theoretical arrival time" (None: nothing stored, or stale). Returns the
    TAT to store and 0 when the action is allowed, or (None, seconds to wait) when it is not.
    `count` actions may come at once; after that one every `window / count` seconds.
    """
    interval = rate.window_seconds / rate.count
    tolerance = rate.window_seconds - interval
    start = now if tat is None or tat < now else tat
    if start - now > tolerance:
        return None, start - now - tolerance
    return start + interval, 0.0


class SharedLimiter:
    """Rate limits shared by every replica: one GCRA timestamp per (scope, subject, window) in a
    JetStream KV bucket, written with compare-and-set so concurrent replicas never both take the
    last slot. The bucket's TTL must cover the longest window (a key idle that long is fresh).

    Subjects (addresses, origins) are stored as keyed hashes (`hash_key`: an IPv4 address space
    is small enough to reverse a plain hash). The KV being unavailable raises (callers answer
    503): a limit that silently stops limiting would invite the abuse it exists for.
    """

    def __init__(self, kv: KeyValue, hash_key: bytes, clock: Callable[[], float] = time.time) -> None:
        self.kv = kv
        self.hash_key = hash_key
        self.clock = clock

    def key(self, scope: str, subject: str, rate: Rate) -> str:
        """The KV key of `subject`'s state under `rate` (KV keys allow no ':' or '/')."""
        digest = hmac.new(self.hash_key, subject.encode(), hashlib.sha256).hexdigest()[:40]
        return f"{scope}.{digest}.{rate.count}-{int(rate.window_seconds)}"

    async def take(self, scope: str, subject: str, rates: Sequence[Rate]) -> float:
        """Count one action of `subject` under each of `rates`, in order: 0 when every rate
        allowed it, else the seconds to wait (the refusing rate and those after it count nothing)."""
        for rate in rates:
            wait = await self._take_one(self.key(scope, subject, rate), rate)
            if wait > 0:
                return wait
        return 0.0

    async def _take_one(self, key: str, rate: Rate) -> float:
        def step(current: bytes | None) -> tuple[bytes | None, float]:
            new_tat, wait = gcra(_float(current), self.clock(), rate)
            return (None, wait) if new_tat is None else (repr(new_tat).encode(), 0.0)

        return await update_with_cas(self.kv, key, step)


class CasEntry(Protocol):
    """What `CasStore.get` returns (nats' `KeyValue.Entry`)."""

    @property
    def value(self) -> bytes | None: ...

    @property
    def revision(self) -> int | None: ...


class CasStore(Protocol):
    """The part of nats' `KeyValue` compare-and-set needs (get raises `KeyNotFoundError`, update
    with a stale `last` raises `KeyWrongLastSequenceError`)."""

    async def get(self, key: str) -> CasEntry: ...

    async def create(self, key: str, value: bytes) -> int: ...

    async def update(self, key: str, value: bytes, last: int | None = None) -> int: ...


async def update_with_cas(kv: CasStore, key: str,
                          step: Callable[[bytes | None], tuple[bytes | None, float]]) -> float:
    """Apply `step` to a KV entry with compare-and-set, as many replicas may at once: `step` gets
    the stored value (None when there is none) and gives the value to write, or None to write
    nothing, and a wait. The wait when nothing is written, else 0; 1.0 when the key is too
    contended to change (callers treat that as over their limit)."""
    for _ in range(MAX_CAS_ROUNDS):
        try:
            entry = await kv.get(key)
            revision, current = entry.revision, entry.value
        except nats.js.errors.KeyNotFoundError:
            revision, current = None, None
        value, wait = step(current)
        if value is None:
            return wait
        try:
            if revision is None:
                await kv.create(key, value)
            else:
                await kv.update(key, value, last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            continue  # another replica wrote first: read again
        return 0.0
    return 1.0


def _float(value: bytes | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
