"""The public front door's routing table: path prefix → service.

`threadline up` serves it with a small reverse proxy; the Kubernetes Ingress routes the same
prefixes. Longest prefix wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class Route:
    """One path prefix and the service that serves it."""

    prefix: str
    service: str


@dataclass(frozen=True)
class ServicePort:
    """A service's name and default HTTP port."""

    name: str
    port: int


SERVICES: Final = (
    ServicePort("conversations", 8081),
    ServicePort("identity", 8082),
    ServicePort("web", 8083),
    ServicePort("whatsapp", 8084),
    ServicePort("webhooks", 8085),
    ServicePort("sandbox", 8086),
    ServicePort("messenger", 8087),
    ServicePort("telegram", 8088),
    ServicePort("sms", 8089),
    ServicePort("app", 8090),
    ServicePort("handoff", 8091),
    ServicePort("notifications", 8092),
    ServicePort("email", 8093),
    ServicePort("desk", 8094),
)

DEFAULT_PORTS: Final = {s.name: s.port for s in SERVICES}
# The sandbox's SMTP sink (`THREADLINE_SANDBOX_SMTP_PORT`); `threadline up --auto-ports` picks a
# free one instead, so that a second instance's mail never lands in the first one's sink.
SANDBOX_SMTP_PORT: Final = 2525
# The e-mail channel's SMTP receiver (`THREADLINE_MAIL_SMTP_PORT`; `--auto-ports` picks a free one).
MAIL_SMTP_PORT: Final = 2526

ROUTES: Final = (
    Route("/v2/", "conversations"),
    Route("/v1.1/", "conversations"),
    Route("/attachments/", "conversations"),
    Route("/sdk/", "web"),
    Route("/widget/", "web"),
    Route("/app/", "app"),
    Route("/webhooks/whatsapp/", "whatsapp"),
    Route("/webhooks/messenger/", "messenger"),
    Route("/webhooks/telegram/", "telegram"),
    Route("/webhooks/twilio/", "sms"),
    Route("/webhooks/mailgun/", "email"),
    Route("/webhooks/sendgrid/", "email"),
    Route("/sandbox/", "sandbox"),
    Route("/handoff/", "handoff"),
    Route("/notifications/", "notifications"),
    Route("/desk/", "desk"),
)

# `/_svc/<name>/healthz|readyz` reach each service's own probes through the front door.
SERVICE_PROBE_PREFIX: Final = "/_svc/"


def route_for(path: str) -> Route | None:
    """Return the route whose prefix is the longest match for `path`, if any."""
    best: Route | None = None
    for route in ROUTES:
        if path.startswith(route.prefix) and (best is None or len(route.prefix) > len(best.prefix)):
            best = route
    return best
