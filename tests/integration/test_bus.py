"""The bus against a real nats-server: durability, de-duplication, ordering, retries, request/reply, KV."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from shared import subjects
from shared.bus import Bus, Delivery, KvMirror, Poison, Retry


async def test_publish_deduplicates_by_msg_id(bus: Bus) -> None:
    subject = subjects.inbound_subject("whatsapp", "i1")
    first = await bus.publish(subject, b"a", msg_id="whatsapp:wamid.1")
    second = await bus.publish(subject, b"a", msg_id="whatsapp:wamid.1")
    assert not first.duplicate
    assert second.duplicate
    info = await bus.js.stream_info(subjects.INBOUND.name)
    assert info.state.messages == 1


async def test_consumer_orders_per_key_and_retries(bus: Bus) -> None:
    seen: list[tuple[str, bytes]] = []
    attempts: dict[bytes, int] = {}
    done = asyncio.Event()

    async def handler(data: bytes, _headers: Mapping[str, str], delivery: Delivery) -> None:
        attempts[data] = attempts.get(data, 0) + 1
        if data == b"flaky" and attempts[data] < 3:
            raise Retry(0.05)
        if data == b"poison":
            raise Poison("never processable")
        seen.append((delivery.subject, data))
        if len(seen) == 7:
            done.set()

    for i in range(3):
        await bus.publish(subjects.inbound_subject("web", "a"), f"a{i}".encode())
        await bus.publish(subjects.inbound_subject("web", "b"), f"b{i}".encode())
    await bus.publish(subjects.inbound_subject("web", "c"), b"poison")
    await bus.publish(subjects.inbound_subject("web", "c"), b"flaky")
    bus.consume(subjects.INBOUND, "t-consumer", subjects.INBOUND_ALL, handler)
    await asyncio.wait_for(done.wait(), 10)
    a_order = [d for s, d in seen if s.endswith(".a")]
    b_order = [d for s, d in seen if s.endswith(".b")]
    assert a_order == [b"a0", b"a1", b"a2"]
    assert b_order == [b"b0", b"b1", b"b2"]
    assert attempts[b"flaky"] == 3
    assert b"poison" not in [d for _, d in seen]


async def test_request_reply(bus: Bus) -> None:
    async def echo(data: bytes, _headers: Mapping[str, str]) -> bytes:
        return data.upper()

    await bus.serve("echo", {"test.echo": echo})
    assert await bus.request("test.echo", b"hi") == b"HI"


async def test_kv_mirror_sees_initial_and_later_values(bus: Bus) -> None:
    kv = await bus.key_value("tl_test")
    await kv.put("k1", b"one")
    mirror = KvMirror(bus, "tl_test", bytes.decode)
    await asyncio.wait_for(mirror.start(), 5)
    assert mirror.get("k1") == "one"
    await kv.put("k2", b"two")
    await kv.delete("k1")
    for _ in range(100):
        if mirror.get("k2") == "two" and mirror.get("k1") is None:
            break
        await asyncio.sleep(0.02)
    assert mirror.get("k2") == "two"
    assert mirror.get("k1") is None
    await mirror.stop()


@pytest.mark.parametrize("bucket", ["tl_empty"])
async def test_kv_mirror_ready_on_empty_bucket(bus: Bus, bucket: str) -> None:
    mirror = KvMirror(bus, bucket, bytes.decode)
    await asyncio.wait_for(mirror.start(), 5)
    assert mirror.values == {}
    await mirror.stop()
