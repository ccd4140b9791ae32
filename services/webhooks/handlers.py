"""Delivery logic of the `webhooks` service, on decoded Structs and plain data (no NATS, no I/O).

- `deliveries_for`: which webhooks an event goes to, as rows to store.
- `build_envelope` / `request_headers`: the SunCo v2 body and the headers of one POST.
- `RetryPolicy` / `classify`: what an HTTP outcome means and when to try again.
- `WebhookQueue`: the in-memory schedule of one webhook's pending rows, which enforces
  per-conversation order while letting other conversations proceed.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from shared.ids import iso
from shared.messages.conversation import (
    ActivityPosted,
    ClientAdded,
    ClientRemoved,
    ClientUpdated,
    ConversationCreated,
    ConversationRemoved,
    ConversationUnion,
    DeliveryReported,
    MessageCreated,
    NotificationReported,
    PostbackReceived,
    Referred,
    SwitchboardControlled,
    UserRemoved,
    UsersMerged,
    UserUpdated,
)
from shared.records import SwitchboardRecord, WebhookRecord
from shared.signing import WEBHOOK_SIGNATURE_HEADER, webhook_signature
from shared.sunco import ConversationRef, api_content, to_wire

USER_AGENT = "Threadline-Webhooks/0.1"
WEBHOOK_ID_HEADER = "X-Threadline-Webhook-Id"
API_KEY_HEADER = "X-API-Key"
# SunCo does not retry these: the receiver said the request itself is wrong or unwanted.
NO_RETRY_STATUSES = frozenset({400, 401, 403, 404, 406})
# A webhook subscribed to "*" receives every trigger (as SunCo v1 allowed).
ALL_TRIGGERS = "*"

_ENCODER = msgspec.json.Encoder()

Outcome = Literal["delivered", "failed", "retry"]


@dataclass(frozen=True)
class NewDelivery:
    """A delivery to store: one event for one webhook."""

    webhook_id: str
    app_id: str
    event_id: str
    conversation_id: str
    trigger: str
    body: bytes  # the SunCo event object `{id, type, createdAt, payload}` as JSON
    traceparent: str | None
    tracestate: str | None
    created_at: float
    # When the event happened, by `conversations`' clock: what an erasure's `before` is compared
    # with (a row is created when this service reads the event, which may be later).
    event_at: float | None = None


@dataclass(eq=False)
class PendingDelivery:
    """A stored delivery that is not finished yet (the scheduler's unit of work)."""

    seq: int  # insertion order; per conversation it is the event order
    webhook_id: str
    app_id: str
    event_id: str
    conversation_id: str
    body: bytes
    traceparent: str | None
    tracestate: str | None
    created_at: float
    next_attempt_at: float
    attempts: int = 0
    first_attempt_at: float | None = None
    event_at: float | None = None  # as `NewDelivery.event_at`

    @property
    def happened_at(self) -> float:
        """When its event happened (the row's creation for rows stored before that was kept)."""
        return self.created_at if self.event_at is None else self.event_at

    def trace_headers(self) -> dict[str, str]:
        """The trace context of the event this row was made from."""
        headers: dict[str, str] = {}
        if self.traceparent:
            headers["traceparent"] = self.traceparent
        if self.tracestate:
            headers["tracestate"] = self.tracestate
        return headers


def subscribed(record: WebhookRecord, trigger: str) -> bool:
    """True when the webhook wants events of `trigger`."""
    return trigger in record.triggers or ALL_TRIGGERS in record.triggers


def matching_webhooks(records: Iterable[WebhookRecord], app_id: str, trigger: str) -> list[WebhookRecord]:
    """The webhooks of `app_id` subscribed to `trigger`, in a stable order (by id)."""
    found = [r for r in records if r.app_id == app_id and subscribed(r, trigger)]
    found.sort(key=lambda r: r.id)
    return found


def receives(record: WebhookRecord, trigger: str, conversation: ConversationRef | None,
             switchboard: SwitchboardRecord | None) -> bool:
    """Whether the switchboard lets a subscribed webhook have a conversation's event: a webhook of
    an integration in the (enabled) switchboard gets it while its switchboard integration is in
    control of the conversation, or in standby when it asked for standby events. Integrations
    outside the switchboard, and the `switchboard:*` events themselves, are not filtered."""
    if switchboard is None or conversation is None or not trigger.startswith("conversation:"):
        return True
    members = [m for m in switchboard.integrations if m.integration_id == record.integration_id]
    if not members:
        return True
    active = conversation.active_switchboard_integration
    return any(m.deliver_standby_events or (active is not None and m.id == active.id) for m in members)


def _conversation_wire(conversation: ConversationRef, switchboard: SwitchboardRecord | None) -> dict[str, Any]:
    """The payload's `conversation`, its switchboard integrations named in full (events carry
    their ids; a deleted one keeps only its id)."""
    wire: dict[str, Any] = to_wire(conversation)
    if switchboard is None:
        return wire
    for key, ref in (("activeSwitchboardIntegration", conversation.active_switchboard_integration),
                     ("pendingSwitchboardIntegration", conversation.pending_switchboard_integration)):
        if ref is not None:
            wire[key] = to_wire(switchboard.ref(ref.id))
    return wire


def webhook_event(event: ConversationUnion, switchboard: SwitchboardRecord | None = None,
                  ) -> tuple[str, dict[str, Any]] | None:
    """The SunCo webhook trigger and event object (`{id, type, createdAt, payload}`) of an event;
    None for the events that have no webhook form. `switchboard` (the app's) names the
    conversation's switchboard integrations in full."""
    ref = getattr(event, "conversation", None)
    conversation = _conversation_wire(ref, switchboard) if isinstance(ref, ConversationRef) else None
    trigger: str
    payload: dict[str, Any]
    match event:
        case MessageCreated(message=message):
            message = msgspec.structs.replace(message, content=api_content(message.content))
            trigger, payload = "conversation:message", {"conversation": conversation, "message": to_wire(message)}
        case ActivityPosted(activity=activity):
            trigger = "conversation:read" if activity.type == "conversation:read" else "conversation:typing"
            payload = {"conversation": conversation, "activity": to_wire(activity)}
        case DeliveryReported():
            trigger = f"conversation:message:delivery:{event.kind}"
            payload = {"user": to_wire(event.user), "conversation": conversation, "message": {"id": event.message_id},
                       "destination": to_wire(event.destination),
                       "externalMessages": to_wire(event.external_messages), "isFinalEvent": event.is_final}
            _add(payload, "error", event.error)
        case ConversationCreated():
            trigger = "conversation:create"
            payload = {"conversation": conversation, "creationReason": event.creation_reason}
            _add(payload, "user", event.user)
            _add(payload, "source", event.source)
        case ConversationRemoved():
            trigger, payload = "conversation:remove", {"conversation": conversation}
        case ClientAdded() | ClientUpdated() | ClientRemoved():
            trigger = {ClientAdded: "client:add", ClientUpdated: "client:update", ClientRemoved: "client:remove"}[
                type(event)]
            payload = {"user": to_wire(event.user), "client": to_wire(event.client), "reason": event.reason}
            if isinstance(event, ClientRemoved):
                _add(payload, "error", event.error)
            _add(payload, "conversation", event.conversation)
            _add(payload, "source", event.source)
        case Referred():
            trigger = "conversation:referral"
            payload = {"conversation": conversation, "user": to_wire(event.user), "source": to_wire(event.source),
                       "referral": {"code": event.code, "details": event.details}}
        case UsersMerged():
            trigger = "user:merge"
            payload = {"mergedUsers": {"surviving": to_wire(event.surviving), "discarded": to_wire(event.discarded)},
                       "reason": event.reason}
            if event.merged_client_ids:
                payload["mergedClients"] = {"surviving": event.merged_client_ids}
            if event.merged_conversation_ids:
                payload["mergedConversations"] = {"surviving": event.merged_conversation_ids}
            if event.discarded_metadata:
                payload["discardedMetadata"] = event.discarded_metadata
        case UserUpdated():
            trigger, payload = "user:update", {"user": to_wire(event.user), "reason": event.reason}
        case UserRemoved():
            trigger, payload = "user:remove", {"user": {**to_wire(event.user), "authenticated": event.authenticated}}
        case PostbackReceived():
            trigger = "conversation:postback"
            postback: dict[str, Any] = {"payload": event.payload}
            if event.metadata:
                postback["metadata"] = event.metadata
            payload = {"conversation": conversation, "user": to_wire(event.user), "postback": postback}
            _add(payload, "source", event.source)
        case SwitchboardControlled():
            trigger = f"switchboard:{event.action}" + (":failure" if event.error is not None else "")
            payload = {"conversation": conversation}
            for name, value in (("metadata", event.metadata), ("reason", event.reason), ("error", event.error)):
                if value is not None:
                    payload[name] = value
        case NotificationReported():
            trigger = f"notification:delivery:{event.kind}"
            payload = {"notification": {"id": event.notification_id}, "conversation": conversation,
                       "user": to_wire(event.user), "destination": to_wire(event.destination)}
            _add(payload, "error", event.error)
        case _:
            return None
    return trigger, {"id": event.id, "type": trigger, "createdAt": iso(event.created_at), "payload": payload}


def _add(payload: dict[str, Any], name: str, value: object | None) -> None:
    """Put `value` in the payload in its wire form, unless it is absent."""
    if value is not None:
        payload[name] = to_wire(value)


def deliveries_for(event: ConversationUnion, records: Iterable[WebhookRecord],
                   trace_headers: Mapping[str, str], now: float,
                   switchboard: SwitchboardRecord | None = None) -> list[NewDelivery]:
    """The rows to store for one conversation event (empty when nobody subscribed, or the app's
    enabled `switchboard` keeps it from the subscribers in standby)."""
    converted = webhook_event(event, switchboard)
    if converted is None:
        return []
    trigger, event_object = converted
    ref = getattr(event, "conversation", None)
    conversation = ref if isinstance(ref, ConversationRef) else None
    hooks = [hook for hook in matching_webhooks(records, event.app_id, trigger)
             if receives(hook, trigger, conversation, switchboard)]
    if not hooks:
        return []
    body = _ENCODER.encode(event_object)
    return [
        NewDelivery(
            webhook_id=hook.id, app_id=event.app_id, event_id=event.id,
            conversation_id=event.conversation_id, trigger=trigger, body=body,
            traceparent=trace_headers.get("traceparent"), tracestate=trace_headers.get("tracestate"),
            created_at=now, event_at=event.created_at,
        )
        for hook in hooks
    ]


class _AppRef(msgspec.Struct):
    id: str


class _WebhookRef(msgspec.Struct):
    id: str
    version: str


class _Envelope(msgspec.Struct):
    app: _AppRef
    webhook: _WebhookRef
    events: list[msgspec.Raw]


def build_envelope(app_id: str, webhook_id: str, version: str, event_bodies: Iterable[bytes]) -> bytes:
    """SunCo v2 webhook body: `{"app": {"id"}, "webhook": {"id", "version"}, "events": [...]}`.

    The stored event objects are spliced in as they are (no re-encoding).
    """
    return _ENCODER.encode(_Envelope(
        app=_AppRef(app_id), webhook=_WebhookRef(webhook_id, version),
        events=[msgspec.Raw(body) for body in event_bodies],
    ))


def request_headers(record: WebhookRecord, body: bytes, now: float) -> dict[str, str]:
    """Headers of one delivery POST (without the trace context, added by the caller's span)."""
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        API_KEY_HEADER: record.secret,
        WEBHOOK_SIGNATURE_HEADER: webhook_signature(record.secret, body, int(now)),
        WEBHOOK_ID_HEADER: record.id,
    }


def classify(status: int | None) -> Outcome:
    """What an attempt's result means: `status` None is a connection error or a timeout."""
    if status is not None and 200 <= status < 300:
        return "delivered"
    if status in NO_RETRY_STATUSES:
        return "failed"
    return "retry"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off with jitter inside a give-up window.

    The n-th retry waits about `base * 2**(n-1)` seconds (±25 % jitter); no attempt is
    scheduled past `window` seconds after the failures started, and a failure at or after that
    point gives the delivery up. With the defaults (2 s, 900 s) that is 10 attempts at about
    0, 2, 6, 14, 30, 62, 126, 254, 510 and 900 s.
    """

    base: float = 2.0
    window: float = 900.0
    jitter: Callable[[], float] = field(default=lambda: random.uniform(0.75, 1.25))

    def next_attempt_at(self, attempts: int, failing_since: float, now: float) -> float | None:
        """When to try again after `attempts` failed attempts, or None to give up.

        `failing_since` is when the failures of this delivery (or of the conversation it
        waits behind) started.
        """
        deadline = failing_since + self.window
        if now >= deadline:
            return None
        delay = self.base * (2 ** max(0, attempts - 1)) * self.jitter()
        return min(now + delay, deadline)


@dataclass
class CompletedBatch:
    """What happened to each row of a finished batch."""

    delivered: list[PendingDelivery] = field(default_factory=list)
    failed: list[PendingDelivery] = field(default_factory=list)
    retried: list[PendingDelivery] = field(default_factory=list)


class WebhookQueue:
    """The pending rows of one webhook, ordered per conversation.

    Invariant: at most one batch per conversation is in flight, and a batch always carries a
    conversation's oldest pending rows, in order; so an event is never delivered before an
    earlier event of its conversation has been delivered or given up. Conversations whose
    head row is due wait in `ready` (fresh ones and retries apart: a retry goes out alone with
    its conversation, so one conversation the receiver keeps rejecting cannot hold others
    back); the others wait in a heap by due time.
    """

    def __init__(self, webhook_id: str, app_id: str) -> None:
        self.webhook_id = webhook_id
        self.app_id = app_id
        self._rows: dict[str, deque[PendingDelivery]] = {}
        self._ready_fresh: dict[str, None] = {}  # ordered sets of conversation ids
        self._ready_retry: dict[str, None] = {}
        self._waiting: list[tuple[float, str]] = []  # (due time, conversation); stale entries are skipped
        self._inflight: set[str] = set()
        self._failing_since: dict[str, float] = {}
        self.inflight_batches = 0
        # Rows waiting (not in flight).
        self.pending = 0

    def add(self, row: PendingDelivery, now: float) -> None:
        """Append a row (rows of one conversation must be added in event order)."""
        rows = self._rows.get(row.conversation_id)
        self.pending += 1
        if rows:
            rows.append(row)
            return
        self._rows[row.conversation_id] = deque([row])
        if row.conversation_id not in self._inflight:
            self._schedule(row.conversation_id, now)

    def _schedule(self, conversation_id: str, now: float) -> None:
        head = self._rows[conversation_id][0]
        if head.next_attempt_at <= now:
            target = self._ready_retry if head.attempts > 0 else self._ready_fresh
            target[conversation_id] = None
        else:
            heapq.heappush(self._waiting, (head.next_attempt_at, conversation_id))

    def _promote(self, now: float) -> None:
        while self._waiting and self._waiting[0][0] <= now:
            _, conversation_id = heapq.heappop(self._waiting)
            rows = self._rows.get(conversation_id)
            if (not rows or conversation_id in self._inflight or conversation_id in self._ready_fresh
                    or conversation_id in self._ready_retry):
                continue
            self._schedule(conversation_id, now)

    def next_due(self) -> float | None:
        """The earliest time a waiting conversation may become ready (may be early, never late)."""
        return self._waiting[0][0] if self._waiting else None

    def has_ready(self, now: float) -> bool:
        """True when `take_batch(now, ...)` would return rows."""
        self._promote(now)
        return bool(self._ready_fresh or self._ready_retry)

    def take_batch(self, now: float, max_events: int) -> list[PendingDelivery]:
        """The next rows to send in one envelope (their conversations become in flight)."""
        self._promote(now)
        batch: list[PendingDelivery] = []
        if self._ready_retry:
            conversation_id = next(iter(self._ready_retry))
            del self._ready_retry[conversation_id]
            self._take_rows(conversation_id, now, max_events, batch)
            return batch
        while self._ready_fresh and len(batch) < max_events:
            conversation_id = next(iter(self._ready_fresh))
            del self._ready_fresh[conversation_id]
            self._take_rows(conversation_id, now, max_events, batch)
        return batch

    def _take_rows(self, conversation_id: str, now: float, max_events: int,
                   batch: list[PendingDelivery]) -> None:
        rows = self._rows[conversation_id]
        while rows and len(batch) < max_events and rows[0].next_attempt_at <= now:
            batch.append(rows.popleft())
            self.pending -= 1
        self._inflight.add(conversation_id)

    def complete(self, batch: list[PendingDelivery], outcome: Outcome, now: float,
                 policy: RetryPolicy) -> CompletedBatch:
        """Apply an attempt's outcome to its rows and release their conversations.

        Rows to retry are put back at the head of their conversation with their new schedule;
        the caller persists the returned changes.
        """
        result = CompletedBatch()
        by_conversation: dict[str, list[PendingDelivery]] = {}
        for row in batch:
            row.attempts += 1
            if row.first_attempt_at is None:
                row.first_attempt_at = now
            by_conversation.setdefault(row.conversation_id, []).append(row)
        for conversation_id, rows in by_conversation.items():
            if outcome == "delivered":
                self._failing_since.pop(conversation_id, None)
                result.delivered.extend(rows)
            elif outcome == "failed":
                result.failed.extend(rows)
            else:
                self._retry_rows(conversation_id, rows, now, policy, result)
            self._release(conversation_id, now)
        return result

    def _retry_rows(self, conversation_id: str, rows: list[PendingDelivery], now: float,
                    policy: RetryPolicy, result: CompletedBatch) -> None:
        # A conversation keeps its failure start across rows: once its head has been given up
        # after the whole window, the rows behind it get one attempt each, not a window each,
        # so a dead receiver cannot pile up rows forever.
        first = min(r.first_attempt_at or now for r in rows)
        since = min(self._failing_since.get(conversation_id, first), first)
        self._failing_since[conversation_id] = since
        requeue: list[PendingDelivery] = []
        for row in rows:
            row_since = min(since, row.first_attempt_at or now)
            next_at = policy.next_attempt_at(row.attempts, row_since, now)
            if next_at is None:
                result.failed.append(row)
                continue
            row.next_attempt_at = next_at
            requeue.append(row)
        if requeue:
            result.retried.extend(requeue)
            self.pending += len(requeue)
            self._rows.setdefault(conversation_id, deque()).extendleft(reversed(requeue))

    def _release(self, conversation_id: str, now: float) -> None:
        self._inflight.discard(conversation_id)
        rows = self._rows.get(conversation_id)
        if rows:
            self._schedule(conversation_id, now)
        else:
            self._rows.pop(conversation_id, None)
            self._failing_since.pop(conversation_id, None)

    def forget(self, conversation_ids: Iterable[str], before: float | None, event_id: str | None = None) -> int:
        """Drop the waiting rows of these conversations (of events before `before`, None = all;
        only those of `event_id` when given) after a privacy event; rows in flight finish. The
        number dropped."""
        dropped = 0
        for conversation_id in conversation_ids:
            rows = self._rows.get(conversation_id)
            if not rows:
                continue
            if event_id is not None:
                kept = deque(r for r in rows if r.event_id != event_id)
            else:
                kept = deque(r for r in rows if before is not None and r.happened_at >= before)
            dropped += len(rows) - len(kept)
            if kept:
                self._rows[conversation_id] = kept
                continue
            del self._rows[conversation_id]
            self._ready_fresh.pop(conversation_id, None)
            self._ready_retry.pop(conversation_id, None)
            if conversation_id not in self._inflight:
                self._failing_since.pop(conversation_id, None)
        self.pending -= dropped
        return dropped

    def conversation_ids(self) -> list[str]:
        """The conversations with rows waiting here."""
        return list(self._rows)

    def is_idle(self) -> bool:
        """True when nothing is pending or in flight."""
        return not self._rows and not self._inflight
