"""Idle widget sockets: how many one `web` process holds, what they cost, how fast a message
reaches one of them while they are held.

Starts the whole system (as `threadline up` does) in a temporary data directory, creates one
web-messenger session per simulated visitor (a session, then its first message: a user, a
client and a conversation each), then opens one realtime socket per visitor straight to the
`web` service (as an Ingress would deliver it) from client worker processes, each a lean
WebSocket client on raw asyncio protocols (it answers pings; it keeps no per-socket task).
While every socket is held, the business posts `--probes` messages through the API to random
held conversations and each is timed from the POST to its frame arriving on the socket.

Prints: sockets held, `web`'s RSS before and after (and per socket, extrapolated to 50,000),
CPU of `web` and nats-server while the sockets idle, and the probe latency p50/p99/max.

The floor of the same run: the same probes to a bare aiohttp WebSocket server fed by one core
NATS subscription, holding the same number of sockets (what any Python process pays).

One process can hold at most its open-files limit (`ulimit -n`; raised to the hard limit
here). Client sockets are spread over source addresses 127.0.0.2–127.0.0.9 so the ephemeral
ports of one address are never exhausted.

    python bench/sockets.py --sockets 15000 --probes 500

Run by hand; tests never depend on these figures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import multiprocessing.connection
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import aiohttp
import uvloop
from aiohttp import WSMsgType, web

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from e2e import UNLIMITED_SDK_SESSIONS, percentile

from shared.bus import Bus
from shared.http import basic_auth_header
from threadline.cli import Launcher
from threadline.natsserver import NatsServer, free_port

PROBE_PREFIX = b"probe-"
SOURCE_ADDRESSES = tuple(f"127.0.0.{n}" for n in range(2, 10))
PAGE = 4096
BROWSER_USER_AGENT = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
                      "Chrome/131.0.0.0 Safari/537.36")


def raise_open_files_limit() -> int:
    """Soft open-files limit up to the hard one (children inherit it); returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the lean client (runs in worker processes) ----------------------------------------------

class LeanSocket(asyncio.Protocol):
    """One client WebSocket: handshake, then frames parsed just enough to answer pings and
    spot probe messages. Server frames are never masked; ours are masked with a zero key."""

    __slots__ = ("_request", "buffer", "closed", "connected", "probes", "transport", "upgraded")

    def __init__(self, request: bytes, connected: asyncio.Future[bool], probes: dict[str, float]) -> None:
        self.buffer = bytearray()
        self.connected = connected
        self.probes = probes
        self.transport: asyncio.Transport | None = None
        self.upgraded = False
        self.closed = False
        self._request = request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transport is not an asyncio.Transport subclass, hence no isinstance check.
        self.transport = transport  # type: ignore[assignment]
        transport.write(self._request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end])
            del self.buffer[:end + 4]
            if not head.startswith(b"HTTP/1.1 101"):
                if not self.connected.done():
                    self.connected.set_result(False)
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded = True
        self._frames()

    def _frames(self) -> None:
        buffer = self.buffer
        while len(buffer) >= 2:
            opcode = buffer[0] & 0x0F
            length = buffer[1] & 0x7F
            offset = 2
            if length == 126:
                if len(buffer) < 4:
                    return
                length = int.from_bytes(buffer[2:4], "big")
                offset = 4
            elif length == 127:
                if len(buffer) < 10:
                    return
                length = int.from_bytes(buffer[2:10], "big")
                offset = 10
            if len(buffer) < offset + length:
                return
            payload = bytes(buffer[offset:offset + length])
            del buffer[:offset + length]
            self._frame(opcode, payload)

    def _frame(self, opcode: int, payload: bytes) -> None:
        assert self.transport is not None
        if opcode == 0x9:  # ping → pong with the same payload
            self.transport.write(bytes((0x8A, 0x80 | len(payload))) + b"\0\0\0\0" + payload)
        elif opcode == 0x8:
            self.closed = True
            self.transport.close()
        elif opcode == 0x1:
            if b'"ready"' in payload and not self.connected.done():
                self.connected.set_result(True)
            at = payload.find(PROBE_PREFIX)
            if at >= 0:
                end = payload.find(b'"', at)
                self.probes.setdefault(payload[at:end].decode(), time.perf_counter())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.connected.done():
            self.connected.set_result(False)


def upgrade_request(host: str, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    # The headers a desktop Chrome sends with a WebSocket handshake (the server keeps them for
    # the socket's life, so they are part of what a socket costs).
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nPragma: no-cache\r\n"
            f"Cache-Control: no-cache\r\nUser-Agent: {BROWSER_USER_AGENT}\r\nUpgrade: websocket\r\n"
            f"Origin: http://bench.example\r\nSec-WebSocket-Version: 13\r\n"
            f"Accept-Encoding: gzip, deflate, br, zstd\r\nAccept-Language: en-US,en;q=0.9,fr;q=0.8\r\n"
            f"Sec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n").encode()


async def hold_sockets(port: int, paths: list[str], connection: multiprocessing.connection.Connection,
                       concurrency: int) -> None:
    """Open a socket per path, report how many are up, hold them until told, report probes."""
    raise_open_files_limit()
    loop = asyncio.get_running_loop()
    probes: dict[str, float] = {}
    sockets: list[LeanSocket] = []
    failures = 0
    gate = asyncio.Semaphore(concurrency)

    async def open_one(n: int, path: str) -> None:
        nonlocal failures
        async with gate:
            connected: asyncio.Future[bool] = loop.create_future()
            request = upgrade_request(f"127.0.0.1:{port}", path)
            try:
                _transport, protocol = await loop.create_connection(
                    lambda: LeanSocket(request, connected, probes), "127.0.0.1", port,
                    local_addr=(SOURCE_ADDRESSES[n % len(SOURCE_ADDRESSES)], 0))
                ok = await asyncio.wait_for(connected, 60)
            except (OSError, TimeoutError):
                ok = False
            if ok:
                sockets.append(protocol)
            else:
                failures += 1

    await asyncio.gather(*(open_one(n, path) for n, path in enumerate(paths)))
    connection.send(("connected", len(sockets), failures))
    while not connection.poll():
        await asyncio.sleep(0.2)
    connection.recv()
    closed = sum(1 for s in sockets if s.closed)
    connection.send(("probes", probes, closed))
    for s in sockets:
        if s.transport is not None:
            s.transport.close()
    await asyncio.sleep(0.5)


def client_worker(port: int, paths: list[str], connection: multiprocessing.connection.Connection,
                  concurrency: int) -> None:
    uvloop.run(hold_sockets(port, paths, connection, concurrency))


class ClientPool:
    """Worker processes that hold the sockets (one process holds at most its fd limit)."""

    def __init__(self, port: int, paths: list[str], per_process: int, concurrency: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.connections: list[multiprocessing.connection.Connection] = []
        self.processes: list[Any] = []
        for start in range(0, len(paths), per_process):
            ours, theirs = context.Pipe()
            process = context.Process(target=client_worker, daemon=True,
                                      args=(port, paths[start:start + per_process], theirs, concurrency))
            process.start()
            self.connections.append(ours)
            self.processes.append(process)

    async def connected(self) -> tuple[int, int]:
        held = failed = 0
        for connection in self.connections:
            _kind, up, failures = await asyncio.to_thread(connection.recv)
            held += up
            failed += failures
        return held, failed

    async def finish(self) -> tuple[dict[str, float], int]:
        probes: dict[str, float] = {}
        closed = 0
        for connection in self.connections:
            connection.send("report")
        for connection in self.connections:
            _kind, seen, dropped = await asyncio.to_thread(connection.recv)
            probes.update(seen)
            closed += dropped
        for process in self.processes:
            await asyncio.to_thread(process.join, 10)
        return probes, closed


# --- the system run --------------------------------------------------------------------------

async def create_visitors(sdk: str, integration_id: str, count: int, concurrency: int) -> list[dict[str, Any]]:
    """One session per visitor and its first message (user, client, conversation)."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    gate = asyncio.Semaphore(concurrency)
    headers = {"Origin": "http://bench.example"}
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(n: int) -> dict[str, Any]:
            async with gate:
                for attempt in range(5):
                    async with session.post(f"{sdk}/integrations/{integration_id}/sessions", headers=headers) as resp:
                        if resp.status == 201:
                            pending: dict[str, Any] = await resp.json()
                            break
                    await asyncio.sleep(0.2 * (attempt + 1))
                else:
                    raise RuntimeError(f"web session: {resp.status}")
                first = {"clientMessageId": f"bench-visitor-{n:06d}", "text": f"hello {n}"}
                for attempt in range(5):
                    async with session.post(f"{sdk}/conversations", json=first, headers={
                            **headers, "Authorization": f"Bearer {pending['sessionToken']}"}) as resp:
                        if resp.status == 201:
                            result: dict[str, Any] = await resp.json()
                            return result
                    await asyncio.sleep(0.2 * (attempt + 1))
                raise RuntimeError(f"web first message: {resp.status} {await resp.text()}")

        return list(await asyncio.gather(*(one(n) for n in range(count))))


async def send_probes(post: Any, conversations: list[str], count: int, rate: float) -> dict[str, float]:
    """`count` probes at `rate`/s to random held conversations; returns probe → send time."""
    sent: dict[str, float] = {}
    rng = random.Random(7)
    started = time.perf_counter()
    tasks = []
    for i in range(count):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        name = f"probe-{i:06d}"
        sent[name] = time.perf_counter()
        tasks.append(asyncio.create_task(post(rng.choice(conversations), name)))
    statuses = await asyncio.gather(*tasks)
    refused = [s for s in statuses if s not in (200, 201, 202)]
    if refused:
        print(f"  {len(refused)} probe posts refused: {sorted(set(refused))}")
    return sent


async def measure_idle(pids: dict[str, int], seconds: float) -> dict[str, float]:
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    await asyncio.sleep(seconds)
    return {name: (cpu_seconds(pid) - before[name]) / seconds * 100 for name, pid in pids.items()}


def latency_figures(sent: dict[str, float], seen: dict[str, float]) -> tuple[list[float], int]:
    latencies = [(seen[name] - at) * 1000 for name, at in sent.items() if name in seen]
    return latencies, len(sent) - len(latencies)


async def bench_system(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = tempfile.mkdtemp(prefix="threadline-bench-sockets-")
    launcher = Launcher(data_dir=data_dir, host="127.0.0.1", port=0, nats_port=0, auto_ports=True,
                        extra_env={"THREADLINE_LOG_LEVEL": "WARNING", **UNLIMITED_SDK_SESSIONS})
    launcher.say = lambda text: None  # type: ignore[method-assign]
    info = await launcher.start()
    pool: ClientPool | None = None
    try:
        web_service = launcher.services["web"]
        assert web_service.process is not None and launcher.nats is not None
        web_pid = web_service.process.pid
        app_id = info["appId"]
        integration_id = info["integrations"]["web"]["id"]
        sdk = f"http://127.0.0.1:{web_service.port}/sdk/v1/apps/{app_id}"
        started = time.perf_counter()
        visitors = await create_visitors(sdk, integration_id, args.sockets, 64)
        print(f"  {len(visitors)} visitors created in {time.perf_counter() - started:.0f} s")
        await asyncio.sleep(2.0)
        rss_before = rss_bytes(web_pid)
        paths = [f"/sdk/v1/apps/{app_id}/conversations/{v['conversationId']}/socket?token={v['sessionToken']}"
                 for v in visitors]
        started = time.perf_counter()
        pool = ClientPool(web_service.port, paths, args.per_process, args.connect_concurrency)
        held, failed = await pool.connected()
        connect_seconds = time.perf_counter() - started
        await asyncio.sleep(args.settle)
        rss_after = rss_bytes(web_pid)
        pids = {"web": web_pid, "nats-server": launcher.nats.process.pid}  # type: ignore[union-attr]
        idle_cpu = await measure_idle(pids, args.idle_seconds)
        auth = basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"])
        api = f"http://127.0.0.1:{launcher.services['conversations'].port}/v2/apps/{app_id}/conversations"
        async with aiohttp.ClientSession(headers=auth) as session:

            async def post(conversation_id: str, text: str) -> int:
                async with session.post(f"{api}/{conversation_id}/messages", json={
                        "author": {"type": "business"}, "content": {"type": "text", "text": text}}) as resp:
                    await resp.read()
                    return resp.status

            sent = await send_probes(post, [v["conversationId"] for v in visitors], args.probes, args.probe_rate)
        await asyncio.sleep(2.0)
        rss_end = rss_bytes(web_pid)
        seen, closed = await pool.finish()
        pool = None
        latencies, missing = latency_figures(sent, seen)
        return {"held": held, "failed": failed, "connect_seconds": connect_seconds, "rss_before": rss_before,
                "rss_after": rss_after, "rss_end": rss_end, "idle_cpu": idle_cpu, "latencies": latencies,
                "missing": missing, "closed": closed}
    finally:
        if pool is not None:
            for process in pool.processes:
                process.kill()
        await launcher.shutdown()


# --- the floor -------------------------------------------------------------------------------

async def bench_floor(args: argparse.Namespace, count: int) -> dict[str, Any]:
    """A bare aiohttp WebSocket server, one core NATS subscription routing by subject to a
    socket: the same sockets, the same probes (published on NATS instead of through the API)."""
    store = tempfile.mkdtemp(prefix="threadline-floor-sockets-")
    server = NatsServer(store_dir=store).start()
    try:
        return await _floor_on(server, args, count)
    finally:
        server.stop()
        shutil.rmtree(store, ignore_errors=True)


async def _floor_on(server: NatsServer, args: argparse.Namespace, count: int) -> dict[str, Any]:
    bus = await Bus.connect(server.url, "floor")
    sockets: dict[str, web.WebSocketResponse] = {}

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=20.0, compress=False)
        await ws.prepare(request)
        key = request.match_info["key"]
        sockets[key] = ws
        await ws.send_str('{"type":"ready"}')
        async for msg in ws:
            if msg.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
                break
        sockets.pop(key, None)
        return ws

    async def on_message(msg: Any) -> None:
        ws = sockets.get(msg.subject.rsplit(".", 1)[1])
        if ws is not None:
            await ws.send_str(msg.data.decode())

    await bus.nc.subscribe("floor.sockets.*", cb=on_message)
    app = web.Application()
    app.router.add_get("/floor/{key}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    pool = ClientPool(port, [f"/floor/k{n}" for n in range(count)], args.per_process, args.connect_concurrency)
    try:
        rss_before = rss_bytes(os.getpid())
        held, _failed = await pool.connected()
        await asyncio.sleep(args.settle)
        rss_after = rss_bytes(os.getpid())

        async def post(key: str, text: str) -> int:
            await bus.nc.publish(f"floor.sockets.{key}",
                                 json.dumps({"type": "message", "text": text}).encode())
            return 200

        sent = await send_probes(post, [f"k{n}" for n in range(count)], args.probes, args.probe_rate)
        await asyncio.sleep(2.0)
        seen, _closed = await pool.finish()
        latencies, missing = latency_figures(sent, seen)
        return {"held": held, "per_socket": (rss_after - rss_before) / max(held, 1), "latencies": latencies,
                "missing": missing}
    finally:
        for process in pool.processes:
            process.kill()
        await runner.cleanup()
        await bus.close()


def mib(n: float) -> str:
    return f"{n / 1024 / 1024:7.1f} MiB"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=15_000, help="visitors, each with one socket")
    parser.add_argument("--probes", type=int, default=500, help="business messages timed to a socket")
    parser.add_argument("--probe-rate", type=float, default=50.0, help="probes per second")
    parser.add_argument("--per-process", type=int, default=8_000, help="client sockets per worker process")
    parser.add_argument("--connect-concurrency", type=int, default=32, help="handshakes in flight per worker")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds between the last connect and RSS")
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="CPU sampled while idle")
    parser.add_argument("--no-floor", action="store_true")
    args = parser.parse_args()
    # Stopped by SIGTERM (a timeout, a supervisor): unwind, so every server this run started stops.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    limit = raise_open_files_limit()
    if args.sockets > limit - 500:
        print(f"  note: one process may hold at most {limit} open files (`ulimit -Hn` here); "
              f"asked for {args.sockets} sockets, `web` will refuse beyond its limit")
    result = await bench_system(args)
    held = result["held"]
    per_socket = (result["rss_after"] - result["rss_before"]) / max(held, 1)
    print(f"threadline sockets: {held} held ({result['failed']} failed), opened in {result['connect_seconds']:.0f} s"
          f" ({held / result['connect_seconds']:.0f}/s)")
    print(f"  web RSS  before {mib(result['rss_before'])}  held {mib(result['rss_after'])}  "
          f"after probes {mib(result['rss_end'])}  per socket {per_socket / 1024:5.1f} KiB  "
          f"→ 50,000 sockets ≈ {mib(result['rss_before'] + 50_000 * per_socket)}")
    print("  idle CPU " + "  ".join(f"{name} {pct:5.1f} %" for name, pct in result["idle_cpu"].items())
          + f"  (over {args.idle_seconds:.0f} s)")
    latencies = result["latencies"]
    print(f"  probes   p50 {percentile(latencies, 50):6.1f} ms  p99 {percentile(latencies, 99):6.1f} ms  "
          f"max {max(latencies, default=float('nan')):6.1f} ms  missing {result['missing']}  "
          f"sockets closed by the server {result['closed']}")
    if not args.no_floor:
        # The floor's server runs in this process, whose open files are limited too.
        floor = await bench_floor(args, min(held, limit - 1_000))
        latencies = floor["latencies"]
        print(f"floor (bare aiohttp + core NATS): {floor['held']} held, per socket "
              f"{floor['per_socket'] / 1024:5.1f} KiB; probes p50 {percentile(latencies, 50):6.1f} ms  "
              f"p99 {percentile(latencies, 99):6.1f} ms  missing {floor['missing']}")


if __name__ == "__main__":
    try:
        uvloop.run(main())
    except asyncio.CancelledError:  # SIGTERM, after everything started was stopped
        raise SystemExit(143) from None
