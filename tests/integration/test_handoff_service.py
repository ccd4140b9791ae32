"""The handoff service over real NATS: deep links, atomic redemption across replicas, QR codes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import msgspec
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.handoff.app import HandoffService, create
from shared import records, subjects
from shared.bus import Bus
from shared.ids import new_id
from shared.messages import handoff as msgs
from shared.records import IntegrationRecord
from tests.harness import System, service_credentials, without_credentials
from threadline.frontdoor import build_frontdoor
from threadline.natsserver import NatsServer, free_port

APP = new_id()
OTHER_APP = new_id()


def record(type_: str, app_id: str = APP, status: str = "active", **config: object) -> IntegrationRecord:
    return IntegrationRecord(id=new_id(), app_id=app_id, type=type_, status=status,  # type: ignore[arg-type]
                             display_name=type_, config=dict(config))


@dataclass
class Integrations:
    whatsapp: IntegrationRecord = field(default_factory=lambda: record("whatsapp", phoneNumber="+15550001111"))
    messenger: IntegrationRecord = field(default_factory=lambda: record("messenger", pageId="102290129340398"))
    telegram: IntegrationRecord = field(default_factory=lambda: record("telegram", username="threadline_demo_bot"))
    twilio: IntegrationRecord = field(default_factory=lambda: record("twilio", phoneNumber="+15550002222"))
    android: IntegrationRecord = field(default_factory=lambda: record("android"))
    ios: IntegrationRecord = field(default_factory=lambda: record("ios", universalLink="https://shop.example/go"))
    web: IntegrationRecord = field(default_factory=lambda: record("web", businessName="Acme Shop"))
    web_linked: IntegrationRecord = field(default_factory=lambda: record("web", linkUrl="https://shop.example/help"))
    inactive: IntegrationRecord = field(default_factory=lambda: record("telegram", status="inactive", username="x"))
    foreign: IntegrationRecord = field(default_factory=lambda: record("telegram", app_id=OTHER_APP, username="y"))

    def all(self) -> list[IntegrationRecord]:
        return list(vars(self).values())


@dataclass
class HandoffEnv:
    bus: Bus
    nats_url: str
    data_dir: Path
    integrations: Integrations
    base_url: str
    apps: list[HandoffService] = field(default_factory=list)
    frontdoor: web.AppRunner | None = None

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return {"THREADLINE_NATS_URL": without_credentials(self.nats_url), "THREADLINE_HTTP_HOST": "127.0.0.1",
                "THREADLINE_HTTP_PORT": "0", "THREADLINE_DATA_DIR": str(self.data_dir),
                "THREADLINE_SANDBOX": "0", "THREADLINE_PUBLIC_BASE_URL": self.base_url,
                **service_credentials("handoff"), **(extra or {})}

    async def start(self, extra: Mapping[str, str] | None = None) -> HandoffService:
        """Start one more replica; the front door routes /handoff/ to the first one."""
        app = create(self.env(extra))
        await app.start()
        self.apps.append(app)
        if self.frontdoor is None:
            self.frontdoor = web.AppRunner(build_frontdoor({"handoff": f"http://127.0.0.1:{app.port}"}),
                                           access_log=None)
            await self.frontdoor.setup()
            port = int(urlsplit(self.base_url).port or 0)
            await web.TCPSite(self.frontdoor, "127.0.0.1", port, reuse_address=True).start()
        return app

    async def stop(self, app: HandoffService) -> None:
        self.apps.remove(app)
        await app.stop()

    async def ask(self, request: msgs.HandoffMessage) -> msgs.HandoffUnion:
        subject = subjects.HANDOFF_ISSUE if isinstance(request, msgs.IssueLinks) else subjects.HANDOFF_REDEEM
        return msgs.decode(await self.bus.request(subject, msgs.encode(request)))

    async def issue(self, *targets: IntegrationRecord, conversation_id: str = "c1") -> list[msgs.LinkRequest]:
        reply = await self.ask(msgs.IssueLinks(app_id=APP, user_id="u1", conversation_id=conversation_id,
                                               integration_ids=[t.id for t in targets],
                                               source_integration_id=self.integrations.web.id))
        assert isinstance(reply, msgs.LinksIssued), reply
        return reply.links

    async def redeem(self, code: str, target: IntegrationRecord, sender: str = "+15551234567",
                     app_id: str = APP) -> msgs.HandoffUnion:
        return await self.ask(msgs.RedeemCode(app_id=app_id, integration_id=target.id, channel=target.type,
                                              channel_user_id=sender, code=code))

    async def close(self) -> None:
        if self.frontdoor is not None:
            await self.frontdoor.cleanup()
        for app in reversed(self.apps):
            await app.stop()


@pytest.fixture
async def handoff(nats_server: NatsServer, bus: Bus, tmp_path: Path) -> AsyncIterator[HandoffEnv]:
    integrations = Integrations()
    kv = await bus.key_value(subjects.INTEGRATIONS_BUCKET)
    for item in integrations.all():
        await kv.put(item.id, records.ENCODER.encode(item))
    env = HandoffEnv(bus=bus, nats_url=nats_server.url, data_dir=tmp_path / "data", integrations=integrations,
                     base_url=f"http://127.0.0.1:{free_port()}")
    try:
        yield env
    finally:
        await env.close()


def refusal(reply: msgs.HandoffUnion) -> str:
    assert isinstance(reply, msgs.CodeRefused), reply
    assert bool(reply.message) == (reply.reason != "repeated")  # a repeat is not answered
    return reply.reason


async def test_issue_builds_each_channel_deep_link(handoff: HandoffEnv) -> None:
    await handoff.start()
    i = handoff.integrations
    before = time.time()
    links = await handoff.issue(i.whatsapp, i.messenger, i.telegram, i.twilio, i.android, i.ios, i.web_linked)
    by_type = {link.type: link for link in links}
    assert [link.integration_id for link in links] == [i.whatsapp.id, i.messenger.id, i.telegram.id, i.twilio.id,
                                                       i.android.id, i.ios.id, i.web_linked.id]
    for link in links:
        assert msgs.CODE_PATTERN.match(link.code)
        assert before + 599 <= link.expires_at <= time.time() + 601
        assert link.qr_code_url.startswith(f"{handoff.base_url}/handoff/v1/qr/") and link.qr_code_url.endswith(".svg")
        expected_length = 10 if link.type in msgs.VISIBLE_CODE_CHANNELS else 24
        assert len(link.code) == expected_length, link
        wire = msgs.link_request_wire(link)
        assert wire["integrationId"] == link.integration_id and wire["expiresAt"].endswith("Z")
    wa = urlsplit(by_type["whatsapp"].url)
    assert (wa.scheme, wa.netloc, wa.path) == ("https", "wa.me", "/15550001111")
    assert parse_qs(wa.query)["text"] == [f"Continue my conversation with Acme Shop — code {by_type['whatsapp'].code}"]
    assert msgs.redemption_code(parse_qs(wa.query)["text"][0]) == by_type["whatsapp"].code
    assert by_type["messenger"].url == f"https://m.me/102290129340398?ref={by_type['messenger'].code}"
    assert by_type["telegram"].url == f"https://t.me/threadline_demo_bot?start={by_type['telegram'].code}"
    sms = by_type["twilio"].url
    assert sms.startswith("sms:+15550002222?body=")
    assert msgs.redemption_code(unquote(sms.split("?body=", 1)[1])) == by_type["twilio"].code
    assert by_type["android"].url == f"{handoff.base_url}/handoff/v1/open?code={by_type['android'].code}"
    assert by_type["ios"].url == f"https://shop.example/go?code={by_type['ios'].code}"
    assert by_type["web"].url == f"https://shop.example/help?threadline_code={by_type['web'].code}"


async def test_issue_refusals(handoff: HandoffEnv) -> None:
    await handoff.start()
    i = handoff.integrations
    for ids, status in (([new_id()], 404), ([i.foreign.id], 404), ([i.inactive.id], 404), ([], 400),
                        ([i.telegram.id, new_id()], 404), ([i.web.id], 400)):
        reply = await handoff.ask(msgs.IssueLinks(app_id=APP, user_id="u1", conversation_id="c1", integration_ids=ids))
        assert isinstance(reply, msgs.HandoffError) and reply.status == status, (ids, reply)
    no_link = await handoff.ask(msgs.IssueLinks(app_id=APP, user_id="u1", conversation_id="c1",
                                                integration_ids=[i.web.id]))
    assert isinstance(no_link, msgs.HandoffError) and "linkUrl" in no_link.title


async def test_web_link_falls_back_to_the_sandbox_page_in_sandbox_mode(handoff: HandoffEnv) -> None:
    await handoff.start({"THREADLINE_SANDBOX": "1"})
    (link,) = await handoff.issue(handoff.integrations.web)
    assert link.url == f"{handoff.base_url}/sandbox/?threadline_code={link.code}"


async def test_integration_created_after_start_is_found(handoff: HandoffEnv) -> None:
    await handoff.start()
    late = record("telegram", username="late_bot")
    await (await handoff.bus.key_value(subjects.INTEGRATIONS_BUCKET)).put(late.id, records.ENCODER.encode(late))
    (link,) = await handoff.issue(late)
    assert link.url.startswith("https://t.me/late_bot?start=")


async def test_redeem_outcomes(handoff: HandoffEnv) -> None:
    await handoff.start()
    i = handoff.integrations
    wa, tg = await handoff.issue(i.whatsapp, i.telegram, conversation_id="conv-9")
    assert refusal(await handoff.redeem(wa.code, i.twilio)) == "wrong_channel"
    assert refusal(await handoff.redeem(wa.code, i.foreign, app_id=OTHER_APP)) == "foreign"
    assert refusal(await handoff.redeem("TL00000000", i.whatsapp, sender="+15550000000")) == "unknown"
    redeemed = await handoff.redeem(wa.code.lower(), i.whatsapp)
    assert redeemed == msgs.CodeRedeemed(app_id=APP, user_id="u1", conversation_id="conv-9",
                                         integration_id=i.whatsapp.id, source_integration_id=i.web.id)
    # A second redemption links nothing: by the same sender it is a repeat (nothing to say), by
    # anyone else the code is used.
    repeat = await handoff.redeem(wa.code, i.whatsapp)
    assert refusal(repeat) == "repeated"
    assert refusal(await handoff.redeem(wa.code, i.whatsapp, sender="+15559999999")) == "used"
    assert isinstance(await handoff.redeem(tg.code, i.telegram, sender="4242"), msgs.CodeRedeemed)


async def test_expired_code_is_refused_and_its_qr_code_gone(handoff: HandoffEnv) -> None:
    await handoff.start({"THREADLINE_HANDOFF_CODE_TTL_SECONDS": "0.3"})
    (link,) = await handoff.issue(handoff.integrations.messenger)
    async with httpx.AsyncClient(timeout=5) as http:
        deadline = time.monotonic() + 5
        while (await http.get(link.qr_code_url)).status_code == 200:
            assert time.monotonic() < deadline, "the code never expired"
            await asyncio.sleep(0.05)
    reply = await handoff.redeem(link.code, handoff.integrations.messenger, sender="psid-1")
    assert refusal(reply) == "expired"
    assert isinstance(reply, msgs.CodeRefused) and reply.message.startswith("This link has expired.")


async def test_sender_rate_limit_and_code_burn(handoff: HandoffEnv) -> None:
    await handoff.start()
    i = handoff.integrations
    (valid,) = await handoff.issue(i.whatsapp)
    for n in range(5):
        assert refusal(await handoff.redeem(f"TL{n:08d}", i.whatsapp, sender="+15550006666")) == "unknown"
    # Over the limit the sender is refused without the code being looked at (so it stays valid).
    assert refusal(await handoff.redeem(valid.code, i.whatsapp, sender="+15550006666")) == "rate_limited"
    assert isinstance(await handoff.redeem(valid.code, i.whatsapp, sender="+15550007777"), msgs.CodeRedeemed)
    (target,) = await handoff.issue(i.twilio)
    for n in range(5):
        assert refusal(await handoff.redeem(target.code, i.whatsapp, sender=f"+1555000800{n}")) == "wrong_channel"
    # Burned: even its rightful channel cannot use it now.
    assert refusal(await handoff.redeem(target.code, i.twilio, sender="+15550009999")) == "expired"


async def test_fifty_concurrent_redemptions_across_two_replicas_link_once(handoff: HandoffEnv) -> None:
    first = await handoff.start()
    second = await handoff.start()
    assert first.port != second.port
    (link,) = await handoff.issue(handoff.integrations.telegram)
    replies = await asyncio.gather(*(handoff.redeem(link.code, handoff.integrations.telegram, sender=f"tg-{n}")
                                     for n in range(50)))
    winners = [r for r in replies if isinstance(r, msgs.CodeRedeemed)]
    assert len(winners) == 1 and winners[0].conversation_id == "c1"
    assert sorted(refusal(r) for r in replies if not isinstance(r, msgs.CodeRedeemed)) == ["used"] * 49
    # Both replicas took part (nats.micro spreads requests over its queue group).
    for replica in (first, second):
        assert replica.bus is not None
        stats = replica.bus._services[0].stats()
        served = sum(e.num_requests for e in stats.endpoints if e.subject == subjects.HANDOFF_REDEEM)
        assert served > 0


async def test_codes_survive_a_restart(handoff: HandoffEnv) -> None:
    first = await handoff.start()
    (link,) = await handoff.issue(handoff.integrations.telegram)
    await handoff.stop(first)
    await handoff.start()
    assert isinstance(await handoff.redeem(link.code, handoff.integrations.telegram), msgs.CodeRedeemed)


async def test_qr_code_and_open_page_over_the_front_door(handoff: HandoffEnv) -> None:
    await handoff.start()
    i = handoff.integrations
    wa, tg, android = await handoff.issue(i.whatsapp, i.telegram, i.android)
    async with httpx.AsyncClient(timeout=5) as http:
        for link in (wa, tg):
            resp = await http.get(link.qr_code_url)
            assert resp.status_code == 200
            assert resp.headers["content-type"] == "image/svg+xml"
            assert resp.headers["cache-control"] == "no-store"
            assert b"<svg" in resp.content and b"<path" in resp.content
        # The short code itself is never a QR path (it would make an unlimited guessing oracle).
        for path in (f"{wa.code}.svg", f"{new_id()}.svg", "TL00000000.svg", "..%2F..%2Fetc.svg", "x" * 100 + ".svg"):
            assert (await http.get(f"{handoff.base_url}/handoff/v1/qr/{path}")).status_code == 404, path
        assert isinstance(await handoff.redeem(tg.code, i.telegram), msgs.CodeRedeemed)
        assert (await http.get(tg.qr_code_url)).status_code == 404  # used: gone, as unknown ones are
        page = await http.get(android.url)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "phone where the app is installed" in page.text and android.code not in page.text


async def test_fuzzed_requests_never_break_the_service(handoff: HandoffEnv) -> None:
    await handoff.start()
    i = handoff.integrations
    ids = st.sampled_from([i.whatsapp.id, i.telegram.id, i.foreign.id, "", "x" * 300, new_id()])
    codes = st.one_of(st.text(max_size=80), st.text(alphabet="TL0123456789ABCDEFGHJKMNPQRSTVWXYZ", max_size=12),
                      st.text(min_size=1000, max_size=5000), st.just("attempts.x"), st.just("qr.x"))
    redeems = st.builds(msgs.RedeemCode, app_id=st.sampled_from([APP, OTHER_APP, "", "z" * 500]), integration_id=ids,
                        channel=st.text(max_size=20), channel_user_id=st.text(max_size=40), code=codes)
    raw = st.one_of(st.binary(max_size=200), redeems.map(msgs.encode),
                    st.dictionaries(st.text(max_size=10), st.text(max_size=10)).map(msgspec.json.encode))
    collected: list[bytes] = []

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(payload=raw)
    def cases(payload: bytes) -> None:
        collected.append(payload)

    cases()
    assert len(collected) >= 40
    for payload in collected:
        reply = msgs.decode(await handoff.bus.request(subjects.HANDOFF_REDEEM, payload))
        assert isinstance(reply, msgs.CodeRefused | msgs.HandoffError), (payload[:100], reply)
    # …and it still redeems a genuine code.
    (link,) = await handoff.issue(i.telegram)
    assert isinstance(await handoff.redeem(link.code, i.telegram, sender="after-fuzz"), msgs.CodeRedeemed)


async def test_started_by_the_harness_behind_the_front_door(system: System, bus: Bus) -> None:
    telegram = record("telegram", username="harness_bot")
    await (await bus.key_value(subjects.INTEGRATIONS_BUCKET)).put(telegram.id, records.ENCODER.encode(telegram))
    await system.start("handoff")
    reply = msgs.decode(await bus.request(subjects.HANDOFF_ISSUE, msgs.encode(msgs.IssueLinks(
        app_id=APP, user_id="u1", conversation_id="c1", integration_ids=[telegram.id]))))
    assert isinstance(reply, msgs.LinksIssued)
    (link,) = reply.links
    assert link.qr_code_url.startswith(f"{system.base_url}/handoff/v1/qr/")
    async with httpx.AsyncClient(timeout=5) as http:
        assert (await http.get(link.qr_code_url)).headers["content-type"] == "image/svg+xml"
        assert (await http.get(f"{system.base_url}/_svc/handoff/readyz")).status_code == 200
