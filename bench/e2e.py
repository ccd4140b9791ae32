"""End-to-end benchmark: signed WhatsApp webhooks in → business webhooks out.

Starts the whole system (as `threadline up` does: nats-server + every service as its own
process + front door) in a temporary data directory, registers a business webhook pointing at
a local receiver, drives N signed WhatsApp webhooks through the front door with C in flight,
and counts the `conversation:message` webhooks that come out.

Prints: msg/s sustained, p50/p99 webhook-in → webhook-out latency, lost and duplicated
counts; then the floor pipeline (a bare aiohttp handler that awaits one JetStream publish)
driven by the same load generator, and the ratio.

    python bench/e2e.py --messages 5000 --concurrency 64 --senders 500

Run by hand; tests never depend on these figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shared.bus import Bus
from shared.http import basic_auth_header
from shared.signing import meta_signature
from shared.subjects import StreamSpec
from threadline.cli import Launcher
from threadline.natsserver import NatsServer, free_port


def whatsapp_payload(phone_number_id: str, display_number: str, sender: str, wamid: str, text: str) -> bytes:
    payload = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "102290129340398", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": display_number, "phone_number_id": phone_number_id},
            "contacts": [{"profile": {"name": "Bench"}, "wa_id": sender, "user_id": f"US.{sender}"}],
            "messages": [{"from": sender, "from_user_id": f"US.{sender}", "id": wamid,
                          "timestamp": str(int(time.time())), "type": "text", "text": {"body": text}}],
        }}]}],
    }
    return json.dumps(payload, ensure_ascii=True).encode()


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


async def drive(url: str, bodies: list[tuple[bytes, dict[str, str]]], concurrency: int,
                sent_at: dict[int, float] | None = None, rate: float = 0.0) -> tuple[float, list[int]]:
    """POST every body with `concurrency` in flight (at most `rate` per second when set);
    returns (seconds, status codes)."""
    statuses: list[int] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(bodies)):
        queue.put_nowait(i)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                body, headers = bodies[i]
                if rate:
                    delay = started + i / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                for attempt in range(5):
                    if sent_at is not None:
                        sent_at.setdefault(i, time.perf_counter())
                    try:
                        async with session.post(url, data=body, headers=headers) as resp:
                            await resp.read()
                            status = resp.status
                    except aiohttp.ClientError:
                        status = 599
                    if status < 500:
                        break
                    await asyncio.sleep(0.05 * (attempt + 1))  # as Meta would retry a 5xx
                statuses.append(status)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, statuses


async def bench_system(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = tempfile.mkdtemp(prefix="threadline-bench-")
    launcher = Launcher(data_dir=data_dir, host="127.0.0.1", port=0, nats_port=0, auto_ports=True,
                        extra_env={"THREADLINE_LOG_LEVEL": "WARNING"})
    launcher.say = lambda _text: None  # type: ignore[method-assign]
    info = await launcher.start()
    received: dict[int, list[float]] = {}
    received_events = 0

    async def receive(request: web.Request) -> web.Response:
        nonlocal received_events
        now = time.perf_counter()
        body = await request.json()
        for event in body.get("events", []):
            if event.get("type") != "conversation:message":
                continue
            text = event["payload"]["message"]["content"].get("text", "")
            if text.startswith("bench-"):
                received.setdefault(int(text[6:]), []).append(now)
                received_events += 1
        return web.Response(text="ok")

    receiver = web.Application()
    receiver.router.add_post("/hook", receive)
    runner = web.AppRunner(receiver, access_log=None)
    await runner.setup()
    receiver_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", receiver_port).start()
    try:
        auth = basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"])
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{info['baseUrl']}/v2/apps/{info['appId']}/integrations", headers=auth, json={
                "type": "custom", "displayName": "bench",
                "webhooks": [{"target": f"http://127.0.0.1:{receiver_port}/hook",
                              "triggers": ["conversation:message"]}],
            }) as resp:
                if resp.status != 201:
                    raise RuntimeError(f"cannot create webhook: {resp.status} {await resp.text()}")
        await asyncio.sleep(1.0)  # let the webhook config reach the webhooks service's KV mirror
        wa = info["integrations"]["whatsapp"]
        # Through the front door (as in `make up`), or straight to the whatsapp service as a
        # Kubernetes Ingress would deliver it (the Python front door costs a proxy hop on the
        # same 2 cores as the load generator).
        entry = info["baseUrl"] if args.via_frontdoor else f"http://127.0.0.1:{launcher.services['whatsapp'].port}"
        url = f"{entry}/webhooks/whatsapp/{wa['id']}"
        bodies = []
        for i in range(args.messages):
            sender = f"1555{i % args.senders:07d}"
            body = whatsapp_payload(wa["phoneNumberId"], wa["phoneNumber"].lstrip("+"), sender,
                                    f"wamid.bench{i:08d}", f"bench-{i}")
            bodies.append((body, {"Content-Type": "application/json",
                                  "X-Hub-Signature-256": meta_signature(wa["appSecret"], body)}))
        sent_at: dict[int, float] = {}
        started = time.perf_counter()
        ingest_seconds, statuses = await drive(url, bodies, args.concurrency, sent_at, args.rate)
        deadline = time.perf_counter() + args.drain_timeout
        while len(received) < args.messages and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        last = max((times[0] for times in received.values()), default=time.perf_counter())
        total_seconds = last - started
        latencies = [(times[0] - sent_at[i]) * 1000 for i, times in received.items() if i in sent_at]
        return {
            "messages": args.messages,
            "accepted_200": sum(1 for s in statuses if s == 200),
            "ingest_msg_per_s": args.messages / ingest_seconds,
            "end_to_end_msg_per_s": len(received) / total_seconds if total_seconds > 0 else 0.0,
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "lost": args.messages - len(received),
            "duplicated": sum(len(t) - 1 for t in received.values()),
        }
    finally:
        await runner.cleanup()
        await launcher.shutdown()


async def bench_floor(args: argparse.Namespace) -> dict[str, Any]:
    """The floor: aiohttp handler → awaited JetStream publish → 200, same load generator."""
    store = tempfile.mkdtemp(prefix="threadline-floor-")
    server = NatsServer(store_dir=store).start()
    bus = await Bus.connect(server.url, "floor")
    await bus.ensure_streams(streams=(StreamSpec("FLOOR", ("floor.>",)),))

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        await bus.js.publish("floor.in", body)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        bodies = [(whatsapp_payload("1", "1", f"1555{i:07d}", f"wamid.f{i}", f"floor-{i}"),
                   {"Content-Type": "application/json"}) for i in range(args.messages)]
        seconds, statuses = await drive(f"http://127.0.0.1:{port}/hook", bodies, args.concurrency)
        return {"floor_msg_per_s": args.messages / seconds, "ok": sum(1 for s in statuses if s == 200)}
    finally:
        await runner.cleanup()
        await bus.close()
        server.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--senders", type=int, default=500, help="distinct WhatsApp senders")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="seconds to wait for the last business webhook after the last request")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="offered load in msg/s (open loop); default: as fast as the system accepts")
    parser.add_argument("--via-frontdoor", action="store_true",
                        help="send through the Python front door instead of straight to the whatsapp service")
    args = parser.parse_args()
    system = await bench_system(args)
    floor = await bench_floor(args)
    print(f"threadline e2e: {args.messages} WhatsApp webhooks, {args.concurrency} in flight, {args.senders} senders, "
          f"{'through the front door' if args.via_frontdoor else 'straight to the whatsapp service'}, "
          f"offered {f'{args.rate:.0f} msg/s' if args.rate else 'as fast as accepted'}")
    print(f"  accepted (200)            {system['accepted_200']}")
    print(f"  ingest (webhook → 200)    {system['ingest_msg_per_s']:.0f} msg/s")
    print(f"  end to end sustained      {system['end_to_end_msg_per_s']:.0f} msg/s")
    print(f"  latency in → out          p50 {system['p50_ms']:.1f} ms   p99 {system['p99_ms']:.1f} ms")
    print(f"  lost                      {system['lost']}")
    print(f"  duplicated                {system['duplicated']}")
    print(f"floor (aiohttp + awaited JetStream publish): {floor['floor_msg_per_s']:.0f} msg/s")
    ratio = system["end_to_end_msg_per_s"] / floor["floor_msg_per_s"] if floor["floor_msg_per_s"] else 0.0
    print(f"ratio end-to-end / floor:  {ratio:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
