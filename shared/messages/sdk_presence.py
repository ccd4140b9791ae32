"""Who has a realtime SDK socket open right now (`web` and `app` write, `notifications` reads).

`subjects.SDK_PRESENCE_BUCKET` holds two kinds of entries:

- `replica.<replica_id>` → `ReplicaAlive`: an SDK replica's heartbeat, rewritten every
  `SDK_REPLICA_BEAT_SECONDS`;
- `socket.<replica_id>.<socket_id>` → `SocketPresence`: one open socket, written when it opens
  and deleted when it closes.

A socket counts as open only while its replica's heartbeat is fresh, so the sockets of a replica
that died vanish together within `SDK_REPLICA_DEAD_SECONDS`, without each open socket being
rewritten periodically (50,000 idle sockets would otherwise cost thousands of writes a second).
"""

from __future__ import annotations

import msgspec


class SocketPresence(msgspec.Struct, tag="socket", kw_only=True, omit_defaults=True):
    """An open SDK socket: whose, on which client and conversation, held by which replica."""

    app_id: str
    user_id: str
    client_id: str
    conversation_id: str
    integration_id: str
    channel: str  # "web", "android" or "ios"
    replica_id: str
    written_at: float


class ReplicaAlive(msgspec.Struct, tag="replica", kw_only=True):
    """An SDK replica's heartbeat: its sockets are live while `updated_at` is recent."""

    replica_id: str
    updated_at: float


PresenceEntry = SocketPresence | ReplicaAlive

SOCKET_KEY_PREFIX = "socket."
REPLICA_KEY_PREFIX = "replica."


def socket_key(replica_id: str, socket_id: str) -> str:
    """The bucket key of one open socket."""
    return f"{SOCKET_KEY_PREFIX}{replica_id}.{socket_id}"


def replica_key(replica_id: str) -> str:
    """The bucket key of a replica's heartbeat."""
    return f"{REPLICA_KEY_PREFIX}{replica_id}"


ENCODER = msgspec.json.Encoder()
DECODER: msgspec.json.Decoder[PresenceEntry] = msgspec.json.Decoder(PresenceEntry)  # type: ignore[arg-type]
