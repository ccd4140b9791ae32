"""Handoff logic on decoded messages: mint codes, build deep links, redeem codes atomically.

Nothing here knows NATS: the codes live behind a `KvStore` (compare-and-set), integrations come
from a lookup function, the clock is injectable. `app.py` wires the real ones.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import msgspec

from shared.http import ERROR_CODES
from shared.messages.handoff import (
    CODE_PATTERN,
    VISIBLE_CODE_ALPHABET,
    VISIBLE_CODE_CHANNELS,
    VISIBLE_CODE_LENGTH,
    VISIBLE_CODE_PREFIX,
    CodeRedeemed,
    CodeRefused,
    HandoffError,
    HandoffMessage,
    IssueLinks,
    LinkRequest,
    LinksIssued,
    RedeemCode,
    RefusalReason,
    customer_text,
    is_visible_code,
)
from shared.records import IntegrationRecord
from shared.telemetry import log_fields

from .config import HandoffConfig
from .store import (
    ATTEMPTS_DECODER,
    CODE_DECODER,
    CODE_ENCODER,
    CodeRecord,
    KvStore,
    SenderAttempts,
    attempts_key,
    qr_key,
)

log = logging.getLogger(__name__)

# Integration types a conversation can be handed off to.
LINKABLE_TYPES = frozenset({"whatsapp", "twilio", "messenger", "telegram", "android", "ios", "web", "mailgun"})
INVISIBLE_CODE_BYTES = 18  # 144 bits, 24 characters of token_urlsafe
MAX_TARGETS = 20
MAX_ID_LENGTH = 256
# Compare-and-set rounds before giving up (each lost round means another writer made progress).
MAX_CAS_ROUNDS = 100
# Creating a code that already exists (only plausible for the 40-bit codes) mints another.
MAX_MINT_TRIES = 8
DEFAULT_BUSINESS_NAME = "us"
MAX_BUSINESS_NAME = 60
OPEN_PATH = "/handoff/v1/open"
QR_PATH_PREFIX = "/handoff/v1/qr/"

_GET_NEW = "Go back to the chat where you started and tap “Continue on …” again to get a new one."
REFUSAL_MESSAGES: dict[RefusalReason, str] = {
    "unknown": "This code isn't valid. " + _GET_NEW,
    "expired": "This link has expired. " + _GET_NEW,
    "used": "This link has already been used. " + _GET_NEW,
    "repeated": "",  # never said: the sender is linked already
    "wrong_channel": "This link was made for a different channel, so nothing was linked here. " + _GET_NEW,
    # Same wording as unknown: a code of another business must not be confirmed as existing.
    "foreign": "This code isn't valid here. " + _GET_NEW,
    "rate_limited": "Too many attempts with codes that didn't work. Please wait 15 minutes, then go back to the "
                    "chat where you started and tap “Continue on …” again.",
}

IntegrationLookup = Callable[[str], Awaitable[IntegrationRecord | None]]
BusinessNameLookup = Callable[[str], str]


class LinkError(Exception):
    """A link request that cannot be served (`status` is the HTTP status to answer with)."""

    def __init__(self, status: int, title: str) -> None:
        super().__init__(title)
        self.status = status
        self.title = title


def handoff_error(status: int, title: str) -> HandoffError:
    """A HandoffError with the SunCo error code of `status`."""
    return HandoffError(status=status, code=ERROR_CODES.get(status, "error"), title=title)


def refused(reason: RefusalReason) -> CodeRefused:
    """A refusal with its customer-facing message."""
    return CodeRefused(reason=reason, message=REFUSAL_MESSAGES[reason])


def code_prefix(code: str) -> str:
    """What logs may show of a code (never the whole code)."""
    return code[:4]


def mint_code(integration_type: str) -> str:
    """A fresh code: a short `TL…` code where the customer sees it, 144 random bits elsewhere."""
    if integration_type in VISIBLE_CODE_CHANNELS:
        return VISIBLE_CODE_PREFIX + "".join(secrets.choice(VISIBLE_CODE_ALPHABET) for _ in range(VISIBLE_CODE_LENGTH))
    return secrets.token_urlsafe(INVISIBLE_CODE_BYTES)


def normalize_code(code: str) -> str:
    """Visible codes are case-insensitive (customers retype them); invisible ones are exact."""
    return code.upper() if is_visible_code(code) else code


def with_query(url: str, name: str, value: str) -> str:
    """`url` with `name=value` set in its query (other parameters and the fragment kept)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise LinkError(400, f"{url[:100]!r} is not an http(s) URL")
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != name]
    query.append((name, value))
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", urlencode(query), parts.fragment))


def business_name_of(app_id: str, integrations: Iterable[Any]) -> str:
    """The app's name for customers: its web integration's `businessName`, else "us"."""
    for record in integrations:
        if isinstance(record, IntegrationRecord) and record.app_id == app_id and record.type == "web":
            name = record.config.get("businessName")
            if isinstance(name, str) and name.strip():
                return name.strip()[:MAX_BUSINESS_NAME]
    return DEFAULT_BUSINESS_NAME


def deep_link(record: IntegrationRecord, code: str, *, business_name: str, public_base_url: str,
              sandbox: bool) -> str:
    """The URL that carries `code` to the channel of `record` (raises LinkError when it cannot)."""
    cfg = record.config
    kind = record.type
    if kind == "whatsapp":
        digits = re.sub(r"\D", "", str(cfg.get("phoneNumber") or ""))
        if not digits:
            raise LinkError(400, "Set phoneNumber on the WhatsApp integration to hand conversations off to it")
        return f"https://wa.me/{digits}?text={quote(customer_text(business_name, code), safe='')}"
    if kind == "messenger":
        page = str(cfg.get("pageId") or "")
        if not page:
            raise LinkError(400, "Set pageId on the Messenger integration to hand conversations off to it")
        return f"https://m.me/{quote(page, safe='')}?ref={code}"
    if kind == "telegram":
        username = str(cfg.get("username") or "").lstrip("@")
        if not username:
            raise LinkError(400, "Set username (the bot's) on the Telegram integration to hand conversations off to it")
        return f"https://t.me/{quote(username, safe='')}?start={code}"
    if kind == "twilio":
        digits = re.sub(r"\D", "", str(cfg.get("phoneNumber") or ""))
        if not digits:
            raise LinkError(400, "Set phoneNumber on the SMS integration to hand conversations off to it")
        # `?body=` works on Android and iOS alike (`&body=` is an iOS-only quirk).
        return f"sms:+{digits}?body={quote(customer_text(business_name, code), safe='')}"
    if kind == "mailgun":
        address = str(cfg.get("incomingAddress") or "").strip()
        if "@" not in address:
            raise LinkError(400, "Set incomingAddress on the e-mail integration to hand conversations off to it")
        subject = quote(f"Continue my conversation with {business_name}", safe="")
        body = quote(customer_text(business_name, code), safe="")
        return f"mailto:{quote(address, safe='@')}?subject={subject}&body={body}"
    if kind in ("android", "ios"):
        universal = cfg.get("universalLink")
        base = universal if isinstance(universal, str) and universal else public_base_url + OPEN_PATH
        return with_query(base, "code", code)
    if kind == "web":
        link = cfg.get("linkUrl")
        if not (isinstance(link, str) and link):
            if not sandbox:
                raise LinkError(400, "Set linkUrl on the web integration (the page that hosts the web messenger)")
            link = public_base_url + "/sandbox/"
        return with_query(link, "threadline_code", code)
    raise LinkError(400, f"Integrations of type {kind} cannot take a handoff")


def _valid_id(value: str) -> bool:
    return 0 < len(value) <= MAX_ID_LENGTH


class HandoffHandlers:
    """Issue and redeem link codes."""

    def __init__(self, store: KvStore, config: HandoffConfig, lookup_integration: IntegrationLookup,
                 business_name: BusinessNameLookup, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.config = config
        self.lookup_integration = lookup_integration
        self.business_name = business_name
        self.clock = clock

    async def handle(self, request: HandoffMessage) -> HandoffMessage:
        """Answer one request of the handoff family."""
        if isinstance(request, IssueLinks):
            return await self.issue(request)
        if isinstance(request, RedeemCode):
            return await self.redeem(request)
        return handoff_error(400, f"{type(request).__name__} is not a request")

    # --- issuing ---------------------------------------------------------------------------

    async def issue(self, request: IssueLinks) -> LinksIssued | HandoffError:
        """Mint one code per target integration, bound to (app, user, conversation, integration)."""
        if not all(_valid_id(v) for v in (request.app_id, request.user_id, request.conversation_id)):
            return handoff_error(400, "appId, userId and conversationId are required")
        targets = list(dict.fromkeys(request.integration_ids))
        if not targets:
            return handoff_error(400, "integrationIds must name at least one integration")
        if len(targets) > MAX_TARGETS:
            return handoff_error(400, f"integrationIds may name at most {MAX_TARGETS} integrations")
        records: list[IntegrationRecord] = []
        for integration_id in targets:
            record = await self.lookup_integration(integration_id) if _valid_id(integration_id) else None
            if record is None or record.app_id != request.app_id or record.status != "active":
                return handoff_error(404, f"Integration {integration_id[:64]} not found")
            if record.type not in LINKABLE_TYPES:
                return handoff_error(400, f"Integrations of type {record.type} cannot take a handoff")
            records.append(record)
        business = self.business_name(request.app_id)
        # Every link is built before any code is stored, so a refusal leaves nothing behind.
        try:
            for record in records:
                self._link(record, mint_code(record.type), business)
        except LinkError as exc:
            return handoff_error(exc.status, exc.title)
        try:
            links = await asyncio.gather(*(self._issue_one(request, record, business) for record in records))
        except LinkError as exc:
            return handoff_error(exc.status, exc.title)
        return LinksIssued(links=list(links))

    def _link(self, record: IntegrationRecord, code: str, business: str) -> str:
        return deep_link(record, code, business_name=business, public_base_url=self.config.common.public_base_url,
                         sandbox=self.config.common.sandbox)

    async def _issue_one(self, request: IssueLinks, record: IntegrationRecord, business: str) -> LinkRequest:
        now = self.clock()
        expires_at = now + self.config.code_ttl_seconds
        for _ in range(MAX_MINT_TRIES):
            code = mint_code(record.type)
            url = self._link(record, code, business)
            stored = CodeRecord(
                app_id=request.app_id, user_id=request.user_id, conversation_id=request.conversation_id,
                integration_id=record.id, integration_type=record.type,
                source_integration_id=request.source_integration_id, created_at=now, expires_at=expires_at, url=url,
            )
            if await self.store.create(code, CODE_ENCODER.encode(stored)):
                break
        else:
            raise LinkError(503, "Could not mint a unique code, try again")
        qr_id = code
        if record.type in VISIBLE_CODE_CHANNELS:
            # A short code must not be guessable through the QR endpoint (which has no attempt
            # limit): its QR URL names a 144-bit token that points at the code instead.
            qr_id = secrets.token_urlsafe(INVISIBLE_CODE_BYTES)
            if not await self.store.create(qr_key(qr_id), code.encode()):
                raise LinkError(503, "Could not mint a unique code, try again")
        log.info("link code issued", extra=log_fields(
            code_prefix=code_prefix(code), app_id=request.app_id, conversation_id=request.conversation_id,
            integration_id=record.id, integration_type=record.type))
        return LinkRequest(integration_id=record.id, type=record.type, code=code, url=url,
                           qr_code_url=f"{self.config.common.public_base_url}{QR_PATH_PREFIX}{qr_id}.svg",
                           expires_at=expires_at)

    # --- redeeming -------------------------------------------------------------------------

    async def redeem(self, request: RedeemCode) -> CodeRedeemed | CodeRefused | HandoffError:
        """Redeem a code once: the first valid redemption links, every other one is refused."""
        if not all(_valid_id(v) for v in (request.app_id, request.integration_id, request.channel_user_id)):
            return handoff_error(400, "appId, integrationId and channelUserId are required")
        sender = attempts_key(request.app_id, request.integration_id, request.channel_user_id)
        attempt_id = await self._reserve_attempt(sender)
        if attempt_id is None:
            log.info("code refused", extra=log_fields(
                reason="rate_limited", code_prefix=code_prefix(request.code), app_id=request.app_id,
                integration_id=request.integration_id))
            return refused("rate_limited")
        code = normalize_code(request.code)
        outcome = await self._redeem(code, request) if CODE_PATTERN.match(code) else refused("unknown")
        if isinstance(outcome, CodeRedeemed):
            # Only failures count against the sender: a success gives its attempt back.
            await self._release_attempt(sender, attempt_id)
            log.info("code redeemed", extra=log_fields(
                code_prefix=code_prefix(code), app_id=request.app_id, conversation_id=outcome.conversation_id,
                integration_id=request.integration_id))
        elif isinstance(outcome, CodeRefused):
            log.info("code refused", extra=log_fields(
                reason=outcome.reason, code_prefix=code_prefix(code), app_id=request.app_id,
                integration_id=request.integration_id))
        return outcome

    async def _redeem(self, code: str, request: RedeemCode) -> CodeRedeemed | CodeRefused | HandoffError:
        for _ in range(MAX_CAS_ROUNDS):
            entry = await self.store.get(code)
            if entry is None:
                return refused("unknown")
            try:
                record = CODE_DECODER.decode(entry.value)
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.error("undecodable link code record", extra=log_fields(code_prefix=code_prefix(code)))
                return refused("unknown")
            now = self.clock()
            failure: RefusalReason | None = None
            if record.app_id != request.app_id:
                failure = "foreign"
            elif record.used_at is not None:
                repeated = (record.used_by == request.channel_user_id
                            and record.integration_id == request.integration_id)
                return refused("repeated" if repeated else "used")
            elif record.failed_attempts >= self.config.max_code_failures or now >= record.expires_at:
                # A burned code reads like an expired one: the customer needs a new link either way.
                return refused("expired")
            elif record.integration_id != request.integration_id:
                failure = "wrong_channel"
            if failure is not None:
                counted = msgspec.structs.replace(record, failed_attempts=record.failed_attempts + 1)
                if await self.store.update(code, CODE_ENCODER.encode(counted), entry.revision):
                    return refused(failure)
                continue  # another attempt wrote first: decide again on what it wrote
            used = msgspec.structs.replace(record, used_at=now, used_by=request.channel_user_id)
            if await self.store.update(code, CODE_ENCODER.encode(used), entry.revision):
                return CodeRedeemed(app_id=record.app_id, user_id=record.user_id,
                                    conversation_id=record.conversation_id, integration_id=record.integration_id,
                                    source_integration_id=record.source_integration_id)
            # A concurrent redemption (maybe on another replica) wrote first: re-read, it is used now.
        return handoff_error(503, "The code is busy, try again")

    async def _reserve_attempt(self, key: str) -> str | None:
        """Record an attempt for the sender before looking at the code; None when over the limit.

        Counting before the lookup means concurrent guesses cannot all slip under the limit.
        """
        attempt_id = secrets.token_hex(6)
        for _ in range(MAX_CAS_ROUNDS):
            now = self.clock()
            entry = await self.store.get(key)
            recent = [a for a in self._attempts(entry.value if entry else None)
                      if a[1] > now - self.config.sender_window_seconds]
            if len(recent) >= self.config.max_sender_failures:
                return None
            value = CODE_ENCODER.encode(SenderAttempts(attempts=[*recent, (attempt_id, now)]))
            ok = (await self.store.update(key, value, entry.revision) if entry is not None
                  else await self.store.create(key, value))
            if ok:
                return attempt_id
        return None  # fail closed: a sender this busy is treated as over the limit

    async def _release_attempt(self, key: str, attempt_id: str) -> None:
        for _ in range(MAX_CAS_ROUNDS):
            entry = await self.store.get(key)
            if entry is None:
                return
            attempts = self._attempts(entry.value)
            kept = [a for a in attempts if a[0] != attempt_id]
            if len(kept) == len(attempts):
                return
            if await self.store.update(key, CODE_ENCODER.encode(SenderAttempts(attempts=kept)), entry.revision):
                return

    @staticmethod
    def _attempts(value: bytes | None) -> list[tuple[str, float]]:
        if not value:
            return []
        try:
            return ATTEMPTS_DECODER.decode(value).attempts
        except (msgspec.DecodeError, msgspec.ValidationError):
            return []

    # --- QR codes --------------------------------------------------------------------------

    async def qr_target(self, qr_id: str) -> str | None:
        """The URL a QR code shows, or None for anything not redeemable (which reason stays hidden)."""
        if not CODE_PATTERN.match(qr_id) or is_visible_code(qr_id):
            return None
        record = await self._record(qr_id)
        if record is None or record.integration_type in VISIBLE_CODE_CHANNELS:
            pointer = await self.store.get(qr_key(qr_id))
            code = pointer.value.decode("utf-8", "replace") if pointer is not None else ""
            record = await self._record(code) if CODE_PATTERN.match(code) else None
            if record is None or record.integration_type not in VISIBLE_CODE_CHANNELS:
                return None
        if (record.used_at is not None or record.failed_attempts >= self.config.max_code_failures
                or self.clock() >= record.expires_at):
            return None
        return record.url

    async def _record(self, code: str) -> CodeRecord | None:
        entry = await self.store.get(code)
        if entry is None:
            return None
        try:
            return CODE_DECODER.decode(entry.value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
