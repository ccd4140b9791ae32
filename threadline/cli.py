"""The launcher behind `threadline up`: the whole system on one machine — embedded NATS, every
service, front door, sandbox (the command line is `threadline.main`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from shared.egress import ALLOW_ENV
from shared.encryption import KEY_ENV, KEY_FILE_ENV, SERVICES_WITH_SECRETS, generate_key
from shared.files import ensure_private_file, private_dir, write_private
from shared.natsauth import ADMIN_USER, USERS
from shared.routes import DEFAULT_PORTS, MAIL_SMTP_PORT, SANDBOX_SMTP_PORT
from shared.subjects import PARTITIONS_VARIABLE
from threadline.bootstrap import AccountKey, bootstrap_sandbox
from threadline.frontdoor import FrontdoorSite, build_frontdoor
from threadline.natsserver import NatsServer, free_port


class LaunchError(RuntimeError):
    """The system cannot start here (a port is taken, a service failed to start)."""


def log_tail(path: str, lines: int = 20) -> str:
    """The last lines of a log file (why a service exited), or a note that it cannot be read."""
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - 8192))
            text = file.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(log unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:])


START_ORDER = ("identity", "conversations", "webhooks", "handoff", "notifications", "whatsapp", "messenger",
               "telegram", "sms", "email", "web", "app", "desk", "sandbox")
SMTP_PORT_VARIABLE = "THREADLINE_SANDBOX_SMTP_PORT"
DEMO_AGENT_EMAIL = "demo@threadline.invalid"
MAIL_SMTP_PORT_VARIABLE = "THREADLINE_MAIL_SMTP_PORT"
# A crashed service that had run this long restarts after the shortest back-off again.
RESTART_BACKOFF_RESET_SECONDS = 60.0
# sandbox.json kinds (bootstrap.sandbox_integrations); the `email` kind is a `mailgun` integration.
SANDBOX_INTEGRATIONS = ("web", "whatsapp", "messenger", "telegram", "twilio", "android", "ios", "email")


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def loopback_egress_allow(own_ports: Iterable[int], configured: str = "") -> str:
    """THREADLINE_EGRESS_ALLOW under `threadline up`: the operator's own entries, plus loopback
    for business destinations only (a webhook receiver such as the README's 127.0.0.1:9000, the
    sandbox's SMTP sink) except Threadline's own ports (NATS, the services, the front door),
    which a webhook target must never reach. A platform base URL on loopback stays refused (the
    sandbox's own origin is trusted for those): it would receive the integration's credentials
    and, through the media proxy, be read back."""
    denied = [f"!127.0.0.0/8:{port},![::1]:{port}" for port in sorted(set(own_ports)) if port]
    loopback = ("business=127.0.0.0/8", "business=[::1]")
    return ",".join(part for part in (configured.strip(" ,"), *denied, *loopback) if part)


def load_secrets(data_dir: str) -> dict[str, Any]:
    """Secrets of this installation, generated on first run and kept in `<data-dir>/secrets.json` (0600).

    The account key, the SDK token secret, the key that encrypts secrets at rest (`secretsKey`,
    a THREADLINE_SECRETS_KEY keyring), the cluster mode's PostgreSQL password and a NATS password
    per service (`natsPasswords`). A file
    from an older version gets the entries it lacks.
    """
    path = os.path.join(data_dir, "secrets.json")
    stored: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as fh:
            stored = json.load(fh)
    wanted: dict[str, Any] = {
        "accountKeyId": lambda: "act_" + secrets.token_hex(12),
        "accountKeySecret": lambda: secrets.token_urlsafe(32),
        "sdkTokenSecret": lambda: secrets.token_urlsafe(32),
        "secretsKey": lambda: f"k1:{generate_key()}",
        # The cluster mode's PostgreSQL superuser (`threadline up --cluster`).
        "postgresPassword": lambda: secrets.token_urlsafe(24),
        "natsPasswords": dict,
    }
    updated = {**stored, "natsPasswords": dict(stored.get("natsPasswords") or {})}
    for name, make in wanted.items():
        if name not in updated:
            updated[name] = make()
    passwords = updated["natsPasswords"]
    for user in USERS:
        passwords.setdefault(user, secrets.token_urlsafe(24))
    private_dir(data_dir)
    if updated != stored or not os.path.exists(path):
        write_private(path, json.dumps(updated, indent=2))
    else:
        ensure_private_file(path)
    return updated


def service_credentials(service: str, keys: Mapping[str, Any]) -> dict[str, str]:
    """The environment that gives `service` its NATS user and, if it needs it, the secrets key."""
    env = {"THREADLINE_NATS_USER": service, "THREADLINE_NATS_PASSWORD": keys["natsPasswords"][service]}
    if service in SERVICES_WITH_SECRETS:
        env[KEY_ENV] = keys["secretsKey"]
    return env


def service_env(base: Mapping[str, str], service: str, keys: Mapping[str, Any], port: int,
                replica: str | None = None) -> dict[str, str]:
    """`base` plus one service's port, credentials and replica id (stable across restarts, so a
    restarted replica takes its partitions back at once); a service that needs no secret gets no key."""
    env = {k: v for k, v in base.items() if k not in (KEY_ENV, KEY_FILE_ENV)}
    return {**env, "THREADLINE_HTTP_PORT": str(port), "THREADLINE_REPLICA_ID": replica or service,
            **service_credentials(service, keys)}


@dataclass
class ServiceProcess:
    name: str
    port: int
    env: dict[str, str]
    log_path: str
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    # Crashes since it last ran for RESTART_BACKOFF_RESET_SECONDS (what its back-off doubles on).
    crashes: int = 0
    started_at: float = 0.0

    async def start(self) -> None:
        log = open(ensure_private_file(self.log_path), "ab")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", f"services.{self.name}", env=self.env, stdout=log, stderr=asyncio.subprocess.STDOUT,
        )
        log.close()
        self.started_at = time.monotonic()

    async def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


@dataclass
class Launcher:
    data_dir: str
    host: str
    port: int
    nats_port: int
    auto_ports: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    # The sandbox app's switchboard hands its conversations to the agent desk (`make up`'s
    # "Reply as the business"); off, the business's own integrations get them alone.
    sandbox_desk: bool = True
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    nats: NatsServer | None = None
    account: AccountKey | None = None
    _frontdoor: web.AppRunner | None = None
    _stopping: bool = False

    @property
    def base_url(self) -> str:
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{shown}:{self.port}"

    def sandbox_smtp_port(self) -> int:
        """The port of this run's sandbox SMTP sink: THREADLINE_SANDBOX_SMTP_PORT when set, else a
        free one with --auto-ports (mail of this instance must reach its own sink, never another
        instance's on the default port), else 2525. Bootstrap points the e-mail integration at it."""
        return self._port_setting(SMTP_PORT_VARIABLE, SANDBOX_SMTP_PORT)

    def mail_smtp_port(self) -> int:
        """The port of the e-mail channel's SMTP receiver (where the sandbox's mail box sends its
        replies): THREADLINE_MAIL_SMTP_PORT when set, else a free one with --auto-ports, else 2526."""
        return self._port_setting(MAIL_SMTP_PORT_VARIABLE, MAIL_SMTP_PORT)

    def _port_setting(self, variable: str, default: int) -> int:
        configured = self.extra_env.get(variable, os.environ.get(variable, ""))
        if configured:
            try:
                return int(configured)
            except ValueError as exc:
                raise LaunchError(f"{variable} must be a port number, got {configured!r}") from exc
        return free_port() if self.auto_ports else default

    def say(self, text: str) -> None:
        print(text, flush=True)

    async def run(self) -> int:
        """Start everything, print the banner, serve until Ctrl-C, stop everything."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        starting = asyncio.create_task(self.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # Ctrl-C while starting
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, LaunchError):
                await starting
            await self.shutdown()
            return 130
        try:
            info = starting.result()
        except LaunchError as exc:
            self.say(f"error: {exc}")
            stopping.cancel()
            await self.shutdown()
            return 2
        self._print_banner(info)
        supervisor = asyncio.create_task(self._supervise(stop))
        await stopping
        self.say("\nstopping…")
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor
        await self.shutdown()
        self.say("stopped")
        return 0

    async def start(self) -> dict[str, Any]:
        """Start the system (`_start`); one that fails to start stops what it had started (the
        processes would otherwise outlive the launcher)."""
        try:
            return await self._start()
        except BaseException:
            with contextlib.suppress(Exception):
                await self.shutdown()
            raise

    async def _start(self) -> dict[str, Any]:
        """Start NATS, the services and the front door; bootstrap the sandbox; return sandbox.json."""
        private_dir(self.data_dir)
        private_dir(os.path.join(self.data_dir, "logs"))
        if self.port == 0:
            self.port = free_port()
        if not _port_free(self.host, self.port):
            raise LaunchError(f"port {self.port} is in use; pass --port or set THREADLINE_PORT")
        ports = {name: (free_port() if self.auto_ports else DEFAULT_PORTS[name]) for name in START_ORDER}
        smtp_port = self.sandbox_smtp_port()
        mail_port = self.mail_smtp_port()
        wanted = {**ports, "sandbox SMTP sink": smtp_port, "e-mail SMTP receiver": mail_port}
        busy = [f"{n}:{p}" for n, p in wanted.items() if p and not _port_free("127.0.0.1", p)]
        if busy:
            raise LaunchError("service ports in use: " + ", ".join(busy)
                              + " (is another `threadline up` running? --auto-ports picks free ones)")
        keys = load_secrets(self.data_dir)
        nats_port = self.nats_port if self.nats_port and _port_free("127.0.0.1", self.nats_port) else free_port()
        self.nats = NatsServer(store_dir=os.path.join(self.data_dir, "nats"), port=nats_port,
                               log_path=os.path.join(self.data_dir, "logs", "nats-server.log"),
                               passwords=keys["natsPasswords"], url_user=ADMIN_USER)
        await asyncio.to_thread(self.nats.start)
        self.say(f"nats-server (JetStream, a user per service) on {self.nats.address}")
        base_env = {
            # One replica of each service: one partition per consumer group (a pull request per
            # partition is what eight cost; shared/subjects.py). An explicit setting wins.
            PARTITIONS_VARIABLE: "1",
            **os.environ,
            "THREADLINE_NATS_URL": self.nats.address,
            "THREADLINE_DATA_DIR": os.path.abspath(self.data_dir),
            "THREADLINE_SANDBOX": "1",
            "THREADLINE_HTTP_HOST": "127.0.0.1",
            "THREADLINE_PUBLIC_BASE_URL": self.base_url,
            "THREADLINE_ACCOUNT_KEY_ID": keys["accountKeyId"],
            "THREADLINE_ACCOUNT_KEY_SECRET": keys["accountKeySecret"],
            "THREADLINE_SDK_TOKEN_SECRET": keys["sdkTokenSecret"],
            # The sandbox page's "Reply as the business" opens the desk signed in as this agent.
            "THREADLINE_DESK_DEMO_AGENT_EMAIL": DEMO_AGENT_EMAIL,
            ALLOW_ENV: loopback_egress_allow([self.port, nats_port, mail_port, *ports.values()],
                                             os.environ.get(ALLOW_ENV, "")),
            SMTP_PORT_VARIABLE: str(smtp_port),
            MAIL_SMTP_PORT_VARIABLE: str(mail_port),
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        for name in START_ORDER:
            env = service_env(base_env, name, keys, ports[name])
            svc = ServiceProcess(name=name, port=ports[name], env=env,
                                 log_path=os.path.join(self.data_dir, "logs", f"{name}.log"))
            self.services[name] = svc
            await svc.start()
        await self._wait_ready()
        self._frontdoor = web.AppRunner(
            build_frontdoor({n: f"http://127.0.0.1:{p}" for n, p in ports.items()}), access_log=None)
        await self._frontdoor.setup()
        # The fast path serves plain requests; the app behind it everything else.
        await FrontdoorSite(self._frontdoor, self.host, self.port).start()
        self.account = AccountKey(keys["accountKeyId"], keys["accountKeySecret"])
        return await bootstrap_sandbox(self.base_url, self.account, self.data_dir, SANDBOX_INTEGRATIONS,
                                       desk=self.sandbox_desk)

    async def shutdown(self) -> None:
        """Stop the front door, then the services (SIGTERM, in reverse order), then NATS."""
        self._stopping = True
        if self._frontdoor is not None:
            await self._frontdoor.cleanup()
            self._frontdoor = None
        for name in reversed(START_ORDER):
            svc = self.services.get(name)
            if svc is not None:
                await svc.stop()
        if self.nats is not None:
            await self.nats.astop()

    async def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            for name, svc in self.services.items():
                while True:
                    if svc.process is not None and svc.process.returncode is not None:
                        raise LaunchError(f"{name} exited with {svc.process.returncode}; see {svc.log_path}:\n"
                                          + log_tail(svc.log_path))
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with session.get(f"http://127.0.0.1:{svc.port}/readyz",
                                               timeout=aiohttp.ClientTimeout(total=1)) as resp:
                            if resp.status == 200:
                                break
                    if time.monotonic() > deadline:
                        raise LaunchError(f"{name} not ready after {timeout}s; see {svc.log_path}")
                    await asyncio.sleep(0.1)
                self.say(f"  {name:<14} ready on :{svc.port}")

    async def _supervise(self, stop: asyncio.Event) -> None:
        """Restart a service that crashed, as Kubernetes would: each on its own back-off, so one
        that keeps crashing does not hold back the restart of another."""
        restarting: dict[str, asyncio.Task[None]] = {}
        try:
            while not stop.is_set():
                await asyncio.sleep(0.5)
                for name, svc in self.services.items():
                    pending = restarting.get(name)
                    if (svc.process is None or svc.process.returncode is None or self._stopping
                            or (pending is not None and not pending.done())):
                        continue
                    restarting[name] = asyncio.create_task(self._restart(svc))
        finally:
            for task in restarting.values():
                task.cancel()
            await asyncio.gather(*restarting.values(), return_exceptions=True)

    async def _restart(self, svc: ServiceProcess) -> None:
        """Start a service again after its back-off: 0.5 s doubling per crash up to 30 s, from
        0.5 s again once it had run for RESTART_BACKOFF_RESET_SECONDS."""
        assert svc.process is not None
        if time.monotonic() - svc.started_at >= RESTART_BACKOFF_RESET_SECONDS:
            svc.crashes = 0
        delay = min(30.0, 0.5 * 2 ** svc.crashes)
        self.say(f"{svc.name} exited with {svc.process.returncode}; restarting in {delay:.1f}s "
                 f"(log: {svc.log_path})")
        await asyncio.sleep(delay)
        if self._stopping:
            return
        svc.crashes += 1
        svc.restarts += 1
        try:
            await svc.start()
        except OSError as exc:  # not even a process: the next round tries again, after a longer wait
            svc.started_at = time.monotonic()
            self.say(f"{svc.name} could not be started again: {exc}")

    @staticmethod
    def _channel_lines(info: dict[str, Any]) -> str:
        integrations = info["integrations"]
        lines = []
        if "messenger" in integrations:
            fb = integrations["messenger"]
            lines.append(f"  Messenger        {fb['id']}   page {fb['pageId']}   verify token {fb['verifyToken']}")
        if "telegram" in integrations:
            tg = integrations["telegram"]
            lines.append(f"  Telegram         {tg['id']}   bot @{tg['username']}")
        if "twilio" in integrations:
            sms = integrations["twilio"]
            lines.append(f"  SMS (Twilio)     {sms['id']}   number {sms['phoneNumber']}")
        return "\n".join(lines)

    def _print_banner(self, info: dict[str, Any]) -> None:
        wa = info["integrations"]["whatsapp"]
        self.say(f"""
Threadline is up.  Front door: {self.base_url}   (Ctrl-C stops everything)

  Sandbox page     {self.base_url}/sandbox/
  Agent desk       {self.base_url}/desk/#demo={info['appId']}   (signed in as the demo agent)
  Business API     {self.base_url}/v2   (OpenAPI: {self.base_url}/v2/openapi.json)
  Widget           {self.base_url}/widget/threadline.js
  Health           {self.base_url}/healthz

  App id           {info['appId']}
  API key id       {info['apiKey']['id']}
  API key secret   {info['apiKey']['secret']}
  Web integration  {info['integrations']['web']['id']}
  WhatsApp integ.  {wa['id']}   number {wa['phoneNumber']} (phone-number id {wa['phoneNumberId']})
    webhook        {wa['webhookUrl']}
    verify token   {wa['verifyToken']}
    app secret     {wa['appSecret']}
{self._channel_lines(info)}

  Credentials:     {os.path.join(self.data_dir, 'sandbox.json')}
  Logs:            {os.path.join(self.data_dir, 'logs')}/
""")
