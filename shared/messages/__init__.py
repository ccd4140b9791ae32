"""Bus message schemas, one module per family; each family is one tagged union with dotted tags."""

from __future__ import annotations

from typing import Any, get_args

import msgspec


class _TypeProbe(msgspec.Struct):
    type: str


_TYPE_PROBE = msgspec.json.Decoder(_TypeProbe)


def tags_of(union: Any) -> frozenset[str]:
    """The tags (`type` values) of a family's tagged union: the message types this version knows."""
    return frozenset(member.__struct_config__.tag for member in get_args(union))


def type_of(data: bytes) -> str | None:
    """The `type` of an encoded message, None when it is not a JSON object with a string `type`."""
    try:
        return _TYPE_PROBE.decode(data).type
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
