"""Channel handoff on the inbound path: a message that carries a link code is redeemed by
`handoff` before anything is stored as customer text, and the sender joins the code's
conversation.

A link code must never give its holder anything the redeemer had before. A channel identity
that is new, or that has nothing (no messages, no other clients, no externalId), simply joins
the code's user. One that already holds history is not merged on the code alone: the customer
is asked on that channel, with what would be shared, and only "YES <the question's number>"
merges it in (`PendingMerge`); a no or silence links nothing. An identified user (externalId)
is never merged by a link at all (identity refuses it).

The reverse path shares the same linking (`Linker.link_arrival`): a web or app SDK session
created with a `linkCode` (`conversation.sdk.link`) gets a new `sdk` client on the code's user
and conversation; it gets no recap, since the SDK shows the whole history.

What the customer sent to redeem a valid code (the prefilled WhatsApp/SMS text, the Telegram
`/start`, the Messenger referral) is consumed here: the business sees `client:add`,
`conversation:referral` (and `user:merge`), never the code as a message. A refused code is
answered on the channel and the customer's message is stored like any other: no customer
message is ever dropped.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors

from services.conversations.clients import yes_or_no
from services.conversations.core import ConversationCore
from services.conversations.identity_client import IdentityUnavailable
from services.conversations.store import MESSAGE_DECODER, PendingMerge, conversation_ref
from shared import subjects
from shared.bus import Retry
from shared.http import ApiError
from shared.ids import derived_id, new_id, now
from shared.messages import channel as chan
from shared.messages import conversation as conv
from shared.messages import handoff
from shared.messages import identity as ident
from shared.sunco import Client, ClientType, Content, DeliveryError, Message, Source, TextContent, User

log = logging.getLogger(__name__)

DEFAULT_RECAP_COUNT = 10
RECAP_MAX_CHARS = 1500
RECAP_LINE_MAX_CHARS = 200
THEFT_MESSAGE = ("This chat is already linked to another account, so the conversation could not be moved here. "
                 "Please continue where you started.")
# How long a customer has to confirm a merge on the channel that holds the history.
CONFIRM_TTL_SECONDS = 900.0
_CONFIRMATION = re.compile(r"^\W*yes\W*(\d{4})\W*$", re.IGNORECASE)


def link_code(msg: chan.InboundMessage) -> tuple[str, bool] | None:
    """The link code an inbound message carries, and whether the customer could see it.

    Invisible codes ride in Messenger referrals and Telegram `/start` payloads; visible ones in
    the text of a prefilled WhatsApp or SMS message.
    """
    if msg.user_id:
        return None  # SDK messages come from an existing session
    if msg.referral and handoff.CODE_PATTERN.match(msg.referral):
        return msg.referral, False
    if msg.channel in handoff.VISIBLE_CODE_CHANNELS and isinstance(msg.content, TextContent):
        code = handoff.redemption_code(msg.content.text)
        if code is not None:
            return code, True
    return None


def message_line(message: Message, business_name: str) -> str | None:
    """One recap line: who said what (text only; other content as a short label)."""
    content = message.content
    text = content.text if isinstance(content, TextContent) else getattr(content, "text", None) or "[attachment]"
    if not text:
        return None
    text = " ".join(text.split())
    if len(text) > RECAP_LINE_MAX_CHARS:
        text = text[:RECAP_LINE_MAX_CHARS - 1] + "…"
    who = "You" if message.author.type == "user" else (message.author.display_name or business_name)
    return f"{who}: {text}"


def recap_text(messages: list[Message], business_name: str) -> str:
    """The short history the new channel receives: the latest lines that fit, oldest first."""
    header = f"Continuing your conversation with {business_name}. Recent messages:"
    footer = "Reply here to continue."
    lines: list[str] = []
    budget = RECAP_MAX_CHARS - len(header) - len(footer) - 4
    for message in reversed(messages):
        line = message_line(message, business_name)
        if line is None:
            continue
        if len(line) + 1 > budget:
            break
        lines.append(line)
        budget -= len(line) + 1
    if not lines:
        return f"Continuing your conversation with {business_name}. {footer}"
    return "\n".join([header, "", *reversed(lines), "", footer])


def _since(at: float | None) -> str:
    return "" if at is None else " since " + time.strftime("%d %b %Y", time.gmtime(at)).lstrip("0")


def _messages(count: int) -> str:
    return "1 message" if count == 1 else f"{count} messages"


def link_question(business: str, count: int, since: float | None, answer: str) -> str:
    """What a redeemer whose chat holds history is asked, with what a yes would share and the
    number the yes must carry."""
    held = f"your earlier conversation with {business} ({_messages(count)}{_since(since)})" if count else \
        f"your earlier details with {business}"
    return (f"You opened a link to continue a conversation with {business} here. This chat already holds "
            f"{held}. To bring them together, reply YES {answer}: your earlier messages will be shared with "
            f"whoever continues the linked conversation. Reply NO to keep this chat as it is.")


def confirms(content: Content, answer: str) -> bool:
    """Whether the customer's message is the yes asked for: YES and the question's number."""
    match = _CONFIRMATION.match(content.text) if isinstance(content, TextContent) else None
    return match is not None and match.group(1) == answer


def declined_text(business: str) -> str:
    """The answer to a no: nothing was linked."""
    return f"OK, nothing was linked. This chat with {business} stays as it was."


@dataclass(frozen=True)
class NeedsConfirmation:
    """The arrival's identity belongs to `owner`, who has something of its own (`messages`
    since `since`, other clients or an externalId): merging needs the customer's yes."""

    owner: User
    client: Client
    messages: int
    since: float | None


@dataclass(frozen=True)
class Arrival:
    """The channel identity a redeemed code links: who arrived, on which integration and channel.

    A channel message brings it (`of_message`); an SDK session brings a brand-new `sdk` client.
    """

    app_id: str
    integration_id: str
    channel: str
    client_type: ClientType
    channel_user_id: str
    display_name: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of_message(cls, msg: chan.InboundMessage) -> Arrival:
        """The sender of an inbound channel message (not its raw payload: that is the message,
        which must not outlive it in the client's record; see `ConversationCore.inbound_identity`)."""
        return cls(app_id=msg.app_id, integration_id=msg.integration_id, channel=msg.channel,
                   client_type=msg.client_type, channel_user_id=msg.channel_user_id,
                   display_name=msg.display_name, info=msg.client_info)


# SDK refusals: the HTTP status and error code per handoff refusal (a foreign code reads like an
# unknown one, so a code of another app is never confirmed to exist).
SDK_REFUSALS: dict[str, tuple[int, str]] = {
    "unknown": (400, "link_code_invalid"),
    "foreign": (400, "link_code_invalid"),
    "wrong_channel": (400, "link_code_wrong_channel"),
    "expired": (410, "link_code_expired"),
    "used": (410, "link_code_used"),
    "rate_limited": (429, "too_many_requests"),
}
GONE_MESSAGE = "This conversation no longer exists."
SDK_SHORT_CODE_MESSAGE = ("This code isn't valid here. Go back to the chat where you started and ask for a new "
                          "link.")


class Linker:
    """Redeems link codes that arrive on channels or SDK sessions and links the arrival into the
    code's conversation (one code path for both: `link_arrival`); asks and hears the customer's
    confirmation where a merge needs one."""

    def __init__(self, conversations: ConversationCore, recap_count: int = DEFAULT_RECAP_COUNT,
                 timeout: float = 5.0, confirm_ttl: float = CONFIRM_TTL_SECONDS) -> None:
        self.conversations = conversations
        self.recap_count = recap_count
        self.timeout = timeout
        self.confirm_ttl = confirm_ttl

    async def _redeem(self, arrival: Arrival, code: str) -> handoff.HandoffUnion:
        """Ask `handoff` to redeem `code` for `arrival` (bus and decoding errors propagate)."""
        data = await self.conversations.bus.request(subjects.HANDOFF_REDEEM, handoff.encode(handoff.RedeemCode(
            app_id=arrival.app_id, integration_id=arrival.integration_id, channel=arrival.channel,
            channel_user_id=arrival.channel_user_id, code=code)), timeout=self.timeout)
        return handoff.decode(data)

    async def handle(self, msg: chan.InboundMessage) -> bool:
        """Redeem the message's code and link its sender; True when the message was consumed.

        A refused code is answered on the channel, and the message flows on to be stored as the
        customer's (False)."""
        found = link_code(msg)
        if found is None:
            return False
        code, visible = found
        try:
            reply = await self._redeem(Arrival.of_message(msg), code)
        except nats.errors.NoRespondersError:
            log.warning("handoff is not running: message %s with a code flows on as text", msg.provider_message_id)
            return False
        except (nats.errors.Error, TimeoutError) as exc:
            raise Retry(1.0, f"handoff unavailable: {exc}") from exc
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise Retry(1.0, f"unexpected answer from handoff: {exc}") from exc
        if isinstance(reply, handoff.CodeRefused):
            if reply.reason == "unknown" and not visible:
                return False  # an ordinary m.me ref / t.me start parameter, not one of ours
            if reply.reason == "repeated":
                log.info("link code sent again by the sender who redeemed it on %s: nothing to do", msg.channel)
                return True
            await self._answer(msg, reply.message)
            log.info("link code refused (%s) on %s; the message is stored as the customer's", reply.reason,
                     msg.channel)
            return False
        if not isinstance(reply, handoff.CodeRedeemed):
            log.warning("handoff refused to redeem: %s", reply)
            return False
        await self._link(msg, code, reply)
        return True

    async def _answer(self, msg: chan.InboundMessage, text: str) -> None:
        """Say `text` to the sender on the channel the code arrived on (nothing is stored)."""
        user, client = await self.conversations.inbound_identity(msg)
        await self._send(msg.app_id, client, user.id, "", text)

    async def _send(self, app_id: str, client: Client, user_id: str, conversation_id: str, text: str) -> None:
        channel_name = await self.conversations.outbound_channel_of(client)
        if channel_name is None or not client.integration_id:
            return
        message_id = new_id()
        send = chan.OutboundSend(
            app_id=app_id, integration_id=client.integration_id, channel=channel_name,
            conversation_id=conversation_id, message_id=message_id, user_id=user_id, client_id=client.id,
            recipient=client.external_id or "", recipient_info=client.info or {}, content=TextContent(text=text),
            created_at=now())
        await self.conversations.bus.publish(chan.subject_of(send),
                                             chan.encode(send), msg_id=message_id)

    async def _link(self, msg: chan.InboundMessage, code: str, redeemed: handoff.CodeRedeemed, *,
                    confirmed: bool = False) -> None:
        """A channel arrival: link it and send the recap there, ask first when the arrival holds
        history of its own, or say why it was refused."""
        convs = self.conversations
        linked = await self.link_arrival(Arrival.of_message(msg), code, redeemed, confirmed=confirmed)
        if isinstance(linked, NeedsConfirmation):
            await self._ask_link(msg, code, redeemed, linked)
            return
        if linked is None or (isinstance(linked, ident.IdentityError) and linked.code != "link_refused"):
            await self._answer(msg, GONE_MESSAGE)
            return
        if isinstance(linked, ident.IdentityError):
            user, client = await convs.inbound_identity(msg)
            await self._send(msg.app_id, client, user.id, "", THEFT_MESSAGE)
            await convs.publish_event(conv.ClientRemoved(
                id=new_id(), app_id=msg.app_id, conversation_id=redeemed.conversation_id, created_at=now(),
                user=User(id=redeemed.user_id), client=client, reason="linkFailed",
                error=DeliveryError(code=linked.code, message=linked.title)))
            return
        history, _more = await convs.store.messages_before(redeemed.conversation_id, None, self.recap_count)
        business = await convs.business_name(msg.app_id)
        await self._send(msg.app_id, linked.client, linked.user.id, redeemed.conversation_id,
                         recap_text([MESSAGE_DECODER.decode(m.body) for m in history], business))
        log.info("linked %s client %s into conversation %s", msg.channel, linked.client.id,
                 redeemed.conversation_id)

    async def _link_client(self, arrival: Arrival, user_id: str, *, allow_merge: bool) -> ident.IdentityUnion:
        """identity's LinkClient; outages raise Retry, refusals (4xx) are returned."""
        try:
            reply = await self.conversations.identity.call(subjects.IDENTITY_CLIENT_LINK, ident.LinkClient(
                app_id=arrival.app_id, user_id=user_id, integration_id=arrival.integration_id,
                client_type=arrival.client_type, channel_user_id=arrival.channel_user_id,
                display_name=arrival.display_name, info=arrival.info, raw=arrival.raw, allow_merge=allow_merge))
        except IdentityUnavailable as exc:
            raise Retry(1.0, f"identity unavailable: {exc}") from exc
        if isinstance(reply, ident.IdentityError) and reply.status >= 500:
            raise Retry(1.0, f"identity: {reply.title}")
        return reply

    async def link_arrival(self, arrival: Arrival, code: str, redeemed: handoff.CodeRedeemed, *,
                           confirmed: bool = False,
                           ) -> ident.ClientLinked | ident.IdentityError | NeedsConfirmation | None:
        """Attach the arrival to the code's user and make it the primary client of the code's
        conversation; announce `user:merge`, `client:add` (channelLinking) and
        `conversation:referral`.

        An arrival whose identity belongs to another user is merged into the code's user only
        when that user has nothing of its own, or when the customer `confirmed` it on the channel;
        otherwise NeedsConfirmation, with nothing changed. None when the conversation (or the
        user's place in it) is gone; identity's refusals (two known users are never merged) are
        returned as they are; identity outages raise Retry.
        """
        convs = self.conversations
        store = convs.store
        row = await store.get_conversation(arrival.app_id, redeemed.conversation_id)
        if row is None:
            return None
        reply = await self._link_client(arrival, redeemed.user_id, allow_merge=confirmed)
        if isinstance(reply, ident.ClientOwnedElsewhere):
            owner = reply.owner
            count, since = await store.user_history(arrival.app_id, owner.id)
            if count or owner.external_id or owner.metadata or reply.owner_client_count > 1:
                return NeedsConfirmation(owner=owner, client=reply.client, messages=count, since=since)
            # The owner is this client and nothing else: there is nothing of the redeemer's to give away.
            reply = await self._link_client(arrival, redeemed.user_id, allow_merge=True)
        if isinstance(reply, ident.IdentityError):
            return reply
        if not isinstance(reply, ident.ClientLinked):
            raise Retry(1.0, f"unexpected identity reply {type(reply).__name__}")
        conv_ref = conversation_ref(row)
        at = now()
        user, client = reply.user, reply.client
        merged_conversations: list[str] = []
        if reply.merge is not None and reply.discarded_user is not None:
            convs.identity.forget_user(reply.discarded_user.id)
            async with store.tx():
                merged_conversations = await store.merge_user(arrival.app_id, reply.discarded_user.id, user.id,
                                                              user.external_id)
        convs.identity.forget_user(user.id)
        participant = await store.participant(redeemed.conversation_id, user.id)
        if participant is None:
            log.warning("linked user %s is not in conversation %s", user.id, redeemed.conversation_id)
            return None
        async with store.tx():
            await store.upsert_association(str(participant["id"]), client.id, client.type, client.integration_id,
                                           client.external_id, client.info, at)
        if reply.merge is not None and reply.discarded_user is not None:
            await convs.publish_event(conv.UsersMerged(
                id=reply.merge.id, app_id=arrival.app_id, conversation_id=redeemed.conversation_id, created_at=at,
                surviving=user, discarded=reply.discarded_user, reason=reply.merge.reason,
                merged_client_ids=reply.merge.merged_client_ids, merged_conversation_ids=merged_conversations,
                discarded_metadata=reply.merge.discarded_metadata))
        await convs.publish_event(conv.ClientAdded(
            id=new_id(), app_id=arrival.app_id, conversation_id=redeemed.conversation_id, created_at=at, user=user,
            client=client, reason="channelLinking"))
        await convs.publish_event(conv.Referred(
            id=new_id(), app_id=arrival.app_id, conversation_id=redeemed.conversation_id, created_at=at,
            conversation=conv_ref, user=user, code=code,
            source=Source(type=arrival.channel, integration_id=arrival.integration_id)))
        return reply

    # --- confirmations ----------------------------------------------------------------------

    async def _ask_link(self, msg: chan.InboundMessage, code: str, redeemed: handoff.CodeRedeemed,
                        need: NeedsConfirmation) -> None:
        """Ask the redeemer, on the channel that holds their history, whether to bring it along."""
        at = now()
        answer = f"{secrets.randbelow(10_000):04d}"
        async with self.conversations.store.tx():
            await self.conversations.store.put_pending_merge(PendingMerge(
                client_id=need.client.id, app_id=msg.app_id, surviving_user_id=redeemed.user_id,
                discarded_user_id=need.owner.id, conversation_id=redeemed.conversation_id,
                integration_id=msg.integration_id, client_type=need.client.type, code=code, answer=answer,
                created_at=at, expires_at=at + self.confirm_ttl))
        business = await self.conversations.business_name(msg.app_id)
        await self._send(msg.app_id, need.client, need.owner.id, "",
                         link_question(business, need.messages, need.since, answer))
        log.info("link code redeemed by %s client %s which holds history: asked to confirm", msg.channel,
                 need.client.id)

    async def on_inbound(self, msg: chan.InboundMessage, user: User, client: Client) -> bool:
        """A message from a client asked to confirm a merge. Only "YES <the question's number>"
        merges (consumed: True): a plain "yes" or "ok" may answer anything else. A no declines
        and, like anything else, is still the customer's message (False)."""
        pending = await self.conversations.store.pending_merge(client.id)
        if pending is None:
            return False
        if pending.discarded_user_id != user.id or pending.expires_at <= now():
            await self._end(pending, "linkFailed", "link_expired", "The link was not confirmed in time")
            return False
        if not confirms(msg.content, pending.answer):
            if yes_or_no(msg.content) is False:
                business = await self.conversations.business_name(msg.app_id)
                await self._send(msg.app_id, client, user.id, "", declined_text(business))
                await self._end(pending, "linkCancelled", "link_cancelled", "The user declined the link")
                log.info("client %s declined to bring its history into a link", client.id)
            return False
        redeemed = handoff.CodeRedeemed(app_id=pending.app_id, user_id=pending.surviving_user_id,
                                        conversation_id=pending.conversation_id, integration_id=pending.integration_id)
        await self._link(msg, pending.code or "", redeemed, confirmed=True)
        async with self.conversations.store.tx():
            await self.conversations.store.drop_pending_merge(pending.client_id, pending.created_at)
        log.info("client %s confirmed bringing its history into a link", client.id)
        return True

    async def _end(self, pending: PendingMerge, reason: str, code: str, message: str) -> None:
        """Forget a pending merge and tell the business nothing was linked (`client:remove`)."""
        store = self.conversations.store
        row = await store.get_conversation(pending.app_id, pending.conversation_id)
        if row is not None:
            # Published before the row goes (a derived id de-duplicates a second try).
            event_id = derived_id(pending.client_id, str(pending.created_at), "pending-merge-end")
            await self.conversations.announce(conv.ClientRemoved(
                id=event_id, app_id=pending.app_id, conversation_id=pending.conversation_id, created_at=now(),
                user=User(id=pending.surviving_user_id),
                client=Client(id=pending.client_id, type=pending.client_type,  # type: ignore[arg-type]
                              status="inactive", integration_id=pending.integration_id),
                reason=reason, error=DeliveryError(code=code, message=message),
                conversation=conversation_ref(row)))
        async with store.tx():
            await store.drop_pending_merge(pending.client_id, pending.created_at)

    async def sweep(self) -> int:
        """Forget every pending merge past its time; how many."""
        expired = await self.conversations.store.expired_pending_merges(now())
        for pending in expired:
            await self._end(pending, "linkFailed", "link_expired", "The link was not confirmed in time")
        return len(expired)

    async def link_sdk(self, req: conv.LinkSdkClient) -> conv.SdkClientLinked:
        """An SDK session redeems a code: a new `sdk` client joins the code's conversation.

        Nothing is sent to the new client: the SDK loads the conversation's whole history. A
        refused code raises ApiError (4xx) whose title is the handoff's message for the customer.
        """
        arrival = Arrival(app_id=req.app_id, integration_id=req.integration_id, channel=req.channel,
                          client_type="sdk", channel_user_id=req.channel_user_id, info=req.info)
        if handoff.is_visible_code(req.code):
            # Web and app links carry 144-bit codes; a short `TL…` code (WhatsApp, SMS) is refused
            # here, unasked: the SDK endpoint has no per-sender attempt limit, so it must not tell a
            # live short code from an unknown one, nor burn its attempts.
            raise ApiError(400, SDK_SHORT_CODE_MESSAGE, "link_code_invalid")
        try:
            reply = await self._redeem(arrival, req.code)
        except (nats.errors.Error, TimeoutError) as exc:
            raise ApiError(503, "The handoff service is unavailable, try again") from exc
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ApiError(503, "Unexpected answer from the handoff service") from exc
        if isinstance(reply, handoff.CodeRefused):
            status, code = SDK_REFUSALS.get(reply.reason, (400, "link_code_invalid"))
            log.info("link code refused (%s) on SDK integration %s", reply.reason, req.integration_id)
            raise ApiError(status, reply.message, code)
        if isinstance(reply, handoff.HandoffError):
            raise ApiError(reply.status if 400 <= reply.status < 600 else 503, reply.title, reply.code)
        if not isinstance(reply, handoff.CodeRedeemed):
            raise ApiError(503, "Unexpected answer from the handoff service")
        linked = await self.link_arrival(arrival, req.code, reply)  # an identity outage is a Retry: 503
        if linked is None:
            raise ApiError(410, GONE_MESSAGE, "link_conversation_gone")
        if isinstance(linked, ident.IdentityError):
            raise ApiError(409, linked.title, linked.code)
        if isinstance(linked, NeedsConfirmation):  # a fresh SDK client belongs to nobody yet
            raise ApiError(409, "This session already belongs to someone else", "conflict")
        row = await self.conversations.store.get_conversation(req.app_id, reply.conversation_id)
        if row is None:
            raise ApiError(410, GONE_MESSAGE, "link_conversation_gone")
        log.info("linked SDK client %s into conversation %s", linked.client.id, reply.conversation_id)
        return conv.SdkClientLinked(user=linked.user, client=linked.client, conversation=conversation_ref(row))
