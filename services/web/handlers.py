"""The web messenger's own rules on decoded values: which integration, which Origins, what the
widget may know. The SDK protocol's logic is in `shared.sdk_service`.

Nothing here touches NATS or sockets, so it is unit-tested directly.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from shared.http import ApiError
from shared.records import IntegrationRecord
from shared.sdk import IntegrationConfig

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


def public_config(record: IntegrationRecord) -> IntegrationConfig:
    """What the widget may know about its integration (no secrets)."""

    def text(key: str) -> str | None:
        value = record.config.get(key)
        return value if isinstance(value, str) and value else None

    return IntegrationConfig(
        integration_id=record.id,
        display_name=record.display_name or text("displayName"),
        business_name=text("businessName"),
        business_icon_url=text("businessIconUrl"),
        brand_color=text("brandColor"),
    )
