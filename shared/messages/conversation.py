"""The `conversation` family: events published by `conversations`, one subject per conversation.

Each event maps to one SunCo webhook event (`services/webhooks/handlers.py`'s `webhook_event`),
which is what the `webhooks` service delivers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

from shared.messages import tags_of
from shared.records import SwitchboardRecord
from shared.sunco import (
    Activity,
    Client,
    ConversationRef,
    DeliveryError,
    Destination,
    ExternalMessage,
    Message,
    Source,
    User,
    UserRef,
)


class ConversationEvent(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
    """Base of the conversation family. `id` is the SunCo event id and the Nats-Msg-Id."""

    id: str
    app_id: str
    conversation_id: str
    created_at: float


class MessageCreated(ConversationEvent, tag="conversation.message.created", kw_only=True):
    """A message was appended to the conversation's history."""

    conversation: ConversationRef
    message: Message
    # Position in the conversation's history; the SDK resumes from it.
    cursor: int
    user_id: str


class ActivityPosted(ConversationEvent, tag="conversation.activity", kw_only=True):
    """Typing or read state, from the business or the customer."""

    conversation: ConversationRef
    activity: Activity
    user_id: str


DeliveryKind = Literal["channel", "user", "failure"]


class DeliveryReported(ConversationEvent, tag="conversation.delivery", kw_only=True):
    """A channel accepted, delivered, read or failed a business message."""

    kind: DeliveryKind
    conversation: ConversationRef
    user: UserRef
    message_id: str
    destination: Destination
    external_messages: list[ExternalMessage] = []
    is_final: bool = False
    error: DeliveryError | None = None
    # `read` reports a `delivered` (kind user) with this flag, for the widget's read state.
    read: bool = False


class ConversationCreated(ConversationEvent, tag="conversation.created", kw_only=True):
    """A conversation started."""

    conversation: ConversationRef
    user: User | None = None
    creation_reason: str = "message"
    source: Source | None = None


class ConversationRemoved(ConversationEvent, tag="conversation.removed", kw_only=True):
    """A conversation was deleted."""

    conversation: ConversationRef


class ClientAdded(ConversationEvent, tag="conversation.client.added", kw_only=True):
    """A client joined the user's conversation (channel linking)."""

    user: User
    client: Client
    reason: str = "channelLinking"
    # SunCo's payload `conversation` (the link's target) and `source` (who asked: api, an SDK).
    conversation: ConversationRef | None = None
    source: Source | None = None
    # The client is the conversation's primary client from this event on (the widget then says
    # "moved"); a direct link becomes primary with its confirming `ClientUpdated` instead.
    primary: bool = True


class ClientUpdated(ConversationEvent, tag="conversation.client.updated", kw_only=True):
    """A client's status changed (SunCo `client:update`, reasons blocked/unblocked/…)."""

    user: User
    client: Client
    reason: str
    conversation: ConversationRef | None = None
    source: Source | None = None
    # With reason `confirmed`: the client is now the conversation's primary client.
    primary: bool = False


class ClientRemoved(ConversationEvent, tag="conversation.client.removed", kw_only=True):
    """A client left, or a link was refused (SunCo `client:remove`, reasons linkFailed/theft/…)."""

    user: User
    client: Client
    reason: str
    error: DeliveryError | None = None
    conversation: ConversationRef | None = None
    source: Source | None = None


class Referred(ConversationEvent, tag="conversation.referral", kw_only=True):
    """The customer arrived through a link (SunCo `conversation:referral`)."""

    conversation: ConversationRef
    user: User
    code: str
    source: Source
    details: dict[str, Any] = {}


class UsersMerged(ConversationEvent, tag="conversation.users.merged", kw_only=True):
    """Two users became one (SunCo `user:merge`): `surviving` kept, `discarded` folded in."""

    surviving: User
    discarded: User
    reason: str
    merged_client_ids: list[str] = []
    merged_conversation_ids: list[str] = []
    discarded_metadata: dict[str, Any] = {}


class NotificationReported(ConversationEvent, tag="conversation.notification", kw_only=True):
    """An away notification was sent to, or could not reach, the customer (published by
    `notifications`; SunCo v1's `notification:delivery:channel|failure`).

    `notification_id` is the id the notification's send carried (`notification.NOTIFICATION_ID_PREFIX`).
    """

    kind: Literal["channel", "failure"]
    conversation: ConversationRef
    user: UserRef
    notification_id: str
    destination: Destination
    error: DeliveryError | None = None


class UserUpdated(ConversationEvent, tag="conversation.user.updated", kw_only=True):
    """A user changed (SunCo `user:update`), e.g. reason `authentication`: an anonymous SDK user
    logged in with a JWT and now carries its externalId."""

    user: User
    reason: str


class UserRemoved(ConversationEvent, tag="conversation.user.removed", kw_only=True):
    """A user was deleted with its clients and conversations (SunCo `user:remove`, payload
    `{user: {id, externalId, authenticated}}`: nothing more of the person is sent).

    `conversation_id` is the user's default conversation when it had one (its events are
    ordered before this one), else the user's id. Services that keep copies of the user's data
    (deliveries, notifications, opt-ins) forget everything of `user` and of `conversation_ids`.
    """

    user: UserRef
    authenticated: bool = False
    conversation_ids: list[str] = []


class PersonalInformationDeleted(ConversationEvent, tag="conversation.user.personal.deleted", kw_only=True):
    """A user's personal information was deleted (SunCo `DELETE …/personalinformation`; no
    webhook): the user and its history stay. Services forget the personal data they keep of
    `user_id` (opt-in addresses, notification recipients, delivered webhook bodies of
    `conversation_ids`)."""

    user_id: str
    conversation_ids: list[str] = []


class MessagesExpired(ConversationEvent, tag="conversation.messages.expired", kw_only=True):
    """The app's `conversationRetentionSeconds` passed for this inactive conversation: its messages
    (all received before `before`) are deleted (no webhook, as in SunCo). Services drop what they
    keep of the conversation from before this event (`created_at`)."""

    conversation: ConversationRef
    before: float


class MessageDeleted(ConversationEvent, tag="conversation.message.deleted", kw_only=True):
    """The business deleted one message of the history (SunCo's Delete Message: no webhook).
    Services drop their copies of it: the deliveries of its MessageCreated (`message_event_id`),
    a pending notification whose text it is, the desk's preview when it is the latest message
    (`message_at`: its MessageCreated's `created_at`)."""

    conversation: ConversationRef
    message_id: str
    message_event_id: str
    message_at: float


class PostbackReceived(ConversationEvent, tag="conversation.postback", kw_only=True):
    """The customer tapped a postback button (SunCo `conversation:postback`: not a message of
    the history)."""

    conversation: ConversationRef
    user: User
    payload: str
    text: str = ""
    metadata: dict[str, Any] | None = None
    source: Source | None = None


SwitchboardAction = Literal["passControl", "offerControl", "acceptControl", "releaseControl"]


class SwitchboardControlled(ConversationEvent, tag="conversation.switchboard", kw_only=True):
    """Control of the conversation changed hands, or a request to change it failed (SunCo
    `switchboard:{action}` and `switchboard:{action}:failure`). `conversation` carries the state
    after the action (before it, on a failure)."""

    action: SwitchboardAction
    conversation: ConversationRef
    metadata: dict[str, Any] | None = None
    reason: str | None = None
    # Set on a failure: `{code, message}`.
    error: dict[str, str] | None = None


ConversationUnion = (
    MessageCreated | ActivityPosted | DeliveryReported | ConversationCreated | ConversationRemoved | ClientAdded
    | ClientUpdated | ClientRemoved | Referred | UsersMerged | NotificationReported | UserUpdated
    | UserRemoved | PersonalInformationDeleted | MessagesExpired | MessageDeleted | SwitchboardControlled
    | PostbackReceived
)

ENCODER = msgspec.json.Encoder()
DECODER: msgspec.json.Decoder[ConversationUnion] = msgspec.json.Decoder(ConversationUnion)
# The event types this version knows (`shared.bus.refusal`).
TYPES: Final = tags_of(ConversationUnion)


def encode(event: ConversationEvent) -> bytes:
    """Encode a conversation event."""
    return ENCODER.encode(event)


def decode(data: bytes) -> ConversationUnion:
    """Decode a conversation event (raises msgspec.ValidationError on a bad one)."""
    return DECODER.decode(data)


@dataclass(frozen=True)
class DeletedMessage:
    """One message deleted from a conversation's history (`MessageDeleted`)."""

    id: str
    event_id: str  # its MessageCreated's
    at: float  # its MessageCreated's `created_at`


@dataclass(frozen=True)
class Erasure:
    """What a service must forget of its copies after a privacy event: rows of
    `conversation_ids` (created before `before`, None = all), of `user_id` (None = none), and
    whether only already-delivered copies go (personal information: the history stays). With
    `message`, only the copies of that one message of the (single) conversation go."""

    conversation_ids: tuple[str, ...]
    before: float | None = None
    user_id: str | None = None
    delivered_only: bool = False
    message: DeletedMessage | None = None


def erasure(event: ConversationUnion) -> Erasure | None:
    """The copies a privacy event asks every service to forget; None for other events."""
    if isinstance(event, UserRemoved):
        return Erasure(tuple(event.conversation_ids), user_id=event.user.id)
    if isinstance(event, PersonalInformationDeleted):
        return Erasure(tuple(event.conversation_ids), user_id=event.user_id, delivered_only=True)
    if isinstance(event, MessagesExpired):
        return Erasure((event.conversation_id,), before=event.created_at)
    if isinstance(event, MessageDeleted):
        return Erasure((event.conversation_id,), message=DeletedMessage(
            id=event.message_id, event_id=event.message_event_id, at=event.message_at))
    return None


DESK_INTEGRATION_TYPE: Final = "desk"


def concerns_desk(event: ConversationUnion, switchboard: SwitchboardRecord | None) -> bool:
    """Whether the agent desk needs `event` (`conversations` publishes it a copy,
    `subjects.desk_event_subject`), given the app's switchboard.

    Always: privacy events and removals (the tickets of a desk since removed must go too), control
    changes, handoffs and merges (the ticket's timeline) — all rare. A message or an activity:
    when the app has a desk member, or the conversation's controller is one or unknown here (a
    member this copy of the switchboard does not hold yet, or one since deleted). Nothing else.
    """
    if isinstance(event, ClientUpdated):
        return event.primary and event.reason == "confirmed"
    if isinstance(event, UserRemoved | PersonalInformationDeleted | MessagesExpired | MessageDeleted
                  | ConversationRemoved | SwitchboardControlled | UsersMerged | ClientAdded):
        return True
    if not isinstance(event, MessageCreated | ActivityPosted):
        return False
    if switchboard is not None and switchboard.has_member_of_type(DESK_INTEGRATION_TYPE):
        return True
    active = event.conversation.active_switchboard_integration
    if active is None:
        return False
    member = switchboard.integration(active.id) if switchboard is not None else None
    if member is None:
        return active.integration_type in (None, DESK_INTEGRATION_TYPE)
    return False


# --- request/reply with `conversations` ------------------------------------------------------

class ConversationRequest(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
    """Base of the requests other services make to `conversations`."""


class StartConversation(ConversationRequest, tag="conversation.start"):
    """Return the user's default personal conversation, creating it when missing (SDK sessions)."""

    app_id: str
    integration_id: str
    user_id: str
    client_id: str


class GetHistory(ConversationRequest, tag="conversation.history"):
    """Messages of a conversation with `cursor` > `after` (oldest first), at most `limit`.

    Without `after`, the latest `limit` messages. `user_id` must be a participant (the SDK
    may only read its own conversations).
    """

    app_id: str
    conversation_id: str
    user_id: str | None = None
    after: int | None = None
    limit: int = 100


class ConversationStarted(ConversationRequest, tag="conversation.started"):
    conversation: ConversationRef
    created: bool = False


class HistoryMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    cursor: int
    message: Message


class HistoryPage(ConversationRequest, tag="conversation.history.page"):
    conversation: ConversationRef
    messages: list[HistoryMessage]
    has_more: bool = False
    # Read state for the SDK: the business's last read time (unix seconds), if any.
    business_last_read: float | None = None


class ConversationError(ConversationRequest, tag="conversation.error"):
    status: int
    code: str
    title: str


class LinkPhoneClient(ConversationRequest, tag="conversation.client.link"):
    """Attach a phone-number client (`whatsapp` or `twilio` integration) to a user's conversation.

    The SunCo Clients API's direct linking (`matchCriteria` + `confirmation`), also used by
    `notifications` once a customer confirmed an opt-in. `confirmation` is `immediate` (active at
    once), `userActivity` (pending until the number next writes on that integration) or `prompt`
    (pending; `prompt_text` or a default question is sent, a yes confirms and a no cancels).
    `message_text` is sent to the number once linked (SunCo `confirmation.message`; not stored in
    the conversation).
    """

    app_id: str
    user_id: str
    conversation_id: str
    integration_id: str
    phone_number: str  # E.164, "+" and digits
    confirmation: Literal["immediate", "userActivity", "prompt"] = "immediate"
    primary: bool = True
    message_text: str | None = None
    prompt_text: str | None = None
    # The SDK client that proved it reads this number (an opt-in's confirmed code), if any.
    proven_by_client_id: str | None = None
    # Integration that asked (SunCo `client:add` `source`), e.g. the web integration of an opt-in.
    source_integration_id: str | None = None


class PhoneClientLinked(ConversationRequest, tag="conversation.client.linked"):
    """The client as linked: `status` is `active` or `pending`."""

    user: User
    client: Client


class GetParticipants(ConversationRequest, tag="conversation.participants.get"):
    """The participants of a conversation with their read state and client associations."""

    app_id: str
    conversation_id: str


class ParticipantClient(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One client association of a participant (SunCo `clientAssociations[]` plus what a sender needs)."""

    client_id: str
    type: str
    integration_id: str | None = None
    external_id: str | None = None
    info: dict[str, Any] = {}
    last_active: float = 0.0


class ParticipantState(msgspec.Struct, kw_only=True, omit_defaults=True):
    user_id: str
    user_external_id: str | None = None
    unread_count: int = 0
    last_read: float | None = None  # unix seconds
    # `clientAssociations` order: the most recently active (the primary) first.
    clients: list[ParticipantClient] = []


class ParticipantsReply(ConversationRequest, tag="conversation.participants"):
    conversation: ConversationRef
    participants: list[ParticipantState]


class LinkSdkClient(ConversationRequest, tag="conversation.sdk.link"):
    """Redeem a handoff link code for a new SDK session (web or app) on `integration_id`.

    The code is redeemed with `handoff` (channel = the SDK channel); a new `sdk` client with
    `channel_user_id` joins the code's user and conversation as its primary client, and the
    business gets `client:add` (reason `channelLinking`) and `conversation:referral`. Refusals
    come back as ConversationError with the handoff's customer-facing message as `title`.
    """

    app_id: str
    integration_id: str
    channel: str
    channel_user_id: str
    code: str
    info: dict[str, Any] = {}


class SdkClientLinked(ConversationRequest, tag="conversation.sdk.linked"):
    """The new SDK client, its user (the code's) and the conversation the session is for."""

    user: User
    client: Client
    conversation: ConversationRef


class SdkLogin(ConversationRequest, tag="conversation.sdk.login"):
    """An SDK session logs in (`Threadline.login(externalId, jwt)`).

    `jwt` is HS256 with `kid` = an API key of `app_id` and payload `{"scope": "user",
    "external_id": external_id}`. The session's user becomes identified, or is merged into the
    user who has `external_id` (reason `sdkLogin`); `conversation_id` (the session's) is kept —
    unless the user holds channels the JWT does not prove (`separated`: the session moves alone,
    to the account's default conversation).
    """

    app_id: str
    user_id: str
    client_id: str
    integration_id: str
    conversation_id: str
    external_id: str
    jwt: str


SdkLoginOutcome = Literal["identified", "merged", "unchanged", "separated"]


class SdkLoggedIn(ConversationRequest, tag="conversation.sdk.loggedin"):
    """The surviving user (a new session token names it) and what happened."""

    user: User
    conversation_id: str
    outcome: SdkLoginOutcome


ConversationRequestUnion = (
    StartConversation | GetHistory | ConversationStarted | HistoryPage | ConversationError
    | LinkPhoneClient | PhoneClientLinked | GetParticipants | ParticipantsReply
    | LinkSdkClient | SdkClientLinked | SdkLogin | SdkLoggedIn
)
REQUEST_DECODER: msgspec.json.Decoder[ConversationRequestUnion] = msgspec.json.Decoder(ConversationRequestUnion)


def decode_request(data: bytes) -> ConversationRequestUnion:
    """Decode a request or reply exchanged with `conversations`."""
    return REQUEST_DECODER.decode(data)
