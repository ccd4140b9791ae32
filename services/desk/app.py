"""Wiring of the `desk` service: the agent desk at `/desk/`.

- a durable consumer on the desk's copies of the events (`events.desk.>`: those that concern the
  desk, published by `conversations`) follows the switchboard and the messages of the conversations
  the desk controls (`handlers.Desk.handle_event`), and routes them to agents;
- `/desk/api/v1/…` serves signed-in agents (sessions, CSRF), and `desk.api` the business's REST
  calls that `conversations` forwards (`api.py`);
- `/desk/api/v1/socket` is each open desk's live feed (`desk.updates.<app>` on core NATS, so a
  change made by any replica reaches every replica's sockets) and its heartbeat (presence);
- a sweeper takes agents silent past the grace period offline (their conversations back to the
  queue) and wakes snoozed conversations.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import ipaddress
import logging
import os
import secrets
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgspec
import nats.errors
import nats.js.errors
from aiohttp import WSMsgType, web
from nats.aio.msg import Msg
from yarl import URL

from shared import metrics, records, subjects
from shared.bus import Bus, Delivery, KvMirror, RequestFailed
from shared.clientip import client_ip, source_key
from shared.egress import EgressPolicy, EgressRefused, EgressSession
from shared.encryption import Keyring
from shared.http import ApiError, basic_auth_header, error_middleware, json_response, read_json, tracing_middleware
from shared.ids import new_id, parse_iso
from shared.messages import conversation as conv
from shared.messages import desk as msgs
from shared.messages import handoff, notification
from shared.messages import identity as ident
from shared.ratelimit import SharedLimiter
from shared.service import ServiceApp
from shared.telemetry import setup_telemetry
from shared.untrusted import decode_json

from . import auth, sso
from .api import API_PREFIX, OPERATIONS, DeskApi, answer_call, http_handler
from .config import DeskConfig
from .context import CONTEXT_TIMEOUT, fetch_cards
from .handlers import DESK_TYPE, Actor, Desk, Snapshot, Update, agent_out
from .store import AgentRow, Store

log = logging.getLogger(__name__)

# The desk's copies of conversation events reach people (agents' screens, routing to a free
# agent), for whom 25 ms more is nothing: its consumer takes bigger batches than the bus's default
# pause gives. At 500 msg/s offered with the desk following every conversation (`bench/e2e.py
# --desk --rate 500`), its CPU per message went from 417–427 to 283–303 µs.
EVENTS_PULL_PAUSE_SECONDS = 0.025

T = TypeVar("T")

SESSION_PATH = API_PREFIX + "/session"
SSO_START_PATH = API_PREFIX + "/sso/start"
SSO_CALLBACK_PATH = API_PREFIX + "/sso/callback"
SSO_TIMEOUT = aiohttp.ClientTimeout(total=5.0)
SSO_MAX_DOCUMENT = 256 * 1024
SSO_COOKIE_SECONDS = 600
DEMO_SESSION_PATH = API_PREFIX + "/session/demo"
STATIC_DIR = Path(__file__).parent / "static"
# The desk page: scripts and styles from this origin only, nothing inline, never framed.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
                               " connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin", "Cache-Control": "no-cache",
    "X-Frame-Options": "DENY",
}
SOCKET_PATH = API_PREFIX + "/socket"
# A desk's socket heartbeat is written at most this often per agent (a write per beat of every
# open tab would be needless load).
SEEN_WRITE_INTERVAL = 10.0
# How often open sockets are checked: their session (signed out, expired), their agent (disabled,
# removed); the desk page beats every 20 s.
SOCKET_SESSION_CHECK = 15.0
CONVERSATIONS_TIMEOUT = 10.0
# A socket that takes longer than this to accept one update is closed (its desk reconnects).
SOCKET_SEND_TIMEOUT = 2.0
# Open desk sockets one agent may hold (tabs, windows) on one replica.
MAX_SOCKETS_PER_AGENT = 8
# What a desk socket carries for the periodic checks.
SOCKET_AGENT = web.ResponseKey("desk_agent", str)
SOCKET_SESSION = web.ResponseKey("desk_session", str)
SOCKET_BEAT = web.ResponseKey("desk_beat", float)
_UPDATE_ENCODER = msgspec.json.Encoder()


class LoginBody(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    app_id: str
    email: str
    password: str


class DemoLoginBody(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    app_id: str


# What a request to another service may fail with (it then cannot answer now).
PEER_FAILURES = (TimeoutError, nats.errors.Error, RequestFailed, msgspec.DecodeError, msgspec.ValidationError)


class NatsConversations:
    """The services the desk asks over NATS: conversations (`conversations.desk`, history,
    participants), identity, handoff and notifications."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def _call(self, subject: str, data: bytes, decode: Callable[[bytes], T], unavailable: str) -> T:
        """A request's decoded answer; ApiError(503, `unavailable`) when the service cannot answer."""
        try:
            return decode(await self.bus.request(subject, data, timeout=CONVERSATIONS_TIMEOUT))
        except PEER_FAILURES as exc:
            raise ApiError(503, unavailable) from exc

    async def _ask(self, request: msgs.DeskRequest) -> msgs.DeskDone:
        reply = await self._call(subjects.CONVERSATIONS_DESK, msgs.encode(request), msgs.REPLY_DECODER.decode,
                                 "Conversations are unavailable right now, try again")
        if isinstance(reply, msgs.DeskRefused):
            raise ApiError(reply.status, reply.title, reply.code)
        return reply

    async def create_channel(self, app_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """Add a channel (the REST API's integration body); the integration as the API shows it."""
        done = await self._ask(msgs.CreateChannel(app_id=app_id, conversation_id="", body=body))
        return done.integration or {}

    async def delete_channel(self, app_id: str, integration_id: str) -> None:
        """Remove a channel."""
        await self._ask(msgs.DeleteChannel(app_id=app_id, conversation_id="", integration_id=integration_id))

    async def search(self, app_id: str, query: str) -> tuple[list[str], list[str]]:
        """(conversations whose messages hold `query`, users it names) from conversations and identity."""
        done = await self._ask(msgs.SearchMessages(app_id=app_id, conversation_id="", query=query))
        reply = await self._call(subjects.IDENTITY_USERS_SEARCH, ident.encode(ident.SearchUsers(
            app_id=app_id, query=query)), ident.decode, "Customers cannot be searched right now, try again")
        return done.conversation_ids or [], reply.user_ids if isinstance(reply, ident.UserIds) else []

    async def similar_users(self, app_id: str, user_id: str) -> list[ident.SimilarUser]:
        """Other users who may be this customer (the same number or address); [] when unknown."""
        try:
            reply = await self._call(subjects.IDENTITY_USERS_SIMILAR, ident.encode(ident.FindSimilarUsers(
                app_id=app_id, user_id=user_id)), ident.decode, "identity unavailable")
        except ApiError as exc:
            log.info("similar users of %s unavailable: %s", user_id, exc.__cause__)
            return []
        return reply.users if isinstance(reply, ident.SimilarUsers) else []

    async def opt_ins(self, app_id: str, user_id: str) -> list[dict[str, Any]]:
        """Where the customer asked to be notified when away (addresses masked); [] when unknown."""
        try:
            reply = await self._call(subjects.NOTIFICATIONS_OPTIN_LIST, notification.ENCODER.encode(
                notification.ListOptIns(app_id=app_id, user_id=user_id)), notification.decode, "unavailable")
        except ApiError as exc:
            log.info("opt-ins of %s unavailable: %s", user_id, exc.__cause__)
            return []
        if not isinstance(reply, notification.OptInsReply):
            return []
        return [{"channel": o.channel, "maskedAddress": o.masked_address, "status": o.status} for o in reply.opt_ins]

    async def webhook_seen(self, integration_ids: list[str]) -> dict[str, float]:
        """When each integration's platform webhook last brought something in (absent: never seen)."""
        seen: dict[str, float] = {}
        try:
            kv = await self.bus.js.key_value(subjects.WEBHOOKS_SEEN_BUCKET)
        except (nats.js.errors.BucketNotFoundError, nats.errors.Error, TimeoutError):
            return seen  # no webhook ever came in
        for integration_id in integration_ids:
            with contextlib.suppress(nats.js.errors.KeyNotFoundError, nats.errors.Error, TimeoutError, ValueError):
                entry = await kv.get(integration_id)
                if entry.value:
                    seen[integration_id] = float(entry.value)
        return seen

    async def post_activity(self, request: msgs.PostAgentActivity) -> None:
        """Show an agent's typing or read to the customer."""
        await self._ask(request)

    async def post_message(self, request: msgs.PostAgentMessage) -> dict[str, Any] | None:
        """Post an agent's message; the message as stored."""
        return (await self._ask(request)).message

    async def snapshot(self, app_id: str, conversation_id: str) -> Snapshot:
        """The conversation's first participant, the type of their primary client, and the last message."""
        try:
            reply = await self._call(subjects.CONVERSATIONS_PARTICIPANTS, conv.ENCODER.encode(conv.GetParticipants(
                app_id=app_id, conversation_id=conversation_id)), conv.decode_request, "unavailable")
            page = await self._call(subjects.CONVERSATIONS_HISTORY, conv.ENCODER.encode(conv.GetHistory(
                app_id=app_id, conversation_id=conversation_id, limit=1)), conv.decode_request, "unavailable")
        except ApiError as exc:
            log.warning("conversation %s unavailable: %s", conversation_id, exc.__cause__)
            return Snapshot()
        last = page.messages[-1].message if isinstance(page, conv.HistoryPage) and page.messages else None
        last_at = parse_iso(last.received) if last is not None else None
        if not isinstance(reply, conv.ParticipantsReply) or not reply.participants:
            return Snapshot(last_message=last, last_message_at=last_at)
        participant = reply.participants[0]
        primary = participant.clients[0] if participant.clients else None
        return Snapshot(user_id=participant.user_id, channel=None if primary is None else channel_name(primary),
                        last_message=last, last_message_at=last_at)

    async def history(self, app_id: str, conversation_id: str, limit: int) -> dict[str, Any]:
        """The latest `limit` messages of a conversation (oldest first) and its switchboard state."""
        reply = await self._call(subjects.CONVERSATIONS_HISTORY, conv.ENCODER.encode(conv.GetHistory(
            app_id=app_id, conversation_id=conversation_id, limit=limit)), conv.decode_request,
            "Conversations are unavailable right now, try again")
        if isinstance(reply, conv.ConversationError):
            raise ApiError(reply.status, reply.title, reply.code)
        if not isinstance(reply, conv.HistoryPage):
            raise ApiError(502, "Unexpected answer from conversations")
        return {"conversation": msgspec.to_builtins(reply.conversation), "hasMore": reply.has_more,
                "messages": [{"cursor": m.cursor, "message": msgspec.to_builtins(m.message)} for m in reply.messages]}

    async def profile(self, app_id: str, user_id: str) -> dict[str, Any] | None:
        """The customer's profile and every channel identity (None: the user is gone)."""
        reply = await self._call(subjects.IDENTITY_CLIENTS_LIST, ident.encode(ident.ListClients(
            app_id=app_id, user_id_or_external_id=user_id)), ident.decode,
            "Identities are unavailable right now, try again")
        if not isinstance(reply, ident.ClientsReply):
            return None
        return {"user": msgspec.to_builtins(reply.user), "clients": msgspec.to_builtins(reply.clients)}

    async def issue_link(self, app_id: str, user_id: str, conversation_id: str, integration_id: str) -> str:
        """A handoff link that brings the customer to `integration_id`'s channel in this conversation."""
        answer = await self._call(subjects.HANDOFF_ISSUE, handoff.encode(handoff.IssueLinks(
            app_id=app_id, user_id=user_id, conversation_id=conversation_id, integration_ids=[integration_id])),
            handoff.decode, "Handoff is unavailable right now, try again")
        if isinstance(answer, handoff.HandoffError):
            raise ApiError(answer.status, answer.title, answer.code)
        if not isinstance(answer, handoff.LinksIssued) or not answer.links:
            raise ApiError(502, "Unexpected answer from handoff")
        return answer.links[0].url

    async def switchboard(self, app_id: str, conversation_id: str, action: str,
                          metadata: dict[str, Any] | None = None, target: str | None = None) -> None:
        """Move control (the desk's own actions): a release only while the desk holds the
        conversation (a bot that took it back keeps it), a pass to `target`."""
        try:
            await self._ask(msgs.MoveControl(
                app_id=app_id, conversation_id=conversation_id, action=action,  # type: ignore[arg-type]
                metadata=metadata, switchboard_integration=target, only_from_desk=action == "releaseControl"))
        except ApiError as exc:
            # Control already moved elsewhere (a bot took it back): the desk's part is over anyway.
            log.info("switchboard %s on %s refused: %s", action, conversation_id, exc.title)


class AppMembers:
    """Switchboard members from the apps mirror, read from the bucket itself when the mirror does
    not know a member yet (a desk member added a moment ago must not make its first conversation
    look like one leaving the desk)."""

    def __init__(self, bus: Bus, apps: KvMirror) -> None:
        self.bus = bus
        self.apps = apps

    def _record(self, app_id: str) -> records.AppRecord | None:
        record = self.apps.get(app_id)
        return record if isinstance(record, records.AppRecord) else None

    async def member_type(self, app_id: str, member_id: str) -> str | None:
        record = self._record(app_id)
        member = record.switchboard.integration(member_id) if record and record.switchboard else None
        if member is None:
            try:
                entry = await (await self.bus.key_value(subjects.APPS_BUCKET)).get(app_id)
                fresh = records.APP_DECODER.decode(entry.value) if entry.value else None
            except (nats.js.errors.KeyNotFoundError, nats.errors.Error, TimeoutError, msgspec.DecodeError,
                    msgspec.ValidationError):
                fresh = None
            member = fresh.switchboard.integration(member_id) if fresh and fresh.switchboard else None
        return None if member is None else member.integration_type

    def has_desk(self, app_id: str) -> bool:
        record = self._record(app_id)
        return bool(record and record.switchboard and record.switchboard.has_member_of_type(DESK_TYPE))


def channel_name(client: conv.ParticipantClient) -> str:
    """A client's channel as the desk shows it (an SDK client: web, android or ios)."""
    if client.type == "sdk":
        platform = client.info.get("platform") if isinstance(client.info, dict) else None
        return platform if platform in ("android", "ios") else "web"
    return client.type


class BusinessContext:
    """The context panel of each app: its settings in the store (the secret sealed), its calls
    through the egress policy (`context.fetch_cards`)."""

    def __init__(self, store: Store, keyring: Keyring, egress: EgressPolicy, session: EgressSession,
                 sso: SingleSignOn) -> None:
        self.store = store
        self.keyring = keyring
        self.egress = egress
        self.session = session
        self.sso = sso

    def _open(self, app_id: str, sealed: str | None) -> str | None:
        return None if sealed is None else self.keyring.open(sealed, f"desk-context:{app_id}")

    async def settings(self, app_id: str) -> tuple[str | None, str | None]:
        url, sealed = await self.store.app_settings(app_id)
        return url, self._open(app_id, sealed)

    async def configure(self, app_id: str, url: str | None, *, rotate: bool) -> tuple[str | None, str | None]:
        if url is not None:
            if len(url) > 2048:
                raise ApiError(400, "contextUrl is too long")
            try:
                self.egress.check_url(url, purpose="business")
            except EgressRefused as exc:
                raise ApiError(400, f"contextUrl: {exc}") from None
        current_url, sealed = await self.store.app_settings(app_id)
        del current_url
        secret = self._open(app_id, sealed)
        if secret is None or rotate:
            secret = secrets.token_urlsafe(32)
        await self.store.set_app_settings(app_id, url, self.keyring.seal(secret, f"desk-context:{app_id}"),
                                          time.time())
        return url, secret

    async def sso_settings(self, app_id: str) -> dict[str, Any] | None:
        return await self.sso.settings(app_id)

    async def configure_sso(self, app_id: str, issuer: str | None, client_id: str | None,
                            client_secret: str | None) -> dict[str, Any] | None:
        return await self.sso.configure(app_id, issuer, client_id, client_secret)

    async def cards(self, app_id: str, user_id: str, external_id: str | None,
                    conversation_id: str) -> tuple[list[dict[str, Any]], str | None]:
        url, secret = await self.settings(app_id)
        if not url or not secret:
            return [], None
        return await fetch_cards(self.session, url, secret, app_id=app_id, user_id=user_id, external_id=external_id,
                                 conversation_id=conversation_id)


class SingleSignOn:
    """OpenID Connect sign-in per app (`sso.py` has the flow and its checks): the provider's settings
    in the store (the client secret sealed), its discovery document and keys read through the
    egress policy and kept a few minutes."""

    cache_seconds = 300.0

    def __init__(self, store: Store, keyring: Keyring, egress: EgressPolicy, session: EgressSession,
                 public_base_url: str) -> None:
        self.store = store
        self.keyring = keyring
        self.egress = egress
        self.session = session
        self.redirect_uri = public_base_url + SSO_CALLBACK_PATH
        self._documents: dict[str, tuple[float, Any]] = {}

    async def settings(self, app_id: str) -> dict[str, Any] | None:
        found = await self.store.sso_settings(app_id)
        if found is None:
            return None
        return {"issuer": found[0], "clientId": found[1], "redirectUri": self.redirect_uri}

    async def configure(self, app_id: str, issuer: str | None, client_id: str | None,
                        client_secret: str | None) -> dict[str, Any] | None:
        if issuer is None:
            await self.store.set_sso_settings(app_id, None, time.time())
            return None
        if not client_id or len(client_id) > 256 or len(issuer) > 512:
            raise ApiError(400, "sso needs issuer and clientId (and clientSecret the first time)")
        try:
            self.egress.check_url(issuer, purpose="business")
        except EgressRefused as exc:
            raise ApiError(400, f"sso.issuer: {exc}") from None
        current = await self.store.sso_settings(app_id)
        sealed = current[2] if current is not None and client_secret is None else None
        if sealed is None:
            if not client_secret or len(client_secret) > 512:
                raise ApiError(400, "sso.clientSecret is required")
            sealed = self.keyring.seal(client_secret, f"desk-sso:{app_id}")
        await self.store.set_sso_settings(app_id, (issuer.rstrip("/"), client_id, sealed), time.time())
        return await self.settings(app_id)

    async def _json(self, url: str) -> Any:
        cached = self._documents.get(url)
        if cached is not None and time.monotonic() - cached[0] < self.cache_seconds:
            return cached[1]
        try:
            async with self.session.get(url, allow_redirects=False, timeout=SSO_TIMEOUT) as resp:
                if resp.status != 200:
                    raise sso.SsoError(f"the provider answered {resp.status} for {URL(url).path}")
                document = decode_json(await resp.content.read(SSO_MAX_DOCUMENT))
        except (EgressRefused, aiohttp.ClientError, TimeoutError, msgspec.DecodeError) as exc:
            raise sso.SsoError(f"the provider could not be reached ({type(exc).__name__})") from exc
        self._documents[url] = (time.monotonic(), document)
        return document

    async def _discovery(self, issuer: str) -> sso.Discovery:
        try:
            found = msgspec.convert(await self._json(issuer + "/.well-known/openid-configuration"), sso.Discovery)
        except msgspec.ValidationError as exc:
            raise sso.SsoError("the provider's discovery document is incomplete") from exc
        if found.issuer.rstrip("/") != issuer:
            raise sso.SsoError("the provider's discovery document names another issuer")
        return found

    async def start(self, app_id: str) -> tuple[str, str]:
        """Where to send the browser, and the state its cookie keeps."""
        found = await self.store.sso_settings(app_id)
        if found is None:
            raise sso.SsoError("single sign-on is not set up for this app")
        issuer, client_id, _ = found
        discovery = await self._discovery(issuer)
        pending = sso.new_pending()
        await self.store.put_sso_state(sso.state_hash(pending.state), app_id, pending.nonce, pending.verifier,
                                       time.time())
        return sso.authorization_url(discovery, client_id, self.redirect_uri, pending), pending.state

    async def finish(self, state: str, code: str) -> AgentRow:
        """The agent the provider vouches for, after every check (`sso.SsoError` otherwise)."""
        taken = await self.store.take_sso_state(sso.state_hash(state), time.time() - sso.STATE_TTL)
        if taken is None:
            raise sso.SsoError("this sign-in expired or was already used: start again")
        app_id, nonce, verifier = taken
        found = await self.store.sso_settings(app_id)
        if found is None:
            raise sso.SsoError("single sign-on is not set up for this app")
        issuer, client_id, sealed = found
        discovery = await self._discovery(issuer)
        secret = self.keyring.open(sealed, f"desk-sso:{app_id}")
        try:
            async with self.session.post(
                    discovery.token_endpoint, allow_redirects=False, timeout=SSO_TIMEOUT,
                    data={"grant_type": "authorization_code", "code": code, "redirect_uri": self.redirect_uri,
                          "code_verifier": verifier},
                    headers=basic_auth_header(client_id, secret)) as resp:
                body = await resp.content.read(SSO_MAX_DOCUMENT)
                if resp.status != 200:
                    raise sso.SsoError(f"the provider refused the code ({resp.status})")
            tokens = decode_json(body)
        except (EgressRefused, aiohttp.ClientError, TimeoutError, msgspec.DecodeError) as exc:
            raise sso.SsoError(f"the provider could not be reached ({type(exc).__name__})") from exc
        id_token = tokens.get("id_token") if isinstance(tokens, dict) else None
        if not isinstance(id_token, str):
            raise sso.SsoError("the provider sent no ID token")
        jwks = await self._json(discovery.jwks_uri)
        claims = sso.verify_id_token(id_token, jwks if isinstance(jwks, dict) else {}, issuer=discovery.issuer,
                                     client_id=client_id, nonce=nonce)
        agent = await self.store.agent_by_email(app_id, auth.normalize_email(claims["email"]))
        if agent is None or agent.disabled:
            raise sso.SsoError("no agent of this app has that e-mail address: an admin adds you first")
        return agent


class DeskService(ServiceApp):
    """Agents, teams, routing and the desk's API."""

    name = "desk"
    # Set by `start`, before NATS and HTTP serve (and released by `stop`, in the reverse order).
    store: Store
    bus: Bus
    desk: Desk
    api: DeskApi
    throttle: auth.SharedLoginThrottle

    def __init__(self, config: DeskConfig) -> None:
        super().__init__(config.common)
        self.config = config
        self.secure = auth.cookie_secure(config.common.public_base_url)
        self.csrf_key = config.keyring.derived("desk csrf")[0]
        self.kdf = auth.Kdf()
        self.http.middlewares.extend([
            tracing_middleware, error_middleware,
            auth.csrf_middleware(key=self.csrf_key, secure=self.secure,
                                 allowed_origins=[config.common.public_base_url],
                                 exempt_paths=[SESSION_PATH, DEMO_SESSION_PATH])])
        self.http.router.add_get("/desk", self.page_redirect)
        self.http.router.add_get("/desk/", self.page)
        self.http.router.add_static("/desk/static", STATIC_DIR, show_index=False, append_version=False)
        self.http.router.add_post(SESSION_PATH, self.sign_in)
        self.http.router.add_post(DEMO_SESSION_PATH, self.demo_sign_in)
        self.http.router.add_get(SSO_START_PATH, self.sso_start)
        self.http.router.add_get(SSO_CALLBACK_PATH, self.sso_callback)
        self.http.router.add_delete(SESSION_PATH, self.sign_out)
        self.http.router.add_get(SESSION_PATH, self.session_info)
        self.http.router.add_get(SOCKET_PATH, self.socket)
        self.add_database_check(lambda: self.store.db)
        self._sockets: dict[str, weakref.WeakSet[web.WebSocketResponse]] = {}
        self._seen_written: dict[str, float] = {}

    async def start(self) -> None:
        """Open the store, connect, consume events, serve NATS and HTTP, start the sweeper."""
        self.store = await Store.open(self.config.database)
        self.on_stop(self.store.close)
        self.bus = await self.connect_bus()
        apps = await self.mirror_bucket(self.bus, subjects.APPS_BUCKET, records.APP_DECODER.decode)
        integrations = await self.mirror_bucket(self.bus, subjects.INTEGRATIONS_BUCKET,
                                                records.integration_decoder(self.config.keyring))

        def channels(app_id: str) -> list[records.IntegrationRecord]:
            return sorted((record for record in integrations.values.values()
                           if isinstance(record, records.IntegrationRecord) and record.app_id == app_id),
                          key=lambda record: (record.type, record.id))
        throttle_kv = await self.bus.key_value(subjects.DESK_LOGIN_BUCKET, ttl=auth.THROTTLE_TTL_SECONDS,
                                               replicas=self.common.stream_replicas)
        self.throttle = auth.SharedLoginThrottle(throttle_kv, self.config.keyring.derived("desk login throttle")[0])
        self.limiter = SharedLimiter(throttle_kv, self.config.keyring.derived("desk login rate")[0])
        conversations = NatsConversations(self.bus)
        self.desk = Desk(self.store, conversations, self._publish_update, AppMembers(self.bus, apps),
                         default_capacity=self.config.default_capacity,
                         grace_seconds=self.config.presence_grace_seconds)
        self.sso = SingleSignOn(self.store, self.config.keyring, self.common.egress,
                                self.egress_session("business", timeout=SSO_TIMEOUT, limit=10),
                                self.common.public_base_url)
        context = BusinessContext(self.store, self.config.keyring, self.common.egress,
                                  self.egress_session("business", timeout=CONTEXT_TIMEOUT, limit=20), self.sso)
        self.api = DeskApi(self.desk, self.kdf, conversations, channels, self.common.public_base_url, context)
        for op in OPERATIONS:
            self.http.router.add_route(op.method, API_PREFIX + op.path, http_handler(self.api, op, self.actor))
        if self.config.demo_agent_email:
            apps.add_listener(lambda app_id, record: self.spawn(self._demo_agent(app_id, record), "desk:demo"))
            for app_id, record in list(apps.values.items()):
                await self._demo_agent(app_id, record)
        await self.bus.nc.subscribe(f"{subjects.DESK_UPDATES_PREFIX}.*", cb=self._on_update)
        await self.bus.consume(subjects.DESK_EVENTS, self._on_event, pause=EVENTS_PULL_PAUSE_SECONDS)
        await self.bus.serve(subjects.DESK_SERVICE, {subjects.DESK_API: self._answer_call})
        self.spawn(self._sweep_forever(), "desk:sweep")
        self.spawn(self._check_sockets_forever(), "desk:sockets")
        await self.start_http()

    # --- events and updates --------------------------------------------------------------------

    async def _on_event(self, data: bytes, _headers: Mapping[str, str], _delivery: Delivery) -> None:
        try:
            event = conv.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return  # an event type this version does not know: nothing for the desk
        await self.desk.handle_event(event)

    async def _publish_update(self, update: Update) -> None:
        with contextlib.suppress(nats.errors.Error):
            await self.bus.nc.publish(f"{subjects.DESK_UPDATES_PREFIX}.{update.app_id}", _UPDATE_ENCODER.encode(update))

    async def _on_update(self, msg: Msg) -> None:
        sockets = self._sockets.get(msg.subject.rsplit(".", 1)[-1])
        if not sockets:
            return
        text = msg.data.decode()  # as a desk replica published it (only they may: shared/natsauth.py)
        # Every socket at once, each within a bound: a desk that stopped reading is closed rather
        # than holding up the others (and every other app's updates behind this callback).
        await asyncio.gather(*(self._send(ws, text) for ws in list(sockets) if not ws.closed))

    async def _send(self, ws: web.WebSocketResponse, text: str) -> None:
        try:
            await asyncio.wait_for(ws.send_str(text), SOCKET_SEND_TIMEOUT)
        except (TimeoutError, ConnectionError, RuntimeError):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(code=1013, message=b"too slow"), 1.0)

    async def _answer_call(self, data: bytes, _headers: Mapping[str, str]) -> bytes:
        return await answer_call(self.api, data)

    async def _sweep_forever(self) -> None:
        last_prune = 0.0
        while True:
            await asyncio.sleep(self.config.sweep_seconds)
            try:
                await self.desk.sweep()
                if time.time() - last_prune > 3600:
                    await self.store.prune_sessions(time.time())
                    last_prune = time.time()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("desk sweep failed")

    async def _demo_agent(self, app_id: str, record: Any) -> None:
        """`make up`'s demo agent, an admin of every sandbox app (sandbox only, see the config)."""
        if not isinstance(record, records.AppRecord):
            return
        email = auth.normalize_email(self.config.demo_agent_email)
        if await self.store.agent_by_email(app_id, email) is not None:
            return
        agent = AgentRow(id=new_id(), app_id=app_id, email=email, display_name="Demo agent", role="admin",
                         password_hash=None,
                         capacity=self.config.default_capacity, presence="offline", skills=[], channels=[],
                         disabled=False, last_assigned_at=None, last_seen_at=None, created_at=time.time())
        async with self.store.transaction() as tx:
            await self.store.insert_agent(tx, agent)

    # --- sessions ------------------------------------------------------------------------------

    async def actor(self, request: web.Request) -> Actor:
        """The signed-in agent of a request (401 without a live session, 403 once disabled)."""
        record = await auth.current_session(request, self.store, secure=self.secure)
        agent = await self.store.agent(record.agent_id)
        if agent is None or agent.app_id != record.app_id:
            await self.store.delete_session(record.token_hash)
            raise ApiError(401, "Sign in to the desk")
        if agent.disabled:
            raise ApiError(403, "This agent account is disabled")
        await self._heard_from(agent)
        return Actor(app_id=agent.app_id, agent=agent, session_hash=record.token_hash)

    async def _heard_from(self, agent: AgentRow) -> None:
        now = time.time()
        if now - self._seen_written.get(agent.id, 0.0) >= SEEN_WRITE_INTERVAL:
            self._seen_written[agent.id] = now
            await self.desk.heard_from(agent)

    async def sign_in(self, request: web.Request) -> web.Response:
        """Password sign-in: throttled per account and per address, the session rotated."""
        body = await read_json(request, LoginBody)
        address = self.client_address(request)
        if (len(body.app_id) > 64 or len(body.email) > 254 or len(body.password) > auth.MAX_PASSWORD_LENGTH * 4
                or "\x00" in body.app_id + body.email + body.password):
            raise ApiError(400, "Invalid sign-in")
        try:
            # Every attempt per address first: it bounds the password hashing a flood can cost,
            # successful sign-ins included.
            limited = await self.limiter.take("desk-login", source_key(address or "unknown"),
                                              auth.LOGIN_ATTEMPT_RATES)
            if limited > 0:
                raise ApiError(429, "Too many sign-in attempts; wait and try again", "too_many_requests",
                               headers={"Retry-After": str(max(1, int(limited + 0.999)))})
            wait = await self.throttle.attempt(body.app_id, body.email, address)
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            raise ApiError(503, "Sign-in is unavailable right now, try again") from exc
        if wait > 0:
            raise ApiError(429, "Too many sign-in attempts; wait and try again", "too_many_requests",
                           headers={"Retry-After": str(max(1, int(wait + 0.999)))})
        agent = await self.store.agent_by_email(body.app_id, auth.normalize_email(body.email))
        usable = agent is not None and not agent.disabled
        if not await self.kdf.verify(agent.password_hash if usable and agent else None, body.password) or agent is None:
            raise ApiError(401, "Wrong e-mail or password", "unauthorized")
        with contextlib.suppress(TimeoutError, nats.errors.Error, nats.js.errors.Error):
            await self.throttle.succeeded(body.app_id, body.email, address)
        if agent.password_hash and auth.needs_rehash(agent.password_hash):
            rehashed = replace(agent, password_hash=await self.kdf.hash(body.password))
            async with self.store.transaction() as tx:
                await self.store.update_agent(tx, rehashed)  # an edit made meanwhile wins; the next sign-in rehashes
        return await self._signed_in(request, agent)

    async def demo_sign_in(self, request: web.Request) -> web.Response:
        """The sandbox's demo agent, signed in without a password (`make up`'s "Reply as the business"
        step): only when THREADLINE_DESK_DEMO_AGENT_* is set, which the config allows in the sandbox only."""
        if not self.config.demo_agent_email:
            raise ApiError(404, "Not found")
        address = self.client_address(request)
        if address is None or not ipaddress.ip_address(address).is_loopback:
            # `make up` may listen on every interface: the demo agent is for the person at the machine.
            raise ApiError(403, "The demo agent signs in from this machine only")
        body = await read_json(request, DemoLoginBody)
        agent = await self.store.agent_by_email(body.app_id[:64], auth.normalize_email(self.config.demo_agent_email))
        if agent is None or agent.disabled:
            raise ApiError(404, "No demo agent in this app")
        return await self._signed_in(request, agent)

    async def _signed_in(self, request: web.Request, agent: AgentRow) -> web.Response:
        token, record = await auth.rotate_session(
            self.store, auth.read_session_token(request, secure=self.secure), agent.id, agent.app_id, time.time(),
            self.config.session_idle_seconds, self.config.session_absolute_seconds)
        response = json_response({"agent": agent_out(agent), "csrfToken": auth.csrf_token(self.csrf_key, token)})
        response.headers["Cache-Control"] = "no-store"
        auth.set_session_cookie(response, token, record, secure=self.secure)
        return response

    async def page(self, _request: web.Request) -> web.FileResponse:
        """The desk's single page (it signs in, then drives the API and the socket)."""
        return web.FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    async def page_redirect(self, _request: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently("/desk/")

    def client_address(self, request: web.Request) -> str | None:
        """The client's address (X-Forwarded-For believed from trusted proxies only)."""
        return client_ip(request.remote, request.headers.getall("X-Forwarded-For", []), self.config.trusted_proxies)

    def _sso_cookie(self) -> str:
        return "__Host-tl_desk_sso" if self.secure else "tl_desk_sso"

    async def sso_start(self, request: web.Request) -> web.Response:
        """Off to the app's identity provider (the state kept in this browser's cookie)."""
        app_id = request.query.get("app", "")[:64]
        try:
            url, state = await self.sso.start(app_id)
        except sso.SsoError as exc:
            return _sso_page(400, str(exc))
        response = web.Response(status=302, headers={"Location": url, "Cache-Control": "no-store"})
        response.set_cookie(self._sso_cookie(), state, max_age=SSO_COOKIE_SECONDS, path="/", secure=self.secure,
                            httponly=True, samesite="Lax")
        return response

    async def sso_callback(self, request: web.Request) -> web.Response:
        """Back from the provider: every check of `SingleSignOn.finish`, then a session as after a
        password sign-in."""
        state, code = request.query.get("state", ""), request.query.get("code", "")
        if request.query.get("error"):
            return _sso_page(400, f"The identity provider said: {request.query.get('error', '')[:100]}")
        cookie = request.cookies.get(self._sso_cookie(), "")
        if not state or not code or len(code) > 4096 or not secrets.compare_digest(cookie.encode(), state.encode()):
            return _sso_page(400, "This sign-in was not started in this browser: start again")
        try:
            agent = await self.sso.finish(state, code)
        except sso.SsoError as exc:
            log.info("single sign-on refused: %s", exc)
            return _sso_page(403, str(exc))
        token, record = await auth.rotate_session(
            self.store, auth.read_session_token(request, secure=self.secure), agent.id, agent.app_id, time.time(),
            self.config.session_idle_seconds, self.config.session_absolute_seconds)
        response = web.Response(status=303, headers={"Location": "/desk/", "Cache-Control": "no-store"})
        auth.set_session_cookie(response, token, record, secure=self.secure)
        response.del_cookie(self._sso_cookie(), path="/", secure=self.secure, httponly=True, samesite="Lax")
        return response

    async def sign_out(self, request: web.Request) -> web.Response:
        """End the session (and clear the cookie)."""
        response = json_response({})
        await auth.end_session(request, response, self.store, secure=self.secure)
        return response

    async def session_info(self, request: web.Request) -> web.Response:
        """The signed-in agent and the CSRF token for this session (the desk page asks on load)."""
        actor = await self.actor(request)
        token = auth.read_session_token(request, secure=self.secure)
        assert actor.agent is not None and token is not None
        response = json_response({"agent": agent_out(actor.agent), "csrfToken": auth.csrf_token(self.csrf_key, token)})
        response.headers["Cache-Control"] = "no-store"
        return response

    # --- the live socket -----------------------------------------------------------------------

    async def socket(self, request: web.Request) -> web.WebSocketResponse:
        """An open desk's feed of its app's updates; its heartbeats keep the agent present. The
        session and the agent are checked again every `SOCKET_SESSION_CHECK` seconds whatever the
        client sends (`_check_sockets`): a signed-out, expired, disabled or deleted agent's feed ends."""
        actor = await self.actor(request)
        assert actor.agent is not None and actor.session_hash is not None
        sockets = self._sockets.setdefault(actor.app_id, weakref.WeakSet())
        if sum(1 for ws in sockets if ws.get(SOCKET_AGENT) == actor.agent.id) >= MAX_SOCKETS_PER_AGENT:
            raise ApiError(429, "Too many open desks for this agent", "too_many_requests")
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=4096)
        await ws.prepare(request)
        ws[SOCKET_AGENT], ws[SOCKET_SESSION], ws[SOCKET_BEAT] = actor.agent.id, actor.session_hash, time.time()
        sockets.add(ws)
        metrics.websocket_opened(self.name)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    ws[SOCKET_BEAT] = time.time()  # presence and the session's idle time follow it
        finally:
            sockets.discard(ws)
            if not sockets:
                self._sockets.pop(actor.app_id, None)
            metrics.websocket_closed(self.name)
        return ws

    async def _check_sockets_forever(self) -> None:
        while True:
            await asyncio.sleep(SOCKET_SESSION_CHECK)
            try:
                await self._check_sockets()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("desk socket check failed")

    async def _check_sockets(self) -> None:
        """Close the sockets whose session ended or whose agent was disabled or removed; keep the
        others' agents present and their sessions alive while their desk beats."""
        now = time.time()
        agents: dict[str, AgentRow | None] = {}
        for sockets in list(self._sockets.values()):
            for ws in list(sockets):
                if ws.closed:
                    continue
                record = await self.store.get_session(ws[SOCKET_SESSION])
                agent_id = ws[SOCKET_AGENT]
                if agent_id not in agents:
                    agents[agent_id] = await self.store.agent(agent_id)
                agent = agents[agent_id]
                if record is None or not auth.session_valid(record, now):
                    await ws.close(code=4401, message=b"session ended")
                elif agent is None or agent.disabled:
                    await ws.close(code=4403, message=b"agent removed")
                elif now - ws[SOCKET_BEAT] < SOCKET_SESSION_CHECK * 2:
                    if auth.session_needs_touch(record, now):
                        await self.store.touch_session(record.token_hash, now)
                    await self._heard_from(agent)
        self._seen_written = {agent_id: at for agent_id, at in self._seen_written.items()
                              if now - at < SEEN_WRITE_INTERVAL * 2}


def _sso_page(status: int, message: str) -> web.Response:
    """A plain page saying why single sign-on did not go through, with the way back."""
    body = ("<!doctype html><meta charset=utf-8><title>Sign-in failed</title>"
            "<body style=\"font-family:system-ui;max-width:32rem;margin:3rem auto\">"
            f"<h1>Sign-in failed</h1><p>{html.escape(message)}</p><p><a href=\"/desk/\">Back to the desk</a></p>")
    headers = {**PAGE_HEADERS, "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"}
    return web.Response(status=status, text=body, content_type="text/html", headers=headers)


def create(environ: Mapping[str, str] | None = None) -> DeskService:
    """The desk service, configured from `environ` (`os.environ` when None)."""
    setup_telemetry("desk")
    return DeskService(DeskConfig.from_env(os.environ if environ is None else environ))
