"""End-to-end benchmark: signed channel webhooks in → business webhooks out, per channel.

Starts the whole system (as `threadline up` does: nats-server + every service as its own
process + front door) in a temporary data directory, registers a business webhook pointing at
a local receiver, drives N inbound webhooks of one channel — built and signed exactly as the
platform sends them — with C in flight, and counts the `conversation:message` webhooks that
come out (matched by each message's unique text).

Channels (`--channel`): `whatsapp` (X-Hub-Signature-256 over the Cloud API notification),
`messenger` (X-Hub-Signature-256 over `entry[].messaging[]`), `telegram` (an `Update` with
`X-Telegram-Bot-Api-Secret-Token`), `twilio` (a form with `X-Twilio-Signature` over the public
URL), `app` (the in-app SDK's message post, one session per sender, created first), or `all`:
each in turn on the same system, one block per channel and a summary table.

Prints per channel: msg/s sustained, p50/p99 webhook-in → webhook-out latency, lost and
duplicated counts, the CPU time per message of each service and nats-server (Linux); then the
floor pipeline (a bare aiohttp handler that awaits one JetStream publish) driven by the same load
generator, and the ratio.

With `--cluster`, the same load runs twice in one invocation: on the single-node system
(SQLite), then on cluster mode (`threadline up --cluster`: 3 NATS nodes with R3 streams,
PostgreSQL, two replicas of every service, the webhooks alternating between the two replicas of
the channel's service as a Kubernetes Service would spread them), and the cluster's figures are
printed beside the single node's.

The sandbox app is set up as a business with its own bot: the conversations stay with the
business's integrations. With `--desk`, its switchboard hands every conversation to the agent
desk as `make up`'s does (a ticket per conversation, routing, the desk following each message).

    python bench/e2e.py --messages 5000 --concurrency 64 --senders 500
    python bench/e2e.py --channel all --messages 3000 --rate 500
    python bench/e2e.py --cluster --messages 20000 --senders 20

Run by hand; tests never depend on these figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
import uvloop
from aiohttp import web

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shared.bus import Bus
from shared.encryption import Keyring
from shared.http import basic_auth_header
from shared.records import IntegrationRecord, integration_decoder
from shared.signing import meta_signature
from shared.subjects import INTEGRATIONS_BUCKET, StreamSpec
from shared.twilio_wire import API_VERSION, FORM_CONTENT_TYPE, SIGNATURE_HEADER, twilio_signature
from threadline.cli import Launcher, load_secrets
from threadline.cluster import ClusterLauncher
from threadline.natsserver import NatsServer, free_port

CHANNELS = ("whatsapp", "messenger", "telegram", "twilio", "app")
# The service that receives each channel's webhooks (launcher.services[…]) and its URL segment.
SERVICE_OF = {"whatsapp": "whatsapp", "messenger": "messenger", "telegram": "telegram", "twilio": "sms",
              "app": "app"}
TELEGRAM_SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
TEXT_PREFIX = "bench-"

Request = tuple[bytes, dict[str, str]]


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


def messenger_payload(page_id: str, psid: str, mid: str, text: str) -> bytes:
    """A Page notification as Meta posts it (platform reference §2.2): one text message event."""
    now_ms = int(time.time() * 1000)
    payload = {"object": "page", "entry": [{"id": page_id, "time": now_ms, "messaging": [{
        "sender": {"id": psid}, "recipient": {"id": page_id}, "timestamp": now_ms,
        "message": {"mid": mid, "text": text},
    }]}]}
    return json.dumps(payload, ensure_ascii=True).encode()


def telegram_update(update_id: int, user_id: int, message_id: int, text: str) -> bytes:
    """An `Update` carrying a private-chat text message, as the Bot API posts it (§4.4)."""
    user = {"id": user_id, "is_bot": False, "first_name": "Bench", "language_code": "en"}
    update = {"update_id": update_id, "message": {
        "message_id": message_id, "from": user, "chat": {"id": user_id, "first_name": "Bench", "type": "private"},
        "date": int(time.time()), "text": text,
    }}
    return json.dumps(update, ensure_ascii=False, separators=(",", ":")).encode()


def twilio_form(account_sid: str, to_number: str, sender: str, sid: str, text: str) -> list[tuple[str, str]]:
    """An inbound SMS webhook form with Twilio's parameters in Twilio's order (§5.1)."""
    return [
        ("ToCountry", "US"), ("ToState", ""), ("SmsMessageSid", sid), ("NumMedia", "0"), ("ToCity", ""),
        ("FromZip", ""), ("SmsSid", sid), ("FromState", ""), ("SmsStatus", "received"), ("FromCity", ""),
        ("Body", text), ("FromCountry", "US"), ("To", to_number), ("ToZip", ""), ("NumSegments", "1"),
        ("ReferralNumMedia", "0"), ("MessageSid", sid), ("AccountSid", account_sid), ("From", sender),
        ("ApiVersion", API_VERSION),
    ]


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


async def drive(url: str | list[str], bodies: list[Request], concurrency: int,
                sent_at: dict[int, float] | None = None, rate: float = 0.0) -> tuple[float, list[int]]:
    """POST every body (to `url`, or to `url[i]`) with `concurrency` in flight (at most `rate`
    per second when set); returns (seconds, status codes)."""
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
                        target = url if isinstance(url, str) else url[i]
                        async with session.post(target, data=body, headers=headers) as resp:
                            await resp.read()
                            status = resp.status
                    except aiohttp.ClientError:
                        status = 599
                    if status < 500:
                        break
                    await asyncio.sleep(0.05 * (attempt + 1))  # as the platforms retry a 5xx
                statuses.append(status)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, statuses


# --- building each channel's webhooks --------------------------------------------------------

@dataclass
class ChannelLoad:
    """Where a channel's webhooks go and the signed requests to send (request i carries text i)."""

    url: str | list[str]
    requests: list[Request]


Builder = Callable[[dict[str, Any], IntegrationRecord, str, int, int], ChannelLoad]


# Every simulated install comes from loopback: the per-source session limits are for real visitors.
UNLIMITED_SDK_SESSIONS = {"THREADLINE_SDK_SESSIONS_PER_IP": "off", "THREADLINE_SDK_SESSIONS_PER_ORIGIN": "off",
                          "THREADLINE_SDK_SESSIONS_PER_APP": "off"}


def text_of(channel: str, i: int) -> str:
    """The unique text of message i of a channel's run (how its business webhook is recognised)."""
    return f"{TEXT_PREFIX}{channel}-{i}"


def build_whatsapp(integration: dict[str, Any], _record: IntegrationRecord, entry: str, messages: int,
                   senders: int) -> ChannelLoad:
    requests = []
    for i in range(messages):
        body = whatsapp_payload(integration["phoneNumberId"], integration["phoneNumber"].lstrip("+"),
                                f"1555{i % senders:07d}", f"wamid.bench{i:08d}", text_of("whatsapp", i))
        requests.append((body, {"Content-Type": "application/json",
                                "X-Hub-Signature-256": meta_signature(integration["appSecret"], body)}))
    return ChannelLoad(f"{entry}/webhooks/whatsapp/{integration['id']}", requests)


def build_messenger(integration: dict[str, Any], _record: IntegrationRecord, entry: str, messages: int,
                    senders: int) -> ChannelLoad:
    requests = []
    for i in range(messages):
        body = messenger_payload(integration["pageId"], f"{7_100_000_000_000_000 + i % senders}",
                                 f"m_bench{i:08d}", text_of("messenger", i))
        requests.append((body, {"Content-Type": "application/json", "User-Agent": "facebookexternalua",
                                "X-Hub-Signature-256": meta_signature(integration["appSecret"], body)}))
    return ChannelLoad(f"{entry}/webhooks/messenger/{integration['id']}", requests)


def build_telegram(integration: dict[str, Any], record: IntegrationRecord, entry: str, messages: int,
                   senders: int) -> ChannelLoad:
    secret = record.config.get("webhookSecret")
    if not isinstance(secret, str) or not secret:
        raise RuntimeError(f"telegram integration {integration['id']} has no webhookSecret in KV")
    headers = {"Content-Type": "application/json", TELEGRAM_SECRET_HEADER: secret}
    # Message ids are unique per chat in Telegram; a global counter keeps them unique in every chat.
    requests = [(telegram_update(800_000_000 + i, 700_000_000 + i % senders, i + 1, text_of("telegram", i)),
                 headers) for i in range(messages)]
    return ChannelLoad(f"{entry}/webhooks/telegram/{integration['id']}", requests)


def build_twilio(integration: dict[str, Any], record: IntegrationRecord, entry: str, messages: int,
                 senders: int) -> ChannelLoad:
    # Twilio signs the public URL configured in its console, whatever URL the service sees.
    configured = record.config.get("webhookUrl")
    signed_url = configured if isinstance(configured, str) and configured else integration["webhookUrl"]
    requests = []
    for i in range(messages):
        form = twilio_form(integration["accountSid"], integration["phoneNumber"], f"+1555{i % senders:07d}",
                           f"SM{i:032x}", text_of("twilio", i))
        requests.append((urlencode(form).encode(), {
            "Content-Type": FORM_CONTENT_TYPE, "User-Agent": "TwilioProxy/1.1", "Accept": "*/*",
            SIGNATURE_HEADER: twilio_signature(integration["authToken"], signed_url, form),
            "I-Twilio-Idempotency-Token": os.urandom(16).hex()}))
    return ChannelLoad(f"{entry}/webhooks/twilio/{integration['id']}", requests)


async def app_sessions(entry: str, app_id: str, integration_id: str, senders: int) -> list[dict[str, Any]]:
    """One SDK session (user, client, conversation) per simulated app install: a session, then its
    first message (which creates them and registers the install; not a bench message)."""
    sdk = f"{entry}/app/v1/apps/{app_id}"
    connector = aiohttp.TCPConnector(limit=16)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(n: int) -> dict[str, Any]:
            async with session.post(f"{sdk}/integrations/{integration_id}/sessions") as resp:
                if resp.status != 201:
                    raise RuntimeError(f"app session: {resp.status} {await resp.text()}")
                pending: dict[str, Any] = await resp.json()
            first = {"clientMessageId": f"bench-install-{n:06d}", "text": f"install {n}",
                     "device": {"guid": f"bench-install-{n}", "appVersion": "1.0.0"}}
            async with session.post(f"{sdk}/conversations", json=first,
                                    headers={"Authorization": f"Bearer {pending['sessionToken']}"}) as resp:
                if resp.status != 201:
                    raise RuntimeError(f"app first message: {resp.status} {await resp.text()}")
                result: dict[str, Any] = await resp.json()
                return result

        return list(await asyncio.gather(*(one(n) for n in range(senders))))


def build_app(sessions: list[dict[str, Any]], app_id: str, entry: str, messages: int) -> ChannelLoad:
    urls, requests = [], []
    for i in range(messages):
        session = sessions[i % len(sessions)]
        urls.append(f"{entry}/app/v1/apps/{app_id}/conversations/{session['conversationId']}/messages")
        body = json.dumps({"clientMessageId": f"bench-app-{i:08d}", "text": text_of("app", i)}).encode()
        requests.append((body, {"Content-Type": "application/json",
                                "Authorization": f"Bearer {session['sessionToken']}"}))
    return ChannelLoad(urls, requests)


BUILDERS: dict[str, Builder] = {
    "whatsapp": build_whatsapp, "messenger": build_messenger, "telegram": build_telegram, "twilio": build_twilio,
}


async def integration_record(bus: Bus, integration_id: str, ready: Callable[[IntegrationRecord], bool],
                             keyring: Keyring, timeout: float = 15.0) -> IntegrationRecord:
    """The integration's record from the integrations KV bucket (its secrets opened with
    `keyring`), once `ready(record)` holds."""
    kv = await bus.key_value(INTEGRATIONS_BUCKET)
    deadline = time.monotonic() + timeout
    while True:
        try:
            entry = await kv.get(integration_id)
            record = integration_decoder(keyring)(entry.value) if entry.value else None
        except Exception:
            record = None
        if record is not None and ready(record):
            return record
        if time.monotonic() > deadline:
            raise RuntimeError(f"integration {integration_id} not ready in {INTEGRATIONS_BUCKET}")
        await asyncio.sleep(0.2)


def has_webhook_secret(record: IntegrationRecord) -> bool:
    """True once the integrations API has minted the Telegram integration's webhook secret."""
    return bool(record.config.get("webhookSecret"))


def is_present(_record: IntegrationRecord) -> bool:
    """Any stored record will do."""
    return True


# --- the system run ----------------------------------------------------------------------------

class Receiver:
    """The business webhook endpoint: first-arrival times of every bench message, per channel."""

    def __init__(self) -> None:
        self.received: dict[str, dict[int, list[float]]] = {channel: {} for channel in CHANNELS}

    async def handle(self, request: web.Request) -> web.Response:
        now = time.perf_counter()
        body = await request.json()
        for event in body.get("events", []):
            if event.get("type") != "conversation:message":
                continue
            text = event["payload"]["message"]["content"].get("text") or ""
            if not text.startswith(TEXT_PREFIX):
                continue
            channel, _, index = text[len(TEXT_PREFIX):].rpartition("-")
            if channel in self.received and index.isdigit():
                self.received[channel].setdefault(int(index), []).append(now)
        return web.Response(text="ok")


async def bench_channel(channel: str, load: ChannelLoad, receiver: Receiver,
                        args: argparse.Namespace) -> dict[str, Any]:
    received = receiver.received[channel]
    sent_at: dict[int, float] = {}
    started = time.perf_counter()
    ingest_seconds, statuses = await drive(load.url, load.requests, args.concurrency, sent_at, args.rate)
    deadline = time.perf_counter() + args.drain_timeout
    while len(received) < args.messages and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    last = max((times[0] for times in received.values()), default=time.perf_counter())
    total_seconds = last - started
    latencies = [(times[0] - sent_at[i]) * 1000 for i, times in received.items() if i in sent_at]
    non_200: dict[int, int] = {}
    for status in statuses:
        if not 200 <= status < 300:
            non_200[status] = non_200.get(status, 0) + 1
    return {
        "channel": channel,
        "messages": args.messages,
        "accepted_200": sum(1 for s in statuses if 200 <= s < 300),
        "refused": non_200,
        "ingest_msg_per_s": args.messages / ingest_seconds,
        "end_to_end_msg_per_s": len(received) / total_seconds if total_seconds > 0 else 0.0,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "lost": args.messages - len(received),
        "duplicated": sum(len(t) - 1 for t in received.values()),
    }


async def bench_system(args: argparse.Namespace, channels: tuple[str, ...], *,
                       cluster: bool = False) -> list[dict[str, Any]]:
    data_dir = tempfile.mkdtemp(prefix="threadline-bench-cluster-" if cluster else "threadline-bench-")
    launcher_type = ClusterLauncher if cluster else Launcher
    launcher = launcher_type(data_dir=data_dir, host="127.0.0.1", port=0, nats_port=0, auto_ports=True,
                             extra_env={"THREADLINE_LOG_LEVEL": "WARNING", **UNLIMITED_SDK_SESSIONS})
    launcher.sandbox_desk = args.desk
    launcher.say = lambda text: None  # type: ignore[method-assign]
    info = await launcher.start()
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    receiver_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", receiver_port).start()
    bus: Bus | None = None
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
        nats_url = launcher.cluster.url if isinstance(launcher, ClusterLauncher) and launcher.cluster else None
        if nats_url is None:
            assert launcher.nats is not None
            nats_url = launcher.nats.url
        bus = await Bus.connect(nats_url, "bench")
        # Credentials in KV are sealed with the installation's key (secrets.json).
        keyring = Keyring.parse(load_secrets(data_dir)["secretsKey"])
        loads: dict[str, ChannelLoad] = {}
        # Through the front door (as in `make up`), or straight to the channel's service as a
        # Kubernetes Ingress would deliver it (the Python front door costs a proxy hop on the
        # same 2 cores as the load generator).
        for channel in channels:
            integration = info["integrations"]["android" if channel == "app" else channel]
            entries = [info["baseUrl"]] if args.via_frontdoor else service_entries(launcher, SERVICE_OF[channel])
            entry = entries[0]
            if channel == "app":
                sessions = await app_sessions(entry, info["appId"], integration["id"], min(args.senders, args.messages))
                loads[channel] = build_app(sessions, info["appId"], entry, args.messages)
                continue
            # Telegram's webhook secret is minted by the integrations API and never written to
            # sandbox.json: it is read, like every channel's record, from the integrations bucket.
            ready = has_webhook_secret if channel == "telegram" else is_present
            record = await integration_record(bus, integration["id"], ready, keyring)
            loads[channel] = spread(BUILDERS[channel](integration, record, entry, args.messages, args.senders),
                                    entries)
        await asyncio.sleep(1.0)  # let the webhook config reach the webhooks service's KV mirror
        results = []
        for channel in channels:
            before = cpu_seconds(launcher)
            result = await bench_channel(channel, loads[channel], receiver, args)
            after = cpu_seconds(launcher)
            result["cpu_us_per_msg"] = {name: (after[name] - before.get(name, 0.0)) * 1e6 / args.messages
                                        for name in after}
            results.append(result)
        return results
    finally:
        if bus is not None:
            await bus.close()
        await runner.cleanup()
        if isinstance(launcher, ClusterLauncher):
            await launcher.shutdown(discard_database=True)
        else:
            await launcher.shutdown()
        shutil.rmtree(data_dir, ignore_errors=True)


def service_entries(launcher: Launcher, service: str) -> list[str]:
    """The base URLs of a service's processes (one on a single node, one per replica in a cluster)."""
    if isinstance(launcher, ClusterLauncher):
        return [f"http://127.0.0.1:{replica.port}" for replica in launcher.replicas_of(service)]
    return [f"http://127.0.0.1:{launcher.services[service].port}"]


def spread(load: ChannelLoad, entries: list[str]) -> ChannelLoad:
    """Request i to replica i mod n (a Kubernetes Service spreads connections; no proxy hop here)."""
    if len(entries) < 2 or not isinstance(load.url, str):
        return load
    first = entries[0]
    return ChannelLoad([load.url.replace(first, entries[i % len(entries)], 1) for i in range(len(load.requests))],
                       load.requests)


def _proc_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # Fields after the parenthesized command: ppid is the 2nd, utime and stime the 12th and 13th.
            return stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(launcher: Launcher) -> dict[str, float]:
    """CPU time (user + system) each service (its replicas summed), nats-server (its nodes) and
    PostgreSQL (with its backends) have used so far (Linux /proc; empty elsewhere): differences
    around a run give the CPU a message costs."""
    pids: dict[int, str] = {}
    for name, svc in launcher.services.items():
        if svc.process is not None:
            pids[svc.process.pid] = getattr(svc, "service", "") or name
    if launcher.nats is not None and launcher.nats.process is not None:
        pids[launcher.nats.process.pid] = "nats-server"
    if isinstance(launcher, ClusterLauncher):
        if launcher.cluster is not None:
            for node in launcher.cluster.nodes:
                if node.server.process is not None:
                    pids[node.server.process.pid] = "nats-server"
        if launcher.postgres is not None and launcher.postgres.process is not None:
            postmaster = launcher.postgres.process.pid
            pids[postmaster] = "postgres"
            for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
                if entry.isdigit():
                    fields = _proc_stat(int(entry))
                    if fields is not None and fields[1] == str(postmaster):
                        pids[int(entry)] = "postgres"
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    used: dict[str, float] = {}
    for pid, name in pids.items():
        fields = _proc_stat(pid)
        if fields is not None:
            used[name] = used.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return used


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


def print_block(result: dict[str, Any], args: argparse.Namespace, floor_msg_per_s: float, system: str = "") -> None:
    channel = result["channel"]
    target = "through the front door" if args.via_frontdoor else f"straight to the {SERVICE_OF[channel]} service"
    where = f" {system}" if system else ""
    print(f"threadline e2e [{channel}]{where}: {args.messages} webhooks, {args.concurrency} in flight, "
          f"{args.senders} senders, {target}, {'the desk routing every conversation, ' if args.desk else ''}"
          f"offered {f'{args.rate:.0f} msg/s' if args.rate else 'as fast as accepted'}")
    refused = ", ".join(f"{status}×{count}" for status, count in sorted(result["refused"].items()))
    print(f"  accepted (2xx)            {result['accepted_200']}" + (f"   refused: {refused}" if refused else ""))
    print(f"  ingest (webhook → 200)    {result['ingest_msg_per_s']:.0f} msg/s")
    print(f"  end to end sustained      {result['end_to_end_msg_per_s']:.0f} msg/s")
    print(f"  latency in → out          p50 {result['p50_ms']:.1f} ms   p99 {result['p99_ms']:.1f} ms")
    print(f"  lost                      {result['lost']}")
    print(f"  duplicated                {result['duplicated']}")
    ratio = result["end_to_end_msg_per_s"] / floor_msg_per_s if floor_msg_per_s else 0.0
    print(f"  ratio end-to-end / floor  {ratio:.2f}")
    cpu = {name: us for name, us in result.get("cpu_us_per_msg", {}).items() if us >= 1}
    if cpu:
        busiest = ", ".join(f"{name} {us:.0f}" for name, us in sorted(cpu.items(), key=lambda item: -item[1]))
        print(f"  CPU per message           {sum(cpu.values()):.0f} µs ({busiest})")


def print_summary(results: list[dict[str, Any]], floor_msg_per_s: float) -> None:
    print("summary")
    print(f"  {'channel':<10} {'2xx':>6} {'ingest/s':>9} {'e2e/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'lost':>5} {'dup':>5} {'ratio':>6}")
    for r in results:
        ratio = r["end_to_end_msg_per_s"] / floor_msg_per_s if floor_msg_per_s else 0.0
        print(f"  {r['channel']:<10} {r['accepted_200']:>6} {r['ingest_msg_per_s']:>9.0f} "
              f"{r['end_to_end_msg_per_s']:>7.0f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
              f"{r['lost']:>5} {r['duplicated']:>5} {ratio:>6.2f}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channel", choices=(*CHANNELS, "all"), default="whatsapp",
                        help="which channel's webhooks to drive; `all` runs each in turn on the same system")
    parser.add_argument("--messages", type=int, default=5000, help="webhooks per channel")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--senders", type=int, default=500, help="distinct senders per channel")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="seconds to wait for the last business webhook after the last request")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="offered load in msg/s (open loop); default: as fast as the system accepts")
    parser.add_argument("--via-frontdoor", action="store_true",
                        help="send through the Python front door instead of straight to the channel's service")
    parser.add_argument("--cluster", action="store_true",
                        help="run the load on the single node (SQLite), then on cluster mode (PostgreSQL, "
                             "2 replicas of every service, 3 NATS nodes) and compare")
    parser.add_argument("--desk", action="store_true",
                        help="the sandbox app's switchboard hands its conversations to the agent desk "
                             "(as under `make up`)")
    args = parser.parse_args()
    channels = CHANNELS if args.channel == "all" else (args.channel,)
    results = await bench_system(args, channels)
    clustered = await bench_system(args, channels, cluster=True) if args.cluster else []
    floor = await bench_floor(args)
    for result in results:
        print_block(result, args, floor["floor_msg_per_s"], "single node, SQLite" if clustered else "")
    for result in clustered:
        print_block(result, args, floor["floor_msg_per_s"], "cluster, PostgreSQL, 2 replicas each")
    print(f"floor (aiohttp + awaited JetStream publish): {floor['floor_msg_per_s']:.0f} msg/s")
    for single, cluster in zip(results, clustered, strict=False):
        base = single["end_to_end_msg_per_s"]
        share = cluster["end_to_end_msg_per_s"] / base if base else 0.0
        print(f"cluster / single node [{single['channel']}]: {share:.2f} of the throughput, "
              f"p99 {cluster['p99_ms']:.0f} ms vs {single['p99_ms']:.0f} ms")
    if len(results) > 1:
        print_summary(results, floor["floor_msg_per_s"])


if __name__ == "__main__":
    uvloop.run(main())  # as `threadline up` runs its front door, and the services run
