"""The `webhooks` service's retries, give-ups, per-conversation order and durability across restarts,
against a real nats-server and real HTTP receivers on loopback."""

from __future__ import annotations

import asyncio

import pytest

from shared.bus import Bus
from shared.ids import new_id
from tests.harness import System
from tests.integration.test_webhooks_delivery import (
    FAST_RETRIES,
    Received,
    Receiver,
    add_webhook,
    eventually,
    message_created,
    publish,
    put_webhook,
    settled_row,
    stats,
)
from threadline.natsserver import free_port


@pytest.fixture
def system(system_on_each_engine: System) -> System:
    """Every test here runs with the webhooks' state on SQLite, then on PostgreSQL."""
    return system_on_each_engine


async def test_retries_500_then_delivers_once_with_same_event_id(bus: Bus, system: System) -> None:
    answers = iter([500, 500])

    async def respond(_r: Received) -> int:
        return next(answers, 200)

    receiver = await Receiver(respond).start()
    try:
        await system.start("webhooks", env=FAST_RETRIES)
        app_id, conv_id = new_id(), new_id()
        hook = await add_webhook(bus, system, app_id, receiver.url)
        event = message_created(app_id, conv_id, "retry me")
        await publish(bus, event)
        store = system.service("webhooks").store
        await eventually(lambda: receiver.accepted_event_ids() == [event.id], what="delivery after retries")
        assert [r.status for r in receiver.requests] == [500, 500, 200]
        assert [r.event_ids for r in receiver.requests] == [[event.id]] * 3
        row = await settled_row(store, hook.id, event.id)
        assert (row["status"], row["attempts"], row["last_status"]) == ("delivered", 3, 200)
        await eventually(lambda: system.service("webhooks").dispatcher.stats()["pending"] == 0)
        counts = await stats(system)
        assert (counts["delivered"], counts["failed"], counts["pending"]) == (1, 0, 0)
    finally:
        await receiver.stop()


@pytest.mark.parametrize("status", [400, 406])
async def test_client_errors_are_not_retried(bus: Bus, system: System, status: int) -> None:
    async def respond(_r: Received) -> int:
        return status

    receiver = await Receiver(respond).start()
    try:
        await system.start("webhooks", env=FAST_RETRIES)
        app_id, conv_id = new_id(), new_id()
        hook = await add_webhook(bus, system, app_id, receiver.url)
        rejected = message_created(app_id, conv_id, "unwanted")
        after = message_created(app_id, conv_id, "next one")
        await publish(bus, rejected)
        await publish(bus, after)
        store = system.service("webhooks").store
        # The next event of the conversation is attempted only once the first is settled.
        await eventually(lambda: after.id in {i for r in receiver.requests for i in r.event_ids}, what="next event")
        row = await settled_row(store, hook.id, rejected.id)
        assert (row["status"], row["attempts"], row["last_status"]) == ("failed", 1, status)
        assert sum(rejected.id in r.event_ids for r in receiver.requests) == 1
    finally:
        await receiver.stop()


async def test_gives_up_after_the_window(bus: Bus, system: System) -> None:
    async def respond(_r: Received) -> int:
        return 503

    receiver = await Receiver(respond).start()
    try:
        await system.start("webhooks", env={"THREADLINE_WEBHOOK_RETRY_BASE_SECONDS": "0.02",
                                            "THREADLINE_WEBHOOK_RETRY_WINDOW_SECONDS": "0.3"})
        app_id = new_id()
        hook = await add_webhook(bus, system, app_id, receiver.url)
        event = message_created(app_id, new_id(), "nobody home")
        await publish(bus, event)
        service = system.service("webhooks")
        await eventually(lambda: service.dispatcher.stats()["failed"] == 1, what="give-up")
        row = await settled_row(service.store, hook.id, event.id)
        assert row["status"] == "failed" and row["last_status"] == 503
        attempts = len(receiver.requests)
        assert attempts >= 3 and row["attempts"] == attempts
        assert all(r.event_ids == [event.id] for r in receiver.requests)
    finally:
        await receiver.stop()


async def test_timeout_is_retried(bus: Bus, system: System) -> None:
    never = asyncio.Event()

    async def respond(r: Received) -> int:
        if len(receiver.requests) == 1:
            await never.wait()  # the first attempt hangs past the client's timeout
        return 200

    receiver = await Receiver(respond).start()
    try:
        await system.start("webhooks", env={**FAST_RETRIES, "THREADLINE_WEBHOOK_TIMEOUT_SECONDS": "0.3"})
        app_id = new_id()
        hook = await add_webhook(bus, system, app_id, receiver.url)
        event = message_created(app_id, new_id(), "slow receiver")
        await publish(bus, event)
        await eventually(lambda: receiver.accepted_event_ids() == [event.id], what="delivery after timeout")
        row = await settled_row(system.service("webhooks").store, hook.id, event.id)
        assert (row["status"], row["attempts"]) == ("delivered", 2)
    finally:
        never.set()
        await receiver.stop()


async def test_order_per_conversation_while_another_flows(bus: Bus, system: System) -> None:
    app_id, stuck_conv, flowing_conv = new_id(), new_id(), new_id()
    stuck = [message_created(app_id, stuck_conv, f"stuck {i}") for i in range(3)]
    flowing = [message_created(app_id, flowing_conv, f"flowing {i}") for i in range(3)]
    stuck_ids = {e.id for e in stuck}
    rejected_stuck = 0

    async def respond(r: Received) -> int:
        nonlocal rejected_stuck
        # Refuse the stuck conversation until the other one has fully gone through (and at
        # least twice): if the stuck one held the other back, this would never end.
        if stuck_ids & set(r.event_ids) and (flowing[-1].id not in receiver.accepted_event_ids()
                                            or rejected_stuck < 2):
            rejected_stuck += 1
            return 500
        return 200

    receiver = await Receiver(respond).start()
    try:
        # Everything is published before the service starts, so the first envelope carries both
        # conversations: the flowing one must get out of the stuck one's retries.
        hook = await put_webhook(bus, app_id, receiver.url)
        for a, b in zip(stuck, flowing, strict=True):
            await publish(bus, a)
            await publish(bus, b)
        await system.start("webhooks", env=FAST_RETRIES)
        await eventually(lambda: stuck[-1].id in receiver.accepted_event_ids(), what="stuck conversation delivered")
        accepted = receiver.accepted_event_ids(hook.id)
        assert [i for i in accepted if i in stuck_ids] == [e.id for e in stuck]
        assert [i for i in accepted if i not in stuck_ids] == [e.id for e in flowing]
        assert accepted.index(flowing[-1].id) < accepted.index(stuck[0].id)
        assert rejected_stuck >= 2
        # No request ever carried a later stuck event before the earlier one was accepted.
        for request in receiver.requests:
            for event in stuck[1:]:
                if event.id in request.event_ids:
                    earlier = stuck[stuck.index(event) - 1].id
                    position = receiver.requests.index(request)
                    accepted_before = [i for r in receiver.requests[:position] if r.status == 200
                                       for i in r.event_ids]
                    assert earlier in accepted_before or earlier in request.event_ids[:request.event_ids.index(
                        event.id)]
    finally:
        await receiver.stop()


async def test_survives_restart_while_receiver_is_down(bus: Bus, system: System) -> None:
    port = free_port()  # nothing listens there yet: connection refused
    env = {"THREADLINE_WEBHOOK_RETRY_BASE_SECONDS": "0.05", "THREADLINE_WEBHOOK_RETRY_WINDOW_SECONDS": "60"}
    await system.start("webhooks", env=env)
    app_id, conv_id = new_id(), new_id()
    hook = await add_webhook(bus, system, app_id, f"http://127.0.0.1:{port}/hook")
    before = message_created(app_id, conv_id, "sent while the receiver is down")
    await publish(bus, before)
    store = system.service("webhooks").store

    async def attempted() -> bool:
        row = await store.delivery(hook.id, before.id)
        return row is not None and row["attempts"] >= 1 and row["status"] == "pending"

    deadline = asyncio.get_running_loop().time() + 8
    while not await attempted():
        assert asyncio.get_running_loop().time() < deadline, "no failed attempt recorded"
        await asyncio.sleep(0.02)

    await system.stop_service("webhooks")
    during = message_created(app_id, conv_id, "sent while the service is down")
    await publish(bus, during)
    await system.start_service("webhooks", env=env)
    assert system.service("webhooks").dispatcher.stats()["pending"] >= 1

    receiver = await Receiver().start(port)
    try:
        await eventually(lambda: receiver.accepted_event_ids() == [before.id, during.id], what="delivery after restart")
        await settled_row(system.service("webhooks").store, hook.id, during.id)
        counts = await stats(system)
        assert (counts["delivered"], counts["pending"], counts["failed"]) == (2, 0, 0)
    finally:
        await receiver.stop()
