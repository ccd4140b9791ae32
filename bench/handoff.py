"""Handoff benchmark: from the moment a link code arrives on the new channel to the recap sent.

Starts the whole system (as `threadline up` does: nats-server, every service as its own
process, sandbox channels) in a temporary data directory, plus a local stand-in for the WhatsApp
Cloud API that timestamps every send it receives. A second WhatsApp integration, created through
the business API, points at it.

For each sample: an in-app SDK session (user, conversation, a few messages of history) asks for
a link request to that WhatsApp integration through the business API; the bench then posts the
signed webhook the Cloud API would post when the customer sends the prefilled text carrying the
code (`TL…`), and waits for the recap (the "Continuing your conversation…" text) to reach the
Cloud API stand-in. Latency = webhook sent → recap received by the platform: the WhatsApp
service's intake, JetStream, conversations' redemption through `handoff`, the identity link,
the history read, the outbound command and the Cloud API call.

Two runs: at idle (samples one after another), and under background traffic (signed WhatsApp
messages from other senders at `--background-rate` msg/s through the sandbox integration, with
a business webhook receiving them) with the same samples paced in between.

    python bench/handoff.py --samples 200 --background-rate 500

Run by hand; tests never depend on these figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import uvloop
from aiohttp import web

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from e2e import UNLIMITED_SDK_SESSIONS, app_sessions, drive, percentile, whatsapp_payload

from shared.egress import ALLOW_ENV
from shared.http import basic_auth_header
from shared.signing import meta_signature
from threadline.cli import Launcher
from threadline.natsserver import free_port

RECAP_PREFIX = "Continuing your conversation"
HISTORY_MESSAGES = 3
BENCH_PHONE_NUMBER_ID = "990000000000001"
BENCH_APP_SECRET = "bench-app-secret-0123456789abcdef"


class CloudApiStandIn:
    """Answers `POST /{version}/{phone_number_id}/messages` like the Cloud API and records when
    each recipient's recap arrived."""

    def __init__(self) -> None:
        self.recaps: dict[str, float] = {}
        self.waiters: dict[str, asyncio.Future[float]] = {}
        self.sends = 0

    async def handle(self, request: web.Request) -> web.Response:
        now = time.perf_counter()
        body = await request.json()
        self.sends += 1
        to = str(body.get("to", ""))
        text = (body.get("text") or {}).get("body", "")
        if text.startswith(RECAP_PREFIX) and to not in self.recaps:
            self.recaps[to] = now
            waiter = self.waiters.pop(to, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(now)
        return web.json_response({"messaging_product": "whatsapp",
                                  "contacts": [{"input": to, "wa_id": to}],
                                  "messages": [{"id": f"wamid.standin{self.sends:010d}"}]})

    def wait_for(self, to: str) -> asyncio.Future[float]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        if to in self.recaps:
            future.set_result(self.recaps[to])
        else:
            self.waiters[to] = future
        return future


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


class Sample:
    """One prepared handoff: the sender's number and the signed webhook carrying the code."""

    def __init__(self, sender: str, body: bytes, headers: dict[str, str]) -> None:
        self.sender = sender
        self.body = body
        self.headers = headers


async def prepare(session: aiohttp.ClientSession, base: str, app_entry: str, auth: dict[str, str],
                  app_id: str, android_id: str, integration: dict[str, Any], count: int,
                  first_sender: int) -> list[Sample]:
    """SDK sessions with some history, a link request each, and the webhook that redeems it."""
    sessions = await app_sessions(app_entry, app_id, android_id, count)
    samples: list[Sample] = []
    for n, sdk in enumerate(sessions):
        headers = {"Authorization": f"Bearer {sdk['sessionToken']}"}
        for m in range(HISTORY_MESSAGES):
            url = f"{app_entry}/app/v1/apps/{app_id}/conversations/{sdk['conversationId']}/messages"
            line = {"clientMessageId": f"history-{first_sender + n:06d}-{m}", "text": f"history line {m}"}
            async with session.post(url, headers=headers, json=line) as resp:
                if resp.status not in (200, 201, 202):
                    raise RuntimeError(f"history message: {resp.status} {await resp.text()}")
        link_url = f"{base}/v2/apps/{app_id}/users/{sdk['appUserId']}/linkRequests"
        async with session.post(link_url, headers=auth, json={"integrationIds": [integration["id"]],
                                                               "conversationId": sdk["conversationId"]}) as resp:
            if resp.status != 201:
                raise RuntimeError(f"link request: {resp.status} {await resp.text()}")
            link = (await resp.json())["linkRequests"][0]
        prefilled = parse_qs(urlsplit(link["url"]).query)["text"][0]
        sender = f"1666{first_sender + n:07d}"
        body = whatsapp_payload(BENCH_PHONE_NUMBER_ID, integration["phoneNumber"].lstrip("+"), sender,
                                f"wamid.handoff{first_sender + n:08d}", prefilled)
        samples.append(Sample(sender, body, {"Content-Type": "application/json",
                                             "X-Hub-Signature-256": meta_signature(BENCH_APP_SECRET, body)}))
    return samples


async def run_samples(session: aiohttp.ClientSession, webhook_url: str, cloud: CloudApiStandIn,
                      samples: list[Sample], gap: float, timeout: float) -> tuple[list[float], int]:
    """Post each sample's webhook in turn; returns the latencies (ms) and how many never arrived."""
    latencies: list[float] = []
    missing = 0
    for sample in samples:
        arrived = cloud.wait_for(sample.sender)
        started = time.perf_counter()
        async with session.post(webhook_url, data=sample.body, headers=sample.headers) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"webhook refused: {resp.status}")
        try:
            at = await asyncio.wait_for(arrived, timeout)
            latencies.append((at - started) * 1000)
        except TimeoutError:
            missing += 1
        if gap:
            await asyncio.sleep(gap)
    return latencies, missing


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200, help="handoffs per run")
    parser.add_argument("--background-rate", type=float, default=500.0, help="background msg/s in the second run")
    parser.add_argument("--background-senders", type=int, default=200)
    parser.add_argument("--gap", type=float, default=0.02, help="seconds between samples")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for one recap")
    args = parser.parse_args()

    cloud = CloudApiStandIn()
    cloud_app = web.Application()
    cloud_app.router.add_post("/{version}/{phone_number_id}/messages", cloud.handle)
    cloud_runner, cloud_port = await serve(cloud_app)

    business_seen = 0

    async def business_hook(request: web.Request) -> web.Response:
        nonlocal business_seen
        body = await request.json()
        business_seen += len(body.get("events", []))
        return web.Response(text="ok")

    hook_app = web.Application()
    hook_app.router.add_post("/hook", business_hook)
    hook_runner, hook_port = await serve(hook_app)

    data_dir = tempfile.mkdtemp(prefix="threadline-bench-handoff-")
    # The stand-in plays Meta's Cloud API on loopback, which the egress policy refuses as a
    # platform base URL unless the operator lists it: exactly that port is listed.
    os.environ[ALLOW_ENV] = ",".join(part for part in (os.environ.get(ALLOW_ENV, ""), f"127.0.0.1:{cloud_port}")
                                     if part)
    launcher = Launcher(data_dir=data_dir, host="127.0.0.1", port=0, nats_port=0, auto_ports=True,
                        extra_env={"THREADLINE_LOG_LEVEL": "WARNING", **UNLIMITED_SDK_SESSIONS})
    launcher.say = lambda text: None  # type: ignore[method-assign]
    info = await launcher.start()
    try:
        base = info["baseUrl"]
        app_id = info["appId"]
        auth = basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"])
        whatsapp_entry = f"http://127.0.0.1:{launcher.services['whatsapp'].port}"
        app_entry = f"http://127.0.0.1:{launcher.services['app'].port}"
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}/v2/apps/{app_id}/integrations", headers=auth, json={
                "type": "whatsapp", "displayName": "bench WhatsApp", "phoneNumber": "+15550009999",
                "phoneNumberId": BENCH_PHONE_NUMBER_ID, "accessToken": "bench-access-token-0123456789",
                "appSecret": BENCH_APP_SECRET, "verifyToken": "bench-verify",
                "baseUrl": f"http://127.0.0.1:{cloud_port}",
            }) as resp:
                if resp.status != 201:
                    raise RuntimeError(f"cannot create the bench integration: {resp.status} {await resp.text()}")
                integration = (await resp.json())["integration"]
                integration.setdefault("phoneNumber", "+15550009999")
            async with session.post(f"{base}/v2/apps/{app_id}/integrations", headers=auth, json={
                "type": "custom", "displayName": "bench business",
                "webhooks": [{"target": f"http://127.0.0.1:{hook_port}/hook", "triggers": ["conversation:message"]}],
            }) as resp:
                if resp.status != 201:
                    raise RuntimeError(f"cannot create the business webhook: {resp.status} {await resp.text()}")
            android_id = info["integrations"]["android"]["id"]
            webhook_url = f"{whatsapp_entry}/webhooks/whatsapp/{integration['id']}"
            await asyncio.sleep(1.0)  # the new integration reaches the whatsapp service's KV mirror

            # Warm-up: first calls pay for connection set-up and caches on every hop.
            warm = await prepare(session, base, app_entry, auth, app_id, android_id, integration, 5, 0)
            await run_samples(session, webhook_url, cloud, warm, args.gap, args.timeout)

            idle_samples = await prepare(session, base, app_entry, auth, app_id, android_id, integration,
                                         args.samples, 10_000)
            idle, idle_missing = await run_samples(session, webhook_url, cloud, idle_samples, args.gap, args.timeout)

            loaded_samples = await prepare(session, base, app_entry, auth, app_id, android_id, integration,
                                           args.samples, 20_000)
            sandbox_wa = info["integrations"]["whatsapp"]
            sample_seconds = args.samples * (args.gap + 0.03)
            background_count = int(args.background_rate * (sample_seconds + 4.0))
            background = []
            for i in range(background_count):
                body = whatsapp_payload(sandbox_wa["phoneNumberId"], sandbox_wa["phoneNumber"].lstrip("+"),
                                        f"1777{i % args.background_senders:07d}", f"wamid.bg{i:08d}", f"bg-{i}")
                background.append((body, {"Content-Type": "application/json",
                                          "X-Hub-Signature-256": meta_signature(sandbox_wa["appSecret"], body)}))
            background_task = asyncio.create_task(drive(
                f"{whatsapp_entry}/webhooks/whatsapp/{sandbox_wa['id']}", background, 32, rate=args.background_rate))
            await asyncio.sleep(2.0)  # reach the steady rate before sampling
            loaded, loaded_missing = await run_samples(session, webhook_url, cloud, loaded_samples, args.gap,
                                                       args.timeout)
            background_seconds, statuses = await background_task
        accepted = sum(1 for s in statuses if s == 200)
        print(f"threadline handoff: code arrival (signed WhatsApp webhook) → recap received by the Cloud API, "
              f"{args.samples} samples per run, {HISTORY_MESSAGES} history messages each")
        print(f"  idle                 p50 {percentile(idle, 50):7.1f} ms   p99 {percentile(idle, 99):7.1f} ms   "
              f"max {max(idle, default=float('nan')):7.1f} ms   missing {idle_missing}")
        print(f"  background {len(statuses) / background_seconds:5.0f} msg/s "
              f"p50 {percentile(loaded, 50):7.1f} ms   p99 {percentile(loaded, 99):7.1f} ms   "
              f"max {max(loaded, default=float('nan')):7.1f} ms   missing {loaded_missing}")
        print(f"  background traffic: {accepted}/{len(statuses)} webhooks accepted, "
              f"{business_seen} business webhook events seen")
    finally:
        await launcher.shutdown()
        await hook_runner.cleanup()
        await cloud_runner.cleanup()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    uvloop.run(main())  # as the services run
