"""Who may cause a send to an address a customer typed, and how often (pure; the counting is in the store).

An opt-in asks the service to send a confirmation code to an address anybody can type, which
makes it a way to send SMS, WhatsApp templates and e-mail to strangers at the business's cost
("SMS pumping"). Each request is counted against its sources, each code sent against its
destination and its app; away notifications to opted-in addresses have their own budgets:

| scope | counts | key |
|---|---|---|
| `user` | opt-in requests of one session's user | app + user |
| `ip` | opt-in requests from one client address (all apps) | IPv4 address or IPv6 /64 |
| `origin` | opt-in requests from one page Origin of an app | app + Origin (`none` without one) |
| `address` | confirmation codes sent to one address (all apps, all channels) | canonical address |
| `app` | confirmation codes sent by one app | app |
| `notify_address` | away notifications to one opted-in address (all apps) | canonical address |
| `notify_app` | away notifications to opted-in addresses, per app | app |

Counts are sliding windows in the service's database (`Store.take`), so every replica sharing
it sees the same numbers. Keys are stored as keyed hashes: the table holds no address in clear.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass

from shared.config import Rate

_GMAIL_DOMAINS = frozenset({"gmail.com", "googlemail.com"})


@dataclass(frozen=True)
class Counter:
    """One thing to count: `scope` and `key` under `rates` (every rate must hold)."""

    scope: str
    key: str
    rates: tuple[Rate, ...]


@dataclass(frozen=True)
class Refusal:
    """A limit was reached: which one, and in how many seconds one more will be allowed."""

    scope: str
    retry_after: int

    @property
    def title(self) -> str:
        """What the customer is told (never whose limit other than theirs was reached)."""
        return REFUSAL_TITLES.get(self.scope, "Too many requests")


# The 429's Retry-After says when; the widget turns it into words.
REFUSAL_TITLES = {
    "user": "You asked for too many codes",
    "ip": "Too many requests from your network",
    "origin": "Too many requests from this site",
    "address": "Too many codes were sent to this address",
    "app": "No more codes can be sent right now",
}


def canonical_address(channel: str, address: str) -> str:
    """One form per mailbox or phone, so that spelling variants share a destination's limit.

    A number is its digits (SMS and WhatsApp reach the same phone); an e-mail address is case
    folded, its `+tag` dropped, and Gmail's dots ignored (all deliver to the same mailbox).
    """
    if channel != "email":
        return "tel:" + "".join(c for c in address if c.isdigit())
    local, _, domain = address.strip().casefold().rpartition("@")
    local = local.split("+", 1)[0]
    if domain in _GMAIL_DOMAINS:
        local, domain = local.replace(".", ""), "gmail.com"
    return f"mailto:{local}@{domain}"


def hashed_key(secret: str, scope: str, key: str) -> str:
    """How a counter's key is stored (keyed, so the table reveals no address or IP)."""
    return hmac.new(secret.encode(), f"limit:{scope}:{key}".encode(), hashlib.sha256).hexdigest()[:40]


def retry_after(oldest_counted_at: float, window_seconds: float, now: float) -> int:
    """Whole seconds until the entry at `oldest_counted_at` leaves the window (at least 1)."""
    return max(1, math.ceil(oldest_counted_at + window_seconds - now))
