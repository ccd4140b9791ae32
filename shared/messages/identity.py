"""The `identity` family: request/reply with the `identity` service."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from shared.sunco import Client, ClientStatus, ClientType, Device, DeviceType, Profile, User


class IdentityMessage(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
    """Base of the identity family."""


class ResolveClient(IdentityMessage, tag="identity.resolve", kw_only=True):
    """Find or create the user and client behind a channel identity.

    The same (app, integration, channel_user_id) always resolves to the same client and user.
    `user_id`, when given, is the user a brand-new client is attached to.
    """

    app_id: str
    integration_id: str
    client_type: ClientType
    channel_user_id: str
    display_name: str | None = None
    avatar_url: str | None = None
    info: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    user_id: str | None = None


class Resolved(IdentityMessage, tag="identity.resolved", kw_only=True):
    user: User
    client: Client
    user_created: bool = False
    client_created: bool = False


class ResolveClients(IdentityMessage, tag="identity.resolve.batch", kw_only=True):
    """Several `ResolveClient`s answered in one reply and written in one transaction (a consumer's
    batch of first contacts costs one round trip and one commit)."""

    requests: list[ResolveClient]


class ResolvedBatch(IdentityMessage, tag="identity.resolved.batch", kw_only=True):
    """One result per request of a `ResolveClients`, in its order."""

    results: list[Resolved | IdentityError]


class CreateUser(IdentityMessage, tag="identity.user.create", kw_only=True):
    app_id: str
    external_id: str | None = None
    profile: Profile = msgspec.field(default_factory=Profile)
    metadata: dict[str, Any] = {}
    signed_up_at: float | None = None


class GetUser(IdentityMessage, tag="identity.user.get", kw_only=True):
    app_id: str
    user_id_or_external_id: str


class UpdateUser(IdentityMessage, tag="identity.user.update", kw_only=True):
    """Patch a user: only the fields that are set change (None = leave as is)."""

    app_id: str
    user_id_or_external_id: str
    external_id: str | None = None
    profile: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


class DeleteUser(IdentityMessage, tag="identity.user.delete", kw_only=True):
    app_id: str
    user_id_or_external_id: str


class ListClients(IdentityMessage, tag="identity.clients.list", kw_only=True):
    app_id: str
    user_id_or_external_id: str


class SetClientStatus(IdentityMessage, tag="identity.client.status", kw_only=True):
    """Change a client's status (e.g. `blocked` when the customer blocked the business)."""

    app_id: str
    client_id: str
    status: ClientStatus


class ClientReply(IdentityMessage, tag="identity.client", kw_only=True):
    user: User
    client: Client


class UserReply(IdentityMessage, tag="identity.user", kw_only=True):
    user: User


class ClientsReply(IdentityMessage, tag="identity.clients", kw_only=True):
    user: User
    clients: list[Client]


class Deleted(IdentityMessage, tag="identity.deleted", kw_only=True):
    user_id: str
    client_ids: list[str] = []
    # What SunCo's `user:remove` still says of the user (nothing else of it is left).
    external_id: str | None = None
    authenticated: bool = False


class DeletePersonalInformation(IdentityMessage, tag="identity.user.personal.delete", kw_only=True):
    """SunCo's Delete User Personal Information: profile (but `locale`), metadata, clients'
    displayName/avatarUrl/info/raw and what the merge log kept are cleared; answers UserReply."""

    app_id: str
    user_id_or_external_id: str


class RegisterDevice(IdentityMessage, tag="identity.device.register", kw_only=True):
    """Create or update the device `guid` of an `sdk` client (an app install and its push token).

    A push token moves with the install: the same token on another device of the app is
    cleared there (the app was reinstalled or the token reassigned).
    """

    app_id: str
    user_id: str
    client_id: str
    integration_id: str
    device_type: DeviceType
    guid: str
    push_notification_token: str | None = None
    app_version: str | None = None
    info: dict[str, Any] = {}


class ListDevices(IdentityMessage, tag="identity.devices.list", kw_only=True):
    app_id: str
    user_id_or_external_id: str


class DropPushToken(IdentityMessage, tag="identity.device.droptoken", kw_only=True):
    """The push provider said the token is dead (FCM `UNREGISTERED`, APNs 410): forget it and
    mark the device inactive. Matching on the token too keeps a newer token safe."""

    app_id: str
    device_id: str
    push_notification_token: str


class DeviceReply(IdentityMessage, tag="identity.device", kw_only=True):
    device: Device


class DevicesReply(IdentityMessage, tag="identity.devices", kw_only=True):
    user: User
    devices: list[Device]


class MergeRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One merge, as kept in identity's audit log (and given in SunCo's `user:merge`)."""

    id: str
    app_id: str
    surviving_user_id: str
    discarded_user_id: str
    reason: str
    merged_client_ids: list[str] = []
    discarded_metadata: dict[str, Any] = {}
    created_at: float


class LinkClient(IdentityMessage, tag="identity.client.link", kw_only=True):
    """Attach the channel identity to `user_id` (channel linking, a redeemed handoff code).

    A new identity becomes a client of the user. One that belongs to another user is refused
    (409, code `link_refused`) when that user carries an externalId — a known person's account is
    never joined on a link; otherwise it is merged into `user_id` only with `allow_merge`
    (the caller has proof from both sides), and without it answered `ClientOwnedElsewhere`,
    changing nothing: a link code must never hand its holder what the redeemer had before.
    """

    app_id: str
    user_id: str
    integration_id: str
    client_type: ClientType
    channel_user_id: str
    display_name: str | None = None
    avatar_url: str | None = None
    info: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    reason: str = "channelLinking"
    allow_merge: bool = False


class ClientOwnedElsewhere(IdentityMessage, tag="identity.client.owned", kw_only=True):
    """`LinkClient` without `allow_merge` found the identity's client on another user, `owner`,
    who has `owner_client_count` clients in all (this one included). Nothing was changed."""

    owner: User
    client: Client
    owner_client_count: int


class ClientLinked(IdentityMessage, tag="identity.client.linked", kw_only=True):
    """The client now belongs to `user`. `merge` (with the discarded user as it was) when a
    user was merged into `user`."""

    user: User
    client: Client
    client_created: bool = False
    merge: MergeRecord | None = None
    discarded_user: User | None = None


class ListMerges(IdentityMessage, tag="identity.merges.list", kw_only=True):
    app_id: str
    user_id: str


class MergesReply(IdentityMessage, tag="identity.merges", kw_only=True):
    merges: list[MergeRecord]


class FindSimilarUsers(IdentityMessage, tag="identity.users.similar", kw_only=True):
    """Other users of the app who may be the same person (for the agent desk's merge suggestions):
    the same phone number on another phone channel, or the same e-mail address (profile or e-mail
    channel). A suggestion only: merging still takes the customer's own confirmation."""

    app_id: str
    user_id: str


class SimilarUser(msgspec.Struct, kw_only=True, omit_defaults=True):
    user_id: str
    # What they share: `phone` or `email`, and the channel types of the other user's clients.
    reason: Literal["phone", "email"]
    channels: list[str] = []


class SimilarUsers(IdentityMessage, tag="identity.users.similarlist", kw_only=True):
    users: list[SimilarUser]


class SearchUsers(IdentityMessage, tag="identity.users.search", kw_only=True):
    """Users of the app a desk search names: by externalId, a channel identity (a number, an
    address), or a word of their profile (name, e-mail). Answered with `UserIds`."""

    app_id: str
    query: str
    limit: int = 50


class UserIds(IdentityMessage, tag="identity.users.ids", kw_only=True):
    user_ids: list[str]


class AttachPhoneClient(IdentityMessage, tag="identity.client.attachphone", kw_only=True):
    """Attach the client of a phone number on a `whatsapp`/`twilio` integration to `user_id`.

    The number's existing client is found however the channel keys it (WhatsApp: by `wa_id`,
    the number's digits, even when its messages carry a BSUID; twilio: by the E.164 number) or
    created, keyed so that the number's next inbound message resolves to it. A client of another
    user is moved (SunCo `theft`): users are never merged here. `status` is the client's new
    status (`pending` until a link is confirmed).
    """

    app_id: str
    user_id: str
    integration_id: str
    client_type: ClientType
    phone_number: str  # E.164: "+" and digits
    status: ClientStatus = "active"
    # The SDK client that proved it reads this number (a confirmed opt-in code), if any.
    proven_by_client_id: str | None = None


def phone_client_key(client_type: str, phone_number: str) -> str:
    """How a channel keys the client of a phone number: WhatsApp by `wa_id` (the number's
    digits, no "+"), twilio (SMS) by the E.164 number; and the e-mail channel (`mailgun`) the
    client of an address by the address, lower-cased."""
    if client_type == "mailgun":
        return phone_number.strip().lower()
    digits = "".join(ch for ch in phone_number if ch.isdigit())
    return digits if client_type == "whatsapp" else f"+{digits}"


class PhoneClientAttached(IdentityMessage, tag="identity.client.phoneattached", kw_only=True):
    """The client now belongs to `user`; `previous_user` is the user it was taken from."""

    user: User
    client: Client
    client_created: bool = False
    previous_user: User | None = None


class RemoveClient(IdentityMessage, tag="identity.client.remove", kw_only=True):
    """Delete one of a user's clients (SunCo `DELETE …/clients/{clientId}`); answers ClientReply."""

    app_id: str
    user_id_or_external_id: str
    client_id: str


class LoginUser(IdentityMessage, tag="identity.user.login", kw_only=True):
    """An SDK session's user logs in as `external_id` (its JWT was verified by the caller).

    No user has `external_id` → this user becomes identified (`authenticated`); another user
    has it → this (anonymous) user is merged into that one (reason `sdkLogin`); this user has it
    already → nothing changes. A user that carries a different externalId is refused (409).
    `client_id` is the session's client, returned as it is after the login.

    The JWT proves who holds this session's client, and the clients that client proved it reads
    (a number whose opt-in code it typed), nothing more: when the user also holds other clients (a
    channel whose link this browser redeemed, another device), only the session's client moves to
    `external_id`'s user (created when missing) — outcome `separated`, with the user left behind,
    which keeps the rest.
    """

    app_id: str
    user_id: str
    client_id: str
    external_id: str


class UserLoggedIn(IdentityMessage, tag="identity.user.loggedin", kw_only=True):
    """The surviving user and the session's client; `merge` and `discarded_user` after a merge."""

    user: User
    client: Client
    outcome: str  # identified | merged | unchanged | separated
    merge: MergeRecord | None = None
    discarded_user: User | None = None
    # `separated`: the session's former user, which keeps its other clients.
    left_user: User | None = None


class IdentityError(IdentityMessage, tag="identity.error", kw_only=True):
    """A refusal: `status` is the HTTP status the API should answer with, `code` SunCo's code."""

    status: int
    code: str
    title: str


IdentityUnion = (
    ResolveClient | Resolved | ResolveClients | ResolvedBatch | CreateUser | GetUser | UpdateUser | DeleteUser
    | ListClients | SetClientStatus
    | RegisterDevice | ListDevices | DropPushToken | LinkClient | ListMerges | ClientLinked | MergesReply
    | UserReply | ClientsReply | ClientReply | Deleted | DeviceReply | DevicesReply | IdentityError
    | AttachPhoneClient | PhoneClientAttached | RemoveClient
    | LoginUser | UserLoggedIn | ClientOwnedElsewhere | DeletePersonalInformation | FindSimilarUsers | SimilarUsers
    | SearchUsers | UserIds
)

ENCODER = msgspec.json.Encoder()
DECODER: msgspec.json.Decoder[IdentityUnion] = msgspec.json.Decoder(IdentityUnion)


def encode(message: IdentityMessage) -> bytes:
    """Encode an identity-family message."""
    return ENCODER.encode(message)


def decode(data: bytes) -> IdentityUnion:
    """Decode an identity-family message."""
    return DECODER.decode(data)


class UserEnded(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A user that stopped existing (value in `subjects.ENDED_USERS_BUCKET`, keyed by its id)."""

    app_id: str
    reason: str  # "merged" or "deleted"
    surviving_user_id: str | None = None
    ended_at: float = 0.0


USER_ENDED_ENCODER = msgspec.json.Encoder()
USER_ENDED_DECODER: msgspec.json.Decoder[UserEnded] = msgspec.json.Decoder(UserEnded)


def ended_user(app_id: str, reply: IdentityMessage, at: float) -> tuple[str, UserEnded] | None:
    """The user a reply says stopped existing (merged away or deleted), if any."""
    if isinstance(reply, ClientLinked | UserLoggedIn) and reply.discarded_user is not None:
        return reply.discarded_user.id, UserEnded(app_id=app_id, reason="merged",
                                                  surviving_user_id=reply.user.id, ended_at=at)
    if isinstance(reply, Deleted):
        return reply.user_id, UserEnded(app_id=app_id, reason="deleted", ended_at=at)
    return None
