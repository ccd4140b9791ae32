"""Reading what arrives from outside: secrets compared in constant time, JSON with bounded nesting.

Every check of a signature, token or shared secret against request input goes through
`secrets_equal`, and every JSON document from outside (request bodies, JWT and SDK token parts,
URL-encoded JSON query objects, platform webhooks and answers) through `decode_json`. Hostile
input then gets False or a `msgspec.DecodeError` (a ValueError), which callers answer with a
4xx, instead of the TypeError that `hmac.compare_digest` raises on non-ASCII `str` or the
RecursionError that deep nesting raises in any recursive decoder (both were 500s).
"""

from __future__ import annotations

import hmac
import re
from itertools import accumulate
from typing import Any, TypeVar, overload

import msgspec

# Nothing Threadline or a platform sends nests deeper than ~10 levels; 64 leaves room for
# business metadata while staying far below Python's recursion limit (1,000 frames).
MAX_JSON_DEPTH = 64
# Above every request body limit (100 KB JSON, 1 MiB aiohttp); callers with a smaller limit
# refuse earlier with 413.
MAX_JSON_BYTES = 1024 * 1024

T = TypeVar("T")

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


def _utf8(value: str | bytes) -> bytes:
    # `surrogatepass`: aiohttp hands undecodable header and query bytes over as lone surrogates,
    # which plain UTF-8 refuses to encode (a UnicodeEncodeError, i.e. a 500).
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")


# An address a person could use: no spaces, quotes, brackets or separators in the local part, a
# dotted domain ending in a letters-only top-level domain.
_EMAIL_ADDRESS = re.compile(r"^[^@\s<>\"(),;:\[\]\\]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?"
                            r"\.[A-Za-z]{2,}$")


def is_email_address(text: str) -> bool:
    """Whether `text` is an e-mail address a person could reply to (and nothing more: no
    display name, no markup, no list)."""
    return _EMAIL_ADDRESS.match(text) is not None


def secrets_equal(expected: str | bytes, given: str | bytes | None) -> bool:
    """Constant-time equality of a secret and what a request presented (None: absent).

    Both sides are compared as UTF-8 bytes, so any text (non-ASCII, undecodable bytes) is a
    mismatch rather than an exception. Only the length of `expected` can leak, as with
    `hmac.compare_digest`.
    """
    if given is None:
        return False
    return hmac.compare_digest(_utf8(expected), _utf8(given))


def json_depth(raw: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets inside strings ignored)."""
    brackets = _NOT_BRACKET.sub(b"", _STRING.sub(b"", raw))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


@overload
def decode_json(raw: str | bytes, type_: type[T], *, max_depth: int = ..., max_bytes: int = ...) -> T: ...


@overload
def decode_json(raw: str | bytes, type_: None = ..., *, max_depth: int = ..., max_bytes: int = ...) -> Any: ...


def decode_json(raw: str | bytes, type_: Any = None, *, max_depth: int = MAX_JSON_DEPTH,
                max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Decode untrusted JSON (into `type_` when given), refusing deep or oversized documents.

    Raises `msgspec.ValidationError` when the document does not fit `type_` and
    `msgspec.DecodeError` (both ValueErrors) when it is malformed, larger than `max_bytes` or
    nested deeper than `max_depth`; never RecursionError.
    """
    data = _utf8(raw)
    if len(data) > max_bytes:
        raise msgspec.DecodeError(f"JSON document larger than {max_bytes} bytes")
    # Cheap guard first: a document with fewer brackets than the limit cannot be too deep.
    if data.count(b"[") + data.count(b"{") > max_depth and json_depth(data) > max_depth:
        raise msgspec.DecodeError(f"JSON nested deeper than {max_depth} levels")
    if type_ is None:
        return msgspec.json.decode(data)
    return msgspec.json.decode(data, type=type_)
