"""Wiring of the `web` service: SDK HTTP endpoints, the realtime socket, the widget's files.

One core NATS subscription on every conversation event per process (`EventHub`) fans events
out to the sockets of their conversation; a socket replays history from its `after` cursor
first, de-duplicating by cursor, so a reconnecting widget gets every missed message once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import msgspec
import nats.errors
import nats.js.errors
from aiohttp import WSCloseCode, WSMsgType, web
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind

from services.web import handlers
from services.web.config import WebConfig
from shared import subjects
from shared.bus import Bus, KvMirror, RequestFailed
from shared.http import ApiError, Handler, error_middleware, json_response, read_json, tracing_middleware
from shared.ids import new_id, now
from shared.messages import channel, identity
from shared.messages import conversation as conv
from shared.records import INTEGRATION_DECODER, IntegrationRecord
from shared.sdk import (
    HISTORY_PAGE_LIMIT,
    ErrorFrame,
    MessageAccepted,
    MessageFrame,
    PostActivity,
    PostMessage,
    ReadyFrame,
    SessionClaims,
    SessionCreated,
    encode_frame,
    ping_frame,
)
from shared.service import ServiceApp
from shared.telemetry import extract_context, setup_telemetry, tracer

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

STATIC_DIR = Path(__file__).parent / "static"
STATIC_TYPES = {".js": "application/javascript", ".css": "text/css", ".html": "text/html"}
SDK_PREFIX = "/sdk/v1/apps/{app_id}"
_KV_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Close codes a client should not retry with the same session (4000 + HTTP status).
SOCKET_CLOSE_BASE = 4000


class SocketListener:
    """A socket's bounded queue of (cursor, frame text) pushed by the hub."""

    __slots__ = ("overflowed", "queue")

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[tuple[int | None, str]] = asyncio.Queue(size)
        self.overflowed = False

    def offer(self, cursor: int | None, text: str) -> None:
        """Queue a frame without waiting; a full queue marks the socket for closing."""
        try:
            self.queue.put_nowait((cursor, text))
        except asyncio.QueueFull:
            self.overflowed = True


class EventHub:
    """One core NATS subscription on every conversation event, fanned out by conversation."""

    def __init__(self) -> None:
        self.listeners: dict[str, set[SocketListener]] = {}
        self._sub: Subscription | None = None

    async def start(self, nc: NatsClient) -> None:
        """Subscribe (core NATS: live events only; history fills the gaps)."""
        self._sub = await nc.subscribe(subjects.EVENTS_ALL, cb=self._on_message,
                                       pending_msgs_limit=100_000, pending_bytes_limit=128 * 1024 * 1024)

    async def stop(self) -> None:
        """Unsubscribe."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    def add(self, conversation_id: str, listener: SocketListener) -> None:
        """Start delivering the conversation's events to `listener`."""
        self.listeners.setdefault(conversation_id, set()).add(listener)

    def remove(self, conversation_id: str, listener: SocketListener) -> None:
        """Stop delivering to `listener`."""
        listeners = self.listeners.get(conversation_id)
        if listeners is not None:
            listeners.discard(listener)
            if not listeners:
                del self.listeners[conversation_id]

    async def _on_message(self, msg: Msg) -> None:
        # Route by subject first: events of conversations nobody watches here are not decoded.
        listeners = self.listeners.get(subjects.conversation_of_event_subject(msg.subject))
        if not listeners:
            return
        token = otel_context.attach(extract_context(msg.headers or {}))
        try:
            with _tracer.start_as_current_span("fanout events", kind=SpanKind.CONSUMER) as span:
                span.set_attribute("messaging.destination.name", msg.subject)
                span.set_attribute("threadline.sockets", len(listeners))
                try:
                    event = conv.decode(msg.data)
                except (msgspec.ValidationError, msgspec.DecodeError):
                    log.warning("undecodable event on %s", msg.subject)
                    return
                frame = handlers.event_frame(event)
                if frame is None:
                    return
                text = encode_frame(frame)
                cursor = frame.cursor if isinstance(frame, MessageFrame) else None
                for listener in list(listeners):
                    listener.offer(cursor, text)
        finally:
            otel_context.detach(token)


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """CORS for the widget, which runs on the customer's site: echo the Origin, answer preflights.

    Which origins may use an integration is decided per request (`originWhitelist`).
    """
    origin = request.headers.get("Origin")
    if request.method == "OPTIONS" and request.path.startswith("/sdk/"):
        response: web.StreamResponse = web.Response(status=204)
    else:
        response = await handler(request)
    if origin and (request.path.startswith("/sdk/") or request.path.startswith("/widget/")):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
        if request.method == "OPTIONS":
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Max-Age"] = "600"
    return response


class WebService(ServiceApp):
    """The web messenger's SDK API and realtime socket."""

    name = "web"

    def __init__(self, config: WebConfig) -> None:
        super().__init__(config.common)
        self.config = config
        self.bus: Bus | None = None
        self.integrations: KvMirror | None = None
        self.hub = EventHub()
        self.sockets: set[web.WebSocketResponse] = set()
        self._static: dict[str, tuple[bytes, str]] = {}
        self._monitor: asyncio.Task[None] | None = None
        self.http.middlewares.extend([tracing_middleware, cors_middleware, error_middleware])
        r = self.http.router
        r.add_post(SDK_PREFIX + "/integrations/{integration_id}/sessions", self.create_session)
        r.add_get(SDK_PREFIX + "/integrations/{integration_id}/config", self.get_config)
        r.add_get(SDK_PREFIX + "/conversations/{conversation_id}/messages", self.get_messages)
        r.add_post(SDK_PREFIX + "/conversations/{conversation_id}/messages", self.post_message)
        r.add_post(SDK_PREFIX + "/conversations/{conversation_id}/activity", self.post_activity)
        r.add_get(SDK_PREFIX + "/conversations/{conversation_id}/socket", self.socket)
        r.add_get("/widget/{name}", self.widget_file)

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the bus, mirror integrations, subscribe to events, serve HTTP."""
        self._static = _load_static()
        self.bus = await self.connect_bus()
        self.integrations = await self.mirror_bucket(self.bus, subjects.INTEGRATIONS_BUCKET,
                                                     INTEGRATION_DECODER.decode)
        await self.hub.start(self.bus.nc)
        self._monitor = asyncio.create_task(self._watch_reconnects(self.bus.nc), name="web:reconnects")
        await self.start_http()

    async def stop(self) -> None:
        """Close sockets (clients resume by cursor elsewhere), stop HTTP, then the bus."""
        await self.close_sockets(WSCloseCode.SERVICE_RESTART, b"service restarting")
        await self.stop_http()
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await self.hub.stop()
        if self.integrations is not None:
            await self.integrations.stop()
        if self.bus is not None:
            await self.bus.close()

    async def close_sockets(self, code: int, message: bytes) -> None:
        """Close every open socket (their clients reconnect and resume from their cursor)."""
        sockets = list(self.sockets)
        await asyncio.gather(*(ws.close(code=code, message=message) for ws in sockets),
                             return_exceptions=True)

    async def _watch_reconnects(self, nc: NatsClient) -> None:
        # Core NATS drops what is published while disconnected: after a reconnect, every
        # socket is closed so that its client resumes from its cursor through history.
        seen = nc.stats["reconnects"]
        while True:
            await asyncio.sleep(1.0)
            if nc.stats["reconnects"] != seen:
                seen = nc.stats["reconnects"]
                log.warning("nats reconnected: closing %d sockets so they resync", len(self.sockets))
                await self.close_sockets(WSCloseCode.TRY_AGAIN_LATER, b"resync")

    # --- bus helpers --------------------------------------------------------------------------

    def _bus(self) -> Bus:
        if self.bus is None:
            raise ApiError(503, "Not connected")
        return self.bus

    async def _ask(self, subject: str, data: bytes, service: str) -> bytes:
        try:
            return await self._bus().request(subject, data, timeout=self.config.request_timeout)
        except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise ApiError(503, f"{service} is unavailable, try again") from exc
        except RequestFailed as exc:
            log.warning("%s failed: %s", subject, exc)
            raise ApiError(503, f"{service} failed, try again") from exc
        except nats.errors.Error as exc:
            raise ApiError(503, "Message bus unavailable, try again") from exc

    async def integration(self, integration_id: str) -> IntegrationRecord | None:
        """The integration record: from the mirror, else (just created?) from the bucket itself."""
        if self.integrations is not None:
            record = self.integrations.get(integration_id)
            if record is not None:
                return record  # type: ignore[no-any-return]
        if not _KV_KEY.match(integration_id):
            return None
        try:
            kv = await self._bus().key_value(subjects.INTEGRATIONS_BUCKET)
            entry = await kv.get(integration_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            raise ApiError(503, "Message bus unavailable, try again") from exc
        if not entry.value:
            return None
        try:
            return INTEGRATION_DECODER.decode(entry.value)
        except msgspec.ValidationError:
            return None

    async def history(self, claims: SessionClaims, conversation_id: str, after: int | None,
                      limit: int) -> conv.HistoryPage:
        """A page of the conversation's history, as its participant `claims.user` may read it."""
        request = conv.GetHistory(app_id=claims.app, conversation_id=conversation_id, user_id=claims.user,
                                  after=after, limit=limit)
        reply = handlers.conversation_reply(
            await self._ask(subjects.CONVERSATIONS_HISTORY, conv.ENCODER.encode(request), "conversations"))
        if not isinstance(reply, conv.HistoryPage):
            raise ApiError(503, "Unexpected answer from conversations")
        return reply

    async def authorize(self, request: web.Request, token: str | None) -> tuple[SessionClaims, str]:
        """The session and the conversation of the path, which the session's user may access."""
        app_id = request.match_info["app_id"]
        claims = handlers.authenticate(self.config.sdk_token_secret, token, app_id)
        try:
            record = handlers.web_integration(await self.integration(claims.integration), app_id)
        except ApiError as exc:
            raise ApiError(401, "Invalid session token (integration removed)") from exc
        handlers.check_origin(record, request.headers.get("Origin"))
        conversation_id = request.match_info["conversation_id"]
        if conversation_id != claims.conversation:
            # Not the session's own conversation: `conversations` knows whether the user is in it.
            try:
                await self.history(claims, conversation_id, None, 1)
            except ApiError as exc:
                if exc.status >= 500:
                    raise
                raise ApiError(404, "Conversation not found") from exc
        return claims, conversation_id

    # --- HTTP endpoints -----------------------------------------------------------------------

    async def create_session(self, request: web.Request) -> web.Response:
        """A new anonymous user with an `sdk` client, and their conversation."""
        app_id = request.match_info["app_id"]
        integration_id = request.match_info["integration_id"]
        record = handlers.web_integration(await self.integration(integration_id), app_id)
        handlers.check_origin(record, request.headers.get("Origin"))
        channel_user_id = new_id()
        info = {key: value[:512] for key, value in (
            ("origin", request.headers.get("Origin")),
            ("userAgent", request.headers.get("User-Agent")),
            ("browserLanguage", request.headers.get("Accept-Language")),
        ) if value}
        resolve = identity.ResolveClient(app_id=app_id, integration_id=integration_id, client_type="sdk",
                                         channel_user_id=channel_user_id, info=info)
        try:
            resolved = identity.decode(await self._ask(subjects.IDENTITY_RESOLVE, identity.encode(resolve), "identity"))
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ApiError(503, "Unexpected answer from identity") from exc
        if isinstance(resolved, identity.IdentityError):
            raise ApiError(resolved.status, resolved.title, resolved.code)
        if not isinstance(resolved, identity.Resolved):
            raise ApiError(503, "Unexpected answer from identity")
        start = conv.StartConversation(app_id=app_id, integration_id=integration_id, user_id=resolved.user.id,
                                       client_id=resolved.client.id)
        started = handlers.conversation_reply(
            await self._ask(subjects.CONVERSATIONS_START, conv.ENCODER.encode(start), "conversations"))
        if not isinstance(started, conv.ConversationStarted):
            raise ApiError(503, "Unexpected answer from conversations")
        claims = SessionClaims(app=app_id, user=resolved.user.id, client=resolved.client.id,
                               integration=integration_id, channel_user_id=channel_user_id,
                               conversation=started.conversation.id)
        return json_response(SessionCreated(
            app_user_id=claims.user, client_id=claims.client, conversation_id=claims.conversation,
            session_token=claims.to_token(self.config.sdk_token_secret),
        ), status=201)

    async def get_config(self, request: web.Request) -> web.Response:
        """Public settings of the web integration (name, colors) for the widget."""
        app_id = request.match_info["app_id"]
        record = handlers.web_integration(await self.integration(request.match_info["integration_id"]), app_id)
        handlers.check_origin(record, request.headers.get("Origin"))
        return json_response(handlers.public_config(record))

    async def get_messages(self, request: web.Request) -> web.Response:
        """History: messages with cursor > `after` (oldest first), or the latest page."""
        claims, conversation_id = await self.authorize(
            request, handlers.bearer_token(request.headers.get("Authorization")))
        after = handlers.parse_cursor(request.query.get("after"))
        limit = handlers.parse_limit(request.query.get("limit"), HISTORY_PAGE_LIMIT)
        page = await self.history(claims, conversation_id, after, limit)
        return json_response(handlers.messages_page(page))

    async def post_message(self, request: web.Request) -> web.Response:
        """Queue a customer message durably; 202 once JetStream acked it."""
        claims, conversation_id = await self.authorize(
            request, handlers.bearer_token(request.headers.get("Authorization")))
        body = handlers.validate_post_message(await read_json(request, PostMessage))
        message = handlers.inbound_message(claims, conversation_id, body, now())
        try:
            ack = await self._bus().publish(subjects.inbound_subject(handlers.WEB_CHANNEL, claims.integration),
                                            channel.encode(message),
                                            msg_id=handlers.inbound_msg_id(body.client_message_id))
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            raise ApiError(503, "Could not queue the message, retry with the same clientMessageId") from exc
        return json_response(MessageAccepted(client_message_id=body.client_message_id,
                                             duplicate=bool(ack.duplicate)), status=202)

    async def post_activity(self, request: web.Request) -> web.Response:
        """Typing or read state from the customer."""
        claims, conversation_id = await self.authorize(
            request, handlers.bearer_token(request.headers.get("Authorization")))
        body = await read_json(request, PostActivity, limit=4096)
        activity = handlers.inbound_activity(claims, conversation_id, body, now())
        try:
            await self._bus().publish(subjects.inbound_subject(handlers.WEB_CHANNEL, claims.integration),
                                      channel.encode(activity))
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            raise ApiError(503, "Could not queue the activity, try again") from exc
        return web.Response(status=202)

    async def widget_file(self, request: web.Request) -> web.Response:
        """The widget's static files (held in memory; a few KB)."""
        found = self._static.get(request.match_info["name"])
        if found is None:
            raise ApiError(404, "Not found")
        body, content_type = found
        return web.Response(body=body, content_type=content_type, charset="utf-8",
                            headers={"Cache-Control": "public, max-age=60"})

    # --- the socket ---------------------------------------------------------------------------

    async def socket(self, request: web.Request) -> web.StreamResponse:
        """Realtime: history after `after`, then live frames of the conversation.

        Auth failures on an upgrade are reported in-band (an `error` frame, then close code
        4000 + HTTP status) because browsers cannot read a refused handshake's status.
        """
        ws = web.WebSocketResponse(heartbeat=max(self.config.ping_interval, 1.0), max_msg_size=4096)
        upgrade = ws.can_prepare(request).ok
        try:
            claims, conversation_id = await self.authorize(request, request.query.get("token"))
            after = handlers.parse_cursor(request.query.get("after"))
        except ApiError as exc:
            if not upgrade:
                raise
            await ws.prepare(request)
            await ws.send_str(encode_frame(ErrorFrame(status=exc.status, code=exc.code, title=exc.title)))
            await ws.close(code=SOCKET_CLOSE_BASE + exc.status, message=exc.code.encode()[:100])
            return ws
        if not upgrade:
            raise ApiError(400, "Expected a WebSocket upgrade")
        await ws.prepare(request)
        listener = SocketListener(self.config.socket_queue_size)
        # Subscribe before reading history so nothing published in between is lost.
        self.hub.add(conversation_id, listener)
        self.sockets.add(ws)
        pump = asyncio.create_task(self._pump(ws, claims, conversation_id, after, listener),
                                   name="web:socket-pump")
        try:
            async for msg in ws:
                if msg.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
                    break
                # Clients only listen; anything they send is ignored.
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
            self.hub.remove(conversation_id, listener)
            self.sockets.discard(ws)
        return ws

    async def _pump(self, ws: web.WebSocketResponse, claims: SessionClaims, conversation_id: str,
                    after: int | None, listener: SocketListener) -> None:
        watermark = handlers.CursorWatermark(after or 0)
        try:
            last_read: str | None = None
            while True:
                page = await self.history(claims, conversation_id, watermark.high if after is not None else None,
                                          HISTORY_PAGE_LIMIT)
                last_read = handlers.business_last_read(page)
                entries = handlers.history_entries(page)
                for entry in entries:
                    if watermark.admit(entry.cursor):
                        await ws.send_str(encode_frame(MessageFrame(cursor=entry.cursor, message=entry.message)))
                # Without `after` only the latest page is replayed; with it, every page.
                if after is None or not page.has_more or not entries:
                    break
            await ws.send_str(encode_frame(ReadyFrame(cursor=watermark.high, ping_interval=self.config.ping_interval,
                                                      business_last_read=last_read)))
            while not ws.closed:
                try:
                    async with asyncio.timeout(self.config.ping_interval):
                        cursor, text = await listener.queue.get()
                except TimeoutError:
                    await ws.send_str(encode_frame(ping_frame(now())))
                    continue
                if listener.overflowed:
                    await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"too slow, resume by cursor")
                    return
                if cursor is not None and not watermark.admit(cursor):
                    continue
                await ws.send_str(text)
        except ApiError as exc:
            with contextlib.suppress(Exception):
                await ws.send_str(encode_frame(ErrorFrame(status=exc.status, code=exc.code, title=exc.title)))
                code = SOCKET_CLOSE_BASE + exc.status if exc.status < 500 else WSCloseCode.TRY_AGAIN_LATER
                await ws.close(code=code, message=exc.code.encode()[:100])
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("socket pump failed")
            with contextlib.suppress(Exception):
                await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"internal error")


def _load_static() -> dict[str, tuple[bytes, str]]:
    files: dict[str, tuple[bytes, str]] = {}
    for path in STATIC_DIR.iterdir():
        content_type = STATIC_TYPES.get(path.suffix)
        if path.is_file() and content_type is not None:
            files[path.name] = (path.read_bytes(), content_type)
    return files


def create(environ: Mapping[str, str] | None = None) -> WebService:
    """The web service, configured from `environ` (`os.environ` when None)."""
    setup_telemetry("web")
    return WebService(WebConfig.from_env(environ))
