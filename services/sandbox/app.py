"""The sandbox service: the channel fakes (WhatsApp, Messenger, Telegram, Twilio) and the demo page."""

from __future__ import annotations

import html
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from shared import records, subjects
from shared.bus import Bus, KvMirror
from shared.http import Handler, error_middleware, tracing_middleware
from shared.records import IntegrationRecord
from shared.service import ServiceApp
from shared.telemetry import setup_telemetry

from .channels import build_channel_fakes
from .config import SandboxConfig
from .smtp_fake import SmtpSink
from .uploads import MEDIA_RULES, Uploads
from .whatsapp_fake import FakeWhatsApp, points_at_sandbox

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
PREFIX = "/sandbox"
DEFAULT_BUSINESS_NAME = "Threadline Demo Shop"
_PLACEHOLDER = re.compile(r"__SANDBOX_CONFIG__|__BUSINESS_NAME__")


def read_sandbox_file(path: str) -> dict[str, Any]:
    """The demo's ids written by `threadline up` ({} when missing or unreadable)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def page_config(sandbox: Mapping[str, Any], fake: FakeWhatsApp, sandbox_file: str = "",
                business_name: str | None = None) -> dict[str, Any]:
    """What the demo page needs: ids, the business number and name, what a curl to the API needs,
    and `channels`: one simulated phone per channel integration in sandbox.json (the `android`
    integration is the `app` phone: the business's own app with the in-app SDK and push).

    The API key secret stays out of the page (the page is unauthenticated); the page points at
    the file that holds it instead.
    """
    integrations = sandbox.get("integrations") if isinstance(sandbox.get("integrations"), dict) else {}
    assert isinstance(integrations, dict)

    def integration_id(kind: str) -> str | None:
        entry = integrations.get(kind)
        value = entry.get("id") if isinstance(entry, dict) else None
        return value if isinstance(value, str) and value else None

    def public_field(kind: str, key: str) -> str | None:
        entry = integrations.get(kind)
        value = entry.get(key) if isinstance(entry, dict) else None
        return value if isinstance(value, str) and value else None

    whatsapp_id = integration_id("whatsapp")
    account = fake.accounts.get(whatsapp_id) if whatsapp_id else None
    whatsapp_number = account.display_phone_number if account else public_field("whatsapp", "phoneNumber")
    # One simulated phone per channel sandbox.json has, in this order; only public names and
    # numbers (sandbox.json also holds each integration's secrets).
    public: dict[str, dict[str, str | None]] = {
        "whatsapp": {"number": whatsapp_number},
        "messenger": {"pageId": public_field("messenger", "pageId"), "pageName": public_field("messenger", "pageName")},
        "telegram": {"username": public_field("telegram", "username")},
        "twilio": {"number": public_field("twilio", "phoneNumber")},
    }
    app_id = sandbox.get("appId")
    # The in-app SDK phone (a simulated Android app of the business) talks the SDK protocol
    # itself: it needs the app id, never the integration's service-account private key.
    public["app"] = {"appId": app_id if isinstance(app_id, str) and app_id else None}
    # The Mail tab: the inbox of the SMTP sink the e-mail integration (sandbox.json's `email`,
    # of type `mailgun`) sends through.
    public["mail"] = {"fromAddress": public_field("email", "fromAddress")}
    integration_of = {"app": "android", "mail": "email"}  # phone kind → the sandbox.json integration it uses
    channels = [{"kind": kind, "integrationId": integration_id(integration_of.get(kind, kind)), **fields}
                for kind, fields in public.items() if integration_id(integration_of.get(kind, kind))]
    base_url = sandbox.get("baseUrl")
    api_key = sandbox.get("apiKey")
    key_id = api_key.get("id") if isinstance(api_key, dict) else None
    return {
        "appId": app_id if isinstance(app_id, str) else None,
        "webIntegrationId": integration_id("web"),
        "whatsappIntegrationId": whatsapp_id,
        "whatsappNumber": account.display_phone_number if account else None,
        "channels": channels,
        "businessName": business_name or DEFAULT_BUSINESS_NAME,
        "baseUrl": base_url if isinstance(base_url, str) and base_url else None,
        "keyId": key_id if isinstance(key_id, str) and key_id else None,
        "sandboxFile": os.path.abspath(sandbox_file) if sandbox_file else None,
        # What each phone's paper clip may send (types and sizes), checked before uploading.
        "attachments": {kind: rule.view() for kind, rule in MEDIA_RULES.items()},
    }


def render_page(config: Mapping[str, Any]) -> str:
    """The demo page with its configuration inlined (safe inside a <script> element) and its name."""
    template = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    blob = json.dumps(dict(config)).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    name = html.escape(str(config.get("businessName") or DEFAULT_BUSINESS_NAME))
    # One pass, so a value that happens to contain a placeholder is never substituted again.
    values = {"__SANDBOX_CONFIG__": blob, "__BUSINESS_NAME__": name}
    return _PLACEHOLDER.sub(lambda match: values[match.group(0)], template)


class SandboxService(ServiceApp):
    """Hosts `FakeWhatsApp` with accounts taken from the integrations that point at the sandbox."""

    name = "sandbox"
    # Set by `start`, before HTTP serves (and released by `stop`, in the reverse order).
    bus: Bus
    integrations: KvMirror

    def __init__(self, config: SandboxConfig) -> None:
        super().__init__(config.common)
        self.config = config
        # The photos and documents the phones send (served by each fake as its platform serves media).
        self.uploads = Uploads(config.uploads_dir, config.uploads_index_file, config.public_url)
        self.fake = FakeWhatsApp(config.public_url, enforce_window=config.enforce_window,
                                 auto_statuses=config.auto_statuses, store_path=config.whatsapp_store_file,
                                 uploads=self.uploads)
        self.channel_fakes = build_channel_fakes(config.public_url, config.common.data_dir, self.uploads)
        receiver = (config.mail_receiver_host, config.mail_receiver_port) if config.mail_receiver_port else None
        self.mail = SmtpSink(config.smtp_host, config.smtp_port, config.mail_store_file, receiver=receiver,
                             receiver_problem=config.mail_receiver_problem)
        self._synced: dict[str, tuple[str, ...]] = {}
        self.http.middlewares.append(tracing_middleware)
        self.http.middlewares.append(error_middleware)
        self.http.middlewares.append(self._sync_middleware)
        self.http.router.add_get(PREFIX, self._redirect_to_page)
        self.http.router.add_get(f"{PREFIX}/", self._page)
        self.http.router.add_get(f"{PREFIX}/config.json", self._config_json)
        self.http.router.add_static(f"{PREFIX}/static", STATIC_DIR, show_index=False)
        self.http.router.add_routes(self.fake.routes(PREFIX))
        for channel_fake in self.channel_fakes:
            self.http.router.add_routes(channel_fake.routes(PREFIX))
        self.http.router.add_routes(self.mail.routes(PREFIX))
        self.http.router.add_routes(self.uploads.routes(PREFIX))

    async def start(self) -> None:
        """Start the mail sink, connect NATS, mirror the integrations, then serve HTTP (stopped
        the other way round, the fakes' pending deliveries after the bus)."""
        await self.mail.start()
        self.on_stop(self.mail.close)
        for channel_fake in reversed(self.channel_fakes):
            self.on_stop(channel_fake.close)
        self.on_stop(self.fake.close)
        self.bus = await self.connect_bus()
        self.integrations = await self.mirror_bucket(self.bus, subjects.INTEGRATIONS_BUCKET,
                                                     records.integration_decoder(self.config.keyring))
        await self.start_http()

    def sync_accounts(self) -> None:
        """Mirror every whatsapp integration whose Graph base URL is the sandbox into the fake."""
        seen: set[str] = set()
        for record in list(self.integrations.values.values()):
            if not isinstance(record, IntegrationRecord) or record.type != "whatsapp":
                continue
            cfg = record.config
            if not points_at_sandbox(str(cfg.get("baseUrl") or "")):
                continue
            fields = tuple(str(cfg.get(k) or "") for k in
                           ("phoneNumberId", "appSecret", "accessToken", "phoneNumber", "verifyToken"))
            if not all(fields[:3]):
                continue
            seen.add(record.id)
            if self._synced.get(record.id) != fields:
                phone_number_id, app_secret, access_token, phone_number, verify_token = fields
                self.fake.add_account(record.id, phone_number_id, app_secret, access_token,
                                      phone_number or "+15550001111", self.config.webhook_url(record.id),
                                      verify_token=verify_token or None)
                self._synced[record.id] = fields
        for integration_id in [i for i in self._synced if i not in seen]:
            self.fake.remove_account(integration_id)
            del self._synced[integration_id]
        all_records = [r for r in self.integrations.values.values() if isinstance(r, IntegrationRecord)]
        for channel_fake in self.channel_fakes:
            channel_fake.sync([r for r in all_records if r.type == channel_fake.integration_type])

    @web.middleware
    async def _sync_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(PREFIX):
            self.sync_accounts()
        return await handler(request)

    async def _redirect_to_page(self, _request: web.Request) -> web.Response:
        raise web.HTTPFound(f"{PREFIX}/")

    def business_name(self, web_integration_id: str | None) -> str | None:
        """The web integration's businessName (what the widget shows as its title)."""
        if not web_integration_id:
            return None
        record = self.integrations.get(web_integration_id)
        if not isinstance(record, IntegrationRecord):
            return None
        name = record.config.get("businessName") or record.display_name
        return name if isinstance(name, str) and name else None

    def current_page_config(self) -> dict[str, Any]:
        """page_config for the sandbox.json on disk now (read per request: `up` may rewrite it)."""
        sandbox = read_sandbox_file(self.config.sandbox_file)
        config = page_config(sandbox, self.fake, self.config.sandbox_file)
        name = self.business_name(config["webIntegrationId"])
        if name:
            config["businessName"] = name
        return config

    async def _page(self, _request: web.Request) -> web.Response:
        return web.Response(text=render_page(self.current_page_config()), content_type="text/html",
                            headers={"Cache-Control": "no-store"})

    async def _config_json(self, _request: web.Request) -> web.Response:
        return web.json_response(self.current_page_config())


def create(environ: Mapping[str, str] | None = None) -> SandboxService:
    """Build the sandbox service from the environment (os.environ when None)."""
    setup_telemetry("sandbox")
    return SandboxService(SandboxConfig.from_env(environ))
