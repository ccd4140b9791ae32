"""Pieces every channel service's send loop shares (consume `OutboundSend` → send → report)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

import msgspec

K = TypeVar("K")
V = TypeVar("V")


class _Route(msgspec.Struct):
    integration_id: str = ""
    recipient: str = ""


_ROUTE_DECODER = msgspec.json.Decoder(_Route)


def recipient_key(_subject: str, data: bytes) -> str:
    """Ordering key of a send command (for `Bus.consume`): one recipient on one integration.

    Decodes only the two fields it needs, so ordering costs little per message.
    """
    try:
        route = _ROUTE_DECODER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return "undecodable"
    return f"{route.integration_id}:{route.recipient}"


class BoundedMemory(OrderedDict[K, V], Generic[K, V]):
    """A dict that forgets its oldest entries beyond `limit`.

    Channel services remember what they already sent (message id → provider id), so a
    redelivered command reports again instead of messaging the customer twice.
    """

    def __init__(self, limit: int = 10_000) -> None:
        super().__init__()
        self.limit = limit

    def remember(self, key: K, value: V) -> None:
        """Store `key` → `value`, evicting the oldest entries past the limit."""
        self[key] = value
        while len(self) > self.limit:
            self.popitem(last=False)
