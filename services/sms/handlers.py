"""Twilio Programmable Messaging logic on decoded values: webhook forms, statuses, send forms, errors.

Nothing here touches NATS or HTTP; `app.py` wires it. Wire formats follow the platform reference
§5 (inbound webhook, `X-Twilio-Signature`, status callbacks, Messages.json, error envelope).
The channel (and SunCo client/integration type) is `twilio`; the service is named `sms`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import msgspec

from shared import outbound, render
from shared.ingress import WebhookShapeError
from shared.messages.channel import DeliveryState, DeliveryStatus, InboundMessage, OutboundSend, Postback
from shared.outbound import CodedSendFailure
from shared.ratelimit import TokenBucket
from shared.records import IntegrationRecord
from shared.sunco import (
    Content,
    FileContent,
    FormResponseContent,
    ImageContent,
    LocationContent,
    LocationCoordinates,
    TextContent,
    UnsupportedContent,
)
from shared.twilio_wire import API_VERSION, ERROR_TITLES, MAX_BODY_CHARS, MAX_MEDIA, sms_segments
from shared.untrusted import decode_json

CHANNEL = "twilio"
MAX_WEBHOOK_BODY = 64 * 1024
MAX_FORM_FIELDS = 200
DEFAULT_BASE_URL = "https://api.twilio.com"

_SID_RE = re.compile(r"^[A-Z]{2}[0-9a-fA-F]{32}$")
_ADDRESS_RE = re.compile(r"^[^\s]{1,64}$")

Form = list[tuple[str, str]]


# --- integration credentials -------------------------------------------------------------------

@dataclass(frozen=True)
class Credentials:
    """The fields of a twilio integration record the service needs."""

    integration_id: str
    app_id: str
    account_sid: str
    auth_token: str
    phone_number: str
    messaging_service_sid: str
    base_url: str
    # The exact public URLs Twilio requests (and signs): the inbound webhook the operator
    # configured, and the status callback the gateway gives with every send.
    webhook_url: str
    status_url: str
    segments_per_second: float | None = None
    # Whether the number sends MMS (config `mms`, default true): where it does not, an image or
    # a file goes as a link in the text.
    mms: bool = True

    @classmethod
    def from_record(cls, record: IntegrationRecord, public_base_url: str) -> Credentials | None:
        """Credentials of a usable twilio integration, or None (wrong type, inactive, incomplete)."""
        if record.type != CHANNEL or record.status not in ("active", ""):
            return None
        cfg = record.config
        account_sid, auth_token = cfg.get("accountSid"), cfg.get("authToken")
        phone_number = cfg.get("phoneNumber") if isinstance(cfg.get("phoneNumber"), str) else ""
        service_sid = cfg.get("messagingServiceSid") if isinstance(cfg.get("messagingServiceSid"), str) else ""
        if not (isinstance(account_sid, str) and account_sid and isinstance(auth_token, str) and auth_token):
            return None
        if not (phone_number or service_sid):
            return None
        public = public_base_url.rstrip("/")
        webhook_url = cfg.get("webhookUrl")
        status_url = cfg.get("statusCallbackUrl")
        rate = cfg.get("segmentsPerSecond")
        return cls(
            integration_id=record.id,
            app_id=record.app_id,
            account_sid=account_sid,
            auth_token=auth_token,
            phone_number=str(phone_number or ""),
            messaging_service_sid=str(service_sid or ""),
            base_url=str(cfg.get("baseUrl") or DEFAULT_BASE_URL).rstrip("/"),
            webhook_url=webhook_url if isinstance(webhook_url, str) and webhook_url
            else f"{public}/webhooks/twilio/{record.id}",
            status_url=status_url if isinstance(status_url, str) and status_url
            else f"{public}/webhooks/twilio/{record.id}/status",
            segments_per_second=float(rate) if isinstance(rate, int | float) and rate > 0 else None,
            mms=cfg.get("mms") is not False,
        )

    @property
    def messages_url(self) -> str:
        """The Messages.json endpoint of this account."""
        return f"{self.base_url}/{API_VERSION}/Accounts/{self.account_sid}/Messages.json"

    @property
    def sender_key(self) -> str:
        """What throughput is counted against: the Messaging Service, else the long code."""
        return self.messaging_service_sid or self.phone_number


# --- webhook forms -------------------------------------------------------------------------------

def parse_form(raw: bytes) -> Form:
    """The (name, value) pairs of a form-encoded body, in order (raises WebhookShapeError)."""
    try:
        text = raw.decode("utf-8")
        return parse_qsl(text, keep_blank_values=True, strict_parsing=False, encoding="utf-8",
                         errors="strict", max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError) as exc:
        raise WebhookShapeError(f"not a form-encoded body: {exc}") from exc


def form_dict(form: Form) -> dict[str, Any]:
    """The form as a dict (a repeated name's values as a list), for `raw` fields and logs."""
    out: dict[str, Any] = {}
    for name, value in form:
        if name in out:
            previous = out[name]
            out[name] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            out[name] = value
    return out


def _first(form: Form, name: str) -> str | None:
    return next((value for key, value in form if key == name), None)


def _sid(form: Form, *names: str) -> str:
    for name in names:
        value = _first(form, name)
        if value:
            if not _SID_RE.match(value):
                raise WebhookShapeError(f"{name} is not a Twilio SID")
            return value
    raise WebhookShapeError(f"{names[0]} is required")


def _check_account(form: Form, creds: Credentials) -> None:
    account = _first(form, "AccountSid")
    if account is not None and account != creds.account_sid:
        raise WebhookShapeError("AccountSid does not match the integration")


def normalize_inbound(form: Form, creds: Credentials, received_at: float | None = None) -> list[InboundMessage]:
    """The messages of a verified inbound webhook (an MMS with several media gives several).

    The text rides on the first message (as the caption of its media, if any); each further
    media item becomes its own message with provider id `<MessageSid>/<index>`.
    """
    _check_account(form, creds)
    sid = _sid(form, "MessageSid", "SmsMessageSid", "SmsSid")
    sender = _first(form, "From") or ""
    if not _ADDRESS_RE.match(sender):
        raise WebhookShapeError("From is required")
    body = _first(form, "Body") or ""
    if len(body) > 10 * MAX_BODY_CHARS:
        raise WebhookShapeError("Body is too long")
    media = _media(form)
    at = time.time() if received_at is None else received_at
    raw = form_dict(form)
    client_info: dict[str, Any] = {"phone_number": sender}
    for name, key in (("To", "to"), ("FromCity", "city"), ("FromState", "state"), ("FromZip", "zip"),
                      ("FromCountry", "country"), ("WaId", "wa_id")):
        value = _first(form, name)
        if value:
            client_info[key] = value
    display_name = _first(form, "ProfileName") or None
    postback = None
    contents: list[Content]
    if media:
        contents = [_media_content(url, ctype, body if index == 0 else None) for index, (url, ctype) in
                    enumerate(media)]
    else:
        content, postback = _text_content(form, body)
        contents = [content]
    quoted = _first(form, "OriginalRepliedMessageSid") or None
    return [
        InboundMessage(
            app_id=creds.app_id, integration_id=creds.integration_id, channel=CHANNEL, client_type="twilio",
            channel_user_id=sender, provider_message_id=sid if index == 0 else f"{sid}/{index}",
            received_at=at, content=content, display_name=display_name, client_info=client_info,
            raw=raw if index == 0 else {"MessageSid": sid, "MediaIndex": index},
            postback=postback if index == 0 else None, quoted_provider_message_id=quoted if index == 0 else None,
        )
        for index, content in enumerate(contents)
    ]


def _media(form: Form) -> list[tuple[str, str]]:
    raw_count = _first(form, "NumMedia") or "0"
    if not raw_count.isdigit() or int(raw_count) > MAX_MEDIA:
        raise WebhookShapeError("NumMedia must be 0..10")
    media = []
    for index in range(int(raw_count)):
        url = _first(form, f"MediaUrl{index}") or ""
        if not url.startswith(("https://", "http://")):
            raise WebhookShapeError(f"MediaUrl{index} is missing or not a URL")
        media.append((url, _first(form, f"MediaContentType{index}") or "application/octet-stream"))
    return media


def _media_content(url: str, content_type: str, text: str | None) -> Content:
    if content_type.startswith("image/"):
        return ImageContent(media_url=url, media_type=content_type, text=text or None)
    return FileContent(media_url=url, media_type=content_type, text=text or None)


def _text_content(form: Form, body: str) -> tuple[Content, Postback | None]:
    payload = _first(form, "ButtonPayload")
    if payload:  # a WhatsApp-through-Twilio button tap
        label = _first(form, "ButtonText") or body
        return TextContent(text=label, payload=payload), Postback(payload=payload, text=label)
    latitude, longitude = _first(form, "Latitude"), _first(form, "Longitude")
    if latitude and longitude:
        try:
            lat, long = float(latitude), float(longitude)
        except ValueError as exc:
            raise WebhookShapeError("bad coordinates") from exc
        if not (math.isfinite(lat) and math.isfinite(long) and -90 <= lat <= 90 and -180 <= long <= 180):
            raise WebhookShapeError("bad coordinates")
        return LocationContent(coordinates=LocationCoordinates(lat=lat, long=long)), None
    if not body:
        return UnsupportedContent(channel_type="empty", raw=form_dict(form)), None
    return TextContent(text=body), None


_STATUS_MAP: dict[str, DeliveryState] = {
    "sent": "sent", "delivered": "delivered", "read": "read", "undelivered": "failed", "failed": "failed",
}


def normalize_status(form: Form, creds: Credentials, known: tuple[str, str] | None = None,
                     at: float | None = None) -> DeliveryStatus | None:
    """The DeliveryStatus of a verified status callback, or None for states the gateway does not
    track (queued, accepted, sending, …). `known` is (message_id, conversation_id) when this pod
    sent the message."""
    _check_account(form, creds)
    sid = _sid(form, "MessageSid", "SmsSid")
    raw_status = _first(form, "MessageStatus") or _first(form, "SmsStatus")
    if not raw_status:
        raise WebhookShapeError("MessageStatus is required")
    state = _STATUS_MAP.get(raw_status)
    if state is None:
        return None
    error_code = _first(form, "ErrorCode") or None
    if error_code is not None and not error_code.isdigit():
        raise WebhookShapeError("ErrorCode must be numeric")
    title = _first(form, "ErrorMessage") or None
    if error_code and not title:
        title = ERROR_TITLES.get(int(error_code), f"Twilio error {error_code}")
    if state == "failed" and not error_code:
        error_code, title = raw_status, f"Message {raw_status}"
    return DeliveryStatus(
        app_id=creds.app_id, integration_id=creds.integration_id, channel=CHANNEL, provider_message_id=sid,
        status=state, timestamp=time.time() if at is None else at,
        message_id=known[0] if known else None, conversation_id=known[1] if known else None,
        error_code=error_code if state == "failed" else None, error_title=title if state == "failed" else None,
        error_details=f"MessageStatus={raw_status}" if state == "failed" else None, raw=form_dict(form),
    )


def inbound_msg_id(message: InboundMessage) -> str:
    """JetStream de-duplication id of an inbound message (a Twilio retry must not be a second message)."""
    return f"{CHANNEL}:{message.provider_message_id}"


def status_msg_id(status: DeliveryStatus) -> str:
    """JetStream de-duplication id of a status callback."""
    return f"{CHANNEL}:{status.provider_message_id}:{status.status}"


# --- sending -------------------------------------------------------------------------------------

class UnsendableContent(outbound.UnsendableContent):
    """The content has no SMS/MMS representation (a permanent failure)."""


# Twilio sends a body of up to 1,600 characters as one message (the handset joins its segments).
# Counted in UTF-16 units, so that a character beyond the BMP (most emoji) can never push a part
# past Twilio's own count. A longer text goes as several messages, split between blocks, then
# lines, then words; never more than MAX_PARTS of them (the rest is cut, marked with "…").
MAX_PARTS = 10
_SEPARATORS = ("\n\n", "\n", " ")


def _units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _hard_split(text: str, limit: int) -> list[str]:
    out: list[str] = []
    current: list[str] = []
    used = 0
    for ch in text:
        size = _units(ch)
        if used + size > limit:
            out.append("".join(current))
            current, used = [], 0
        current.append(ch)
        used += size
    out.append("".join(current))
    return out


def _chunks(text: str, limit: int, separators: Sequence[str]) -> list[str]:
    """`text` in pieces of at most `limit` units, cut at the first separator that allows it (the
    separator at a cut is dropped: each piece is a message of its own)."""
    if _units(text) <= limit:
        return [text]
    if not separators:
        return _hard_split(text, limit)
    separator, finer = separators[0], separators[1:]
    out: list[str] = []
    current: str | None = None
    for piece in text.split(separator):
        for sub in _chunks(piece, limit, finer):
            if current is None:
                current = sub
            elif _units(current) + _units(separator) + _units(sub) <= limit:
                current += separator + sub
            else:
                out.append(current)
                current = sub
    if current is not None:
        out.append(current)
    return out


def split_body(text: str, limit: int = MAX_BODY_CHARS) -> list[str]:
    """The bodies of the messages that carry `text` (one when it fits in `limit` units)."""
    if _units(text) <= limit:
        return [text]
    parts = [p.strip() for p in _chunks(text, limit, _SEPARATORS)]
    parts = [p for p in parts if p]
    if len(parts) > MAX_PARTS:
        parts = parts[:MAX_PARTS]
        last = parts[-1]
        while _units(last) + 1 > limit:
            last = last[:-1]
        parts[-1] = last + "…"
    return parts


def render_content(content: Content, mms: bool = True) -> tuple[str, list[str]]:
    """The text and the media URLs that carry `content` by SMS/MMS (UnsendableContent if none).

    The text is `shared.render.fallback`'s: answerable actions numbered (`1. Yes`) exactly as
    the conversations service maps a customer's "1" back, links as `label: url`, carousel and
    list items as blocks (an item's image as a link beside its title), forms as questions. The
    media of an image or file go as MMS `MediaUrl`s, or as links first in the text on a number
    that sends no MMS (integration config `mms: false`). A formResponse is the customer's own
    answer, never sent to them; a template has no text form.
    """
    if isinstance(content, FormResponseContent):
        raise UnsendableContent("a formResponse is the customer's answer: it is never sent to them")
    if isinstance(content, ImageContent | FileContent) and not content.media_url:
        raise UnsendableContent(f"{content.__class__.__name__} without mediaUrl")
    try:
        rendered = render.fallback(content)
    except render.NoFallback as exc:
        raise UnsendableContent(f"{content.__class__.__name__} cannot be sent by SMS") from exc
    text, media = rendered.text, list(rendered.media_urls)
    if not mms and media:
        text = "\n\n".join(["\n".join(media), *([text] if text else [])])
        media = []
    if not text.strip() and not media:
        raise UnsendableContent(f"empty {content.__class__.__name__}")
    return text, media


def _head(send: OutboundSend, creds: Credentials) -> Form:
    form: Form = [("To", send.recipient), ("StatusCallback", creds.status_url)]
    if creds.messaging_service_sid:
        form.append(("MessagingServiceSid", creds.messaging_service_sid))
    else:
        sender = creds.phone_number
        if send.recipient.startswith("whatsapp:") and not sender.startswith("whatsapp:"):
            sender = f"whatsapp:{sender}"
        form.append(("From", sender))
    return form


def build_send_forms(send: OutboundSend, creds: Credentials) -> list[Form]:
    """The Messages.json forms that carry an outbound message, in order, each in the order
    twilio's SDK writes it (§5.4): one, or several when the text passes 1,600 characters (the
    media ride on the first; more than 10 on the next ones).

    `override["twilio"]["payload"]` (a dict of Messages.json parameters) replaces the content.
    """
    override = (send.override or {}).get("twilio")
    payload = override.get("payload") if isinstance(override, dict) else None
    if isinstance(payload, dict) and payload:
        form = _head(send, creds)
        taken = {"To", "StatusCallback"}
        for name, value in payload.items():
            if name in taken or not isinstance(name, str):
                continue
            values = value if isinstance(value, list) else [value]
            form += [(name, str(v)) for v in values if v is not None]
        return [form]
    text, media = render_content(send.content, creds.mms)
    bodies: list[str] = split_body(text) if text.strip() else []
    media_groups = [media[i:i + MAX_MEDIA] for i in range(0, len(media), MAX_MEDIA)]
    forms = []
    for index in range(max(len(bodies), len(media_groups))):
        form = _head(send, creds)
        if index < len(bodies):
            form.append(("Body", bodies[index]))
        if index < len(media_groups):
            form += [("MediaUrl", url) for url in media_groups[index]]
        forms.append(form)
    return forms


def send_cost(form: Sequence[tuple[str, str]]) -> int:
    """Throughput units a send uses: its body's segments (an MMS counts as one)."""
    if any(name == "MediaUrl" for name, _ in form):
        return 1
    body = next((value for name, value in form if name == "Body"), "")
    return max(1, sms_segments(body).count)


# Twilio codes worth retrying (platform reference §5.5, §8): concurrency limit, the sender's
# queue being full (it drains at the sender's rate), channel rate limit; plus any 5xx/429.
TRANSIENT_CODES = frozenset({20429, 20500, 20503, 21611, 63018})


class SendFailure(CodedSendFailure):
    """A send Twilio refused (or that never reached it)."""


def classify_error(http_status: int, body: bytes) -> SendFailure:
    """Turn a non-2xx Twilio answer (legacy `{code, message, more_info, status}` or RFC 9457
    `{type, title, status, code, detail}`) into a SendFailure, deciding whether a retry can help."""
    try:
        doc = decode_json(body)
    except msgspec.DecodeError:
        doc = None
    code: int | None = None
    title = f"HTTP {http_status}"
    details: str | None = None
    if isinstance(doc, dict):
        raw_code = doc.get("code")
        code = raw_code if isinstance(raw_code, int) and not isinstance(raw_code, bool) else None
        message = doc.get("message") or doc.get("title")
        if isinstance(message, str) and message:
            title = message
        extra = doc.get("detail") or doc.get("more_info")
        details = str(extra) if extra else None
    transient = code in TRANSIENT_CODES or http_status >= 500 or http_status == 429
    return SendFailure(http_status=http_status, code=code, title=title, details=details, transient=transient)


def parse_send_response(body: bytes) -> str:
    """The message SID from a 2xx Messages.json answer (the Message resource JSON)."""
    try:
        doc = decode_json(body)
        sid = doc["sid"]
    except (msgspec.DecodeError, KeyError, TypeError) as exc:
        raise SendFailure(http_status=201, code=None, title="unexpected send response", transient=True) from exc
    if not isinstance(sid, str) or not _SID_RE.match(sid):
        raise SendFailure(http_status=201, code=None, title="unexpected send response", transient=True)
    return sid


class SegmentBucket(TokenBucket):
    """A token bucket spent in segments: a 3-segment SMS takes 3 tokens.

    A send may take more tokens than the bucket holds (it goes into debt), so a long message
    goes out at once and the sender's next message waits for the debt to refill.
    """

    def reserve(self, cost: float, max_wait: float = math.inf) -> float | None:
        """Take `cost` tokens now and return how long to wait before sending (0: at once), or
        return None (taking nothing) when that wait would exceed `max_wait`."""
        self._refill()
        need = min(cost, self.burst)
        wait = 0.0 if self.tokens >= need else (need - self.tokens) / self.rate
        if wait > max_wait:
            return None
        self.tokens -= cost
        return wait
