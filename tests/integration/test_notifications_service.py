"""The notifications service against the real system: NATS, its database (SQLite, then PostgreSQL),
HTTP and the sandbox fakes.

A customer starts on the web messenger, moves to a channel through a handoff link and comes back
to the web, so the conversation's clients are [sdk (web, primary), channel]. The business replies
while no widget socket is open: after the (1 s) delay the customer is notified on the channel,
subject to that channel's reply window. Windows are moved by writing the service's store, never
by waiting.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from services.notifications.app import NotificationsService
from shared import subjects
from shared.bus import Bus
from shared.http import basic_auth_header
from shared.messages import notification as note
from shared.messages.sdk_presence import ENCODER as PRESENCE_ENCODER
from shared.messages.sdk_presence import ReplicaAlive, SocketPresence, replica_key, socket_key
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System, business_webhooks, start_sdk_session
from tests.integration.test_web_conversation import eventually
from threadline.bootstrap import AccountKey, bootstrap_sandbox

NOTIFY_ENV = {"THREADLINE_NOTIFY_DEFAULT_DELAY_SECONDS": "1", "THREADLINE_NOTIFY_TICK_SECONDS": "0.1"}
SERVICES = ("identity", "conversations", "webhooks", "handoff", "notifications", "web", "sandbox")
CHANNEL_SERVICE = {"whatsapp": "whatsapp", "messenger": "messenger", "twilio": "sms"}
TEMPLATE = {"name": "reply_waiting", "language": "en_US", "parameters": ["business", "text"]}
DAY = 24 * 3600.0
# A test whose store use another one here already makes on both engines runs on SQLite alone.
SQLITE_ONLY = pytest.mark.parametrize("engine_env", ["sqlite"], indirect=True)


@pytest.fixture
def system(system_on_each_engine: System) -> System:
    """The services' state on SQLite, then on PostgreSQL (but for tests marked `SQLITE_ONLY`)."""
    return system_on_each_engine


@dataclass
class Scene:
    http: aiohttp.ClientSession
    system: System
    info: dict[str, Any]
    auth: dict[str, str]
    events: list[dict[str, Any]]
    channel: str
    sender: str
    conversation_id: str = ""
    user_id: str = ""
    session: dict[str, Any] | None = None

    @property
    def base(self) -> str:
        return self.system.base_url

    @property
    def app_id(self) -> str:
        return str(self.info["appId"])

    def integration(self, kind: str) -> str:
        return str(self.info["integrations"][kind]["id"])

    @property
    def service(self) -> NotificationsService:
        service = self.system.service("notifications")
        assert isinstance(service, NotificationsService)
        return service

    async def outbox(self, kind: str | None = None, to: str | None = None) -> list[dict[str, Any]]:
        kind = kind or self.channel
        async with self.http.get(f"{self.base}/sandbox/{kind}/{self.integration(kind)}/outbox",
                                 params={"to": to or self.sender}) as resp:
            assert resp.status == 200, await resp.text()
            return list((await resp.json())["messages"])

    async def inbound(self, spec: dict[str, Any], kind: str | None = None) -> None:
        kind = kind or self.channel

        async def delivered() -> bool:
            async with self.http.post(f"{self.base}/sandbox/{kind}/{self.integration(kind)}/inbound",
                                      json=spec) as resp:
                body = await resp.json(content_type=None)
                return resp.status == 200 and body.get("webhookStatus", 200) == 200

        await eventually(delivered, timeout=20.0)

    async def web_message(self, text: str) -> None:
        assert self.session is not None
        url = f"{self.base}/sdk/v1/apps/{self.app_id}/conversations/{self.conversation_id}/messages"
        async with self.http.post(url, headers={"Authorization": f"Bearer {self.session['sessionToken']}"},
                                  json={"clientMessageId": uuid.uuid4().hex, "text": text}) as resp:
            assert resp.status == 202, await resp.text()

    async def reply(self, text: str) -> None:
        async with self.http.post(f"{self.base}/v2/apps/{self.app_id}/conversations/{self.conversation_id}/messages",
                                  headers=self.auth, json={"author": {"type": "business"},
                                                           "content": {"type": "text", "text": text}}) as resp:
            assert resp.status == 201, await resp.text()

    async def settings(self, notifications: dict[str, Any]) -> None:
        async with self.http.patch(f"{self.base}/v2/apps/{self.app_id}",
                                   headers=basic_auth_header(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                   json={"settings": {"notifications": notifications}}) as resp:
            assert resp.status == 200, await resp.text()
        # The service sees the app through the apps KV bucket.
        await eventually(lambda: _settings_seen(self.service, self.app_id, notifications), timeout=10.0)

    async def clients(self) -> list[dict[str, Any]]:
        async with self.http.get(f"{self.base}/v2/apps/{self.app_id}/conversations/{self.conversation_id}/participants",
                                 headers=self.auth) as resp:
            assert resp.status == 200, await resp.text()
            return list((await resp.json())["participants"][0]["clientAssociations"])

    async def channel_client_id(self) -> str:
        return next(c["clientId"] for c in await self.clients() if c["type"] == self.channel)

    async def sends(self) -> list[Any]:
        store = self.service.store
        assert store is not None
        return await store.sends(self.conversation_id)

    async def pending(self) -> Any:
        store = self.service.store
        assert store is not None
        return await store.pending(self.conversation_id)


async def _settings_seen(service: NotificationsService, app_id: str, wanted: dict[str, Any]) -> bool:
    assert service.notifier is not None
    record = service.notifier.lookups.app(app_id)
    return record is not None and record.settings.get("notifications", {}).get("delaySeconds") == \
        wanted.get("delaySeconds")


@asynccontextmanager
async def scene(system: System, tmp_path: Path, channel: str, sender: str, *,
                extra: tuple[str, ...] = (), extra_kinds: tuple[str, ...] = ()) -> AsyncIterator[Scene]:
    """web session → handoff to `channel` (+ a message there) → back on the web: [sdk, channel]."""
    async with business_webhooks() as (hook_url, events), aiohttp.ClientSession() as http:
        await system.start(*SERVICES, CHANNEL_SERVICE[channel], *extra, env=NOTIFY_ENV)
        kinds = tuple(dict.fromkeys(("web", channel, *extra_kinds)))
        info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                       str(tmp_path / "sbx"), kinds)
        s = Scene(http=http, system=system, info=info, events=events, channel=channel, sender=sender,
                  auth=basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"]))
        async with http.post(f"{s.base}/v2/apps/{s.app_id}/integrations", headers=s.auth, json={
                "type": "custom", "webhooks": [{"target": hook_url, "triggers": [
                    "notification:delivery:channel", "notification:delivery:failure"]}]}) as resp:
            assert resp.status == 201, await resp.text()
        s.session = await start_sdk_session(http, s.base, s.app_id, s.integration("web"), "hello from the web")
        s.conversation_id, s.user_id = s.session["conversationId"], s.session["appUserId"]
        async with http.post(f"{s.base}/v2/apps/{s.app_id}/users/{s.user_id}/linkRequests", headers=s.auth,
                             json={"integrationIds": [s.integration(channel)]}) as resp:
            assert resp.status == 201, await resp.text()
            url = (await resp.json())["linkRequests"][0]["url"]
        query = parse_qs(urlsplit(url).query)
        if channel == "messenger":
            await s.inbound({"from": sender, "ref": query["ref"][0]})
        else:
            await s.inbound({"from": sender, "text": query["text" if channel == "whatsapp" else "body"][0]})
        await eventually(lambda: _has_client(s), timeout=20.0)
        await s.inbound({"from": sender, "text": f"hi on {channel}"})
        await eventually(lambda: _stored(s, f"hi on {channel}"), timeout=20.0)
        await s.web_message("back on the web")
        await eventually(lambda: _primary_is(s, "sdk"), timeout=20.0)
        yield s


async def _stored(s: Scene, text: str) -> bool:
    async with s.http.get(f"{s.base}/v2/apps/{s.app_id}/conversations/{s.conversation_id}/messages",
                          headers=s.auth) as resp:
        return any(m["content"].get("text") == text for m in (await resp.json())["messages"])


async def _has_client(s: Scene) -> bool:
    return any(c["type"] == s.channel for c in await s.clients())


async def _primary_is(s: Scene, client_type: str) -> bool:
    clients = await s.clients()
    return bool(clients) and clients[0]["type"] == client_type


def notifications_in(outbox: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Outbox entries that are away notifications (free text naming the business, or a template)."""
    found = []
    for body in outbox:
        text = str(body.get("text", {}).get("body", "") if isinstance(body.get("text"), dict) else
                   body.get("message", {}).get("text", "") or body.get("Body", ""))
        if "replied:" in text or "messages. The latest" in text or body.get("type") == "template":
            found.append(body)
    return found


async def notification_count(s: Scene, at_least: int = 1) -> list[dict[str, Any]] | None:
    found = notifications_in(await s.outbox())
    return found if len(found) >= at_least else None


# --- WhatsApp -------------------------------------------------------------------------------------

async def test_unread_reply_notifies_on_whatsapp_free_text_inside_then_template_outside(
        system: System, tmp_path: Path) -> None:
    async with scene(system, tmp_path, "whatsapp", "+15557100001") as s:
        await s.settings({"delaySeconds": 1, "templates": {"whatsapp": TEMPLATE}})
        await s.reply("Your order shipped")
        found = await eventually(lambda: notification_count(s), timeout=10.0)
        assert found is not None
        assert found[0]["type"] == "text" and "Your order shipped" in found[0]["text"]["body"]
        assert "replied:" in found[0]["text"]["body"]
        # The business hears about it (notification:delivery:channel once the platform took it).
        channel_event = await eventually(lambda: _event(s, "notification:delivery:channel"), timeout=10.0)
        assert channel_event["payload"]["destination"] == {"type": "whatsapp",
                                                           "integrationId": s.integration("whatsapp")}
        assert channel_event["payload"]["conversation"]["id"] == s.conversation_id
        assert channel_event["payload"]["notification"]["id"].startswith(note.NOTIFICATION_ID_PREFIX)
        # 25 h after the customer last wrote on WhatsApp: only the template may go.
        store = s.service.store
        assert store is not None
        await store.set_last_inbound(await s.channel_client_id(), s.app_id, s.user_id, time.time() - 25 * 3600)
        await s.reply("Anything else?")
        found = await eventually(lambda: notification_count(s, 2), timeout=10.0)
        assert found is not None
        template = found[1]
        assert template["type"] == "template" and template["template"]["name"] == "reply_waiting"
        params = [p["text"] for p in template["template"]["components"][0]["parameters"]]
        assert params == ["Threadline Demo Shop", "Anything else?"]
        assert [x.kind for x in await s.sends()] == ["text", "template"]


async def _event(s: Scene, trigger: str, index: int = 0) -> dict[str, Any] | None:
    found = [e for e in s.events if e["type"] == trigger]
    return found[index] if len(found) > index else None


async def test_reading_before_the_delay_cancels_and_an_open_socket_postpones(
        system: System, tmp_path: Path, bus: Bus) -> None:
    async with scene(system, tmp_path, "whatsapp", "+15557100002") as s:
        await s.settings({"delaySeconds": 60})
        await s.reply("Are you there?")
        row = await eventually(s.pending, timeout=10.0)
        # The customer reads it in the widget: the pending notification is gone, nothing can fire.
        assert s.session is not None
        async with s.http.post(f"{s.base}/sdk/v1/apps/{s.app_id}/conversations/{s.conversation_id}/activity",
                               headers={"Authorization": f"Bearer {s.session['sessionToken']}"},
                               json={"type": "conversation:read"}) as resp:
            assert resp.status in (200, 202, 204), await resp.text()
        await eventually(lambda: _gone(s), timeout=10.0)
        notifier = s.service.notifier
        assert notifier is not None and s.service.store is not None
        # Another reply while a widget socket of the customer is open on the conversation:
        # when it falls due it is postponed by the delay, not sent.
        kv = await bus.key_value(subjects.SDK_PRESENCE_BUCKET, ttl=subjects.SDK_PRESENCE_TTL_SECONDS)
        await kv.put(socket_key("replica-t", "sock-test-1"), PRESENCE_ENCODER.encode(SocketPresence(
            app_id=s.app_id, user_id=s.user_id, client_id="c", conversation_id=s.conversation_id,
            integration_id=s.integration("web"), channel="web", replica_id="replica-t", written_at=time.time())))
        # The socket counts only while its replica's heartbeat is fresh.
        await asyncio.sleep(0.5)
        assert not s.service.presence.connected(s.user_id, s.conversation_id)
        await kv.put(replica_key("replica-t"), PRESENCE_ENCODER.encode(
            ReplicaAlive(replica_id="replica-t", updated_at=time.time())))
        await eventually(lambda: _presence_seen(s), timeout=10.0)
        await s.reply("Still there?")
        row = await eventually(s.pending, timeout=10.0)
        await s.service.store.postpone(s.conversation_id, row.notification_id, time.time() - 1)
        await notifier.fire_due()
        later = await s.pending()
        assert later is not None and later.due_at > time.time() + 30
        assert await s.sends() == [] and notifications_in(await s.outbox()) == []


async def _gone(s: Scene) -> bool:
    return await s.pending() is None


async def _presence_seen(s: Scene) -> bool:
    return s.service.presence.connected(s.user_id, s.conversation_id)


async def test_a_burst_is_one_notification_and_a_restart_mid_delay_sends_exactly_one(
        system: System, tmp_path: Path, engine_env: dict[str, str]) -> None:
    async with scene(system, tmp_path, "whatsapp", "+15557100003") as s:
        await s.settings({"delaySeconds": 600})
        for text in ("one", "two", "three"):
            await s.reply(text)
        row = await eventually(lambda: _pending_count(s, 3), timeout=10.0)
        # Killed mid-delay and started again on the same database and NATS.
        await system.restart_service("notifications", NOTIFY_ENV)
        store = s.service.store
        assert store is not None
        assert store.db.engine == ("postgres" if engine_env else "sqlite")
        again = await store.pending(s.conversation_id)
        assert again is not None and again.notification_id == row.notification_id
        await store.postpone(s.conversation_id, row.notification_id, time.time() - 1)
        found = await eventually(lambda: notification_count(s), timeout=10.0)
        assert found is not None and "3 messages" in found[0]["text"]["body"] and "three" in found[0]["text"]["body"]
        await eventually(lambda: _gone(s), timeout=10.0)
        assert s.service.notifier is not None
        await s.service.notifier.fire_due()
        assert len(notifications_in(await s.outbox())) == 1
        assert [x.id for x in await s.sends()] == [row.notification_id]


async def _pending_count(s: Scene, count: int) -> Any:
    row = await s.pending()
    return row if row is not None and row.unread_count == count else None


# --- Messenger ------------------------------------------------------------------------------------

@SQLITE_ONLY
async def test_messenger_human_agent_within_7_days_and_nothing_after(system: System, tmp_path: Path) -> None:
    async with scene(system, tmp_path, "messenger", "6100000000000201") as s:
        store = s.service.store
        assert store is not None
        client_id = await s.channel_client_id()
        await s.settings({"delaySeconds": 1})
        await store.set_last_inbound(client_id, s.app_id, s.user_id, time.time() - 2 * DAY)
        await s.reply("We found your parcel")
        found = await eventually(lambda: notification_count(s), timeout=10.0)
        assert found is not None
        assert found[0]["messaging_type"] == "MESSAGE_TAG" and found[0]["tag"] == "HUMAN_AGENT"
        assert "We found your parcel" in found[0]["message"]["text"]
        # Eight days: no send at all, a failure event says why.
        await store.set_last_inbound(client_id, s.app_id, s.user_id, time.time() - 8 * DAY)
        before = len(await s.outbox())
        await s.reply("Hello again")
        failure = await eventually(lambda: _event(s, "notification:delivery:failure"), timeout=10.0)
        assert failure["payload"]["error"]["code"] == "outside_messaging_window"
        assert failure["payload"]["destination"]["type"] == "messenger"
        assert failure["payload"]["user"]["id"] == s.user_id
        await eventually(lambda: _gone(s), timeout=10.0)
        assert len(await s.outbox()) == before  # the fake never saw it (it would have answered (#10))
        assert len(await s.sends()) == 1


# --- opt-ins --------------------------------------------------------------------------------------

async def test_sms_opt_in_start_wrong_code_confirm_expiry_and_stop(system: System, tmp_path: Path, bus: Bus) -> None:
    async with scene(system, tmp_path, "whatsapp", "+15557100004", extra=("sms",), extra_kinds=("twilio",)) as s:
        number = "+15558100004"

        async def ask(subject: str, request: note.NotificationMessage) -> note.NotificationUnion:
            return note.decode(await bus.request(subject, note.ENCODER.encode(request)))

        started = await ask(subjects.NOTIFICATIONS_OPTIN_START, note.StartOptIn(
            app_id=s.app_id, user_id=s.user_id, conversation_id=s.conversation_id, channel="twilio",
            address=number, source_integration_id=s.integration("web")))
        assert isinstance(started, note.OptInState) and started.status == "pending"
        assert started.masked_address.endswith("0004") and number not in started.masked_address
        texts = await eventually(lambda: _sms_texts(s, number), timeout=10.0)
        code = re.search(r"\b(\d{6})\b", texts[0])
        assert code is not None and "STOP" in texts[0]
        wrong = "000000" if code.group(1) != "000000" else "111111"
        refused = await ask(subjects.NOTIFICATIONS_OPTIN_CONFIRM, note.ConfirmOptIn(
            app_id=s.app_id, user_id=s.user_id, opt_in_id=started.opt_in_id, code=wrong))
        assert isinstance(refused, note.NotificationError) and refused.code == "wrong_code"
        other_user = await ask(subjects.NOTIFICATIONS_OPTIN_CONFIRM, note.ConfirmOptIn(
            app_id=s.app_id, user_id="someone-else", opt_in_id=started.opt_in_id, code=code.group(1)))
        assert isinstance(other_user, note.NotificationError) and other_user.status == 404
        confirmed = await ask(subjects.NOTIFICATIONS_OPTIN_CONFIRM, note.ConfirmOptIn(
            app_id=s.app_id, user_id=s.user_id, opt_in_id=started.opt_in_id, code=code.group(1)))
        assert isinstance(confirmed, note.OptInState) and confirmed.status == "confirmed"
        # A second opt-in whose code expired cannot be confirmed.
        second = await ask(subjects.NOTIFICATIONS_OPTIN_START, note.StartOptIn(
            app_id=s.app_id, user_id=s.user_id, conversation_id=s.conversation_id, channel="twilio",
            address="+15558100005"))
        assert isinstance(second, note.OptInState)
        store = s.service.store
        assert store is not None
        await store.db.execute("UPDATE optins SET code_expires_at = $1 WHERE id = $2", time.time() - 1,
                               second.opt_in_id)
        expired = await ask(subjects.NOTIFICATIONS_OPTIN_CONFIRM, note.ConfirmOptIn(
            app_id=s.app_id, user_id=s.user_id, opt_in_id=second.opt_in_id, code="123456"))
        assert isinstance(expired, note.NotificationError) and expired.code == "code_expired"
        # The confirmed opt-in comes first: the away notification goes by SMS, not WhatsApp.
        await s.settings({"delaySeconds": 1})
        await s.reply("Your table is ready")
        sms = await eventually(lambda: _sms_texts(s, number, "Your table is ready"), timeout=10.0)
        assert "replied:" in sms[-1]
        assert notifications_in(await s.outbox()) == []
        # The customer answers STOP on SMS: the opt-in ends (the message itself still reaches the business).
        await s.inbound({"from": number, "text": "STOP"}, kind="twilio")
        listed = await eventually(lambda: _stopped(ask, s, started.opt_in_id), timeout=10.0)
        assert listed.status == "stopped"


async def _sms_texts(s: Scene, number: str, containing: str = "") -> list[str] | None:
    texts = [str(m.get("Body", "")) for m in await s.outbox("twilio", number)]
    texts = [t for t in texts if containing in t]
    return texts or None


async def _stopped(ask: Any, s: Scene, opt_in_id: str) -> note.OptInState | None:
    reply = await ask(subjects.NOTIFICATIONS_OPTIN_LIST, note.ListOptIns(app_id=s.app_id, user_id=s.user_id))
    assert isinstance(reply, note.OptInsReply)
    found = next(o for o in reply.opt_ins if o.opt_in_id == opt_in_id)
    return found if found.status == "stopped" else None


@SQLITE_ONLY
async def test_whatsapp_opt_in_code_goes_in_the_template_and_bad_requests_are_refused(
        system: System, tmp_path: Path, bus: Bus) -> None:
    async with scene(system, tmp_path, "whatsapp", "+15557100006") as s:
        async def ask(request: note.NotificationMessage) -> note.NotificationUnion:
            return note.decode(await bus.request(subjects.NOTIFICATIONS_OPTIN_START, note.ENCODER.encode(request)))

        def start(**overrides: Any) -> note.StartOptIn:
            fields = {"app_id": s.app_id, "user_id": s.user_id, "conversation_id": s.conversation_id,
                      "channel": "whatsapp", "address": "+15557100066", **overrides}
            return note.StartOptIn(**fields)

        account = basic_auth_header(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET)
        for bad_settings, words in (({"quietHours": {"start": "22:00", "end": "07:00", "timezone": "Mars/Base"}},
                                     "IANA"),
                                    ({"quietHours": {"start": "25:00", "end": "07:00"}}, "HH:MM"),
                                    ({"delaySeconds": 0}, "delaySeconds"),
                                    ({"templates": {"whatsapp": {"name": "Bad Name"}}}, "template name")):
            async with s.http.patch(f"{s.base}/v2/apps/{s.app_id}", headers=account,
                                    json={"settings": {"notifications": bad_settings}}) as resp:
                assert resp.status == 400 and words in (await resp.json())["errors"][0]["title"]
        no_template = await ask(start())
        assert isinstance(no_template, note.NotificationError) and no_template.code == "template_not_configured"
        bad = await ask(start(address="5557100066"))
        assert isinstance(bad, note.NotificationError) and bad.status == 400
        foreign = await ask(start(integration_id=s.integration("web")))
        assert isinstance(foreign, note.NotificationError) and foreign.code == "invalid_integration"
        await s.settings({"delaySeconds": 5, "templates": {"whatsappOptIn": {"name": "optin_code",
                                                                               "parameters": ["code"]}}})
        started = await ask(start())
        assert isinstance(started, note.OptInState)
        sent = await eventually(lambda: s.outbox(to="+15557100066"), timeout=10.0)
        assert sent[0]["type"] == "template" and sent[0]["template"]["name"] == "optin_code"
        code = sent[0]["template"]["components"][0]["parameters"][0]["text"]
        assert re.fullmatch(r"\d{6}", code)
        # Five wrong codes lock it.
        wrong = "000000" if code != "000000" else "111111"
        for _ in range(5):
            await bus.request(subjects.NOTIFICATIONS_OPTIN_CONFIRM, note.ENCODER.encode(note.ConfirmOptIn(
                app_id=s.app_id, user_id=s.user_id, opt_in_id=started.opt_in_id, code=wrong)))
        locked = note.decode(await bus.request(subjects.NOTIFICATIONS_OPTIN_CONFIRM, note.ENCODER.encode(
            note.ConfirmOptIn(app_id=s.app_id, user_id=s.user_id, opt_in_id=started.opt_in_id, code=code))))
        assert isinstance(locked, note.NotificationError) and locked.code == "too_many_attempts"


async def test_email_opt_in_notifies_by_mail_with_a_working_opt_out_link(system: System, tmp_path: Path,
                                                                         bus: Bus) -> None:
    async with scene(system, tmp_path, "whatsapp", "+15557100007", extra_kinds=("email",)) as s:
        address = "alice@example.com"

        async def ask(subject: str, request: note.NotificationMessage) -> note.NotificationUnion:
            return note.decode(await bus.request(subject, note.ENCODER.encode(request)))

        started = await ask(subjects.NOTIFICATIONS_OPTIN_START, note.StartOptIn(
            app_id=s.app_id, user_id=s.user_id, conversation_id=s.conversation_id, channel="email", address=address))
        assert isinstance(started, note.OptInState) and started.masked_address == "a•••@example.com"
        mails = await eventually(lambda: _mails(s, address), timeout=10.0)
        code = re.search(r"\b(\d{6})\b", mails[0]["text"])
        assert code is not None
        confirmed = await ask(subjects.NOTIFICATIONS_OPTIN_CONFIRM, note.ConfirmOptIn(
            app_id=s.app_id, user_id=s.user_id, opt_in_id=started.opt_in_id, code=code.group(1)))
        assert isinstance(confirmed, note.OptInState) and confirmed.status == "confirmed"
        await s.settings({"delaySeconds": 1})
        await s.reply("Your refund is on its way")
        mails = await eventually(lambda: _mails(s, address, "New message from"), timeout=10.0)
        mail = mails[-1]
        assert "Your refund is on its way" in mail["text"]
        optout = next(link for link in mail["links"] if "/notifications/v1/optout?token=" in link)
        assert notifications_in(await s.outbox()) == []  # the opt-in came first
        channel_event = await eventually(lambda: _event(s, "notification:delivery:channel"), timeout=10.0)
        assert channel_event["payload"]["destination"]["type"] == "mailgun"  # SunCo's e-mail integration type
        assert channel_event["payload"]["destination"]["integrationId"] == s.info["integrations"]["email"]["id"]
        async with s.http.get(optout) as resp:
            assert resp.status == 200 and "any more" in await resp.text()
        async with s.http.get(f"{s.base}/notifications/v1/optout", params={"token": "forged.token"}) as resp:
            assert resp.status == 400
        listed = await ask(subjects.NOTIFICATIONS_OPTIN_LIST, note.ListOptIns(app_id=s.app_id, user_id=s.user_id))
        assert isinstance(listed, note.OptInsReply) and [o.status for o in listed.opt_ins] == ["stopped"]


async def _mails(s: Scene, to: str, subject: str = "") -> list[dict[str, Any]] | None:
    async with s.http.get(f"{s.base}/sandbox/mail", params={"to": to}) as resp:
        assert resp.status == 200, await resp.text()
        mails = [m for m in (await resp.json())["mails"] if subject in m["subject"]]
    return mails or None


@pytest.mark.parametrize("engine_env", ["postgres"], indirect=True)
async def test_two_replicas_decide_a_notification_once(system: System, tmp_path: Path) -> None:
    async with scene(system, tmp_path, "whatsapp", "+15557100009") as s:
        second = await system.start_replica("notifications", NOTIFY_ENV)
        try:
            first = s.service
            assert first.notifier is not None and second.notifier is not None  # type: ignore[attr-defined]
            await s.settings({"delaySeconds": 600})
            for text in ("one", "two"):
                await s.reply(text)
            row = await eventually(lambda: _pending_count(s, 2), timeout=10.0)
            mine = subjects.partition_of(s.conversation_id)
            holders = [r for r in (first, second) if mine in r.notifier.partitions]  # type: ignore[attr-defined]
            assert len(holders) == 1  # one replica decides on this conversation
            store = first.store
            assert store is not None
            await store.postpone(s.conversation_id, row.notification_id, time.time() - 1)
            # Both timers run; a pass of the replica without the partition fires nothing of it.
            await asyncio.gather(first.notifier.fire_due(), second.notifier.fire_due())  # type: ignore[attr-defined]
            found = await eventually(lambda: notification_count(s), timeout=10.0)
            await eventually(lambda: _gone(s), timeout=10.0)
            await asyncio.sleep(0.5)  # both timers tick again meanwhile
            assert found is not None and len(notifications_in(await s.outbox())) == 1
            assert [x.id for x in await s.sends()] == [row.notification_id]
        finally:
            await second.stop()
