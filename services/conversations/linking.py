"""Channel handoff on the inbound path: a message that carries a link code is redeemed by
`handoff` before anything is stored as customer text, and the sender joins the code's
conversation (merging users when the channel identity belonged to someone else).

What the customer sent to redeem the code (the prefilled WhatsApp/SMS text, the Telegram
`/start`, the Messenger referral) is consumed here: the business sees `client:add`,
`conversation:referral` (and `user:merge`), never the code as a message.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import msgspec
import nats.errors

from services.conversations.store import MESSAGE_DECODER, conversation_ref
from shared import subjects
from shared.bus import Retry
from shared.ids import new_id, now
from shared.messages import channel as chan
from shared.messages import conversation as conv
from shared.messages import handoff
from shared.messages import identity as ident
from shared.sunco import Client, DeliveryError, Message, Source, TextContent, User

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


class Linker:
    """Redeems link codes that arrive on channels and links the sender into the conversation."""

    def __init__(self, conversations: Conversations, recap_count: int = DEFAULT_RECAP_COUNT,
                 timeout: float = 5.0) -> None:
        self.conversations = conversations
        self.recap_count = recap_count
        self.timeout = timeout

    async def handle(self, msg: chan.InboundMessage) -> bool:
        """Redeem the message's code and link its sender; True when the message was consumed."""
        found = link_code(msg)
        if found is None:
            return False
        code, visible = found
        try:
            data = await self.conversations.bus.request(subjects.HANDOFF_REDEEM, handoff.encode(handoff.RedeemCode(
                app_id=msg.app_id, integration_id=msg.integration_id, channel=msg.channel,
                channel_user_id=msg.channel_user_id, code=code)), timeout=self.timeout)
            reply = handoff.decode(data)
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
        convs = self.conversations
        store = convs.store
        row = await store.get_conversation(msg.app_id, redeemed.conversation_id)
        if row is None:
            await self._answer(msg, "This conversation no longer exists.")
            return
        reply = await convs.identity.call(subjects.IDENTITY_CLIENT_LINK, ident.LinkClient(
            app_id=msg.app_id, user_id=redeemed.user_id, integration_id=msg.integration_id,
            client_type=msg.client_type, channel_user_id=msg.channel_user_id, display_name=msg.display_name,
            info=msg.client_info, raw=msg.raw))
        conv_ref = conversation_ref(row)
        at = now()
        if isinstance(reply, ident.IdentityError):
            if reply.status >= 500:
                raise Retry(1.0, f"identity: {reply.title}")
            user, client = await convs._inbound_identity(msg)
            await self._send(msg.app_id, client, user.id, "", THEFT_MESSAGE)
            owner = User(id=redeemed.user_id)
            await convs._publish_event(conv.ClientRemoved(
                id=new_id(), app_id=msg.app_id, conversation_id=redeemed.conversation_id, created_at=at,
                user=owner, client=client, reason="linkFailed",
                error=DeliveryError(code=reply.code, message=reply.title)))
            return
        if not isinstance(reply, ident.ClientLinked):
            raise Retry(1.0, f"unexpected identity reply {type(reply).__name__}")
        user, client = reply.user, reply.client
        merged_conversations: list[str] = []
        if reply.merge is not None and reply.discarded_user is not None:
            convs.identity.forget_user(reply.discarded_user.id)
            async with store.tx():
                merged_conversations = await store.merge_user(msg.app_id, reply.discarded_user.id, user.id,
                                                              user.external_id)
        convs.identity.forget_user(user.id)
        participant = await store.participant(redeemed.conversation_id, user.id)
        if participant is None:
            log.warning("linked user %s is not in conversation %s", user.id, redeemed.conversation_id)
            return
        async with store.tx():
            await store.upsert_association(str(participant["id"]), client.id, client.type, client.integration_id,
                                           client.external_id, client.info, at)
        if reply.merge is not None and reply.discarded_user is not None:
            await convs._publish_event(conv.UsersMerged(
                id=reply.merge.id, app_id=msg.app_id, conversation_id=redeemed.conversation_id, created_at=at,
                surviving=user, discarded=reply.discarded_user, reason=reply.merge.reason,
                merged_client_ids=reply.merge.merged_client_ids, merged_conversation_ids=merged_conversations,
                discarded_metadata=reply.merge.discarded_metadata))
        await convs._publish_event(conv.ClientAdded(
            id=new_id(), app_id=msg.app_id, conversation_id=redeemed.conversation_id, created_at=at, user=user,
            client=client, reason="channelLinking"))
        await convs._publish_event(conv.Referred(
            id=new_id(), app_id=msg.app_id, conversation_id=redeemed.conversation_id, created_at=at,
            conversation=conv_ref, user=user, code=code,
            source=Source(type=msg.channel, integration_id=msg.integration_id)))
        history, _more = await store.messages_before(redeemed.conversation_id, None, self.recap_count)
        business = await convs.business_name(msg.app_id)
        await self._send(msg.app_id, client, user.id, redeemed.conversation_id,
                         recap_text([MESSAGE_DECODER.decode(m.body) for m in history], business))
        log.info("linked %s client %s into conversation %s", msg.channel, client.id, redeemed.conversation_id)
