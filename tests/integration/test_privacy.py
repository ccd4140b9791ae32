"""Privacy settings and rights, against the running services: `maskCreditCardNumbers` (nothing
stored, delivered or sent carries the card number), `conversationRetentionSeconds` (old messages
and every copy of them go), user deletion and personal-information deletion (no byte of the
person left in any database), and the export of everything held about a user."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sunshine_conversations_client as sc

from shared import subjects
from shared.bus import Bus
from shared.http import basic_auth_header
from tests.e2e.test_direct_linking import Sandbox
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System, business_webhooks
from tests.integration.test_web_conversation import eventually
from threadline.bootstrap import AccountKey, bootstrap_sandbox

SERVICES = ("identity", "conversations", "webhooks", "notifications", "whatsapp", "sandbox")
TRIGGERS = ["conversation:message", "conversation:create", "client:add", "client:update", "client:remove",
            "user:remove", "user:update", "user:merge"]
ACCOUNT = basic_auth_header(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET)
PAN = "4111 1111 1111 1111"
PAN_DIGITS = PAN.replace(" ", "")
BUSINESS_PAN = "4242-4242-4242-4242"


@contextlib.asynccontextmanager
async def running(system: System, tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with business_webhooks() as (hook_url, events):
        await system.start(*SERVICES)
        info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                       str(tmp_path / "sbx"), ("web", "whatsapp"))
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{system.base_url}/v2/apps/{info['appId']}/integrations",
                                 headers=basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"]),
                                 json={"type": "custom", "webhooks": [{"target": hook_url, "triggers": TRIGGERS}]},
                                 ) as resp:
                assert resp.status == 201
            yield Sandbox(system, http, info, events)


@pytest.fixture
async def sandbox(system: System, tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with running(system, tmp_path) as s:
        yield s


async def set_settings(s: Sandbox, settings: dict[str, Any]) -> None:
    async with s.http.patch(f"{s.system.base_url}/v2/apps/{s.app_id}", headers=ACCOUNT,
                            json={"settings": settings}) as resp:
        assert resp.status == 200, await resp.text()


async def stream_bytes(bus: Bus, stream: subjects.StreamSpec) -> bytes:
    """Every message still stored in a stream, concatenated."""
    info = await bus.js.stream_info(stream.name)
    out = b""
    if info.state.messages == 0:
        return out
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        with contextlib.suppress(Exception):
            out += (await bus.js.get_msg(stream.name, seq)).data or b""
    return out


def files_bytes(*folders: Path) -> dict[str, bytes]:
    """The bytes of every file under `folders` (databases with their -wal/-shm, stream blocks),
    except the sandbox's: its fakes are the platforms and phones, which keep what they got."""
    found: dict[str, bytes] = {}
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.name.startswith("sandbox"):
                found[str(path)] = path.read_bytes()
    return found


def holding(files: dict[str, bytes], *needles: str) -> list[str]:
    return sorted(f"{path}: {needle!r}" for path, data in files.items() for needle in needles
                  if needle.encode() in data)


async def test_card_numbers_are_masked_in_and_out_before_anything_keeps_them(
        sandbox: Sandbox, tmp_path: Path) -> None:
    s = sandbox
    phone = "+15557300001"
    await set_settings(s, {"maskCreditCardNumbers": True})
    # In: the customer writes a card number on WhatsApp.
    await s.phone_sends("whatsapp", phone, f"my card is {PAN}, expiry 12/27")
    masked_in = "my card is **** **** **** 1111, expiry 12/27"
    event = await s.event("conversation:message")
    assert event["payload"]["message"]["content"]["text"] == masked_in
    conversation_id = event["payload"]["conversation"]["id"]
    # Out: the business answers with a card number; the phone and the webhook get it masked.
    post = sc.MessagePost(author=sc.Author(type="business"), content=sc.Content(sc.TextMessage(
        type="text", text=f"We charged {BUSINESS_PAN}")))
    sent = (await s.call(sc.MessagesApi(s.api).post_message, s.app_id, conversation_id, post)).messages[0]
    assert sent.content.actual_instance.text == "We charged ****-****-****-4242"
    await s.phone_receives("whatsapp", phone, "We charged ****-****-****-4242")
    assert not any("4242-4242" in text for text in await s.phone_outbox("whatsapp", phone))

    async def business_echo() -> bool:
        return any(e["payload"]["message"]["author"]["type"] == "business" for e in s.of("conversation:message"))

    await eventually(business_echo, timeout=10.0)
    history = (await s.call(sc.MessagesApi(s.api).list_messages, s.app_id, conversation_id)).messages
    assert [m.content.actual_instance.text for m in history] == [masked_in, "We charged ****-****-****-4242"]
    webhook_texts = [e["payload"]["message"]["content"]["text"] for e in s.of("conversation:message")]
    assert not any(PAN in t or BUSINESS_PAN in t for t in webhook_texts)
    # Nothing stored anywhere keeps either number: the databases, and the bus (the raw inbound
    # copy is erased once the masked message is stored).
    bus = await Bus.connect(s.system.nats_url, "test-privacy")
    try:
        for stream in subjects.ALL_STREAMS:
            data = await stream_bytes(bus, stream)
            assert PAN.encode() not in data and BUSINESS_PAN.encode() not in data, stream.name
    finally:
        await bus.close()
    stored = files_bytes(Path(s.system.data_dir), tmp_path / "nats")
    assert holding(stored, PAN, PAN_DIGITS, BUSINESS_PAN) == []


async def test_numbers_are_kept_as_written_when_the_app_does_not_mask(sandbox: Sandbox) -> None:
    s = sandbox
    await s.phone_sends("whatsapp", "+15557300002", f"my card is {PAN}")
    event = await s.event("conversation:message")
    assert event["payload"]["message"]["content"]["text"] == f"my card is {PAN}"
