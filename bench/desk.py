"""Desk benchmark: control passed → agent assigned, and a long timeline's first paint.

Starts the whole system as `threadline up` does (nats-server, every service as its own process,
the sandbox) in a temporary data directory. The sandbox app's switchboard gets a bot member as its
default, with the desk as the bot's `next`. `--agents` agents (online through the API, capacity
enough for every conversation) and an admin watching the desk's live socket.

1. Assignment: `--conversations` WhatsApp customers write (signed webhooks to the whatsapp
   service); the bot then passes each conversation to the desk (`POST …/passControl`), `--pace`
   seconds apart, and the latency is the call's start → the socket's `ticket` update naming an
   agent. Every conversation stays open, so the last ones are routed with ~N open conversations.
2. Timeline: one conversation with `--history` messages, opened in the desk page in headless
   Chromium (Debian's `chromium`): click in the inbox → the timeline's last message rendered, a few
   rounds.

Beside them, the floor of the same run: one REST call's round trip (`GET /v2/apps/{appId}`) through
the same front door, and Chromium opening a static page.

    python bench/desk.py --agents 50 --conversations 2000

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

import aiohttp
from aiohttp import web
from playwright.async_api import async_playwright

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from e2e import drive, percentile, whatsapp_payload
from handoff import serve

from shared.egress import ALLOW_ENV
from shared.http import basic_auth_header
from shared.signing import meta_signature
from threadline.cli import Launcher

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
PASSWORD = "bench password for the desk 42"


def summary(name: str, values: list[float], floor: list[float] | None = None) -> str:
    line = (f"{name}: n={len(values)} p50 {percentile(values, 50) * 1000:.1f} ms,"
            f" p99 {percentile(values, 99) * 1000:.1f} ms, max {max(values) * 1000:.1f} ms")
    if floor:
        line += f"   (floor p50 {percentile(floor, 50) * 1000:.1f} ms, p99 {percentile(floor, 99) * 1000:.1f} ms)"
    return line


async def call(session: aiohttp.ClientSession, method: str, url: str, auth: dict[str, str], body: Any = None,
               expect: int = 200) -> Any:
    async with session.request(method, url, json=body, headers=auth) as resp:
        data = await resp.json(content_type=None)
        if resp.status != expect:
            raise RuntimeError(f"{method} {url}: {resp.status} {data}")
        return data


async def conversations_of(session: aiohttp.ClientSession, base: str, app_id: str, auth: dict[str, str],
                           wanted: int, timeout: float = 120.0) -> list[str]:
    """The app's WhatsApp conversations (app-wide listing), once `wanted` of them exist."""
    deadline = time.monotonic() + timeout
    while True:
        found: list[str] = []
        url: str | None = f"{base}/v2/apps/{app_id}/conversations?filter[channel]=whatsapp&page[size]=100"
        while url:
            data = await call(session, "GET", url, auth)
            found.extend(c["id"] for c in data["conversations"])
            url = data.get("links", {}).get("next") if data.get("meta", {}).get("hasMore") else None
        if len(found) >= wanted or time.monotonic() > deadline:
            return found
        await asyncio.sleep(1.0)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--conversations", type=int, default=2000)
    parser.add_argument("--pace", type=float, default=0.01, help="seconds between two passControl calls")
    parser.add_argument("--history", type=int, default=1000, help="messages of the timeline conversation")
    parser.add_argument("--rounds", type=int, default=5, help="timeline loads")
    args = parser.parse_args()

    # The bot's webhook (a custom integration needs one): counts what it gets.
    bot_events = 0

    async def bot_hook(request: web.Request) -> web.Response:
        nonlocal bot_events
        bot_events += len((await request.json()).get("events", []))
        return web.Response(text="ok")

    hook_app = web.Application()
    hook_app.router.add_post("/hook", bot_hook)
    hook_runner, hook_port = await serve(hook_app)

    # The bot's webhook is on loopback, which the egress policy refuses unless listed: that port is.
    os.environ[ALLOW_ENV] = ",".join(part for part in (os.environ.get(ALLOW_ENV, ""), f"127.0.0.1:{hook_port}")
                                     if part)
    data_dir = tempfile.mkdtemp(prefix="threadline-bench-desk-")
    launcher = Launcher(data_dir=data_dir, host="127.0.0.1", port=0, nats_port=0, auto_ports=True,
                        extra_env={"THREADLINE_LOG_LEVEL": "WARNING",
                                   "THREADLINE_DESK_PRESENCE_GRACE_SECONDS": "3600"})
    launcher.say = lambda text: None  # type: ignore[method-assign]
    info = await launcher.start()
    try:
        base, app_id = info["baseUrl"], info["appId"]
        auth = basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"])
        api = f"{base}/v2/apps/{app_id}"
        desk_api = f"{api}/desk"
        wa = info["integrations"]["whatsapp"]
        async with aiohttp.ClientSession() as session:
            # The bot in front of the desk.
            bot = await call(session, "POST", f"{api}/integrations", auth, {
                "type": "custom", "displayName": "bench bot",
                "webhooks": [{"target": f"http://127.0.0.1:{hook_port}/hook", "triggers": ["conversation:message"]}]},
                201)
            switchboard_id = info["switchboardId"]
            members = f"{api}/switchboards/{switchboard_id}/switchboardIntegrations"
            desk_member = next(m for m in (await call(session, "GET", members, auth))["switchboardIntegrations"]
                               if m["integrationType"] == "desk")
            bot_member = (await call(session, "POST", members, auth, {
                "name": "bot", "integrationId": bot["integration"]["id"],
                "nextSwitchboardIntegrationId": desk_member["id"]}, 201))["switchboardIntegration"]
            await call(session, "PATCH", f"{api}/switchboards/{switchboard_id}", auth,
                       {"defaultSwitchboardIntegrationId": bot_member["id"]})

            capacity = max(1, -(-(args.conversations + 1) // args.agents))
            agents = []
            for i in range(args.agents):
                agents.append((await call(session, "POST", f"{desk_api}/agents", auth, {
                    "email": f"agent{i}@bench.example", "displayName": f"Agent {i}", "capacity": capacity,
                    "password": PASSWORD, "role": "admin" if i == 0 else "agent"}, 201))["agent"])

            # Customers write; the bot holds them.
            bodies = []
            for i in range(args.conversations + 1):
                body = whatsapp_payload(wa["phoneNumberId"], wa["phoneNumber"].lstrip("+"), f"1888{i:07d}",
                                        f"wamid.desk{i:08d}", f"hello {i}")
                bodies.append((body, {"Content-Type": "application/json",
                                      "X-Hub-Signature-256": meta_signature(wa["appSecret"], body)}))
            whatsapp_entry = f"http://127.0.0.1:{launcher.services['whatsapp'].port}/webhooks/whatsapp/{wa['id']}"
            await drive(whatsapp_entry, bodies, 32)
            conversation_ids = await conversations_of(session, base, app_id, auth, args.conversations + 1)
            timeline_id, conversation_ids = conversation_ids[0], conversation_ids[1:args.conversations + 1]

            # A long history for the timeline run, posted by the business.
            await drive(f"{api}/conversations/{timeline_id}/messages", [
                (f'{{"author":{{"type":"business"}},"content":{{"type":"text","text":"history line {n}"}}}}'.encode(),
                 {"Content-Type": "application/json", **auth}) for n in range(args.history - 1)], 8)

            # Agents online; an admin's desk socket watches the assignments.
            for agent in agents:
                await call(session, "PUT", f"{desk_api}/agents/{agent['id']}/presence", auth, {"presence": "online"})
            jar = aiohttp.CookieJar(unsafe=True)
            async with aiohttp.ClientSession(cookie_jar=jar) as watcher:
                await call(watcher, "POST", f"{base}/desk/api/v1/session", {"Origin": base},
                           {"appId": app_id, "email": agents[0]["email"], "password": PASSWORD})
                assigned: dict[str, float] = {}
                waiters: dict[str, asyncio.Future[float]] = {}
                ws = await watcher.ws_connect(f"{base}/desk/api/v1/socket", headers={"Origin": base})

                async def listen() -> None:
                    async for msg in ws:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            continue
                        update = msg.json()
                        data = update.get("data") or {}
                        if update.get("kind") == "ticket" and data.get("agentId"):
                            cid = update["conversationId"]
                            if cid not in assigned:
                                assigned[cid] = time.perf_counter()
                                waiter = waiters.pop(cid, None)
                                if waiter is not None and not waiter.done():
                                    waiter.set_result(assigned[cid])

                listener = asyncio.create_task(listen())

                async def beat() -> None:
                    while True:
                        await asyncio.sleep(20)
                        await ws.send_str("beat")

                beater = asyncio.create_task(beat())
                latencies: list[float] = []
                floor: list[float] = []
                missing = 0
                loop = asyncio.get_running_loop()
                for n, conversation_id in enumerate([timeline_id, *conversation_ids]):
                    waiter: asyncio.Future[float] = loop.create_future()
                    waiters[conversation_id] = waiter
                    started = time.perf_counter()
                    await call(session, "POST", f"{api}/conversations/{conversation_id}/passControl", auth,
                               {"switchboardIntegration": "next"})
                    try:
                        done = await asyncio.wait_for(waiter, 10.0)
                        if n:
                            latencies.append(done - started)
                    except TimeoutError:
                        missing += 1
                    floor_started = time.perf_counter()
                    await call(session, "GET", api, auth)
                    floor.append(time.perf_counter() - floor_started)
                    await asyncio.sleep(args.pace)
                beater.cancel()
                listener.cancel()
                await ws.close()
            print(f"desk: {args.agents} agents, {len(conversation_ids)} conversations passed one at a time "
                  f"(each kept open), {missing} not assigned within 10 s")
            print(summary("control passed → agent assigned (seen on a desk socket)", latencies, floor))
            tail = latencies[-max(1, len(latencies) // 10):]
            print(summary(f"  the last {len(tail)} (≥ {len(latencies) - len(tail)} open)", tail))

            # The timeline in Chromium.
            holder = (await call(session, "GET", f"{desk_api}/conversations/{timeline_id}", auth))["conversation"]
            email = next(a["email"] for a in agents if a["id"] == holder["agentId"])
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    context = await browser.new_context(viewport={"width": 1400, "height": 900})
                    page = await context.new_page()
                    static_floor = []
                    for _ in range(args.rounds):
                        started = time.perf_counter()
                        await page.goto(f"{base}/desk/static/desk.css")
                        static_floor.append(time.perf_counter() - started)
                    await page.goto(f"{base}/desk/?app={app_id}")
                    await page.get_by_label("E-mail", exact=True).fill(email)
                    await page.get_by_label("Password", exact=True).fill(PASSWORD)
                    await page.get_by_role("button", name="Sign in", exact=True).click()
                    await page.locator("#desk").wait_for()
                    item = page.locator(f'#tickets li[data-conversation="{timeline_id}"]')
                    await item.wait_for()
                    loads = []
                    for _ in range(args.rounds):
                        await page.evaluate("document.getElementById('timeline').replaceChildren()")
                        started = time.perf_counter()
                        await item.click()
                        # The page's CSP allows no eval: wait on a locator, then on the next frame.
                        await page.locator("#timeline li").nth(args.history - 1).wait_for(state="attached")
                        await page.evaluate("() => new Promise(done => requestAnimationFrame(() => done(true)))")
                        loads.append(time.perf_counter() - started)
                    count = await page.locator("#timeline li").count()
                finally:
                    await browser.close()
            print(summary(f"desk timeline of {count} items: click → rendered and painted", loads, static_floor))
    finally:
        await launcher.shutdown()
        await hook_runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
