"""Secrets at rest and on the bus: sealed in SQLite and in KV, private data files, a sealed data
directory from an older version, key rotation, and NATS with one user per service."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import os
import sqlite3
import ssl
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import msgspec
import nats
import nats.errors
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.conversations.app import create as create_conversations
from services.conversations.store import MIGRATION
from services.webhooks.app import create as create_webhooks
from services.whatsapp.app import create as create_whatsapp
from shared import records, subjects
from shared.bus import Bus
from shared.config import ConfigError
from shared.db import DatabaseSettings, open_database
from shared.encryption import KEY_ENV, generate_key, is_sealed, sealed_key_id
from shared.natsauth import ADMIN_USER, inbox_prefix
from shared.signing import jwt_encode
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, NATS_PASSWORDS, SECRETS_KEY, TEST_KEYRING, System
from threadline.natsserver import NatsServer

T = TypeVar("T")
ACCOUNT = {"Authorization": "Basic " + base64.b64encode(f"{ACCOUNT_KEY_ID}:{ACCOUNT_KEY_SECRET}".encode()).decode()}
ACCESS_TOKEN = "EAAG-plaintext-access-token-4242"
APP_SECRET = "plaintext-app-secret-4242"
VERIFY_TOKEN = "plaintext-verify-token-4242"
SMTP_PASSWORD = "plaintext-smtp-password-4242"


def basic(key_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key_id}:{secret}".encode()).decode()}


async def eventually(check: Callable[[], Awaitable[T | None]], timeout: float = 10.0) -> T:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def files_bytes(root: Path) -> bytes:
    """Every byte of every file under `root` (databases with their -wal/-shm, JetStream blocks)."""
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


async def create_secrets(http: httpx.AsyncClient) -> dict[str, Any]:
    """An app, an app key and integrations holding every kind of secret, through the API."""
    app_id = (await http.post("/v2/apps", json={"displayName": "Shop"}, headers=ACCOUNT)).json()["app"]["id"]
    created = await http.post(f"/v2/apps/{app_id}/keys", json={"displayName": "server"}, headers=ACCOUNT)
    assert created.status_code == 201
    key = created.json()["key"]
    auth = basic(key["id"], key["secret"])
    whatsapp = await http.post(f"/v2/apps/{app_id}/integrations", headers=auth, json={
        "type": "whatsapp", "phoneNumber": "+15550001", "phoneNumberId": "1234", "accessToken": ACCESS_TOKEN,
        "appSecret": APP_SECRET, "verifyToken": VERIFY_TOKEN})
    assert whatsapp.status_code == 201, whatsapp.text
    custom = await http.post(f"/v2/apps/{app_id}/integrations", headers=auth, json={
        "type": "custom", "webhooks": [{"target": "https://bot.example/hook", "triggers": ["conversation:message"]}]})
    assert custom.status_code == 201, custom.text
    mail = await http.post(f"/v2/apps/{app_id}/integrations", headers=auth, json={
        "type": "mailgun", "smtpHost": "smtp.example.com", "username": "mailer", "password": SMTP_PASSWORD,
        "fromAddress": "shop@example.com"})
    assert mail.status_code == 201, mail.text
    return {"app_id": app_id, "key": key, "whatsapp": whatsapp.json()["integration"],
            "custom": custom.json()["integration"], "mail": mail.json()["integration"]}


async def test_secrets_written_through_the_api_are_sealed_in_sqlite_and_in_kv(
        system: System, nats_server: NatsServer, bus: Bus) -> None:
    await system.start("identity", "conversations", "whatsapp")
    async with httpx.AsyncClient(base_url=system.base_url) as http:
        made = await create_secrets(http)
        key, whatsapp, hook = made["key"], made["whatsapp"], made["custom"]["webhooks"][0]
        plaintexts = [key["secret"], ACCESS_TOKEN, APP_SECRET, VERIFY_TOKEN, SMTP_PASSWORD, hook["secret"]]
        # Nowhere in the conversations database, its WAL included.
        stored = files_bytes(Path(system.data_dir))
        assert f"{whatsapp['id']}".encode() in stored  # the rows are there…
        for secret in plaintexts:
            assert secret.encode() not in stored, secret  # …their secrets are not
        # Nowhere in the KV buckets the channel services and webhooks read…
        integrations = await bus.key_value(subjects.INTEGRATIONS_BUCKET)
        hooks = await bus.key_value(subjects.WEBHOOKS_BUCKET)
        kv_values = b"".join([(await integrations.get(i)).value or b"" for i in (whatsapp["id"], made["mail"]["id"])]
                             + [(await hooks.get(records.webhook_key(made["app_id"], hook["id"]))).value or b""])
        for secret in plaintexts:
            assert secret.encode() not in kv_values, secret
        # …nor in their files on disk (once JetStream has written the records out).
        jetstream = Path(nats_server.store_dir) / "jetstream"

        async def written_out() -> bool:
            return whatsapp["id"].encode() in files_bytes(jetstream)

        await eventually(written_out)
        on_disk = files_bytes(jetstream)
        for secret in plaintexts:
            assert secret.encode() not in on_disk, secret
        # The key opens them: the API still answers SunCo's way…
        got = (await http.get(f"/v2/apps/{made['app_id']}/keys/{key['id']}", headers=ACCOUNT)).json()["key"]
        assert got["secret"] == key["secret"]
        listed = (await http.get(f"/v2/apps/{made['app_id']}/integrations/{made['custom']['id']}/webhooks",
                                 headers=basic(key["id"], key["secret"]))).json()["webhooks"]
        assert listed[0]["secret"] == hook["secret"]
        assert (await http.get(f"/v2/apps/{made['app_id']}/integrations/{whatsapp['id']}",
                               headers=ACCOUNT)).json()["integration"]["verifyToken"] == VERIFY_TOKEN
        # …an HS256 JWT signed with the key secret still verifies…
        token = jwt_encode({"scope": "app"}, key["secret"], kid=key["id"])
        resp = await http.get(f"/v2/apps/{made['app_id']}", headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 200
        # …and the whatsapp service opened its credentials (Meta's verification uses verifyToken).
        params = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "42"}

        async def verified() -> bool:
            resp = await http.get(f"/webhooks/whatsapp/{whatsapp['id']}", params=params)
            return resp.status_code == 200 and resp.text == "42"

        await eventually(verified)
        record = records.integration_decoder(TEST_KEYRING)((await integrations.get(whatsapp["id"])).value or b"")
        assert record.config["accessToken"] == ACCESS_TOKEN


async def test_data_files_are_private_and_an_older_data_dir_is_tightened(
        nats_server: NatsServer, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    old_db = data / "identity.db"
    sqlite3.connect(old_db).close()
    os.chmod(old_db, 0o644)
    system = System(nats_server.url, data)
    try:
        await system.start("identity", "conversations")
        async with httpx.AsyncClient(base_url=system.base_url) as http:
            await create_secrets(http)
        # While the services run: the folder, the databases and their -wal/-shm files.
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        databases = sorted(data.glob("*.db*"))
        assert {p.name for p in databases} >= {"identity.db", "conversations.db", "conversations.db-wal",
                                               "conversations.db-shm"}
        for path in databases:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    finally:
        await system.close()


async def test_an_older_data_dir_with_plaintext_secrets_is_sealed_at_start(system: System, bus: Bus) -> None:
    path = str(Path(system.data_dir) / "conversations.db")
    Path(system.data_dir).mkdir(parents=True, exist_ok=True)
    old = await open_database(DatabaseSettings(sqlite_path=path, schema="conversations"), MIGRATION)
    hook = records.WebhookRecord(id="b" * 24, app_id="a" * 24, integration_id="c" * 24,
                                 target="https://bot.example/hook", triggers=["conversation:message"],
                                 secret="plaintext-webhook-secret-4242")
    statements: list[tuple[str, tuple[Any, ...]]] = [
        ("INSERT INTO apps (id, display_name, settings, metadata, created_at) VALUES ($1, 'Old', '{}', '{}', 0)",
         ("a" * 24,)),
        ("INSERT INTO app_keys (id, app_id, display_name, secret, created_at) VALUES ($1, $2, 'old', $3, 0)",
         ("app_" + "d" * 24, "a" * 24, "plaintext-key-secret-4242")),
        ("INSERT INTO integrations (id, app_id, type, status, display_name, config, created_at)"
         " VALUES ($1, $2, 'whatsapp', 'active', NULL, $3, 0)",
         ("e" * 24, "a" * 24, msgspec.json.encode({"phoneNumberId": "1", "accessToken": ACCESS_TOKEN,
                                                   "appSecret": APP_SECRET}).decode())),
        ("INSERT INTO integrations (id, app_id, type, status, display_name, config, created_at)"
         " VALUES ($1, $2, 'custom', 'active', NULL, '{}', 0)", ("c" * 24, "a" * 24)),
        ("INSERT INTO webhooks (id, app_id, integration_id, record, created_at) VALUES ($1, $2, $3, $4, 0)",
         (hook.id, hook.app_id, hook.integration_id, records.ENCODER.encode(hook).decode())),
    ]
    for sql, params in statements:
        await old.execute(sql, *params)
    await old.close()
    await system.start("identity", "conversations")
    await system.stop_service("conversations")  # checkpointed and closed: the file is what remains
    stored = files_bytes(Path(system.data_dir))
    for secret in ("plaintext-key-secret-4242", ACCESS_TOKEN, APP_SECRET, "plaintext-webhook-secret-4242"):
        assert secret.encode() not in stored, secret
    await system.start("conversations")
    async with httpx.AsyncClient(base_url=system.base_url) as http:
        resp = await http.get(f"/v2/apps/{'a' * 24}", headers=basic("app_" + "d" * 24, "plaintext-key-secret-4242"))
        assert resp.status_code == 200
    raw = (await (await bus.key_value(subjects.INTEGRATIONS_BUCKET)).get("e" * 24)).value or b""
    assert ACCESS_TOKEN.encode() not in raw
    assert records.integration_decoder(TEST_KEYRING)(raw).config["accessToken"] == ACCESS_TOKEN
    hook_raw = (await (await bus.key_value(subjects.WEBHOOKS_BUCKET)).get(records.webhook_key(hook.app_id,
                                                                                               hook.id))).value
    assert records.webhook_decoder(TEST_KEYRING)(hook_raw or b"").secret == "plaintext-webhook-secret-4242"


def sealed_values(db_path: Path) -> list[str]:
    """Every sealed value in the conversations database."""
    db = sqlite3.connect(db_path)
    try:
        values = [row[0] for row in db.execute("SELECT secret FROM app_keys")]
        for (config,) in db.execute("SELECT config FROM integrations"):
            values += [v for v in msgspec.json.decode(config).values() if is_sealed(v)]
        for (record,) in db.execute("SELECT record FROM webhooks"):
            values.append(msgspec.json.decode(record)["secret"])
    finally:
        db.close()
    return values


async def test_rotation_reseals_under_the_new_key_and_a_missing_key_refuses_start(system: System) -> None:
    old, new = f"k1:{generate_key()}", f"k2:{generate_key()}"
    await system.start("identity")
    await system.start("conversations", env={KEY_ENV: old})
    async with httpx.AsyncClient(base_url=system.base_url) as http:
        made = await create_secrets(http)
    db_path = Path(system.data_dir) / "conversations.db"
    assert {sealed_key_id(v) for v in sealed_values(db_path)} == {"k1"}
    key_auth = basic(made["key"]["id"], made["key"]["secret"])
    # Step 2 of the procedure: the new key first, the old one still there. Everything is re-sealed.
    await system.restart_service("conversations", env={KEY_ENV: f"{new},{old}"})
    values = sealed_values(db_path)
    assert len(values) == 6 and {sealed_key_id(v) for v in values} == {"k2"}
    # Step 3: the old key dropped; everything still opens.
    await system.restart_service("conversations", env={KEY_ENV: new})
    async with httpx.AsyncClient(base_url=system.base_url) as http:
        assert (await http.get(f"/v2/apps/{made['app_id']}", headers=key_auth)).status_code == 200
        hooks = (await http.get(f"/v2/apps/{made['app_id']}/integrations/{made['custom']['id']}/webhooks",
                                headers=key_auth)).json()["webhooks"]
        assert hooks[0]["secret"] == made["custom"]["webhooks"][0]["secret"]
    # A keyring without the key that sealed the data: refused at start, nothing changed.
    await system.stop_service("conversations")
    with pytest.raises(ConfigError, match="k2"):
        await system.start_service("conversations", env={KEY_ENV: old})
    assert {sealed_key_id(v) for v in sealed_values(db_path)} == {"k2"}


async def test_a_secret_sent_in_sealed_form_is_refused_and_rotation_still_works(system: System) -> None:
    """A tenant must not store a value that looks sealed but never opens: it would break every
    app at the next key rotation (the re-seal refuses to start on a value that does not open)."""
    old, new = f"k1:{generate_key()}", f"k2:{generate_key()}"
    await system.start("identity")
    await system.start("conversations", env={KEY_ENV: old})
    async with httpx.AsyncClient(base_url=system.base_url) as http:
        made = await create_secrets(http)
        auth = basic(made["key"]["id"], made["key"]["secret"])
        planted = {"type": "telegram", "token": "tlenc1:k1:AAAA"}
        resp = await http.post(f"/v2/apps/{made['app_id']}/integrations", headers=auth, json=planted)
        assert resp.status_code == 400 and resp.json()["errors"][0]["title"].startswith("token must be"), resp.text
        resp = await http.patch(f"/v2/apps/{made['app_id']}/integrations/{made['whatsapp']['id']}", headers=auth,
                                json={"accessToken": "tlenc1:k1:AAAA"})
        assert resp.status_code == 400, resp.text
        assert (await http.get(f"/v2/apps/{made['app_id']}/integrations", headers=auth)).status_code == 200
    await system.restart_service("conversations", env={KEY_ENV: f"{new},{old}"})
    assert {sealed_key_id(v) for v in sealed_values(Path(system.data_dir) / "conversations.db")} == {"k2"}


def test_start_refuses_a_placeholder_key_outside_the_sandbox(tmp_path: Path) -> None:
    env = {"THREADLINE_SANDBOX": "0", "THREADLINE_DATA_DIR": str(tmp_path), "THREADLINE_ACCOUNT_KEY_ID": ACCOUNT_KEY_ID,
           "THREADLINE_ACCOUNT_KEY_SECRET": ACCOUNT_KEY_SECRET}
    for create in (create_conversations, create_whatsapp):
        for bad in ({}, {KEY_ENV: "changeme"}, {KEY_ENV: "k1:c2hvcnQ="}):
            with pytest.raises(ConfigError, match=r"THREADLINE_SECRETS_KEY|secrets key"):
                create({**env, **bad})
        assert create({**env, KEY_ENV: SECRETS_KEY}).config.keyring.primary_id == "test"
    # The sandbox accepts a missing key (a well-known one), and NATS credentials come in pairs.
    assert create_conversations({**env, "THREADLINE_SANDBOX": "1"}).config.keyring.primary_id == "sandbox"
    with pytest.raises(ConfigError):
        create_conversations({**env, KEY_ENV: SECRETS_KEY, "THREADLINE_NATS_USER": "conversations"})
    with pytest.raises(ConfigError):
        create_conversations({**env, KEY_ENV: SECRETS_KEY, "THREADLINE_NATS_USER": "conversations",
                              "THREADLINE_NATS_PASSWORD": "changeme"})


class Refusals:
    """The errors the server sent one connection (permission violations come asynchronously)."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    async def on_error(self, exc: Exception) -> None:
        self.errors.append(str(exc).lower())

    def _has(self, what: str, subject: str) -> bool:
        return any(f"permissions violation for {what} to \"{subject.lower()}\"" in e for e in self.errors)

    async def refused(self, what: str, subject: str) -> bool:
        """Whether the server refused `what` (publish, subscription) on `subject` (waits for its -ERR)."""

        async def seen() -> bool:
            return self._has(what, subject)

        try:
            await eventually(seen, timeout=5.0)
        except AssertionError:
            return False
        return True


async def connect_as(server: NatsServer, user: str, refusals: Refusals) -> nats.aio.client.Client:
    return await nats.connect(server.address, user=user, password=NATS_PASSWORDS[user], allow_reconnect=False,
                              error_cb=refusals.on_error, inbox_prefix=inbox_prefix(user))


async def test_nats_refuses_anonymous_clients_and_each_service_gets_only_what_it_uses(
        nats_server: NatsServer, bus: Bus) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(nats_server.address, allow_reconnect=False, connect_timeout=5)
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(nats_server.address, user="web", password="guessed", allow_reconnect=False,
                           connect_timeout=5)
    integrations = await bus.key_value(subjects.INTEGRATIONS_BUCKET)
    await integrations.put("i1", records.ENCODER.encode(records.IntegrationRecord(
        id="i1", app_id="a", type="web", config={"businessName": "Shop"})))
    await (await bus.key_value(subjects.WEBHOOKS_BUCKET)).put("a.w1", b"{}")
    assert ADMIN_USER in nats_server.url

    web_refusals = Refusals()
    web = await connect_as(nats_server, "web", web_refusals)
    try:
        # What `web` needs works: the integrations bucket (whose secrets it cannot open) and its inbound.
        js = web.jetstream(timeout=5)
        assert (await (await js.key_value(subjects.INTEGRATIONS_BUCKET)).get("i1")).value
        await js.publish(subjects.inbound_subject("web", "i1", "u1"), b"{}")
        # What it does not is refused: webhook secrets, writing integrations, other channels' inbound,
        # conversations' consumer, another service's replies, a stream that would mirror a bucket.
        forbidden = ["$JS.API.STREAM.INFO.KV_tl_webhooks", "$JS.API.CONSUMER.CREATE.KV_tl_webhooks",
                     "$JS.API.DIRECT.GET.KV_tl_webhooks.$KV.tl_webhooks.a.w1",
                     "$JS.API.STREAM.MSG.GET.KV_tl_webhooks", "$KV.tl_integrations.i1",
                     subjects.inbound_subject("whatsapp", "i1", "u1"), "$JS.API.STREAM.CREATE.MIRROR",
                     "$JS.API.CONSUMER.MSG.NEXT.TL_INBOUND.conversations-inbound-p0", "$KV.tl_link_codes.x",
                     # internal requests it never makes: deleting a user, linking or merging clients
                     subjects.IDENTITY_USER_DELETE, subjects.IDENTITY_CLIENT_LINK, subjects.IDENTITY_USER_GET,
                     subjects.CONVERSATIONS_CLIENT_LINK, subjects.HANDOFF_REDEEM]
        for subject in forbidden:
            await web.publish(subject, b"{}")
        await web.subscribe(inbox_prefix("conversations") + ".>")
        await web.flush()
        for subject in forbidden:
            assert await web_refusals.refused("publish", subject), (subject, web_refusals.errors)
        assert await web_refusals.refused("subscription", inbox_prefix("conversations") + ".>")
    finally:
        await web.close()
    # A channel service reads integrations but neither writes them nor reads webhook secrets.
    wa_refusals = Refusals()
    whatsapp = await connect_as(nats_server, "whatsapp", wa_refusals)
    try:
        assert (await (await whatsapp.jetstream(timeout=5).key_value(subjects.INTEGRATIONS_BUCKET)).get("i1")).value
        for subject in ("$KV.tl_integrations.i1", "$JS.API.STREAM.INFO.KV_tl_webhooks", "events.a.c"):
            await whatsapp.publish(subject, b"{}")
        await whatsapp.flush()
        for subject in ("$KV.tl_integrations.i1", "$JS.API.STREAM.INFO.KV_tl_webhooks", "events.a.c"):
            assert await wa_refusals.refused("publish", subject), (subject, wa_refusals.errors)
    finally:
        await whatsapp.close()



def write_certificate(directory: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (as Secret nats-tls would hold): (cert = CA, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nats")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


async def test_services_reach_a_tls_nats_with_the_ca_they_are_given(tmp_path: Path) -> None:
    cert, key = write_certificate(tmp_path)
    server = NatsServer(store_dir=str(tmp_path / "nats"), passwords=NATS_PASSWORDS,
                        extra_args=["--tls", "--tlscert", cert, "--tlskey", key]).start()
    try:
        url = f"tls://127.0.0.1:{server.port}"
        # As a service configured with THREADLINE_NATS_URL=tls://… and THREADLINE_NATS_TLS_CA_FILE.
        service = create_webhooks({"THREADLINE_NATS_URL": url, "THREADLINE_NATS_TLS_CA_FILE": cert,
                          "THREADLINE_NATS_USER": "webhooks", "THREADLINE_NATS_PASSWORD": NATS_PASSWORDS["webhooks"],
                          "THREADLINE_SANDBOX": "0", KEY_ENV: SECRETS_KEY, "THREADLINE_HTTP_PORT": "0",
                          "THREADLINE_DATA_DIR": str(tmp_path / "data")})
        await asyncio.wait_for(service.start(), 30)  # a client that cannot verify the server retries forever
        try:
            assert service.bus is not None and service.bus.nc.is_connected
            assert service.bus.nc.connected_url is not None and service.bus.nc.connected_url.scheme == "tls"
        finally:
            await service.stop()
        # Without the CA the server's certificate is not trusted: no connection.
        with pytest.raises(ssl.SSLCertVerificationError):
            await nats.connect(url, user="webhooks", password=NATS_PASSWORDS["webhooks"], allow_reconnect=False,
                               connect_timeout=5)
    finally:
        server.stop()
