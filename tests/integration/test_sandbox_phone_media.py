"""The sandbox phones send a photo and a document: the file is uploaded to the sandbox
(`POST /sandbox/uploads`), the phone's fake delivers its platform's own inbound webhook carrying it
(a WhatsApp media id, a Messenger CDN URL, a Telegram file_id, a Twilio MediaUrl0), the channel
service copies the bytes into Threadline's object store before publishing, and the business reads
a Threadline `/attachments/v1/…` URL in the conversation's history that serves the same bytes."""

from __future__ import annotations

import struct
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.sandbox.uploads import MEDIA_RULES, image_size
from shared.http import basic_auth_header
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System, business_webhooks
from tests.integration.test_web_conversation import eventually
from threadline.bootstrap import AccountKey, bootstrap_sandbox

SERVICES = ("identity", "conversations", "webhooks", "whatsapp", "messenger", "telegram", "sms", "sandbox")
# Each phone's sender, as its fake's `/inbound` takes it.
SENDERS: dict[str, Any] = {"whatsapp": "+15557001001", "messenger": "7100000000000042", "telegram": 424242042,
                           "twilio": "+15557002002"}
SOURCE_TYPES = {"whatsapp": "whatsapp", "messenger": "messenger", "telegram": "telegram", "twilio": "twilio"}


def png(width: int, height: int) -> bytes:
    """A real (grey) PNG of that size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


PHOTO = png(3, 2)
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n" + b"%" * 2000


@dataclass
class Phones:
    http: aiohttp.ClientSession
    system: System
    info: dict[str, Any]
    auth: dict[str, str]
    events: list[dict[str, Any]]

    @property
    def base(self) -> str:
        return self.system.base_url

    def integration(self, kind: str) -> str:
        return str(self.info["integrations"][kind]["id"])

    async def upload(self, data: bytes, name: str, media_type: str) -> tuple[int, dict[str, Any]]:
        form = aiohttp.FormData()
        form.add_field("file", data, filename=name, content_type=media_type)
        async with self.http.post(f"{self.base}/sandbox/uploads", data=form) as resp:
            return resp.status, await resp.json()

    async def inbound(self, kind: str, spec: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        async with self.http.post(f"{self.base}/sandbox/{kind}/{self.integration(kind)}/inbound", json=spec) as resp:
            return resp.status, await resp.json()

    async def business(self, path: str) -> dict[str, Any]:
        async with self.http.get(f"{self.base}/v2/apps/{self.info['appId']}{path}", headers=self.auth) as resp:
            assert resp.status == 200, await resp.text()
            data: dict[str, Any] = await resp.json()
        return data

    def message_event(self, kind: str, content_type: str) -> dict[str, Any] | None:
        for event in self.events:
            message = event.get("payload", {}).get("message", {})
            if (event["type"] == "conversation:message" and message.get("source", {}).get("type") == SOURCE_TYPES[kind]
                    and message.get("content", {}).get("type") == content_type):
                return event
        return None


@pytest.fixture
async def phones(system: System, tmp_path: Path) -> AsyncIterator[Phones]:
    await system.start(*SERVICES)
    info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                   str(tmp_path / "sbx"), ("whatsapp", "messenger", "telegram", "twilio"))
    auth = basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"])
    async with business_webhooks() as (hook_url, events), aiohttp.ClientSession() as http:
        async with http.post(f"{system.base_url}/v2/apps/{info['appId']}/integrations", headers=auth, json={
                "type": "custom", "webhooks": [{"target": hook_url, "triggers": ["conversation:message"]}]}) as resp:
            assert resp.status == 201, await resp.text()
        yield Phones(http, system, info, auth, events)


async def say_hello(p: Phones, kind: str) -> None:
    """A first text from the phone, sent again until the gateway takes it (its channel service
    learns the integration from the KV; Telegram's update waits for the bot's webhook)."""
    sender = SENDERS[kind]

    async def delivered() -> bool:
        status, body = await p.inbound(kind, {"from": sender, "name": "Ada", "text": f"hello from {kind}"})
        assert status == 200, body
        return body.get("webhookStatus") in (200, None)

    await eventually(delivered, timeout=20.0)

    async def seen() -> bool:
        return any(e.get("payload", {}).get("message", {}).get("content", {}).get("text") == f"hello from {kind}"
                   for e in p.events)

    await eventually(seen, timeout=20.0)


async def sent_file(p: Phones, kind: str, data: bytes, name: str, media_type: str, content_type: str) -> dict[str, Any]:
    """Upload the file, send it from the phone; the message the business then has in history."""
    status, body = await p.upload(data, name, media_type)
    assert status == 201, body
    upload = body["upload"]
    assert upload["size"] == len(data) and upload["mediaType"] == media_type
    async with p.http.get(upload["url"]) as resp:  # the sandbox hosts it
        assert resp.status == 200 and await resp.read() == data and resp.content_type == media_type
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    status, sent = await p.inbound(kind, {"from": SENDERS[kind], "upload": upload["id"]})
    assert status == 200 and sent["webhookStatus"] == 200, sent
    event = await eventually(lambda: _event(p, kind, content_type), timeout=20.0)
    conversation_id = event["payload"]["conversation"]["id"]
    history = (await p.business(f"/conversations/{conversation_id}/messages"))["messages"]
    [message] = [m for m in history if m["id"] == event["payload"]["message"]["id"]]
    assert message["author"]["type"] == "user" and message["source"]["type"] == SOURCE_TYPES[kind]
    assert message["content"]["type"] == content_type
    return dict(message["content"])


async def _event(p: Phones, kind: str, content_type: str) -> dict[str, Any] | None:
    return p.message_event(kind, content_type)


async def fetched(p: Phones, url: str) -> tuple[bytes, str]:
    assert url.startswith(f"{p.base}/attachments/v1/"), url  # copied: Threadline's own URL
    async with p.http.get(url) as resp:
        assert resp.status == 200, url
        return await resp.read(), resp.content_type


@pytest.mark.parametrize("kind", ["whatsapp", "messenger", "telegram", "twilio"])
async def test_a_photo_and_a_document_from_each_phone_reach_the_business_as_threadline_files(
        phones: Phones, kind: str) -> None:
    await say_hello(phones, kind)

    photo = await sent_file(phones, kind, PHOTO, "vase.png", "image/png", "image")
    assert await fetched(phones, photo["mediaUrl"]) == (PHOTO, "image/png")

    phones.events.clear()
    document = await sent_file(phones, kind, PDF, "receipt 1042.pdf", "application/pdf", "file")
    assert await fetched(phones, document["mediaUrl"]) == (PDF, "application/pdf")
    assert document["mediaType"] == "application/pdf"

    # The platform forgets the files (its media URLs expire): the history keeps them.
    sandbox = phones.system.service("sandbox")
    for upload_id in list(sandbox.uploads.uploads):
        sandbox.uploads.drop(upload_id)
    assert await fetched(phones, photo["mediaUrl"]) == (PHOTO, "image/png")
    assert await fetched(phones, document["mediaUrl"]) == (PDF, "application/pdf")


async def test_what_a_platform_does_not_carry_is_refused_before_any_webhook(phones: Phones) -> None:
    status, body = await phones.upload(b"<html><script>alert(1)</script></html>", "page.html", "text/html")
    assert status == 415, body
    status, body = await phones.upload(b"GIF89a not really a png", "fake.png", "image/png")
    assert status == 400 and "image/png" in body["errors"][0]["title"], body
    status, body = await phones.upload(b"", "empty.pdf", "application/pdf")
    assert status == 400, body

    # WhatsApp takes jpeg and png photos only; MMS at most 5 MB.
    webp = b"RIFF\x1a\x00\x00\x00WEBPVP8X\x0a\x00\x00\x00\x00\x00\x00\x00\x09\x00\x00\x04\x00\x00"
    status, body = await phones.upload(webp, "sticker.webp", "image/webp")
    assert status == 201 and (body["upload"]["width"], body["upload"]["height"]) == (10, 5), body
    before = len(phones.system.service("sandbox").fake.webhooks)
    status, body = await phones.inbound("whatsapp", {"from": SENDERS["whatsapp"], "upload": body["upload"]["id"]})
    assert status == 400 and "WhatsApp does not carry image/webp" in body["errors"][0]["title"], body
    assert len(phones.system.service("sandbox").fake.webhooks) == before
    big = b"%PDF-1.4\n" + b"0" * (MEDIA_RULES["twilio"].max_document_bytes + 1)
    status, body = await phones.upload(big, "big.pdf", "application/pdf")
    assert status == 201, body
    status, body = await phones.inbound("twilio", {"from": SENDERS["twilio"], "upload": body["upload"]["id"]})
    assert status == 400 and "at most 5 MB" in body["errors"][0]["title"], body
    status, body = await phones.inbound("telegram", {"from": SENDERS["telegram"], "upload": "no-such-upload"})
    assert status == 400 and "/sandbox/uploads" in body["errors"][0]["title"], body


async def test_uploads_and_the_media_they_back_survive_a_sandbox_restart(phones: Phones) -> None:
    await say_hello(phones, "whatsapp")
    status, body = await phones.upload(PHOTO, "vase.png", "image/png")
    assert status == 201, body
    status, sent = await phones.inbound("whatsapp", {"from": SENDERS["whatsapp"], "upload": body["upload"]["id"],
                                                     "caption": "broken"})
    assert status == 200, sent
    await phones.system.restart_service("sandbox")
    async with phones.http.get(body["upload"]["url"]) as resp:
        assert resp.status == 200 and await resp.read() == PHOTO
    async with phones.http.get(f"{phones.base}/sandbox/whatsapp/{phones.integration('whatsapp')}/thread",
                               params={"to": SENDERS["whatsapp"]}) as resp:
        thread = (await resp.json())["messages"]
    [photo] = [m for m in thread if m["body"].get("type") == "image"]
    assert photo["body"]["image"]["caption"] == "broken" and photo["media"][0]["id"] == body["upload"]["id"]


def test_image_sizes_are_read_from_the_first_bytes() -> None:
    assert image_size("image/png", PHOTO) == (3, 2)
    assert image_size("image/gif", b"GIF89a\x05\x00\x07\x00") == (5, 7)
    jpeg = (b"\xff\xd8" + b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
            + b"\xff\xc0\x00\x11\x08\x00\x20\x00\x40\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01")
    assert image_size("image/jpeg", jpeg) == (64, 32)
    assert image_size("image/jpeg", b"\xff\xd8\x00garbage") is None
