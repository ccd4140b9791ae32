"""Helpers for the whatsapp/sandbox integration tests: a running pair with one integration."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from services.sandbox.app import SandboxService
from services.whatsapp.app import WhatsAppService
from shared import records, subjects
from shared.bus import Bus, subjects_overlap
from shared.ids import new_id
from shared.messages import channel
from shared.records import IntegrationRecord
from shared.subjects import StreamSpec
from tests.fakes.whatsapp import FakeWhatsApp
from tests.harness import System

APP_SECRET = "wa-app-secret-0123456789abcdef"
ACCESS_TOKEN = "EAAwa-access-token-0123456789"
VERIFY_TOKEN = "wa-verify-token-0123456789"
PHONE_NUMBER_ID = "1122334455667"
BUSINESS_NUMBER = "+15550001111"
CUSTOMER = "+15551234567"
T = TypeVar("T")


async def eventually(probe: Callable[[], Awaitable[T | None]], timeout: float = 5.0) -> T:
    """Poll `probe` until it returns something truthy (bounded), and return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def stream_messages(bus: Bus, stream: StreamSpec, subject: str | None = None) -> list[Any]:
    """Every message stored in a stream (optionally on one subject), decoded as channel messages."""
    info = await bus.js.stream_info(stream.name)
    out: list[Any] = []
    if info.state.messages == 0:
        return out
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            raw = await bus.js.get_msg(stream.name, seq)
        except Exception:  # deleted/missing sequence
            continue
        if subject is None or subjects_overlap(subject, raw.subject or ""):
            out.append(channel.decode(raw.data or b""))
    return out


@dataclass
class WaEnv:
    """whatsapp + sandbox running behind the front door, one whatsapp integration pointing at the fake."""

    system: System
    bus: Bus
    record: IntegrationRecord

    @property
    def integration_id(self) -> str:
        return self.record.id

    @property
    def service(self) -> WhatsAppService:
        return self.system.service("whatsapp")  # type: ignore[no-any-return]

    @property
    def sandbox(self) -> SandboxService:
        return self.system.service("sandbox")  # type: ignore[no-any-return]

    @property
    def fake(self) -> FakeWhatsApp:
        return self.sandbox.fake

    @property
    def webhook_url(self) -> str:
        return f"{self.system.base_url}/webhooks/whatsapp/{self.integration_id}"

    @property
    def inbound_subject(self) -> str:
        return subjects.integration_subjects("inbound", "whatsapp", self.integration_id)

    @property
    def status_subject(self) -> str:
        return subjects.integration_subjects("status", "whatsapp", self.integration_id)

    async def inbound(self) -> list[Any]:
        return await stream_messages(self.bus, subjects.INBOUND, self.inbound_subject)

    async def statuses(self) -> list[Any]:
        return await stream_messages(self.bus, subjects.STATUS, self.status_subject)

    async def script(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=f"{self.system.base_url}/sandbox/whatsapp/{self.integration_id}") as c:
            resp = await c.post(path, json=body)
            assert resp.status_code == 200, resp.text
            result: dict[str, Any] = resp.json()
            return result


def whatsapp_record(base_url: str, **config: Any) -> IntegrationRecord:
    """A whatsapp integration record whose Graph API is the sandbox's fake."""
    return IntegrationRecord(id=new_id(), app_id=new_id(), type="whatsapp", display_name="WhatsApp", config={
        "phoneNumberId": PHONE_NUMBER_ID, "phoneNumber": BUSINESS_NUMBER, "accessToken": ACCESS_TOKEN,
        "appSecret": APP_SECRET, "verifyToken": VERIFY_TOKEN, "apiVersion": "v23.0",
        "baseUrl": f"{base_url}/sandbox/graph", **config,
    })


async def start_whatsapp(system: System, bus: Bus, env: dict[str, str] | None = None) -> WaEnv:
    """Start whatsapp + sandbox, register one integration, wait until both services see it."""
    await system.start("whatsapp", "sandbox", env={"WHATSAPP_RETRY_BASE_SECONDS": "0.05", **(env or {})})
    record = whatsapp_record(system.base_url)
    kv = await bus.key_value(subjects.INTEGRATIONS_BUCKET)
    await kv.put(record.id, records.ENCODER.encode(record))
    wa = WaEnv(system, bus, record)

    async def both_see_it() -> bool:
        wa.sandbox.sync_accounts()
        return wa.service.credentials(record.id) is not None and record.id in wa.fake.accounts

    await eventually(both_see_it)
    return wa
