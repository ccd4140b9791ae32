"""The business's context panel: a URL the desk calls with the customer, whose JSON answer the desk
shows as cards beside the conversation (customer value, orders, open cases…).

The call: `GET <contextUrl>?appId=…&userId=…&externalId=…&conversationId=…`, through the egress
policy (a URL a business sets never reaches an internal address), no redirects, 3 s, at most
64 KiB of answer. It is signed so the business can tell it is the desk asking:
`X-Threadline-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<appId>.<userId>")>`,
the secret shown to the app's admins in the desk (sealed at rest). Refuse a `t` more than five
minutes old.

The answer: `{"cards": [{"title": "…", "fields": [{"label": "…", "value": "…"}], "url": "https://…"}]}`
(at most 10 cards of 20 fields; text is cut to its bounds, a `url` that is not https is dropped).
Anything else, a timeout or an error status is shown as "context unavailable": the conversation
never waits on the business's server.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from typing import Any

import aiohttp
import msgspec

from shared.egress import EgressRefused, EgressSession
from shared.untrusted import decode_json

log = logging.getLogger(__name__)

CONTEXT_TIMEOUT = aiohttp.ClientTimeout(total=3.0)
MAX_ANSWER_BYTES = 64 * 1024
MAX_CARDS = 10
MAX_FIELDS = 20
MAX_TEXT = 200
SIGNATURE_HEADER = "X-Threadline-Signature"


class Field(msgspec.Struct, kw_only=True):
    label: str
    value: str | int | float | bool | None = None


class Card(msgspec.Struct, kw_only=True):
    title: str
    fields: list[Field] = []
    url: str | None = None


class ContextAnswer(msgspec.Struct, kw_only=True):
    cards: list[Card] = []


def signature(secret: str, at: int, app_id: str, user_id: str) -> str:
    """The `X-Threadline-Signature` value of a call made at `at`."""
    digest = hmac.new(secret.encode(), f"{at}.{app_id}.{user_id}".encode(), hashlib.sha256).hexdigest()
    return f"t={at},v1={digest}"


def _text(value: Any) -> str:
    return ("" if value is None else str(value))[:MAX_TEXT]


def cards_out(answer: ContextAnswer) -> list[dict[str, Any]]:
    """The cards as the desk shows them: bounded, plain text, https links only."""
    return [{"title": _text(card.title),
             "fields": [{"label": _text(field.label), "value": _text(field.value)}
                        for field in card.fields[:MAX_FIELDS]],
             "url": card.url if card.url and card.url.startswith("https://") and len(card.url) <= 2048 else None}
            for card in answer.cards[:MAX_CARDS]]


async def fetch_cards(session: EgressSession, url: str, secret: str, *, app_id: str, user_id: str,
                      external_id: str | None, conversation_id: str) -> tuple[list[dict[str, Any]], str | None]:
    """The business's cards for this customer, or ([], why not)."""
    at = int(time.time())
    params = {"appId": app_id, "userId": user_id, "conversationId": conversation_id}
    if external_id:
        params["externalId"] = external_id
    try:
        async with session.get(url, params=params, allow_redirects=False, timeout=CONTEXT_TIMEOUT,
                               headers={SIGNATURE_HEADER: signature(secret, at, app_id, user_id),
                                        "Accept": "application/json"}) as resp:
            if resp.status != 200:
                return [], f"the context service answered {resp.status}"
            raw = await resp.content.read(MAX_ANSWER_BYTES + 1)
    except EgressRefused as exc:
        return [], f"the context URL is refused: {exc}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.info("context panel of app %s unavailable: %s", app_id, type(exc).__name__)
        return [], "the context service did not answer in time"
    if len(raw) > MAX_ANSWER_BYTES:
        return [], "the context service's answer is too large"
    try:
        return cards_out(decode_json(raw, ContextAnswer)), None
    except (msgspec.ValidationError, msgspec.DecodeError):
        return [], "the context service's answer is not cards"
