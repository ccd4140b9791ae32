"""Conversation logic on decoded structs: messages, participants, routing, statuses, history.

Nothing here knows about HTTP or NATS subscriptions: it is handed a `Publisher` (the bus, or a
recorder in unit tests) and an `IdentityClient`, and raises `ApiError` for the REST layer and
`Retry`/`Poison` for the bus consumers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import msgspec
import nats.errors

from services.conversations import models
from services.conversations.clients import (
    PHONE_TYPES,
    SWEEP_INTERVAL_SECONDS,
    PhoneLinks,
    normalize_phone,
    notification_content,
)
from services.conversations.core import APP_INTEGRATION_TYPES, SDK_INTEGRATION_TYPES, Announced, ConversationCore
from services.conversations.identity_client import IdentityClient, IdentityUnavailable, Publisher
from services.conversations.linking import DEFAULT_RECAP_COUNT, Linker
from services.conversations.sdk_login import sdk_login
from services.conversations.store import (
    MESSAGE_DECODER,
    Association,
    AttachmentClaim,
    Store,
    StoredMessage,
    conversation_ref,
    dumps,
    loads,
)
from shared import fencing, records, render, subjects
from shared.bus import Delivery, Poison, Retry, refusal
from shared.cardmask import mask_card_numbers, mask_content, mask_strings
from shared.db import Row
from shared.http import ApiError
from shared.ids import derived_id, iso, new_id, now, parse_iso
from shared.media import ALLOWED_TYPES, OPAQUE_TYPE, normal_type, parse_attachment_url, safe_filename
from shared.messages import channel as chan
from shared.messages import conversation as conv
from shared.messages import identity as ident
from shared.messages import notification
from shared.partitions import Lease
from shared.signing import DEFAULT_JWT_POLICY, JwtPolicy
from shared.subjects import StreamSpec
from shared.sunco import (
    Activity,
    Author,
    Client,
    Content,
    DeliveryError,
    Destination,
    ExternalMessage,
    FileContent,
    FormContent,
    FormResponseContent,
    ImageContent,
    Message,
    PostbackAction,
    QuotedMessage,
    Source,
    SourceClient,
    SwitchboardIntegrationRef,
    TemplateContent,
    TextContent,
    UnsupportedContent,
    User,
    UserRef,
    api_content,
)
from shared.telemetry import log_fields

log = logging.getLogger(__name__)

# Statuses whose provider id is not mapped yet are retried this many times (the `sent` record
# is published by the same channel service just before, but may be processed after).
STATUS_MAX_DELIVERIES = 10
# How many of the business's latest messages a tapped button's payload is looked for in.
TAP_LOOKBACK = 10
MESSAGES_PAGE_SIZE = 100
# The retention sweep reads conversations a page at a time and deletes messages a batch per
# transaction, so it never holds the write lock for long.
RETENTION_PAGE = 100
RETENTION_BATCH = 500
# A message refused by the fence (its partition taken over) goes back at once, ahead of its
# sender's later messages, to the new owner.
TAKEN_OVER_RETRY_SECONDS = 0.0


# Delivery failures that mean "the customer blocked the business here" (channel services
# report them with these codes): Telegram 403 Forbidden, Twilio 21610 (unsubscribed, STOP).
BLOCKED_ERROR_CODES = frozenset({"telegram_403_blocked", "21610"})


class Streams(Protocol):
    """Erasure in the JetStream streams (the bus; absent in unit tests)."""

    async def delete_message(self, stream: StreamSpec, seq: int) -> None: ...

    async def purge_subject(self, stream: StreamSpec, subject: str, before_seq: int | None = None, *,
                            consumed_only: bool = False) -> None: ...

    async def purge_consumed(self, stream: StreamSpec) -> int: ...

    async def erase_published(self, stream: StreamSpec, subject: str, msg_ids: Collection[str],
                              before_seq: int, since: float | None = None) -> int: ...


def _erasure_unavailable(exc: Exception, title: str, app_id: str, conversation_id: str) -> ApiError:
    """The answer to a deletion whose erasure of copies failed with `exc`: a 503 (a retry does
    the erasure again), logged."""
    log.warning("%s (conversation %s): %s", title, conversation_id, exc,
                extra=log_fields(app_id=app_id, conversation_id=conversation_id))
    return ApiError(503, title)


@dataclass(frozen=True)
class ResolvedInbound:
    """A customer message with its sender and the conversation it goes into."""

    msg: chan.InboundMessage
    user: User
    client: Client
    row: Row


@dataclass(frozen=True)
class StoredInbound:
    """A customer message as stored: what its announcement carries."""

    message: Message
    event_id: str
    seq: int
    received: float
    joined_others: bool


@dataclass(frozen=True)
class Route:
    """Where a business message goes: one client association (None = stored only)."""

    association: Association | None
    user_id: str


def conversation_out(row: Row, switchboard: records.SwitchboardRecord | None = None) -> models.Conversation:
    """The API form of a conversation row (`switchboard`, the app's: who is in control of it,
    named in full)."""

    def member(member_id: str | None) -> SwitchboardIntegrationRef | None:
        if member_id is None:
            return None
        return switchboard.ref(member_id) if switchboard is not None else SwitchboardIntegrationRef(id=member_id)

    return models.Conversation(
        id=row["id"], type=row["type"], is_default=row["default_user_id"] is not None,
        display_name=row["display_name"], description=row["description"], icon_url=row["icon_url"],
        metadata=loads(row["metadata"]),
        business_last_read=None if row["business_last_read"] is None else iso(row["business_last_read"]),
        last_updated_at=iso(row["last_updated_at"]), created_at=iso(row["created_at"]),
        active_switchboard_integration=member(row["switchboard_active"]),
        pending_switchboard_integration=member(row["switchboard_pending"]),
    )



def api_message(stored: StoredMessage | Message) -> Message:
    """The API form of a stored message (unsupported content rendered as text)."""
    message = stored if isinstance(stored, Message) else MESSAGE_DECODER.decode(stored.body)
    if isinstance(message.content, UnsupportedContent):
        return msgspec.structs.replace(message, content=api_content(message.content))
    return message


class Conversations(ConversationCore):
    """The conversation model: what the REST API, the bus consumers and the endpoints call."""

    def __init__(self, store: Store, bus: Publisher, identity: IdentityClient,
                 recap_count: int = DEFAULT_RECAP_COUNT, streams: Streams | None = None,
                 jwt_policy: JwtPolicy = DEFAULT_JWT_POLICY,
                 apps: Callable[[str], records.AppRecord | None] = lambda _app_id: None,
                 public_base_url: str = "") -> None:
        super().__init__(store, bus, identity, jwt_policy, apps)
        self.streams = streams
        # Files at URLs under it are ours (`shared.media`): a message that carries one claims it.
        self.public_base_url = public_base_url
        # Per app, the (last_updated_at, id) the retention sweep reached (keyset of its walk).
        self._retention_marks: dict[str, tuple[float, str]] = {}
        # This replica's takes of the inbound partitions it consumes (`take_inbound`).
        self.inbound_leases: dict[int, Lease] = {}
        self.linker = Linker(self, recap_count)
        self.phone_links = PhoneLinks(self)

    def claimed_file(self, app_id: str, content: Content) -> AttachmentClaim | None:
        """The file of this app's that an image or file message carries, if it is one of ours;
        kept as its declared type when that may be served, else as an opaque download."""
        if not isinstance(content, ImageContent | FileContent) or not content.media_url:
            return None
        ref = parse_attachment_url(self.public_base_url, content.media_url) if self.public_base_url else None
        if ref is None or ref.app_id != app_id:
            return None
        declared = normal_type(content.media_type)
        kept_type = declared if declared in ALLOWED_TYPES else OPAQUE_TYPE
        return AttachmentClaim(ref.token, safe_filename(ref.filename, kept_type), kept_type)

    async def sweep_forever(self, interval: float = SWEEP_INTERVAL_SECONDS,
                            is_sweeper: Callable[[], bool] = lambda: True) -> None:
        """Expire pending phone links and merge confirmations, and messages past their app's
        retention, now and every `interval` seconds; from the second round on, drop the bus's
        copies of inbound messages and send commands once every consumer has acknowledged them.
        A round runs only while `is_sweeper()` (one replica of several sweeps)."""
        sweeps = (("client links", self.phone_links.sweep), ("merge confirmations", self.linker.sweep),
                  ("messages past retention", self.sweep_retention))
        first = True
        while True:
            if not is_sweeper():
                await asyncio.sleep(min(interval, 1.0))
                continue
            for name, sweep in sweeps if first else (*sweeps, ("consumed bus copies", self.purge_consumed)):
                try:
                    await sweep()
                except Exception as exc:  # the sweeper must outlive an outage
                    log.warning("sweeping expired %s failed: %s", name, exc)
            first = False
            await asyncio.sleep(interval)

    # --- retention (conversationRetentionSeconds) ---------------------------------------------

    async def sweep_retention(self, at: float | None = None) -> int:
        """Delete the messages of every conversation inactive for longer than its app's
        `conversationRetentionSeconds` (as SunCo's Delete All Messages would); the number deleted.

        Each conversation is first announced (MessagesExpired: the services holding copies drop
        them), then emptied in batches of RETENTION_BATCH, each its own short transaction, and its
        events are purged from the bus. Apps are walked by inactivity from where the last sweep
        stopped, so emptied conversations are not visited again.
        """
        at = now() if at is None else at
        deleted = 0
        apps = await self.store.retention_settings()
        self._retention_marks = {app_id: mark for app_id, mark in self._retention_marks.items()
                                 if app_id in dict(apps)}
        for app_id, seconds in apps:
            cutoff = at - seconds
            while True:
                rows = await self.store.inactive_conversations(app_id, cutoff, self._retention_marks.get(app_id),
                                                               RETENTION_PAGE)
                for row in rows:
                    deleted += await self._expire(app_id, row, cutoff)
                    self._retention_marks[app_id] = (float(row["last_updated_at"]), str(row["id"]))
                if len(rows) < RETENTION_PAGE:
                    break
        if deleted:
            await self.store.checkpoint()
        return deleted

    async def _expire(self, app_id: str, row: Row, cutoff: float) -> int:
        conversation_id = str(row["id"])
        if not await self.store.has_messages_before(conversation_id, cutoff):
            return 0
        event_id = derived_id(conversation_id, "messages:expired", repr(cutoff))
        announced = await self.announce(conv.MessagesExpired(
            id=event_id, app_id=app_id, conversation_id=conversation_id, created_at=now(),
            conversation=conversation_ref(row), before=cutoff))
        deleted = 0
        while True:
            async with self.store.tx():
                batch = await self.store.delete_expired_messages(conversation_id, cutoff, RETENTION_BATCH)
            deleted += batch
            if batch < RETENTION_BATCH:
                break
            await asyncio.sleep(0)  # writers waiting for the lock go between batches
        async with self.store.tx():
            await self.store.delete_expired_externals(conversation_id, cutoff)
        # The bus's copies of the conversation's events (message contents) go too; the
        # announcement itself stays for the services that have not read it yet.
        await self._purge_events(app_id, conversation_id, kept=announced)
        log.info("retention: %d message(s) of conversation %s deleted", deleted, conversation_id,
                 extra=log_fields(app_id=app_id, conversation_id=conversation_id, deleted=deleted))
        return deleted

    async def _purge_events(self, app_id: str, conversation_id: str, *, kept: Announced | None,
                            consumed_only: bool = False) -> None:
        """Drop the bus's copies of a conversation's events: the originals and the desk's copies,
        each subject below `kept` (the erasure's own announcement and its copy; None: all), and
        with `consumed_only` only what every consumer has read (`Streams.purge_subject`)."""
        if self.streams is None:
            return
        await self.streams.purge_subject(subjects.EVENTS, subjects.conversation_events(app_id, conversation_id),
                                         before_seq=kept.seq if kept is not None else None,
                                         consumed_only=consumed_only)
        await self.streams.purge_subject(subjects.EVENTS, subjects.conversation_desk_events(app_id, conversation_id),
                                         before_seq=kept.desk_bound if kept is not None else None,
                                         consumed_only=consumed_only)

    async def purge_consumed(self) -> None:
        """Drop the bus's copies of inbound messages and send commands every consumer acknowledged
        (customer texts and addresses would otherwise stay there for the stream's max age)."""
        if self.streams is not None:
            for stream in (subjects.INBOUND, subjects.OUTBOUND):
                await self.streams.purge_consumed(stream)

    # --- conversations --------------------------------------------------------------------

    async def conversation_row(self, app_id: str, conversation_id: str) -> Row:
        row = await self.store.get_conversation(app_id, conversation_id)
        if row is None:
            raise ApiError(404, "Conversation not found", "conversation_not_found")
        return row

    async def associate(self, app_id: str, conversation_id: str, user: User, client: Client,
                        at: float) -> bool:
        """Make `client` the participant's primary client; True when it is new to the conversation."""
        async with self.store.tx():
            participant = await self.store.participant(conversation_id, user.id)
            if participant is None:
                return False
            return await self.store.upsert_association(
                participant["id"], client.id, client.type, client.integration_id, client.external_id,
                client.info, at)

    # --- the Notification API (v1.1) ---------------------------------------------------------

    async def notify(self, app_id: str, body: models.NotificationPostBody) -> str:
        """Send a business message to a phone number: find or create the number's user and client,
        store the message in that user's conversation and send it. Returns the message id."""
        convs = self
        if body.author.role != "appMaker":
            raise ApiError(400, "author.role must be appMaker")
        integration_id = body.destination.integration_id
        row = await convs.store.get_integration(app_id, integration_id)
        if row is None:
            raise ApiError(404, "Integration not found", "integration_not_found")
        client_type = str(row["type"])
        if client_type not in PHONE_TYPES:
            raise ApiError(400, f"Notifications reach phone numbers: a {client_type} integration is not supported "
                                "(use a whatsapp or twilio integration)")
        phone = normalize_phone(body.destination.destination_id, plus_optional=True)
        if phone is None:
            raise ApiError(400, "destination.destinationId must be a phone number with its country code")
        content = notification_content(body.message, body.message_schema, client_type)
        key = ident.phone_client_key(client_type, phone)
        info: dict[str, Any] = {"phoneNumber": phone, ("wa_id" if client_type == "whatsapp" else "phone_number"): key}
        resolved = await convs.identity.api_call(subjects.IDENTITY_RESOLVE, ident.ResolveClient(
            app_id=app_id, integration_id=integration_id, client_type=client_type,  # type: ignore[arg-type]
            channel_user_id=key, info=info))
        if not isinstance(resolved, ident.Resolved):
            raise ApiError(503, "Unexpected answer from identity")
        user, client = resolved.user, resolved.client
        try:
            conversation, _created = await convs.ensure_conversation(
                app_id, user, reason="notification", source=Source(type="api:conversations",
                                                                   integration_id=integration_id))
        except (nats.errors.Error, TimeoutError) as exc:
            raise ApiError(503, "Messaging bus unavailable, try again") from exc
        await convs.associate(app_id, conversation["id"], user, client, now())
        message = await convs.post_message(app_id, conversation["id"], models.MessagePostBody(
            author=Author(type="business", display_name=body.author.name, avatar_url=body.author.avatar_url),
            content=content, destination=models.DestinationIn(integration_id=integration_id),
            schema="whatsapp" if isinstance(content, TemplateContent) else None))
        log.info("notification %s to a %s number in conversation %s", message.id, client_type, conversation["id"])
        return message.id

    async def participants_out(self, conversation_id: str) -> list[models.Participant]:
        result = []
        for row in await self.store.participants(conversation_id):
            associations = await self.store.associations(row["id"])
            result.append(models.Participant(
                id=row["id"], user_id=row["user_id"], user_external_id=row["user_external_id"],
                unread_count=row["unread_count"], last_read=None if row["last_read"] is None else iso(row["last_read"]),
                client_associations=[models.ClientAssociation(type=a.type, client_id=a.client_id)  # type: ignore[arg-type]
                                     for a in associations],
            ))
        return result

    async def delete_conversation(self, app_id: str, conversation_id: str) -> None:
        row = await self.conversation_row(app_id, conversation_id)
        if row["default_user_id"] is not None:
            raise ApiError(400, "The default conversation of a user cannot be deleted; delete its messages instead")
        event = conv.ConversationRemoved(id=new_id(), app_id=app_id, conversation_id=conversation_id,
                                         created_at=now(), conversation=conversation_ref(row))
        # Announced inside the transaction: if the bus refuses, the delete is rolled back (503).
        async with self.store.tx():
            await self.store.delete_conversation(conversation_id)
            announced = await self.publish_event(event)
        # The bus's copies of its events (message contents) go too; the announcement stays.
        try:
            await self._purge_events(app_id, conversation_id, kept=announced)
        except Exception as exc:  # the deletion stands (a retry would find no conversation): the copies age out
            log.error("conversation %s deleted, but its events stay on the bus until they age out: %s",
                      conversation_id, exc, extra=log_fields(app_id=app_id, conversation_id=conversation_id))

    async def delete_message(self, app_id: str, conversation_id: str, message_id: str) -> None:
        """SunCo's Delete Message: the message leaves the history, and its copies go too. No
        business webhook (SunCo sends none).

        MessageDeleted is announced first (`webhooks` drops the deliveries of the message's
        event, `notifications` a pending notification with its text, the desk its preview when it
        is the latest). Then the bus's copies of its MessageCreated that every consumer has read
        are erased, then the row. A failure before the row's deletion answers 503 and a retry
        does it all again (the announcement is de-duplicated by its id); an announcement whose
        deletion never came only erased copies of a message the business asked to delete.
        """
        row = await self.conversation_row(app_id, conversation_id)
        found = await self.store.message_event(conversation_id, message_id)
        if found is None:
            raise ApiError(404, "Message not found", "message_not_found")
        event_id, at = found
        try:
            announced = await self.announce(conv.MessageDeleted(
                id=derived_id(conversation_id, message_id, "message:deleted"), app_id=app_id,
                conversation_id=conversation_id, created_at=now(), conversation=conversation_ref(row),
                message_id=message_id, message_event_id=event_id, message_at=at))
            # A message older than the stream's max age has no copy there any more.
            on_the_bus = at > now() - subjects.EVENTS.max_age_seconds
            if self.streams is not None and announced.seq is not None and on_the_bus:
                # The walk starts where the message was published, not at the subject's oldest.
                await self.streams.erase_published(
                    subjects.EVENTS, subjects.conversation_events(app_id, conversation_id), [event_id],
                    before_seq=announced.seq, since=at)
                await self.streams.erase_published(
                    subjects.EVENTS, subjects.conversation_desk_events(app_id, conversation_id),
                    [subjects.desk_copy_msg_id(event_id)], before_seq=announced.desk_bound or announced.seq,
                    since=at)
        except ApiError:
            raise
        except Exception as exc:
            raise _erasure_unavailable(exc, "The message could not be deleted now: try again",
                                       app_id, conversation_id) from exc
        async with self.store.tx():
            await self.store.delete_message(conversation_id, message_id)
        await self.store.checkpoint()  # its bytes leave the write-ahead log too
        log.info("message %s of conversation %s deleted", message_id, conversation_id,
                 extra=log_fields(app_id=app_id, conversation_id=conversation_id, message_id=message_id))

    async def delete_all_messages(self, app_id: str, conversation_id: str) -> None:
        """SunCo's Delete All Messages: the history goes, with the files its messages carried, and
        so does every copy of it, as after the retention sweep. The conversation stays, so this
        also empties a user's default conversation, which cannot be deleted. No business webhook
        (SunCo sends none).

        The deletion commits first. Then MessagesExpired, up to the moment the deletion began, is
        announced: `webhooks`, `notifications` and the desk drop their copies. Then the
        conversation's events that every consumer has read are purged from the bus below that
        announcement (what one has yet to read stays: it may be a customer message that arrived
        after the deletion began). A failure after the commit answers 503, and a retry announces
        and purges again. Announcing after the commit means a lost acknowledgement can never erase
        the copies of a history that a rolled-back deletion kept.
        """
        row = await self.conversation_row(app_id, conversation_id)
        async with self.store.tx():
            cutoff = now()
            await self.store.delete_messages(conversation_id)
            await self.store.delete_expired_externals(conversation_id, cutoff)
        try:
            await self.store.checkpoint()  # the deleted rows' bytes leave the write-ahead log too
            announced = await self.announce(conv.MessagesExpired(
                id=derived_id(conversation_id, "messages:deleted", repr(cutoff)), app_id=app_id,
                conversation_id=conversation_id, created_at=cutoff, conversation=conversation_ref(row),
                before=cutoff))
            await self._purge_events(app_id, conversation_id, kept=announced, consumed_only=True)
        except ApiError:
            raise
        except Exception as exc:
            raise _erasure_unavailable(exc, "The messages are deleted but their copies are not erased yet: try again",
                                       app_id, conversation_id) from exc
        log.info("every message of conversation %s deleted", conversation_id,
                 extra=log_fields(app_id=app_id, conversation_id=conversation_id))

    async def delete_user(self, app_id: str, user_id_or_external_id: str) -> None:
        """SunCo's Delete User: the user, its clients and its conversations with their history,
        and every copy other services keep (they learn it from `user:remove`); no byte of the
        person stays in the databases.

        Retry-safe in this order: the deletion is noted with the conversations it names (a retry
        adds to the note and names them all, though their rows are gone); the history goes;
        `user:remove` (a derived event id, so a retried call announces once) is published
        before identity deletes the user, so a failure leaves the user there for the retry;
        conversations created meanwhile go after; the bus's copies of the events of every one
        of them go last, and the note with them.
        """
        reply = await self.identity.api_call(subjects.IDENTITY_USER_GET, ident.GetUser(
            app_id=app_id, user_id_or_external_id=user_id_or_external_id))
        assert isinstance(reply, ident.UserReply)
        user = reply.user
        default = await self.store.default_conversation(app_id, user.id)
        subject_id, conversation_ids = await self.store.begin_user_deletion(
            app_id, user.id, str(default["id"]) if default is not None else user.id,
            await self.store.user_conversation_ids(app_id, user.id))
        await self._delete_user_conversations(app_id, user.id)
        event_id = derived_id(app_id, user.id, "user:remove")
        event = conv.UserRemoved(id=event_id, app_id=app_id, conversation_id=subject_id, created_at=now(),
                                 user=UserRef(id=user.id, external_id=user.external_id),
                                 authenticated=user.authenticated, conversation_ids=conversation_ids)
        try:
            announced = await self.announce(event)
        except Exception as exc:
            log.warning("announcing the deletion of user %s failed: %s", user.id, exc)
            raise ApiError(503, "Messaging bus unavailable, try again") from exc
        deleted = await self.identity.api_call(subjects.IDENTITY_USER_DELETE, ident.DeleteUser(
            app_id=app_id, user_id_or_external_id=user.id))
        assert isinstance(deleted, ident.Deleted)
        self.identity.forget_user(user.id)
        meanwhile = await self._delete_user_conversations(app_id, user.id)
        await self._purge_user_events(app_id, [*conversation_ids, *meanwhile], subject_id, announced)
        await self.store.end_user_deletion(app_id, user.id)
        await self.store.checkpoint()
        log.info("user %s deleted with %d conversation(s)", user.id, len(conversation_ids) + len(meanwhile),
                 extra=log_fields(app_id=app_id, user_id=user.id))

    async def _purge_user_events(self, app_id: str, conversation_ids: list[str], subject_id: str,
                                 announced: Announced) -> None:
        for conversation_id in {*conversation_ids, subject_id}:
            await self._purge_events(app_id, conversation_id, kept=announced if conversation_id == subject_id else None)

    async def _delete_user_conversations(self, app_id: str, user_id: str) -> list[str]:
        """Delete the user's conversations and their messages, a batch per transaction; their ids."""
        conversation_ids = await self.store.user_conversation_ids(app_id, user_id)
        for conversation_id in conversation_ids:
            while True:
                async with self.store.tx():
                    batch = await self.store.delete_some_messages(conversation_id, RETENTION_BATCH)
                if batch < RETENTION_BATCH:
                    break
                await asyncio.sleep(0)
        async with self.store.tx():
            await self.store.delete_user_rows(app_id, user_id, conversation_ids)
        return conversation_ids

    async def delete_personal_information(self, app_id: str, user_id_or_external_id: str) -> User:
        """SunCo's Delete User Personal Information: identity clears the profile, metadata and the
        clients' names, pictures, info and raw; here the copies of client info and the names and
        pictures on the user's messages go (the messages stay). Other services drop the addresses
        they keep (PersonalInformationDeleted; SunCo fires no webhook for it)."""
        reply = await self.identity.api_call(subjects.IDENTITY_USER_PERSONAL_DELETE, ident.DeletePersonalInformation(
            app_id=app_id, user_id_or_external_id=user_id_or_external_id))
        assert isinstance(reply, ident.UserReply)
        user = reply.user
        self.identity.forget_user(user.id)
        async with self.store.tx():
            await self.store.clear_association_info(app_id, user.id)
        after = 0
        while True:
            page = await self.store.user_authored(app_id, user.id, after, RETENTION_BATCH)
            bodies = [(seq, _anonymous(body)) for seq, body in page]
            changed = [(seq, new) for (seq, new), (_, old) in zip(bodies, page, strict=True) if new != old]
            if changed:
                async with self.store.tx():
                    await self.store.set_message_bodies(changed)
            if len(page) < RETENTION_BATCH:
                break
            after = page[-1][0]
        default = await self.store.default_conversation(app_id, user.id)
        subject_id = str(default["id"]) if default is not None else user.id
        event = conv.PersonalInformationDeleted(
            id=new_id(), app_id=app_id, conversation_id=subject_id, created_at=now(), user_id=user.id,
            conversation_ids=await self.store.user_conversation_ids(app_id, user.id))
        await self.publish_event(event)
        await self.store.checkpoint()
        return user

    # --- business messages ----------------------------------------------------------------

    async def route(self, conversation_id: str, body: models.MessagePostBody) -> Route:
        """Pick the client a business message goes to (validated before anything is stored)."""
        participants = await self.store.participants(conversation_id)
        if not participants:
            return Route(None, "")
        participant = participants[0]
        destination = body.destination
        if body.author.type == "user" or (destination is not None and destination.integration_type == "none"):
            return Route(None, participant["user_id"])
        associations = await self.store.associations(participant["id"])
        if destination is not None and destination.integration_id:
            for association in associations:
                if association.integration_id == destination.integration_id:
                    return Route(association, participant["user_id"])
            raise ApiError(400, "The user has no client on destination.integrationId")
        if destination is not None and destination.integration_type:
            wanted = "sdk" if destination.integration_type in SDK_INTEGRATION_TYPES else destination.integration_type
            for association in associations:
                if association.type == wanted:
                    return Route(association, participant["user_id"])
            raise ApiError(400, "The user has no client of destination.integrationType")
        return Route(associations[0] if associations else None, participant["user_id"])

    async def post_message(self, app_id: str, conversation_id: str, body: models.MessagePostBody) -> Message:
        """Store a message from the API, announce it, and hand it to the primary client's channel."""
        row = await self.conversation_row(app_id, conversation_id)
        if isinstance(body.content, UnsupportedContent):
            raise ApiError(400, "content.type 'unsupported' cannot be posted")
        if body.author.subtypes and not set(body.author.subtypes) <= models.AUTHOR_SUBTYPES:
            raise ApiError(400, "author.subtypes must be among AI, activity")
        models.check_metadata(body.metadata)
        models.check_content(body.content)
        models.check_url(body.author.avatar_url, "author.avatarUrl")
        if await self.store.masks_cards(app_id):
            body = msgspec.structs.replace(body, content=mask_content(body.content),
                                           override=mask_strings(body.override))
        author = body.author
        if isinstance(body.content, FormResponseContent):
            if author.type != "user":
                raise ApiError(400, "A formResponse is a user's answer to a form")
            body = msgspec.structs.replace(
                body, content=await self._answer_to_form(app_id, conversation_id, body.content))
        if author.type == "user":
            participant = await self._author_participant(conversation_id, author)
            author = msgspec.structs.replace(author, user_id=participant["user_id"],
                                             user_external_id=participant["user_external_id"])
            row = await self.with_default_control(app_id, row)
        route = await self.route(conversation_id, body)
        received = now()
        message = Message(id=new_id(), received=iso(received), author=author, content=body.content,
                          source=Source(type="api:conversations"), metadata=body.metadata)
        event_id = new_id()
        async with self.store.tx():
            seq = await self.store.insert_message(
                message.id, app_id, conversation_id, author.type, author.user_id, None, None, event_id, received,
                dumps(message), attachment=self.claimed_file(app_id, message.content))
            await self.store.touch_conversation(conversation_id, received)
            if author.type == "business":
                await self.store.add_unread(conversation_id)
        assert seq is not None
        try:
            await self.publish_event(conv.MessageCreated(
                id=event_id, app_id=app_id, conversation_id=conversation_id, created_at=received,
                conversation=conversation_ref(row), message=message, cursor=seq, user_id=route.user_id))
            association = route.association
            outbound_channel = None if association is None else await self.outbound_channel(
                association.type, association.integration_id)
            if association is not None and outbound_channel is not None and association.integration_id:
                send = chan.OutboundSend(
                    app_id=app_id, integration_id=association.integration_id, channel=outbound_channel,
                    conversation_id=conversation_id, message_id=message.id, user_id=route.user_id,
                    client_id=association.client_id, recipient=association.external_id or "",
                    recipient_info=association.info or {}, content=body.content, schema=body.schema,
                    override=body.override, created_at=received)
                await self.bus.publish(chan.subject_of(send),
                                       chan.encode(send), msg_id=message.id)
        except Exception as exc:
            log.warning("publishing message %s failed, undoing it: %s", message.id, exc)
            async with self.store.tx():
                await self.store.delete_message(conversation_id, message.id)
            raise ApiError(503, "Messaging bus unavailable, try again") from exc
        return api_message(message)

    async def _author_participant(self, conversation_id: str, author: Author) -> Row:
        for participant in await self.store.participants(conversation_id):
            if (author.user_id and participant["user_id"] == author.user_id) or (
                    author.user_external_id and participant["user_external_id"] == author.user_external_id):
                return participant
        raise ApiError(400, "author.userId or author.userExternalId must name a participant of the conversation")

    async def list_messages(self, conversation_id: str, page: models.PageParams) -> tuple[
            list[Message], models.Meta, dict[str, str]]:
        """A page of history, latest first by default (SunCo pages backwards, 100 a page).

        Returns the messages (oldest first), `meta`, and the cursors for `links`
        (`{"before": id}` for older, `{"after": id}` for newer).
        """
        if page.after is not None:
            seq = await self._cursor_seq(conversation_id, page.after)
            rows, newer = await self.store.messages_after(conversation_id, seq, MESSAGES_PAGE_SIZE)
            older = await self.store.has_messages(conversation_id, before_seq=rows[0].seq if rows else seq + 1)
        else:
            seq_before = None if page.before is None else await self._cursor_seq(conversation_id, page.before)
            rows, older = await self.store.messages_before(conversation_id, seq_before, MESSAGES_PAGE_SIZE)
            newer = seq_before is not None and await self.store.has_messages(
                conversation_id, after_seq=rows[-1].seq if rows else seq_before - 1)
        messages = [api_message(r) for r in rows]
        meta = models.Meta(has_more=newer if page.after is not None else older)
        cursors: dict[str, str] = {}
        if messages:
            meta.before_cursor = messages[0].id
            meta.after_cursor = messages[-1].id
            if older:
                cursors["before"] = messages[0].id
            if newer:
                cursors["after"] = messages[-1].id
        return messages, meta, cursors

    async def _cursor_seq(self, conversation_id: str, message_id: str) -> int:
        seq = await self.store.message_seq(conversation_id, message_id)
        if seq is None:
            raise ApiError(400, "page cursor does not name a message of this conversation")
        return seq

    # --- activity -------------------------------------------------------------------------

    async def _answer_to_form(self, app_id: str, conversation_id: str,
                              answer: FormResponseContent) -> FormResponseContent:
        """The answer as the form it names (`quotedMessageId`, a form of this conversation) has
        it (`models.answer_to_form`); 400 unless it answers one."""
        quoted = {f.quoted_message_id for f in answer.fields if f.quoted_message_id}
        if len(quoted) != 1:
            raise ApiError(400, "A formResponse's fields must name the form they answer (quotedMessageId)")
        stored = await self.store.get_message(app_id, quoted.pop())
        form = MESSAGE_DECODER.decode(stored.body).content if stored is not None else None
        if stored is None or stored.conversation_id != conversation_id or not isinstance(form, FormContent):
            raise ApiError(400, "quotedMessageId does not name a form of this conversation")
        return models.answer_to_form(answer, form, stored.id)

    async def post_activity(self, app_id: str, conversation_id: str, body: models.ActivityPostBody) -> None:
        """Typing or read from the business (or read on behalf of a user), announced as ActivityPosted."""
        row = await self.conversation_row(app_id, conversation_id)
        at = now()
        author = body.author
        participants = await self.store.participants(conversation_id)
        if author.type == "user":
            if body.type != "conversation:read":
                raise ApiError(400, "a user author may only post conversation:read")
            participant = await self._author_participant(conversation_id, author)
            async with self.store.tx():
                await self.store.mark_read(participant["id"], at)
            author = msgspec.structs.replace(author, user_id=participant["user_id"])
            user_id = participant["user_id"]
        else:
            user_id = participants[0]["user_id"] if participants else ""
            if body.type == "conversation:read":
                async with self.store.tx():
                    await self.store.set_business_last_read(conversation_id, at)
        await self.publish_event(conv.ActivityPosted(
            id=new_id(), app_id=app_id, conversation_id=conversation_id, created_at=at,
            conversation=conversation_ref(row), user_id=user_id,
            activity=Activity(type=body.type, author=author, source=Source(type="api:conversations"))))
        if author.type == "business" and participants:
            await self._show_business_activity(app_id, conversation_id, participants[0], body.type, at)

    async def _show_business_activity(self, app_id: str, conversation_id: str, participant: Row,
                                      activity: chan.BusinessActivity, at: float) -> None:
        """Show the business's typing or read on the customer's primary channel where the
        platform can (the SDK channels show it from the event over their sockets)."""
        associations = await self.store.associations(participant["id"])
        primary = associations[0] if associations else None
        integration_id = primary.integration_id if primary is not None else None
        if primary is None or integration_id is None:
            return
        channel = await self.outbound_channel(primary.type, integration_id)
        if channel is None or channel in APP_INTEGRATION_TYPES:
            return
        command = chan.OutboundActivity(
            app_id=app_id, integration_id=integration_id, channel=channel, conversation_id=conversation_id,
            user_id=participant["user_id"], client_id=primary.client_id, recipient=primary.external_id or "",
            recipient_info=primary.info or {}, activity=activity, created_at=at,
            last_provider_message_id=await self.store.last_inbound_provider_id(conversation_id, integration_id))
        try:
            await self.bus.publish(chan.subject_of(command), chan.encode(command))
        except Exception as exc:  # best effort: the event went out, the indicator is a courtesy
            log.info("business %s not shown on %s: %s", activity, channel, exc)

    # --- inbound from channels ------------------------------------------------------------

    async def take_inbound(self, partition: int) -> None:
        """This replica now consumes inbound `partition` (an acquire hook of `shared.partitions`):
        its messages' writes are fenced with the epoch of this take (`shared.fencing`), so that
        a replica stalled past its lease stores nothing of the partition once it is taken over
        (two replicas would store one sender's messages in either order)."""
        self.inbound_leases[partition] = await fencing.take(self.store.db, partition)

    async def release_inbound(self, partition: int) -> None:
        """Another replica consumes inbound `partition` from now on."""
        self.inbound_leases.pop(partition, None)

    def _inbound_fence(self, subject: str) -> dict[int, int] | None:
        """The fence of a message's write: its partition (the subject's last token) and the epoch
        of this replica's take. None for a partition it holds no take of: a leftover durable's
        message (a partition beyond today's count, drained by the holder of partition 0)."""
        token = subject.rpartition(".")[2]
        lease = self.inbound_leases.get(int(token)) if token.isdecimal() else None
        return None if lease is None else {lease.partition: lease.epoch}

    async def handle_inbound(self, data: bytes, _headers: Mapping[str, str], delivery: Delivery) -> None:
        """Consumer of `inbound.>`: customer messages and activity."""
        try:
            message = chan.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise refusal(data, exc, chan.TYPES, "inbound message") from exc
        if isinstance(message, chan.InboundMessage | chan.InboundActivity):
            _refuse_off_subject(message, delivery.subject)
        if isinstance(message, chan.InboundMessage):
            try:
                masked = await self.inbound_message(message, fence=self._inbound_fence(delivery.subject))
            except fencing.StaleEpoch as stale:
                # Another replica took the partition over while this one was stalled: nothing was
                # stored, the message is not acknowledged (it is the new owner's), and this
                # replica stops consuming the partition now (the rest of its batch is refused
                # the same way: the take stays until the release).
                lease = self.inbound_leases.get(stale.partition)
                if lease is not None:
                    lease.fenced()
                raise Retry(TAKEN_OVER_RETRY_SECONDS, str(stale)) from stale
            if masked is not message and self.streams is not None:
                # The bus's copy still holds the card number: it goes once the masked one is stored.
                await self.streams.delete_message(subjects.INBOUND, delivery.stream_sequence)
        elif isinstance(message, chan.InboundActivity):
            await self.inbound_activity(message)
        else:
            raise Poison(f"unexpected {type(message).__name__} on inbound")

    @staticmethod
    def mask_inbound(msg: chan.InboundMessage) -> chan.InboundMessage:
        """The message with card numbers masked (the same object when nothing changed): for
        apps with `maskCreditCardNumbers`."""
        postback = msg.postback
        if postback is not None:
            postback = msgspec.structs.replace(postback, text=mask_card_numbers(postback.text))
        # What a person wrote, not the sender's identifiers (a long phone number can pass Luhn); the
        # raw payload is never stored (see `inbound_identity`).
        masked = msgspec.structs.replace(msg, content=mask_content(msg.content), postback=postback)
        return msg if masked == msg else masked

    async def inbound_message(self, msg: chan.InboundMessage,
                              fence: Mapping[int, int] | None = None) -> chan.InboundMessage:
        """Store a customer message once (by provider id) and announce it, card numbers masked
        first when the app asks for it: resolve (who, which conversation) → store (fenced by
        `fence`: `Store.record_inbound`) → announce. Returns the message as handled (masked or
        the same)."""
        lookup = await self.store.inbound_lookup(msg.app_id, msg.integration_id, msg.provider_message_id)
        if lookup.masks_cards:
            msg = self.mask_inbound(msg)
        handled = msg  # `msg` may still gain a conversation id below; the caller compares this one
        if not lookup.integration_known:
            log.warning("dropping inbound message %s for unknown app/integration %s/%s",
                        msg.provider_message_id, msg.app_id, msg.integration_id)
            return handled
        if lookup.duplicate is not None:
            await self._republish(msg.app_id, lookup.duplicate)
            return handled
        resolved = await self._resolve_inbound(msg, merges_pending=lookup.merges_pending)
        if resolved is None:  # a linking step took the message
            return handled
        if isinstance(msg.content, FormResponseContent):
            try:
                answer = await self._answer_to_form(msg.app_id, resolved.row["id"], msg.content)
            except ApiError as refused:  # the widget checks first: only a forged answer gets here
                log.warning("dropping a form response that does not answer its form: %s", refused.title,
                            extra=log_fields(integration_id=msg.integration_id, conversation_id=resolved.row["id"]))
                return handled
            resolved = replace(resolved, msg=msgspec.structs.replace(msg, content=answer))
        tapped = await self._tapped_action(resolved)
        if isinstance(tapped, PostbackAction):
            await self._announce_postback(resolved, tapped)
            return handled
        if tapped is not None and resolved.msg.postback is None:  # a numbered answer picked a reply
            # The customer's own words ("2") are kept, with the payload of the choice they picked.
            said = resolved.msg.content.text if isinstance(resolved.msg.content, TextContent) else tapped.text
            resolved = replace(resolved, msg=msgspec.structs.replace(
                resolved.msg, postback=chan.Postback(payload=tapped.payload, text=said)))
        stored = await self._store_inbound(resolved, fence)
        if stored is not None:
            await self._announce_inbound(resolved, stored)
        return handled

    async def _tapped_action(self, resolved: ResolvedInbound) -> render.Answerable | None:
        """The business's action a customer message answers: the button whose payload it carries
        (looked up among the business's recent messages), or, on a channel that shows choices
        numbered (`shared.render`), the choice a bare number picks in the conversation's latest
        message when that is the business's (a number typed where buttons were shown, or after
        the customer wrote something else, is just a number)."""
        msg, conversation_id = resolved.msg, resolved.row["id"]
        if msg.postback is not None:
            for content in await self.store.recent_business_contents(conversation_id, TAP_LOOKBACK):
                found = render.offered_action(msg.postback.payload, content)
                if found is not None:
                    return found
            return None
        content = msg.content
        if (msg.channel in render.NUMBERED_CHANNELS and isinstance(content, TextContent) and content.payload is None
                and render.is_numbered_answer(content.text)):
            latest = await self.store.latest_message(conversation_id)
            if latest is not None and latest[0] == "business":
                return render.answered_choice(content.text, latest[1])
        return None

    async def _announce_postback(self, resolved: ResolvedInbound, action: PostbackAction) -> None:
        """SunCo's `conversation:postback`: the tap is announced, not kept in the history (its
        id derives from the platform's, so a redelivered tap is announced once)."""
        msg, row = resolved.msg, resolved.row
        event_id = derived_id(msg.integration_id, msg.provider_message_id, "postback")
        await self.announce(conv.PostbackReceived(
            id=event_id, app_id=msg.app_id, conversation_id=row["id"], created_at=msg.received_at,
            conversation=conversation_ref(row), user=resolved.user, payload=action.payload, text=action.text,
            metadata=action.metadata, source=Source(type=msg.channel, integration_id=msg.integration_id,
                                                    original_message_id=msg.provider_message_id)))

    async def _resolve_inbound(self, msg: chan.InboundMessage, *, merges_pending: bool) -> ResolvedInbound | None:
        """Who sent `msg` and into which conversation it goes (created when the user has none);
        None when a link or merge step consumed it instead (`merges_pending`: the app has merges
        waiting for a customer's yes, so this one may be answering one)."""
        if await self.linker.handle(msg):
            return None
        user, client = await self.inbound_identity(msg)
        if merges_pending and await self.linker.on_inbound(msg, user, client):  # a yes or no to a merge
            return None
        if client.status == "pending":  # a direct link by phone waits for this number (clients.py)
            outcome = await self.phone_links.on_pending_inbound(msg, user, client)
            if outcome.consumed:
                return None
            if outcome.resolve_again:
                user, client = await self.inbound_identity(msg)
            else:
                assert outcome.user is not None and outcome.client is not None
                user, client = outcome.user, outcome.client
            if outcome.conversation_id:
                msg = msgspec.structs.replace(msg, conversation_id=outcome.conversation_id)
        row = None
        if msg.conversation_id:
            row = await self.store.get_conversation(msg.app_id, msg.conversation_id)
            if row is None or await self.store.participant(msg.conversation_id, user.id) is None:
                if msg.user_id:  # an SDK session names only its own conversations
                    raise Poison(f"conversation {msg.conversation_id} is not the user's")
                # A channel's hint (an e-mail replying to a conversation the address is not part
                # of, or one deleted since): the message is the sender's, in their own conversation.
                log.warning("message %s names conversation %s, which is not its sender's: stored in theirs",
                            msg.provider_message_id, msg.conversation_id,
                            extra=log_fields(integration_id=msg.integration_id))
                row = None
        if row is None:
            row = await self.store.default_conversation(msg.app_id, user.id)
            if row is None:
                source = Source(type=msg.channel, integration_id=msg.integration_id)
                row, _created = await self.ensure_conversation(msg.app_id, user, reason="message", source=source)
        return ResolvedInbound(msg, user, client, await self.with_default_control(msg.app_id, row))

    async def _store_inbound(self, resolved: ResolvedInbound, fence: Mapping[int, int] | None) -> StoredInbound | None:
        """The message stored in its conversation's history; None when a concurrent duplicate won
        the insert (its announcement is republished instead)."""
        msg, user, client = resolved.msg, resolved.user, resolved.client
        conversation_id = resolved.row["id"]
        received = now()
        content = msg.content
        if msg.postback is not None:
            title = msg.postback.text or (content.text if isinstance(content, TextContent) else "")
            content = TextContent(text=title, payload=msg.postback.payload)
        display_name = msg.display_name or client.display_name or user.profile.given_name
        message = Message(
            id=new_id(), received=iso(received),
            author=Author(type="user", user_id=user.id, user_external_id=user.external_id, display_name=display_name,
                          avatar_url=client.avatar_url or user.profile.avatar_url),
            content=content,
            source=Source(type=msg.channel, integration_id=msg.integration_id,
                          original_message_id=msg.provider_message_id,
                          original_message_timestamp=iso(msg.received_at),
                          client=SourceClient(id=client.id, type=client.type, integration_id=client.integration_id,
                                              external_id=client.external_id)),
            quoted_message=None if not msg.quoted_provider_message_id else QuotedMessage(
                type="externalMessageId", external_message_id=msg.quoted_provider_message_id),
            metadata=msg.metadata or None,
        )
        event_id = new_id()
        record = await self.store.record_inbound(
            message_id=message.id, app_id=msg.app_id, conversation_id=conversation_id, user_id=user.id,
            user_external_id=user.external_id, integration_id=msg.integration_id,
            provider_message_id=msg.provider_message_id, event_id=event_id, received=received, body=dumps(message),
            client_id=client.id, client_type=client.type, client_integration_id=client.integration_id,
            client_external_id=client.external_id, client_info=client.info,
            attachment=self.claimed_file(msg.app_id, message.content), fence=fence)
        if record.seq is None:  # a concurrent duplicate won the insert
            duplicate = await self.store.message_by_provider_id(msg.app_id, msg.integration_id,
                                                                msg.provider_message_id)
            if duplicate is not None:
                await self._republish(msg.app_id, duplicate)
            return None
        log.info("customer message %s stored in conversation %s", message.id, conversation_id, extra=log_fields(
            app_id=msg.app_id, conversation_id=conversation_id, message_id=message.id, channel=msg.channel,
            provider_message_id=msg.provider_message_id))
        return StoredInbound(message, event_id, record.seq, received, record.joined_others)

    async def _announce_inbound(self, resolved: ResolvedInbound, stored: StoredInbound) -> None:
        """ClientAdded when a new channel joined a conversation the user already had (SunCo's
        client:add), then MessageCreated."""
        app_id, user, client, conversation_id = resolved.msg.app_id, resolved.user, resolved.client, resolved.row["id"]
        if stored.joined_others:
            await self.announce(conv.ClientAdded(
                id=derived_id(conversation_id, client.id, "client:add"), app_id=app_id,
                conversation_id=conversation_id, created_at=stored.received, user=user, client=client))
        await self.announce(conv.MessageCreated(
            id=stored.event_id, app_id=app_id, conversation_id=conversation_id, created_at=stored.received,
            conversation=conversation_ref(resolved.row), message=stored.message, cursor=stored.seq, user_id=user.id))

    async def _republish(self, app_id: str, stored: StoredMessage) -> None:
        """Publish a stored message's MessageCreated again with its original event id (de-duplicated
        by JetStream if the first publish went through)."""
        row = await self.store.get_conversation(app_id, stored.conversation_id)
        if row is None:
            return
        message = MESSAGE_DECODER.decode(stored.body)
        await self.announce(conv.MessageCreated(
            id=stored.event_id, app_id=app_id, conversation_id=stored.conversation_id,
            created_at=_parse_received(message), conversation=conversation_ref(row), message=message,
            cursor=stored.seq, user_id=message.author.user_id or ""))

    async def inbound_activity(self, msg: chan.InboundActivity) -> None:
        """Typing/read from a customer: update read state, announce ActivityPosted."""
        row = await self.store.get_conversation(msg.app_id, msg.conversation_id)
        participant = None if row is None else await self.store.participant(msg.conversation_id, msg.user_id)
        if row is None or participant is None:
            log.warning("dropping activity for unknown conversation/participant %s/%s", msg.conversation_id,
                        msg.user_id)
            return
        if msg.activity == "conversation:read":
            async with self.store.tx():
                await self.store.mark_read(participant["id"], msg.at)
        client = SourceClient(id=msg.client_id, type="sdk" if msg.channel in SDK_INTEGRATION_TYPES else msg.channel,  # type: ignore[arg-type]
                              integration_id=msg.integration_id) if _is_client_type(msg.channel) else None
        await self.announce(conv.ActivityPosted(
            id=new_id(), app_id=msg.app_id, conversation_id=msg.conversation_id, created_at=msg.at,
            conversation=conversation_ref(row), user_id=msg.user_id,
            activity=Activity(type=msg.activity,
                              author=Author(type="user", user_id=msg.user_id,
                                            user_external_id=participant["user_external_id"]),
                              source=Source(type=msg.channel, integration_id=msg.integration_id, client=client))))

    # --- delivery statuses ----------------------------------------------------------------

    async def handle_status(self, data: bytes, _headers: Mapping[str, str], delivery: Delivery) -> None:
        """Consumer of `status.>`: map provider ids to messages and announce DeliveryReported."""
        try:
            status = chan.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise refusal(data, exc, chan.TYPES, "status") from exc
        if not isinstance(status, chan.DeliveryStatus):
            raise Poison(f"unexpected {type(status).__name__} on status")
        _refuse_off_subject(status, delivery.subject)
        await self.delivery_status(status, delivery.num_delivered)

    async def delivery_status(self, status: chan.DeliveryStatus, num_delivered: int = 1) -> None:
        message_id, conversation_id = status.message_id, status.conversation_id
        if notification.is_notification_id(message_id):
            return  # a send of `notifications` (not a message of the history): it follows those itself
        if message_id is None:
            mapped = await self.store.external(status.app_id, status.integration_id, status.provider_message_id)
            if mapped is None:
                if num_delivered < STATUS_MAX_DELIVERIES:
                    # Its `sent` (which maps it) may be right behind it: let that pass.
                    raise Retry(0.5, f"provider message {status.provider_message_id} not mapped yet", let_pass=True)
                log.warning("dropping %s status for unknown provider message %s", status.status,
                            status.provider_message_id)
                return
            message_id, conversation_id = mapped["message_id"], mapped["conversation_id"]
        stored = await self.store.get_message(status.app_id, message_id)
        if stored is None:
            log.warning("dropping %s status for unknown message %s", status.status, message_id)
            return
        conversation_id = stored.conversation_id
        if status.status == "sent":
            async with self.store.tx():
                await self.store.upsert_external(status.app_id, status.integration_id, status.provider_message_id,
                                                 message_id, conversation_id, now())
        row = await self.store.get_conversation(status.app_id, conversation_id)
        if row is None:
            return
        participants = await self.store.participants(conversation_id)
        user = UserRef(id=participants[0]["user_id"], external_id=participants[0]["user_external_id"]) \
            if participants else UserRef(id="")
        kind: conv.DeliveryKind = {"sent": "channel", "delivered": "user", "read": "user", "failed": "failure"}[
            status.status]  # type: ignore[assignment]
        error = None
        if status.status == "failed":
            error = DeliveryError(code=status.error_code or "delivery_failed",
                                  message=status.error_title or status.error_details)
        event_id = derived_id(message_id, status.integration_id, status.status)
        event = conv.DeliveryReported(
            id=event_id, app_id=status.app_id, conversation_id=conversation_id, created_at=status.timestamp,
            kind=kind, conversation=conversation_ref(row), user=user, message_id=message_id,
            destination=Destination(type=status.channel, integration_id=status.integration_id),
            external_messages=[ExternalMessage(id=status.provider_message_id)],
            is_final=status.status == "failed", error=error, read=status.status == "read")
        await self.announce(event)
        if status.status == "read" and participants:
            await self._customer_read(status, row, participants[0], message_id)
        if status.status == "failed" and status.error_code in BLOCKED_ERROR_CODES and participants:
            await self._mark_blocked(status, conversation_id, str(participants[0]["id"]))

    async def _customer_read(self, status: chan.DeliveryStatus, row: Row, participant: Row, message_id: str) -> None:
        """The platform says the customer read a business message: the customer read the
        conversation (SunCo `conversation:read`, author user), once per message read."""
        async with self.store.tx():
            await self.store.mark_read(participant["id"], status.timestamp)
        event_id = derived_id(message_id, status.integration_id, "conversation:read")
        author = Author(type="user", user_id=participant["user_id"], user_external_id=participant["user_external_id"])
        event = conv.ActivityPosted(
            id=event_id, app_id=status.app_id, conversation_id=row["id"], created_at=status.timestamp,
            conversation=conversation_ref(row), user_id=participant["user_id"],
            activity=Activity(type="conversation:read", author=author,
                              source=Source(type=status.channel, integration_id=status.integration_id)))
        await self.announce(event)

    async def _mark_blocked(self, status: chan.DeliveryStatus, conversation_id: str, participant_id: str) -> None:
        """The customer blocked the business on this channel: the client becomes `blocked` (SunCo
        `client:update`, reason `blocked`), so routing and notifications stop choosing it."""
        client_id = next((a.client_id for a in await self.store.associations(participant_id)
                          if a.integration_id == status.integration_id), None)
        if client_id is None:
            return
        reply = await self.identity.call(subjects.IDENTITY_CLIENT_STATUS, ident.SetClientStatus(
            app_id=status.app_id, client_id=client_id, status="blocked"))
        if not isinstance(reply, ident.ClientReply):
            log.warning("could not mark client %s blocked: %s", client_id, reply)
            return
        self.identity.forget_user(reply.user.id)
        event_id = derived_id(client_id, status.provider_message_id, "client:update:blocked")
        await self.announce(conv.ClientUpdated(
            id=event_id, app_id=status.app_id, conversation_id=conversation_id, created_at=status.timestamp,
            user=reply.user, client=reply.client, reason="blocked"))

    # --- request/reply for other services -------------------------------------------------

    async def answer(self, data: bytes, _headers: Mapping[str, str]) -> bytes:
        """The CONVERSATIONS_START and CONVERSATIONS_HISTORY endpoints."""
        try:
            request = conv.decode_request(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return conv.ENCODER.encode(conv.ConversationError(status=400, code="bad_request",
                                                              title=f"Invalid request: {exc}"))
        try:
            if isinstance(request, conv.StartConversation):
                reply: conv.ConversationRequest = await self.start_conversation(request)
            elif isinstance(request, conv.GetHistory):
                reply = await self.history(request)
            elif isinstance(request, conv.GetParticipants):
                reply = await self.participants_state(request)
            elif isinstance(request, conv.LinkSdkClient):
                reply = await self.linker.link_sdk(request)
            elif isinstance(request, conv.SdkLogin):
                reply = await sdk_login(self, request)
            else:
                reply = conv.ConversationError(status=400, code="bad_request",
                                               title=f"Unexpected request {type(request).__name__}")
        except ApiError as exc:
            reply = conv.ConversationError(status=exc.status, code=exc.code, title=exc.title)
        except Retry as exc:
            reply = conv.ConversationError(status=503, code="service_unavailable", title=str(exc))
        return conv.ENCODER.encode(reply)

    async def start_conversation(self, req: conv.StartConversation) -> conv.ConversationStarted:
        """The SDK user's default conversation (created when missing), the SDK client made primary."""
        if await self.store.get_app(req.app_id) is None:
            raise ApiError(404, "App not found", "app_not_found")
        existing = await self.store.default_conversation(req.app_id, req.user_id)
        if existing is None:
            try:
                reply = await self.identity.call(subjects.IDENTITY_USER_GET, ident.GetUser(
                    app_id=req.app_id, user_id_or_external_id=req.user_id))
            except IdentityUnavailable as exc:
                raise ApiError(503, "Identity service unavailable") from exc
            if isinstance(reply, ident.IdentityError):
                raise ApiError(reply.status, reply.title, reply.code)
            user = reply.user if isinstance(reply, ident.UserReply) else User(id=req.user_id)
            try:
                row, created = await self.ensure_conversation(
                    req.app_id, user, reason="startConversation",
                    source=Source(type="web", integration_id=req.integration_id))
            except (nats.errors.Error, TimeoutError) as exc:
                raise ApiError(503, "Messaging bus unavailable") from exc
        else:
            row, created = existing, False
        client = Client(id=req.client_id, type="sdk", status="active", integration_id=req.integration_id)
        await self.associate(req.app_id, row["id"], User(id=req.user_id), client, now())
        return conv.ConversationStarted(conversation=conversation_ref(row), created=created)

    async def history(self, req: conv.GetHistory) -> conv.HistoryPage:
        """Messages with cursor > after (oldest first), or the latest `limit` without `after`."""
        row = await self.store.get_conversation(req.app_id, req.conversation_id)
        if row is None or (req.user_id is not None and
                           await self.store.participant(req.conversation_id, req.user_id) is None):
            raise ApiError(404, "Conversation not found", "conversation_not_found")
        limit = max(1, min(req.limit, 1000))
        if req.after is not None:
            rows, more = await self.store.messages_after(req.conversation_id, req.after, limit)
        else:
            rows, more = await self.store.messages_before(req.conversation_id, None, limit)
        return conv.HistoryPage(
            conversation=conversation_ref(row),
            messages=[conv.HistoryMessage(cursor=r.seq, message=MESSAGE_DECODER.decode(r.body)) for r in rows],
            has_more=more, business_last_read=row["business_last_read"])


    async def participants_state(self, req: conv.GetParticipants) -> conv.ParticipantsReply:
        """Participants with read state and client associations (primary first), for `notifications`."""
        row = await self.conversation_row(req.app_id, req.conversation_id)
        participants = []
        for participant in await self.store.participants(req.conversation_id):
            clients = [conv.ParticipantClient(client_id=a.client_id, type=a.type, integration_id=a.integration_id,
                                              external_id=a.external_id, info=a.info or {}, last_active=a.last_active)
                       for a in await self.store.associations(participant["id"])]
            participants.append(conv.ParticipantState(
                user_id=participant["user_id"], user_external_id=participant["user_external_id"],
                unread_count=participant["unread_count"] or 0, last_read=participant["last_read"], clients=clients))
        return conv.ParticipantsReply(conversation=conversation_ref(row), participants=participants)


def _anonymous(body: str) -> str:
    """A stored message body without its author's name and picture."""
    message = MESSAGE_DECODER.decode(body)
    if message.author.display_name is None and message.author.avatar_url is None:
        return body
    return dumps(msgspec.structs.replace(message, author=msgspec.structs.replace(
        message.author, display_name=None, avatar_url=None)))


def _parse_received(message: Message) -> float:
    try:
        return parse_iso(message.received)
    except ValueError:
        return now()


_CLIENT_TYPES = frozenset({
    "apple", "gbm", "googlercs", "instagram", "kakao", "line", "mailgun", "messagebird", "messenger",
    "slackconnect", "sdk", "telegram", "twilio", "twitter", "viber", "wechat", "whatsapp", "web",
})


def _refuse_off_subject(message: chan.InboundMessage | chan.InboundActivity | chan.DeliveryStatus,
                       subject: str) -> None:
    """Poison unless the message names the channel and integration of the subject it came on
    (`<family>.<channel>.<integration>.<partition>`). NATS lets each service publish only on its
    own channel's subjects; a message claiming another channel's integration (another
    channel's customer, another channel's sends) came from a service that must not speak for
    it — one taken over from the internet, say — and is not believed."""
    named = subjects.channel_of_subject(subject)
    if named is not None and named != (message.channel, message.integration_id):
        log.error("refusing a message that claims %s integration %s on %s", message.channel,
                  message.integration_id, subject)
        raise Poison(f"{message.channel}/{message.integration_id} does not match the subject {subject}")


def _is_client_type(channel: str) -> bool:
    return channel in _CLIENT_TYPES
