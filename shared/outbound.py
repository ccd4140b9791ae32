"""Pieces every channel service's send loop shares (consume `OutboundSend` → send → report)."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import aiohttp
import msgspec
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared import metrics
from shared.bus import Bus, Delivery, Retry, refusal
from shared.config import ConfigError, env_float, env_int
from shared.egress import REFUSED_CODE, EgressRefused, EgressSession
from shared.messages import channel as channel_messages
from shared.messages.channel import DeliveryStatus, OutboundActivity, OutboundSend
from shared.retry import backoff_delay
from shared.telemetry import inject_headers, log_fields, tracer

log = logging.getLogger(__name__)
_tracer = tracer(__name__)
# A typing or read state older than this is not shown any more (it would only mislead).
ACTIVITY_MAX_AGE_SECONDS = 30.0

K = TypeVar("K")
V = TypeVar("V")


class _Route(msgspec.Struct):
    integration_id: str = ""
    recipient: str = ""


_ROUTE_DECODER = msgspec.json.Decoder(_Route)


def recipient_key(_subject: str, data: bytes) -> str:
    """Ordering key of a send command (for `Bus.consume`): one recipient on one integration.

    Decodes only the two fields it needs, so ordering costs little per message.
    """
    try:
        route = _ROUTE_DECODER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return "undecodable"
    return f"{route.integration_id}:{route.recipient}"


class BoundedMemory(OrderedDict[K, V], Generic[K, V]):
    """A dict that forgets its oldest entries beyond `limit`.

    Channel services remember what they already sent (message id → provider id), so a
    redelivered command reports again instead of messaging the customer twice.
    """

    def __init__(self, limit: int = 10_000) -> None:
        super().__init__()
        self.limit = limit

    def remember(self, key: K, value: V) -> None:
        """Store `key` → `value`, evicting the oldest entries past the limit."""
        self[key] = value
        while len(self) > self.limit:
            self.popitem(last=False)


# --- the send path every platform channel shares ------------------------------------------------


@dataclass(frozen=True)
class SendSettings:
    """A channel's retry, attempt and timeout settings (`<PREFIX>_RETRY_BASE_SECONDS`, …)."""

    # Back-off for transient send errors: base * 2^(attempt-1), capped.
    retry_base_seconds: float = 1.0
    retry_max_seconds: float = 60.0
    max_send_attempts: int = 10
    send_timeout_seconds: float = 15.0

    @classmethod
    def from_env(cls, prefix: str, environ: Mapping[str, str]) -> SendSettings:
        """Read and validate `<prefix>_RETRY_BASE_SECONDS`, `_RETRY_MAX_SECONDS`,
        `_MAX_SEND_ATTEMPTS` and `_SEND_TIMEOUT_SECONDS` (ConfigError naming the variable)."""
        defaults = cls()
        settings = cls(
            retry_base_seconds=env_float(f"{prefix}_RETRY_BASE_SECONDS", defaults.retry_base_seconds, environ),
            retry_max_seconds=env_float(f"{prefix}_RETRY_MAX_SECONDS", defaults.retry_max_seconds, environ),
            max_send_attempts=env_int(f"{prefix}_MAX_SEND_ATTEMPTS", defaults.max_send_attempts, environ),
            send_timeout_seconds=env_float(f"{prefix}_SEND_TIMEOUT_SECONDS", defaults.send_timeout_seconds, environ),
        )
        if settings.retry_base_seconds < 0 or settings.retry_max_seconds < settings.retry_base_seconds:
            raise ConfigError(f"{prefix}_RETRY_BASE_SECONDS must be >= 0 and <= {prefix}_RETRY_MAX_SECONDS")
        if settings.max_send_attempts < 1:
            raise ConfigError(f"{prefix}_MAX_SEND_ATTEMPTS must be at least 1")
        if not settings.send_timeout_seconds > 0:
            raise ConfigError(f"{prefix}_SEND_TIMEOUT_SECONDS must be positive")
        return settings

    def client_timeout(self) -> aiohttp.ClientTimeout:
        """The timeout of one platform call."""
        return aiohttp.ClientTimeout(total=self.send_timeout_seconds)

    def backoff(self, attempt: int) -> float:
        """The delay before the delivery after the `attempt`-th (1-based)."""
        return backoff_delay(attempt, self.retry_base_seconds, self.retry_max_seconds)


class SendFailure(Exception):
    """A send the platform refused, or that never reached it: a channel's subclass carries the
    platform's own fields and says what is reported (`status_error`) and whether to retry."""

    transient: bool = False
    # The delay the platform asked for (a Telegram 429's `retry_after`), which beats the back-off.
    retry_after: float | None = None

    def status_error(self) -> tuple[str, str, str | None]:
        """The (error code, title, details) a `failed` DeliveryStatus reports."""
        return type(self).__name__, str(self), None


@dataclass
class CodedSendFailure(SendFailure):
    """A failure whose platform answers with a numeric error code and a title (Graph API,
    Twilio): reported with that code, else `http_<status>` (`http_0`: unreachable)."""

    http_status: int
    code: int | None
    title: str
    details: str | None = None
    transient: bool = False

    def __str__(self) -> str:
        return f"HTTP {self.http_status} code {self.code}: {self.title}"

    def error_code(self) -> str:
        """The error code a `failed` status reports."""
        return str(self.code) if self.code is not None else f"http_{self.http_status}"

    def status_error(self) -> tuple[str, str, str | None]:
        return self.error_code(), self.title, self.details


class UnsendableContent(ValueError):
    """The content has no representation on a channel (a permanent failure): a channel's `plan`
    raises its subclass, reported `failed` with `unsupported_content`."""


class Unsendable(Exception):
    """A send the channel will not make, whatever the retries (content the platform cannot
    carry, a closed reply window): reported `failed` at once with this code, title and details."""

    def __init__(self, code: str, title: str, details: str | None = None) -> None:
        super().__init__(title)
        self.code = code
        self.title = title
        self.details = details


@dataclass(frozen=True)
class PlatformRequest:
    """One HTTP call to a platform's API, as a channel builds it."""

    url: str
    body: bytes
    headers: Mapping[str, str]
    span_name: str
    # Span attributes beside the method, address and status (no secrets: spans are exported).
    attributes: Mapping[str, str] = field(default_factory=dict)
    server_address: str = ""


C = TypeVar("C")
P = TypeVar("P")


class ChannelSender(ABC, Generic[C, P]):
    """The whole outbound path of a channel: decode a send command, never send it twice (a
    redelivery of a sent command reports again; one still being sent waits), find the
    integration's credentials (waiting a while for a KV mirror that lags), plan the parts, pace
    them, deliver each, back off on a transient failure (or wait the `retry_after` the platform
    asked for) and report the outcome as a DeliveryStatus.

    A channel subclasses it with only its own parts: its plan (`plan`), how one part is delivered
    (`deliver`; `HttpChannelSender` for the platforms with an HTTP API), its pacing (`pace`) and,
    where it keeps any, its record of sent parts (`done_parts`, `part_sent`) — `C` is its
    credentials type, `P` one planned part's type.
    """

    channel: str = ""

    def __init__(self, bus: Bus, settings: SendSettings, credentials: Callable[[str], C | None]) -> None:
        self.bus = bus
        self.settings = settings
        # The usable credentials of an integration of this channel, or None.
        self.credentials = credentials
        self.sent: BoundedMemory[str, str] = BoundedMemory()
        self.in_flight: set[str] = set()
        # Message id → its parts accepted so far (index → provider id), until all are sent.
        self.parts: BoundedMemory[str, dict[int, str]] = BoundedMemory()

    # --- what a channel supplies ---------------------------------------------------------

    @abstractmethod
    def unknown_integration(self) -> SendFailure:
        """The (transient) failure of a command whose integration is unknown or inactive."""

    @abstractmethod
    async def plan(self, command: OutboundSend, creds: C) -> list[P]:
        """The parts that carry `command`, in order (at least one); UnsendableContent when
        its content has no form on the channel, Unsendable when it may not be sent for another
        reason (a closed reply window)."""

    @abstractmethod
    async def deliver(self, creds: C, part: P) -> str:
        """Send one planned part; the provider's id of it (SendFailure when it was not accepted,
        EgressRefused when the egress policy refuses where it would go)."""

    async def pace(self, command: OutboundSend, creds: C, part: P) -> None:
        """Wait for the platform's rate limits before sending `part` (raise Retry to come back)."""

    async def done_parts(self, command: OutboundSend) -> dict[int, str]:
        """The parts of `command` sent on an earlier delivery (index → provider id); remembered
        in this process unless the channel keeps a record of its own."""
        return dict(self.parts.get(command.message_id) or {})

    async def part_sent(self, command: OutboundSend, creds: C, index: int, provider_id: str,
                        started: float) -> None:
        """Record that part `index` of `command` was accepted, so a redelivery (a transient
        failure on a later part) sends only the rest."""
        self.parts.remember(command.message_id, {**(self.parts.get(command.message_id) or {}), index: provider_id})

    def failed_once(self, command: OutboundSend, failure: SendFailure) -> None:
        """Note a failed attempt before it is retried or given up (e.g. pause the chat)."""

    def sent_once(self, command: OutboundSend, provider_id: str) -> None:
        """Note that `command` went out (e.g. map the provider id back to it)."""

    async def show_activity(self, activity: OutboundActivity) -> None:
        """Show the business's typing or read state where the channel can (nowhere by default)."""

    # --- the path itself ------------------------------------------------------------------

    async def on_outbound(self, data: bytes, _headers: Mapping[str, str], delivery: Delivery) -> None:
        """The consumer handler of the channel's send commands (`Bus.consume`)."""
        command = decode_send(data)
        if command is None:
            return
        if isinstance(command, OutboundActivity):
            await self.show_activity(command)
            return
        done = self.sent.get(command.message_id)
        if done is not None:
            await self.report(sent_status(self.channel, command, done))
            return
        if command.message_id in self.in_flight:
            # A redelivery while the first delivery still waits or sends: never send twice.
            raise Retry(1.0, "already being sent")
        creds = self.credentials(command.integration_id)
        if creds is None:
            # The KV mirror may lag behind a just-created integration: retry a while first.
            await self.retry_or_fail(command, delivery, self.unknown_integration())
            return
        try:
            try:
                parts = await self.plan(command, creds)
            except UnsendableContent as exc:
                raise Unsendable("unsupported_content", str(exc)) from exc
        except Unsendable as refusal:
            log.info("not sending message %s: %s", command.message_id, refusal.title,
                     extra=log_fields(integration_id=command.integration_id, message_id=command.message_id))
            await self.report(failed_status(self.channel, command, refusal.code, refusal.title, refusal.details))
            return
        self.in_flight.add(command.message_id)
        try:
            sent = await self.done_parts(command)
            for index, part in enumerate(parts):
                if index in sent:
                    continue
                await self.pace(command, creds, part)
                started = time.time()
                provider_id = await self.deliver(creds, part)
                await self.part_sent(command, creds, index, provider_id, started)
                sent[index] = provider_id
        except EgressRefused as exc:
            await self.report(failed_status(self.channel, command, REFUSED_CODE, str(exc)))
            return
        except SendFailure as failure:
            self.failed_once(command, failure)
            await self.retry_or_fail(command, delivery, failure)
            return
        finally:
            self.in_flight.discard(command.message_id)
        provider_id = sent[0]
        self.parts.pop(command.message_id, None)
        self.sent.remember(command.message_id, provider_id)
        self.sent_once(command, provider_id)
        await self.report(sent_status(self.channel, command, provider_id))

    async def retry_or_fail(self, command: OutboundSend, delivery: Delivery, failure: SendFailure) -> None:
        """Have the command redelivered after a back-off while a retry can help and attempts
        remain; otherwise report it `failed`."""
        if failure.transient and delivery.num_delivered < self.settings.max_send_attempts:
            metrics.message_out(self.channel, "retried")
            delay = failure.retry_after if failure.retry_after is not None else self.settings.backoff(
                delivery.num_delivered)
            raise Retry(delay, str(failure))
        log.warning("giving up on message %s: %s", command.message_id, failure)
        code, title, details = failure.status_error()
        await self.report(failed_status(self.channel, command, code, title, details))

    async def report(self, status: DeliveryStatus) -> None:
        """Publish a status of a send (de-duplicated per message and status)."""
        metrics.message_out(status.channel, status.status)
        await self.bus.publish(channel_messages.subject_of(status), channel_messages.encode(status),
                               msg_id=send_status_msg_id(status))


class HttpChannelSender(ChannelSender[C, P]):
    """`ChannelSender` for a platform with an HTTP API: each part is one POST (`request`) inside
    its client span, through the egress session; the channel supplies its wire format
    (`request`, `parse_response`), its error table (`classify_error`, `unreachable`) and the
    call that shows the business's activity (`activity_request`)."""

    def __init__(self, bus: Bus, session: EgressSession, settings: SendSettings,
                 credentials: Callable[[str], C | None]) -> None:
        super().__init__(bus, settings, credentials)
        self.session = session

    @abstractmethod
    def request(self, creds: C, part: P) -> PlatformRequest:
        """The HTTP call of one planned part."""

    @abstractmethod
    def classify_error(self, http_status: int, body: bytes) -> SendFailure:
        """The failure a non-accepted answer means (transient when a retry can help)."""

    @abstractmethod
    def unreachable(self, exc: Exception) -> SendFailure:
        """The (transient) failure of a call that never got an answer."""

    @abstractmethod
    def parse_response(self, body: bytes) -> str:
        """The provider's id of the message an accepted answer carries (SendFailure if none)."""

    def accepted(self, http_status: int) -> bool:
        """Whether the platform accepted the call (most answer 200)."""
        return http_status == 200

    def activity_request(self, creds: C, activity: OutboundActivity) -> PlatformRequest | None:
        """The call that shows the business's typing or read state, None where the platform
        has none for it."""
        return None

    async def deliver(self, creds: C, part: P) -> str:
        return self.parse_response(await self.post(self.request(creds, part)))

    async def show_activity(self, activity: OutboundActivity) -> None:
        """Show the business's typing or read state once; a failure is logged, never retried
        (a typing indicator shown late is worse than none)."""
        creds = self.credentials(activity.integration_id)
        if creds is None or time.time() - activity.created_at > ACTIVITY_MAX_AGE_SECONDS:
            return
        request = self.activity_request(creds, activity)
        if request is None:
            return
        try:
            await self.post(request)
        except (SendFailure, EgressRefused) as exc:
            log.info("%s activity not shown: %s", activity.activity, exc, extra=log_fields(
                integration_id=activity.integration_id, conversation_id=activity.conversation_id))

    async def post(self, request: PlatformRequest) -> bytes:
        """POST `request` inside a client span; the answer's body once accepted, else the
        channel's SendFailure (EgressRefused when the egress policy refuses the URL)."""
        with _tracer.start_as_current_span(request.span_name, kind=SpanKind.CLIENT) as span:
            span.set_attribute("http.request.method", "POST")
            span.set_attribute("server.address", request.server_address)
            for name, value in request.attributes.items():
                span.set_attribute(name, value)
            try:
                async with self.session.post(request.url, data=request.body,
                                             headers=inject_headers(dict(request.headers))) as resp:
                    payload = await resp.read()
                    span.set_attribute("http.response.status_code", resp.status)
                    if not self.accepted(resp.status):
                        failure = self.classify_error(resp.status, payload)
                        span.set_status(Status(StatusCode.ERROR, str(failure)))
                        raise failure
                    return payload
            except (aiohttp.ClientError, TimeoutError) as exc:
                # Only the exception's type in the span, and no chained traceback: some platforms
                # put the token in the URL; the channel's failure says what may be said.
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise self.unreachable(exc) from None


def decode_send(data: bytes) -> OutboundSend | OutboundActivity | None:
    """The send command or business activity in a message of an outbound stream (None: another
    kind of channel message, not for a send loop); Poison when it cannot be decoded at all,
    FromNewerVersion when it is of a type this version does not know."""
    try:
        command = channel_messages.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise refusal(data, exc, channel_messages.TYPES, "outbound command") from exc
    return command if isinstance(command, OutboundSend | OutboundActivity) else None


def sent_status(channel: str, send: OutboundSend, provider_id: str, at: float | None = None) -> DeliveryStatus:
    """The `sent` status reported when the platform accepted a message."""
    return DeliveryStatus(app_id=send.app_id, integration_id=send.integration_id, channel=channel,
                          provider_message_id=provider_id, status="sent", timestamp=time.time() if at is None else at,
                          message_id=send.message_id, conversation_id=send.conversation_id)


def failed_status(channel: str, send: OutboundSend, error_code: str, title: str, details: str | None = None,
                  at: float | None = None) -> DeliveryStatus:
    """The `failed` status reported when a send is given up (no provider id exists then)."""
    return DeliveryStatus(app_id=send.app_id, integration_id=send.integration_id, channel=channel,
                          provider_message_id="", status="failed", timestamp=time.time() if at is None else at,
                          message_id=send.message_id, conversation_id=send.conversation_id,
                          error_code=error_code, error_title=title, error_details=details)


def send_status_msg_id(status: DeliveryStatus) -> str:
    """De-duplication id of a status the send path reports (keyed by our message id).

    Distinct from the ids of statuses a platform's webhook reports (`whatsapp:{wamid}:{status}`):
    whichever arrives first, the one that carries our message id is never dropped as a duplicate.
    """
    return f"{status.channel}:send:{status.message_id}:{status.status}"
