"""Run Threadline services in-process against a real nats-server, behind the real front door.

Integration and e2e tests start just the services they need:

    system = System(nats_server.url, tmp_path)
    await system.start("identity", "conversations")
    ... system.base_url (the front door), system.service_url("conversations") ...
    await system.close()

Each service is created by `services.<name>.app.create(environ)` with its HTTP port 0, so
tests never collide on ports; everything public goes through the front door as in `make up`.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import importlib
import ipaddress
import re
import secrets
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared.egress import EgressPolicy, parse_rules
from shared.encryption import KEY_ENV, SERVICES_WITH_SECRETS, Keyring
from shared.natsauth import USERS
from shared.service import ServiceApp
from threadline.frontdoor import APP_KEY_UPSTREAMS, build_frontdoor
from threadline.postgres import PostgresServer

# The store engines tests run on (tests/conftest.py: `database_settings`).
ENGINES = ("sqlite", "postgres")
ACCOUNT_KEY_ID = "act_000000000000000000000001"
ACCOUNT_KEY_SECRET = "test-account-secret-0123456789abcdef"
SDK_TOKEN_SECRET = "test-sdk-token-secret-0123456789abcdef"
# The test nats-server (tests/conftest.py) has a user per service, as `threadline up` does. The
# passwords are this process's own: a service of another test process (`make test` runs several)
# still reconnecting after its test ended cannot join a server that took over its port.
NATS_PASSWORDS = {user: f"test-nats-password-{user}-{secrets.token_hex(8)}" for user in USERS}
# The keyring services that keep or use secrets get (THREADLINE_SECRETS_KEY).
SECRETS_KEY = "test:" + base64.urlsafe_b64encode(
    hashlib.sha256(b"threadline test secrets key").digest()).decode().rstrip("=")
TEST_KEYRING = Keyring.parse(SECRETS_KEY)


def without_credentials(url: str) -> str:
    """A NATS URL (list) without `user:password@`."""
    return re.sub(r"://[^@/,]*@", "://", url)


def service_credentials(name: str) -> dict[str, str]:
    """The environment that makes service `name` connect as its own NATS user, with the
    secrets key when it is one of the services given it."""
    env = {"THREADLINE_NATS_USER": name, "THREADLINE_NATS_PASSWORD": NATS_PASSWORDS[name]}
    if name in SERVICES_WITH_SECRETS:
        env[KEY_ENV] = SECRETS_KEY
    return env

# Debian's headless Chromium, driven by Playwright (the browser tests' `browser` fixture, tests/conftest.py).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOOPBACK_EGRESS_ALLOW = "127.0.0.0/8,[::1]"
# The same policy for tests that build a client outside a service (push senders, send_email).
LOOPBACK_EGRESS = EgressPolicy(allow_http=True, rules=parse_rules(LOOPBACK_EGRESS_ALLOW))
# The default allow-list (empty), for tests that prove what the egress policy refuses.
NO_EGRESS_ALLOW = {"THREADLINE_EGRESS_ALLOW": ""}

# Start order: what a service asks at start-up runs before it.
SERVICE_ORDER = ("identity", "conversations", "webhooks", "handoff", "notifications", "whatsapp", "messenger",
                 "telegram", "sms", "email", "web", "app", "desk", "sandbox")


class System:
    """A set of in-process services plus the front door."""

    def __init__(self, nats_url: str, data_dir: Path | str, env: Mapping[str, str] | None = None) -> None:
        self.nats_url = nats_url
        self.data_dir = str(data_dir)
        # Bound now and kept: the port in THREADLINE_PUBLIC_BASE_URL can never be taken by another
        # process before the front door listens (picking a free port and binding it later raced).
        self._frontdoor_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._frontdoor_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._frontdoor_socket.bind(("127.0.0.1", 0))
        self._frontdoor_socket.listen(128)
        self.frontdoor_port: int = self._frontdoor_socket.getsockname()[1]
        self.env: dict[str, str] = {
            "THREADLINE_NATS_URL": without_credentials(nats_url),
            "THREADLINE_HTTP_HOST": "127.0.0.1",
            "THREADLINE_HTTP_PORT": "0",
            "THREADLINE_DATA_DIR": self.data_dir,
            "THREADLINE_SANDBOX": "1",
            "THREADLINE_PUBLIC_BASE_URL": f"http://127.0.0.1:{self.frontdoor_port}",
            "THREADLINE_ACCOUNT_KEY_ID": ACCOUNT_KEY_ID,
            "THREADLINE_ACCOUNT_KEY_SECRET": ACCOUNT_KEY_SECRET,
            "THREADLINE_SDK_TOKEN_SECRET": SDK_TOKEN_SECRET,
            # The sandbox's SMTP sink on any free port (read it from `sandbox.mail.port`).
            "THREADLINE_SANDBOX_SMTP_PORT": "0",
            # The e-mail channel's SMTP receiver too (`system.service("email").smtp_port`).
            "THREADLINE_MAIL_SMTP_PORT": "0",
            # Tests run platform stand-ins, business webhook receivers and SMTP sinks on random
            # loopback ports: allow loopback explicitly (tests of the egress policy itself pass
            # `env=NO_EGRESS_ALLOW` to get the default, empty allow-list).
            "THREADLINE_EGRESS_ALLOW": LOOPBACK_EGRESS_ALLOW,
            **(env or {}),
        }
        self.services: dict[str, ServiceApp] = {}
        self._frontdoor: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        """The front door's URL (what `make up` serves on :8080)."""
        return f"http://127.0.0.1:{self.frontdoor_port}"

    def service_url(self, name: str) -> str:
        """A service's own URL (bypassing the front door)."""
        return f"http://127.0.0.1:{self.services[name].port}"

    def service(self, name: str) -> Any:
        """The running service object (for white-box assertions)."""
        return self.services[name]

    async def start(self, *names: str, env: Mapping[str, str] | None = None) -> None:
        """Start services (in dependency order) and (re)start the front door over them."""
        for name in sorted(names, key=SERVICE_ORDER.index):
            await self.start_service(name, env)
        await self._restart_frontdoor()

    async def start_service(self, name: str, env: Mapping[str, str] | None = None) -> ServiceApp:
        """Start one service (not the front door)."""
        module = importlib.import_module(f"services.{name}.app")
        service: ServiceApp = module.create({**self.env, **service_credentials(name), **(env or {})})
        await service.start()
        self.services[name] = service
        return service

    async def start_replica(self, name: str, env: Mapping[str, str] | None = None) -> ServiceApp:
        """Another process of a running service: same NATS and database, its own port and
        replica id; not behind the front door; the caller stops it."""
        module = importlib.import_module(f"services.{name}.app")
        service: ServiceApp = module.create({**self.env, **service_credentials(name), **(env or {}),
                                             "THREADLINE_HTTP_PORT": "0",
                                             "THREADLINE_REPLICA_ID": f"{name}-{len(self.services)}-second"})
        await service.start()
        return service

    async def stop_service(self, name: str) -> None:
        """Stop one service as a SIGTERM would."""
        service = self.services.pop(name)
        await service.stop()

    async def restart_service(self, name: str, env: Mapping[str, str] | None = None) -> None:
        """Stop and start a service again (same data directory), keeping the front door in sync."""
        await self.stop_service(name)
        await self.start_service(name, env)
        await self._restart_frontdoor()

    async def _restart_frontdoor(self) -> None:
        upstreams = {name: f"http://127.0.0.1:{svc.port}" for name, svc in self.services.items()}
        if self._frontdoor is not None:  # the same listening socket, routes to the current ports
            routes = self._frontdoor.app[APP_KEY_UPSTREAMS]
            routes.clear()
            routes.update(upstreams)
            return
        self._frontdoor = web.AppRunner(build_frontdoor(upstreams), access_log=None)
        await self._frontdoor.setup()
        await web.SockSite(self._frontdoor, self._frontdoor_socket).start()

    async def close(self) -> None:
        """Stop the front door and every service, in reverse start order."""
        if self._frontdoor is not None:
            await self._frontdoor.cleanup()
            self._frontdoor = None
        self._frontdoor_socket.close()
        for name in sorted(self.services, key=SERVICE_ORDER.index, reverse=True):
            await self.services.pop(name).stop()


@contextlib.asynccontextmanager
async def business_webhooks() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A local business webhook endpoint: (its URL, the events received so far, in order)."""
    events: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        events.extend((await request.json())["events"])
        return web.Response(text="ok")

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    runner = web.AppRunner(receiver)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/hook", events
    finally:
        await runner.cleanup()


async def start_sdk_session(http: aiohttp.ClientSession, base_url: str, app_id: str, integration_id: str,
                            text: str = "hello", *, root: str = "sdk", start_body: Mapping[str, Any] | None = None,
                            headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """An SDK session with its user, client and conversation: a (pending) session, then its
    first message `text` (which creates them). The answer of that message's
    `POST …/conversations`: ids, tokens, `clientMessageId`."""
    sdk = f"{base_url}/{root}/v1/apps/{app_id}"
    async with http.post(f"{sdk}/integrations/{integration_id}/sessions", headers=headers) as resp:
        assert resp.status == 201, await resp.text()
        pending: dict[str, Any] = await resp.json()
    async with http.post(f"{sdk}/conversations", json={"clientMessageId": str(uuid.uuid4()), "text": text,
                                                       **(start_body or {})},
                         headers={**(headers or {}), "Authorization": f"Bearer {pending['sessionToken']}"}) as resp:
        assert resp.status == 201, await resp.text()
        session: dict[str, Any] = await resp.json()
    return session


async def new_postgres_database(server: PostgresServer) -> str:
    """Create an empty database on `server` (the session's, tests/conftest.py); its URL."""
    name = "t_" + secrets.token_hex(8)
    conn = await asyncpg.connect(server.url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return server.url_for(name)


def localhost_certificate(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext, Path, Path]:
    """(server context, client context trusting it, certificate file, key file) of a self-signed
    127.0.0.1 certificate written under `tmp_path`."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(cert_path))
    return server, client, cert_path, key_path
