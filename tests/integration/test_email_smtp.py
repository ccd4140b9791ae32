"""E-mail out (`shared/mailsend.py`) against the sandbox SMTP sink, over real SMTP on
loopback; the sink's scripting API; the e-mail integration (SunCo's `mailgun` type, sent over SMTP)
in the business API, as the official client reads it."""

from __future__ import annotations

import asyncio
import base64
import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import sunshine_conversations_client as sc
from opentelemetry import trace

from services.conversations.store import MIGRATION
from services.conversations.store import Store as ConversationsStore
from services.sandbox.smtp_fake import ScriptedFailure, SmtpSink
from shared import records, subjects
from shared.bus import Bus
from shared.db import DatabaseSettings, Migration, open_database
from shared.mailsend import (
    TRACEPARENT_HEADER,
    EmailPermanentError,
    EmailTransientError,
    build_message,
)
from shared.mailsend import send_email as send_email_with_policy
from shared.records import IntegrationRecord
from shared.telemetry import setup_telemetry, tracer
from tests.harness import (
    ACCOUNT_KEY_ID,
    ACCOUNT_KEY_SECRET,
    LOOPBACK_EGRESS,
    TEST_KEYRING,
    System,
    localhost_certificate,
)
from threadline.natsserver import free_port

# The SMTP sinks of these tests listen on loopback.
send_email = functools.partial(send_email_with_policy, policy=LOOPBACK_EGRESS)

ACCOUNT = {"Authorization": "Basic " + base64.b64encode(f"{ACCOUNT_KEY_ID}:{ACCOUNT_KEY_SECRET}".encode()).decode()}


def email_integration(port: int, **config: Any) -> IntegrationRecord:
    return IntegrationRecord(id="int-email-1", app_id="app-1", type="mailgun", display_name="Demo Shop mail",
                             config={"smtpHost": "127.0.0.1", "smtpPort": port, "security": "none",
                                     "fromAddress": "shop@example.test", "fromName": "Demo Shop", **config})


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[SmtpSink]:
    server = SmtpSink("127.0.0.1", 0, str(tmp_path / "sandbox-mail.jsonl"))
    await server.start()
    assert server.port
    try:
        yield server
    finally:
        await server.close()


async def test_mail_arrives_with_headers_parts_and_trace(sink: SmtpSink) -> None:
    setup_telemetry("test")
    assert sink.port is not None
    integration = email_integration(sink.port, username="mailer", password="s3cret")
    with tracer("test").start_as_current_span("notify") as parent:
        message_id = await send_email(
            integration, "ada@example.com", "New reply from Demo Shop",
            "We answered: https://shop.example/chat?c=1", "<p>We answered: <a href=\"https://shop.example/chat?c=1\">"
            "open</a></p>", unsubscribe_url="https://gw.example/notifications/v1/optout?token=abc")
        trace_id = format(parent.get_span_context().trace_id, "032x")
    (mail,) = list(sink.mails)
    assert mail["messageId"] == message_id and message_id.endswith("@example.test>")
    assert mail["from"] == "Demo Shop <shop@example.test>"
    assert mail["mailFrom"] == "shop@example.test"
    assert mail["to"] == ["ada@example.com"] and mail["rcptTos"] == ["ada@example.com"]
    assert mail["subject"] == "New reply from Demo Shop"
    assert mail["text"].strip() == "We answered: https://shop.example/chat?c=1"
    assert "<a href=\"https://shop.example/chat?c=1\">" in mail["html"]
    assert mail["unsubscribe"] == "https://gw.example/notifications/v1/optout?token=abc"
    assert "https://shop.example/chat?c=1" in mail["links"]
    assert mail["login"] == "mailer"  # SMTP AUTH happened with the integration's username
    headers = dict(mail["headers"])
    assert headers["Date"] and headers["Auto-Submitted"] == "auto-generated"
    assert headers[TRACEPARENT_HEADER].split("-")[1] == trace_id  # the CLIENT span's trace
    assert trace.get_current_span().get_span_context().is_valid is False


async def test_from_name_falls_back_to_the_integration_name(sink: SmtpSink) -> None:
    assert sink.port is not None
    integration = email_integration(sink.port)
    integration.config.pop("fromName")
    await send_email(integration, "ada@example.com", "Hi", "text only")
    (mail,) = list(sink.mails)
    assert mail["from"] == "Demo Shop mail <shop@example.test>"
    assert mail["html"] is None


@pytest.mark.parametrize(("stage", "code", "error"), [
    ("rcpt", 550, EmailPermanentError), ("rcpt", 451, EmailTransientError),
    ("mail", 421, EmailTransientError), ("data", 554, EmailPermanentError),
])
async def test_scripted_refusals_are_transient_or_permanent(sink: SmtpSink, stage: str, code: int,
                                                            error: type[Exception]) -> None:
    assert sink.port is not None
    integration = email_integration(sink.port)
    sink.failures.append(ScriptedFailure(stage=stage, code=code, message="Scripted refusal"))
    with pytest.raises(error) as raised:
        await send_email(integration, "ada@example.com", "Hi", "text")
    assert getattr(raised.value, "code", None) == code
    assert list(sink.mails) == []
    await send_email(integration, "ada@example.com", "Hi", "text")  # the failure was used up
    assert len(sink.mails) == 1


async def test_nothing_listening_is_transient() -> None:
    with pytest.raises(EmailTransientError):
        await send_email(email_integration(free_port()), "ada@example.com", "Hi", "text", timeout=3)


async def test_starttls_required_but_not_offered_is_permanent(sink: SmtpSink) -> None:
    assert sink.port is not None
    with pytest.raises(EmailPermanentError):
        await send_email(email_integration(sink.port, security="starttls"), "ada@example.com", "Hi", "text")
    assert list(sink.mails) == []


@pytest.mark.parametrize("security", ["starttls", "tls"])
async def test_tls_modes(tmp_path: Path, security: str) -> None:
    server_context, client_context = localhost_certificate(tmp_path)[:2]
    sink = SmtpSink("127.0.0.1", 0, None, tls_context=server_context, implicit_tls=security == "tls")
    await sink.start()
    try:
        assert sink.port is not None
        integration = email_integration(sink.port, security=security, username="u", password="p")
        await send_email(integration, "ada@example.com", "Secure", "over TLS", tls_context=client_context)
        assert [m["subject"] for m in sink.mails] == ["Secure"]
        # The certificate is checked: without trusting it the send fails and nothing arrives.
        with pytest.raises((EmailPermanentError, EmailTransientError)):
            await send_email(integration, "ada@example.com", "Untrusted", "x", timeout=3)
        assert len(sink.mails) == 1
    finally:
        await sink.close()


def test_addresses_and_headers_cannot_be_injected() -> None:
    integration = email_integration(25)
    for bad in ("not-an-address", "a@b.example, c@d.example", "a@b.example\r\nBcc: x@y.example", ""):
        with pytest.raises(EmailPermanentError):
            build_message(integration, bad, "Hi", "text")
    message = build_message(integration, "ada@example.com", "Line one\r\nBcc: evil@example.com", "text")
    assert message["Subject"] == "Line one Bcc: evil@example.com"
    assert message["Bcc"] is None


async def test_inbox_survives_a_restart_and_filters_by_recipient(tmp_path: Path) -> None:
    store = str(tmp_path / "sandbox-mail.jsonl")
    sink = SmtpSink("127.0.0.1", 0, store)
    await sink.start()
    assert sink.port is not None
    await send_email(email_integration(sink.port), "ada@example.com", "One", "1")
    await send_email(email_integration(sink.port), "bob@example.com", "Two", "2")
    await sink.close()
    again = SmtpSink("127.0.0.1", 0, store)
    assert [m["subject"] for m in again.mails] == ["One", "Two"]


async def test_sandbox_serves_the_inbox_and_scripts_failures(system: System) -> None:
    await system.start("sandbox")
    sink: SmtpSink = system.service("sandbox").mail
    assert sink.port is not None
    async with httpx.AsyncClient(base_url=system.base_url) as http:
        server = (await http.get("/sandbox/mail/server")).json()
        assert server == {"host": "127.0.0.1", "port": sink.port, "listening": True}
        await send_email(email_integration(sink.port), "ada@example.com", "Your code", "Code: 123456")
        await send_email(email_integration(sink.port), "bob@example.com", "Other", "x")
        listed = (await http.get("/sandbox/mail", params={"to": "ADA@example.com"})).json()["mails"]
        assert [m["subject"] for m in listed] == ["Your code"]
        one = (await http.get(f"/sandbox/mail/{listed[0]['id']}")).json()["mail"]
        assert one["text"].strip() == "Code: 123456"
        assert (await http.get("/sandbox/mail/nope")).status_code == 404
        refused = await http.post("/sandbox/mail/failures", json={"stage": "rcpt", "code": 250})
        assert refused.status_code == 400 and refused.json()["errors"][0]["title"]
        armed = await http.post("/sandbox/mail/failures",
                                json={"stage": "rcpt", "code": 550, "message": "No such user"})
        assert armed.status_code == 201
        with pytest.raises(EmailPermanentError, match="No such user"):
            await send_email(email_integration(sink.port), "ada@example.com", "Lost", "x")
        assert (await http.delete("/sandbox/mail")).status_code == 200
        assert (await http.get("/sandbox/mail")).json()["mails"] == []


async def test_email_integration_in_the_business_api(system: System, bus: Bus) -> None:
    await system.start("identity", "conversations")
    async with httpx.AsyncClient(base_url=system.base_url, headers=ACCOUNT) as http:
        app_id = (await http.post("/v2/apps", json={"displayName": "Shop"})).json()["app"]["id"]
        path = f"/v2/apps/{app_id}/integrations"
        body = {"type": "mailgun", "displayName": "Shop mail", "smtpHost": "smtp.example.com",
                "username": "mailer", "password": "hunter2", "fromAddress": "shop@example.com",
                "fromName": "The Shop"}
        for bad, title in (({"smtpPort": 70000}, "smtpPort"), ({"fromAddress": "nope"}, "fromAddress"),
                           ({"security": "ssl"}, None), ({"fromName": "a\nBcc: x"}, "fromName"),
                           ({"fromAddress": None}, "fromAddress"), ({"password": None}, "password"),
                           ({"smtpHost": None}, "smtpHost or domain"), ({"domain": "not a domain"}, "domain"),
                           ({"incomingAddress": "nope"}, "incomingAddress")):
            resp = await http.post(path, json={**body, **bad})
            assert resp.status_code == 400, (bad, resp.text)
            if title:
                assert title in resp.json()["errors"][0]["title"]
        created = await http.post(path, json=body)
        assert created.status_code == 201, created.text
        integration = created.json()["integration"]
        assert integration["type"] == "mailgun" and integration["status"] == "active"
        assert integration["security"] == "starttls" and integration["smtpPort"] == 587
        assert "password" not in integration  # write-only
        kv = await bus.key_value(subjects.INTEGRATIONS_BUCKET)
        record = records.integration_decoder(TEST_KEYRING)((await kv.get(integration["id"])).value)
        assert record.type == "mailgun" and record.config["password"] == "hunter2"
        assert record.config["fromName"] == "The Shop"
        patched = await http.patch(f"{path}/{integration['id']}", json={"security": "tls", "smtpPort": 465})
        assert patched.status_code == 200 and patched.json()["integration"]["security"] == "tls"
        assert (await http.patch(f"{path}/{integration['id']}", json={"smtpPort": 0})).status_code == 400
        listed = (await http.get(path)).json()["integrations"]
        assert all("password" not in i for i in listed)
        record = records.integration_decoder(TEST_KEYRING)((await kv.get(integration["id"])).value)
        assert msgspec.to_builtins(record)["config"]["smtpPort"] == 465


async def test_mailgun_integration_through_mailgun_smtp_defaults_and_the_official_client(system: System) -> None:
    """SunCo's Mailgun fields plus the SMTP relay defaults; `list_integrations` of the official
    client parses every e-mail integration (an `email` type made it raise ValueError)."""
    await system.start("identity", "conversations")
    async with httpx.AsyncClient(base_url=system.base_url, headers=ACCOUNT) as http:
        app_id = (await http.post("/v2/apps", json={"displayName": "Shop"})).json()["app"]["id"]
        path = f"/v2/apps/{app_id}/integrations"
        mailgun = {"type": "mailgun", "displayName": "Mailgun", "apiKey": "key-0123456789abcdef",
                   "domain": "mg.example.com", "incomingAddress": "support@mg.example.com",
                   "fromAddress": "shop@mg.example.com", "password": "smtp-secret"}
        created = await http.post(path, json=mailgun)
        assert created.status_code == 201, created.text
        relay = created.json()["integration"]
        assert (relay["smtpHost"], relay["smtpPort"], relay["security"], relay["username"]) == (
            "smtp.mailgun.org", 587, "starttls", "postmaster@mg.example.com")
        assert "apiKey" not in relay and "password" not in relay  # write-only
        no_password = await http.post(path, json={**mailgun, "password": None})
        assert no_password.status_code == 400 and "password" in no_password.json()["errors"][0]["title"]
        no_host = await http.post(path, json={"type": "mailgun", "fromAddress": "shop@example.com"})
        assert no_host.status_code == 400 and "smtpHost or domain" in no_host.json()["errors"][0]["title"]
        # SMTP only (the sandbox's shape): domain and incomingAddress come from the sender.
        smtp_only = await http.post(path, json={"type": "mailgun", "smtpHost": "127.0.0.1", "smtpPort": 2525,
                                                "security": "none", "fromAddress": "hello@shop.example"})
        assert smtp_only.status_code == 201, smtp_only.text
        assert (await http.post(path, json={"type": "web", "displayName": "Web"})).status_code == 201

    config = sc.Configuration(host=system.base_url, username=ACCOUNT_KEY_ID, password=ACCOUNT_KEY_SECRET)
    with sc.ApiClient(config) as client:
        listed = await asyncio.to_thread(sc.IntegrationsApi(client).list_integrations, app_id)
    by_id = {i.id: i for i in listed.integrations or []}
    assert len(by_id) == 3
    relay_model = by_id[relay["id"]]
    assert isinstance(relay_model, sc.Mailgun)
    assert relay_model.from_address == "shop@mg.example.com"
    assert (relay_model.domain, relay_model.incoming_address) == ("mg.example.com", "support@mg.example.com")
    assert relay_model.api_key is None
    smtp_model = by_id[smtp_only.json()["integration"]["id"]]
    assert isinstance(smtp_model, sc.Mailgun) and smtp_model.from_address == "hello@shop.example"
    assert (smtp_model.domain, smtp_model.incoming_address) == ("shop.example", "hello@shop.example")


async def test_an_email_typed_integration_of_an_older_data_dir_becomes_mailgun(
        database_settings: DatabaseSettings) -> None:
    """A data dir from before the rename (type `email`) opens with the integration as `mailgun`."""
    old = await open_database(database_settings, Migration(MIGRATION.steps[:2]))
    await old.execute("INSERT INTO apps (id, display_name, settings, metadata, created_at)"
                      " VALUES ('a', 'A', '{}', '{}', 0)")
    await old.execute("INSERT INTO integrations (id, app_id, type, status, display_name, config, created_at)"
                      " VALUES ('i', 'a', 'email', 'active', 'Mail', '{\"fromAddress\": \"s@x.test\"}', 0)")
    await old.close()
    store = await ConversationsStore.open(database_settings)
    try:
        assert await store.integration_type("i") == "mailgun"
    finally:
        await store.close()
