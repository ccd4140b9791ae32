"""Token buckets for platform rate limits (per number, per Page, per bot, per chat, …)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


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
