"""The egress policy end to end, over real loopback HTTP and SMTP, with the default (empty)
allow-list unless a test names what the operator allowed: the WhatsApp media-proxy SSRF, internal
webhook targets, base URLs and SMTP hosts refused at create time, refusals at send time
(connect-time checks, DNS answers pointing inside), redirects never followed."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from services.app.push import FcmSender, PushMessage
from services.sandbox.push_fake import sandbox_android_config
from services.whatsapp.handlers import media_signature
from shared import records, subjects
from shared.bus import Bus
from shared.egress import REFUSED_CODE, EgressPolicy, EgressRefused, parse_rules
from shared.ids import new_id
from shared.mailsend import EmailPermanentError, send_email
from shared.media import object_key, parse_attachment_url
from shared.messages import channel
from shared.messages.channel import DeliveryStatus, OutboundSend
from shared.records import IntegrationRecord
from shared.signing import meta_signature
from shared.sunco import TextContent
from tests.fakes.whatsapp_env import eventually, stream_messages
from tests.harness import NO_EGRESS_ALLOW, System
from tests.integration.test_conversations_api import Tenant, create_tenant
from tests.integration.test_webhooks_delivery import (
    FAST_RETRIES,
    Receiver,
    message_created,
    publish,
    put_webhook,
    settled_row,
)
from threadline.natsserver import free_port

SECRET_BODY = b"aws-secret-access-key=TOP-SECRET"
ACCESS_TOKEN = "EAA-whatsapp-bearer-0123456789"
APP_SECRET = "wa-app-secret-0123456789abcdef"


@dataclass
class Server:
    """A loopback HTTP server that records every request (path, Authorization) it gets."""

    routes: list[web.RouteDef]
    seen: list[tuple[str, str]] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0

    async def start(self) -> Server:
        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            self.seen.append((request.path, request.headers.get("Authorization", "")))
            response: web.StreamResponse = await handler(request)
            return response

        app = web.Application(middlewares=[record])
        app.router.add_routes(self.routes)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def _secret(_request: web.Request) -> web.Response:
    return web.Response(body=SECRET_BODY, content_type="text/plain")


@pytest.fixture
async def internal() -> AsyncIterator[Server]:
    """Something inside the network that must never be reached (a metadata service stand-in)."""
    server = await Server([web.get("/{tail:.*}", _secret), web.post("/{tail:.*}", _secret)]).start()
    try:
        yield server
    finally:
        await server.stop()


class StaticResolver(AbstractResolver):
    """DNS as an attacker controls it: every name resolves to `address`."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        return [{"hostname": host, "host": self.address, "port": port, "family": socket.AF_INET, "proto": 0,
                 "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        return None


@pytest.fixture
async def tenant(system: System) -> AsyncIterator[Tenant]:
    """An app and its key, with the production default: nothing allow-listed."""
    await system.start("identity", "conversations", env=NO_EGRESS_ALLOW)
    async with aiohttp.ClientSession() as http:
        app_id, key_id, secret = await create_tenant(system, http)
        yield Tenant(system, http, app_id, key_id, secret)


def _refused(status: int, body: Any) -> bool:
    return status == 400 and body["errors"][0]["code"] == "bad_request" \
        and "egress policy" in body["errors"][0]["title"]


# --- (a) the reported attack: an app key points WhatsApp's base URL inside -------------------------


async def test_an_app_key_cannot_point_a_platform_base_url_at_an_internal_address(
        tenant: Tenant, internal: Server) -> None:
    t = tenant
    port = internal.port
    internal_urls = [internal.origin, f"http://[::1]:{port}", f"http://2130706433:{port}", f"http://0x7f.1:{port}",
                     f"http://localhost:{port}", "http://169.254.169.254/latest/meta-data", "http://10.0.0.7",
                     "file:///etc/passwd", "https://graph.attacker.example"]
    path = f"/v2/apps/{t.app_id}/integrations"
    for base_url in internal_urls:
        status, body = await t.request("POST", path, body={
            "type": "whatsapp", "phoneNumberId": "1", "accessToken": ACCESS_TOKEN, "appSecret": APP_SECRET,
            "baseUrl": base_url})
        assert _refused(status, body), (base_url, status, body)
        assert "baseUrl" in body["errors"][0]["title"]
    for other in ({"type": "messenger", "appId": "1", "baseUrl": internal.origin},
                  {"type": "telegram", "token": "1:x", "baseUrl": "http://[::ffff:127.0.0.1]:80"},
                  {"type": "twilio", "accountSid": "AC1", "baseUrl": "http://169.254.169.254"},
                  {"type": "android", "tokenUri": f"{internal.origin}/token"},
                  {"type": "ios", "baseUrl": "https://apns.attacker.example"}):
        status, body = await t.request("POST", path, body=other)
        assert _refused(status, body), (other, status, body)
    _, listed = await t.request("GET", path)
    assert listed["integrations"] == []

    # What stays possible: the platform's own host, and the sandbox's origin (its fakes).
    status, body = await t.request("POST", path, body={
        "type": "whatsapp", "phoneNumberId": "1", "accessToken": ACCESS_TOKEN, "appSecret": APP_SECRET})
    assert status == 201 and body["integration"]["baseUrl"] == "https://graph.facebook.com"
    integration_id = body["integration"]["id"]
    status, body = await t.request("POST", path, body={
        "type": "whatsapp", "phoneNumberId": "2", "accessToken": ACCESS_TOKEN, "appSecret": APP_SECRET,
        "baseUrl": f"{t.system.base_url}/sandbox/graph"})
    assert status == 201, body
    # An update cannot do what a create cannot.
    status, body = await t.request("PATCH", f"{path}/{integration_id}", body={"baseUrl": internal.origin})
    assert _refused(status, body)
    _, body = await t.request("GET", f"{path}/{integration_id}")
    assert body["integration"]["baseUrl"] == "https://graph.facebook.com"
    assert internal.seen == []


@dataclass
class Graph:
    """A Graph API stand-in: its media lookup answers `url` with whatever the test sets."""

    server: Server
    media_url: str = ""

    @classmethod
    async def start(cls) -> Graph:
        graph = cls(Server([]))

        async def lookup(request: web.Request) -> web.Response:
            return web.json_response({"id": request.match_info["media_id"], "url": graph.media_url,
                                      "mime_type": "image/png"})

        async def download(_request: web.Request) -> web.Response:
            return web.Response(body=b"\x89PNG-the-customer-photo", content_type="image/png")

        async def page(_request: web.Request) -> web.Response:
            return web.Response(body=b"<script>steal(document.cookie)</script>", content_type="text/html")

        graph.server.routes = [web.get("/v23.0/{media_id}", lookup), web.get("/media/{name}", download),
                               web.get("/page/{name}", page)]
        await graph.server.start()
        return graph


def whatsapp_record(base_url: str) -> IntegrationRecord:
    return IntegrationRecord(id=new_id(), app_id=new_id(), type="whatsapp", config={
        "phoneNumberId": "1122334455667", "accessToken": ACCESS_TOKEN, "appSecret": APP_SECRET,
        "apiVersion": "v23.0", "baseUrl": base_url})


async def put_integration(system: System, bus: Bus, record: IntegrationRecord) -> None:
    kv = await bus.key_value(subjects.INTEGRATIONS_BUCKET)
    await kv.put(record.id, records.ENCODER.encode(record))
    service = system.service("whatsapp")

    async def seen() -> bool:
        return service.credentials(record.id) is not None

    await eventually(seen)


def media_link(system: System, record: IntegrationRecord, media_id: str) -> str:
    sig = media_signature(APP_SECRET, record.id, media_id)
    return f"{system.base_url}/webhooks/whatsapp/{record.id}/media/{media_id}?sig={sig}"


async def test_media_proxy_sends_the_bearer_only_to_the_graph_origin_and_streams_nothing_else(
        system: System, bus: Bus, internal: Server) -> None:
    graph = await Graph.start()
    try:
        # The operator allow-listed a self-hosted Graph stand-in; nothing else.
        await system.start("whatsapp", env={"THREADLINE_EGRESS_ALLOW": f"127.0.0.1:{graph.server.port}"})
        record = whatsapp_record(graph.server.origin)
        await put_integration(system, bus, record)
        async with httpx.AsyncClient() as http:
            for url in (f"{internal.origin}/latest/meta-data/iam", "http://169.254.169.254/latest/meta-data",
                        f"http://localhost:{internal.port}/", "https://lookaside.fbsbx.com.attacker.example/x",
                        "http://lookaside.fbsbx.com/x", "file:///etc/passwd"):
                graph.media_url = url
                response = await http.get(media_link(system, record, "m1"))
                assert response.status_code == 502, (url, response.text)
                assert SECRET_BODY not in response.content and b"TOP-SECRET" not in response.content
            assert internal.seen == []  # neither the bearer nor anything else went there
            # The Graph origin itself serves the media (as the sandbox's fake does): streamed.
            graph.media_url = f"{graph.server.origin}/media/photo.png"
            response = await http.get(media_link(system, record, "m2"))
            assert response.status_code == 200 and response.content == b"\x89PNG-the-customer-photo"
            assert response.headers["content-type"] == "image/png"
            # A customer's HTML is relayed as a download, never rendered on the gateway's origin.
            graph.media_url = f"{graph.server.origin}/page/x.html"
            response = await http.get(media_link(system, record, "m3"))
            assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["content-disposition"].startswith("attachment")
            assert "sandbox" in response.headers["content-security-policy"]
        assert ("/media/photo.png", f"Bearer {ACCESS_TOKEN}") in graph.server.seen
    finally:
        await graph.server.stop()


async def test_customer_media_is_copied_from_the_platform_cdn_and_never_fetched_from_inside(
        system: System, bus: Bus, internal: Server) -> None:
    """Messenger attachments are copied into the object store before their message is published:
    from an allowed CDN (an allow-listed stand-in here), never from an internal address — that
    message keeps the platform's URL and nothing is lost."""
    async def photo(_request: web.Request) -> web.Response:
        return web.Response(body=b"\x89PNG\r\n\x1a\n-the-customer-photo", content_type="image/png")

    cdn = await Server([web.get("/p.png", photo)]).start()
    try:
        await system.start("messenger", env={"THREADLINE_EGRESS_ALLOW": f"127.0.0.1:{cdn.port}"})
        record = IntegrationRecord(id=new_id(), app_id=new_id(), type="messenger", config={
            "pageId": "5550001", "pageAccessToken": "page-token", "appSecret": APP_SECRET, "verifyToken": "v",
            "apiVersion": "v23.0"})
        kv = await bus.key_value(subjects.INTEGRATIONS_BUCKET)
        await kv.put(record.id, records.ENCODER.encode(record))
        service = system.service("messenger")

        async def seen() -> bool:
            return service.credentials(record.id) is not None

        await eventually(seen)
        sent = {"m.cdn": f"{cdn.origin}/p.png", "m.inside": f"{internal.origin}/latest/meta-data/p.png"}
        body = json.dumps({"object": "page", "entry": [{"id": "5550001", "time": 1, "messaging": [
            {"sender": {"id": "777"}, "recipient": {"id": "5550001"}, "timestamp": 1_700_000_000_000 + index,
             "message": {"mid": mid, "attachments": [{"type": "image", "payload": {"url": url}}]}}
            for index, (mid, url) in enumerate(sent.items())]}]}).encode()
        async with httpx.AsyncClient() as http:
            answer = await http.post(f"{system.base_url}/webhooks/messenger/{record.id}", content=body, headers={
                "Content-Type": "application/json", "X-Hub-Signature-256": meta_signature(APP_SECRET, body)})
        assert answer.status_code == 200

        async def both() -> dict[str, Any] | None:
            found = {m.provider_message_id: m for m in await stream_messages(
                bus, subjects.INBOUND, subjects.integration_subjects("inbound", "messenger", record.id))}
            return found if len(found) == 2 else None

        messages = await eventually(both)
        copied = messages["m.cdn"].content
        ref = parse_attachment_url(system.base_url, copied.media_url)
        assert ref is not None and copied.media_type == "image/png"
        stored = await service.media_copier.store.open(object_key(ref.app_id, ref.token))
        assert stored is not None and await stored.read() == b"\x89PNG\r\n\x1a\n-the-customer-photo"
        assert messages["m.inside"].content.media_url == sent["m.inside"]
        assert internal.seen == []
    finally:
        await cdn.stop()


async def test_a_stored_internal_base_url_is_refused_at_send_time(system: System, bus: Bus, internal: Server) -> None:
    """A record written before the policy existed: the media route and the sender refuse to use it."""
    await system.start("whatsapp", env=NO_EGRESS_ALLOW)
    record = whatsapp_record(internal.origin)
    await put_integration(system, bus, record)
    async with httpx.AsyncClient() as http:
        response = await http.get(media_link(system, record, "m1"))
    assert response.status_code == 502 and SECRET_BODY not in response.content
    assert response.json()["errors"][0]["title"] == "Media download refused by the egress policy"
    send = OutboundSend(app_id=record.app_id, integration_id=record.id, channel="whatsapp", conversation_id=new_id(),
                        message_id=new_id(), user_id=new_id(), client_id=new_id(), recipient="15551234567",
                        recipient_info={"wa_id": "15551234567"}, content=TextContent(text="hello"))
    await bus.publish(channel.subject_of(send), channel.encode(send))

    async def failed() -> DeliveryStatus | None:
        for status in await stream_messages(bus, subjects.STATUS):
            if isinstance(status, DeliveryStatus) and status.message_id == send.message_id:
                return status
        return None

    status = await eventually(failed)
    assert status.status == "failed" and status.error_code == REFUSED_CODE
    assert status.error_title and "127.0.0.1" in status.error_title and "loopback" in status.error_title
    assert internal.seen == []


# --- (b) business webhook targets ------------------------------------------------------------------


async def test_internal_webhook_targets_are_refused_at_create_and_update(tenant: Tenant, internal: Server) -> None:
    t = tenant
    port = internal.port
    targets = [f"http://127.0.0.1:{port}/hook", f"http://[::1]:{port}/hook", f"http://2130706433:{port}/hook",
               "http://169.254.169.254/latest/meta-data", f"http://localhost:{port}/hook", "file:///etc/passwd",
               f"http://[::ffff:127.0.0.1]:{port}/", "http://nats:4222/", "http://metadata.google.internal/"]
    path = f"/v2/apps/{t.app_id}/integrations"
    for target in targets:
        status, body = await t.request("POST", path, body={
            "type": "custom", "webhooks": [{"target": target, "triggers": ["conversation:message"]}]})
        if target.startswith("file:"):
            assert status == 400, body  # the http(s) check answers first
        else:
            assert _refused(status, body), (target, status, body)
    status, body = await t.request("POST", path, body={
        "type": "custom", "webhooks": [{"target": "https://hooks.example.com/threadline",
                                        "triggers": ["conversation:message"]}]})
    assert status == 201, body
    integration_id = body["integration"]["id"]
    webhook_id = body["integration"]["webhooks"][0]["id"]
    status, body = await t.request("POST", f"{path}/{integration_id}/webhooks", body={
        "target": f"http://127.0.0.1:{port}/x", "triggers": ["conversation:message"]})
    assert _refused(status, body)
    status, body = await t.request("PATCH", f"{path}/{integration_id}/webhooks/{webhook_id}",
                                   body={"target": "http://169.254.169.254/"})
    assert _refused(status, body)
    _, body = await t.request("GET", f"{path}/{integration_id}/webhooks/{webhook_id}")
    assert body["webhook"]["target"] == "https://hooks.example.com/threadline"


async def test_a_stored_loopback_webhook_fails_permanently_without_a_request(system: System, bus: Bus) -> None:
    receiver = await Receiver().start()
    try:
        await system.start("webhooks", env={**FAST_RETRIES, **NO_EGRESS_ALLOW})
        app_id = new_id()
        hook = await put_webhook(bus, app_id, receiver.url)
        service = system.service("webhooks")
        await eventually(_async(lambda: service.webhook(app_id, hook.id) is not None))
        event = message_created(app_id, new_id(), "hello")
        await publish(bus, event)
        row = await settled_row(service.store, hook.id, event.id)
        assert row["status"] == "failed" and row["attempts"] == 1
        assert REFUSED_CODE in row["last_error"] and "loopback" in row["last_error"]
        assert receiver.requests == []
    finally:
        await receiver.stop()


async def test_a_name_that_resolves_inside_is_refused_at_connect_time(system: System, bus: Bus) -> None:
    """DNS the attacker controls answers 127.0.0.1 for a name that passed every static check."""
    receiver = await Receiver().start()
    try:
        await system.start("webhooks", env={**FAST_RETRIES, **NO_EGRESS_ALLOW})
        service = system.service("webhooks")
        rebinding = service.common.egress.http_session("business", resolver=StaticResolver("127.0.0.1"))
        await service.session.close()
        service.session = service.dispatcher.session = rebinding
        app_id = new_id()
        hook = await put_webhook(bus, app_id, f"http://hooks.customer.example:{receiver.port}/hook")
        await eventually(_async(lambda: service.webhook(app_id, hook.id) is not None))
        event = message_created(app_id, new_id(), "hello")
        await publish(bus, event)
        row = await settled_row(service.store, hook.id, event.id)
        assert row["status"] == "failed" and row["attempts"] == 1
        assert "hooks.customer.example resolves to 127.0.0.1, a loopback address" in row["last_error"]
        assert receiver.requests == []
    finally:
        await receiver.stop()


async def test_egress_session_checks_the_resolved_addresses_before_connecting() -> None:
    receiver = await Receiver().start()
    strict = EgressPolicy(allow_http=True).http_session("business", resolver=StaticResolver("127.0.0.1"))
    allowed = EgressPolicy(allow_http=True, rules=parse_rules(f"127.0.0.1:{receiver.port}")).http_session(
        "business", resolver=StaticResolver("127.0.0.1"))
    try:
        url = f"http://hooks.customer.example:{receiver.port}/hook"
        with pytest.raises(EgressRefused, match=r"resolves to 127\.0\.0\.1"):
            async with strict.post(url, data=b'{"events": []}'):
                pass
        assert receiver.requests == []
        # The operator allow-listed that address and port: the same answer is let through.
        async with allowed.post(url, data=b'{"events": []}') as response:
            assert response.status == 200
        assert len(receiver.requests) == 1
    finally:
        await strict.close()
        await allowed.close()
        await receiver.stop()


async def test_httpx_transport_checks_addresses_at_connect_time(internal: Server) -> None:
    async with httpx.AsyncClient(transport=EgressPolicy(allow_http=True).httpx_transport("platform")) as client:
        with pytest.raises(EgressRefused, match="loopback"):
            await client.get(f"{internal.origin}/latest/meta-data")
        # A name that does not resolve stays an ordinary (retryable) network error.
        with pytest.raises(httpx.ConnectError):
            await client.get("https://no-such-host.invalid/")
    assert internal.seen == []
    # A push integration whose token endpoint was stored inside: a failed push, never a crash.
    sender = FcmSender(sandbox_android_config(internal.origin), policy=EgressPolicy())
    try:
        outcome = await sender.send("device-token", PushMessage(title="Shop", body="hi"))
    finally:
        await sender.close()
    assert outcome.status == "failed" and outcome.code == REFUSED_CODE
    assert internal.seen == []


# --- (c) SMTP ------------------------------------------------------------------------------------------


async def test_internal_smtp_hosts_are_refused_at_create_and_send(tenant: Tenant) -> None:
    t = tenant
    path = f"/v2/apps/{t.app_id}/integrations"
    for host in ("127.0.0.1", "localhost", "10.0.0.5", "169.254.169.254", "2130706433", "[::1]", "mailhost",
                 "smtp.corp.internal"):
        status, body = await t.request("POST", path, body={
            "type": "mailgun", "smtpHost": host, "smtpPort": 2525, "security": "none",
            "fromAddress": "shop@example.com"})
        assert _refused(status, body), (host, status, body)
        assert "smtpHost" in body["errors"][0]["title"]
    status, body = await t.request("POST", path, body={
        "type": "mailgun", "smtpHost": "smtp.mailgun.org", "fromAddress": "shop@example.com"})
    assert status == 201, body
    status, body = await t.request("PATCH", f"{path}/{body['integration']['id']}", body={"smtpHost": "127.0.0.1"})
    assert _refused(status, body)

    # A record stored before the policy: the mail is refused before any connection is opened.
    connections: list[str] = []

    async def smtp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append("connected")
        writer.write(b"220 internal ESMTP\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(smtp, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for host in ("127.0.0.1", "localhost"):
            record = IntegrationRecord(id=new_id(), app_id=t.app_id, type="mailgun", config={
                "smtpHost": host, "smtpPort": port, "security": "none", "fromAddress": "shop@example.com"})
            with pytest.raises(EmailPermanentError, match="egress policy"):
                await send_email(record, "ada@example.com", "Hi", "text", policy=EgressPolicy())
        assert connections == []
    finally:
        server.close()
        await server.wait_closed()


# --- (d) redirects ----------------------------------------------------------------------------------


async def test_redirects_are_never_followed(system: System, bus: Bus, internal: Server) -> None:
    async def moved(_request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"{internal.origin}/steal")

    graph = await Server([web.post("/v23.0/{phone_number_id}/messages", moved), web.get("/{tail:.*}", moved)]).start()
    try:
        # All of loopback allowed: only the redirect rule keeps the message away from `internal`.
        await system.start("whatsapp", env={"THREADLINE_EGRESS_ALLOW": "127.0.0.0/8"})
        record = whatsapp_record(graph.origin)
        await put_integration(system, bus, record)
        send = OutboundSend(app_id=record.app_id, integration_id=record.id, channel="whatsapp",
                            conversation_id=new_id(), message_id=new_id(), user_id=new_id(), client_id=new_id(),
                            recipient="15551234567", recipient_info={"wa_id": "15551234567"},
                            content=TextContent(text="your order number is 4711"))
        await bus.publish(channel.subject_of(send), channel.encode(send))

        async def failed() -> DeliveryStatus | None:
            for status in await stream_messages(bus, subjects.STATUS):
                if isinstance(status, DeliveryStatus) and status.message_id == send.message_id:
                    return status
            return None

        status = await eventually(failed)
        assert status.status == "failed" and status.error_code == "http_307"
        assert [path for path, _ in graph.seen] == [f"/v23.0/{record.config['phoneNumberId']}/messages"]

        # Any egress session, credentialed: the 307 comes back as it is.
        session = system.service("whatsapp").common.egress.http_session("business")
        try:
            async with session.get(f"{graph.origin}/media", headers={"Authorization": "Bearer x"}) as response:
                assert response.status == 307
        finally:
            await session.close()
        assert internal.seen == []
    finally:
        await graph.stop()


def _async(check: Any) -> Any:
    async def probe() -> bool:
        return bool(check())

    return probe
