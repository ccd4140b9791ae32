"""Notification logic on decoded structs: scheduling, the fire-time decision, sends, statuses, opt-ins.

Nothing here subscribes to anything: `app.py` feeds events, statuses and requests in, and the
timer calls `fire_due`. Dependencies (the bus, KV mirrors, e-mail, the clock) are injected.

The decision when a notification falls due (SunCo's automatic delivery rule, sunshine.md §4.4):
1. the app's notifications are enabled and it is not quiet hours (else postponed to their end);
2. the replies are still unread (the pending row exists: a read or a customer message deleted
   it; `conversations`' read state is checked again);
3. the primary client (first of `clientAssociations`) is the web messenger and no socket of the
   customer is open on the conversation (an open one postpones by the delay). A primary app
   client is left to the app's own push; a primary messaging channel already got the reply;
4. the target is a confirmed opt-in of the customer (they asked for it: it comes first), else the
   next client in `clientAssociations` order that is active and reachable; each channel's reply
   window decides free text, template, tag, or no send (then the next target is tried);
5. nothing sendable → a `notification:delivery:failure` event with the reason, never a send that
   breaks a platform's policy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import html
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import nats.errors

from services.notifications import limits, policy
from services.notifications.config import NotificationsConfig
from services.notifications.store import OptInRow, PendingRow, SendRow, Store
from shared import mailreply, subjects
from shared import mailsend as email_out
from shared.bus import Delivery, FromNewerVersion, RequestFailed, refusal
from shared.clientip import source_key
from shared.config import Rate
from shared.ids import derived_id, new_id
from shared.messages import channel as chan
from shared.messages import conversation as conv
from shared.messages import handoff
from shared.messages import identity as ident
from shared.messages import notification as note
from shared.records import AppRecord, IntegrationRecord, NotificationSettings, WhatsappTemplate
from shared.sunco import (
    ConversationRef,
    DeliveryError,
    Destination,
    FileContent,
    ImageContent,
    LocationContent,
    TemplateContent,
    TextContent,
    UserRef,
)
from shared.telemetry import log_fields
from shared.untrusted import is_email_address, secrets_equal

log = logging.getLogger(__name__)

APP_INTEGRATION_TYPES = frozenset({"android", "ios"})
CHANNEL_CLIENT_TYPES = frozenset({"whatsapp", "messenger", "telegram", "twilio"})
PHONE_CHANNELS = frozenset({"whatsapp", "twilio"})
# Opt-ins whose address becomes a client of the conversation once confirmed, so that the
# customer's messages from it (a text, a reply to the notification e-mail) continue it.
LINKED_CHANNELS = PHONE_CHANNELS | {"email"}
RETRY_SECONDS = 5.0
MAX_FIRE_ATTEMPTS = 12
LINK_RETRY_SECONDS = 30.0
PRUNE_LIMITS_SECONDS = 600.0
STOP_WORDS = frozenset({"stop", "stopall", "unsubscribe"})
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
RE_ENGAGEMENT_ERROR = "131047"

EmailSender = Callable[..., Awaitable[str]]


class Publisher(Protocol):
    """What the handlers need from the bus."""

    async def publish(self, subject: str, data: bytes, *, msg_id: str | None = None,
                      headers: Mapping[str, str] | None = None) -> Any: ...

    async def request(self, subject: str, data: bytes, *, timeout: float = 5.0) -> bytes: ...


class Unavailable(Exception):
    """A service this one asks did not answer: try again later."""


@dataclass(frozen=True)
class Lookups:
    """Read-only views the handlers need (KV mirrors in the service, dicts in tests)."""

    app: Callable[[str], AppRecord | None]
    integration: Callable[[str], IntegrationRecord | None]
    integrations: Callable[[], Iterable[IntegrationRecord]]
    # Whether the user has an SDK socket open on the conversation (`shared.presence.PresenceIndex`).
    connected: Callable[[str, str], bool]


@dataclass(frozen=True)
class Target:
    """Where a notification may go: a client of the conversation or a confirmed opt-in."""

    channel: str  # whatsapp | messenger | telegram | twilio | email | android | ios
    integration_id: str
    recipient: str
    client_id: str = ""
    recipient_info: Mapping[str, Any] | None = None
    optin_id: str | None = None


def new_notification_id() -> str:
    """The id of a new notification (and of its send: the OutboundSend's Nats-Msg-Id)."""
    return f"{note.NOTIFICATION_ID_PREFIX}{new_id()}"


def digits(value: str | None) -> str:
    """The digits of a phone number (or of anything)."""
    return "".join(c for c in value or "" if c.isdigit())


def message_text(message: Any) -> str:
    """A one-line rendering of a message's content for a notification."""
    content = message.content
    if isinstance(content, TextContent):
        return content.text or "[message]"
    if isinstance(content, ImageContent):
        return content.text or "[image]"
    if isinstance(content, FileContent):
        return content.text or "[file]"
    if isinstance(content, LocationContent):
        return "[location]"
    if isinstance(content, TemplateContent):
        return "[message]"
    return "[message]"


def mask(channel: str, address: str) -> str:
    """An address as the customer may see it again: `+1•••••4567`, `a•••@example.com`."""
    if channel == "email":
        local, _, domain = address.partition("@")
        return f"{local[:1]}•••@{domain}"
    return f"{address[:2]}{'•' * max(0, len(address) - 6)}{address[-4:]}"


def code_hash(secret: str, optin_id: str, code: str) -> str:
    """How a confirmation code is kept (never in clear)."""
    return hmac.new(secret.encode(), f"{optin_id}:{code}".encode(), hashlib.sha256).hexdigest()


def optout_token(secret: str, optin_id: str) -> str:
    """The signed token of an opt-out link."""
    signature = hmac.new(secret.encode(), f"optout:{optin_id}".encode(), hashlib.sha256).hexdigest()[:32]
    return f"{optin_id}.{signature}"


def optin_of_token(secret: str, token: str) -> str | None:
    """The opt-in an opt-out token names, None when the signature does not match."""
    optin_id, _, _signature = token.partition(".")
    if not optin_id or not secrets_equal(optout_token(secret, optin_id), token):
        return None
    return optin_id


def is_stop(text: str) -> bool:
    """A customer's STOP (case-insensitive, alone in the message)."""
    return text.strip().strip(".!").casefold() in STOP_WORDS


class Notifier:
    """Away notifications and opt-ins."""

    def __init__(self, store: Store, bus: Publisher, config: NotificationsConfig, lookups: Lookups, *,
                 email_sender: EmailSender | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.bus = bus
        self.config = config
        self.lookups = lookups
        self.clock = clock
        self._email_sender = email_sender
        self._next_link_retry = 0.0
        self._next_prune = 0.0
        # The partitions of the events stream this replica holds: it fires their conversations'
        # notifications, and no other replica does (shared.partitions).
        self.partitions: set[int] = set()
        self._firing = asyncio.Lock()

    # --- helpers ----------------------------------------------------------------------------

    def settings(self, app_id: str) -> NotificationSettings:
        """The app's notification settings (defaults when the app has none)."""
        record = self.lookups.app(app_id)
        return record.notification_settings() if record is not None else NotificationSettings()

    def delay(self, settings: NotificationSettings) -> float:
        return float(settings.delay_seconds) if settings.delay_seconds else self.config.default_delay_seconds

    def business_name(self, app_id: str) -> str:
        """How the business is named to customers: the web messenger's businessName, else the app's name."""
        for record in self.lookups.integrations():
            if record.app_id == app_id and record.type == "web":
                name = record.config.get("businessName")
                if isinstance(name, str) and name:
                    return name
        app = self.lookups.app(app_id)
        return app.display_name if app is not None and app.display_name else "us"

    def first_integration(self, app_id: str, type_: str) -> IntegrationRecord | None:
        candidates = sorted((r for r in self.lookups.integrations()
                             if r.app_id == app_id and r.type == type_ and r.status in ("active", "")),
                            key=lambda r: r.id)
        return candidates[0] if candidates else None

    async def _ask(self, subject: str, data: bytes) -> bytes:
        try:
            return await self.bus.request(subject, data, timeout=self.config.request_timeout)
        except (nats.errors.Error, TimeoutError, RequestFailed) as exc:
            raise Unavailable(f"{subject}: {exc or type(exc).__name__}") from exc

    async def send_email(self, integration: IntegrationRecord, to: str, subject: str, text: str,
                         html_body: str | None, unsubscribe_url: str | None,
                         headers: Mapping[str, str] | None = None) -> str:
        sender = self._email_sender
        if sender is None:
            sender = email_out.send_email
        return await sender(integration, to, subject, text, html_body, unsubscribe_url=unsubscribe_url,
                            headers=headers)

    def email_errors(self) -> tuple[type[Exception], type[Exception]]:
        return email_out.EmailTransientError, email_out.EmailPermanentError

    # --- events -----------------------------------------------------------------------------

    async def on_event(self, data: bytes, _headers: Mapping[str, str], _delivery: Delivery) -> None:
        """Consumer of the conversation events: schedule on business replies, cancel on reads and customer messages."""
        try:
            event = conv.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return  # an event type this version does not know: nothing to notify about
        await self.handle_event(event)

    async def handle_event(self, event: conv.ConversationUnion) -> None:
        forget = conv.erasure(event)
        if forget is not None:  # retention, a deleted user or their personal information
            deleted = await self.store.forget(forget)
            log.info("forgot %d notification row(s) after a privacy event", deleted)
            return
        if isinstance(event, conv.MessageCreated):
            if event.message.author.type == "business":
                await self._business_message(event)
            else:
                await self._customer_message(event)
        elif isinstance(event, conv.ActivityPosted):
            author = event.activity.author
            if event.activity.type == "conversation:read" and author is not None and author.type == "user":
                if await self.store.cancel(event.conversation_id):
                    log.info("conversation %s read: notification cancelled", event.conversation_id)
        elif isinstance(event, conv.DeliveryReported):
            if event.read and not note.is_notification_id(event.message_id):
                await self.store.cancel(event.conversation_id)  # read on the channel it went to

    async def _business_message(self, event: conv.MessageCreated) -> None:
        if not event.user_id:
            return  # a conversation without a participant: nobody to notify
        settings = self.settings(event.app_id)
        if not settings.enabled:
            return
        await self.store.schedule(
            app_id=event.app_id, conversation_id=event.conversation_id, conversation_type=event.conversation.type,
            user_id=event.user_id, message_id=event.message.id, text=message_text(event.message),
            at=event.created_at, delay=self.delay(settings), new_notification_id=new_notification_id())

    async def _customer_message(self, event: conv.MessageCreated) -> None:
        source = event.message.source
        client = source.client if source is not None else None
        await self.store.customer_wrote(event.conversation_id, None if client is None else client.id, event.app_id,
                                        event.user_id, event.created_at)
        if client is None:
            return
        content = event.message.content
        if client.type in PHONE_CHANNELS and isinstance(content, TextContent) and is_stop(content.text):
            await self._stop_by_reply(event.app_id, event.user_id, client.type, client.external_id)

    async def _stop_by_reply(self, app_id: str, user_id: str, channel: str, external_id: str | None) -> None:
        """STOP on SMS/WhatsApp ends the opt-ins of that number (the message still reaches the business).

        The number's client may belong to another user than the opt-in's (the link is made by
        `conversations`), so opt-ins are found by number; a WhatsApp client keyed by a BSUID
        (no number) stops the user's own WhatsApp opt-ins.
        """
        number = digits(external_id)
        if len(number) >= 7:
            found = [o for o in await self.store.active_optins(app_id, channel) if digits(o.address) == number]
        else:
            found = [o for o in await self.store.optins(app_id, user_id)
                     if o.channel == channel and o.status != "stopped"]
        at = self.clock()
        for optin in found:
            await self.store.stop_optin(optin.id, at)
            log.info("opt-in %s stopped by a STOP reply", optin.id)

    # --- firing -----------------------------------------------------------------------------

    async def acquire(self, partition: int) -> None:
        """This replica now fires the notifications of `partition`'s conversations."""
        self.partitions.add(partition)

    async def release(self, partition: int) -> None:
        """Another replica fires `partition`'s notifications from now on (after the pass in hand)."""
        self.partitions.discard(partition)
        async with self._firing:
            pass

    async def fire_due(self) -> int:
        """Fire every pending notification of this replica's partitions that fell due; the number handled."""
        handled = 0
        async with self._firing:
            for row in await self.store.due(self.clock(), set(self.partitions)):
                if subjects.partition_of(row.conversation_id) not in self.partitions:
                    continue  # released since the query
                try:
                    await self.fire(row)
                except Unavailable as exc:
                    await self._retry_later(row, str(exc))
                except Exception:
                    log.exception("notification %s failed", row.notification_id)
                    await self._retry_later(row, "internal error")
                handled += 1
        await self._link_confirmed_optins()
        await self._prune_limits()
        return handled

    async def _prune_limits(self) -> None:
        now = self.clock()
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_LIMITS_SECONDS
        await self.store.prune_hits(now - self.config.longest_limit_window)

    async def _retry_later(self, row: PendingRow, reason: str) -> None:
        if row.attempts + 1 >= MAX_FIRE_ATTEMPTS:
            log.warning("giving up notification %s: %s", row.notification_id, reason)
            await self._failure(row, None, "service_unavailable", f"Could not decide on the notification: {reason}")
            await self.store.finish(row.conversation_id, row.notification_id)
            return
        await self.store.postpone(row.conversation_id, row.notification_id, self.clock() + RETRY_SECONDS,
                                  failed_attempt=True)

    async def fire(self, row: PendingRow) -> None:
        """Decide and send one due notification (see the module docstring)."""
        now = self.clock()
        settings = self.settings(row.app_id)
        if not settings.enabled:
            await self.store.finish(row.conversation_id, row.notification_id)
            return
        quiet_end = policy.quiet_until(now, settings.quiet_hours)
        if quiet_end is not None:
            await self.store.postpone(row.conversation_id, row.notification_id, quiet_end)
            return
        participant = await self._participant(row)
        if participant is None or (participant.last_read is not None
                                   and participant.last_read >= row.first_unread_at):
            await self.store.finish(row.conversation_id, row.notification_id)
            return
        clients = participant.clients
        if not clients:
            await self.store.finish(row.conversation_id, row.notification_id)
            return
        primary = clients[0]
        if not self._notifies_from(primary):
            # An app (its push is the notification) or a messaging channel (the reply is on the phone).
            await self.store.finish(row.conversation_id, row.notification_id)
            return
        if self._connected(row.user_id, row.conversation_id):
            await self.store.postpone(row.conversation_id, row.notification_id, now + self.delay(settings))
            return
        targets = await self._targets(row, clients[1:])
        notice = await self._notice(row, primary)
        first_skip: tuple[Target, policy.Skip] | None = None
        for target in targets:
            decision = await self._decide(target, now, settings, notice, clients)
            if not isinstance(decision, policy.Skip) and target.optin_id:
                decision = await self._within_send_limits(row, target, decision)
            if isinstance(decision, policy.Skip):
                first_skip = first_skip or (target, decision)
                continue
            sent = await self._send(row, target, decision, notice)
            if sent:
                return
        if first_skip is not None:
            target, skip = first_skip
            log.info("notification %s not sent: %s", row.notification_id, skip.reason)
            await self._failure(row, target, skip.code, skip.reason)
        await self.store.finish(row.conversation_id, row.notification_id)

    async def _within_send_limits(self, row: PendingRow, target: Target,
                                  decision: policy.Decision) -> policy.Decision:
        """An opted-in address (typed by a customer) gets at most so many notifications, and
        an app sends at most so many to such addresses: past that the target is skipped."""
        refusal = await self.store.take(self.send_counters(row.app_id, target.channel, target.recipient),
                                        self.clock())
        if refusal is None:
            return decision
        log.warning("notification not sent: limit reached", extra=log_fields(
            limit=refusal.scope, app_id=row.app_id, notification_id=row.notification_id, channel=target.channel,
            address=mask(target.channel, target.recipient), retry_after=refusal.retry_after))
        return policy.Skip("rate_limited", f"Too many notifications to this {target.channel} address or from "
                                           f"this app; the {refusal.scope} limit frees up in {refusal.retry_after} s")

    async def _participant(self, row: PendingRow) -> conv.ParticipantState | None:
        data = await self._ask(subjects.CONVERSATIONS_PARTICIPANTS, conv.ENCODER.encode(conv.GetParticipants(
            app_id=row.app_id, conversation_id=row.conversation_id)))
        reply = conv.decode_request(data)
        if isinstance(reply, conv.ConversationError):
            if reply.status == 404:
                return None
            raise Unavailable(f"conversations: {reply.title}")
        if not isinstance(reply, conv.ParticipantsReply):
            raise Unavailable(f"unexpected reply {type(reply).__name__}")
        for participant in reply.participants:
            if participant.user_id == row.user_id:
                return participant
        return reply.participants[0] if reply.participants else None

    def _integration_type(self, client: conv.ParticipantClient) -> str | None:
        if client.type != "sdk":
            return client.type
        record = self.lookups.integration(client.integration_id or "")
        return record.type if record is not None else None

    def _notifies_from(self, primary: conv.ParticipantClient) -> bool:
        """Only a web-messenger primary client needs a notification elsewhere (not push-capable)."""
        return primary.type == "sdk" and self._integration_type(primary) == "web"

    def _connected(self, user_id: str, conversation_id: str) -> bool:
        return self.lookups.connected(user_id, conversation_id)

    async def _client_statuses(self, app_id: str, user_id: str) -> dict[str, str]:
        try:
            data = await self._ask(subjects.IDENTITY_CLIENTS_LIST, ident.encode(ident.ListClients(
                app_id=app_id, user_id_or_external_id=user_id)))
            reply = ident.decode(data)
        except (Unavailable, msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise Unavailable(f"identity: {exc}") from exc
        if isinstance(reply, ident.ClientsReply):
            return {c.id: c.status for c in reply.clients}
        return {}

    async def _targets(self, row: PendingRow, others: list[conv.ParticipantClient]) -> list[Target]:
        """Confirmed opt-ins first (this conversation's, then the user's others), then the other clients."""
        targets: list[Target] = []
        optins = [o for o in await self.store.optins(row.app_id, row.user_id) if o.status == "confirmed"]
        optins.sort(key=lambda o: o.conversation_id != row.conversation_id)
        for optin in optins:
            record = self.lookups.integration(optin.integration_id)
            if record is None or record.status not in ("active", ""):
                continue
            targets.append(Target(channel=optin.channel, integration_id=optin.integration_id,
                                  recipient=optin.address, optin_id=optin.id))
        statuses = await self._client_statuses(row.app_id, row.user_id) if others else {}
        for client in others:
            if statuses.get(client.client_id, "active") != "active" or not client.integration_id:
                continue
            channel = self._integration_type(client)
            record = self.lookups.integration(client.integration_id)
            if channel is None or record is None or record.status not in ("active", ""):
                continue
            if client.type == "sdk" and channel not in APP_INTEGRATION_TYPES:
                continue  # another web messenger: no way to reach a closed page
            if client.type != "sdk" and channel not in CHANNEL_CLIENT_TYPES:
                continue
            if any(t.channel == channel and t.optin_id and digits(t.recipient) == digits(client.external_id)
                   for t in targets):
                continue  # the same number as a confirmed opt-in, already first
            targets.append(Target(channel=channel, integration_id=client.integration_id,
                                  recipient=client.external_id or "", client_id=client.client_id,
                                  recipient_info=client.info))
        return targets

    async def _notice(self, row: PendingRow, primary: conv.ParticipantClient) -> policy.Notice:
        return policy.Notice(business=self.business_name(row.app_id), reply_text=row.last_text,
                             unread_count=row.unread_count,
                             link=await self.web_link(row.app_id, row.user_id, row.conversation_id,
                                                      primary.integration_id))

    async def web_link(self, app_id: str, user_id: str, conversation_id: str,
                       web_integration_id: str | None) -> str | None:
        """A link back into the conversation in the web messenger (a handoff code the widget redeems)."""
        if web_integration_id is None:
            record = self.first_integration(app_id, "web")
            web_integration_id = record.id if record is not None else None
        if web_integration_id is None:
            return None
        try:
            data = await self._ask(subjects.HANDOFF_ISSUE, handoff.encode(handoff.IssueLinks(
                app_id=app_id, user_id=user_id, conversation_id=conversation_id,
                integration_ids=[web_integration_id], source_integration_id=web_integration_id)))
            reply = handoff.decode(data)
        except (Unavailable, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("no link back into conversation %s: %s", conversation_id, exc)
            return None
        if isinstance(reply, handoff.LinksIssued) and reply.links:
            return reply.links[0].url
        return None

    async def _last_inbound(self, target: Target, clients: list[conv.ParticipantClient]) -> float | None:
        if target.client_id:
            return await self.store.last_inbound(target.client_id)
        # An opt-in's number: its window is the one of the client with that number, if it wrote.
        for client in clients:
            if client.type == target.channel and digits(client.external_id) == digits(target.recipient):
                return await self.store.last_inbound(client.client_id)
        return None

    async def _decide(self, target: Target, now: float, settings: NotificationSettings, notice: policy.Notice,
                      clients: list[conv.ParticipantClient]) -> policy.Decision:
        window = policy.window_of(target.channel)
        if window is None:
            return policy.Skip("unsupported_channel", f"Notifications cannot go to {target.channel}")
        return window.decide(now, await self._last_inbound(target, clients), settings, notice)

    # --- sending ----------------------------------------------------------------------------

    async def _send(self, row: PendingRow, target: Target, decision: policy.Decision, notice: policy.Notice) -> bool:
        """Send the notification; True when it went out (or is in JetStream to go out)."""
        now = self.clock()
        send = SendRow(
            id=row.notification_id, notification_id=row.notification_id, app_id=row.app_id,
            conversation_id=row.conversation_id, conversation_type=row.conversation_type, user_id=row.user_id,
            channel=target.channel, integration_id=target.integration_id, client_id=target.client_id,
            recipient=target.recipient, recipient_info=dict(target.recipient_info or {}),
            kind="", notice=_notice_dict(notice), status="published", error_code=None)
        if target.channel == "email":
            return await self._send_email(row, target, notice, send)
        send = dataclasses.replace(send, kind=_kind(decision))
        command = self.outbound(send, decision, created_at=row.first_unread_at)
        await self.bus.publish(chan.subject_of(command),
                               chan.encode(command), msg_id=send.id)
        await self.store.finish(row.conversation_id, row.notification_id, send, now)
        log.info("notification %s sent to %s (%s)", send.id, target.channel, send.kind)
        return True

    def outbound(self, send: SendRow, decision: policy.Decision, *, created_at: float) -> chan.OutboundSend:
        """The send command of a decision for one target."""
        content: Any
        schema = override = None
        if isinstance(decision, policy.SendTemplate):
            content = TemplateContent(template=whatsapp_template(decision.template, decision.params))
            schema = "whatsapp"
        elif isinstance(decision, policy.SendTagged):
            content = TextContent(text=decision.text)
            override = {"messenger": {"payload": {"messaging_type": "MESSAGE_TAG", "tag": decision.tag}}}
        elif isinstance(decision, policy.Send):
            content = TextContent(text=decision.text)
        else:
            raise ValueError(f"not a send: {decision}")
        # created_at in the past: the app channel pushes at once (its socket grace is long over).
        return chan.OutboundSend(
            app_id=send.app_id, integration_id=send.integration_id, channel=send.channel,
            conversation_id=send.conversation_id, message_id=send.id, user_id=send.user_id,
            client_id=send.client_id, recipient=send.recipient, recipient_info=send.recipient_info,
            content=content, schema=schema, override=override, created_at=created_at)

    async def _send_email(self, row: PendingRow, target: Target, notice: policy.Notice, send: SendRow) -> bool:
        record = self.lookups.integration(target.integration_id)
        if record is None:
            return False
        unsubscribe = self.optout_url(target.optin_id) if target.optin_id else None
        # A reply to the notification comes back into the conversation (the e-mail channel).
        reply_to = mailreply.reply_to(self.config.keyring, record, row.conversation_id, target.recipient)
        text = notice.text(reply_here=reply_to is not None)
        if unsubscribe:
            text += f"\n\nDon't want these e-mails? {unsubscribe}"
        transient, permanent = self.email_errors()
        try:
            await self.send_email(record, target.recipient, f"New message from {notice.business}", text,
                                  email_html(notice, unsubscribe), unsubscribe,
                                  headers={"Reply-To": reply_to} if reply_to else None)
        except transient as exc:
            raise Unavailable(f"smtp: {exc}") from exc
        except permanent as exc:
            await self._failure(row, target, "email_rejected", str(exc))
            return False
        send = dataclasses.replace(send, kind="email", status="sent")
        await self.store.finish(row.conversation_id, row.notification_id, send, self.clock())
        await self._event(send, "channel", None)
        return True

    def optout_url(self, optin_id: str) -> str:
        return (f"{self.config.common.public_base_url}/notifications/v1/optout?token="
                f"{optout_token(self.config.secret, optin_id)}")

    # --- events out -------------------------------------------------------------------------

    async def _failure(self, row: PendingRow, target: Target | None, code: str, reason: str) -> None:
        # SunCo's destination.type is an integration type (e-mail: `mailgun`).
        destination = Destination(type=note.integration_type_of(target.channel) if target else "none",
                                  integration_id=target.integration_id if target else None)
        event = conv.NotificationReported(
            id=derived_id(row.notification_id, "failure"), app_id=row.app_id, conversation_id=row.conversation_id,
            created_at=self.clock(), kind="failure",
            conversation=ConversationRef(id=row.conversation_id, type=row.conversation_type),  # type: ignore[arg-type]
            user=UserRef(id=row.user_id), notification_id=row.notification_id, destination=destination,
            error=DeliveryError(code=code, message=reason))
        await self.bus.publish(subjects.event_subject(row.app_id, row.conversation_id), conv.encode(event),
                               msg_id=event.id)

    async def _event(self, send: SendRow, kind: str, error: DeliveryError | None) -> None:
        event = conv.NotificationReported(
            id=derived_id(send.id, kind), app_id=send.app_id, conversation_id=send.conversation_id,
            created_at=self.clock(), kind=kind,  # type: ignore[arg-type]
            conversation=ConversationRef(id=send.conversation_id, type=send.conversation_type),  # type: ignore[arg-type]
            user=UserRef(id=send.user_id), notification_id=send.id,
            destination=Destination(type=note.integration_type_of(send.channel), integration_id=send.integration_id),
            error=error)
        await self.bus.publish(subjects.event_subject(send.app_id, send.conversation_id), conv.encode(event),
                               msg_id=event.id)

    # --- statuses ---------------------------------------------------------------------------

    async def on_status(self, data: bytes, _headers: Mapping[str, str], _delivery: Delivery) -> None:
        """Consumer of `status.>`: the outcome of notification sends (conversations ignores them)."""
        try:
            status = chan.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            refused = refusal(data, exc, chan.TYPES, "status")
            if isinstance(refused, FromNewerVersion):
                # Of a kind this version does not know: waiting for a newer replica would hold
                # every status of its partition back for the few that are notifications'.
                return
            raise refused from exc
        if not isinstance(status, chan.DeliveryStatus) or not note.is_notification_id(status.message_id):
            return
        await self.handle_status(status)

    async def handle_status(self, status: chan.DeliveryStatus) -> None:
        assert status.message_id is not None
        send = await self.store.get_send(status.message_id)
        if send is None:
            return
        now = self.clock()
        if status.status == "sent":
            if await self.store.set_send_status(send.id, "sent", None, now) and send.kind != "code":
                await self._event(send, "channel", None)
            return
        if status.status != "failed" or send.status == "failed":
            return  # delivered/read: the customer got it (nothing more to report in v1's terms)
        if (send.channel == "whatsapp" and send.kind == "text" and status.error_code == RE_ENGAGEMENT_ERROR
                and await self._template_retry(send)):
            await self.store.set_send_status(send.id, "failed", status.error_code, now)
            return
        if await self.store.set_send_status(send.id, "failed", status.error_code, now) and send.kind != "code":
            await self._event(send, "failure", DeliveryError(
                code=status.error_code or "delivery_failed", message=status.error_title or status.error_details))

    async def _template_retry(self, send: SendRow) -> bool:
        """WhatsApp said the window was closed (131047, our last-inbound time was stale): send the template."""
        settings = self.settings(send.app_id)
        template = settings.templates.whatsapp if settings.templates is not None else None
        if template is None:
            return False
        notice = policy.Notice(**send.notice)
        retry = dataclasses.replace(send, id=f"{send.id}t", kind="template", status="published")
        decision = policy.SendTemplate(template, policy.template_params(template, notice))
        command = self.outbound(retry, decision, created_at=self.clock())
        await self.bus.publish(chan.subject_of(command),
                               chan.encode(command), msg_id=retry.id)
        await self.store.record_send(retry, self.clock())
        return True

    # --- opt-ins ----------------------------------------------------------------------------

    async def answer_optin(self, data: bytes, _headers: Mapping[str, str]) -> bytes:
        """The NOTIFICATIONS_OPTIN_* endpoints."""
        try:
            request = note.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return note.ENCODER.encode(note.NotificationError(status=400, code="bad_request",
                                                              title=f"Invalid request: {exc}"))
        try:
            if isinstance(request, note.StartOptIn):
                reply: note.NotificationMessage = await self.start_optin(request)
            elif isinstance(request, note.ConfirmOptIn):
                reply = await self.confirm_optin(request)
            elif isinstance(request, note.ListOptIns):
                reply = note.OptInsReply(opt_ins=[optin_state(o) for o in await self.store.optins(
                    request.app_id, request.user_id)])
            elif isinstance(request, note.StopOptIn):
                reply = await self.stop_optin(request)
            else:
                reply = _error(400, "bad_request", f"Unexpected request {type(request).__name__}")
        except OptInRefused as exc:
            reply = note.NotificationError(status=exc.status, code=exc.code, title=exc.title,
                                           retry_after=exc.retry_after)
        except Unavailable as exc:
            reply = _error(503, "service_unavailable", str(exc))
        return note.ENCODER.encode(reply)

    def _counter(self, scope: str, key: str, rates: tuple[Rate, ...]) -> limits.Counter:
        return limits.Counter(scope, limits.hashed_key(self.config.secret, scope, key), rates)

    def start_counters(self, req: note.StartOptIn) -> list[limits.Counter]:
        """What an opt-in request counts against: its user and, when known, its sources."""
        counters = [self._counter("user", f"{req.app_id}:{req.user_id}",
                                  (Rate(self.config.max_starts_per_hour, 3600.0),))]
        if req.client_ip:
            counters.append(self._counter("ip", source_key(req.client_ip), self.config.optin_limit_per_ip))
        if req.client_ip or req.origin:  # a request through `web`: a missing Origin is a source too
            counters.append(self._counter("origin", f"{req.app_id}:{req.origin or 'none'}",
                                          self.config.optin_limit_per_origin))
        return counters

    def code_counters(self, app_id: str, channel: str, address: str) -> list[limits.Counter]:
        """What a confirmation code sent counts against: its destination (all apps) and its app."""
        return [self._counter("address", limits.canonical_address(channel, address),
                              self.config.code_limit_per_address),
                self._counter("app", app_id, self.config.code_limit_per_app)]

    def send_counters(self, app_id: str, channel: str, address: str) -> list[limits.Counter]:
        """What an away notification to an opted-in address counts against."""
        return [self._counter("notify_address", limits.canonical_address(channel, address),
                              self.config.send_limit_per_address),
                self._counter("notify_app", app_id, self.config.send_limit_per_app)]

    async def start_optin(self, req: note.StartOptIn) -> note.OptInState:
        """Store a pending opt-in and send its code to the address, within the limits.

        A second request for an address whose code is still pending sends nothing and is
        answered exactly like the first (the same user gets their opt-in back, anyone else an
        opt-in that cannot be confirmed): the destination gets one code, and the answer does not
        tell whether somebody else asked before. Limits answer 429 with when to retry.
        """
        address = req.address.strip()
        if req.channel == "email":
            if not is_email_address(address):
                raise OptInRefused(400, "invalid_address", "That does not look like an e-mail address")
        elif not _E164.match(address):
            raise OptInRefused(400, "invalid_address", "Give the phone number in international format (+15551234567)")
        record = self._optin_integration(req)
        now = self.clock()
        code = f"{secrets.randbelow(10 ** 6):06d}"
        optin_id = new_id()
        fresh = OptInRow(
            id=optin_id, app_id=req.app_id, user_id=req.user_id, conversation_id=req.conversation_id,
            channel=req.channel, address=address, integration_id=record.id,
            source_integration_id=req.source_integration_id, status="pending",
            code_hash=code_hash(self.config.secret, optin_id, code),
            code_expires_at=now + self.config.code_ttl_seconds, attempts=0, linked=False, created_at=now,
            destination=limits.hashed_key(self.config.secret, "destination",
                                          limits.canonical_address(req.channel, address)))
        # A decoy opt-in's hash is of a code nobody has: it answers "wrong code" like any other.
        decoy_hash = code_hash(self.config.secret, optin_id, secrets.token_urlsafe(24))
        outcome = await self.store.start_optin(
            fresh, decoy_hash, starts=self.start_counters(req),
            sends=self.code_counters(req.app_id, req.channel, address), now=now,
            max_attempts=self.config.max_code_attempts)
        fields = {"app_id": req.app_id, "user_id": req.user_id, "channel": req.channel,
                  "address": mask(req.channel, address), "client_ip": req.client_ip, "origin": req.origin}
        if outcome.refusal is not None:
            log.warning("opt-in refused: limit reached", extra=log_fields(
                limit=outcome.refusal.scope, retry_after=outcome.refusal.retry_after, **fields))
            raise OptInRefused(429, "too_many_requests", outcome.refusal.title, outcome.refusal.retry_after)
        assert outcome.optin is not None
        if outcome.kind == "pending":
            log.info("opt-in: a code is already pending for the address, nothing sent",
                     extra=log_fields(opt_in_id=outcome.optin.id, **fields))
            return optin_state(outcome.optin)
        try:
            await self._send_code(outcome.optin, record, code)
        except Exception:
            # Not sent: the address must not stay held by a code nobody received.
            await self.store.expire_code(outcome.optin.id, self.clock())
            raise
        log.info("opt-in code sent", extra=log_fields(opt_in_id=outcome.optin.id, **fields))
        return optin_state(outcome.optin)

    def _optin_integration(self, req: note.StartOptIn) -> IntegrationRecord:
        if req.integration_id:
            record = self.lookups.integration(req.integration_id)
            if record is None or record.app_id != req.app_id or record.type != note.integration_type_of(req.channel):
                raise OptInRefused(400, "invalid_integration", f"integrationId is not a {req.channel} integration "
                                                               "of this app")
            if record.status not in ("active", ""):
                raise OptInRefused(409, "integration_inactive", "That integration is not active")
            return record
        found = self.first_integration(req.app_id, note.integration_type_of(req.channel))
        if found is None:
            raise OptInRefused(409, "channel_unavailable", f"This app cannot notify by {req.channel}")
        return found

    async def _send_code(self, optin: OptInRow, record: IntegrationRecord, code: str) -> None:
        business = self.business_name(optin.app_id)
        minutes = max(1, round(self.config.code_ttl_seconds / 60))
        if optin.channel == "email":
            transient, permanent = self.email_errors()
            text = (f"Your confirmation code for notifications from {business} is {code}.\n\n"
                    f"It expires in {minutes} minutes. If you did not ask for it, ignore this e-mail.")
            try:
                await self.send_email(record, optin.address, f"{code} is your {business} confirmation code", text,
                                      None, None)
            except transient as exc:
                raise Unavailable(f"smtp: {exc}") from exc
            except permanent as exc:
                raise OptInRefused(400, "email_rejected", f"The e-mail could not be sent: {exc}") from exc
            return
        send_id = f"{note.NOTIFICATION_ID_PREFIX}{derived_id(optin.id, 'code')}"
        send = SendRow(id=send_id, notification_id=optin.id, app_id=optin.app_id,
                       conversation_id=optin.conversation_id, conversation_type="personal", user_id=optin.user_id,
                       channel=optin.channel, integration_id=record.id, client_id="", recipient=optin.address,
                       recipient_info={}, kind="code", notice={}, status="published", error_code=None)
        decision: policy.Decision
        if optin.channel == "whatsapp":
            # Nobody can be sent free text on WhatsApp before they write: the code goes in a template.
            templates = self.settings(optin.app_id).templates
            template = templates and (templates.whatsapp_opt_in or templates.whatsapp)
            if not template:
                raise OptInRefused(409, "template_not_configured",
                                   "WhatsApp opt-ins need settings.notifications.templates.whatsappOptIn")
            if templates and templates.whatsapp_opt_in is None:
                template = msgspec.structs.replace(template, parameters=["code"])
            notice = policy.Notice(business=business, reply_text="", code=code)
            decision = policy.SendTemplate(template, policy.template_params(template, notice))
        else:
            decision = policy.Send(f"{business}: your confirmation code is {code}. It expires in {minutes} minutes. "
                                   "Reply STOP to stop notifications.")
        try:
            command = self.outbound(send, decision, created_at=self.clock())
            await self.bus.publish(chan.subject_of(command),
                                   chan.encode(command), msg_id=send.id)
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"publish: {exc or type(exc).__name__}") from exc
        await self.store.record_send(send, self.clock())

    async def confirm_optin(self, req: note.ConfirmOptIn) -> note.OptInState:
        optin = await self.store.optin(req.app_id, req.opt_in_id)
        if optin is None or optin.user_id != req.user_id:
            raise OptInRefused(404, "not_found", "No such opt-in")
        if optin.status == "confirmed":
            return optin_state(optin)
        if optin.status != "pending" or optin.code_hash is None:
            raise OptInRefused(409, "not_pending", "This opt-in is not waiting for a code")
        if optin.attempts >= self.config.max_code_attempts:
            raise OptInRefused(429, "too_many_attempts", "Too many wrong codes: ask for a new one")
        if optin.code_expires_at is not None and self.clock() > optin.code_expires_at:
            raise OptInRefused(410, "code_expired", "The code expired: ask for a new one")
        if not secrets_equal(optin.code_hash, code_hash(self.config.secret, optin.id, req.code.strip())):
            await self.store.count_attempt(optin.id)
            left = self.config.max_code_attempts - optin.attempts - 1
            raise OptInRefused(400, "wrong_code", f"Wrong code ({max(0, left)} tries left)")
        await self.store.confirm_optin(optin.id, self.clock(), req.client_id)
        confirmed = await self.store.optin(req.app_id, optin.id)
        assert confirmed is not None
        if confirmed.channel in LINKED_CHANNELS:
            await self._link_phone(confirmed)
        return optin_state(confirmed)

    async def _link_phone(self, optin: OptInRow) -> bool:
        """Make the confirmed number or e-mail address a (secondary) client of the conversation, so a
        reply from it continues the conversation."""
        try:
            data = await self._ask(subjects.CONVERSATIONS_CLIENT_LINK, conv.ENCODER.encode(conv.LinkPhoneClient(
                app_id=optin.app_id, user_id=optin.user_id, conversation_id=optin.conversation_id,
                integration_id=optin.integration_id, phone_number=optin.address, confirmation="immediate",
                primary=False, source_integration_id=optin.source_integration_id,
                proven_by_client_id=optin.proven_by)))
            reply = conv.decode_request(data)
        except (Unavailable, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("could not link opt-in %s yet: %s", optin.id, exc)
            return False
        if isinstance(reply, conv.ConversationError):
            log.warning("conversations refused to link opt-in %s: %s", optin.id, reply.title)
            if reply.status < 500:
                await self.store.mark_linked(optin.id)  # permanent: do not ask again
            return False
        await self.store.mark_linked(optin.id)
        return True

    async def _link_confirmed_optins(self) -> None:
        """Retry linking confirmed addresses that conversations could not link at confirmation time."""
        now = self.clock()
        if now < self._next_link_retry:
            return
        self._next_link_retry = now + LINK_RETRY_SECONDS
        for optin in await self.store.unlinked_phone_optins():
            if not await self._link_phone(optin):
                break  # conversations is still unavailable: next round

    async def stop_optin(self, req: note.StopOptIn) -> note.OptInState:
        optin = await self.store.optin(req.app_id, req.opt_in_id)
        if optin is None or optin.user_id != req.user_id:
            raise OptInRefused(404, "not_found", "No such opt-in")
        await self.store.stop_optin(optin.id, self.clock())
        stopped = await self.store.optin(req.app_id, optin.id)
        assert stopped is not None
        return optin_state(stopped)

    async def optout(self, token: str) -> bool:
        """The opt-out link of an e-mail: stop that opt-in. False for a token that is not ours."""
        optin_id = optin_of_token(self.config.secret, token)
        if optin_id is None:
            return False
        row = await self.store.optin_any(optin_id)
        if row is None:
            return False
        await self.store.stop_optin(optin_id, self.clock())
        return True

    # --- access requests ------------------------------------------------------------------

    async def answer_export(self, data: bytes, _headers: Mapping[str, str]) -> bytes:
        """The NOTIFICATIONS_USER_EXPORT endpoint: a user's opt-ins and sends (`UserData`)."""
        try:
            request = note.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return note.ENCODER.encode(_error(400, "bad_request", f"Invalid request: {exc}"))
        if not isinstance(request, note.ExportUserData):
            return note.ENCODER.encode(_error(400, "bad_request", f"Unexpected request {type(request).__name__}"))
        max_sends = max(0, min(request.max_sends, 5000))
        optins, sends, truncated = await self.store.user_data(request.app_id, request.user_id, max_sends)
        return note.ENCODER.encode(note.UserData(
            opt_ins=[note.OptInRecord(
                id=r["id"], channel=r["channel"], address=r["address"], status=r["status"],
                conversation_id=r["conversation_id"], integration_id=r["integration_id"], created_at=r["created_at"],
                confirmed_at=r["confirmed_at"], stopped_at=r["stopped_at"]) for r in optins],
            sends=[note.SendRecord(id=r["id"], channel=r["channel"], recipient=r["recipient"], kind=r["kind"],
                                   status=r["status"], conversation_id=r["conversation_id"],
                                   created_at=r["created_at"]) for r in sends],
            sends_truncated=truncated))


class OptInRefused(Exception):
    """An opt-in request refused: answered as a NotificationError."""

    def __init__(self, status: int, code: str, title: str, retry_after: int | None = None) -> None:
        super().__init__(title)
        self.status = status
        self.code = code
        self.title = title
        self.retry_after = retry_after


def _error(status: int, code: str, title: str) -> note.NotificationError:
    return note.NotificationError(status=status, code=code, title=title)


def optin_state(optin: OptInRow) -> note.OptInState:
    """An opt-in as the customer may see it."""
    return note.OptInState(opt_in_id=optin.id, channel=optin.channel, masked_address=mask(optin.channel, optin.address),  # type: ignore[arg-type]
                           status=optin.status,  # type: ignore[arg-type]
                           expires_at=optin.code_expires_at if optin.status == "pending" else None)


def whatsapp_template(template: WhatsappTemplate, params: tuple[str, ...]) -> dict[str, Any]:
    """The native WhatsApp template object (SunCo `schema: "whatsapp"`, platform reference §1.7.4)."""
    body: dict[str, Any] = {"name": template.name, "language": {"policy": "deterministic", "code": template.language}}
    if template.namespace:
        body["namespace"] = template.namespace
    if params:
        body["components"] = [{"type": "body", "parameters": [{"type": "text", "text": p} for p in params]}]
    return body


def email_html(notice: policy.Notice, unsubscribe: str | None) -> str:
    """The HTML part of a notification e-mail."""
    parts = [f"<p>{html.escape(notice.business)} replied:</p>",
             f"<blockquote>{html.escape(policy.excerpt(notice.reply_text, policy.REPLY_EXCERPT_CHARS))}</blockquote>"]
    if notice.link:
        parts.append(f'<p><a href="{html.escape(notice.link)}">Continue the conversation</a></p>')
    if unsubscribe:
        parts.append(f'<p style="font-size:small"><a href="{html.escape(unsubscribe)}">Stop these e-mails</a></p>')
    return "\n".join(parts)


def _notice_dict(notice: policy.Notice) -> dict[str, Any]:
    return {"business": notice.business, "reply_text": notice.reply_text, "unread_count": notice.unread_count,
            "link": notice.link}


def _kind(decision: policy.Decision) -> str:
    if isinstance(decision, policy.SendTemplate):
        return "template"
    if isinstance(decision, policy.SendTagged):
        return "tagged"
    return "text"
