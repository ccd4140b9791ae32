"""Identifiers and timestamps in the shapes the Sunshine Conversations API uses."""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from datetime import UTC, datetime


def new_id() -> str:
    """Return a new 24-character lowercase hex id (Mongo-ObjectId-like, as SunCo ids are).

    The first 8 hex digits are the creation time in seconds so ids sort roughly by age, which
    keeps SQLite index inserts append-mostly.
    """
    return f"{int(time.time()):08x}{os.urandom(8).hex()}"


def derived_id(*parts: str) -> str:
    """A deterministic 24-hex id from `parts` (for ids that must survive a redelivery unchanged:
    event ids, send ids used as `Nats-Msg-Id`)."""
    return hashlib.sha256(":".join(parts).encode()).hexdigest()[:24]


def new_secret(nbytes: int = 24) -> str:
    """Return a URL-safe random secret (for API keys, webhook secrets, verify tokens)."""
    return secrets.token_urlsafe(nbytes)


def now() -> float:
    """Current time as Unix seconds (float)."""
    return time.time()


def iso(ts: float) -> str:
    """Format Unix seconds as SunCo's `YYYY-MM-DDThh:mm:ss.SSSZ`."""
    dt = datetime.fromtimestamp(ts, tz=UTC)
    # One f-string: strftime made this a visible share of the hot path (called several times
    # per message).
    return (f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
            f".{dt.microsecond // 1000:03d}Z")


def parse_iso(value: str) -> float:
    """Parse an ISO-8601 timestamp (as produced by :func:`iso`) back to Unix seconds."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def is_sunco_id(value: str) -> bool:
    """True when `value` looks like a 24-hex id (used to tell ids from externalIds in paths)."""
    return len(value) == 24 and all(c in "0123456789abcdef" for c in value)
