"""The web messenger's own rules on decoded values: which integration, which Origins, what the
widget may know. The SDK protocol's logic is in `shared.sdk_service`.

Nothing here touches NATS or sockets, so it is unit-tested directly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from shared.http import ApiError
from shared.messages.handoff import HandoffError, HandoffUnion, LinksIssued, link_request_wire
from shared.records import IntegrationRecord
from shared.sdk import IntegrationConfig
from shared.sunco import Wire

WEB_CHANNEL = "web"
_DEFAULT_PORTS = {"http": 80, "https": 443}


# --- integration and origin ------------------------------------------------------------------

def web_integration(record: IntegrationRecord | None, app_id: str) -> IntegrationRecord:
    """The record when it is an active web integration of `app_id`, else 404 (no detail leaked)."""
    if record is None or record.app_id != app_id or record.type != "web" or record.status != "active":
        raise ApiError(404, "Integration not found")
    return record


def normalize_origin(origin: str) -> str | None:
    """`scheme://host[:port]` in lower case with the default port dropped; None when unparsable."""
    try:
        parts = urlsplit(origin.strip().rstrip("/"))
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def origin_allowed(record: IntegrationRecord, origin: str | None) -> bool:
    """Whether a request from `origin` may use this integration.

    Without an `originWhitelist` every origin may. With one, a browser's Origin must be listed;
    a request without Origin (not a browser, which could send any Origin anyway) is let through.
    """
    whitelist = record.config.get("originWhitelist")
    if not whitelist or origin is None:
        return True
    if not isinstance(whitelist, list):
        return False
    wanted = normalize_origin(origin)
    return wanted is not None and any(
        isinstance(entry, str) and normalize_origin(entry) == wanted for entry in whitelist)


def check_origin(record: IntegrationRecord, origin: str | None) -> None:
    """403 unless `origin_allowed`."""
    if not origin_allowed(record, origin):
        raise ApiError(403, "Origin not allowed for this integration")


def public_config(record: IntegrationRecord, max_upload_bytes: int | None = None) -> IntegrationConfig:
    """What the widget may know about its integration (no secrets), and the largest file it may
    upload."""

    def text(key: str) -> str | None:
        value = record.config.get(key)
        return value if isinstance(value, str) and value else None

    return IntegrationConfig(
        integration_id=record.id,
        display_name=record.display_name or text("displayName"),
        business_name=text("businessName"),
        business_icon_url=text("businessIconUrl"),
        brand_color=text("brandColor"),
        max_upload_bytes=max_upload_bytes,
    )


# --- "Continue on…" (the handoff, web side) --------------------------------------------------

# Integration types a web customer may continue on, in the order the widget lists them.
CONTINUE_TYPES: tuple[str, ...] = ("whatsapp", "messenger", "telegram", "twilio", "android", "ios", "mailgun")
# Targets one "Continue on…" request may name (the widget asks for one at a time).
MAX_LINK_TARGETS = 10
MAX_INTEGRATION_ID_LENGTH = 64


class ContinueChannel(Wire, kw_only=True):
    """One channel the widget offers under "Continue on…"."""

    integration_id: str
    type: str
    display_name: str | None = None


class ContinueChannels(Wire, kw_only=True):
    """`GET …/integrations/{id}/channels`: where the customer can continue the conversation."""

    channels: list[ContinueChannel]


class LinkRequestsBody(Wire, kw_only=True):
    """Body of `POST …/conversations/{id}/linkRequests`."""

    integration_ids: list[str]


def continuable(record: IntegrationRecord | None, app_id: str) -> bool:
    """Whether `record` is an active integration of `app_id` a web customer can continue on."""
    return (record is not None and record.app_id == app_id and record.status == "active"
            and record.type in CONTINUE_TYPES
            # An e-mail integration takes a handoff at its inbound address.
            and (record.type != "mailgun" or "@" in str(record.config.get("incomingAddress") or "")))


def continue_channels(app_id: str, records: Iterable[object]) -> ContinueChannels:
    """The app's integrations the customer can continue on, by type (CONTINUE_TYPES order), then id."""
    found = [r for r in records if isinstance(r, IntegrationRecord) and continuable(r, app_id)]
    found.sort(key=lambda r: (CONTINUE_TYPES.index(r.type), r.id))
    return ContinueChannels(channels=[
        ContinueChannel(integration_id=r.id, type=r.type, display_name=r.display_name) for r in found])


def link_targets(body: LinkRequestsBody) -> list[str]:
    """The requested integration ids, de-duplicated in order; 400 when empty, too many or malformed."""
    targets = list(dict.fromkeys(body.integration_ids))
    if not targets:
        raise ApiError(400, "integrationIds must name at least one integration")
    if len(targets) > MAX_LINK_TARGETS:
        raise ApiError(400, f"integrationIds may name at most {MAX_LINK_TARGETS} integrations")
    if not all(0 < len(t) <= MAX_INTEGRATION_ID_LENGTH for t in targets):
        raise ApiError(400, f"integrationIds must be 1 to {MAX_INTEGRATION_ID_LENGTH} characters each")
    return targets


def check_link_target(record: IntegrationRecord | None, app_id: str, integration_id: str) -> None:
    """404 unless the target is one of the app's channels the customer may continue on."""
    if not continuable(record, app_id):
        raise ApiError(404, f"Integration {integration_id} not found")


def issued_links(reply: HandoffUnion) -> dict[str, Any]:
    """The 201 body for `handoff`'s answer; its refusal becomes the matching ApiError."""
    if isinstance(reply, HandoffError):
        status = reply.status if 400 <= reply.status < 600 else 503
        raise ApiError(status, reply.title, reply.code)
    if not isinstance(reply, LinksIssued):
        raise ApiError(503, "Unexpected answer from handoff")
    return {"linkRequests": [link_request_wire(link) for link in reply.links]}
