"""What the channels' webhook ingress shares: the malformed items of a batch, reported.

A platform batches several items into one signed notification (WhatsApp
`entry[].changes[].value.messages[]` and `statuses[]`, Messenger `entry[].messaging[]`). One
malformed item must not fail the whole notification: the platform would retry it unchanged
and never deliver the well-formed items beside it. The ingress publishes the well-formed items,
answers 200 once they are durable, and reports every rejected item with `report_rejected`.
Both count in `shared.metrics` (`threadline_messages_in_total`): a customer message published
through `published_message` as accepted or duplicate, a rejected item as rejected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from aiohttp import web
from nats.js.api import PubAck
from opentelemetry import trace

from shared import metrics, subjects
from shared.bus import Bus
from shared.http import ApiError, read_body
from shared.messages import channel as channel_messages
from shared.messages.channel import DeliveryStatus, InboundMessage
from shared.signing import meta_handshake_challenge
from shared.telemetry import log_fields

log = logging.getLogger(__name__)
C = TypeVar("C")
N = TypeVar("N")


def meta_handshake(verify_token: str | None, query: Mapping[str, str]) -> web.Response:
    """Meta's subscription check (WhatsApp, Messenger): the `hub.challenge` echoed as plain text
    when `hub.verify_token` matches the integration's `verify_token`, else 403."""
    challenge = meta_handshake_challenge(verify_token, query.get("hub.mode"), query.get("hub.verify_token"),
                                         query.get("hub.challenge"))
    if challenge is None:
        return web.Response(status=403, text="Forbidden", content_type="text/plain")
    return web.Response(status=200, text=challenge, content_type="text/plain")


class WebhookShapeError(ValueError):
    """A delivery that is not of its platform's shape (answered 400)."""


@dataclass(frozen=True)
class WebhookIntake(Generic[C]):
    """The checks every channel's webhook makes, with the same answers: the integration named
    in the path (404), the body read within its bound (413), its content type (415) and its shape
    (400, counted as a rejected message). The signature check between them is the channel's own."""

    channel: str  # the metrics label, e.g. `whatsapp`
    platform: str  # as the errors name it, e.g. `WhatsApp`
    credentials: Callable[[str], C | None]
    max_body: int
    content_type: str = "application/json"

    def integration(self, request: web.Request) -> C:
        """The credentials of the integration in the path; ApiError 404 when there is none."""
        creds = self.credentials(request.match_info["integration_id"])
        if creds is None:
            raise ApiError(404, f"Unknown {self.platform} integration")
        return creds

    async def body(self, request: web.Request) -> bytes:
        """The raw body (a signature covers these bytes); ApiError 413 past `max_body`."""
        return await read_body(request, self.max_body)

    def check_content_type(self, request: web.Request) -> None:
        """ApiError 415 unless the request says it carries `content_type`."""
        if request.content_type != self.content_type:
            raise ApiError(415, f"Content-Type must be {self.content_type}, got {request.content_type}")

    def normalized(self, normalize: Callable[[], N], what: str = "notification", *,
                   counts_as_message: bool = True) -> N:
        """`normalize()`, or ApiError 400 naming why the delivery is not of the platform's
        shape (a refused customer message is counted rejected; a refused status callback is not)."""
        try:
            return normalize()
        except WebhookShapeError as exc:
            if counts_as_message:
                metrics.message_in(self.channel, "rejected")
            raise ApiError(400, f"Invalid {self.platform} {what}: {exc}") from exc


async def publish_all(publishes: Sequence[Awaitable[object]]) -> list[BaseException]:
    """Await a notification's publishes together; the exceptions of those that failed.

    Almost every notification carries one item: that one is awaited as it is, without the task
    `asyncio.gather` would wrap it in (a visible share of an ingress's CPU per webhook).
    """
    if len(publishes) == 1:
        try:
            await publishes[0]
        except Exception as exc:
            return [exc]
        return []
    results = await asyncio.gather(*publishes, return_exceptions=True)
    return [result for result in results if isinstance(result, BaseException)]


async def published_message(channel: str, publish: Awaitable[PubAck]) -> PubAck:
    """Await the publish of one customer message of `channel` and count it: accepted (durable
    now), or a duplicate (JetStream already had its id: the platform sent it again)."""
    ack = await publish
    metrics.message_in_acked(channel, ack.duplicate)
    return ack


async def publish_durably(bus: Bus, channel: str, messages: Sequence[InboundMessage],
                          statuses: Sequence[DeliveryStatus] = (), *,
                          message_id: Callable[[InboundMessage], str] | None = None,
                          status_id: Callable[[DeliveryStatus], str] | None = None,
                          what: str = "notification") -> None:
    """Publish what one platform webhook carried — customer messages (counted accepted or
    duplicate) and delivery statuses, each under its de-duplication id — and return once every
    one is durable in JetStream: the webhook may be answered 200 then. ApiError 503 otherwise
    (the platform retries; what did go through is de-duplicated by its id)."""
    publishes: list[Awaitable[object]] = []
    if messages:
        assert message_id is not None, "messages need their de-duplication id"
        publishes += [published_message(channel, bus.publish(channel_messages.subject_of(m),
                                                             channel_messages.encode(m), msg_id=message_id(m)))
                      for m in messages]
    if statuses:
        assert status_id is not None, "statuses need their de-duplication id"
        publishes += [bus.publish(channel_messages.subject_of(s), channel_messages.encode(s), msg_id=status_id(s))
                      for s in statuses]
    failures = await publish_all(publishes)
    if failures:
        log.warning("publishing a %s %s failed (%d of %d): %s", channel, what, len(failures), len(publishes),
                    failures[0])
        raise ApiError(503, f"Could not store the {what}, retry later")
    await SEEN.record(bus, {m.integration_id for m in messages} | {s.integration_id for s in statuses})


class WebhooksSeen:
    """When each integration's platform webhook last brought something in, in a KV bucket the desk
    reads ("last webhook received" in its channel setup). Written at most every `interval` seconds
    per integration and process, after the webhook's content is durable; a failure to write it is
    logged, never the webhook's."""

    interval = 30.0

    def __init__(self) -> None:
        self._written: dict[str, float] = {}

    async def record(self, bus: Bus, integration_ids: set[str]) -> None:
        now = time.time()
        due = [i for i in integration_ids if now - self._written.get(i, 0.0) >= self.interval]
        if not due:
            return
        for integration_id in due:
            self._written[integration_id] = now
        try:
            kv = await bus.key_value(subjects.WEBHOOKS_SEEN_BUCKET)
            for integration_id in due:
                await kv.put(integration_id, str(now).encode())
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            log.warning("could not note the last webhook of %s: %s", ", ".join(due), exc)


SEEN = WebhooksSeen()


@dataclass(frozen=True)
class Rejected:
    """One item of a notification that could not be normalized (its siblings still are)."""

    where: str  # its place in the notification, e.g. `entry[0].changes[1].value.messages[2]`
    reason: str
    provider_id: str | None = None  # the platform's id of the item, when it has a readable one


def rejected(where: str, exc: Exception, raw: Any = None, id_key: str = "id") -> Rejected:
    """A `Rejected` for `raw` (the item as received) refused with `exc`."""
    provider_id = raw.get(id_key) if isinstance(raw, Mapping) else None
    reason = str(exc) if isinstance(exc, ValueError | msgspec.MsgspecError) else type(exc).__name__
    return Rejected(where=where, reason=reason[:300],
                    provider_id=provider_id if isinstance(provider_id, str) else None)


def report_rejected(logger: logging.Logger, channel: str, integration_id: str, items: Sequence[Rejected]) -> None:
    """Log each rejected item (structured, never its content), count it, and mark the request's span.

    The span gets `threadline.webhook.rejected` (a count) and one `webhook.item_rejected` event
    per item, so traces show which notification carried them.
    """
    if not items:
        return
    metrics.message_in(channel, "rejected", len(items))
    span = trace.get_current_span()
    span.set_attribute("threadline.webhook.rejected", len(items))
    for item in items:
        span.add_event("webhook.item_rejected", {"where": item.where, "reason": item.reason})
        logger.warning("webhook item rejected, the rest of the notification accepted", extra=log_fields(
            channel=channel, integration_id=integration_id, where=item.where, reason=item.reason,
            provider_message_id=item.provider_id))
