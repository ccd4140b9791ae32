"""A crash of any one service loses nothing already acknowledged.

The whole system runs as processes (as `threadline up` runs it); WhatsApp webhooks stream in
while `conversations`, then `webhooks`, then `whatsapp` are killed with SIGKILL and restarted by
the launcher's supervisor. Every webhook answered 200 must reach the business exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from shared.http import basic_auth_header
from shared.signing import meta_signature
from threadline.cli import Launcher
from threadline.natsserver import free_port

MESSAGES = 150


def payload(wa: dict[str, Any], i: int) -> bytes:
    sender = f"1555{i % 7:07d}"
    return json.dumps({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{
        "field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": wa["phoneNumber"].lstrip("+"), "phone_number_id": wa["phoneNumberId"]},
            "contacts": [{"profile": {"name": "Crash"}, "wa_id": sender, "user_id": f"US.{sender}"}],
            "messages": [{"from": sender, "id": f"wamid.crash{i:05d}", "timestamp": str(int(time.time())),
                          "type": "text", "text": {"body": f"crash-{i}"}}]}}]}]}, ensure_ascii=True).encode()


async def test_killing_services_loses_no_acknowledged_message(tmp_path: Path) -> None:
    launcher = Launcher(data_dir=str(tmp_path), host="127.0.0.1", port=0, nats_port=0, auto_ports=True,
                        extra_env={"THREADLINE_LOG_LEVEL": "WARNING", "THREADLINE_WEBHOOK_RETRY_BASE_SECONDS": "0.2"})
    launcher.say = lambda _text: None  # type: ignore[method-assign]
    # A business de-duplicates on the event id (README): webhooks killed between the business's
    # 200 and recording it delivers that event again, with the same id. What must never happen
    # is one customer message arriving as two different events (two stored messages).
    seen: Counter[str] = Counter()
    event_ids: set[str] = set()

    async def hook(request: web.Request) -> web.Response:
        for event in (await request.json())["events"]:
            if event["type"] == "conversation:message" and event["id"] not in event_ids:
                event_ids.add(event["id"])
                seen[event["payload"]["message"]["content"]["text"]] += 1
        return web.Response(text="ok")

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    runner = web.AppRunner(receiver)
    await runner.setup()
    hook_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", hook_port).start()
    stop = asyncio.Event()
    supervisor: asyncio.Task[None] | None = None
    try:
        info = await launcher.start()
        supervisor = asyncio.create_task(launcher._supervise(stop))
        auth = basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"])
        wa = info["integrations"]["whatsapp"]
        url = f"{launcher.base_url}/webhooks/whatsapp/{wa['id']}"
        accepted: set[int] = set()
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{launcher.base_url}/v2/apps/{info['appId']}/integrations", headers=auth, json={
                    "type": "custom", "webhooks": [{"target": f"http://127.0.0.1:{hook_port}/hook",
                                                    "triggers": ["conversation:message"]}]}) as resp:
                assert resp.status == 201
            await asyncio.sleep(0.5)

            async def send(i: int) -> None:
                body = payload(wa, i)
                headers = {"Content-Type": "application/json",
                           "X-Hub-Signature-256": meta_signature(wa["appSecret"], body)}
                for _attempt in range(200):  # as Meta retries until it gets a 200
                    try:
                        async with session.post(url, data=body, headers=headers) as resp:
                            if resp.status == 200:
                                accepted.add(i)
                                return
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.1)

            victims = {30: "conversations", 70: "webhooks", 110: "whatsapp"}
            in_flight: set[asyncio.Task[None]] = set()
            for i in range(MESSAGES):
                if i in victims:
                    process = launcher.services[victims[i]].process
                    assert process is not None
                    process.send_signal(signal.SIGKILL)
                if i % 10 == 0:
                    await send(i)
                else:
                    in_flight.add(asyncio.create_task(send(i)))
            await asyncio.wait_for(asyncio.gather(*in_flight), 60)
        assert len(accepted) == MESSAGES
        expected = {f"crash-{i}" for i in accepted}
        deadline = time.monotonic() + 90
        while not expected <= set(seen) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert expected - set(seen) == set(), "lost after a crash"
        assert [text for text, count in seen.items() if count > 1] == [], "duplicated after a crash"
        assert all(launcher.services[name].restarts == 1 for name in victims.values())
    except BaseException:
        # What the killed services said after their restart: why one did not come back.
        for name in ("conversations", "webhooks", "whatsapp"):
            svc = launcher.services.get(name)
            if svc is not None and os.path.exists(svc.log_path):
                with open(svc.log_path, errors="replace") as log_file:
                    tail = log_file.readlines()[-30:]
                print(f"--- {name}: {svc.restarts} restart(s), last lines of its log ---\n{''.join(tail)}",
                      file=sys.stderr)
        raise
    finally:
        stop.set()
        if supervisor is not None:
            supervisor.cancel()
        await runner.cleanup()
        await launcher.shutdown()
