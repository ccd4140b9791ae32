"""Who has a realtime SDK socket open right now (`web` and `app` write, `notifications` reads).

One KV entry per open socket in `subjects.SDK_PRESENCE_BUCKET`, keyed by a random socket id.
"""

from __future__ import annotations

import msgspec


class SocketPresence(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An open SDK socket: whose, on which client and conversation, refreshed at `updated_at`."""

    app_id: str
    user_id: str
    client_id: str
    conversation_id: str
    integration_id: str
    channel: str  # "web", "android" or "ios"
    updated_at: float


ENCODER = msgspec.json.Encoder()
DECODER: msgspec.json.Decoder[SocketPresence] = msgspec.json.Decoder(SocketPresence)
