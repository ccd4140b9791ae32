"""Chaos benchmark: signed WhatsApp traffic while services are SIGKILLed and restarted.

Starts the whole system as `threadline up` does (nats-server, every service as its own
process, the front door, the sandbox) in a temporary data directory, and runs `threadline up`'s
own supervisor (`Launcher._supervise`: a crashed service is restarted after a back-off of
0.5 s · 2^restarts, at most 30 s, as Kubernetes restarts a crashed container). The bench never
restarts anything itself: what it measures is what an operator of `threadline up` gets.

Meta's side: one signed Cloud API notification per message, offered at a steady `--rate`
through the front door for `--seconds`. A POST that gets no 200 (connection refused, timeout,
5xx) is posted again, with the same bytes and the same wamid, after an exponential back-off
(Meta keeps retrying for hours; here until the end of the drain window).

Meanwhile `--kills` SIGKILLs go to `conversations`, `webhooks`, `whatsapp` and `identity` in
turn, evenly spread over the traffic period; each kill's recovery (SIGKILL → new process →
its /readyz answers 200) is timed.

The business side: a local webhook receiver records every `conversation:message` event. Per
WhatsApp message id (wamid): **lost** when no event arrived by the end of the drain window,
**duplicated** when two different event ids arrived (the message was stored twice),
**redelivered** when one event id arrived more than once (at-least-once delivery, which a
business de-duplicates on the event id). Then the history is read back through the business
API: every wamid's text must be stored exactly once.

    python bench/chaos.py --rate 100 --seconds 60 --kills 8

Exit code 1 when anything was lost or duplicated (the bar is zero of each). Run by hand;
tests never depend on these figures. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from e2e import percentile, whatsapp_payload

from shared.http import basic_auth_header
from shared.signing import meta_signature
from shared.tasks import cancel_and_wait
from threadline.cli import Launcher, ServiceProcess
from threadline.natsserver import free_port

VICTIMS = ("conversations", "webhooks", "whatsapp", "identity")
WARMUP_WAMID = "wamid.chaos-warmup"


def wamid_of(i: int) -> str:
    return f"wamid.chaos{i:08d}"


def text_of(i: int) -> str:
    return f"chaos-{i}"


# --- Meta's side: the platform posting webhooks and retrying them ---------------------------

@dataclass
class Notification:
    """One customer message as Meta delivers it: built once, posted until it gets a 200."""

    index: int
    wamid: str
    body: bytes
    headers: dict[str, str]
    first_sent: float = 0.0
    attempts: int = 0
    accepted_at: float | None = None


class Platform:
    """Posts notifications like Meta: same payload again after a back-off until a 200 comes."""

    def __init__(self, url: str, session: aiohttp.ClientSession, args: argparse.Namespace, retry_until: float) -> None:
        self.url = url
        self.session = session
        self.args = args
        self.retry_until = retry_until
        self.outcomes: Counter[str] = Counter()  # per attempt: "200", "503", "connection error", "timeout"

    async def deliver(self, note: Notification) -> None:
        note.first_sent = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=self.args.request_timeout)
        while True:
            note.attempts += 1
            try:
                async with self.session.post(self.url, data=note.body, headers=note.headers, timeout=timeout) as resp:
                    await resp.read()
                    outcome = str(resp.status)
            except TimeoutError:
                outcome = "timeout"
            except aiohttp.ClientError:
                outcome = "connection error"
            self.outcomes[outcome] += 1
            if outcome == "200":
                note.accepted_at = time.monotonic()
                return
            delay = min(self.args.retry_cap, self.args.retry_base * 2 ** (note.attempts - 1))
            delay *= random.uniform(0.5, 1.0)
            if time.monotonic() + delay > self.retry_until:
                return  # the bench's bound on Meta's hours of retries
            await asyncio.sleep(delay)


def notification(integration: dict[str, Any], i: int, senders: int, wamid: str = "", text: str = "") -> Notification:
    wamid = wamid or wamid_of(i)
    body = whatsapp_payload(integration["phoneNumberId"], integration["phoneNumber"].lstrip("+"),
                            f"1556{i % senders:07d}", wamid, text or text_of(i))
    headers = {"Content-Type": "application/json",
               "X-Hub-Signature-256": meta_signature(integration["appSecret"], body)}
    return Notification(i, wamid, body, headers)


# --- the business's side: a webhook receiver -----------------------------------------------

@dataclass
class Business:
    """Every `conversation:message` event, per wamid: arrivals per event id."""

    events: dict[str, Counter[str]] = field(default_factory=dict)
    first_seen: dict[str, float] = field(default_factory=dict)
    wrong_text: set[str] = field(default_factory=set)
    conversations: set[str] = field(default_factory=set)

    async def handle(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        body = await request.json()
        for event in body.get("events", []):
            if event.get("type") != "conversation:message":
                continue
            payload = event["payload"]
            message = payload["message"]
            wamid = (message.get("source") or {}).get("originalMessageId") or ""
            if not wamid.startswith("wamid.chaos"):
                continue
            self.events.setdefault(wamid, Counter())[event["id"]] += 1
            self.first_seen.setdefault(wamid, now)
            self.conversations.add(payload["conversation"]["id"])
            if wamid != WARMUP_WAMID and message["content"].get("text") != text_of(int(wamid[len("wamid.chaos"):])):
                self.wrong_text.add(wamid)
        return web.Response(text="ok")


# --- kills and recovery ---------------------------------------------------------------------

@dataclass
class Kill:
    """One SIGKILL and how long the supervisor took to bring the service back."""

    service: str
    pid: int
    at: float  # seconds into the traffic period
    restarted_after: float | None = None  # SIGKILL → a new process exists (detection + back-off)
    ready_after: float | None = None  # SIGKILL → the new process answers /readyz 200


async def is_ready(session: aiohttp.ClientSession, svc: ServiceProcess) -> bool:
    try:
        async with session.get(f"http://127.0.0.1:{svc.port}/readyz", timeout=aiohttp.ClientTimeout(total=1)) as resp:
            return resp.status == 200
    except (TimeoutError, aiohttp.ClientError):
        return False


async def watch_recovery(session: aiohttp.ClientSession, svc: ServiceProcess, killed: object, kill: Kill,
                         killed_at: float, until: float) -> None:
    while time.monotonic() < until:
        process = svc.process
        if kill.restarted_after is None and process is not killed and process is not None \
                and process.returncode is None:
            kill.restarted_after = time.monotonic() - killed_at
        if kill.restarted_after is not None and await is_ready(session, svc):
            kill.ready_after = time.monotonic() - killed_at
            return
        await asyncio.sleep(0.05)


async def chaos(launcher: Launcher, session: aiohttp.ClientSession, args: argparse.Namespace, started: float,
                until: float, kills: list[Kill]) -> None:
    """SIGKILL the victims in turn, evenly over the traffic period; each one waits for its
    victim's previous recovery, so every kill hits a running, ready service."""
    recovering: dict[str, asyncio.Task[None]] = {}
    try:
        for k in range(args.kills):
            name = args.victims[k % len(args.victims)]
            await asyncio.sleep(max(0.0, started + (k + 1) * args.seconds / (args.kills + 1) - time.monotonic()))
            if name in recovering:
                await recovering[name]
            svc = launcher.services[name]
            process = svc.process
            if process is None or process.returncode is not None or not await is_ready(session, svc):
                print(f"  skipped kill {k + 1}: {name} is not up", flush=True)
                continue
            killed_at = time.monotonic()
            process.send_signal(signal.SIGKILL)
            kill = Kill(name, process.pid, killed_at - started)
            kills.append(kill)
            print(f"  {kill.at:6.1f} s  SIGKILL {name} (pid {process.pid})", flush=True)
            recovering[name] = asyncio.create_task(watch_recovery(session, svc, process, kill, killed_at, until))
        await asyncio.gather(*recovering.values())
    finally:
        for task in recovering.values():
            task.cancel()


# --- the history, read back through the business API ---------------------------------------

async def stored_wamids(session: aiohttp.ClientSession, base_url: str, app_id: str, auth: dict[str, str],
                        conversations: set[str]) -> Counter[str]:
    """How many times each bench wamid is stored, over every conversation the business heard of."""
    stored: Counter[str] = Counter()
    for conversation_id in sorted(conversations):
        url = f"{base_url}/v2/apps/{app_id}/conversations/{conversation_id}/messages"
        before: str | None = None
        while True:
            params = {"page[size]": "100", **({"page[before]": before} if before else {})}
            async with session.get(url, headers=auth, params=params) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"history of {conversation_id}: {resp.status} {await resp.text()}")
                page = await resp.json()
            for message in page["messages"]:
                wamid = (message.get("source") or {}).get("originalMessageId") or ""
                if wamid.startswith("wamid.chaos"):
                    stored[wamid] += 1
            if not page["meta"].get("hasMore"):
                break
            before = page["meta"]["beforeCursor"]
    return stored


# --- the run --------------------------------------------------------------------------------

async def run(args: argparse.Namespace) -> int:
    # The front door runs in this process and warns on every refused proxy call while a service
    # is down; the table counts those 503s.
    logging.getLogger("threadline.frontdoor").setLevel(logging.ERROR)
    data_dir = tempfile.mkdtemp(prefix="threadline-chaos-")
    supervisor_log: list[str] = []
    launcher = Launcher(data_dir=data_dir, host="127.0.0.1", port=0, nats_port=0, auto_ports=True,
                        extra_env={"THREADLINE_LOG_LEVEL": "WARNING"})
    launcher.say = lambda text: supervisor_log.append(text)  # type: ignore[method-assign]
    business = Business()
    receiver = web.Application()
    receiver.router.add_post("/hook", business.handle)
    runner = web.AppRunner(receiver, access_log=None)
    stop = asyncio.Event()
    supervisor: asyncio.Task[None] | None = None
    background: set[asyncio.Task[Any]] = set()
    keep = args.keep_data
    try:
        print(f"starting the system in {data_dir} …", flush=True)
        info = await launcher.start()
        supervisor = asyncio.create_task(launcher._supervise(stop))
        await runner.setup()
        hook_port = free_port()
        await web.TCPSite(runner, "127.0.0.1", hook_port).start()
        auth = basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"])
        wa = info["integrations"]["whatsapp"]
        connector = aiohttp.TCPConnector(limit=args.connections)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.post(f"{launcher.base_url}/v2/apps/{info['appId']}/integrations", headers=auth, json={
                    "type": "custom", "displayName": "chaos",
                    "webhooks": [{"target": f"http://127.0.0.1:{hook_port}/hook",
                                  "triggers": ["conversation:message"]}]}) as resp:
                if resp.status != 201:
                    raise RuntimeError(f"cannot create the business webhook: {resp.status} {await resp.text()}")
            url = f"{launcher.base_url}/webhooks/whatsapp/{wa['id']}"
            # One message through the whole pipeline before the clock starts (the webhook config
            # has to reach the webhooks service first).
            warmup = Platform(url, session, args, time.monotonic() + 30)
            await warmup.deliver(notification(wa, 0, args.senders, WARMUP_WAMID, "warm-up"))
            deadline = time.monotonic() + 30
            while WARMUP_WAMID not in business.events:
                if time.monotonic() > deadline:
                    raise RuntimeError("the warm-up message never reached the business webhook")
                await asyncio.sleep(0.1)

            total = int(args.rate * args.seconds)
            notes = [notification(wa, i, args.senders) for i in range(total)]
            started = time.monotonic()
            traffic_end = started + args.seconds
            drain_end = traffic_end + args.drain
            platform = Platform(url, session, args, drain_end)
            kills: list[Kill] = []
            print(f"traffic: {total} messages at {args.rate:g} msg/s for {args.seconds:g} s, "
                  f"{args.kills} kills of {', '.join(args.victims)}", flush=True)
            chaos_task = asyncio.create_task(chaos(launcher, session, args, started, drain_end, kills))
            background.add(chaos_task)
            deliveries: list[asyncio.Task[None]] = []
            for note in notes:
                await asyncio.sleep(max(0.0, started + note.index / args.rate - time.monotonic()))
                task = asyncio.create_task(platform.deliver(note))
                deliveries.append(task)
                background.add(task)
            await asyncio.gather(*deliveries)
            wanted = {note.wamid for note in notes}
            while time.monotonic() < drain_end and not wanted <= business.events.keys():
                await asyncio.sleep(0.2)
            await chaos_task
            # Redeliveries of events already seen may still be on their way: a short quiet period.
            await asyncio.sleep(args.settle)
            finished = time.monotonic()
            stored = await stored_wamids(session, launcher.base_url, info["appId"], auth, business.conversations)
        failed = report(args, notes, platform, business, stored, kills, started, finished - started,
                        supervisor_log)
        keep = keep or failed
        return 1 if failed else 0
    except Exception:
        keep = True  # the logs tell what went wrong
        raise
    finally:
        stop.set()
        await cancel_and_wait([*background, supervisor])
        await runner.cleanup()
        await launcher.shutdown()
        for svc in launcher.services.values():  # a restart racing the shutdown leaves nothing behind
            if svc.process is not None and svc.process.returncode is None:
                svc.process.kill()
                await svc.process.wait()
        if keep:
            print(f"data and service logs kept in {data_dir}/logs/")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)


def report(args: argparse.Namespace, notes: list[Notification], platform: Platform, business: Business,
           stored: Counter[str], kills: list[Kill], started: float, elapsed: float,
           supervisor_log: list[str]) -> bool:
    """Print the figures; True when the run failed the bar (anything lost or duplicated)."""
    accepted = [n for n in notes if n.accepted_at is not None]
    retried = [n for n in notes if n.attempts > 1]
    events = business.events
    lost_acknowledged = [n.wamid for n in accepted if n.wamid not in events]
    lost_unaccepted = [n.wamid for n in notes if n.accepted_at is None and n.wamid not in events]
    lost = len(lost_acknowledged) + len(lost_unaccepted)
    duplicated = [n.wamid for n in notes if len(events.get(n.wamid, ())) > 1]
    redelivered = {n.wamid: sum(c - 1 for c in events[n.wamid].values()) for n in notes
                   if n.wamid in events and any(c > 1 for c in events[n.wamid].values())}
    missing_history = [n.wamid for n in notes if stored[n.wamid] == 0]
    doubled_history = [n.wamid for n in notes if stored[n.wamid] > 1]
    latencies = [(business.first_seen[n.wamid] - n.first_sent) * 1000 for n in notes if n.wamid in business.first_seen]
    retries = sum(n.attempts - 1 for n in notes)
    refused = ", ".join(f"{k}×{v}" for k, v in sorted(platform.outcomes.items()) if k != "200")

    print()
    print(f"threadline chaos: {len(notes)} signed WhatsApp messages offered at {args.rate:g} msg/s for "
          f"{args.seconds:g} s through the front door, {args.senders} senders, {len(kills)} SIGKILLs; "
          f"Meta-style retries until {args.drain:g} s after the traffic; {elapsed:.0f} s in all")
    print(f"  sent                      {len(notes)}")
    print(f"  accepted (200)            {len(accepted)}   ({len(notes) - len(retried)} on the first POST)")
    print(f"  retried                   {len(retried)} messages, {retries} retries"
          + (f"   ({refused})" if refused else ""))
    print(f"  never accepted            {len(notes) - len(accepted)}")
    print(f"  reached the business      {sum(1 for n in notes if n.wamid in events)}")
    print(f"  lost                      {lost}   ({len(lost_acknowledged)} after a 200, "
          f"{len(lost_unaccepted)} never accepted)")
    print(f"  duplicated                {len(duplicated)}   (two different events for one message)")
    print(f"  redelivered               {sum(redelivered.values())}   (same event id again; "
          f"{len(redelivered)} messages)")
    print(f"  wrong text                {len(business.wrong_text)}")
    print(f"  history (business API)    {sum(1 for n in notes if stored[n.wamid] == 1)} stored once, "
          f"{len(missing_history)} missing, {len(doubled_history)} stored more than once")
    print(f"  latency sent → webhook    p50 {percentile(latencies, 50):.0f} ms   p99 {percentile(latencies, 99):.0f} ms"
          f"   max {max(latencies, default=float('nan')):.0f} ms   "
          f"({sum(1 for ms in latencies if ms > 10_000)} over 10 s)")
    print("  kills                     at      restarted after   ready after (SIGKILL → /readyz 200)")
    for kill in kills:
        restarted = "—" if kill.restarted_after is None else f"{kill.restarted_after:.1f} s"
        ready = "never" if kill.ready_after is None else f"{kill.ready_after:.1f} s"
        print(f"    {kill.service:<22}  {kill.at:5.1f} s   {restarted:>8}          {ready:>8}")
    slowest = sorted((n for n in notes if n.wamid in business.first_seen),
                     key=lambda n: n.first_sent - business.first_seen[n.wamid])[:3]
    print("  slowest                   " + ", ".join(
        f"{n.wamid} sent at {n.first_sent - started:.1f} s took {business.first_seen[n.wamid] - n.first_sent:.1f} s"
        for n in slowest))
    for name, ids in (("lost after a 200", lost_acknowledged), ("lost, never accepted", lost_unaccepted),
                      ("duplicated", duplicated), ("missing from history", missing_history),
                      ("stored more than once", doubled_history)):
        if ids:
            print(f"  {name}: {', '.join(ids[:10])}{' …' if len(ids) > 10 else ''}")
    if args.verbose:
        print("supervisor:")
        for line in supervisor_log:
            print(f"  {line}")
    failed = bool(lost or duplicated or missing_history or doubled_history or business.wrong_text)
    print("verdict: " + ("FAIL" if failed else "PASS (zero lost, zero duplicated)"))
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=100.0, help="offered messages per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the traffic period")
    parser.add_argument("--kills", type=int, default=8, help="SIGKILLs, spread evenly over the traffic period")
    parser.add_argument("--victims", type=lambda s: tuple(s.split(",")), default=VICTIMS,
                        help=f"services killed in turn (default {','.join(VICTIMS)})")
    parser.add_argument("--senders", type=int, default=50, help="distinct WhatsApp senders")
    parser.add_argument("--drain", type=float, default=60.0,
                        help="seconds after the traffic during which Meta still retries and events are awaited")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="quiet seconds at the end to catch late redeliveries")
    parser.add_argument("--retry-base", type=float, default=0.5, help="Meta's first retry delay (doubles, jittered)")
    parser.add_argument("--retry-cap", type=float, default=8.0, help="longest delay between two retries")
    parser.add_argument("--request-timeout", type=float, default=10.0,
                        help="a POST without an answer by then is retried")
    parser.add_argument("--connections", type=int, default=256, help="most concurrent POSTs")
    parser.add_argument("--keep-data", action="store_true", help="keep the data directory (kept anyway on failure)")
    parser.add_argument("--verbose", action="store_true", help="print the supervisor's restart log")
    args = parser.parse_args()
    unknown = [v for v in args.victims if v not in VICTIMS]
    if unknown or args.rate <= 0 or args.seconds <= 0 or args.kills < 0 or args.senders < 1:
        parser.error(f"bad arguments{f' (unknown victims: {unknown})' if unknown else ''}")
    if args.seconds > 600 or args.rate * args.seconds > 200_000 or args.drain > 600:
        parser.error("keep it bounded: --seconds ≤ 600, --drain ≤ 600, --rate × --seconds ≤ 200000")

    async def guarded() -> int:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await run(args)

    try:
        return asyncio.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
