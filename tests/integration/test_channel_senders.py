"""The send path every platform channel shares (`shared.outbound.HttpChannelSender`), run against
each channel's sender: a real nats-server takes the statuses, a scripted platform on loopback
answers the calls over real HTTP through the egress policy.

What a channel adds of its own (wire formats, error tables, windows, segments, pauses) is tested
beside the channel; this suite proves the common behaviour holds for all four."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import pytest
from aiohttp import web

from services.messenger import handlers as messenger
from services.messenger.handlers import ReplyWindowPolicy, UserAction
from services.messenger.sender import MessengerSender
from services.messenger.store import Store as MessengerStore
from services.sms import handlers as sms
from services.sms.sender import SmsSender
from services.telegram import handlers as telegram
from services.telegram.sender import TelegramSender
from services.whatsapp import handlers as whatsapp
from services.whatsapp.sender import WhatsAppSender
from shared.bus import Bus, Delivery, Poison, Retry
from shared.db import DatabaseSettings
from shared.egress import REFUSED_CODE, EgressPolicy, parse_rules
from shared.messages import channel as channel_messages
from shared.messages.channel import DeliveryStatus, OutboundSend
from shared.outbound import HttpChannelSender, SendSettings
from shared.records import IntegrationRecord
from shared.sunco import TextContent

INTEGRATION = "int-1"
RECIPIENT = {"whatsapp": "15550001111", "messenger": "psid-1", "twilio": "+15550001111", "telegram": "4242"}
SETTINGS = SendSettings(retry_base_seconds=0.5, retry_max_seconds=4.0, max_send_attempts=3, send_timeout_seconds=5.0)


@dataclass
class Platform:
    """A scripted platform API: answers each call with the next (status, body) of `script`
    (the last one repeats) and records what it received."""

    script: list[tuple[int, bytes]] = field(default_factory=list)
    calls: list[web.Request] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    hold: asyncio.Event | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append(request)
        self.bodies.append(await request.read())
        if self.hold is not None:
            await self.hold.wait()
        status, body = self.script[0] if len(self.script) == 1 else self.script.pop(0)
        return web.Response(status=status, body=body, content_type="application/json")


@dataclass(frozen=True)
class ChannelCase:
    """What the suite needs to know of one channel."""

    name: Literal["whatsapp", "messenger", "twilio", "telegram"]
    config: Callable[[str], dict[str, Any]]  # the integration's config, given the platform's base URL
    accepted: tuple[int, bytes]  # an answer accepting a message…
    provider_id: str  # …and the provider id it carries
    refused: tuple[int, bytes]  # a permanent refusal…
    refused_code: str  # …and the error code reported for it


CASES = [
    ChannelCase("whatsapp", lambda url: {"phoneNumberId": "100", "accessToken": "wa-token", "appSecret": "s",
                                         "baseUrl": url},
                (200, b'{"messages": [{"id": "wamid.A1"}]}'), "wamid.A1",
                (400, b'{"error": {"code": 131026, "message": "Message undeliverable"}}'), "131026"),
    ChannelCase("messenger", lambda url: {"pageId": "200", "pageAccessToken": "page-token", "appSecret": "s",
                                          "baseUrl": url},
                (200, b'{"recipient_id": "psid-1", "message_id": "m_A1"}'), "m_A1",
                (400, b'{"error": {"code": 100, "message": "Invalid parameter"}}'), "100"),
    ChannelCase("twilio", lambda url: {"accountSid": "AC" + "a" * 32, "authToken": "sms-token",
                                    "phoneNumber": "+15550009999", "segmentsPerSecond": 1000, "baseUrl": url},
                (201, b'{"sid": "SM' + b"b" * 32 + b'", "status": "queued"}'), "SM" + "b" * 32,
                (400, b'{"code": 21211, "message": "Invalid To Phone Number"}'), "21211"),
    ChannelCase("telegram", lambda url: {"token": "123456:SECRET-TOKEN", "webhookSecret": "w", "botId": 123456,
                                         "baseUrl": url},
                (200, b'{"ok": true, "result": {"message_id": 7, "chat": {"id": 4242}}}'), "4242:7",
                (400, b'{"ok": false, "error_code": 400, "description": "Bad Request: chat not found"}'),
                "telegram_400"),
]


@dataclass
class Env:
    case: ChannelCase
    sender: HttpChannelSender[Any, Any]
    platform: Platform
    statuses: asyncio.Queue[DeliveryStatus]
    known: dict[str, IntegrationRecord]

    def command(self, message_id: str = "msg-1") -> OutboundSend:
        return OutboundSend(app_id="app-1", integration_id=INTEGRATION, channel=self.case.name,
                            conversation_id="conv-1", message_id=message_id, user_id="u-1", client_id="c-1",
                            recipient=RECIPIENT[self.case.name], content=TextContent(text="Hello ✓"))

    async def deliver(self, command: OutboundSend, attempt: int = 1) -> None:
        data = channel_messages.encode(command)
        await self.sender.on_outbound(data, {}, Delivery(channel_messages.subject_of(command), attempt, attempt))

    async def status(self) -> DeliveryStatus:
        return await asyncio.wait_for(self.statuses.get(), 10)


def _sender(case: ChannelCase, bus: Bus, session: Any, lookup: Callable[[str], Any], store: MessengerStore | None,
            ) -> HttpChannelSender[Any, Any]:
    if case.name == "whatsapp":
        return WhatsAppSender(bus, session, SETTINGS, lookup, 1000.0)
    if case.name == "messenger":
        assert store is not None
        return MessengerSender(bus, session, SETTINGS, lookup, store, ReplyWindowPolicy(86400, 7 * 86400),
                               1000.0, 1000.0)
    if case.name == "twilio":
        return SmsSender(bus, session, SETTINGS, lookup, 1000.0, 1.0)
    return TelegramSender(bus, session, SETTINGS, lookup, 1000.0, 1000.0, 1000.0)


@pytest.fixture(params=CASES, ids=lambda case: case.name)
async def env(request: pytest.FixtureRequest, bus: Bus, tmp_path: Path) -> AsyncIterator[Env]:
    case: ChannelCase = request.param
    platform = Platform(script=[case.accepted])
    app = web.Application()
    app.router.add_post("/{tail:.*}", platform.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base_url = f"http://127.0.0.1:{port}"
    record = IntegrationRecord(id=INTEGRATION, app_id="app-1", type=case.name, config=case.config(base_url))
    known = {INTEGRATION: record}
    credentials: Callable[[IntegrationRecord], Any] = {
        "whatsapp": whatsapp.Credentials.from_record, "messenger": messenger.Credentials.from_record,
        "twilio": lambda record: sms.Credentials.from_record(record, "http://127.0.0.1:9"),
        "telegram": telegram.Credentials.from_record}[case.name]

    def lookup(integration_id: str) -> Any:
        found = known.get(integration_id)
        return credentials(found) if found is not None else None

    store = None
    if case.name == "messenger":
        store = await MessengerStore.open(DatabaseSettings(sqlite_path=str(tmp_path / "messenger.db"),
                                                          schema="messenger"))
        await store.touch_windows([UserAction(page_id="200", psid=RECIPIENT["messenger"], at=time.time())])
    policy = EgressPolicy(allow_http=True, rules=parse_rules(f"127.0.0.1:{port}"))
    session = policy.http_session("platform", timeout=SETTINGS.client_timeout())
    statuses: asyncio.Queue[DeliveryStatus] = asyncio.Queue()

    async def on_status(msg: Any) -> None:
        decoded = channel_messages.decode(msg.data)
        assert isinstance(decoded, DeliveryStatus)
        await statuses.put(decoded)

    subscription = await bus.nc.subscribe(f"status.{case.name}.>", cb=on_status)
    try:
        yield Env(case, _sender(case, bus, session, lookup, store), platform, statuses, known)
    finally:
        await subscription.unsubscribe()
        await session.close()
        await runner.cleanup()
        if store is not None:
            await store.close()


async def test_a_send_is_posted_once_and_reported_sent_with_the_provider_id(env: Env) -> None:
    await env.deliver(env.command())
    status = await env.status()
    assert (status.status, status.provider_message_id, status.message_id, status.channel) == (
        "sent", env.case.provider_id, "msg-1", env.case.name)
    assert len(env.platform.calls) == 1
    assert b"Hello" in env.platform.bodies[0]
    # A redelivery of a sent command reports again and never reaches the platform.
    await env.deliver(env.command(), attempt=2)
    again = await env.status()
    assert (again.status, again.provider_message_id) == ("sent", env.case.provider_id)
    assert len(env.platform.calls) == 1


async def test_a_transient_failure_is_retried_with_backoff_then_given_up(env: Env) -> None:
    env.platform.script = [(500, b"{}")]
    with pytest.raises(Retry) as first:
        await env.deliver(env.command(), attempt=1)
    with pytest.raises(Retry) as second:
        await env.deliver(env.command(), attempt=2)
    assert (first.value.delay, second.value.delay) == (0.5, 1.0)
    await env.deliver(env.command(), attempt=SETTINGS.max_send_attempts)  # the last one: reported
    status = await env.status()
    assert status.status == "failed" and status.error_code in ("http_500", "telegram_500")
    assert len(env.platform.calls) == 3


async def test_a_permanent_refusal_is_reported_at_once_with_the_platforms_code(env: Env) -> None:
    env.platform.script = [env.case.refused]
    await env.deliver(env.command())
    status = await env.status()
    assert (status.status, status.error_code) == ("failed", env.case.refused_code)
    assert status.error_title and status.provider_message_id == ""
    assert len(env.platform.calls) == 1


async def test_an_unknown_integration_waits_for_the_mirror_then_fails(env: Env) -> None:
    env.known.clear()
    with pytest.raises(Retry):
        await env.deliver(env.command(), attempt=1)
    await env.deliver(env.command(), attempt=SETTINGS.max_send_attempts)
    status = await env.status()
    assert status.status == "failed" and "integration" in (status.error_title or "").lower()
    assert env.platform.calls == []


async def test_a_redelivery_while_the_first_is_sending_waits_instead_of_sending_twice(env: Env) -> None:
    env.platform.hold = asyncio.Event()
    first = asyncio.create_task(env.deliver(env.command()))
    for _ in range(200):
        if env.platform.calls:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(Retry, match="already being sent"):
        await env.deliver(env.command(), attempt=2)
    env.platform.hold.set()
    await first
    assert (await env.status()).status == "sent"
    assert len(env.platform.calls) == 1


async def test_an_unreachable_platform_is_transient_and_leaks_no_credential(env: Env) -> None:
    await env.sender.session.close()
    env.sender.session = EgressPolicy(allow_http=True, rules=parse_rules("127.0.0.1:1")).http_session(
        "platform", timeout=SETTINGS.client_timeout())
    record = env.known[INTEGRATION]
    env.known[INTEGRATION] = msgspec.structs.replace(record, config={**record.config, "baseUrl": "http://127.0.0.1:1"})
    with pytest.raises(Retry) as retried:
        await env.deliver(env.command(), attempt=1)
    await env.deliver(env.command(), attempt=SETTINGS.max_send_attempts)
    status = await env.status()
    assert status.status == "failed"
    for text in (str(retried.value), status.error_title or "", status.error_details or ""):
        assert "TOKEN" not in text and "token" not in text.replace("Token", "")


async def test_a_url_the_egress_policy_refuses_is_reported_failed_at_once(env: Env) -> None:
    record = env.known[INTEGRATION]
    env.known[INTEGRATION] = msgspec.structs.replace(record, config={**record.config, "baseUrl": "http://10.1.2.3"})
    await env.deliver(env.command())
    status = await env.status()
    assert (status.status, status.error_code) == ("failed", REFUSED_CODE)
    assert env.platform.calls == []


async def test_an_undecodable_command_is_poison(env: Env) -> None:
    with pytest.raises(Poison):
        await env.sender.on_outbound(b"{not json", {}, Delivery("outbound.x", 1, 1))
