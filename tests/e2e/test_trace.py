"""One OpenTelemetry trace runs from the WhatsApp webhook through identity and conversations to
the business webhook, with context carried in NATS headers (in-memory exporter)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.http import basic_auth_header
from shared.signing import meta_signature
from shared.telemetry import setup_telemetry
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System
from threadline.natsserver import NatsServer, free_port


@pytest.fixture
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    setup_telemetry("tests", extra_processor=SimpleSpanProcessor(exporter))
    return exporter


async def api(session: aiohttp.ClientSession, method: str, url: str, auth: dict[str, str],
              body: dict[str, Any] | None = None) -> dict[str, Any]:
    async with session.request(method, url, json=body, headers=auth) as resp:
        data: dict[str, Any] = await resp.json()
        assert resp.status in (200, 201), data
        return data


async def test_one_trace_from_whatsapp_webhook_to_business_webhook(
        spans: InMemorySpanExporter, nats_server: NatsServer, tmp_path: Path, postgres_url: str) -> None:
    system = System(nats_server.url, tmp_path / "data", env={"THREADLINE_DATABASE_URL": postgres_url})
    hooks: asyncio.Queue[tuple[dict[str, Any], str]] = asyncio.Queue()

    async def receive(request: web.Request) -> web.Response:
        hooks.put_nowait((await request.json(), request.headers.get("traceparent", "")))
        return web.Response(text="ok")

    receiver = web.Application()
    receiver.router.add_post("/hook", receive)
    runner = web.AppRunner(receiver)
    await runner.setup()
    hook_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", hook_port).start()
    try:
        await system.start("identity", "conversations", "webhooks", "whatsapp")
        account = basic_auth_header(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET)
        async with aiohttp.ClientSession() as session:
            base = system.base_url
            app_id = (await api(session, "POST", f"{base}/v2/apps", account, {"displayName": "t"}))["app"]["id"]
            integration = (await api(session, "POST", f"{base}/v2/apps/{app_id}/integrations", account, {
                "type": "whatsapp", "phoneNumber": "+15550001111", "phoneNumberId": "1122334455667",
                "accessToken": "EAAtesttoken", "appSecret": "app-secret-for-trace", "verifyToken": "vt",
                "baseUrl": f"{base}/sandbox/graph",
            }))["integration"]
            await api(session, "POST", f"{base}/v2/apps/{app_id}/integrations", account, {
                "type": "custom", "webhooks": [{"target": f"http://127.0.0.1:{hook_port}/hook",
                                                "triggers": ["conversation:message"]}],
            })
            await asyncio.sleep(0.3)  # integration and webhook records reach the services' KV mirrors
            body = json.dumps({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{
                "field": "messages", "value": {
                    "messaging_product": "whatsapp",
                    "metadata": {"display_phone_number": "15550001111", "phone_number_id": "1122334455667"},
                    "contacts": [{"profile": {"name": "Ada"}, "wa_id": "15551234567", "user_id": "US.42"}],
                    "messages": [{"from": "15551234567", "id": "wamid.trace1", "timestamp": str(int(time.time())),
                                  "type": "text", "text": {"body": "trace me"}}]}}]}]}, ensure_ascii=True).encode()
            async with session.post(f"{base}/webhooks/whatsapp/{integration['id']}", data=body, headers={
                    "Content-Type": "application/json",
                    "X-Hub-Signature-256": meta_signature("app-secret-for-trace", body)}) as resp:
                assert resp.status == 200, await resp.text()
        envelope, traceparent = await asyncio.wait_for(hooks.get(), 20)
        assert envelope["events"][0]["payload"]["message"]["content"]["text"] == "trace me"
        trace_id = traceparent.split("-")[1]
        assert len(trace_id) == 32
        deadline = time.monotonic() + 5
        while True:
            in_trace = [s for s in spans.get_finished_spans() if format(s.context.trace_id, "032x") == trace_id]
            names = " | ".join(sorted(s.name for s in in_trace))
            wanted = ("POST /webhooks/whatsapp", "identity.resolve", "conversations-inbound", "webhooks-events")
            if all(w in names for w in wanted) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        for fragment in wanted:
            assert fragment in names, f"{fragment!r} not in trace: {names}"
        # A single root: the WhatsApp webhook request.
        roots = [s for s in in_trace if s.parent is None]
        assert len(roots) == 1 and roots[0].name.startswith("POST /webhooks/whatsapp"), names
    finally:
        await runner.cleanup()
        await system.close()
