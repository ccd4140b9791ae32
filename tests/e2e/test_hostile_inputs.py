"""Hostile input on every public route never makes a 5xx.

The routes are read from the running services' routers (everything the front door routes to),
so a route added later is fuzzed without touching this test. Each route and method gets, over
real HTTP through the front door, both without credentials and (where the route has any) with
valid ones, so that the hostile part reaches the code behind the authentication:
non-ASCII and invalid UTF-8 in signature, auth headers and query tokens; JSON nested 2,000
levels in bodies, JWT headers and `?filter=`; invalid UTF-8 bodies; bodies over every limit;
wrong content types. JSON APIs must answer with SunCo's error body.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import aiohttp

from shared.http import basic_auth_header
from shared.routes import route_for
from shared.signing import META_SIGNATURE_HEADER, meta_signature
from shared.twilio_wire import SIGNATURE_HEADER as TWILIO_SIGNATURE_HEADER
from shared.twilio_wire import twilio_signature
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, SERVICE_ORDER, System, start_sdk_session
from threadline.bootstrap import AccountKey, bootstrap_sandbox, sandbox_integrations

DEPTH = 2000
NESTED = "[" * DEPTH + "]" * DEPTH
# A request line holds 8 KiB and the front door percent-encodes `[`: 1,250 levels fit, which is
# still past the 1,000 frames of Python's recursion limit.
QUERY_NESTED = "[" * 1250 + "]" * 1250
NESTED_OBJECT = '{"a":' * DEPTH + "1" + "}" * DEPTH
NON_ASCII = "é"
INVALID_UTF8 = b"\xff\xfe\xc3"
HUGE = 1_200_000  # over every body limit, the 1 MiB aiohttp default included
JSON_API_PREFIXES = ("/v2/", "/v1.1/", "/sdk/", "/app/")
TELEGRAM_SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Field names the bodies of the public routes read, so undecodable text reaches their code.
FIELDS = (b"type", b"text", b"displayName", b"externalId", b"code", b"linkCode", b"target", b"from", b"token")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Case:
    """One hostile request: what it is (for the failure list), headers, query and body."""

    label: str
    headers: dict[str, bytes] = field(default_factory=dict)
    query: str = ""
    body: bytes | None = None


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def raw_request(port: int, method: str, target: str, headers: dict[str, bytes], body: bytes | None) -> Reply:
    """One HTTP/1.1 request written byte for byte (no client library re-encodes the hostile parts)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = [f"{method} {target} HTTP/1.1".encode(), f"Host: 127.0.0.1:{port}".encode(), b"Connection: close"]
    head += [name.encode() + b": " + value for name, value in headers.items()]
    if body is not None:
        head.append(f"Content-Length: {len(body)}".encode())
    writer.write(b"\r\n".join(head) + b"\r\n\r\n")
    try:
        if body:
            writer.write(body)
        await writer.drain()
    except ConnectionError:
        pass  # refused early (413): the answer is still there to read
    data = await asyncio.wait_for(reader.read(), timeout=30)
    writer.close()
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    lines = head_bytes.split(b"\r\n")
    status = int(lines[0].split()[1])
    reply_headers = {}
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        reply_headers[name.strip().lower()] = value.strip()
    if reply_headers.get("transfer-encoding", "").lower() == "chunked":
        out = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        rest = out
    return Reply(status, reply_headers, rest)


@dataclass(frozen=True)
class PublicRoute:
    service: str
    method: str
    path: str  # the route's canonical path, with {placeholders}


def public_routes(system: System) -> list[PublicRoute]:
    """Every (method, route) of every running service that the front door routes to that service."""
    out = []
    for name, service in system.services.items():
        for resource in service.http.router.resources():
            canonical = resource.canonical
            example = re.sub(r"\{[^}]+\}", "x", canonical)
            route = route_for(example)
            if route is None or route.service != name:
                continue  # the service's own probes (/healthz, /readyz) are not behind the front door
            methods = {r.method for r in resource} - {"HEAD"}
            if "*" in methods:
                methods = (methods - {"*"}) | {"GET", "POST"}
            out += [PublicRoute(name, method, canonical) for method in sorted(methods)]
    return out


class Fixture:
    """The running system, the sandbox's credentials, and sessions for the SDK routes."""

    def __init__(self, system: System, info: dict[str, Any]) -> None:
        self.system = system
        self.info = info
        self.integrations: dict[str, dict[str, Any]] = info["integrations"]
        self.sessions: dict[str, dict[str, Any]] = {}

    def integration_kind(self, path: str) -> str:
        for kind in ("whatsapp", "messenger", "telegram", "twilio", "android", "ios"):
            if f"/{kind}" in path:
                return kind
        return "android" if path.startswith("/app/") else "web"

    def concrete(self, path: str) -> str:
        """The route's path with real ids (so requests get past 'not found' to the parsing)."""
        kind = self.integration_kind(path)
        session = self.sessions.get("app" if path.startswith("/app/") else "web", {})
        twilio = self.integrations["twilio"]
        values = {
            "appId": self.info["appId"], "app_id": self.info["appId"],
            "integrationId": self.integrations[kind]["id"], "integration_id": self.integrations[kind]["id"],
            "conversationId": session.get("conversationId", "0" * 24),
            "conversation_id": session.get("conversationId", "0" * 24),
            "userIdOrExternalId": session.get("appUserId", "0" * 24),
            "appUserId": session.get("appUserId", "0" * 24),
            "version": "v23.0", "phone_number_id": self.integrations["whatsapp"]["phoneNumberId"],
            "page_id": self.integrations["messenger"]["pageId"], "account_sid": twilio["accountSid"],
            "token": self.integrations["telegram"]["token"], "name": "threadline.js",
            "project_id": self.integrations["android"]["projectId"], "method": "sendMessage",
        }
        return re.sub(r"\{([^}:]+)(:[^}]*)?\}", lambda m: quote(str(values.get(m.group(1), "0" * 24)), safe=":"),
                      path)

    def credentials(self, path: str, body: bytes | None) -> dict[str, bytes]:
        """Valid credentials for this route and body, when the route has any."""
        if path.startswith(("/v2/", "/v1.1/")):
            return {"Authorization": basic_auth_header(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET)["Authorization"].encode()}
        if path.startswith(("/sdk/", "/app/")):
            session = self.sessions["app" if path.startswith("/app/") else "web"]
            return {"Authorization": f"Bearer {session['sessionToken']}".encode()}
        if path.startswith(("/webhooks/whatsapp/", "/webhooks/messenger/")):
            kind = "whatsapp" if "/whatsapp/" in path else "messenger"
            return {META_SIGNATURE_HEADER: meta_signature(self.integrations[kind]["appSecret"], body or b"").encode()}
        if path.startswith("/webhooks/telegram/"):
            telegram = self.system.service("telegram").credentials(self.integrations["telegram"]["id"])
            return {TELEGRAM_SECRET_HEADER: telegram.webhook_secret.encode()}
        if path.startswith("/webhooks/twilio/"):
            try:
                form = parse_qsl((body or b"").decode(), keep_blank_values=True)
            except UnicodeDecodeError:
                form = []
            url = self.system.base_url + path
            return {TWILIO_SIGNATURE_HEADER: twilio_signature(self.integrations["twilio"]["authToken"], url,
                                                              form).encode()}
        if path.startswith("/sandbox/graph/"):
            return {"Authorization": f"Bearer {self.integrations['whatsapp']['accessToken']}".encode()}
        if path.startswith("/sandbox/messenger-graph/"):
            return {"Authorization": f"Bearer {self.integrations['messenger']['pageAccessToken']}".encode()}
        if path.startswith("/sandbox/twilio-api/"):
            twilio = self.integrations["twilio"]
            return {"Authorization": basic_auth_header(twilio["accountSid"], twilio["authToken"])["Authorization"]
                    .encode()}
        return {}


def header_cases() -> list[Case]:
    """Hostile credentials and tokens (no valid ones): each must be refused with a 4xx."""
    nested_jwt = f"{_b64url(NESTED.encode())}.{_b64url(b'{}')}.c2ln"
    token_query = "&".join(f"{name}={quote(NON_ASCII)}" for name in
                           ("sig", "token", "code", "hub.verify_token", "threadline_code"))
    return [
        Case("non-ASCII bearer token and signatures", headers={
            "Authorization": f"Bearer abc.{NON_ASCII}".encode(),
            META_SIGNATURE_HEADER: f"sha256={NON_ASCII}".encode(),
            TELEGRAM_SECRET_HEADER: NON_ASCII.encode(),
            TWILIO_SIGNATURE_HEADER: NON_ASCII.encode(),
        }, query=token_query + "&hub.mode=subscribe&hub.challenge=1"),
        Case("invalid UTF-8 bearer token and signatures", headers={
            "Authorization": b"Bearer abc." + INVALID_UTF8,
            META_SIGNATURE_HEADER: b"sha256=" + INVALID_UTF8,
            TELEGRAM_SECRET_HEADER: INVALID_UTF8,
            TWILIO_SIGNATURE_HEADER: INVALID_UTF8,
        }, query="&".join(f"{name}=%FF%FE" for name in ("sig", "token", "code", "hub.verify_token"))),
        Case("non-ASCII basic credentials", headers={
            "Authorization": b"Basic " + base64.b64encode(f"{NON_ASCII}:{NON_ASCII}".encode())}),
        Case("invalid UTF-8 basic credentials", headers={"Authorization": b"Basic " + base64.b64encode(INVALID_UTF8)}),
        Case("JWT with a header nested 2,000 levels", headers={"Authorization": f"Bearer {nested_jwt}".encode()}),
        Case("session token nested 2,000 levels", headers={
            "Authorization": f"Bearer {_b64url(NESTED.encode())}.{NON_ASCII}".encode()},
             query=f"token={_b64url(NESTED.encode())}.x"),
    ]


def query_cases() -> list[Case]:
    """Hostile query objects (sent with valid credentials)."""
    return [
        Case("?filter= nested 2,000 levels", query=f"filter={QUERY_NESTED}"),
        Case("?page= nested 2,000 levels", query=f"page={QUERY_NESTED}"),
        Case("non-ASCII and invalid UTF-8 query", query=f"page[after]={quote(NON_ASCII)}&limit=%FF&after=%FF"),
    ]


def body_cases() -> list[tuple[str, bytes | None, bytes]]:
    """(label, content type, body) of hostile bodies (sent without and with valid credentials)."""
    return [
        ("JSON array nested 2,000 levels", b"application/json", NESTED.encode()),
        ("JSON object nested 2,000 levels", b"application/json", NESTED_OBJECT.encode()),
        ("invalid UTF-8 JSON", b"application/json", b"{" + b", ".join(
            b'"%s": "%s"' % (name, INVALID_UTF8) for name in FIELDS) + b"}"),
        ("lone surrogate escapes", b"application/json", b"{" + b", ".join(
            b'"%s": "\\udcff\\ud800"' % name for name in FIELDS) + b"}"),
        ("huge body", b"application/json", b'{"x": "' + b"a" * HUGE + b'"}'),
        ("text/plain", b"text/plain", b'{"text": "hi"}'),
        ("form with nested JSON", b"application/x-www-form-urlencoded",
         b"Body=" + NESTED.encode() + b"&content=" + NESTED_OBJECT.encode() + b"&x=%FF"),
        ("invalid UTF-8 form", b"application/x-www-form-urlencoded", b"Body=" + INVALID_UTF8),
        ("multipart", b"multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n"
         + INVALID_UTF8 + b"\r\n--b--\r\n"),
        ("no content type", None, NESTED.encode()),
    ]


def check(route: PublicRoute, path: str, label: str, reply: Reply, failures: list[str]) -> None:
    where = f"{route.method} {route.path} [{label}]"
    if reply.status >= 500:
        failures.append(f"{where}: {reply.status} {reply.body[:160]!r}")
        return
    if reply.status >= 400 and path.startswith(JSON_API_PREFIXES):
        try:
            doc = json.loads(reply.body)
            error = doc["errors"][0]
            assert isinstance(error["code"], str) and isinstance(error["title"], str)
        except (ValueError, KeyError, IndexError, TypeError, AssertionError):
            failures.append(f"{where}: {reply.status} without SunCo's error body: {reply.body[:160]!r}")


async def open_sessions(fixture: Fixture) -> None:
    """A web and an app session (started by a first message), so the SDK routes are fuzzed
    behind a valid token too."""
    async with aiohttp.ClientSession() as http:
        for kind, root in (("web", "sdk"), ("app", "app")):
            integration = fixture.integrations["web" if kind == "web" else "android"]["id"]
            fixture.sessions[kind] = await start_sdk_session(http, fixture.system.base_url, fixture.info["appId"],
                                                             integration, root=root)


async def test_no_public_route_answers_5xx_to_hostile_input(system: System, tmp_path: Path) -> None:
    await system.start(*SERVICE_ORDER)
    kinds = tuple(sandbox_integrations(system.base_url))
    info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                   str(tmp_path / "sandbox"), kinds=kinds)
    fixture = Fixture(system, info)
    await open_sessions(fixture)
    routes = public_routes(system)
    # Every service with public routes is covered (a router that stopped being enumerated fails here).
    assert {r.service for r in routes} == set(SERVICE_ORDER) - {"identity", "webhooks"}, routes
    assert len(routes) > 120
    port = system.frontdoor_port
    failures: list[str] = []
    for route in routes:
        path = fixture.concrete(route.path)
        # Every id in the path hostile (non-ASCII, undecodable), with and without credentials.
        hostile_path = re.sub(r"\{[^}]+\}", "%C3%A9%FF", route.path)
        if hostile_path != route.path:
            for creds in ({}, fixture.credentials(path, None)):
                reply = await raw_request(port, route.method, hostile_path, creds, None)
                check(route, hostile_path, f"hostile path ids{' (authenticated)' if creds else ''}", reply, failures)
        for case in header_cases():
            target = f"{path}?{case.query}" if case.query else path
            reply = await raw_request(port, route.method, target, case.headers, case.body)
            check(route, path, case.label, reply, failures)
        for label, ctype, body in body_cases():
            if route.method not in BODY_METHODS:
                continue
            base = {"Content-Type": ctype} if ctype else {}
            for authenticated in (False, True):
                if authenticated and route.method == "DELETE":
                    continue  # a valid DELETE would delete the fixture's app, key or integration
                creds = fixture.credentials(path, body) if authenticated else {}
                if authenticated and not creds:
                    continue
                reply = await raw_request(port, route.method, path, {**base, **creds}, body)
                check(route, path, f"{label}{' (authenticated)' if authenticated else ''}", reply, failures)
        if route.method == "GET":
            for case in query_cases():
                creds = fixture.credentials(path, None)
                reply = await raw_request(port, route.method, f"{path}?{case.query}", creds, None)
                check(route, path, f"{case.label} (authenticated)", reply, failures)
    assert not failures, "\n".join(failures)
    # The system is still whole afterwards.
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{system.base_url}/healthz") as resp:
            assert resp.status == 200, await resp.text()
