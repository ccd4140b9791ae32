"""Shared send-loop pieces every channel service uses: token bucket, back-off, ordering, memory."""

from __future__ import annotations

import pytest

from shared.outbound import BoundedMemory, recipient_key
from shared.ratelimit import TokenBucket
from shared.retry import backoff_delay


def test_backoff_grows_and_caps() -> None:
    delays = [backoff_delay(n, 1.0, 60.0) for n in range(1, 12)]
    assert delays[:4] == [1.0, 2.0, 4.0, 8.0]
    assert delays == sorted(delays) and max(delays) == 60.0
    assert backoff_delay(10_000, 1.0, 60.0) == 60.0


def test_token_bucket_paces_a_burst() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=80, clock=lambda: now[0])
    assert all(bucket.try_take() == 0 for _ in range(80))
    wait = bucket.try_take()
    assert wait == pytest.approx(1 / 80)
    now[0] += wait
    assert bucket.try_take() == 0


def test_recipient_key_and_bounded_memory() -> None:
    assert recipient_key("outbound.x.i1", b'{"integration_id":"i1","recipient":"+1555","content":{}}') == "i1:+1555"
    assert recipient_key("outbound.x.i1", b"not json") == "undecodable"
    memory: BoundedMemory[str, str] = BoundedMemory(limit=2)
    for key in ("a", "b", "c"):
        memory.remember(key, key.upper())
    assert dict(memory) == {"b": "B", "c": "C"}
