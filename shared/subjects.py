"""Every NATS subject, stream, consumer and KV bucket name Threadline uses.

Services never spell a subject literally: they use these constants and builders, so that a
rename is one edit and a typo is an import error.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping
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


# Every stream subject ends in a partition number: the messages that must stay in order (one
# customer's inbound messages, one conversation's events, one recipient's send commands, one
# provider message's statuses) share a key, hence a partition, and each partition is consumed by
# one replica at a time (`shared.partitions`). The count bounds how many replicas of one consumer
# group share the work, and each partition costs its own pull requests: one process alone (the
# single node of `threadline up`) runs fastest with one. Every process of a deployment must use
# the same count (THREADLINE_PARTITIONS); after a change the holder of partition 0 drains the
# durables of partitions that no longer exist (`Bus.consume`).
PARTITIONS_VARIABLE: Final = "THREADLINE_PARTITIONS"
DEFAULT_PARTITIONS: Final = 8
# The NATS permissions (shared.natsauth) name the durables of this many partitions.
MAX_PARTITIONS: Final = 16
PARTITION_COUNTS: Final = tuple(2 ** n for n in range(MAX_PARTITIONS.bit_length()))


def partition_count(environ: Mapping[str, str]) -> int:
    """The partition count `environ` sets (default DEFAULT_PARTITIONS): a power of two up to
    MAX_PARTITIONS, so that each partition of a smaller count is a union of larger ones'."""
    text = environ.get(PARTITIONS_VARIABLE, "").strip()
    if not text:
        return DEFAULT_PARTITIONS
    if not text.isdecimal() or int(text) not in PARTITION_COUNTS:
        raise ValueError(f"{PARTITIONS_VARIABLE} must be one of {', '.join(map(str, PARTITION_COUNTS))},"
                         f" got {text!r}")
    return int(text)


def partitions_for(replicas: int) -> int:
    """The smallest partition count that gives each of `replicas` replicas a partition of its own
    (capped at MAX_PARTITIONS): what a launcher that knows its replica counts runs."""
    return next((count for count in PARTITION_COUNTS if count >= replicas), MAX_PARTITIONS)


PARTITIONS: Final = partition_count(os.environ)


def partition_of(key: str) -> int:
    """The partition of an ordering key (the same on every host and Python version)."""
    return zlib.crc32(key.encode()) % PARTITIONS


def inbound_key(integration_id: str, sender: str) -> str:
    """Ordering key of inbound messages: one sender (channel user, else user) on one integration."""
    return f"{integration_id}:{sender}"


def inbound_subject(channel: str, integration_id: str, sender: str) -> str:
    """Subject of a normalized inbound message from `channel` for one integration, partitioned
    by its sender (`channel_user_id`, else `user_id`)."""
    return f"inbound.{channel}.{integration_id}.{partition_of(inbound_key(integration_id, sender))}"


def outbound_subject(channel: str, integration_id: str, recipient: str) -> str:
    """Subject of a send command for one channel integration, partitioned by its recipient."""
    return f"outbound.{channel}.{integration_id}.{partition_of(f'{integration_id}:{recipient}')}"


def status_subject(channel: str, integration_id: str, provider_message_id: str) -> str:
    """Subject of a delivery status reported by a channel integration, partitioned by the
    provider message it is about (sent, delivered and read of one message stay in order)."""
    return f"status.{channel}.{integration_id}.{partition_of(f'{integration_id}:{provider_message_id}')}"


def channel_subjects(stream_prefix: str, channel: str) -> str:
    """Every subject `channel` publishes under one stream prefix (`inbound`, `status`): for permissions."""
    return f"{stream_prefix}.{channel}.>"


def integration_subjects(stream_prefix: str, channel: str, integration_id: str) -> str:
    """Filter matching one integration's subjects under a stream prefix, every partition."""
    return f"{stream_prefix}.{channel}.{integration_id}.*"


def event_subject(app_id: str, conversation_id: str) -> str:
    """Subject of an event in one conversation (its partition: the conversation's)."""
    return f"events.{app_id}.{conversation_id}.{partition_of(conversation_id)}"


def conversation_events(app_id: str, conversation_id: str) -> str:
    """Filter matching every event of one conversation, under any partition count (what an
    erasure purges: events published before a change of the count carry the old partition)."""
    return f"events.{app_id}.{conversation_id}.*"


# The agent desk reads copies of the events that concern it (`shared.messages.conversation.
# concerns_desk`), published by `conversations` after each original under this prefix: five tokens,
# so that the other readers' `events.*.*.<n>` never match them, and the desk reads nothing of the
# apps that have no desk.
DESK_COPY_PREFIX: Final = "events.desk"


def desk_event_subject(app_id: str, conversation_id: str) -> str:
    """Subject of the desk's copy of an event in one conversation (the conversation's partition)."""
    return f"{DESK_COPY_PREFIX}.{app_id}.{conversation_id}.{partition_of(conversation_id)}"


def desk_copy_msg_id(event_id: str) -> str:
    """The Nats-Msg-Id of the desk's copy of an event (the original's is the event id)."""
    return f"{event_id}:desk"


def conversation_desk_events(app_id: str, conversation_id: str) -> str:
    """Filter matching the desk's copies of one conversation's events (what an erasure purges too)."""
    return f"{DESK_COPY_PREFIX}.{app_id}.{conversation_id}.*"


def channel_of_subject(subject: str) -> tuple[str, str] | None:
    """(channel, integration id) of a subject made by `inbound_subject`, `outbound_subject` or
    `status_subject` (`<family>.<channel>.<integration>.<partition>`, or an older one without the
    partition); None for anything shorter."""
    parts = subject.split(".")
    return (parts[1], parts[2]) if len(parts) > 2 else None


def conversation_of_event_subject(subject: str) -> str:
    """The conversation id in a subject made by `event_subject` (cheap routing without decoding)."""
    parts = subject.split(".")
    return parts[2] if len(parts) > 2 else ""


EVENTS_ALL: Final = "events.>"
# Every conversation's events as published (not the desk's copies): what the SDK services follow
# live. (Their permission stays EVENTS_ALL: the copies hold nothing the originals do not, and a
# replica of a version before the copies subscribes to that.)
CONVERSATION_EVENTS_ALL: Final = "events.*.*.*"
INBOUND_ALL: Final = "inbound.>"
STATUS_ALL: Final = "status.>"


@dataclass(frozen=True)
class ConsumerSpec:
    """A consumer group: one durable consumer per partition (`<group>-p<n>`), each consumed by
    one replica of the group at a time.

    `prefix` is the subject before the partition token (`inbound.*.*`). Before partitioning the
    group was one durable named `group` over those subjects without the token: a replica drains
    it (`legacy_filter`) and removes it, so an upgrade loses nothing that was queued.
    """

    stream: StreamSpec
    group: str
    prefix: str

    def durable(self, partition: int) -> str:
        """The durable consumer of one partition."""
        return f"{self.group}-p{partition}"

    def filter(self, partition: int) -> str:
        """The subjects of one partition."""
        return f"{self.prefix}.{partition}"

    @property
    def durables(self) -> tuple[str, ...]:
        """Every durable the group may have: those of MAX_PARTITIONS partitions (a deployment
        uses PARTITIONS of them) and the pre-partitioning one."""
        return (*(self.durable(p) for p in range(MAX_PARTITIONS)), self.group)

    @property
    def leftovers(self) -> tuple[tuple[str, str], ...]:
        """(durable, filter) of what an earlier deployment may have left to drain: the
        pre-partitioning durable, and those of partitions beyond today's count."""
        return ((self.group, self.legacy_filter),
                *((self.durable(p), self.filter(p)) for p in range(PARTITIONS, MAX_PARTITIONS)))

    @property
    def legacy_filter(self) -> str:
        """The subjects of messages published before partitioning (no partition token)."""
        return self.prefix


CONVERSATIONS_INBOUND: Final = ConsumerSpec(INBOUND, "conversations-inbound", "inbound.*.*")
CONVERSATIONS_STATUS: Final = ConsumerSpec(STATUS, "conversations-status", "status.*.*")
WEBHOOKS_EVENTS: Final = ConsumerSpec(EVENTS, "webhooks-events", "events.*.*")
NOTIFICATIONS_EVENTS: Final = ConsumerSpec(EVENTS, "notifications-events", "events.*.*")
NOTIFICATIONS_STATUS: Final = ConsumerSpec(STATUS, "notifications-status", "status.*.*")
DESK_EVENTS: Final = ConsumerSpec(EVENTS, "desk-events", f"{DESK_COPY_PREFIX}.*.*")


def channel_outbound_consumer(channel: str) -> ConsumerSpec:
    """The consumer group of a channel service's send loop."""
    return ConsumerSpec(OUTBOUND, f"{channel}-outbound", f"outbound.{channel}.*")


# Core (not stored) broadcast among `webhooks` replicas: a privacy event one replica handled, so
# that the others drop the rows it names from their queues too.
WEBHOOKS_ERASURES: Final = "webhooks.erasures"

# Core (not stored) live updates for the agent desks of one app, `desk.updates.<app>`: whichever
# replica changed a ticket, every replica's sockets of that app hear of it.
DESK_UPDATES_PREFIX: Final = "desk.updates"

# Partitions of the consumer groups (`shared.partitions`): `<group>.<replica>` heartbeats, which
# expire when not rewritten within PARTITION_LEASE_SECONDS (a dead replica's partitions are taken
# over after that long), and `<group>.<n>` owners.
PARTITION_MEMBERS_BUCKET: Final = "tl_partition_members"
PARTITION_OWNERS_BUCKET: Final = "tl_partition_owners"
PARTITION_LEASE_SECONDS: Final = 6.0


# Request/reply (nats.micro) subjects.
IDENTITY_SERVICE: Final = "identity"
IDENTITY_RESOLVE: Final = "identity.resolve"
IDENTITY_RESOLVE_BATCH: Final = "identity.resolve.batch"
IDENTITY_USER_CREATE: Final = "identity.user.create"
IDENTITY_USER_GET: Final = "identity.user.get"
IDENTITY_USER_UPDATE: Final = "identity.user.update"
IDENTITY_USER_DELETE: Final = "identity.user.delete"
IDENTITY_USER_PERSONAL_DELETE: Final = "identity.user.personal.delete"
IDENTITY_CLIENTS_LIST: Final = "identity.clients.list"
IDENTITY_CLIENT_STATUS: Final = "identity.client.status"
IDENTITY_DEVICE_REGISTER: Final = "identity.device.register"
IDENTITY_DEVICES_LIST: Final = "identity.devices.list"
IDENTITY_DEVICE_DROP_TOKEN: Final = "identity.device.droptoken"
IDENTITY_CLIENT_LINK: Final = "identity.client.link"
IDENTITY_MERGES_LIST: Final = "identity.merges.list"
IDENTITY_USERS_SIMILAR: Final = "identity.users.similar"
IDENTITY_USERS_SEARCH: Final = "identity.users.search"
# Direct linking by phone (SunCo Clients API): attach a number's client to a user, remove a client.
IDENTITY_CLIENT_ATTACH_PHONE: Final = "identity.client.attachphone"
IDENTITY_CLIENT_REMOVE: Final = "identity.client.remove"

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

# Written by the SDK services (`web`, `app`): each replica's heartbeat and one entry per open
# realtime socket (`shared.messages.sdk_presence`). A socket entry is written when it opens and
# deleted when it closes; it counts only while its replica's heartbeat (every BEAT seconds) is
# younger than DEAD seconds. Entries are rewritten every REFRESH seconds so that the bucket's TTL
# only ever removes the leftovers of a replica that died.
SDK_PRESENCE_BUCKET: Final = "tl_sdk_sockets"
SDK_PRESENCE_TTL_SECONDS: Final = 24 * 3600
SDK_PRESENCE_REFRESH_SECONDS: Final = 6 * 3600
SDK_REPLICA_BEAT_SECONDS: Final = 15
SDK_REPLICA_DEAD_SECONDS: Final = 45
# SDK rate limits (new sessions, link requests): one GCRA timestamp per source and window,
# shared by every replica of web and app (`shared.ratelimit.SharedLimiter`); entries expire a day
# after their last write.
SDK_LIMITS_BUCKET: Final = "tl_sdk_limits"
# The e-mail channel: each conversation's thread (subject, last Message-IDs) so business replies
# thread under the customer's mail, and the per-sender limits of inbound mail.
MAIL_THREADS_BUCKET: Final = "tl_mail_threads"
MAIL_LIMITS_BUCKET: Final = "tl_mail_limits"

# Direct linking of a phone-number client (SunCo Clients API `matchCriteria`), served by
# `conversations`; also used by `notifications` when a customer confirms an opt-in.
CONVERSATIONS_CLIENT_LINK: Final = "conversations.client.link"

DESK_SERVICE: Final = "desk"
# The desk's REST API as the business reaches it (`/v2/apps/{appId}/desk/…`, authenticated by
# `conversations`, which forwards the call).
DESK_API: Final = "desk.api"
# What the desk asks of `conversations`: an agent's message, a switchboard action.
CONVERSATIONS_DESK: Final = "conversations.desk"
# When each integration's platform webhook last brought something in (`shared.ingress`), for the
# desk's channel setup: `<integration id>` → Unix seconds, written at most every 30 s per replica.
WEBHOOKS_SEEN_BUCKET: Final = "tl_webhooks_seen"
# The desk's sign-in throttle (`services.desk.auth.SharedLoginThrottle`).
DESK_LOGIN_BUCKET: Final = "tl_desk_login"

NOTIFICATIONS_SERVICE: Final = "notifications"
NOTIFICATIONS_OPTIN_START: Final = "notifications.optin.start"
NOTIFICATIONS_OPTIN_CONFIRM: Final = "notifications.optin.confirm"
NOTIFICATIONS_OPTIN_LIST: Final = "notifications.optin.list"
NOTIFICATIONS_OPTIN_STOP: Final = "notifications.optin.stop"
# Everything notifications holds about a user (opt-ins, sends), for the user export.
NOTIFICATIONS_USER_EXPORT: Final = "notifications.user.export"
# Written by `conversations`: each app's public settings (`notification_settings` below), watched
# by `notifications` (key: app id).
APPS_BUCKET: Final = "tl_apps"

# Participants, read state and client associations of a conversation (served by `conversations`).
CONVERSATIONS_PARTICIPANTS: Final = "conversations.participants"

# SDK handoff and login, served by `conversations` for `web` and `app`: redeem a link code into a
# new SDK client on the code's conversation; verify an SDK login JWT and identify/merge the user.
CONVERSATIONS_SDK_LINK: Final = "conversations.sdk.link"
CONVERSATIONS_SDK_LOGIN: Final = "conversations.sdk.login"
# Identify a session's user by externalId, or merge it into the user who has it (SDK login).
IDENTITY_USER_LOGIN: Final = "identity.user.login"

# Written by `identity`: users that no longer exist because they were merged into another user
# or deleted (key: user id, value `identity.UserEnded`). SDK services mirror it and refuse the
# session tokens of those users (SunCo revokes the discarded user's session on a merge).
ENDED_USERS_BUCKET: Final = "tl_ended_users"
