"""SMS (and e-mail) pumping through the widget's "Notify me": limits per destination, per source
(client address behind trusted proxies, Origin), per app, the pending-code rule, and the same
budgets on away notifications to opted-in addresses. Real NATS, HTTP, sandbox fakes and the
service's database (SQLite, then PostgreSQL, for the tests that count on it).

Absence of a send is proven from the service's own record of what it published (every code and
notification it sends is recorded with the id JetStream de-duplicates on) and from the SMS
service having consumed everything, never by waiting.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.notifications import app as notifications_app
from services.notifications.app import NotificationsService
from shared import subjects
from shared.bus import Bus
from shared.http import basic_auth_header
from shared.messages import notification as note
from shared.signing import jwt_encode
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System, service_credentials, start_sdk_session
from tests.integration.test_notifications_service import SQLITE_ONLY, _sms_texts, notifications_in, scene
from tests.integration.test_web_conversation import ACCOUNT, eventually
from threadline.bootstrap import AccountKey, bootstrap_sandbox

SERVICES = ("identity", "conversations", "notifications", "sms", "web", "sandbox")
VICTIM = "+15550199001"


@dataclass
class Shop:
    http: aiohttp.ClientSession
    system: System
    info: dict[str, Any]

    @property
    def base(self) -> str:
        return self.system.base_url

    @property
    def app_id(self) -> str:
        return str(self.info["appId"])

    @property
    def web_id(self) -> str:
        return str(self.info["integrations"]["web"]["id"])

    @property
    def twilio_id(self) -> str:
        return str(self.info["integrations"]["twilio"]["id"])

    @property
    def notifications(self) -> NotificationsService:
        service = self.system.service("notifications")
        assert isinstance(service, NotificationsService)
        return service

    async def session(self, app_id: str | None = None, web_id: str | None = None) -> dict[str, Any]:
        """A new anonymous visitor (a new user, created by their first message) of the widget."""
        return await start_sdk_session(self.http, self.base, app_id or self.app_id, web_id or self.web_id)

    async def opt_in(self, session: dict[str, Any], address: str, *, channel: str = "sms", ip: str | None = None,
                     origin: str | None = None, app_id: str | None = None,
                     base: str | None = None) -> tuple[int, dict[str, Any], Any]:
        headers = {"Authorization": f"Bearer {session['sessionToken']}"}
        if ip is not None:
            headers["X-Forwarded-For"] = ip
        if origin is not None:
            headers["Origin"] = origin
        url = (f"{base or self.base}/sdk/v1/apps/{app_id or self.app_id}/conversations/"
               f"{session['conversationId']}/notificationOptIns")
        async with self.http.post(url, json={"channel": channel, "address": address}, headers=headers) as resp:
            return resp.status, await resp.json(), resp.headers

    async def confirm(self, session: dict[str, Any], opt_in_id: str, code: str) -> tuple[int, dict[str, Any]]:
        url = (f"{self.base}/sdk/v1/apps/{self.app_id}/conversations/{session['conversationId']}"
               f"/notificationOptIns/{opt_in_id}/confirm")
        async with self.http.post(url, json={"code": code},
                                  headers={"Authorization": f"Bearer {session['sessionToken']}"}) as resp:
            return resp.status, await resp.json()

    async def codes_published(self, address: str) -> int:
        """Confirmation codes `notifications` published to `address` (its record of every send)."""
        store = self.notifications.store
        assert store is not None
        return int(await store.db.fetchval("SELECT COUNT(*) FROM sends WHERE kind = 'code' AND recipient = $1",
                                           address))

    async def sms_outbox(self, number: str) -> list[str]:
        async with self.http.get(f"{self.base}/sandbox/twilio/{self.twilio_id}/outbox",
                                 params={"to": number}) as resp:
            assert resp.status == 200, await resp.text()
            return [str(m.get("Body", "")) for m in (await resp.json())["messages"]]

    async def sms_idle(self) -> bool:
        """The SMS service has taken every send command off the stream."""
        bus = self.system.service("sms").bus
        spec = subjects.channel_outbound_consumer("twilio")
        for partition in range(subjects.PARTITIONS):
            info = await bus.js.consumer_info(spec.stream.name, spec.durable(partition))
            if info.num_pending or info.num_ack_pending:
                return False
        return True


@pytest.fixture
def system(system_on_each_engine: System) -> System:
    """The services' state on SQLite, then on PostgreSQL (but for tests marked `SQLITE_ONLY`)."""
    return system_on_each_engine


@pytest.fixture
def limits_env() -> dict[str, str]:
    return {}


@pytest.fixture
async def shop(system: System, tmp_path: Path, limits_env: dict[str, str]) -> AsyncIterator[Shop]:
    await system.start(*SERVICES, env=limits_env)
    info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                   str(tmp_path / "sbx"), ("web", "twilio"))
    async with aiohttp.ClientSession() as http:
        yield Shop(http, system, info)


def assert_too_many(status: int, body: dict[str, Any], headers: Any, title: str) -> int:
    """A 429 in SunCo's error shape with a Retry-After in whole seconds; the seconds."""
    assert status == 429, body
    assert body == {"errors": [{"code": "too_many_requests", "title": title}]}
    retry = int(headers["Retry-After"])
    assert retry >= 1
    return retry


def numbers(count: int, start: int = 0) -> list[str]:
    return [f"+1555020{n:04d}" for n in range(start, start + count)]


async def test_eight_anonymous_sessions_asking_sms_to_one_number_send_one_code(shop: Shop) -> None:
    """The attack as reported: eight visitors (here eight client addresses too) ask for SMS
    notifications to the same number. One confirmation SMS goes out; every visitor gets the
    same answer; only the visitor whose request sent the code can confirm with it."""
    sessions = [await shop.session() for _ in range(8)]
    answers = []
    for index, session in enumerate(sessions):
        status, body, _ = await shop.opt_in(session, VICTIM, ip=f"198.51.100.{index + 1}")
        assert status == 201, body
        answers.append(body["optIn"])
    shapes = {(tuple(sorted(a)), a["channel"], a["maskedAddress"], a["status"]) for a in answers}
    assert shapes == {(("channel", "expiresAt", "id", "maskedAddress", "status"), "twilio", "+1••••••9001",
                       "pending")}
    assert len({a["id"] for a in answers}) == 8

    texts = await eventually(lambda: shop.sms_outbox(VICTIM), timeout=10.0)
    await eventually(shop.sms_idle, timeout=10.0)
    assert await shop.codes_published(VICTIM) == 1
    assert len(await shop.sms_outbox(VICTIM)) == 1
    code = re.search(r"\b(\d{6})\b", texts[0])
    assert code is not None

    # A visitor who got no code of their own cannot use the number owner's code: the same
    # answer as any wrong code (nothing tells a decoy from a real opt-in).
    status, refused = await shop.confirm(sessions[5], answers[5]["id"], code.group(1))
    assert (status, refused["errors"][0]["title"]) == (400, "Wrong code (4 tries left)")
    wrong = "000000" if code.group(1) != "000000" else "111111"
    status, refused = await shop.confirm(sessions[0], answers[0]["id"], wrong)
    assert (status, refused["errors"][0]["title"]) == (400, "Wrong code (4 tries left)")
    status, confirmed = await shop.confirm(sessions[0], answers[0]["id"], code.group(1))
    assert status == 200 and confirmed["optIn"]["status"] == "confirmed"


@pytest.mark.parametrize("limits_env", [{"THREADLINE_NOTIFY_CODE_LIMIT_PER_ADDRESS": "2/h,5/d"}])
async def test_a_pending_code_is_not_sent_again_and_each_address_has_a_budget(shop: Shop) -> None:
    first = await shop.session()
    status, body, _ = await shop.opt_in(first, VICTIM)
    assert status == 201
    opt_in = body["optIn"]
    # "Send a new code" from the same visitor while the code is pending: the same opt-in, no send
    # (the code they have still works).
    status, again, _ = await shop.opt_in(first, VICTIM.replace("+1", "+1 (").replace("0199", "0199) "))
    assert status == 201 and again["optIn"] == opt_in
    await eventually(lambda: shop.sms_outbox(VICTIM), timeout=10.0)
    assert await shop.codes_published(VICTIM) == 1

    # Once that code expired, a new request sends a new one: the second of this hour.
    store = shop.notifications.store
    assert store is not None
    await store.db.execute("UPDATE optins SET code_expires_at = $1 WHERE id = $2", time.time() - 1, opt_in["id"])
    status, second, _ = await shop.opt_in(await shop.session(), VICTIM)
    assert status == 201 and second["optIn"]["id"] != opt_in["id"]
    assert await shop.codes_published(VICTIM) == 2

    # The address's hourly budget is spent: a third code is refused, from any visitor or app,
    # even once the second one expired, and says when to retry.
    await store.db.execute("UPDATE optins SET code_expires_at = $1 WHERE id = $2", time.time() - 1,
                           second["optIn"]["id"])
    status, body, headers = await shop.opt_in(await shop.session(), VICTIM, ip="203.0.113.50")
    retry = assert_too_many(status, body, headers, "Too many codes were sent to this address")
    assert 3500 <= retry <= 3600
    async with shop.http.post(f"{shop.base}/v2/apps", json={"displayName": "Other shop"}, headers=ACCOUNT) as resp:
        other_app = (await resp.json())["app"]["id"]
    await _add_web_and_sms(shop, other_app)
    other_web = await _web_integration(shop, other_app)
    status, body, headers = await shop.opt_in(await shop.session(other_app, other_web), VICTIM, app_id=other_app)
    assert_too_many(status, body, headers, "Too many codes were sent to this address")
    await eventually(shop.sms_idle, timeout=10.0)
    assert await shop.codes_published(VICTIM) == 2
    assert len(await shop.sms_outbox(VICTIM)) == 2
    # Another number is not affected.
    status, _, _ = await shop.opt_in(await shop.session(), "+15550199002")
    assert status == 201


async def _add_web_and_sms(shop: Shop, app_id: str) -> None:
    for body in ({"type": "web", "displayName": "Other web"},
                 {"type": "twilio", "accountSid": "AC" + "1" * 32, "authToken": "t", "phoneNumber": "+15550003333"}):
        async with shop.http.post(f"{shop.base}/v2/apps/{app_id}/integrations", json=body, headers=ACCOUNT) as resp:
            assert resp.status == 201, await resp.text()


async def _web_integration(shop: Shop, app_id: str) -> str:
    async with shop.http.get(f"{shop.base}/v2/apps/{app_id}/integrations", headers=ACCOUNT) as resp:
        integrations = (await resp.json())["integrations"]
    web_id: str = next(i["id"] for i in integrations if i["type"] == "web")
    # The web service sees the new integration through the integrations KV bucket.
    await eventually(lambda: _served(shop, web_id), timeout=10.0)
    return web_id


async def _served(shop: Shop, web_id: str) -> bool:
    return shop.system.service("web").integrations.get(web_id) is not None


@pytest.mark.parametrize("limits_env", [{"THREADLINE_NOTIFY_OPTIN_LIMIT_PER_IP": "3/h"}])
@SQLITE_ONLY
async def test_opt_ins_are_limited_per_client_address_taken_from_trusted_proxies_only(shop: Shop) -> None:
    phones = iter(numbers(20))
    # Through the front door (loopback, trusted by default): X-Forwarded-For names the client.
    for _ in range(3):
        status, body, _ = await shop.opt_in(await shop.session(), next(phones), ip="198.51.100.7")
        assert status == 201, body
    status, body, headers = await shop.opt_in(await shop.session(), next(phones), ip="198.51.100.7")
    assert_too_many(status, body, headers, "Too many requests from your network")
    status, body, _ = await shop.opt_in(await shop.session(), next(phones), ip="198.51.100.8")
    assert status == 201, body
    # One IPv6 subscriber (a /64) is one source, whichever address it takes.
    for host in ("1", "2", "3"):
        status, body, _ = await shop.opt_in(await shop.session(), next(phones), ip=f"2001:db8:7:7::{host}")
        assert status == 201, body
    status, body, headers = await shop.opt_in(await shop.session(), next(phones), ip="2001:db8:7:7:ffff::9")
    assert_too_many(status, body, headers, "Too many requests from your network")
    published = sum([await shop.codes_published(n) for n in numbers(20)])
    assert published == 7

    # The same requests straight to `web` from a peer it does not trust: X-Forwarded-For is
    # ignored, so inventing addresses gets nowhere (every request is the peer's).
    await shop.system.restart_service("web", {"THREADLINE_TRUSTED_PROXIES": "none"})
    web_url = shop.system.service_url("web")
    for index in range(3):
        status, body, _ = await shop.opt_in(await shop.session(), next(phones), ip=f"203.0.113.{index}",
                                            base=web_url)
        assert status == 201, body
    status, body, headers = await shop.opt_in(await shop.session(), next(phones), ip="203.0.113.99", base=web_url)
    assert_too_many(status, body, headers, "Too many requests from your network")


@SQLITE_ONLY
async def test_one_visitor_asking_again_and_again_is_limited(shop: Shop) -> None:
    session = await shop.session()
    phones = numbers(6, start=100)
    for phone in phones[:5]:
        status, body, _ = await shop.opt_in(session, phone)
        assert status == 201, body
    status, body, headers = await shop.opt_in(session, phones[5])
    assert_too_many(status, body, headers, "You asked for too many codes")
    assert [await shop.codes_published(p) for p in phones] == [1, 1, 1, 1, 1, 0]


@pytest.mark.parametrize("limits_env", [{"THREADLINE_NOTIFY_OPTIN_LIMIT_PER_ORIGIN": "2/h"}])
@SQLITE_ONLY
async def test_opt_ins_are_limited_per_origin_of_an_app(shop: Shop) -> None:
    phones = iter(numbers(10))
    for index in range(2):
        status, body, _ = await shop.opt_in(await shop.session(), next(phones), ip=f"198.51.100.{index}",
                                            origin="https://evil.example")
        assert status == 201, body
    status, body, headers = await shop.opt_in(await shop.session(), next(phones), ip="198.51.100.9",
                                              origin="HTTPS://EVIL.EXAMPLE:443/")
    assert_too_many(status, body, headers, "Too many requests from this site")
    status, body, _ = await shop.opt_in(await shop.session(), next(phones), ip="198.51.100.10",
                                        origin="https://shop.example")
    assert status == 201, body


@pytest.mark.parametrize("limits_env", [{"THREADLINE_NOTIFY_CODE_LIMIT_PER_APP": "3/h,100/d"}])
@SQLITE_ONLY
async def test_each_app_has_a_budget_of_confirmations(shop: Shop) -> None:
    phones = numbers(5)
    for index, phone in enumerate(phones[:3]):
        status, body, _ = await shop.opt_in(await shop.session(), phone, ip=f"198.51.100.{index}")
        assert status == 201, body
    # Many numbers from many addresses (how pumping through premium numbers looks): the app's
    # budget stops it.
    status, body, headers = await shop.opt_in(await shop.session(), phones[3], ip="198.51.100.77")
    retry = assert_too_many(status, body, headers, "No more codes can be sent right now")
    assert 3500 <= retry <= 3600
    assert [await shop.codes_published(p) for p in phones] == [1, 1, 1, 0, 0]
    # Another app has its own budget.
    async with shop.http.post(f"{shop.base}/v2/apps", json={"displayName": "Other shop"}, headers=ACCOUNT) as resp:
        other_app = (await resp.json())["app"]["id"]
    await _add_web_and_sms(shop, other_app)
    other_web = await _web_integration(shop, other_app)
    status, body, _ = await shop.opt_in(await shop.session(other_app, other_web), phones[4], app_id=other_app,
                                        ip="198.51.100.78")
    assert status == 201, body


@pytest.mark.parametrize("limits_env", [{"THREADLINE_NOTIFY_CODE_LIMIT_PER_APP": "2/h"}])
async def test_limits_and_the_pending_rule_hold_across_two_replicas(shop: Shop, bus: Bus) -> None:
    """Two replicas of `notifications` on one database: what one counted, the other sees, and
    two requests racing on the two replicas for one number send one code."""
    second = notifications_app.create({**shop.system.env, **service_credentials("notifications"),
                                        "THREADLINE_NOTIFY_CODE_LIMIT_PER_APP": "2/h"})
    await second.start()
    try:
        first_notifier, second_notifier = shop.notifications.notifier, second.notifier
        assert first_notifier is not None and second_notifier is not None
        await eventually(lambda: _sees(second, shop.twilio_id), timeout=10.0)

        def start(user: str, address: str) -> bytes:
            return note.ENCODER.encode(note.StartOptIn(
                app_id=shop.app_id, user_id=user, conversation_id="c" * 24, channel="twilio", address=address,
                client_ip="198.51.100.1"))

        racing = await asyncio.gather(first_notifier.answer_optin(start("user-a", VICTIM), {}),
                                      second_notifier.answer_optin(start("user-b", VICTIM), {}))
        assert all(isinstance(note.decode(r), note.OptInState) for r in racing)
        assert await shop.codes_published(VICTIM) == 1
        other = note.decode(await second_notifier.answer_optin(start("user-c", "+15550199003"), {}))
        assert isinstance(other, note.OptInState)
        refused = note.decode(await first_notifier.answer_optin(start("user-d", "+15550199004"), {}))
        assert isinstance(refused, note.NotificationError)
        assert (refused.status, refused.code, refused.title) == (429, "too_many_requests",
                                                                 "No more codes can be sent right now")
        assert refused.retry_after is not None and 3500 <= refused.retry_after <= 3600
    finally:
        await second.stop()


async def _sees(service: NotificationsService, integration_id: str) -> bool:
    return service.notifier is not None and service.notifier.lookups.integration(integration_id) is not None


async def test_a_refusal_is_never_a_500_and_a_failed_send_does_not_hold_the_address(shop: Shop) -> None:
    """The SMS code cannot be published (the bus refuses): 503, and the next request sends."""
    notifier = shop.notifications.notifier
    assert notifier is not None
    real_publish = notifier.bus.publish
    failures = []

    async def broken(*args: Any, **kwargs: Any) -> Any:
        failures.append(args[0])
        raise TimeoutError

    notifier.bus.publish = broken  # type: ignore[method-assign]
    try:
        status, body, _ = await shop.opt_in(await shop.session(), VICTIM)
    finally:
        notifier.bus.publish = real_publish  # type: ignore[method-assign]
    assert status == 503 and failures, body
    status, body, _ = await shop.opt_in(await shop.session(), VICTIM)
    assert status == 201, body
    await eventually(lambda: shop.sms_outbox(VICTIM), timeout=10.0)
    assert await shop.codes_published(VICTIM) == 1


# --- away notifications to opted-in addresses ---------------------------------------------------

async def test_away_notifications_to_an_opted_in_number_have_a_budget(system: System, tmp_path: Path,
                                                                     bus: Bus) -> None:
    """Past the number's budget the opt-in is skipped and the next target (the customer's own
    WhatsApp, which they wrote from) gets the notification."""
    system.env["THREADLINE_NOTIFY_SEND_LIMIT_PER_ADDRESS"] = "1/h"
    async with scene(system, tmp_path, "whatsapp", "+15557100901", extra=("sms",), extra_kinds=("twilio",)) as s:
        number = "+15558100901"
        started = note.decode(await bus.request(subjects.NOTIFICATIONS_OPTIN_START, note.ENCODER.encode(
            note.StartOptIn(app_id=s.app_id, user_id=s.user_id, conversation_id=s.conversation_id,
                            channel="twilio", address=number))))
        assert isinstance(started, note.OptInState)
        texts = await eventually(lambda: _sms_texts(s, number), timeout=10.0)
        code = re.search(r"\b(\d{6})\b", texts[0])
        assert code is not None
        confirmed = note.decode(await bus.request(subjects.NOTIFICATIONS_OPTIN_CONFIRM, note.ENCODER.encode(
            note.ConfirmOptIn(app_id=s.app_id, user_id=s.user_id, opt_in_id=started.opt_in_id,
                              code=code.group(1)))))
        assert isinstance(confirmed, note.OptInState) and confirmed.status == "confirmed"
        await s.settings({"delaySeconds": 1})
        await s.reply("first reply")
        await eventually(lambda: _sms_texts(s, number, "first reply"), timeout=10.0)
        await eventually(lambda: _gone(s), timeout=10.0)
        await s.reply("second reply")
        found = await eventually(lambda: _whatsapp_notice(s, "second reply"), timeout=10.0)
        assert "replied:" in found["text"]["body"]
        sent = [(x.channel, x.kind) for x in await s.sends() if x.kind != "code"]
        assert sent == [("twilio", "text"), ("whatsapp", "text")]
        assert await _sms_texts(s, number, "second reply") is None


async def _gone(s: Any) -> bool:
    return await s.pending() is None


async def _whatsapp_notice(s: Any, text: str) -> dict[str, Any] | None:
    found = [m for m in notifications_in(await s.outbox()) if text in m.get("text", {}).get("body", "")]
    return found[0] if found else None


# --- an SDK login keeps what the session proved --------------------------------------------------

@SQLITE_ONLY
async def test_a_number_this_session_confirmed_goes_with_its_login(shop: Shop) -> None:
    """A visitor whose session typed an SMS opt-in's code proved it reads that number: its login
    identifies it with the number (same conversation), rather than leaving the number behind."""
    number = "+15550199021"
    visitor = await shop.session()
    status, body, _ = await shop.opt_in(visitor, number)
    assert status == 201, body
    texts = await eventually(lambda: shop.sms_outbox(number), timeout=10.0)
    code = re.search(r"\b(\d{6})\b", texts[-1])
    assert code is not None, texts
    status, confirmed = await shop.confirm(visitor, body["optIn"]["id"], code.group(1))
    assert status == 200 and confirmed["optIn"]["status"] == "confirmed", confirmed
    auth = basic_auth_header(shop.info["apiKey"]["id"], shop.info["apiKey"]["secret"])

    async def client_types(user: str) -> list[str]:
        async with shop.http.get(f"{shop.base}/v2/apps/{shop.app_id}/users/{user}/clients", headers=auth) as resp:
            assert resp.status == 200, await resp.text()
            return sorted(c["type"] for c in (await resp.json())["clients"])

    async def has_number() -> bool:
        return "twilio" in await client_types(visitor["appUserId"])

    await eventually(has_number, timeout=10.0)
    key = shop.info["apiKey"]
    jwt = jwt_encode({"scope": "user", "external_id": "optin-customer"}, key["secret"], key["id"])
    async with shop.http.post(f"{shop.base}/sdk/v1/apps/{shop.app_id}/sessions/login",
                              json={"externalId": "optin-customer", "jwt": jwt},
                              headers={"Authorization": f"Bearer {visitor['sessionToken']}"}) as resp:
        result = await resp.json()
        assert resp.status == 200, result
    assert result["outcome"] == "identified", result
    assert (result["appUserId"], result["conversationId"]) == (visitor["appUserId"], visitor["conversationId"])
    assert await client_types("optin-customer") == ["sdk", "twilio"]


async def test_one_pending_code_per_mailbox_whatever_the_spelling(shop: Shop, tmp_path: Path) -> None:
    """Case, a `+tag` or another app do not make another destination: one code is sent."""
    info = await bootstrap_sandbox(shop.base, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET), str(tmp_path / "sbx"),
                                   ("web", "twilio", "email"))
    assert "email" in info["integrations"]
    for spelling in ("victim9@example.com", "Victim9@Example.com", "VICTIM9+news@example.com"):
        status, body, _ = await shop.opt_in(await shop.session(), spelling, channel="email")
        assert status == 201 and body["optIn"]["status"] == "pending", body
    # A code mail is sent over SMTP before the opt-in is answered: all there is has arrived.
    async with shop.http.get(f"{shop.base}/sandbox/mail") as resp:
        assert len((await resp.json())["mails"]) == 1
