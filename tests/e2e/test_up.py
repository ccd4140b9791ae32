"""`threadline up` as a user runs it: real processes, the front door, the sandbox, Ctrl-C, restart."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import smtplib
import stat
import sys
from pathlib import Path
from typing import Any

import aiohttp
import nats
import nats.errors
import pytest
from aiohttp import web

from shared.encryption import Keyring
from shared.http import basic_auth_header
from shared.natsauth import USERS
from shared.routes import SANDBOX_SMTP_PORT
from threadline.natsserver import free_port


async def start_up(data_dir: Path, port: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "threadline", "up", "--data-dir", str(data_dir), "--port", str(port),
        "--auto-ports", "--nats-port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "THREADLINE_LOG_LEVEL": "WARNING"},
    )


async def wait_banner(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    seen = []
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), 90)
        if not line:
            raise AssertionError("threadline up exited early:\n" + "".join(seen))
        seen.append(line.decode())
        if seen[-1].strip().startswith("Logs:"):  # the banner's last line
            return "".join(seen)


async def stop(proc: asyncio.subprocess.Process) -> int:
    proc.send_signal(signal.SIGINT)
    assert proc.stdout is not None
    await asyncio.wait_for(proc.stdout.read(), 60)
    return await asyncio.wait_for(proc.wait(), 60)


async def poll_json(session: aiohttp.ClientSession, url: str, ok: Any, auth: dict[str, str] | None = None,
                    timeout: float = 20.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        async with session.get(url, headers=auth) as resp:
            body = await resp.json(content_type=None)
        if ok(body):
            return body
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met for {url}: {body}")
        await asyncio.sleep(0.1)


async def test_up_serves_everything_and_keeps_history_across_restart(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = await start_up(tmp_path, port)
    try:
        banner = await wait_banner(proc)
        info = json.loads((tmp_path / "sandbox.json").read_text())
        assert info["appId"] in banner and info["apiKey"]["secret"] in banner
        await _check_private_and_authenticated(tmp_path, banner)
        wa = info["integrations"]["whatsapp"]
        for key in ("appSecret", "verifyToken", "phoneNumberId", "phoneNumber", "id"):
            assert wa[key]
        auth = basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/healthz") as resp:
                health = await resp.json()
                assert resp.status == 200, health
            for name in ("conversations", "identity", "web", "whatsapp", "webhooks", "sandbox"):
                async with session.get(f"{base}/_svc/{name}/readyz") as resp:
                    assert resp.status == 200, name
            async with session.get(f"{base}/sandbox/") as resp:
                page = await resp.text()
                assert resp.status == 200 and "/widget/threadline.js" in page
            async with session.get(f"{base}/widget/threadline.js") as resp:
                assert resp.status == 200 and "Threadline" in await resp.text()
            async with session.get(f"{base}/v2/openapi.json") as resp:
                assert resp.status == 200 and "paths" in await resp.json()
            async with session.get(
                    f"{base}/webhooks/whatsapp/{wa['id']}",
                    params={"hub.mode": "subscribe", "hub.verify_token": wa["verifyToken"], "hub.challenge": "42"},
            ) as resp:
                assert resp.status == 200 and await resp.text() == "42"
            conversation_id = await _send_from_phone_and_catch_webhook(session, base, info, auth)
            async with session.post(f"{base}/v2/apps/{info['appId']}/conversations/{conversation_id}/messages",
                                    headers=auth, json={"author": {"type": "business"},
                                                     "content": {"type": "text", "text": "hello back"}}) as resp:
                assert resp.status == 201, await resp.text()
            outbox = await poll_json(session, f"{base}/sandbox/whatsapp/{wa['id']}/outbox?to=%2B15551234567",
                                     lambda body: any(m.get("text", {}).get("body") == "hello back"
                                                      for m in body["messages"]))
            assert outbox["messages"][-1]["to"] in ("15551234567", "+15551234567")
    finally:
        assert await stop(proc) == 0

    proc = await start_up(tmp_path, port)
    try:
        await wait_banner(proc)
        again = json.loads((tmp_path / "sandbox.json").read_text())
        assert again["appId"] == info["appId"]
        async with aiohttp.ClientSession() as session:
            url = f"{base}/v2/apps/{info['appId']}/conversations/{conversation_id}/messages"
            body = await poll_json(session, url, lambda b: "messages" in b, auth=auth)
            texts = [m["content"].get("text") for m in body["messages"]]
            assert texts[:2] == ["hi from the phone", "hello back"]
    finally:
        assert await stop(proc) == 0


async def test_auto_ports_give_the_sandbox_smtp_sink_a_port_of_its_own(tmp_path: Path) -> None:
    # Another instance's sink on the default port: this one must neither need it nor deliver to it.
    knocks: list[int] = []

    async def other_sink(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        knocks.append(1)
        writer.close()

    try:
        other = await asyncio.start_server(other_sink, "127.0.0.1", SANDBOX_SMTP_PORT)
    except OSError:
        other = None  # something else holds it already: the same situation
    port = free_port()
    proc = await start_up(tmp_path, port)
    try:
        await wait_banner(proc)
        info = json.loads((tmp_path / "sandbox.json").read_text())
        email = info["integrations"]["email"]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/sandbox/mail/server") as resp:
                server = await resp.json()
            assert server["listening"] and server["port"] != SANDBOX_SMTP_PORT, server
            assert (email["smtpHost"], email["smtpPort"]) == ("127.0.0.1", server["port"])
            # Mail sent where the e-mail integration points lands in this instance's Mail tab.
            message = "From: shop@example.test\r\nTo: ada@example.test\r\nSubject: hi\r\n\r\nhello\r\n"
            await asyncio.to_thread(_send_mail, email["smtpHost"], email["smtpPort"], message)
            await poll_json(session, f"http://127.0.0.1:{port}/sandbox/mail?to=ada@example.test",
                            lambda body: len(body["mails"]) == 1)
        assert knocks == []
    finally:
        assert await stop(proc) == 0
        if other is not None:
            other.close()
            await other.wait_closed()


def _send_mail(host: str, port: int, message: str) -> None:
    with smtplib.SMTP(host, port, timeout=10) as smtp:
        smtp.sendmail("shop@example.test", ["ada@example.test"], message)


async def _check_private_and_authenticated(data_dir: Path, banner: str) -> None:
    """The data directory is its owner's only; NATS takes no anonymous client; the secrets key
    and a NATS password per service were generated into secrets.json."""
    for path in [data_dir, *data_dir.rglob("*")]:
        expected = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    generated = json.loads((data_dir / "secrets.json").read_text())
    assert Keyring.parse(generated["secretsKey"]).primary_id == "k1"
    assert set(generated["natsPasswords"]) == set(USERS)
    address = re.search(r"nats-server \(JetStream[^)]*\) on (nats://\S+)", banner)
    assert address is not None and "@" not in address.group(1)
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(address.group(1), allow_reconnect=False, connect_timeout=5)
    client = await nats.connect(address.group(1), user="admin", password=generated["natsPasswords"]["admin"],
                                allow_reconnect=False)
    await client.close()


async def _send_from_phone_and_catch_webhook(session: aiohttp.ClientSession, base: str, info: dict[str, Any],
                                             auth: dict[str, str]) -> str:
    """Register a business webhook, send from the sandbox phone, return the conversation id it names."""
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def hook(request: web.Request) -> web.Response:
        for event in (await request.json())["events"]:
            events.put_nowait(event)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    hook_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", hook_port).start()
    try:
        async with session.post(f"{base}/v2/apps/{info['appId']}/integrations", headers=auth, json={
                "type": "custom", "displayName": "test hook",
                "webhooks": [{"target": f"http://127.0.0.1:{hook_port}/hook", "triggers": ["conversation:message"]}],
        }) as resp:
            assert resp.status == 201, await resp.text()
        wa_id = info["integrations"]["whatsapp"]["id"]
        async with session.post(f"{base}/sandbox/whatsapp/{wa_id}/inbound",
                                json={"from": "+15551234567", "text": "hi from the phone"}) as resp:
            assert resp.status == 200, await resp.text()
        event = await asyncio.wait_for(events.get(), 30)
        assert event["payload"]["message"]["content"]["text"] == "hi from the phone"
        assert event["payload"]["message"]["source"]["type"] == "whatsapp"
        return str(event["payload"]["conversation"]["id"])
    finally:
        await runner.cleanup()
