"""Every sandbox channel end to end: the fake platform delivers a signed webhook, the business
gets `conversation:message` through the SunCo API, and its reply reaches that channel's outbox."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from shared.http import basic_auth_header
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System
from threadline.bootstrap import AccountKey, bootstrap_sandbox
from threadline.natsserver import free_port

# channel → (sandbox integration kind, what the phone sends, the sender as the outbox is queried)
CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    "messenger": ("messenger", {"from": "6100000000000042", "text": "hi from messenger"}, "6100000000000042"),
    "telegram": ("telegram", {"from": 424242, "text": "hi from telegram"}, "424242"),
    "twilio": ("twilio", {"from": "+15557654321", "text": "hi from sms"}, "+15557654321"),
}


def reply_text(channel: str, body: dict[str, Any]) -> str:
    if channel == "messenger":
        return str(body.get("message", {}).get("text", ""))
    if channel == "telegram":
        return str(body.get("text", ""))
    return str(body.get("Body", ""))


@pytest.mark.parametrize("channel", sorted(CASES))
async def test_a_channel_conversation_round_trip(system: System, tmp_path: Path, channel: str) -> None:
    kind, inbound, sender = CASES[channel]
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def hook(request: web.Request) -> web.Response:
        for event in (await request.json())["events"]:
            events.put_nowait(event)
        return web.Response(text="ok")

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    runner = web.AppRunner(receiver)
    await runner.setup()
    hook_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", hook_port).start()
    service = {"twilio": "sms"}.get(channel, channel)
    try:
        await system.start("identity", "conversations", "webhooks", service, "sandbox")
        info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                       str(tmp_path / "sbx"), ("web", kind))
        auth = basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"])
        base, app_id = system.base_url, info["appId"]
        integration_id = info["integrations"][kind]["id"]
        async with aiohttp.ClientSession(headers=auth) as session:
            async with session.post(f"{base}/v2/apps/{app_id}/integrations", json={
                    "type": "custom", "webhooks": [{"target": f"http://127.0.0.1:{hook_port}/hook",
                                                    "triggers": ["conversation:message"]}]}) as resp:
                assert resp.status == 201
            deadline = asyncio.get_running_loop().time() + 15
            while True:  # until the channel service and the fake have seen the new integration
                async with session.post(f"{base}/sandbox/{channel}/{integration_id}/inbound", json=inbound) as resp:
                    status, body = resp.status, await resp.json(content_type=None)
                if status == 200 and body.get("webhookStatus") == 200:
                    break
                assert asyncio.get_running_loop().time() < deadline, f"{status} {body}"
                await asyncio.sleep(0.2)
            event = await asyncio.wait_for(events.get(), 20)
            message = event["payload"]["message"]
            assert message["content"]["text"] == inbound["text"]
            assert message["source"]["type"] == channel and message["source"]["integrationId"] == integration_id
            conversation_id = event["payload"]["conversation"]["id"]
            reply = {"author": {"type": "business"}, "content": {"type": "text", "text": f"reply on {channel}"}}
            async with session.post(f"{base}/v2/apps/{app_id}/conversations/{conversation_id}/messages",
                                    json=reply) as resp:
                assert resp.status == 201, await resp.text()
            deadline = asyncio.get_running_loop().time() + 20
            while True:
                async with session.get(f"{base}/sandbox/{channel}/{integration_id}/outbox",
                                       params={"to": sender}) as resp:
                    outbox = await resp.json()
                if any(reply_text(channel, m) == f"reply on {channel}" for m in outbox["messages"]):
                    break
                assert asyncio.get_running_loop().time() < deadline, outbox
                await asyncio.sleep(0.1)
    finally:
        await runner.cleanup()
