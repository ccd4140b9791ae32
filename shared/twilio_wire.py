"""Twilio Programmable Messaging wire facts shared by the `sms` service and the sandbox's fake.

- `twilio_signature` / `twilio_signature_ok`: `X-Twilio-Signature` (platform reference §5.2):
  base64(HMAC-SHA1(auth token, URL + every param name and value, names and values sorted)).
- `sms_segments`: how many segments a body costs (GSM-7 160/153 septets, UCS-2 70/67 units).
- `ERROR_TITLES`: Twilio's words for the error codes the gateway and the fake use (§5.5).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from shared.untrusted import secrets_equal

SIGNATURE_HEADER = "X-Twilio-Signature"
SIGNATURE_SETTINGS_HEADER = "X-Twilio-Webhooks-Signature-Settings"
API_VERSION = "2010-04-01"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'
MAX_BODY_CHARS = 1600
MAX_MEDIA = 10

Params = Mapping[str, str | list[str]] | Iterable[tuple[str, str]]


def _grouped(params: Params) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    if isinstance(params, Mapping):
        for name, value in params.items():
            grouped.setdefault(name, []).extend([value] if isinstance(value, str) else list(value))
    else:
        for name, value in params:
            grouped.setdefault(name, []).append(value)
    return grouped


def twilio_signature(auth_token: str, url: str, params: Params) -> str:
    """The `X-Twilio-Signature` Twilio sends for a form POST of `params` to `url` (§5.2).

    `params` is a mapping (a list value for a repeated name) or the (name, value) pairs in the
    order received; names, then each name's distinct values, are sorted before signing.
    """
    grouped = _grouped(params)
    signed = url + "".join(name + value for name in sorted(grouped) for value in sorted(set(grouped[name])))
    digest = hmac.new(auth_token.encode(), signed.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def signature_urls(url: str) -> list[str]:
    """`url` and its twin with/without the scheme's default port.

    Twilio's back end signs either form (its SDK validator accepts both), so the gateway does too.
    """
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    try:
        port = parts.port
    except ValueError:
        return [url]
    out = [url]
    if default is None or not parts.netloc:
        return out
    if port is None:
        out.append(urlunsplit(parts._replace(netloc=f"{parts.netloc}:{default}")))
    elif port == default:
        out.append(urlunsplit(parts._replace(netloc=parts.netloc[: parts.netloc.rfind(":")])))
    return out


def twilio_signature_ok(auth_token: str, url: str, params: Params, header: str | None) -> bool:
    """Constant-time check of an `X-Twilio-Signature` over the public `url` and the received params."""
    if not header or not auth_token:
        return False
    grouped = _grouped(params)
    ok = False
    for candidate in signature_urls(url):
        # Every candidate is compared (no early exit), so timing says nothing about which matched.
        ok |= secrets_equal(twilio_signature(auth_token, candidate, grouped), header)
    return ok


# --- segments ------------------------------------------------------------------------------------

# GSM 03.38 default alphabet (one septet each) and its extension table (escape + one septet).
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")
GSM7_SINGLE, GSM7_MULTI = 160, 153
UCS2_SINGLE, UCS2_MULTI = 70, 67


@dataclass(frozen=True)
class Segments:
    """How a body travels: its encoding, its length in units (septets or UTF-16 units), segments."""

    encoding: Literal["GSM-7", "UCS-2"]
    units: int
    count: int


def is_gsm7(text: str) -> bool:
    """True when every character is in the GSM-7 default alphabet or its extension table."""
    return all(ch in GSM7_BASIC or ch in GSM7_EXTENSION for ch in text)


def _pack(sizes: list[int], single: int, multi: int) -> int:
    """Segments needed for characters of `sizes` units, never splitting one character."""
    total = sum(sizes)
    if total <= single:
        return 1 if total else 0
    count, used = 1, 0
    for size in sizes:
        if used + size > multi:
            count, used = count + 1, 0
        used += size
    return count


def sms_segments(text: str) -> Segments:
    """Segments of an SMS body as carriers count them.

    GSM-7 when every character fits (extension characters such as `€` or `[` take two septets);
    otherwise UCS-2 (characters beyond the BMP, like most emoji, take two units). One segment
    holds 160 septets / 70 units; a longer body is split into 153 / 67 per segment (the rest
    is the concatenation header), and a character is never split across two segments.
    """
    if is_gsm7(text):
        sizes = [2 if ch in GSM7_EXTENSION else 1 for ch in text]
        return Segments("GSM-7", sum(sizes), _pack(sizes, GSM7_SINGLE, GSM7_MULTI))
    sizes = [2 if ord(ch) > 0xFFFF else 1 for ch in text]
    return Segments("UCS-2", sum(sizes), _pack(sizes, UCS2_SINGLE, UCS2_MULTI))


# --- errors --------------------------------------------------------------------------------------

ERROR_TITLES: dict[int, str] = {
    20003: "Authenticate",
    20404: "The requested resource was not found",
    20429: "Too Many Requests",
    20500: "An internal server error has occurred",
    20503: "Service unavailable",
    21211: "Invalid 'To' Phone Number",
    21266: "'To' and 'From' number cannot be the same",
    21408: "Permission to send an SMS has not been enabled for the region indicated by the 'To' number",
    21602: "Message body is required",
    21603: "'From' phone number is required",
    21604: "'To' phone number is required",
    21606: "The 'From' phone number provided is not a valid message-capable Twilio phone number",
    21610: "Attempt to send to unsubscribed recipient",
    21611: "This 'From' number has exceeded the maximum number of queued messages",
    21614: "'To' number is not a valid mobile number",
    21617: "The concatenated message body exceeds the 1600 character limit",
    21620: "Invalid media URL(s)",
    21623: "Number of media files exceeds allowed limit",
    21701: "The Messaging Service Sid is invalid",
    30001: "Queue overflow",
    30002: "Account suspended",
    30003: "Unreachable destination handset",
    30004: "Message blocked",
    30005: "Unknown destination handset",
    30006: "Landline or unreachable carrier",
    30007: "Message filtered",
    30008: "Unknown error",
    32017: "Carrier blocked call due to calling number (caller ID) being unregistered",
    63016: "Failed to send freeform message because you are outside the allowed window",
    63018: "Rate limit exceeded for Channel",
}


def more_info(code: int) -> str:
    """Twilio's documentation link for an error code (the `more_info` field)."""
    return f"https://www.twilio.com/docs/errors/{code}"
