"""Every NATS subject, stream, consumer and KV bucket name Threadline uses.

Services never spell a subject literally: they use these constants and builders, so that a
rename is one edit and a typo is an import error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class StreamSpec:
    """A JetStream stream: its name and the subjects it captures."""

    name: str
    subjects: tuple[str, ...]
    max_age_seconds: int = 7 * 24 * 3600
    duplicate_window_seconds: int = 600


# Normalized inbound customer messages and activity from every channel.
INBOUND: Final = StreamSpec("TL_INBOUND", ("inbound.>",))
# Conversation events (SunCo webhook events), one subject per conversation.
EVENTS: Final = StreamSpec("TL_EVENTS", ("events.>",))
# Send commands for channel services.
OUTBOUND: Final = StreamSpec("TL_OUTBOUND", ("outbound.>",))
# Delivery statuses reported by channel services.
STATUS: Final = StreamSpec("TL_STATUS", ("status.>",))

ALL_STREAMS: Final = (INBOUND, EVENTS, OUTBOUND, STATUS)


def inbound_subject(channel: str, integration_id: str) -> str:
    """Subject of a normalized inbound message from `channel` for one integration."""
    return f"inbound.{channel}.{integration_id}"


def outbound_subject(channel: str, integration_id: str) -> str:
    """Subject of a send command for one channel integration."""
    return f"outbound.{channel}.{integration_id}"


def outbound_filter(channel: str) -> str:
    """Filter matching every send command for one channel."""
    return f"outbound.{channel}.>"


def status_subject(channel: str, integration_id: str) -> str:
    """Subject of a delivery status reported by a channel integration."""
    return f"status.{channel}.{integration_id}"


def event_subject(app_id: str, conversation_id: str) -> str:
    """Subject of an event in one conversation (ordering is per subject)."""
    return f"events.{app_id}.{conversation_id}"


def conversation_of_event_subject(subject: str) -> str:
    """The conversation id in a subject made by `event_subject` (cheap routing without decoding)."""
    return subject.rsplit(".", 1)[-1]


EVENTS_ALL: Final = "events.>"
INBOUND_ALL: Final = "inbound.>"
STATUS_ALL: Final = "status.>"

# Durable consumer names.
CONVERSATIONS_INBOUND_CONSUMER: Final = "conversations-inbound"
CONVERSATIONS_STATUS_CONSUMER: Final = "conversations-status"
WEBHOOKS_EVENTS_CONSUMER: Final = "webhooks-events"


def channel_outbound_consumer(channel: str) -> str:
    """Durable consumer name of a channel service's send loop."""
    return f"{channel}-outbound"


# Request/reply (nats.micro) subjects.
IDENTITY_SERVICE: Final = "identity"
IDENTITY_RESOLVE: Final = "identity.resolve"
IDENTITY_USER_CREATE: Final = "identity.user.create"
IDENTITY_USER_GET: Final = "identity.user.get"
IDENTITY_USER_UPDATE: Final = "identity.user.update"
IDENTITY_USER_DELETE: Final = "identity.user.delete"
IDENTITY_CLIENTS_LIST: Final = "identity.clients.list"
IDENTITY_CLIENT_STATUS: Final = "identity.client.status"
IDENTITY_DEVICE_REGISTER: Final = "identity.device.register"
IDENTITY_DEVICES_LIST: Final = "identity.devices.list"
IDENTITY_DEVICE_DROP_TOKEN: Final = "identity.device.droptoken"
IDENTITY_CLIENT_LINK: Final = "identity.client.link"
IDENTITY_MERGES_LIST: Final = "identity.merges.list"

HANDOFF_SERVICE: Final = "handoff"
HANDOFF_ISSUE: Final = "handoff.issue"
HANDOFF_REDEEM: Final = "handoff.redeem"
# Link codes (written by `handoff` only; compare-and-set makes a redemption single-use across replicas).
LINK_CODES_BUCKET: Final = "tl_link_codes"

CONVERSATIONS_SERVICE: Final = "conversations"
CONVERSATIONS_HISTORY: Final = "conversations.history"
CONVERSATIONS_START: Final = "conversations.start"

# KV buckets written by `conversations`, watched by the services that need them.
INTEGRATIONS_BUCKET: Final = "tl_integrations"
WEBHOOKS_BUCKET: Final = "tl_webhooks"
# Written by `app`: business messages an app socket delivered (key: message id), so that the
# replica deciding on a push skips it. Entries expire after a day.
APP_DELIVERIES_BUCKET: Final = "tl_app_deliveries"
