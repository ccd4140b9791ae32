"""The bus against a real nats-server: durability, de-duplication, ordering, retries, request/reply, KV."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping

import pytest
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import api
from nats.js.errors import APIError, NoStreamResponseError

from shared import bus as bus_module
from shared import subjects
from shared.bus import Bus, Delivery, JetStreamPublisher, KvMirror, Poison, PullBatches, Retry
from threadline.natsserver import NatsServer


async def test_publish_deduplicates_by_msg_id(bus: Bus) -> None:
    subject = subjects.inbound_subject("whatsapp", "i1", "u1")
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
        await bus.publish(subjects.inbound_subject("web", "a", "u"), f"a{i}".encode())
        await bus.publish(subjects.inbound_subject("web", "b", "u"), f"b{i}".encode())
    await bus.publish(subjects.inbound_subject("web", "c", "u"), b"poison")
    await bus.publish(subjects.inbound_subject("web", "c", "u"), b"flaky")
    bus.consume_durable(subjects.INBOUND, "t-consumer", subjects.INBOUND_ALL, handler)
    await asyncio.wait_for(done.wait(), 10)
    a_order = [d for s, d in seen if s.split(".")[2] == "a"]
    b_order = [d for s, d in seen if s.split(".")[2] == "b"]
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


async def test_kv_mirror_start_waits_for_every_initial_value(bus: Bus) -> None:
    # nats-py marks the end of the initial values when the consumer has nothing pending, which
    # is also true while values it delivered are still on their way: ready must not trust it.
    kv = await bus.key_value("tl_many")
    for round_ in range(5):
        await kv.put(f"k{round_}", str(round_).encode())
        mirror = KvMirror(bus, "tl_many", bytes.decode)
        await asyncio.wait_for(mirror.start(), 5)
        assert mirror.values == {f"k{i}": str(i) for i in range(round_ + 1)}
        await mirror.stop()


@pytest.mark.parametrize("bucket", ["tl_empty"])
async def test_kv_mirror_ready_on_empty_bucket(bus: Bus, bucket: str) -> None:
    mirror = KvMirror(bus, bucket, bytes.decode)
    await asyncio.wait_for(mirror.start(), 5)
    assert mirror.values == {}
    await mirror.stop()


async def _puller(bus: Bus, durable: str, subject: str, *, batch: int, wait: float,
                  max_ack_pending: int | None = None) -> PullBatches:
    """A durable consumer of `subject` on the inbound stream, and the batches it is read in."""
    await bus.js.add_consumer(subjects.INBOUND.name, api.ConsumerConfig(
        durable_name=durable, ack_policy=api.AckPolicy.EXPLICIT, filter_subject=subject,
        max_ack_pending=max_ack_pending))
    return await PullBatches.start(bus.nc, subjects.INBOUND.name, durable, batch=batch, wait=wait)


async def test_pull_batches_take_what_is_there_wait_for_what_comes_and_report_refusals(bus: Bus) -> None:
    subject = subjects.inbound_subject("web", "pull", "u")
    puller = await _puller(bus, "t-pull", subject, batch=100, wait=5.0)
    try:
        for i in range(150):
            await bus.publish(subject, f"m{i}".encode())
        first = await puller.next_batch()
        second = await puller.next_batch()
        assert [m.data for m in first + second] == [f"m{i}".encode() for i in range(150)]
        assert len(first) == 100  # a full batch ends the request, the rest comes with the next one
        for msg in first + second:
            await msg.ack()
            assert Delivery.of(msg).num_delivered == 1

        async def later() -> None:
            await asyncio.sleep(0.2)
            await bus.publish(subject, b"late")

        # Nothing there: the request waits, and the first message to arrive ends it.
        waiting = asyncio.create_task(later())
        late = await puller.next_batch()
        await waiting
        assert [m.data for m in late] == [b"late"]
        await late[0].ack()

        await bus.js.delete_consumer(subjects.INBOUND.name, "t-pull")
        with pytest.raises(NatsError, match="refused"):
            await puller.next_batch()
    finally:
        await puller.stop()


async def test_publisher_acks_refusals_and_timeouts_are_nats_pys(bus: Bus) -> None:
    subject = subjects.inbound_subject("web", "acks", "u")
    acks = await asyncio.gather(*(bus.publish(subject, f"m{i}".encode(), msg_id=f"acks-{i}") for i in range(50)))
    assert [ack.stream for ack in acks] == [subjects.INBOUND.name] * 50
    assert len({ack.seq for ack in acks}) == 50 and not any(ack.duplicate for ack in acks)
    assert (await bus.publish(subject, b"m0", msg_id="acks-0")).duplicate
    with pytest.raises(NoStreamResponseError):
        await bus.publish("no-stream-here.x", b"x")
    with pytest.raises(APIError) as refused:
        await bus.publish(subject, b"x", headers={"Nats-Expected-Stream": "ANOTHER"})
    assert refused.value.code == 400
    # Someone answers nothing on a subject no stream holds: the publish gives up.
    silent = await bus.nc.subscribe("silent.x")
    try:
        with pytest.raises(NatsTimeoutError):
            await JetStreamPublisher(bus.nc, timeout=0.2).publish("silent.x", b"x", {})
    finally:
        await silent.unsubscribe()


async def test_messages_published_together_are_stored_back_to_back_each_with_its_own_outcome(bus: Bus) -> None:
    # Forty pairs and forty single messages at once: each pair lands side by side, in its order.
    singles = [bus.publish(subjects.event_subject("app", f"s{i}"), f"single{i}".encode()) for i in range(40)]
    pairs = [bus.publish_together([(subjects.event_subject("app", f"c{i}"), f"first{i}".encode(), f"p{i}"),
                                   (subjects.desk_event_subject("app", f"c{i}"), f"second{i}".encode(), f"p{i}:desk")])
             for i in range(40)]
    results = await asyncio.gather(*(call for both in zip(singles, pairs, strict=True) for call in both))
    for i, (first, second) in enumerate(results[1::2]):
        assert isinstance(first, api.PubAck) and isinstance(second, api.PubAck)
        assert second.seq == first.seq + 1
        stored = [(await bus.js.get_msg(subjects.EVENTS.name, ack.seq)).data for ack in (first, second)]
        assert stored == [f"first{i}".encode(), f"second{i}".encode()]
    # Each message has its own outcome: a duplicate, a refusal, an ack.
    first, refused, fresh = await bus.publish_together([
        (subjects.event_subject("app", "c0"), b"first0", "p0"),
        ("no-stream-here.x", b"x", None),
        (subjects.event_subject("app", "c0"), b"third", "p-new")])
    assert isinstance(first, api.PubAck) and first.duplicate
    assert isinstance(refused, NoStreamResponseError)
    assert isinstance(fresh, api.PubAck) and not fresh.duplicate


async def test_a_consumer_at_max_ack_pending_gets_its_batch_without_waiting_for_the_expiry(bus: Bus) -> None:
    subject = subjects.inbound_subject("web", "full", "u")
    # A request that waits up to 60 s: at the ack limit the server sends what it may and then
    # nothing until the request expires, so only the end of the flow may end the batch.
    puller = await _puller(bus, "t-full", subject, batch=10, wait=60.0, max_ack_pending=2)
    try:
        for i in range(5):
            await bus.publish(subject, f"m{i}".encode())
        first = await asyncio.wait_for(puller.next_batch(), 10)
        assert [m.data for m in first] == [b"m0", b"m1"]
        for msg in first:
            await msg.ack()
        # The acks free two slots: the next two come, through the new request or the old one.
        second: list[Msg] = []
        for _ in range(5):
            second += await asyncio.wait_for(puller.next_batch(), 10)
            if len(second) >= 2:
                break
        assert [m.data for m in second] == [b"m2", b"m3"]
    finally:
        await puller.stop()


async def test_batches_hold_at_most_batch_messages_and_keep_what_earlier_requests_bring(bus: Bus) -> None:
    subject = subjects.inbound_subject("web", "late", "u")
    puller = await _puller(bus, "t-late", subject, batch=10, wait=5.0)
    try:
        for i in range(30):
            await bus.publish(subject, f"m{i}".encode())
        # Earlier requests that outlived their batch (a timeout, a reconnect) bring more at once.
        for stale in ("stale1", "stale2"):
            await bus.nc.publish(puller.next_subject, b'{"batch":10,"expires":1000000000,"no_wait":true}',
                                 reply=f"{puller.inbox}.{stale}")
        await bus.nc.flush()
        batches = [await asyncio.wait_for(puller.next_batch(), 10) for _ in range(3)]
        assert [len(batch) for batch in batches] == [10, 10, 10]
        assert sorted(m.data for batch in batches for m in batch) == sorted(f"m{i}".encode() for i in range(30))
        for batch in batches:
            for msg in batch:
                await msg.ack()
    finally:
        await puller.stop()


async def test_closing_lets_the_batch_in_hand_finish_and_hands_nothing_to_ack_wait(
        bus: Bus, nats_server: NatsServer) -> None:
    consumer = await Bus.connect(nats_server.url, "closing")
    started, release = asyncio.Event(), asyncio.Event()
    handled: list[bytes] = []

    async def slow(data: bytes, _headers: Mapping[str, str], _delivery: Delivery) -> None:
        started.set()
        await release.wait()
        handled.append(data)

    subject = subjects.inbound_subject("web", "closing", "u")
    consumer.consume_durable(subjects.INBOUND, "t-closing", subject, slow, ack_wait=60)
    await bus.publish(subject, b"in hand")
    await asyncio.wait_for(started.wait(), 10)
    closing = asyncio.create_task(consumer.close())
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.wait_for(closing, 10)
    assert handled == [b"in hand"]
    info = await bus.js.consumer_info(subjects.INBOUND.name, "t-closing")
    assert info.num_ack_pending == 0 and info.num_redelivered == 0


async def test_a_handler_pausing_gives_its_message_back_when_the_bus_stops(
        bus: Bus, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler waiting out a rate limit (`Bus.pause`) does not hold a stop for the grace: the
    wait ends when the stop begins, and the message goes back to the stream, unacknowledged."""
    monkeypatch.setattr(bus_module, "HANDLING_GRACE_SECONDS", 60.0)
    consumer = await Bus.connect(nats_server.url, "pausing")
    waiting = asyncio.Event()
    outcomes: list[str] = []

    async def paced(_data: bytes, _headers: Mapping[str, str], _delivery: Delivery) -> None:
        await consumer.pause(0.01, "a short wait")  # one that ends by itself returns
        waiting.set()
        try:
            await consumer.pause(300, "the sender's queue")
        except Retry as exc:
            outcomes.append(str(exc))
            raise
        outcomes.append("sent")

    subject = subjects.inbound_subject("web", "pausing", "u")
    consumer.consume_durable(subjects.INBOUND, "t-pausing", subject, paced, ack_wait=60)
    await bus.publish(subject, b"paced")
    await asyncio.wait_for(waiting.wait(), 10)
    await asyncio.wait_for(consumer.close(), 10)  # not the 60 s grace
    assert outcomes == ["stopping: the sender's queue"]
    info = await bus.js.consumer_info(subjects.INBOUND.name, "t-pausing")
    assert info.ack_floor is None or not info.ack_floor.stream_seq  # handed back, not acknowledged
    # Handed back without a delay: the next consumer gets it at once, not after the wait.
    again: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def next_replica(data: bytes, _headers: Mapping[str, str], _delivery: Delivery) -> None:
        if not again.done():
            again.set_result(data)

    bus.consume_durable(subjects.INBOUND, "t-pausing", subject, next_replica, ack_wait=60)
    assert await asyncio.wait_for(again, 10) == b"paced"


async def test_after_an_outage_a_consumer_takes_one_batch_at_a_time(bus: Bus, nats_server: NatsServer) -> None:
    consumer = await Bus.connect(nats_server.url, "outage")
    running = peak = 0
    handled: set[int] = set()

    async def handler(_data: bytes, _headers: Mapping[str, str], delivery: Delivery) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        handled.add(delivery.stream_sequence)

    try:
        consumer.consume_durable(subjects.INBOUND, "t-outage", "inbound.web.*.*", handler, batch=10)
        await asyncio.sleep(0.5)
        await nats_server.astop()
        # Long enough for a client that kept asking to have queued several requests meanwhile.
        await asyncio.sleep(5)
        await asyncio.to_thread(nats_server.start)
        for _ in range(100):
            if consumer.nc.is_connected and bus.nc.is_connected:
                break
            await asyncio.sleep(0.1)
        for i in range(200):
            await bus.publish(subjects.inbound_subject("web", f"o{i}", "u"), b"m")
        for _ in range(200):
            if len(handled) == 200:
                break
            await asyncio.sleep(0.05)
        assert len(handled) == 200
        assert peak <= 10  # requests queued while disconnected would each have brought a batch
    finally:
        await consumer.close()


async def test_a_message_handed_back_holds_back_the_later_ones_of_its_key(bus: Bus) -> None:
    """A customer's first message failing for a moment must not let the second be stored first."""
    seen: list[bytes] = []
    attempts: dict[bytes, int] = {}
    done = asyncio.Event()

    async def handler(data: bytes, _headers: Mapping[str, str], _delivery: Delivery) -> None:
        attempts[data] = attempts.get(data, 0) + 1
        if data == b"a1" and attempts[data] < 3:
            raise Retry(0.1)  # an outage of what the first needs
        if data == b"b1" and attempts[data] < 2:
            raise RuntimeError("a bug hit once")
        seen.append(data)
        if len(seen) == 7:
            done.set()

    for data in (b"a1", b"b1", b"a2", b"c1", b"b2", b"a3", b"c2"):
        await bus.publish(subjects.inbound_subject("web", "i1", data[:1].decode()), data)
    bus.consume_durable(subjects.INBOUND, "t-held", subjects.INBOUND_ALL, handler,
                        ordering_key=lambda subject, data: data[:1].decode(), batch=3)
    await asyncio.wait_for(done.wait(), 15)
    for prefix in (b"a", b"b", b"c"):
        assert [d for d in seen if d.startswith(prefix)] == sorted(d for d in seen if d.startswith(prefix))
    assert seen.index(b"c1") < seen.index(b"a1")  # other keys were not held back


async def test_a_held_key_is_released_when_its_message_never_comes_back(
        bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    """The handed-back message is erased from the stream (retention, a privacy purge): its key's
    later messages wait for it only until the hold's grace is over, not forever."""
    monkeypatch.setattr(bus_module, "HOLD_GRACE_SECONDS", 1.0)
    seen: list[bytes] = []
    gone = asyncio.Event()
    done = asyncio.Event()

    async def handler(data: bytes, _headers: Mapping[str, str], delivery: Delivery) -> None:
        if data == b"a1":
            await bus.js.delete_msg(subjects.INBOUND.name, delivery.stream_sequence)
            gone.set()
            raise Retry(0.2)  # never delivered again: it is no longer in the stream
        seen.append(data)
        if b"a3" in seen:
            done.set()

    for data in (b"a1", b"a2", b"b1"):
        await bus.publish(subjects.inbound_subject("web", "i1", data[:1].decode()), data)
    bus.consume_durable(subjects.INBOUND, "t-gone", subjects.INBOUND_ALL, handler,
                        ordering_key=lambda subject, data: data[:1].decode(), batch=10)
    await asyncio.wait_for(gone.wait(), 10)
    await asyncio.sleep(0.5)
    assert b"a2" not in seen  # held back while a1 may still come
    await bus.publish(subjects.inbound_subject("web", "i1", "a"), b"a3")
    await asyncio.wait_for(done.wait(), 15)
    assert [d for d in seen if d.startswith(b"a")] == [b"a2", b"a3"] and b"b1" in seen


async def test_closing_does_not_wait_forever_for_a_handler_that_never_returns(
        nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bus_module, "HANDLING_GRACE_SECONDS", 0.5)  # the wait is the same, shorter
    consumer = await Bus.connect(nats_server.url, "stuck")
    await consumer.ensure_streams()
    started = asyncio.Event()

    async def stuck(_data: bytes, _headers: Mapping[str, str], _delivery: Delivery) -> None:
        started.set()
        await asyncio.Event().wait()

    await consumer.consume(subjects.ConsumerSpec(subjects.INBOUND, "t-stuck", "inbound.*.*"), stuck)
    await consumer.publish(subjects.inbound_subject("web", "i1", "u1"), b"never done")
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.wait_for(consumer.close(), 30)  # the grace, then the handler is cancelled


async def test_closing_reports_a_task_that_will_not_stop_and_still_closes(
        nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A background task that will not stop (here: one that shrugs off every cancellation until
    an event no one sets) cannot hold a service's shutdown forever: close() names it, with where
    it is stuck, and closes the connection anyway."""
    monkeypatch.setattr(bus_module, "STOP_TASKS_SECONDS", 0.2)
    closing = await Bus.connect(nats_server.url, "stubborn")
    never = asyncio.Event()

    async def cleanup_that_hangs() -> None:
        while not never.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await never.wait()

    stubborn = closing._spawn(cleanup_that_hangs(), name="stubborn-cleanup")
    await asyncio.sleep(0)
    try:
        await asyncio.wait_for(closing.close(), 10)
        assert closing.nc.is_closed
        reports = [r.getMessage() for r in caplog.records if "stubborn-cleanup" in r.getMessage()]
        assert reports and "did not stop" in reports[0] and "cleanup_that_hangs" in reports[0]
    finally:
        never.set()
        await asyncio.wait([stubborn])


async def test_a_consumed_only_purge_keeps_what_a_consumer_has_yet_to_read(bus: Bus) -> None:
    """Two consumers whose filters overlap one conversation's subject (as `webhooks` and
    `notifications` read every conversation's events): a consumed-only purge removes what both
    acknowledged, below the bound, and keeps what one of them has not read; a consumer of other
    subjects holds nothing back."""
    subject = subjects.event_subject("app1", "conv1")
    other = subjects.event_subject("app1", "conv2")
    stream = subjects.EVENTS.name
    readers = {}
    for durable, filter_subject in (("t-purge-a", "events.*.*.*"), ("t-purge-b", subject), ("t-purge-c", other)):
        await bus.js.add_consumer(stream, api.ConsumerConfig(
            durable_name=durable, ack_policy=api.AckPolicy.EXPLICIT, filter_subject=filter_subject))
        readers[durable] = await PullBatches.start(bus.nc, stream, durable, batch=10, wait=1.0)
    try:
        seqs = [(await bus.publish(subject, f"e{i}".encode())).seq for i in range(4)]
        await bus.publish(other, b"elsewhere")  # c never reads it: it does not hold conv1's back
        for msg in await readers["t-purge-a"].next_batch():
            await msg.ack_sync()
        read_by_b = await readers["t-purge-b"].next_batch()
        for msg in read_by_b[:2]:  # b has handled e0 and e1 only
            await msg.ack_sync()

        await bus.purge_subject(subjects.EVENTS, subjects.conversation_events("app1", "conv1"),
                                before_seq=seqs[3], consumed_only=True)
        assert await stored_data(bus, stream, seqs) == [b"e2", b"e3"]
        for msg in read_by_b[2:]:  # b handles the rest
            await msg.ack_sync()
        await bus.purge_subject(subjects.EVENTS, subjects.conversation_events("app1", "conv1"),
                                before_seq=seqs[3], consumed_only=True)
        assert await stored_data(bus, stream, seqs) == [b"e3"]  # the bound (an announcement) stays
        await bus.purge_subject(subjects.EVENTS, subjects.conversation_events("app1", "conv1"))
        assert await stored_data(bus, stream, seqs) == []
    finally:
        for reader in readers.values():
            await reader.stop()


async def test_erasing_published_messages_by_id_takes_only_those_every_consumer_has_read(bus: Bus) -> None:
    """One event of a conversation, named by its Nats-Msg-Id, goes once every consumer that
    wants it has acknowledged it; the other events stay, and so does one still unread."""
    subject = subjects.event_subject("app2", "conv1")
    stream = subjects.EVENTS.name
    await bus.js.add_consumer(stream, api.ConsumerConfig(
        durable_name="t-erase", ack_policy=api.AckPolicy.EXPLICIT, filter_subject="events.app2.*.*"))
    reader = await PullBatches.start(bus.nc, stream, "t-erase", batch=10, wait=1.0)
    try:
        seqs = [(await bus.publish(subject, f"e{i}".encode(), msg_id=f"id-{i}")).seq for i in range(4)]
        batch = await reader.next_batch()
        for msg in batch[:3]:  # e3 is not acknowledged yet
            await msg.ack_sync()
        end = seqs[-1] + 1
        assert await bus.erase_published(subjects.EVENTS, subjects.conversation_events("app2", "conv1"),
                                         ["id-1", "id-3", "id-unknown"], before_seq=end) == 1

        assert await stored_data(bus, stream, seqs) == [b"e0", b"e2", b"e3"]
        await batch[3].ack_sync()
        assert await bus.erase_published(subjects.EVENTS, subjects.conversation_events("app2", "conv1"),
                                         ["id-3"], before_seq=seqs[3]) == 0  # at the bound: not below it
        assert await bus.erase_published(subjects.EVENTS, subjects.conversation_events("app2", "conv1"),
                                         ["id-3"], before_seq=end) == 1
        assert await stored_data(bus, stream, seqs) == [b"e0", b"e2"]
    finally:
        await reader.stop()


async def test_erasing_published_messages_starts_where_they_were_published(
        bus: Bus, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Given when its messages were published, the walk starts among those stored then (less a
    margin for the servers' clocks, none here), not at the subject's oldest; one stored earlier
    than that (a clock further behind than the margin) is still found, by a walk through the
    older ones."""
    monkeypatch.setattr(bus_module, "ERASE_CLOCK_MARGIN_SECONDS", 0.0)
    subject = subjects.event_subject("app3", "conv1")
    stream = subjects.EVENTS.name
    seqs = [(await bus.publish(subject, b"e0", msg_id="t-0")).seq]
    await asyncio.sleep(0.05)
    published = time.time()
    seqs += [(await bus.publish(subject, f"e{i}".encode(), msg_id=f"t-{i}")).seq for i in (1, 2)]
    end = seqs[-1] + 1
    conversation = subjects.conversation_events("app3", "conv1")
    with caplog.at_level(logging.INFO, logger="shared.bus"):
        assert await bus.erase_published(subjects.EVENTS, conversation, ["t-1"], before_seq=end,
                                         since=published) == 1
        assert "not found from" not in caplog.text
        assert await stored_data(bus, stream, seqs) == [b"e0", b"e2"]
        # e0 lies before `since`: the first walk does not see it, the one through the older does.
        assert await bus.erase_published(subjects.EVENTS, conversation, ["t-0"], before_seq=end,
                                         since=published) == 1
        assert "not found from" in caplog.text
    assert await stored_data(bus, stream, seqs) == [b"e2"]
    # Nothing stored on the subject after `since`: only the walk through the older ones.
    assert await bus.erase_published(subjects.EVENTS, conversation, ["t-2"], before_seq=end,
                                     since=time.time() + 60) == 1
    assert await stored_data(bus, stream, seqs) == []


async def stored_data(bus: Bus, stream: str, seqs: list[int]) -> list[bytes]:
    """The data of the messages at `seqs` still in `stream` (erased ones left out)."""
    found = []
    for seq in seqs:
        with contextlib.suppress(Exception):
            found.append((await bus.js.get_msg(stream, seq)).data or b"")
    return found
