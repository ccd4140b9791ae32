"""Wiring of the `web` service: the SDK protocol for the web messenger, CORS, the widget's files.

The SDK endpoints and the realtime socket are `shared.sdk_service.SdkService`; this service
adds what only a browser needs: Origin checks (`originWhitelist`), CORS and the widget script.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from services.web import handlers, notify
from services.web.config import WebConfig
from shared import subjects
from shared.http import ApiError, Handler, error_middleware, json_response, read_json, tracing_middleware
from shared.messages import handoff, notification
from shared.records import IntegrationRecord
from shared.sdk_service import SdkService, bearer_token
from shared.telemetry import setup_telemetry

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
STATIC_TYPES = {".js": "application/javascript", ".css": "text/css", ".html": "text/html"}


Reply = TypeVar("Reply", bound=notification.NotificationMessage)


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
        response.headers["Access-Control-Expose-Headers"] = "Retry-After"  # a 429 says when to retry
        if request.method == "OPTIONS":
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Max-Age"] = "600"
    return response


class WebService(SdkService):
    """The web messenger's SDK API and realtime socket."""

    name = "web"
    path_root = "sdk"
    integration_types = frozenset({"web"})

    def __init__(self, config: WebConfig) -> None:
        super().__init__(config.common, config.sdk)
        self.config = config
        self._static: dict[str, tuple[bytes, str]] = {}
        self.http.middlewares.extend([tracing_middleware, cors_middleware, error_middleware])
        self.http.router.add_get(self.sdk_prefix + "/integrations/{integration_id}/config", self.get_config)
        self.http.router.add_get(self.sdk_prefix + "/integrations/{integration_id}/channels", self.get_channels)
        self.http.router.add_post(self.sdk_prefix + "/conversations/{conversation_id}/linkRequests",
                                  self.create_link_requests)
        self.http.router.add_get("/widget/{name}", self.widget_file)
        self.add_notify_routes()

    async def start(self) -> None:
        """Connect the bus, mirror integrations, subscribe to events, serve HTTP."""
        self._static = _load_static()
        await self.start_sdk()
        await self.start_http()

    # --- SDK hooks ----------------------------------------------------------------------------

    def channel_of(self, record: IntegrationRecord) -> str:
        return handlers.WEB_CHANNEL

    def served_integration(self, record: IntegrationRecord | None, app_id: str) -> IntegrationRecord:
        return handlers.web_integration(record, app_id)

    def check_request(self, record: IntegrationRecord, request: web.Request) -> None:
        handlers.check_origin(record, request.headers.get("Origin"))

    def session_info(self, request: web.Request, record: IntegrationRecord, body: Any) -> dict[str, Any]:
        return {key: value[:512] for key, value in (
            ("origin", request.headers.get("Origin")),
            ("userAgent", request.headers.get("User-Agent")),
            ("browserLanguage", request.headers.get("Accept-Language")),
        ) if value}

    # --- web-only endpoints -------------------------------------------------------------------

    async def get_config(self, request: web.Request) -> web.Response:
        """Public settings of the web integration (name, colors, the upload limit) for the widget."""
        app_id = request.match_info["app_id"]
        record = handlers.web_integration(await self.integration(request.match_info["integration_id"]), app_id)
        handlers.check_origin(record, request.headers.get("Origin"))
        return json_response(handlers.public_config(record, self.sdk.max_upload_bytes))

    async def get_channels(self, request: web.Request) -> web.Response:
        """The app's other channels the customer can continue on ("Continue on…")."""
        app_id = request.match_info["app_id"]
        record = handlers.web_integration(await self.integration(request.match_info["integration_id"]), app_id)
        handlers.check_origin(record, request.headers.get("Origin"))
        records = list(self.integrations.values.values())
        body = msgspec.to_builtins(handlers.continue_channels(app_id, records))
        # "Notify me" lists where the customer may be notified (e-mail, SMS, WhatsApp).
        body["notificationChannels"] = msgspec.to_builtins(notify.notify_channels(app_id, records))
        return json_response(body)

    async def create_link_requests(self, request: web.Request) -> web.Response:
        """Links (deep link + QR) that continue the session's conversation on other channels."""
        claims, conversation_id = await self.authorize(request, bearer_token(request.headers.get("Authorization")))
        targets = handlers.link_targets(await read_json(request, handlers.LinkRequestsBody, limit=4096))
        for target in targets:
            handlers.check_link_target(await self.integration(target), claims.app, target)
        limits = self.sdk.limits
        await self.limit(request, "link-requests", claims.app, [
            ("user", claims.user, limits.links_per_user),
            *self.source_checks(request, claims.app, limits.links_per_ip, limits.links_per_origin,
                                limits.links_per_app)])
        issue = handoff.IssueLinks(app_id=claims.app, user_id=claims.user, conversation_id=conversation_id,
                                   integration_ids=targets, source_integration_id=claims.integration)
        data = await self.ask(subjects.HANDOFF_ISSUE, handoff.encode(issue), "handoff")
        try:
            reply = handoff.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ApiError(503, "Unexpected answer from handoff") from exc
        return json_response(handlers.issued_links(reply), status=201)

    async def widget_file(self, request: web.Request) -> web.Response:
        """The widget's static files (held in memory; a few KB)."""
        found = self._static.get(request.match_info["name"])
        if found is None:
            raise ApiError(404, "Not found")
        body, content_type = found
        return web.Response(body=body, content_type=content_type, charset="utf-8",
                            headers={"Cache-Control": "public, max-age=60"})


    # --- "Notify me": notification opt-ins (relayed to `notifications`) -----------------------

    def add_notify_routes(self) -> None:
        """SDK endpoints of the widget's notification opt-in."""
        base = self.sdk_prefix + "/conversations/{conversation_id}/notificationOptIns"
        r = self.http.router
        r.add_post(base, self.start_opt_in)
        r.add_get(base, self.list_opt_ins)
        r.add_post(base + "/{opt_in_id}/confirm", self.confirm_opt_in)
        r.add_delete(base + "/{opt_in_id}", self.stop_opt_in)

    async def ask_notifications(self, subject: str, request: notification.NotificationMessage,
                                expected: type[Reply]) -> Reply:
        """A request to `notifications` answered with an `expected`; its refusal becomes the
        matching ApiError, its absence or any other answer a 503."""
        data = await self.ask(subject, notification.ENCODER.encode(request), "notifications")
        try:
            reply = notify.reply_or_error(notification.decode(data))
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ApiError(503, "Unexpected answer from notifications") from exc
        if not isinstance(reply, expected):
            raise ApiError(503, "Unexpected answer from notifications")
        return reply

    async def start_opt_in(self, request: web.Request) -> web.Response:
        """Send a confirmation code to the address the customer gave (201: the pending opt-in)."""
        claims, conversation_id = await self.authorize(request, bearer_token(request.headers.get("Authorization")))
        body = await read_json(request, notify.OptInBody, limit=4096)
        records = list(self.integrations.values.values())
        # `notifications` limits opt-ins per source (client address, Origin) as well as per address and app.
        start = notify.start_request(
            claims.app, claims.user, conversation_id, claims.integration, body, records,
            client_ip=self.client_address(request),
            origin=handlers.normalize_origin(request.headers.get("Origin", "")[:notify.MAX_ORIGIN_LENGTH]))
        reply = await self.ask_notifications(subjects.NOTIFICATIONS_OPTIN_START, start, notification.OptInState)
        return json_response({"optIn": notify.opt_in_wire(reply)}, status=201)

    async def confirm_opt_in(self, request: web.Request) -> web.Response:
        """The code the customer typed back: the opt-in is confirmed (or 400/404/429 from notifications)."""
        claims, _conversation_id = await self.authorize(request, bearer_token(request.headers.get("Authorization")))
        opt_in_id = notify.check_opt_in_id(request.match_info["opt_in_id"])
        code = notify.check_code(await read_json(request, notify.ConfirmBody, limit=1024))
        reply = await self.ask_notifications(subjects.NOTIFICATIONS_OPTIN_CONFIRM, notification.ConfirmOptIn(
            app_id=claims.app, user_id=claims.user, opt_in_id=opt_in_id, code=code, client_id=claims.client),
            notification.OptInState)
        return json_response({"optIn": notify.opt_in_wire(reply)})

    async def list_opt_ins(self, request: web.Request) -> web.Response:
        """The session user's opt-ins (addresses masked)."""
        claims, _conversation_id = await self.authorize(request, bearer_token(request.headers.get("Authorization")))
        reply = await self.ask_notifications(subjects.NOTIFICATIONS_OPTIN_LIST, notification.ListOptIns(
            app_id=claims.app, user_id=claims.user), notification.OptInsReply)
        return json_response({"optIns": [notify.opt_in_wire(state) for state in reply.opt_ins]})

    async def stop_opt_in(self, request: web.Request) -> web.Response:
        """The customer's "Stop": no more notifications there."""
        claims, _conversation_id = await self.authorize(request, bearer_token(request.headers.get("Authorization")))
        opt_in_id = notify.check_opt_in_id(request.match_info["opt_in_id"])
        reply = await self.ask_notifications(subjects.NOTIFICATIONS_OPTIN_STOP, notification.StopOptIn(
            app_id=claims.app, user_id=claims.user, opt_in_id=opt_in_id), notification.OptInState)
        return json_response({"optIn": notify.opt_in_wire(reply)})


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
