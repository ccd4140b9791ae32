"""The `handoff` family: request/reply with the `handoff` service (link codes for channel transfer).

A link request binds a code to (app, user, conversation, target integration). Where the code
travels invisibly (Messenger `ref`, Telegram `start`, app and web links) it is 144 random bits;
where the customer sees it in a prefilled message (WhatsApp, SMS) it is a short `TL…` code whose
redemption is attempt-limited per sender and per code.

A customer's text is a redemption only when it is the handoff's own prefilled message
(`customer_text`) or a code alone (`redemption_code`): "My tracking number is TL12345678" is the
customer's message, never a code to redeem.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

from shared.ids import iso

# Channels where the code rides in a message the customer sends (and could edit or type).
VISIBLE_CODE_CHANNELS = frozenset({"whatsapp", "twilio", "mailgun"})
# "TL" + 8 characters of Crockford's base32 (no I, L, O, U): 40 bits, readable aloud.
VISIBLE_CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
VISIBLE_CODE_PREFIX = "TL"
VISIBLE_CODE_LENGTH = 8  # 40 bits of Crockford base32
_VISIBLE_CODE = "TL[0-9A-HJKMNP-TV-Z]{8}"
_VISIBLE_CODE_FULL = re.compile(rf"^{_VISIBLE_CODE}$")
# What `customer_text` produces, as a customer's app may send it back: any business name, the
# dash possibly replaced, spacing and letter case changed, a closing full stop added.
_PREFILLED = re.compile(rf"^CONTINUE MY CONVERSATION WITH .{{1,120}}? [—–-]{{1,2}} CODE:? ({_VISIBLE_CODE})[.!]?$")
_CODE_ALONE = re.compile(rf"^(?:CODE:? )?({_VISIBLE_CODE})[.!]?$")
# Every code fits Telegram's `start` (≤ 64 chars of [A-Za-z0-9_-]) and Messenger's `ref`.
CODE_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_REDEMPTION_TEXT = 300


def customer_text(business_name: str, code: str) -> str:
    """The prefilled message that carries a visible code (WhatsApp `text=`, SMS `body=`, an
    e-mail's body)."""
    return f"Continue my conversation with {business_name} — code {code}"


def is_visible_code(code: str) -> bool:
    """Whether `code` has the shape of a customer-visible `TL…` code (any letter case)."""
    return bool(_VISIBLE_CODE_FULL.match(code.upper()))


def redemption_code(text: str) -> str | None:
    """The `TL…` code a customer's text asks to redeem: only the prefilled handoff message or a
    code on its own are redemptions; a code inside any other text is just part of the message."""
    if len(text) > MAX_REDEMPTION_TEXT:
        return None
    normalized = " ".join(text.split()).upper()
    match = _CODE_ALONE.match(normalized) or _PREFILLED.match(normalized)
    return match.group(1) if match else None


class HandoffMessage(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
    """Base of the handoff family."""


class IssueLinks(HandoffMessage, tag="handoff.issue", kw_only=True):
    """Mint one link request per target integration for the user's conversation."""

    app_id: str
    user_id: str
    conversation_id: str
    integration_ids: list[str]
    # Where the customer asked from (the web or app integration, or a channel), for the recap.
    source_integration_id: str | None = None


class LinkRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One deep link (SunCo's `linkRequests[]` item plus Threadline's `qrCodeUrl`, `expiresAt`)."""

    integration_id: str
    type: str
    code: str
    url: str
    qr_code_url: str
    expires_at: float


class LinksIssued(HandoffMessage, tag="handoff.issued", kw_only=True):
    links: list[LinkRequest]


class RedeemCode(HandoffMessage, tag="handoff.redeem", kw_only=True):
    """A code arrived on `integration_id` from `channel_user_id`: redeem it (once, atomically)."""

    app_id: str
    integration_id: str
    channel: str
    channel_user_id: str
    code: str


class CodeRedeemed(HandoffMessage, tag="handoff.redeemed", kw_only=True):
    """The code was valid and is now used: link this sender to the user's conversation."""

    app_id: str
    user_id: str
    conversation_id: str
    integration_id: str
    source_integration_id: str | None = None


# `repeated`: the sender who redeemed the code sent it again (a second tap, a platform's pending
# copies): nothing to link, nothing to say, nothing to store.
RefusalReason = Literal["unknown", "expired", "used", "repeated", "wrong_channel", "foreign", "rate_limited"]


class CodeRefused(HandoffMessage, tag="handoff.refused", kw_only=True):
    """Nothing is linked; `message` is the customer-facing text to answer on the channel."""

    reason: RefusalReason
    message: str


class HandoffError(HandoffMessage, tag="handoff.error", kw_only=True):
    """A refused request: `status` is the HTTP status the API should answer with."""

    status: int
    code: str
    title: str


HandoffUnion = IssueLinks | LinksIssued | RedeemCode | CodeRedeemed | CodeRefused | HandoffError

ENCODER = msgspec.json.Encoder()
DECODER: msgspec.json.Decoder[HandoffUnion] = msgspec.json.Decoder(HandoffUnion)


def encode(message: HandoffMessage) -> bytes:
    """Encode a handoff-family message."""
    return ENCODER.encode(message)


def decode(data: bytes) -> HandoffUnion:
    """Decode a handoff-family message."""
    return DECODER.decode(data)


def link_request_wire(link: LinkRequest) -> dict[str, Any]:
    """A link request as the business API shows it (camelCase, ISO `expiresAt`)."""
    return {"integrationId": link.integration_id, "type": link.type, "code": link.code, "url": link.url,
            "qrCodeUrl": link.qr_code_url, "expiresAt": iso(link.expires_at)}
