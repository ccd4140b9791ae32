"""Direct linking by phone number (SunCo Clients API) and the one-call Notification API.

`POST /v2/apps/{appId}/users/{id}/clients` with `matchCriteria` `whatsapp`/`twilio` attaches the
number's client to the user and to a target conversation, and `notifications` does the same over
NATS (`LinkPhoneClient` at `conversations.client.link`) once a customer confirmed an opt-in. One
function, `PhoneLinks.link`, serves both.

- `immediate`: the client is active at once (`client:add` channelLinking, `client:update`
  confirmed) and joins the conversation (primary when asked).
- `userActivity`: the client is `pending` (`client:add`); the number's next message on that
  integration confirms it (`client:update` matched + confirmed) and lands in the target
  conversation.
- `prompt`: `pending`, a question is sent; a yes confirms (`client:update` confirmed), a no/stop
  cancels (`client:remove` linkCancelled and the client is deleted). Both answers are consumed,
  never shown as customer messages. Anything else leaves the link pending: the question is asked
  again and the text is not stored — until the number agreed, whoever holds it must not write into
  someone else's conversation.
- A pending link expires after 24 h: the number's next message, or the sweep that runs every few
  minutes (`Conversations.sweep_forever`), removes it (`client:remove` linkFailed, code
  `link_expired`) and deletes the pending client; a message that arrives after expiry then flows
  on as from an unknown number.
- A client that belonged to another user is moved (`client:remove` reason theft on that user,
  published in the conversations the client left); users are never merged by a direct link.

The pending links are rows of `client_links` (conversations' database), so they survive restarts.
`confirmation.message` is sent to the number and not stored: on WhatsApp, free text reaches a
customer only within 24 h of their last message (pass a template with `schema: "whatsapp"`
otherwise); a refusal arrives as an asynchronous failed status of a message that is not in the
history, so it is logged, not reported as a conversation event.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors

from services.conversations import models
from services.conversations.core import ConversationCore
from services.conversations.store import conversation_ref
from shared import subjects
from shared.bus import Retry
from shared.cardmask import mask_content
from shared.db import Row
from shared.http import ApiError
from shared.ids import derived_id, new_id, now
from shared.mailreply import normal_address
from shared.messages import channel as chan
from shared.messages import conversation as conv
from shared.messages import identity as ident
from shared.sunco import (
    Action,
    Client,
    Content,
    ConversationRef,
    DeliveryError,
    ImageContent,
    LinkAction,
    Source,
    TemplateContent,
    TextContent,
    User,
)
from shared.untrusted import is_email_address

log = logging.getLogger(__name__)

LINK_TTL_SECONDS = 24 * 3600
SWEEP_INTERVAL_SECONDS = 300.0
PHONE_TYPES = ("whatsapp", "twilio")
# Integrations whose clients are linked by an address: a phone number, or an e-mail address.
ADDRESS_TYPES = (*PHONE_TYPES, "mailgun")
UNSUPPORTED_PHONE_TYPES = ("messagebird",)
_PHONE_SEPARATORS = re.compile(r"[\s\-().]")
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
YES_WORDS = frozenset({"yes", "y", "yeah", "yep", "yup", "ok", "okay", "sure", "oui", "si", "sí", "ja", "sim",
                       "da", "confirm", "👍"})
NO_WORDS = frozenset({"no", "n", "nope", "non", "nein", "não", "nao", "stop", "cancel", "unsubscribe"})


def normalize_phone(raw: str, *, plus_optional: bool = False) -> str | None:
    """The E.164 form (`+` and 7–15 digits) of a number written with spaces, dashes, dots or
    parentheses; None when it is not one. SunCo requires the `+`; the v1.1 notification's
    `destinationId` may omit it (`plus_optional`)."""
    number = _PHONE_SEPARATORS.sub("", raw or "")
    if plus_optional and number.isdigit():
        number = f"+{number}"
    return number if _E164.match(number) else None


def yes_or_no(content: Content, payload: str | None = None) -> bool | None:
    """True for a yes, False for a no/stop, None for anything else."""
    text = payload or (content.text if isinstance(content, TextContent) else "")
    word = text.strip().strip(".!¡?¿ ").casefold()
    if word in YES_WORDS:
        return True
    if word in NO_WORDS:
        return False
    return None


@dataclass(frozen=True)
class PendingLink:
    """A direct link waiting for the number's activity or answer (a `client_links` row)."""

    client_id: str
    app_id: str
    user_id: str
    conversation_id: str
    integration_id: str
    client_type: str
    phone_number: str
    confirmation: str
    primary: bool
    source_integration_id: str | None
    created_at: float
    expires_at: float


def _link(row: Row) -> PendingLink:
    return PendingLink(
        client_id=row["client_id"], app_id=row["app_id"], user_id=row["user_id"],
        conversation_id=row["conversation_id"], integration_id=row["integration_id"],
        client_type=row["client_type"], phone_number=row["phone_number"], confirmation=row["confirmation"],
        primary=bool(row["is_primary"]), source_integration_id=row["source_integration_id"],
        created_at=row["created_at"], expires_at=row["expires_at"])


@dataclass(frozen=True)
class InboundOutcome:
    """What the inbound path does with a message from a pending client."""

    consumed: bool = False
    user: User | None = None
    client: Client | None = None
    # The link's conversation: where the confirming message is stored.
    conversation_id: str | None = None
    # The pending client was deleted (expired): resolve the sender again.
    resolve_again: bool = False


class PhoneLinks:
    """Direct links by phone: create, confirm on inbound, cancel, expire, remove; notifications."""

    def __init__(self, conversations: ConversationCore, ttl: float = LINK_TTL_SECONDS) -> None:
        self.conversations = conversations
        self.ttl = ttl

    # --- the pending-link table ----------------------------------------------------------

    async def _put(self, link: PendingLink) -> None:
        await self.conversations.store.put_client_link(
            client_id=link.client_id, app_id=link.app_id, user_id=link.user_id, conversation_id=link.conversation_id,
            integration_id=link.integration_id, client_type=link.client_type, phone_number=link.phone_number,
            confirmation=link.confirmation, primary=link.primary, source_integration_id=link.source_integration_id,
            created_at=link.created_at, expires_at=link.expires_at)

    async def pending(self, client_id: str) -> PendingLink | None:
        """The pending link of a client, if any."""
        row = await self.conversations.store.client_link(client_id)
        return None if row is None else _link(row)

    async def _drop(self, client_id: str) -> bool:
        return await self.conversations.store.drop_client_link(client_id)

    async def _expired(self, at: float, limit: int = 100) -> list[PendingLink]:
        return [_link(row) for row in await self.conversations.store.expired_client_links(at, limit)]

    async def _leave_conversations(self, app_id: str, client_id: str, *, except_user_id: str | None = None,
                                   only_user_id: str | None = None) -> list[ConversationRef]:
        """Remove the client from participants' client associations; the conversations it left."""
        store = self.conversations.store
        async with store.tx():
            return await store.leave_conversations(app_id, client_id, except_user_id=except_user_id,
                                                   only_user_id=only_user_id)

    # --- linking ---------------------------------------------------------------------------

    async def check_integration(self, app_id: str, integration_id: str | None, wanted_type: str | None) -> str:
        """The type of a phone integration of the app (404 unknown; 400 wrong or not by phone)."""
        if not integration_id:
            raise ApiError(400, "matchCriteria.integrationId is required")
        row = await self.conversations.store.get_integration(app_id, integration_id)
        if row is None:
            raise ApiError(404, "Integration not found", "integration_not_found")
        if wanted_type is not None and row["type"] != wanted_type:
            raise ApiError(400, f"matchCriteria.integrationId is a {row['type']} integration, not {wanted_type}")
        if row["type"] not in ADDRESS_TYPES:
            raise ApiError(400, f"A {row['type']} integration cannot be linked by phone number or e-mail address")
        return str(row["type"])

    async def link(self, req: conv.LinkPhoneClient, *, message: Content | None = None,
                   message_schema: str | None = None, source: Source | None = None) -> conv.PhoneClientLinked:
        """Attach the number's client to the user and conversation of `req` (see the module doc).

        Raises ApiError for a bad request (unknown app/integration/conversation, bad number).
        """
        convs = self.conversations
        store = convs.store
        if await store.get_app(req.app_id) is None:
            raise ApiError(404, "App not found", "app_not_found")
        client_type = await self.check_integration(req.app_id, req.integration_id, None)
        if client_type == "mailgun":
            phone = normal_address(req.phone_number) if is_email_address(req.phone_number.strip()) else None
            if phone is None:
                raise ApiError(400, "address must be an e-mail address")
        else:
            phone = normalize_phone(req.phone_number)
        if phone is None:
            raise ApiError(400, "phoneNumber must be a number with + and the country code, e.g. +12125552368")
        row = await store.get_conversation(req.app_id, req.conversation_id)
        if row is None or await store.participant(req.conversation_id, req.user_id) is None:
            raise ApiError(404, "Conversation not found: target.conversationId must be one of the user's",
                           "conversation_not_found")
        if source is None:
            source = await self._source(req.app_id, req.source_integration_id)
        attached = await convs.identity.api_call(subjects.IDENTITY_CLIENT_ATTACH_PHONE, ident.AttachPhoneClient(
            app_id=req.app_id, user_id=req.user_id, integration_id=req.integration_id,
            client_type=client_type, phone_number=phone,  # type: ignore[arg-type]
            status="active" if req.confirmation == "immediate" else "pending",
            proven_by_client_id=req.proven_by_client_id))
        if not isinstance(attached, ident.PhoneClientAttached):
            raise ApiError(503, "Unexpected answer from identity")
        user, client = attached.user, attached.client
        convs.identity.forget_user(user.id)
        ref = conversation_ref(row)
        at = now()
        if attached.previous_user is not None:
            await self._theft(req.app_id, attached.previous_user, client, ref, source, at)
        await self._drop(client.id)  # a newer link replaces a pending one
        await convs.publish_event(conv.ClientAdded(
            id=new_id(), app_id=req.app_id, conversation_id=ref.id, created_at=at, user=user, client=client,
            reason="channelLinking", conversation=ref, source=source, primary=False))
        if client.status == "pending":
            await self._put(PendingLink(
                client_id=client.id, app_id=req.app_id, user_id=user.id, conversation_id=ref.id,
                integration_id=req.integration_id, client_type=client_type, phone_number=phone,
                confirmation=req.confirmation, primary=req.primary, source_integration_id=req.source_integration_id,
                created_at=at, expires_at=at + self.ttl))
        else:
            await self._join(req.app_id, ref.id, user, client, req.primary, at)
            await convs.publish_event(conv.ClientUpdated(
                id=new_id(), app_id=req.app_id, conversation_id=ref.id, created_at=at, user=user, client=client,
                reason="confirmed", conversation=ref, source=source, primary=req.primary))
        if message is not None:
            await self._send(req.app_id, client, user.id, ref.id, message, message_schema)
        if client.status == "pending" and req.confirmation == "prompt":
            await self._send(req.app_id, client, user.id, ref.id,
                             TextContent(text=req.prompt_text or await self._question(req.app_id)))
        log.info("linked %s client %s (%s) to conversation %s", client_type, client.id, client.status, ref.id)
        return conv.PhoneClientLinked(user=user, client=client)

    async def _source(self, app_id: str, integration_id: str | None) -> Source:
        if integration_id:
            row = await self.conversations.store.get_integration(app_id, integration_id)
            if row is not None:
                return Source(type=str(row["type"]), integration_id=integration_id)
        return Source(type="api:conversations")

    async def _question(self, app_id: str) -> str:
        business = await self.conversations.business_name(app_id)
        return f"Reply YES to continue your conversation with {business} here, or NO to decline."

    async def _theft(self, app_id: str, previous: User, client: Client, target: ConversationRef,
                     source: Source | None, at: float) -> None:
        """The client left its former user: `client:remove` reason theft in the conversations it left
        (the target conversation when it was in none)."""
        self.conversations.identity.forget_user(previous.id)
        left = await self._leave_conversations(app_id, client.id, except_user_id=None, only_user_id=previous.id)
        for ref in left or [target]:
            await self.conversations.publish_event(conv.ClientRemoved(
                id=new_id(), app_id=app_id, conversation_id=ref.id, created_at=at, user=previous, client=client,
                reason="theft", conversation=ref, source=source))
        log.info("client %s moved from user %s (theft)", client.id, previous.id)

    async def _join(self, app_id: str, conversation_id: str, user: User, client: Client, primary: bool,
                    at: float) -> None:
        """Associate the client with the conversation: first (primary) or after the others."""
        store = self.conversations.store
        async with store.tx():
            participant = await store.participant(conversation_id, user.id)
            if participant is None:
                return
            await store.upsert_association(str(participant["id"]), client.id, client.type, client.integration_id,
                                           client.external_id, client.info, at if primary else 0.0)

    async def _send(self, app_id: str, client: Client, user_id: str, conversation_id: str, content: Content,
                    schema: str | None = None) -> None:
        """Send content to the client's number (not stored in the conversation)."""
        channel = await self.conversations.outbound_channel_of(client)
        if channel is None or not client.integration_id:
            return
        if await self.conversations.store.masks_cards(app_id):
            content = mask_content(content)
        message_id = new_id()
        send = chan.OutboundSend(
            app_id=app_id, integration_id=client.integration_id, channel=channel, conversation_id=conversation_id,
            message_id=message_id, user_id=user_id, client_id=client.id, recipient=client.external_id or "",
            recipient_info=client.info or {}, content=content, schema=schema, created_at=now())
        await self.conversations.bus.publish(chan.subject_of(send),
                                             chan.encode(send), msg_id=message_id)

    # --- the inbound path --------------------------------------------------------------------

    async def on_pending_inbound(self, msg: chan.InboundMessage, user: User, client: Client) -> InboundOutcome:
        """A message from a `pending` client: confirm, cancel, expire or re-ask (module doc)."""
        link = await self.pending(client.id)
        if link is None:
            # Pending without a link (its row was removed by a concurrent confirmation): go on.
            return InboundOutcome(user=user, client=client)
        if link.expires_at <= now():
            await self._fail(link, user, client)
            return InboundOutcome(resolve_again=True)
        if link.confirmation == "prompt":
            answer = yes_or_no(msg.content, msg.postback.payload if msg.postback else None)
            business = await self.conversations.business_name(msg.app_id)
            if answer is True:
                await self._confirm(link, user, client, matched=False)
                await self._send(msg.app_id, client, user.id, link.conversation_id, TextContent(
                    text=f"Thanks! You can continue your conversation with {business} here."))
            elif answer is False:
                await self._cancel(link, user, client)
                await self._send(msg.app_id, client, user.id, "", TextContent(
                    text=f"OK, this number will not be linked to your conversation with {business}."))
            else:
                await self._send(msg.app_id, client, user.id, link.conversation_id,
                                 TextContent(text=await self._question(msg.app_id)))
            return InboundOutcome(consumed=True)
        confirmed = await self._confirm(link, user, client, matched=True)
        return InboundOutcome(user=user, client=confirmed, conversation_id=link.conversation_id)

    async def _confirm(self, link: PendingLink, user: User, client: Client, *, matched: bool) -> Client:
        convs = self.conversations
        row = await convs.store.get_conversation(link.app_id, link.conversation_id)
        reply = await convs.identity.call(subjects.IDENTITY_CLIENT_STATUS, ident.SetClientStatus(
            app_id=link.app_id, client_id=client.id, status="active"))
        if isinstance(reply, ident.IdentityError):
            if reply.status >= 500:
                raise Retry(1.0, f"identity: {reply.title}")
            return client
        if not isinstance(reply, ident.ClientReply):
            raise Retry(1.0, f"unexpected identity reply {type(reply).__name__}")
        active = reply.client
        convs.identity.forget_user(user.id)
        at = now()
        source = await self._source(link.app_id, link.source_integration_id)
        if row is not None:
            ref = conversation_ref(row)
            await self._join(link.app_id, ref.id, user, active, link.primary, at)
            reasons = ("matched", "confirmed") if matched else ("confirmed",)
            for reason in reasons:
                # Derived ids: a redelivered message confirms once.
                event_id = derived_id(client.id, str(link.created_at), reason)
                await convs.announce(conv.ClientUpdated(
                    id=event_id, app_id=link.app_id, conversation_id=ref.id, created_at=at, user=user,
                    client=active, reason=reason, conversation=ref, source=source, primary=link.primary))
        await self._drop(client.id)
        log.info("direct link of client %s confirmed", client.id)
        return active

    async def _end(self, link: PendingLink, user: User, client: Client, reason: str,
                   error: DeliveryError | None) -> None:
        """Delete the pending client and announce `client:remove`."""
        convs = self.conversations
        reply = await convs.identity.call(subjects.IDENTITY_CLIENT_REMOVE, ident.RemoveClient(
            app_id=link.app_id, user_id_or_external_id=user.id, client_id=client.id))
        if isinstance(reply, ident.IdentityError) and reply.status >= 500:
            raise Retry(1.0, f"identity: {reply.title}")
        convs.identity.forget_user(user.id)
        await self._leave_conversations(link.app_id, client.id)
        row = await convs.store.get_conversation(link.app_id, link.conversation_id)
        if row is not None:
            ref = conversation_ref(row)
            event_id = derived_id(client.id, str(link.created_at), reason)
            removed = msgspec.structs.replace(client, status="inactive")
            await convs.announce(conv.ClientRemoved(
                id=event_id, app_id=link.app_id, conversation_id=ref.id, created_at=now(), user=user,
                client=removed, reason=reason, error=error, conversation=ref,
                source=await self._source(link.app_id, link.source_integration_id)))
        await self._drop(client.id)

    async def _cancel(self, link: PendingLink, user: User, client: Client) -> None:
        await self._end(link, user, client, "linkCancelled",
                        DeliveryError(code="link_cancelled", message="The user declined the link"))
        log.info("direct link of client %s cancelled by the user", client.id)

    async def _fail(self, link: PendingLink, user: User, client: Client) -> None:
        await self._end(link, user, client, "linkFailed",
                        DeliveryError(code="link_expired", message="The link was not confirmed in time"))
        log.info("direct link of client %s expired", client.id)

    async def sweep(self) -> int:
        """Expire every pending link past its time; how many."""
        count = 0
        for link in await self._expired(now()):
            user = User(id=link.user_id)
            client = Client(id=link.client_id, type=link.client_type, status="pending",  # type: ignore[arg-type]
                            integration_id=link.integration_id,
                            external_id=ident.phone_client_key(link.client_type, link.phone_number))
            await self._fail(link, user, client)
            count += 1
        return count

    # --- removal (DELETE …/clients/{clientId}) ------------------------------------------------

    async def remove(self, app_id: str, user_ref: str, client_id: str) -> None:
        """Delete a user's client: it leaves every conversation (`client:remove` reason api)."""
        convs = self.conversations
        reply = await convs.identity.api_call(subjects.IDENTITY_CLIENT_REMOVE, ident.RemoveClient(
            app_id=app_id, user_id_or_external_id=user_ref, client_id=client_id))
        if not isinstance(reply, ident.ClientReply):
            raise ApiError(503, "Unexpected answer from identity")
        user, client = reply.user, reply.client
        convs.identity.forget_user(user.id)
        await self._drop(client.id)
        left = await self._leave_conversations(app_id, client.id)
        if not left:
            default = await convs.store.default_conversation(app_id, user.id)
            left = [] if default is None else [conversation_ref(default)]
        at = now()
        for ref in left:  # a user with no conversation has nowhere to announce it
            await convs.publish_event(conv.ClientRemoved(
                id=new_id(), app_id=app_id, conversation_id=ref.id, created_at=at, user=user,
                client=msgspec.structs.replace(client, status="inactive"), reason="api", conversation=ref,
                source=Source(type="api:conversations")))

    # --- NATS endpoint ------------------------------------------------------------------------

    async def answer(self, data: bytes, _headers: Any) -> bytes:
        """The CONVERSATIONS_CLIENT_LINK endpoint: LinkPhoneClient → PhoneClientLinked | ConversationError."""
        try:
            request = conv.decode_request(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return conv.ENCODER.encode(conv.ConversationError(status=400, code="bad_request",
                                                              title=f"Invalid request: {exc}"))
        if not isinstance(request, conv.LinkPhoneClient):
            return conv.ENCODER.encode(conv.ConversationError(
                status=400, code="bad_request", title=f"Unexpected request {type(request).__name__}"))
        try:
            message = TextContent(text=request.message_text) if request.message_text else None
            reply: conv.ConversationRequest = await self.link(request, message=message)
        except ApiError as exc:
            reply = conv.ConversationError(status=exc.status, code=exc.code, title=exc.title)
        except (Retry, nats.errors.Error, TimeoutError) as exc:
            reply = conv.ConversationError(status=503, code="service_unavailable", title=str(exc) or "unavailable")
        return conv.ENCODER.encode(reply)


def confirmation_content(message: models.ConfirmationMessageIn, client_type: str) -> Content:
    """A `confirmation.message`'s content: text or image, actions only `link` (a WhatsApp
    template with `schema: "whatsapp"` on a whatsapp integration)."""
    content = message.content
    if isinstance(content, TemplateContent):
        if client_type != "whatsapp" or message.schema != "whatsapp":
            raise ApiError(400, "confirmation.message: a template needs a whatsapp integration and schema whatsapp")
        if not content.template.get("name"):
            raise ApiError(400, "confirmation.message: the template needs a name")
        return content
    if not isinstance(content, TextContent | ImageContent):
        raise ApiError(400, "confirmation.message must be of type text or image")
    actions = getattr(content, "actions", None) or []
    if any(not isinstance(action, LinkAction) for action in actions):
        raise ApiError(400, "confirmation.message actions must be of type link")
    models.check_content(content)
    return content


def notification_content(message: dict[str, Any], schema: str | None, client_type: str) -> Content:
    """The content of a v1.1 notification's `message` (v1 shape, or native WhatsApp with `schema`)."""
    kind = message.get("type")
    content: Content
    if schema == "whatsapp":
        if client_type != "whatsapp":
            raise ApiError(400, "messageSchema whatsapp needs a whatsapp integration")
        if kind == "template":
            template = message.get("template")
            if not isinstance(template, dict) or not isinstance(template.get("name"), str) or not template["name"]:
                raise ApiError(400, "message.template.name is required")
            return TemplateContent(template=template)
        text = message.get("text")
        if kind == "text" and isinstance(text, dict) and isinstance(text.get("body"), str):
            content = TextContent(text=text["body"])
        else:
            raise ApiError(400, "A whatsapp-schema message must be of type template or text")
    elif kind == "text":
        text = message.get("text")
        if not isinstance(text, str):
            raise ApiError(400, "message.text is required")
        actions = models.convert(message.get("actions") or [], list[Action])
        content = TextContent(text=text, actions=actions or None)
    elif kind == "image":
        media_url = message.get("mediaUrl")
        if not isinstance(media_url, str):
            raise ApiError(400, "message.mediaUrl is required")
        text = message.get("text")
        content = ImageContent(media_url=media_url, text=text if isinstance(text, str) and text else None)
    else:
        raise ApiError(400, "message.type must be text or image (or use messageSchema whatsapp)")
    models.check_content(content)
    return content


__all__ = ["InboundOutcome", "PendingLink", "PhoneLinks", "normalize_phone", "yes_or_no"]
