"""Link codes and attempt counters in a JetStream KV bucket, updated only by compare-and-set.

Every replica of `handoff` reads and writes the same bucket; a write names the revision it read,
so of two replicas redeeming one code at the same time exactly one succeeds and the other
re-reads a used code. Keys in the bucket:

- `<code>`: a `CodeRecord` (codes are `[A-Za-z0-9_-]`, so they never contain a dot);
- `qr.<token>`: the code a QR-code URL stands for, where the code itself may not appear in a URL
  that can be enumerated (the short, customer-visible codes);
- `attempts.<digest>`: a sender's recent redemption attempts (`SenderAttempts`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

QR_PREFIX = "qr."
ATTEMPTS_PREFIX = "attempts."


class CodeRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What a code is bound to, and what became of it."""

    app_id: str
    user_id: str
    conversation_id: str
    integration_id: str
    integration_type: str
    source_integration_id: str | None = None
    created_at: float
    expires_at: float
    # The deep link the code was issued in (the QR code encodes it).
    url: str
    used_at: float | None = None
    used_by: str | None = None
    # Wrong-channel and foreign attempts; at the limit the code is burned.
    failed_attempts: int = 0


class SenderAttempts(msgspec.Struct, kw_only=True):
    """A sender's redemption attempts in the current window: (attempt id, time)."""

    attempts: list[tuple[str, float]] = []


CODE_ENCODER = msgspec.json.Encoder()
CODE_DECODER = msgspec.json.Decoder(CodeRecord)
ATTEMPTS_DECODER = msgspec.json.Decoder(SenderAttempts)


def qr_key(token: str) -> str:
    """Key of a QR token's pointer to its code."""
    return QR_PREFIX + token


def attempts_key(app_id: str, integration_id: str, channel_user_id: str) -> str:
    """Key of a sender's attempt counter (hashed: channel user ids may hold any character)."""
    digest = hashlib.sha256(f"{app_id}\x00{integration_id}\x00{channel_user_id}".encode()).hexdigest()[:40]
    return ATTEMPTS_PREFIX + digest


@dataclass(frozen=True)
class Entry:
    """A value and the revision to name when replacing it."""

    value: bytes
    revision: int


class KvStore(Protocol):
    """The compare-and-set key/value operations the handoff logic needs."""

    async def get(self, key: str) -> Entry | None:
        """The current value, or None when missing or deleted."""
        ...

    async def create(self, key: str, value: bytes) -> bool:
        """Store `value` only if `key` holds nothing; False when it already exists."""
        ...

    async def update(self, key: str, value: bytes, revision: int) -> bool:
        """Replace the value only if it is still at `revision`; False when someone wrote first."""
        ...


class NatsKvStore:
    """`KvStore` over a JetStream KV bucket (shared by every replica)."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, key: str) -> Entry | None:
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        return Entry(value=entry.value, revision=entry.revision)

    async def create(self, key: str, value: bytes) -> bool:
        try:
            await self.kv.create(key, value)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    async def update(self, key: str, value: bytes, revision: int) -> bool:
        try:
            await self.kv.update(key, value, last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True
