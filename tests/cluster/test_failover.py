"""Cluster mode: losing the NATS node that leads the streams and a replica of each service in
the path loses nothing and keeps every conversation in order.

`ClusterLauncher` runs a 3-node JetStream cluster on loopback (streams and KV with 3 replicas),
PostgreSQL, and two replicas of every service behind round-robin balancers. Signed WhatsApp
webhooks stream in while the node leading TL_INBOUND and one replica each of `whatsapp`,
`conversations`, `identity` and `webhooks` are SIGKILLed. Every webhook answered 200 reaches the
business as one message (one event id, however often that event is retried), and each
conversation's messages reach the business in the order of its history.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from shared import subjects
from shared.bus import Bus
from shared.http import basic_auth_header
from shared.signing import meta_signature
from threadline.cluster import ClusterLauncher, stream_leader
from threadline.natsserver import free_port

MESSAGES = 150
KILL_LEADER_AT = 30
# A replica of each, one after another under steady traffic.
KILL_REPLICA_AT = {45: "whatsapp", 65: "conversations", 85: "identity", 105: "webhooks"}
SEND_DEADLINE = 45.0


def payload(wa: dict[str, Any], i: int, prefix: str = "cluster") -> bytes:
    sender = f"1555{i % 7:07d}"
    return json.dumps({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{
        "field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": wa["phoneNumber"].lstrip("+"), "phone_number_id": wa["phoneNumberId"]},
            "contacts": [{"profile": {"name": "Cluster"}, "wa_id": sender, "user_id": f"US.{sender}"}],
            "messages": [{"from": sender, "id": f"wamid.{prefix}{i:05d}", "timestamp": str(int(time.time())),
                          "type": "text", "text": {"body": f"{prefix}-{i}"}}]}}]}]}, ensure_ascii=True).encode()


async def history(session: aiohttp.ClientSession, base_url: str, app_id: str, conversation_id: str,
                  auth: dict[str, str]) -> list[dict[str, Any]]:
    """A conversation's messages in history order (every page)."""
    messages: list[dict[str, Any]] = []
    url: str | None = f"{base_url}/v2/apps/{app_id}/conversations/{conversation_id}/messages"
    while url:
        async with session.get(url, headers=auth) as resp:
            assert resp.status == 200
            body = await resp.json()
        messages = body["messages"] + messages  # SunCo pages go backwards from the newest
        url = body.get("links", {}).get("prev")
    return messages


async def until(probe: Any, timeout: float, what: str) -> Any:
    """Poll an async probe until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        await asyncio.sleep(0.1)


async def test_losing_the_stream_leader_and_a_replica_of_each_service_loses_nothing(tmp_path: Path) -> None:
    launcher = ClusterLauncher(
        data_dir=str(tmp_path), host="127.0.0.1", port=0, nats_port=0, auto_ports=True,
        only=("identity", "conversations", "webhooks", "whatsapp", "web"),
        extra_env={"THREADLINE_LOG_LEVEL": "WARNING", "THREADLINE_WEBHOOK_RETRY_BASE_SECONDS": "0.2"})
    launcher.say = lambda _text: None  # type: ignore[method-assign]
    seen: dict[str, set[str]] = {}  # message text → the event ids it arrived under
    arrivals: dict[str, list[str]] = {}  # conversation → message ids, first arrival of each event
    texts: dict[str, str] = {}  # message id → text

    async def hook(request: web.Request) -> web.Response:
        for event in (await request.json())["events"]:
            if event["type"] == "conversation:message":
                ids = seen.setdefault(event["payload"]["message"]["content"]["text"], set())
                if event["id"] not in ids:
                    ids.add(event["id"])
                    texts[event["payload"]["message"]["id"]] = event["payload"]["message"]["content"]["text"]
                    arrivals.setdefault(event["payload"]["conversation"]["id"], []).append(
                        event["payload"]["message"]["id"])
        return web.Response(text="ok")

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    runner = web.AppRunner(receiver)
    await runner.setup()
    hook_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", hook_port).start()
    observer: Bus | None = None
    try:
        info = await launcher.start()
        assert launcher.cluster is not None
        assert {len(launcher.replicas_of(name)) for name in launcher.service_names} == {2}
        # The three nodes share this machine's cores; the sandbox hands nothing to a desk that
        # is not running.
        node_procs = os.environ.get("GOMAXPROCS", str(max(1, len(os.sched_getaffinity(0)) // 3)))
        for node in launcher.cluster.nodes:
            assert node.server.process is not None
            environ = Path(f"/proc/{node.server.process.pid}/environ").read_bytes().split(b"\0")
            assert f"GOMAXPROCS={node_procs}".encode() in environ
        assert "switchboardId" not in info
        observer = await Bus.connect(launcher.cluster.url, "test-observer")
        for stream in subjects.ALL_STREAMS:
            assert (await observer.js.stream_info(stream.name)).config.num_replicas == 3
        auth = basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"])
        wa = info["integrations"]["whatsapp"]
        url = f"{launcher.base_url}/webhooks/whatsapp/{wa['id']}"
        accepted: set[int] = set()
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{launcher.base_url}/v2/apps/{info['appId']}/integrations", headers=auth, json={
                    "type": "custom", "webhooks": [{"target": f"http://127.0.0.1:{hook_port}/hook",
                                                    "triggers": ["conversation:message"]}]}) as resp:
                assert resp.status == 201

            async def send(i: int, prefix: str = "cluster") -> bool:
                body = payload(wa, i, prefix)
                headers = {"Content-Type": "application/json",
                           "X-Hub-Signature-256": meta_signature(wa["appSecret"], body)}
                deadline = time.monotonic() + SEND_DEADLINE
                while time.monotonic() < deadline:  # as Meta retries until it gets a 200
                    try:
                        async with session.post(url, data=body, headers=headers) as resp:
                            if resp.status == 200:
                                return True
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.1)
                return False

            # Warm up until the webhooks service knows the business endpoint (it reads it from KV).
            warmups = iter(range(10_000))

            async def warmed_up() -> bool:
                assert await send(next(warmups), "warmup")
                await asyncio.sleep(0.3)
                return any(text.startswith("warmup-") for text in seen)

            await until(warmed_up, 20, "a first message reaches the business")

            leader = await until(lambda: stream_leader(observer), 10, "TL_INBOUND has a leader")
            victims = {at: launcher.replicas_of(name)[0] for at, name in KILL_REPLICA_AT.items()}
            in_flight: set[asyncio.Task[None]] = set()

            async def send_and_record(i: int) -> None:
                if await send(i):
                    accepted.add(i)

            for i in range(MESSAGES):
                if i == KILL_LEADER_AT:
                    launcher.cluster.kill(leader)
                if i in victims:
                    victim = victims[i].process
                    assert victim is not None
                    victim.kill()
                in_flight.add(asyncio.create_task(send_and_record(i)))
                if i % 10 == 0:  # steady traffic, not one burst
                    await asyncio.sleep(0.05)
            await asyncio.wait_for(asyncio.gather(*in_flight), SEND_DEADLINE + 5)

        assert len(accepted) == MESSAGES, f"never accepted: {sorted(set(range(MESSAGES)) - accepted)}"
        new_leader = await until(lambda: stream_leader(observer), 15, "TL_INBOUND elects a new leader")
        assert new_leader != leader
        for victim in victims.values():
            assert victim.process is not None and victim.process.returncode is not None
            assert all(p.process is not None and p.process.returncode is None
                       for p in launcher.replicas_of(victim.service)[1:])
        expected = {f"cluster-{i}" for i in accepted}

        async def all_delivered() -> bool:
            return expected <= set(seen)

        try:
            await until(all_delivered, 40, "every accepted message reaches the business")
        finally:
            missing = expected - set(seen)
            assert missing == set(), f"lost after failover: {sorted(missing)}"
        assert [text for text, ids in seen.items() if len(ids) > 1] == [], "stored twice after failover"
        # Each conversation reached the business in the order of its history, whichever replicas
        # handled its messages.
        async with aiohttp.ClientSession() as session:
            for conversation_id, arrived in arrivals.items():
                stored = await history(session, launcher.base_url, info["appId"], conversation_id, auth)
                # On a failure, what each side saw: the texts (their send order) and when each was stored.
                assert arrived == [m["id"] for m in stored], (
                    f"conversation {conversation_id} out of order:\n arrived {[texts[i] for i in arrived]}\n"
                    f" history {[(m['content']['text'], m['id'], m['received']) for m in stored]}")
    finally:
        if observer is not None:
            await observer.close()
        await runner.cleanup()
        await launcher.shutdown(discard_database=True)
