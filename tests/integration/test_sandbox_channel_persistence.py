"""The sandbox's Messenger, Telegram and Twilio fakes keep their phones' threads across a sandbox
restart (JSON lines under the data directory, replayed at start), like the fake WhatsApp."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from services.sandbox.app import SandboxService
from services.sandbox.messenger_fake import FakeMessenger
from services.sandbox.telegram_fake import FakeTelegram
from services.sandbox.twilio_fake import FakeTwilio
from shared import records, subjects
from shared.bus import Bus
from shared.ids import new_id
from shared.records import IntegrationRecord
from tests.fakes.whatsapp_env import eventually
from tests.harness import System

PAGE_ID = "102290129340398"
PAGE_TOKEN = "EAAGsandbox-page-token-0123"
BOT_TOKEN = "1234567890:AAE-sandbox_bot_token_0123456789"
BOT_USERNAME = "threadline_demo_bot"
ACCOUNT_SID = "AC" + "b" * 32
AUTH_TOKEN = "sandbox-auth-token-0123456789"
SMS_NUMBER = "+15550002222"
PSID = "7100000000000001"
TG_USER = 424242001
SMS_CUSTOMER = "+15557654321"


@dataclass
class Channels:
    """The three channel integrations the sandbox fakes, as records in the integrations bucket."""

    system: System
    messenger: IntegrationRecord
    telegram: IntegrationRecord
    twilio: IntegrationRecord

    @property
    def sandbox(self) -> SandboxService:
        return self.system.service("sandbox")  # type: ignore[no-any-return]

    def fake(self, kind: type[Any]) -> Any:
        return next(f for f in self.sandbox.channel_fakes if isinstance(f, kind))

    def sandbox_json_entries(self) -> dict[str, dict[str, Any]]:
        """What `threadline up` writes to sandbox.json for these integrations (secrets included)."""
        return {kind: {"id": record.id, **record.config} for kind, record in
                (("messenger", self.messenger), ("telegram", self.telegram), ("twilio", self.twilio))}


def channel_records(base_url: str) -> tuple[IntegrationRecord, IntegrationRecord, IntegrationRecord]:
    """One messenger, telegram and twilio integration whose platform APIs are the sandbox's fakes."""
    app_id = new_id()
    messenger = IntegrationRecord(id=new_id(), app_id=app_id, type="messenger", display_name="Messenger", config={
        "pageId": PAGE_ID, "pageName": "Threadline Demo Shop", "pageAccessToken": PAGE_TOKEN,
        "appSecret": "ms-app-secret-0123456789", "verifyToken": "verify-0123", "apiVersion": "v23.0",
        "baseUrl": f"{base_url}/sandbox/messenger-graph"})
    telegram = IntegrationRecord(id=new_id(), app_id=app_id, type="telegram", display_name="Telegram", config={
        "token": BOT_TOKEN, "username": BOT_USERNAME, "baseUrl": f"{base_url}/sandbox/telegram-api"})
    twilio = IntegrationRecord(id=new_id(), app_id=app_id, type="twilio", display_name="SMS", config={
        "accountSid": ACCOUNT_SID, "authToken": AUTH_TOKEN, "phoneNumber": SMS_NUMBER,
        "baseUrl": f"{base_url}/sandbox/twilio-api"})
    return messenger, telegram, twilio


async def add_channels(system: System, bus: Bus) -> Channels:
    """Put the three records in the integrations bucket; wait until the (running) sandbox fakes them."""
    channels = Channels(system, *channel_records(system.base_url))
    kv = await bus.key_value(subjects.INTEGRATIONS_BUCKET)
    for record in (channels.messenger, channels.telegram, channels.twilio):
        await kv.put(record.id, records.ENCODER.encode(record))
    await synced(channels)
    return channels


async def synced(channels: Channels) -> None:
    async def all_there() -> bool:
        channels.sandbox.sync_accounts()
        return (channels.messenger.id in channels.fake(FakeMessenger).accounts
                and channels.telegram.id in channels.fake(FakeTelegram).bots
                and channels.twilio.id in channels.fake(FakeTwilio).accounts)

    await eventually(all_there)


async def restart_sandbox(channels: Channels) -> None:
    await channels.system.restart_service("sandbox")
    await synced(channels)


async def thread(http: httpx.AsyncClient, kind: str, integration_id: str, to: str) -> dict[str, Any]:
    resp = await http.get(f"/sandbox/{kind}/{integration_id}/thread", params={"to": to})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def test_messenger_thread_survives_a_sandbox_restart(system: System, bus: Bus) -> None:
    await system.start("sandbox")
    channels = await add_channels(system, bus)
    iid = channels.messenger.id
    async with httpx.AsyncClient(base_url=system.base_url) as http:
        inbound = await http.post(f"/sandbox/messenger/{iid}/inbound",
                                  json={"from": PSID, "name": "Ada", "text": "hi"})
        assert inbound.status_code == 200, inbound.text
        send_api = f"/sandbox/messenger-graph/v23.0/{PAGE_ID}/messages"
        sent = await http.post(send_api, params={"access_token": PAGE_TOKEN},
                               json={"recipient": {"id": PSID}, "messaging_type": "RESPONSE",
                                     "message": {"text": "kept", "quick_replies": [
                                         {"content_type": "text", "title": "Beans", "payload": "BEANS"}]}})
        assert sent.status_code == 200, sent.text
        assert (await http.post(f"/sandbox/messenger/{iid}/read", json={"to": PSID})).status_code == 200
        before = await thread(http, "messenger", iid, PSID)
        assert [m["direction"] for m in before["messages"]] == ["in", "out"]
        assert before["messages"][1]["status"] == "read"
        assert (Path(system.data_dir) / "sandbox-messenger.jsonl").is_file()

        await restart_sandbox(channels)
        after = await thread(http, "messenger", iid, PSID)
        assert after == before
        # The person is known again: the Page can still answer within the window.
        again = await http.post(send_api, params={"access_token": PAGE_TOKEN},
                                json={"recipient": {"id": PSID}, "messaging_type": "RESPONSE",
                                      "message": {"text": "after the restart"}})
        assert again.status_code == 200, again.text
        # A second start replays the compacted journal: nothing is lost by compaction.
        await restart_sandbox(channels)
        assert [m["body"]["message"]["text"] for m in (await thread(http, "messenger", iid, PSID))["messages"]
                if m["direction"] == "out"] == ["kept", "after the restart"]


async def test_telegram_chat_webhook_and_ids_survive_a_sandbox_restart(system: System, bus: Bus) -> None:
    await system.start("sandbox")
    channels = await add_channels(system, bus)
    iid = channels.telegram.id
    api = f"/sandbox/telegram-api/bot{BOT_TOKEN}"
    hook = f"{system.base_url}/webhooks/telegram/{iid}"
    async with httpx.AsyncClient(base_url=system.base_url) as http:
        assert (await http.post(f"{api}/setWebhook", json={"url": hook, "secret_token": "s3cret"})).json()["ok"]
        first = await http.post(f"/sandbox/telegram/{iid}/inbound",
                                json={"from": TG_USER, "name": "Ada L", "text": "hi"})
        assert first.status_code == 200, first.text
        keyboard = {"inline_keyboard": [[{"text": "Track", "callback_data": "TRACK"}]]}
        sent = await http.post(f"{api}/sendMessage",
                               json={"chat_id": TG_USER, "text": "kept", "reply_markup": keyboard})
        assert sent.json()["ok"], sent.text
        pressed = await http.post(f"/sandbox/telegram/{iid}/inbound", json={"from": TG_USER, "callbackData": "TRACK"})
        assert pressed.status_code == 200, pressed.text
        before = await thread(http, "telegram", iid, str(TG_USER))
        assert len(before["messages"]) == 3 and before["messages"][2]["callbackQuery"]["data"] == "TRACK"
        last_update = channels.fake(FakeTelegram).deliveries[-1].update["update_id"]

        await restart_sandbox(channels)
        fake = channels.fake(FakeTelegram)
        assert fake.deliveries == []  # a new instance
        assert await thread(http, "telegram", iid, str(TG_USER)) == before
        info = (await http.get(f"{api}/getWebhookInfo")).json()["result"]
        assert info["url"] == hook  # the gateway registered it once; the sandbox remembers
        # The bot can still write to the chat, and new ids never repeat ones the gateway has seen.
        assert (await http.post(f"{api}/sendMessage", json={"chat_id": TG_USER, "text": "again"})).json()["ok"]
        later = await http.post(f"/sandbox/telegram/{iid}/inbound", json={"from": TG_USER, "text": "still here"})
        assert later.json()["messageId"] == first.json()["messageId"] + 3
        delivered = fake.deliveries[-1]
        assert delivered.update["update_id"] == last_update + 1
        assert delivered.headers["X-Telegram-Bot-Api-Secret-Token"] == "s3cret"
        await restart_sandbox(channels)  # the compacted journal replays to the same chat
        assert len((await thread(http, "telegram", iid, str(TG_USER)))["messages"]) == 5


async def test_sms_thread_resources_and_opt_out_survive_a_sandbox_restart(system: System, bus: Bus) -> None:
    await system.start("sandbox")
    channels = await add_channels(system, bus)
    iid = channels.twilio.id
    api = f"/sandbox/twilio-api/2010-04-01/Accounts/{ACCOUNT_SID}"
    async with httpx.AsyncClient(base_url=system.base_url, auth=(ACCOUNT_SID, AUTH_TOKEN)) as http:
        mms = await http.post(f"/sandbox/twilio/{iid}/inbound", json={
            "from": SMS_CUSTOMER, "text": "a picture", "mediaUrl": f"{system.base_url}/sandbox/static/x.png"})
        assert mms.status_code == 200, mms.text
        sent = await http.post(f"{api}/Messages.json", data={
            "To": SMS_CUSTOMER, "From": SMS_NUMBER, "Body": "kept",
            "StatusCallback": f"{system.base_url}/webhooks/twilio/{iid}/status"})
        assert sent.status_code == 201, sent.text
        await channels.fake(FakeTwilio).drain()
        stop = await http.post(f"/sandbox/twilio/{iid}/inbound", json={"from": SMS_CUSTOMER, "text": "STOP"})
        assert stop.status_code == 200
        before = await thread(http, "twilio", iid, SMS_CUSTOMER)
        assert [m["direction"] for m in before["messages"]] == ["in", "out", "in"]
        assert before["messages"][1]["status"] == "delivered" and before["optedOut"] is True
        media_url = before["messages"][0]["body"]["MediaUrl0"]

        await restart_sandbox(channels)
        assert await thread(http, "twilio", iid, SMS_CUSTOMER) == before
        fetched = await http.get(f"{api}/Messages/{sent.json()['sid']}.json")
        assert fetched.status_code == 200 and fetched.json()["status"] == "delivered"
        media = await http.get(media_url.removeprefix(system.base_url))
        assert media.status_code == 200 and media.headers["Content-Type"] == "image/png"
        refused = await http.post(f"{api}/Messages.json", data={"To": SMS_CUSTOMER, "From": SMS_NUMBER, "Body": "x"})
        assert refused.status_code == 400 and refused.json()["code"] == 21610  # still opted out
        await restart_sandbox(channels)  # the compacted journal replays to the same state
        assert await thread(http, "twilio", iid, SMS_CUSTOMER) == before


def test_channel_journals_skip_a_torn_line_and_compact(tmp_path: Path) -> None:
    path = tmp_path / "messenger.jsonl"
    fake = FakeMessenger(store_path=str(path))
    fake.person("i1", PSID, "Ada")
    fake.person("i1", PSID, "Ada Lovelace")
    assert len(path.read_text().splitlines()) == 2
    with path.open("a") as fh:
        fh.write('{"kind": "entry", "integrationId": "i1"')  # a crash mid-write
    again = FakeMessenger(store_path=str(path))
    assert again.people[("i1", PSID)].name == "Ada Lovelace"
    assert [json.loads(line)["kind"] for line in path.read_text().splitlines()] == ["person"]
    assert FakeMessenger().store_path is None and FakeTelegram().store_path is None
    assert FakeTwilio().store_path is None
