"""The `webhooks` service against a real nats-server and real HTTP receivers on loopback:
envelope, headers, signature, trace context, trigger and app filtering, de-duplication."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry import trace
from sunshine_conversations_client import ConversationCreateEvent, ConversationMessageEvent

from shared import bus as bus_module
from shared import records, subjects
from shared.bus import Bus
from shared.ids import iso, new_id
from shared.messages import conversation
from shared.messages.conversation import ConversationCreated, ConversationEvent, MessageCreated
from shared.records import WebhookRecord
from shared.signing import webhook_signature_ok
from shared.sunco import Author, ConversationRef, Message, TextContent
from tests.harness import System
from threadline.natsserver import free_port


@pytest.fixture
def system(system_on_each_engine: System) -> System:
    """Every test here runs with the webhooks' state on SQLite, then on PostgreSQL."""
    return system_on_each_engine

SECRET = "whsec-integration-0123456789abcdef"
FAST_RETRIES = {
    "THREADLINE_WEBHOOK_RETRY_BASE_SECONDS": "0.05",
    "THREADLINE_WEBHOOK_RETRY_WINDOW_SECONDS": "30",
}


@dataclass
class Received:
    """One request the receiver got, and what it answered."""

    headers: dict[str, str]
    body: bytes
    status: int = 200

    @property
    def envelope(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed

    @property
    def event_ids(self) -> list[str]:
        return [e["id"] for e in self.envelope["events"]]


Responder = Callable[[Received], Awaitable[int]]


async def always_ok(_received: Received) -> int:
    return 200


@dataclass
class Receiver:
    """A business's webhook endpoint: records every POST, answers what `respond` says."""

    respond: Responder = always_ok
    requests: list[Received] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0

    async def start(self, port: int = 0) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = port or site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        received = Received(headers=dict(request.headers), body=await request.read())
        self.requests.append(received)
        received.status = await self.respond(received)
        return web.Response(status=received.status, text="ok")

    def accepted_event_ids(self, webhook_id: str | None = None) -> list[str]:
        """Event ids of 2xx-answered requests, in the order they arrived."""
        return [
            event_id for r in self.requests
            if 200 <= r.status < 300 and (webhook_id is None or r.headers["X-Threadline-Webhook-Id"] == webhook_id)
            for event_id in r.event_ids
        ]

    def requests_for(self, webhook_id: str) -> list[Received]:
        return [r for r in self.requests if r.headers["X-Threadline-Webhook-Id"] == webhook_id]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    try:
        yield r
    finally:
        await r.stop()


async def eventually(predicate: Callable[[], bool], timeout: float = 8.0, what: str = "condition") -> None:
    """Poll `predicate` until it holds (bounded)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def settled_row(store: Any, webhook_id: str, event_id: str, timeout: float = 8.0) -> dict[str, Any]:
    """The delivery row once it is delivered or failed (the receiver answers before the row is written)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        row: dict[str, Any] | None = await store.delivery(webhook_id, event_id)
        if row is not None and row["status"] != "pending":
            return row
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"delivery {event_id} not settled: {row}")
        await asyncio.sleep(0.01)


async def put_webhook(bus: Bus, app_id: str, target: str, triggers: tuple[str, ...] = ("conversation:message",),
                      secret: str = SECRET) -> WebhookRecord:
    """Write a webhook record to the KV bucket as `conversations` does."""
    record = WebhookRecord(id=new_id(), app_id=app_id, integration_id=new_id(), target=target,
                           triggers=list(triggers), secret=secret)
    kv = await bus.key_value(subjects.WEBHOOKS_BUCKET)
    await kv.put(records.webhook_key(app_id, record.id), records.ENCODER.encode(record))
    return record


async def add_webhook(bus: Bus, system: System, app_id: str, target: str,
                      triggers: tuple[str, ...] = ("conversation:message",), secret: str = SECRET) -> WebhookRecord:
    """Write a webhook record as `conversations` does, and wait until the service sees it."""
    record = await put_webhook(bus, app_id, target, triggers, secret)
    service = system.service("webhooks")
    await eventually(lambda: service.webhook(app_id, record.id) is not None, what="webhook in the KV mirror")
    return record


def message_created(app_id: str, conversation_id: str, text: str, event_id: str | None = None) -> MessageCreated:
    return MessageCreated(
        id=event_id or new_id(), app_id=app_id, conversation_id=conversation_id, created_at=time.time(),
        conversation=ConversationRef(id=conversation_id, type="personal"),
        message=Message(id=new_id(), received=iso(1_700_000_000), author=Author(type="user", user_id="f" * 24,
                                                                                display_name="Ada"),
                        content=TextContent(text=text)),
        cursor=1, user_id="f" * 24,
    )


async def publish(bus: Bus, event: ConversationEvent, msg_id: str | None = None) -> None:
    await bus.publish(subjects.event_subject(event.app_id, event.conversation_id),
                      conversation.encode(event), msg_id=msg_id or event.id)


async def stats(system: System) -> dict[str, int]:
    async with aiohttp.ClientSession() as session, session.get(system.service_url("webhooks") + "/stats") as resp:
        assert resp.status == 200
        data: dict[str, int] = await resp.json()
        return data


async def test_delivers_signed_sunco_envelope(bus: Bus, system: System, receiver: Receiver) -> None:
    await system.start("webhooks", env=FAST_RETRIES)
    app_id, conv_id = new_id(), new_id()
    hook = await add_webhook(bus, system, app_id, receiver.url)
    event = message_created(app_id, conv_id, "hello from the customer")
    with trace.get_tracer("test").start_as_current_span("customer sends") as root:
        await publish(bus, event)
    root_trace_id = format(root.get_span_context().trace_id, "032x")

    await eventually(lambda: len(receiver.requests) == 1, what="the delivery")
    got = receiver.requests[0]
    assert got.headers["X-API-Key"] == SECRET
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["User-Agent"] == "Threadline-Webhooks/0.1"
    assert got.headers["X-Threadline-Webhook-Id"] == hook.id
    assert webhook_signature_ok(SECRET, got.body, got.headers["X-Threadline-Signature"])
    assert not webhook_signature_ok("another-secret-0123456789", got.body, got.headers["X-Threadline-Signature"])
    # The delivery continues the trace of the event (publish → consume → POST).
    assert got.headers["traceparent"].split("-")[1] == root_trace_id

    envelope = got.envelope
    assert envelope["app"] == {"id": app_id}
    assert envelope["webhook"] == {"id": hook.id, "version": "v2"}
    assert len(envelope["events"]) == 1
    parsed = ConversationMessageEvent.from_dict(envelope["events"][0])
    assert parsed is not None and parsed.payload is not None
    assert parsed.id == event.id
    assert parsed.type == "conversation:message"
    assert parsed.created_at is not None and parsed.created_at.endswith("Z")
    assert parsed.payload.conversation is not None and parsed.payload.conversation.id == conv_id
    assert parsed.payload.message is not None
    assert parsed.payload.message.id == event.message.id
    assert parsed.payload.message.content.actual_instance.text == "hello from the customer"  # type: ignore[union-attr]
    assert parsed.payload.message.author.type == "user"  # type: ignore[union-attr]

    await eventually(lambda: receiver.requests[0].status == 200)
    service = system.service("webhooks")
    await eventually(lambda: service.dispatcher.stats()["delivered"] == 1, what="delivered count")
    assert (await stats(system))["delivered"] == 1
    assert (await stats(system))["pending"] == 0
    async with aiohttp.ClientSession() as session, \
            session.get(system.service_url("webhooks") + "/readyz") as resp:
        assert resp.status == 200


async def test_finished_rows_are_pruned_after_retention(bus: Bus, system: System, receiver: Receiver) -> None:
    await system.start("webhooks", env={**FAST_RETRIES, "THREADLINE_WEBHOOK_RETENTION_SECONDS": "0"})
    app_id = new_id()
    hook = await add_webhook(bus, system, app_id, receiver.url)
    event = message_created(app_id, new_id(), "short-lived")
    await publish(bus, event)
    service = system.service("webhooks")
    assert (await settled_row(service.store, hook.id, event.id))["status"] == "delivered"
    removed = await service.dispatcher.prune()
    assert removed["delivered"] == 1
    assert await service.store.delivery(hook.id, event.id) is None
    assert (await stats(system))["delivered"] == 0


async def test_deleted_webhook_stops_pending_deliveries(bus: Bus, system: System) -> None:
    port = free_port()  # nobody listens: every attempt fails and is retried
    await system.start("webhooks", env=FAST_RETRIES)
    app_id = new_id()
    hook = await add_webhook(bus, system, app_id, f"http://127.0.0.1:{port}/hook")
    event = message_created(app_id, new_id(), "for a webhook about to go")
    await publish(bus, event)
    service = system.service("webhooks")
    await eventually(lambda: service.dispatcher.stats()["pending"] == 1, what="pending row")
    kv = await bus.key_value(subjects.WEBHOOKS_BUCKET)
    await kv.delete(records.webhook_key(app_id, hook.id))
    row = await settled_row(service.store, hook.id, event.id)
    assert (row["status"], row["last_error"]) == ("failed", "webhook deleted")


async def test_triggers_and_apps_filter(bus: Bus, system: System, receiver: Receiver) -> None:
    await system.start("webhooks", env=FAST_RETRIES)
    app_id, other_app, conv_id = new_id(), new_id(), new_id()
    on_message = await add_webhook(bus, system, app_id, receiver.url, ("conversation:message",))
    on_create = await add_webhook(bus, system, app_id, receiver.url, ("conversation:create",))
    other = await add_webhook(bus, system, other_app, receiver.url, ("conversation:message", "conversation:create"))
    store = system.service("webhooks").store

    message = message_created(app_id, conv_id, "hi")
    await publish(bus, message)
    await eventually(lambda: receiver.accepted_event_ids(on_message.id) == [message.id], what="message webhook")
    # Rows for every matching webhook are written in one transaction before any is sent: had
    # the event matched the others, their rows would exist by now.
    assert await store.count_for_webhook(on_create.id) == 0
    assert await store.count_for_webhook(other.id) == 0

    created = ConversationCreated(id=new_id(), app_id=app_id, conversation_id=conv_id, created_at=1_700_000_001.0,
                                  conversation=ConversationRef(id=conv_id, type="personal"), creation_reason="message")
    await publish(bus, created)
    await eventually(lambda: receiver.accepted_event_ids(on_create.id) == [created.id], what="create webhook")
    parsed = ConversationCreateEvent.from_dict(receiver.requests_for(on_create.id)[0].envelope["events"][0])
    assert parsed is not None and parsed.type == "conversation:create"
    assert parsed.payload is not None and parsed.payload.creation_reason == "message"
    assert await store.count_for_webhook(on_message.id) == 1
    assert await store.count_for_webhook(other.id) == 0
    assert receiver.requests_for(other.id) == []


async def test_redelivered_event_is_sent_once(bus: Bus, system: System, receiver: Receiver) -> None:
    await system.start("webhooks", env=FAST_RETRIES)
    app_id, conv_id = new_id(), new_id()
    hook = await add_webhook(bus, system, app_id, receiver.url)
    first = message_created(app_id, conv_id, "one")
    second = message_created(app_id, conv_id, "two")
    # The same event twice past JetStream's de-duplication (as after a publisher crash).
    await publish(bus, first, msg_id="copy-1")
    await publish(bus, first, msg_id="copy-2")
    await publish(bus, second)
    await eventually(lambda: second.id in receiver.accepted_event_ids(hook.id), what="second event")
    assert receiver.accepted_event_ids(hook.id) == [first.id, second.id]


async def test_an_event_of_a_type_from_a_newer_version_waits_for_a_replica_that_knows_it(
        bus: Bus, system: System, receiver: Receiver, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """During a rolling upgrade a newer `conversations` publishes an event type this `webhooks`
    does not know: it is not thrown away (a newer replica will deliver it), and its
    conversation's later events wait behind it. A malformed event holds nothing up, nor does an
    unknown one once it is older than the patience (an upgrade rolled back)."""
    monkeypatch.setattr(bus_module, "NEWER_VERSION_RETRY_SECONDS", 0.1)
    await system.start("webhooks", env=FAST_RETRIES)
    app_id, waiting, malformed = new_id(), new_id(), new_id()
    hook = await add_webhook(bus, system, app_id, receiver.url)
    unknown = json.dumps({"type": "conversation.from.a.newer.version", "id": new_id(), "app_id": app_id,
                          "conversation_id": waiting, "created_at": time.time()}).encode()
    await bus.publish(subjects.event_subject(app_id, waiting), unknown, msg_id=new_id())
    await bus.publish(subjects.event_subject(app_id, malformed), b'{"type": "conversation.message.created", "id": 5}',
                      msg_id=new_id())
    later = {c: message_created(app_id, c, "later") for c in (waiting, malformed)}
    for event in later.values():
        await publish(bus, event)

    await eventually(lambda: later[malformed].id in receiver.accepted_event_ids(hook.id),
                     what="the event behind a malformed one")
    await eventually(lambda: sum("waiting for a newer replica" in r.getMessage() for r in caplog.records) >= 3,
                     what="the unknown event tried again")
    assert later[waiting].id not in receiver.accepted_event_ids(hook.id)  # it waits behind it

    monkeypatch.setattr(bus_module, "NEWER_VERSION_PATIENCE_SECONDS", 0.0)  # no newer replica came
    await eventually(lambda: later[waiting].id in receiver.accepted_event_ids(hook.id),
                     what="the event behind one given up")
    assert any("still unknown" in r.getMessage() for r in caplog.records)
