"""Channel handoff on the inbound path: a message that carries a link code is redeemed by
`handoff` before anything is stored as customer text, and the sender joins the code's
conversation (merging users when the channel identity belonged to someone else).

The reverse path shares the same linking (`Linker.link_arrival`): a web or app SDK session
created with a `linkCode` (`conversation.sdk.link`) gets a new `sdk` client on the code's user
and conversation; it gets no recap, since the SDK shows the whole history.

What the customer sent to redeem the code (the prefilled WhatsApp/SMS text, the Telegram
`/start`, the Messenger referral) is consumed here: the business sees `client:add`,
`conversation:referral` (and `user:merge`), never the code as a message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors

from services.conversations.store import MESSAGE_DECODER, conversation_ref
from shared import subjects
from shared.bus import Retry
from shared.http import ApiError
from shared.ids import new_id, now
from shared.messages import channel as chan
from shared.messages import conversation as conv
from shared.messages import handoff
from shared.messages import identity as ident
from shared.sunco import Client, ClientType, DeliveryError, Message, Source, TextContent, User

if TYPE_CHECKING:
    from services.conversations.handlers import Conversations

log = logging.getLogger(__name__)

DEFAULT_RECAP_COUNT = 10
RECAP_MAX_CHARS = 1500
RECAP_LINE_MAX_CHARS = 200
THEFT_MESSAGE = ("This chat is already linked to another account, so the conversation could not be moved here. "
                 "Please continue where you started.")


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
        code = handoff.find_visible_code(msg.content.text)
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
        """The sender of an inbound channel message."""
        return cls(app_id=msg.app_id, integration_id=msg.integration_id, channel=msg.channel,
                   client_type=msg.client_type, channel_user_id=msg.channel_user_id,
                   display_name=msg.display_name, info=msg.client_info, raw=msg.raw)


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
    code's conversation (one code path for both: `link_arrival`)."""

    def __init__(self, conversations: Conversations, recap_count: int = DEFAULT_RECAP_COUNT,
                 timeout: float = 5.0) -> None:
        self.conversations = conversations
        self.recap_count = recap_count
        self.timeout = timeout

    async def _redeem(self, arrival: Arrival, code: str) -> handoff.HandoffUnion:
        """Ask `handoff` to redeem `code` for `arrival` (bus and decoding errors propagate)."""
        data = await self.conversations.bus.request(subjects.HANDOFF_REDEEM, handoff.encode(handoff.RedeemCode(
            app_id=arrival.app_id, integration_id=arrival.integration_id, channel=arrival.channel,
            channel_user_id=arrival.channel_user_id, code=code)), timeout=self.timeout)
        return handoff.decode(data)

    async def handle(self, msg: chan.InboundMessage) -> bool:
        """Redeem the message's code and link its sender; True when the message was consumed."""
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
            await self._answer(msg, reply.message)
            log.info("link code refused (%s) on %s", reply.reason, msg.channel)
            return True
        if not isinstance(reply, handoff.CodeRedeemed):
            log.warning("handoff refused to redeem: %s", reply)
            return False
        await self._link(msg, code, reply)
        return True

    async def _answer(self, msg: chan.InboundMessage, text: str) -> None:
        """Say `text` to the sender on the channel the code arrived on (nothing is stored)."""
        user, client = await self.conversations._inbound_identity(msg)
        await self._send(msg.app_id, client, user.id, "", text)

    async def _send(self, app_id: str, client: Client, user_id: str, conversation_id: str, text: str) -> None:
        channel_name = self.conversations.outbound_channel_of(client)
        if channel_name is None or not client.integration_id:
            return
        message_id = new_id()
        send = chan.OutboundSend(
            app_id=app_id, integration_id=client.integration_id, channel=channel_name,
            conversation_id=conversation_id, message_id=message_id, user_id=user_id, client_id=client.id,
            recipient=client.external_id or "", recipient_info=client.info or {}, content=TextContent(text=text),
            created_at=now())
        await self.conversations.bus.publish(subjects.outbound_subject(channel_name, client.integration_id),
                                             chan.encode(send), msg_id=message_id)

    async def _link(self, msg: chan.InboundMessage, code: str, redeemed: handoff.CodeRedeemed) -> None:
        """A channel arrival: link it, then send the recap there (or say why it was refused)."""
        convs = self.conversations
        linked = await self.link_arrival(Arrival.of_message(msg), code, redeemed)
        if linked is None:
            await self._answer(msg, GONE_MESSAGE)
            return
        if isinstance(linked, ident.IdentityError):
            user, client = await convs._inbound_identity(msg)
            await self._send(msg.app_id, client, user.id, "", THEFT_MESSAGE)
            await convs._publish_event(conv.ClientRemoved(
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

    async def link_arrival(self, arrival: Arrival, code: str,
                           redeemed: handoff.CodeRedeemed) -> ident.ClientLinked | ident.IdentityError | None:
        """Attach the arrival to the code's user (merging its old user in) and make it the primary
        client of the code's conversation; announce `user:merge`, `client:add` (channelLinking)
        and `conversation:referral`.

        None when the conversation (or the user's place in it) is gone; identity's refusal (two
        known users are never merged) is returned as is; identity outages raise Retry.
        """
        convs = self.conversations
        store = convs.store
        row = await store.get_conversation(arrival.app_id, redeemed.conversation_id)
        if row is None:
            return None
        reply = await convs.identity.call(subjects.IDENTITY_CLIENT_LINK, ident.LinkClient(
            app_id=arrival.app_id, user_id=redeemed.user_id, integration_id=arrival.integration_id,
            client_type=arrival.client_type, channel_user_id=arrival.channel_user_id,
            display_name=arrival.display_name, info=arrival.info, raw=arrival.raw))
        if isinstance(reply, ident.IdentityError):
            if reply.status >= 500:
                raise Retry(1.0, f"identity: {reply.title}")
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
            await convs._publish_event(conv.UsersMerged(
                id=reply.merge.id, app_id=arrival.app_id, conversation_id=redeemed.conversation_id, created_at=at,
                surviving=user, discarded=reply.discarded_user, reason=reply.merge.reason,
                merged_client_ids=reply.merge.merged_client_ids, merged_conversation_ids=merged_conversations,
                discarded_metadata=reply.merge.discarded_metadata))
        await convs._publish_event(conv.ClientAdded(
            id=new_id(), app_id=arrival.app_id, conversation_id=redeemed.conversation_id, created_at=at, user=user,
            client=client, reason="channelLinking"))
        await convs._publish_event(conv.Referred(
            id=new_id(), app_id=arrival.app_id, conversation_id=redeemed.conversation_id, created_at=at,
            conversation=conv_ref, user=user, code=code,
            source=Source(type=arrival.channel, integration_id=arrival.integration_id)))
        return reply

    async def link_sdk(self, req: conv.LinkSdkClient) -> conv.SdkClientLinked:
        """An SDK session redeems a code: a new `sdk` client joins the code's conversation.

        Nothing is sent to the new client: the SDK loads the conversation's whole history. A
        refused code raises ApiError (4xx) whose title is the handoff's message for the customer.
        """
        arrival = Arrival(app_id=req.app_id, integration_id=req.integration_id, channel=req.channel,
                          client_type="sdk", channel_user_id=req.channel_user_id, info=req.info)
        if handoff.find_visible_code(req.code) is not None:
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
        from services.conversations.handlers import IdentityUnavailable  # handlers imports this module

        try:
            linked = await self.link_arrival(arrival, req.code, reply)
        except IdentityUnavailable as exc:
            raise ApiError(503, "Identity service unavailable, try again") from exc
        if linked is None:
            raise ApiError(410, GONE_MESSAGE, "link_conversation_gone")
        if isinstance(linked, ident.IdentityError):
            raise ApiError(409, linked.title, linked.code)
        row = await self.conversations.store.get_conversation(req.app_id, reply.conversation_id)
        if row is None:
            raise ApiError(410, GONE_MESSAGE, "link_conversation_gone")
        log.info("linked SDK client %s into conversation %s", linked.client.id, reply.conversation_id)
        return conv.SdkClientLinked(user=linked.user, client=linked.client, conversation=conversation_ref(row))
