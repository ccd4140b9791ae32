"""The part of the conversation model its collaborators share (`clients`, `linking`,
`sdk_login` and `handlers`): the store, the bus, identity, and what they all need of them —
announcing events, resolving a customer's identity, the default conversation, the channel
that reaches a client. A leaf: it imports none of the modules built on it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.conversations.identity_client import IdentityClient, IdentityUnavailable, Publisher
from services.conversations.store import Store, conversation_ref, loads
from shared import metrics, records, subjects
from shared.bus import Retry
from shared.db import Row
from shared.http import ApiError
from shared.ids import new_id, now
from shared.messages import channel as chan
from shared.messages import conversation as conv
from shared.messages import identity as ident
from shared.signing import DEFAULT_JWT_POLICY, JwtPolicy
from shared.sunco import Client, Source, User
from shared.telemetry import log_fields

log = logging.getLogger(__name__)

SDK_INTEGRATION_TYPES = frozenset({"web", "ios", "android", "unity", "sdk"})
APP_INTEGRATION_TYPES = frozenset({"ios", "android"})


# Waits before each new try of a desk copy whose original was stored (1.6 s in all).
DESK_COPY_RETRY_DELAYS = (0.1, 0.5, 1.0)


@dataclass(frozen=True)
class Announced:
    """Where an announced event was stored in the events stream: its sequence, and its desk
    copy's (None: no copy, or none stored)."""

    seq: int | None
    desk_seq: int | None = None

    @property
    def desk_bound(self) -> int | None:
        """Below what the desk's copies of earlier events lie: its copy's sequence, or when that
        copy was given up the event's own (a copy goes out right after its original)."""
        return self.desk_seq or self.seq


class ConversationCore:
    """The store, the bus and identity, and the operations every part of the model shares."""

    def __init__(self, store: Store, bus: Publisher, identity: IdentityClient,
                 jwt_policy: JwtPolicy = DEFAULT_JWT_POLICY,
                 apps: Callable[[str], records.AppRecord | None] = lambda _app_id: None) -> None:
        self.store = store
        self.bus = bus
        self.identity = identity
        self.jwt_policy = jwt_policy  # what SDK login JWTs must satisfy (exp, lifetime)
        self.apps = apps  # the apps bucket's copy of an app (its switchboard), without a query

    def switchboard(self, app_id: str) -> records.SwitchboardRecord | None:
        """The app's switchboard when it is enabled (from the apps bucket)."""
        app = self.apps(app_id)
        return app.active_switchboard() if app is not None else None

    def _default_control(self, app_id: str) -> str | None:
        switchboard = self.switchboard(app_id)
        return switchboard.default_switchboard_integration_id if switchboard is not None else None

    async def with_default_control(self, app_id: str, row: Row) -> Row:
        """The conversation with the switchboard's default integration in control when nobody
        is (a conversation from before the switchboard, or released, or controlled by a member
        since deleted): the customer's next message goes to the default again, as SunCo does.
        The row as it is now."""
        switchboard = self.switchboard(app_id)
        active = row["switchboard_active"]
        if switchboard is None or (active is not None and switchboard.integration(active) is not None):
            return row
        default_id = switchboard.default_switchboard_integration_id
        if default_id is None or default_id == active:
            return row
        # Nobody in control, or a member since deleted: the default takes it.
        updated = await self.store.give_default_control(row["id"], default_id, active)
        return updated if updated is not None else row

    async def announce(self, event: conv.ConversationUnion) -> Announced:
        """Publish `event` on its conversation's subject, de-duplicated by its id, and with it its
        copy for the agent desk when it concerns the desk (`conv.concerns_desk`).

        The two go back to back (`publish_together`): the copies of one process's events keep
        their originals' order, so an erasure that purges each subject below its own
        announcement's sequence leaves the copies as it leaves the originals. A failed original
        raises (the caller's retry sends both again, de-duplicated); a copy that fails alone is
        sent again a few times, then given up with an error logged and counted
        (`threadline.desk.copies.lost`): the business's change and its original stand.
        """
        data = conv.encode(event)
        subject = subjects.event_subject(event.app_id, event.conversation_id)
        app = self.apps(event.app_id)
        if not conv.concerns_desk(event, app.switchboard if app is not None else None):
            return Announced(getattr(await self.bus.publish(subject, data, msg_id=event.id), "seq", None))
        copy = (subjects.desk_event_subject(event.app_id, event.conversation_id), data,
                subjects.desk_copy_msg_id(event.id))
        original, copied = await self.bus.publish_together([(subject, data, event.id), copy])
        if isinstance(original, BaseException):
            raise original
        for delay in DESK_COPY_RETRY_DELAYS:
            if not isinstance(copied, BaseException):
                break
            log.warning("the desk's copy of event %s failed (%s): trying again in %.1f s", event.id, copied, delay)
            await asyncio.sleep(delay)
            try:
                copied = await self.bus.publish(copy[0], data, msg_id=copy[2])
            except Exception as exc:
                copied = exc
        seq = getattr(original, "seq", None)
        if isinstance(copied, BaseException):
            log.error("the desk's copy of event %s (%s) was given up: %s", event.id, type(event).__name__, copied,
                      extra=log_fields(app_id=event.app_id, conversation_id=event.conversation_id))
            metrics.desk_copy_lost()
            return Announced(seq)
        return Announced(seq, getattr(copied, "seq", None))

    async def publish_event(self, event: conv.ConversationUnion) -> Announced:
        """Announce `event` (`announce`); a failure other than a MessageCreated's is answered 503
        (the caller's change stays)."""
        try:
            return await self.announce(event)
        except ApiError:
            raise
        except Exception as exc:
            if isinstance(event, conv.MessageCreated):
                raise
            log.warning("publishing %s failed: %s", type(event).__name__, exc)
            raise ApiError(503, "Messaging bus unavailable, try again") from exc

    async def inbound_identity(self, msg: chan.InboundMessage) -> tuple[User, Client]:
        """The user and client a customer message comes from (resolved by identity unless the
        channel named them); Retry while identity cannot answer."""
        if msg.user_id and msg.client_id:
            user = User(id=msg.user_id)
            client = Client(id=msg.client_id, type=msg.client_type, status="active", integration_id=msg.integration_id,
                            external_id=msg.channel_user_id, display_name=msg.display_name,
                            info=msg.client_info or None)
            return user, client
        # Not `msg.raw`: every channel's raw payload is the message itself, which kept as the
        # client's `raw` would outlive retention and deletion of the message (and show in the API).
        try:
            return await self.identity.resolve(ident.ResolveClient(
                app_id=msg.app_id, integration_id=msg.integration_id, client_type=msg.client_type,
                channel_user_id=msg.channel_user_id, display_name=msg.display_name,
                info=msg.client_info, user_id=msg.user_id))
        except IdentityUnavailable as exc:
            raise Retry(1.0, f"identity unavailable: {exc}") from exc

    async def ensure_conversation(self, app_id: str, user: User, *, reason: str, source: Source | None = None,
                                  default: bool = True, display_name: str | None = None,
                                  description: str | None = None, icon_url: str | None = None,
                                  metadata: dict[str, Any] | None = None) -> tuple[Row, bool]:
        """The user's default personal conversation (created when missing) or, with
        `default=False`, a new personal conversation (the default one when the user has none).

        A created conversation is announced with ConversationCreated; if that publish fails the
        conversation is removed again and the error propagates.
        """
        if default:
            existing = await self.store.default_conversation(app_id, user.id)
            if existing is not None:
                return existing, False
        created_at = now()
        row, created = await self.store.create_personal_conversation(
            new_id(), new_id(), app_id, user.id, user.external_id, default=default, display_name=display_name,
            description=description, icon_url=icon_url, metadata=metadata, now=created_at,
            in_control=self._default_control(app_id))
        if not created:
            return row, False
        conversation_id = row["id"]
        event = conv.ConversationCreated(
            id=new_id(), app_id=app_id, conversation_id=conversation_id, created_at=created_at,
            conversation=conversation_ref(row), user=user, creation_reason=reason, source=source)
        try:
            await self.announce(event)
        except Exception:
            async with self.store.tx():
                await self.store.delete_conversation(conversation_id)
            raise
        return row, True

    async def outbound_channel_of(self, client: Client) -> str | None:
        """`outbound_channel` for a client (the channel service that sends to it)."""
        return await self.outbound_channel(client.type, client.integration_id)

    async def business_name(self, app_id: str) -> str:
        """How the business is named to customers: the web messenger's `businessName` (what the
        handoff's prefilled texts say too), else the app's display name."""
        integrations, _ = await self.store.list_integrations(app_id, ["web"])
        for integration in integrations:
            name = loads(integration["config"]).get("businessName")
            if isinstance(name, str) and name:
                return name
        row = await self.store.get_app(app_id)
        return str(row["display_name"]) if row is not None and row["display_name"] else "us"

    async def outbound_channel(self, client_type: str, integration_id: str | None) -> str | None:
        """The channel service that delivers to a client of this type, None when nobody needs to.

        Web SDK clients read the conversation over their socket; app SDK clients too, but the
        app channel also pushes what their socket did not deliver.
        """
        if not integration_id:
            return None
        if client_type != "sdk":
            return client_type
        integration_type = await self.store.integration_type(integration_id)
        return integration_type if integration_type in APP_INTEGRATION_TYPES else None
