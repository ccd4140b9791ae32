"""Cluster mode: losing the NATS node that leads the streams, and a channel replica, loses nothing.

`ClusterLauncher` runs a 3-node JetStream cluster on loopback (streams and KV with 3 replicas),
two replicas of the stateless services behind a round-robin balancer and one of each stateful
service. Signed WhatsApp webhooks stream in while the node leading TL_INBOUND and one
`whatsapp` replica are SIGKILLed. Every webhook answered 200 reaches the business exactly once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
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

MESSAGES = 120
KILL_LEADER_AT = 30
KILL_REPLICA_AT = 60
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


async def until(probe: Any, timeout: float, what: str) -> Any:
    """Poll an async probe until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        await asyncio.sleep(0.1)


async def test_losing_the_stream_leader_and_a_channel_replica_loses_nothing(tmp_path: Path) -> None:
    launcher = ClusterLauncher(
        data_dir=str(tmp_path), host="127.0.0.1", port=0, nats_port=0, auto_ports=True,
        only=("identity", "conversations", "webhooks", "whatsapp", "web"),
        extra_env={"THREADLINE_LOG_LEVEL": "WARNING", "THREADLINE_WEBHOOK_RETRY_BASE_SECONDS": "0.2"})
    launcher.say = lambda _text: None  # type: ignore[method-assign]
    seen: Counter[str] = Counter()

    async def hook(request: web.Request) -> web.Response:
        for event in (await request.json())["events"]:
            if event["type"] == "conversation:message":
                seen[event["payload"]["message"]["content"]["text"]] += 1
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
        assert [len(launcher.replicas_of(name)) for name in ("whatsapp", "web", "conversations")] == [2, 2, 1]
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
            victim_replica = launcher.replicas_of("whatsapp")[0]
            in_flight: set[asyncio.Task[None]] = set()

            async def send_and_record(i: int) -> None:
                if await send(i):
                    accepted.add(i)

            for i in range(MESSAGES):
                if i == KILL_LEADER_AT:
                    launcher.cluster.kill(leader)
                if i == KILL_REPLICA_AT:
                    assert victim_replica.process is not None
                    victim_replica.process.kill()
                in_flight.add(asyncio.create_task(send_and_record(i)))
                if i % 10 == 0:  # steady traffic, not one burst
                    await asyncio.sleep(0.05)
            await asyncio.wait_for(asyncio.gather(*in_flight), SEND_DEADLINE + 5)

        assert len(accepted) == MESSAGES, f"never accepted: {sorted(set(range(MESSAGES)) - accepted)}"
        new_leader = await until(lambda: stream_leader(observer), 15, "TL_INBOUND elects a new leader")
        assert new_leader != leader
        assert victim_replica.process is not None and victim_replica.process.returncode is not None
        assert all(p.process is not None and p.process.returncode is None
                   for p in launcher.replicas_of("whatsapp")[1:])
        expected = {f"cluster-{i}" for i in accepted}

        async def all_delivered() -> bool:
            return expected <= set(seen)

        try:
            await until(all_delivered, 40, "every accepted message reaches the business")
        finally:
            missing = expected - set(seen)
            assert missing == set(), f"lost after failover: {sorted(missing)}"
        assert [text for text, count in seen.items() if count > 1] == [], "duplicated after failover"
    finally:
        if observer is not None:
            await observer.close()
        await runner.cleanup()
        await launcher.shutdown()
