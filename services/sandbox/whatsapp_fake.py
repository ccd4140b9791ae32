"""A wire-accurate fake of the WhatsApp Cloud API plus a scriptable customer phone.

`FakeWhatsApp` needs no NATS: register accounts with `add_account(...)`, mount its routes on an
aiohttp app (`routes(prefix)`), and it behaves like Meta towards a gateway:

- the Graph API (`{prefix}/graph/v{N}.0/...`): send messages (Bearer-checked, validated against
  Meta's required fields and limits — reply buttons, lists, CTA URL buttons, location requests,
  captions, text — and refused with Meta's error envelope, else answered exactly like Meta,
  §1.7.5), mark as read with or without the typing indicator, media lookup and download;
- signed webhooks (`X-Hub-Signature-256` over `json.dumps(payload, ensure_ascii=True)`) for
  customer messages and for `sent`/`delivered`/`read`/`failed` statuses, always in the BSUID-era
  superset shape (contacts with `wa_id` + `user_id`, contacts in statuses);
- scripting (`{prefix}/whatsapp/{integrationId}/...`): inbound messages (a photo or a document
  the phone uploaded, `{"upload": id}`, arrives as an `image` or `document` message whose media
  id the Graph media lookup and download resolve to its bytes), late statuses,
  injected send errors, the outbox and the whole thread per customer, with whether the business
  is typing (errors in SunCo's shape).

With a `store_path` the threads, customers and media survive a restart: every change is appended
to a JSON-lines file, replayed (and compacted) when the fake is created.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import time
import zlib
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from opentelemetry.trace import SpanKind

from services.sandbox.scripting import read_json_object, sunco_errors
from services.sandbox.uploads import MEDIA_RULES, Upload, Uploads, upload_in
from shared.http import ApiError
from shared.tasks import cancel_and_wait
from shared.telemetry import inject_headers, tracer
from shared.untrusted import decode_json, secrets_equal

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

SIGNATURE_HEADER = "X-Hub-Signature-256"
WINDOW_SECONDS = 24 * 3600
MAX_BODY = 1024 * 1024
_VERSION = r"{version:v\d+\.\d+}"

# code → (title, details) as Meta words them (platform reference §1.8).
ERRORS: dict[int, tuple[str, str]] = {
    0: ("AuthException", "We were unable to authenticate the app user."),
    4: ("Too many calls", "The app has reached its API call rate limit."),
    100: ("Invalid parameter", "Invalid parameter."),
    190: ("Invalid OAuth access token - Cannot parse access token", ""),
    80007: ("Rate limit issues", "The WhatsApp Business Account has reached its rate limit."),
    130429: ("Rate limit hit", "Cloud API message throughput has been reached."),
    131000: ("Something went wrong", "Message failed to send due to an unknown error."),
    131008: ("Required parameter is missing", "The request is missing a required parameter."),
    131009: ("Parameter value is not valid", "One or more parameter values are invalid."),
    131016: ("Service unavailable", "A service is temporarily unavailable."),
    131021: ("Recipient cannot be sender", "Sender and recipient phone number is the same."),
    131026: ("Message Undeliverable", "Message undeliverable."),
    131047: ("Re-engagement message", "Message failed to send because more than 24 hours have passed since "
                                      "the customer last replied to this number."),
    131048: ("Spam rate limit hit", "Message failed to send because there are restrictions on how many "
                                    "messages can be sent from this phone number."),
    131049: ("This message was not delivered to maintain healthy ecosystem engagement.",
             "In order to maintain a healthy ecosystem engagement, the message failed to be delivered."),
    131050: ("Unable to deliver the message. This recipient has chosen to stop receiving marketing messages "
             "on WhatsApp from your business.", "The recipient has stopped marketing messages."),
    131051: ("Unsupported message type", "Message type is not currently supported."),
    131056: ("(Business Account, Consumer Account) pair rate limit hit",
             "Too many messages sent from the sender phone number to the same recipient phone number "
             "in a short period of time."),
    131062: ("BSUID recipient not supported", "Sending to a business-scoped user id is not supported."),
}
ERROR_HREF = "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/"
SEND_TYPES = frozenset({"text", "image", "video", "audio", "document", "sticker", "location", "contacts",
                        "interactive", "template", "reaction"})
# A 1x1 transparent PNG: what the fake's media download serves for images without a link.
TINY_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII=")
_COUNTRY_PREFIXES = (("1", "US"), ("44", "GB"), ("33", "FR"), ("49", "DE"), ("34", "ES"), ("39", "IT"),
                     ("31", "NL"), ("55", "BR"), ("52", "MX"), ("91", "IN"), ("61", "AU"), ("81", "JP"))


def digits(value: str) -> str:
    """The digits of a phone number (what Meta calls a wa_id)."""
    return "".join(ch for ch in value if ch.isdigit())


def bsuid_for(number: str) -> str:
    """The business-scoped user id the fake gives a phone number (deterministic)."""
    d = digits(number)
    country = next((cc for prefix, cc in _COUNTRY_PREFIXES if d.startswith(prefix)), "US")
    return f"{country}.{int(hashlib.sha256(d.encode()).hexdigest(), 16) % 10**20:020d}"


def new_wamid(number: str) -> str:
    """A message id shaped like Meta's (`wamid.` + base64 of a protobuf-ish blob)."""
    d = digits(number).encode()
    blob = b"\x18" + bytes([len(d)]) + d + b"\x15\x02\x00\x12\x18\x14" + os.urandom(12)
    return "wamid." + base64.b64encode(blob).decode()


def signature(app_secret: str, body: bytes) -> str:
    """`X-Hub-Signature-256` of a body."""
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()


def graph_error(code: int, http_status: int | None = None, details: str | None = None) -> web.Response:
    """A Graph API error envelope as Meta answers it."""
    title, default_details = ERRORS.get(code, ("Error", ""))
    error: dict[str, Any] = {
        "message": title if code == 190 else f"(#{code}) {title}",
        "type": "OAuthException",
        "code": code,
    }
    if code != 190:
        error["error_data"] = {"messaging_product": "whatsapp", "details": details or default_details}
    error["fbtrace_id"] = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
    status = http_status if http_status is not None else (401 if code == 190 else 400)
    return web.json_response({"error": error}, status=status)


# Meta's limits on what a send may carry (platform reference §1.7, §1.10; the interactive pages).
LIMITS = {
    "text_body": 4096, "caption": 1024, "interactive_body": 1024, "header_text": 60, "footer_text": 60,
    "buttons": 3, "button_title": 20, "button_id": 256, "list_button": 20, "sections": 10, "rows": 10,
    "section_title": 24, "row_id": 200, "row_title": 24, "row_description": 72, "cta_display_text": 20,
}
INTERACTIVE_TYPES = frozenset({"button", "list", "cta_url", "location_request_message", "flow", "product",
                               "product_list", "catalog_message", "voice_call", "call_permission_request"})
TYPING_SECONDS = 25.0
Problem = tuple[int, str] | None


def _text_field(value: Any, where: str, limit: int, required: bool = True) -> Problem:
    """A string Meta requires non-blank and at most `limit` characters long."""
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        return 131008, f"The parameter {where} is required."
    if len(value) > limit:
        return 131009, f"Param {where} length is invalid. Min length: 1, Max length: {limit}."
    return None


def _header(header: Any, kind: str) -> Problem:
    if header is None:
        return None
    if not isinstance(header, dict) or header.get("type") not in ("text", "image", "video", "document"):
        return 131009, "interactive['header']['type'] must be text, image, video or document."
    if kind in ("list", "location_request_message") and header["type"] != "text":
        return 131009, f"A {kind} message only takes a text header."
    if header["type"] == "text":
        return _text_field(header.get("text"), "interactive['header']['text']", LIMITS["header_text"])
    media = header.get(header["type"])
    if not isinstance(media, dict) or not (media.get("link") or media.get("id")):
        return 131008, f"The parameter interactive['header']['{header['type']}'] needs a link or an id."
    return None


def _reply_buttons(action: dict[str, Any]) -> Problem:
    buttons = action.get("buttons")
    if not isinstance(buttons, list) or not 1 <= len(buttons) <= LIMITS["buttons"]:
        return 131009, "interactive['action']['buttons'] must have 1 to 3 buttons."
    ids: list[str] = []
    titles: list[str] = []
    for button in buttons:
        reply = button.get("reply") if isinstance(button, dict) and button.get("type") == "reply" else None
        if not isinstance(reply, dict):
            return 131008, "Each button needs type 'reply' and reply['id'] and reply['title']."
        problem = (_text_field(reply.get("id"), "reply['id']", LIMITS["button_id"])
                   or _text_field(reply.get("title"), "reply['title']", LIMITS["button_title"]))
        if problem is not None:
            return problem
        ids.append(reply["id"])
        titles.append(reply["title"])
    if len(set(ids)) != len(ids):
        return 131009, "Button ids must be unique."
    if len(set(titles)) != len(titles):
        return 131009, "Button titles must be unique."
    return None


def _list_action(action: dict[str, Any]) -> Problem:
    problem = _text_field(action.get("button"), "interactive['action']['button']", LIMITS["list_button"])
    if problem is not None:
        return problem
    sections = action.get("sections")
    if not isinstance(sections, list) or not 1 <= len(sections) <= LIMITS["sections"]:
        return 131009, "interactive['action']['sections'] must have 1 to 10 sections."
    ids: list[str] = []
    for section in sections:
        rows = section.get("rows") if isinstance(section, dict) else None
        if not isinstance(rows, list) or not rows:
            return 131008, "Each section needs at least one row."
        problem = _text_field(section.get("title"), "section['title']", LIMITS["section_title"],
                              required=len(sections) > 1)
        if problem is not None:
            return problem
        for row in rows:
            if not isinstance(row, dict):
                return 131008, "Each row needs an id and a title."
            problem = (_text_field(row.get("id"), "row['id']", LIMITS["row_id"])
                       or _text_field(row.get("title"), "row['title']", LIMITS["row_title"])
                       or _text_field(row.get("description"), "row['description']", LIMITS["row_description"],
                                      required=False))
            if problem is not None:
                return problem
            ids.append(row["id"])
    if len(ids) > LIMITS["rows"]:
        return 131009, "A list message has at most 10 rows across its sections."
    if len(set(ids)) != len(ids):
        return 131009, "Row ids must be unique."
    return None


def _cta_action(action: dict[str, Any]) -> Problem:
    params = action.get("parameters")
    if action.get("name") != "cta_url" or not isinstance(params, dict):
        return 131008, "interactive['action'] needs name 'cta_url' and parameters."
    problem = _text_field(params.get("display_text"), "parameters['display_text']", LIMITS["cta_display_text"])
    if problem is not None:
        return problem
    url = params.get("url")
    if not isinstance(url, str) or not re.match(r"^https?://[^\s/]+", url, re.IGNORECASE):
        return 131009, "parameters['url'] must be an http or https URL."
    return None


def validate_interactive(inner: dict[str, Any]) -> Problem:
    """What Meta answers for an `interactive` object it refuses (None: accepted)."""
    kind = inner.get("type")
    if kind not in INTERACTIVE_TYPES:
        return 131009, f"Unsupported interactive type {kind!r}."
    action = inner.get("action")
    if not isinstance(action, dict):
        return 131008, "The parameter interactive['action'] is required."
    body = inner.get("body")
    if kind in ("button", "list", "cta_url", "location_request_message") or body is not None:
        text = body.get("text") if isinstance(body, dict) else None
        problem = _text_field(text, "interactive['body']['text']", LIMITS["interactive_body"])
        if problem is not None:
            return problem
    footer = inner.get("footer")
    if footer is not None:
        problem = _text_field(footer.get("text") if isinstance(footer, dict) else None,
                              "interactive['footer']['text']", LIMITS["footer_text"])
        if problem is not None:
            return problem
    problem = _header(inner.get("header"), str(kind))
    if problem is not None:
        return problem
    if kind == "button":
        return _reply_buttons(action)
    if kind == "list":
        return _list_action(action)
    if kind == "cta_url":
        return _cta_action(action)
    if kind == "location_request_message" and action.get("name") != "send_location":
        return 131009, "interactive['action']['name'] must be 'send_location'."
    return None


@dataclass
class Account:
    """One simulated business number."""

    integration_id: str
    phone_number_id: str
    app_secret: str
    access_token: str
    display_phone_number: str
    webhook_url: str
    waba_id: str = ""
    verify_token: str | None = None

    def __post_init__(self) -> None:
        if not self.waba_id:
            self.waba_id = str(100000000000000 + zlib.crc32(self.phone_number_id.encode()))


@dataclass
class Customer:
    """A simulated WhatsApp user."""

    number: str  # digits
    bsuid: str
    name: str = ""
    last_inbound_at: float | None = None


@dataclass
class ThreadEntry:
    """One message in a customer's thread, either direction."""

    direction: str  # "in" (customer → business) or "out" (business → customer)
    wamid: str
    at: float
    body: dict[str, Any]
    status: str = ""
    errors: list[dict[str, Any]] = field(default_factory=list)
    # A file the phone sent (the upload's view: what the phone shows of it).
    media: list[dict[str, Any]] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        """JSON shape for the scripting API and the phone page."""
        out = {"direction": self.direction, "wamid": self.wamid, "at": self.at, "body": self.body,
               "status": self.status}
        if self.errors:
            out["errors"] = self.errors
        if self.media:
            out["media"] = self.media
        return out


@dataclass
class InjectedError:
    """A scripted synchronous send error."""

    code: int
    http_status: int
    remaining: int
    details: str | None = None


@dataclass
class WebhookDelivery:
    """A webhook the fake posted, with the gateway's answer (0: unreachable)."""

    integration_id: str
    url: str
    body: bytes
    headers: dict[str, str]
    status: int


class FakeWhatsApp:
    """The fake Cloud API; see the module docstring."""

    def __init__(self, public_url: str = "", *, enforce_window: bool = False, auto_statuses: bool = True,
                 store_path: str | None = None, uploads: Uploads | None = None) -> None:
        # Base URL under which `routes(prefix)` is reachable from outside (for media URLs).
        self.public_url = public_url.rstrip("/")
        # The files the phones uploaded (`{"upload": id}` in an inbound spec).
        self.uploads = uploads
        self.enforce_window = enforce_window
        self.auto_statuses = auto_statuses
        self.accounts: dict[str, Account] = {}
        self.customers: dict[str, Customer] = {}
        self.threads: dict[tuple[str, str], list[ThreadEntry]] = {}
        self.injected: dict[str, list[InjectedError]] = {}
        self.media: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.webhooks: list[WebhookDelivery] = []
        # (integration id, customer number) → when the business last showed its typing indicator.
        self.typing: dict[tuple[str, str], float] = {}
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # Append-only journal of threads/customers/media (None: memory only, as in unit tests).
        self.store_path = store_path
        if store_path is not None:
            self._load(store_path)

    # --- persistence ----------------------------------------------------------------------------

    def _load(self, path: str) -> None:
        """Replay the journal, then rewrite it compacted (one line per live record)."""
        try:
            with open(path, encoding="utf-8") as fh:
                lines = fh.readlines()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot read %s: %s", path, exc)
            return
        for line in lines:
            try:
                record = json.loads(line)
                self._apply(record)
            except (ValueError, KeyError, TypeError, AttributeError):
                # A torn last line after a crash, or a hand edit: skip it, keep the rest.
                continue
        live = self._snapshot()
        if len(live) < len(lines):
            tmp = f"{path}.tmp"
            try:
                with open(tmp, "w", encoding="utf-8") as fh:
                    fh.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in live)
                os.replace(tmp, path)
            except OSError as exc:
                log.warning("cannot compact %s: %s", path, exc)

    def _apply(self, record: dict[str, Any]) -> None:
        kind = record["kind"]
        if kind == "customer":
            self.customers[record["number"]] = Customer(number=record["number"], bsuid=record["bsuid"],
                                                        name=record.get("name") or "",
                                                        last_inbound_at=record.get("lastInboundAt"))
        elif kind == "entry":
            entry = ThreadEntry(record["direction"], record["wamid"], float(record["at"]), record["body"],
                                status=record.get("status") or "", errors=list(record.get("errors") or []),
                                media=list(record.get("media") or []))
            self.threads.setdefault((record["integrationId"], record["number"]), []).append(entry)
        elif kind == "status":
            found = self.find_entry(record["integrationId"], record["wamid"])
            if found is not None:
                found[1].status = record["status"]
                found[1].errors = list(record.get("errors") or [])
        elif kind == "media":
            self.media[record["id"]] = dict(record["media"])

    def _snapshot(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = [self._customer_record(c) for c in self.customers.values()]
        records += [{"kind": "media", "id": media_id, "media": media} for media_id, media in self.media.items()]
        for (integration_id, number), entries in self.threads.items():
            records += [self._entry_record(integration_id, number, e) for e in entries]
        return records

    @staticmethod
    def _customer_record(customer: Customer) -> dict[str, Any]:
        return {"kind": "customer", "number": customer.number, "bsuid": customer.bsuid, "name": customer.name,
                "lastInboundAt": customer.last_inbound_at}

    @staticmethod
    def _entry_record(integration_id: str, number: str, entry: ThreadEntry) -> dict[str, Any]:
        return {"kind": "entry", "integrationId": integration_id, "number": number, "direction": entry.direction,
                "wamid": entry.wamid, "at": entry.at, "body": entry.body, "status": entry.status,
                "errors": entry.errors, "media": entry.media}

    def _journal(self, record: dict[str, Any]) -> None:
        if self.store_path is None:
            return
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.store_path)), exist_ok=True)
            with open(self.store_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, separators=(",", ":")) + "\n")
        except OSError as exc:  # the sandbox keeps working in memory
            log.warning("cannot append to %s: %s", self.store_path, exc)

    def _save_customer(self, customer: Customer) -> None:
        self._journal(self._customer_record(customer))

    def _save_status(self, integration_id: str, entry: ThreadEntry) -> None:
        self._journal({"kind": "status", "integrationId": integration_id, "wamid": entry.wamid,
                       "status": entry.status, "errors": entry.errors})

    # --- lifecycle and accounts ----------------------------------------------------------------

    async def close(self) -> None:
        """Cancel pending status deliveries and close the HTTP client."""
        await cancel_and_wait(list(self._tasks))
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait until scheduled status webhooks have been delivered."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    def add_account(self, integration_id: str, phone_number_id: str, app_secret: str, access_token: str,
                    display_phone_number: str, webhook_url: str, *, verify_token: str | None = None) -> Account:
        """Register (or replace) a business number that sends webhooks to `webhook_url`."""
        account = Account(integration_id=integration_id, phone_number_id=phone_number_id, app_secret=app_secret,
                          access_token=access_token, display_phone_number=display_phone_number,
                          webhook_url=webhook_url, verify_token=verify_token)
        self.accounts[integration_id] = account
        return account

    def remove_account(self, integration_id: str) -> None:
        """Forget a business number."""
        self.accounts.pop(integration_id, None)

    def account_by_phone_id(self, phone_number_id: str) -> Account | None:
        """The account that owns a phone number id."""
        return next((a for a in self.accounts.values() if a.phone_number_id == phone_number_id), None)

    def customer(self, number: str, name: str | None = None, bsuid: str | None = None) -> Customer:
        """The simulated user of a phone number (created on first use)."""
        d = digits(number)
        found = self.customers.get(d)
        before = None if found is None else (found.bsuid, found.name)
        if found is None:
            found = self.customers[d] = Customer(number=d, bsuid=bsuid or bsuid_for(d), name=name or "")
        if name:
            found.name = name
        if bsuid:
            found.bsuid = bsuid
        if (found.bsuid, found.name) != before:
            self._save_customer(found)
        return found

    def customer_key(self, recipient: str) -> str:
        """Thread key of a recipient given as phone number (with or without '+') or BSUID."""
        for customer in self.customers.values():
            if customer.bsuid == recipient:
                return customer.number
        return digits(recipient) or recipient

    # --- scripting (Python API; the HTTP scripting routes call these) ---------------------------

    def fail_next(self, integration_id: str, code: int, http_status: int = 400, count: int = 1,
                  details: str | None = None) -> None:
        """Make the next `count` sends of an account fail with a Graph error."""
        self.injected.setdefault(integration_id, []).append(
            InjectedError(code=code, http_status=http_status, remaining=count, details=details))

    def outbox(self, integration_id: str, to: str) -> list[dict[str, Any]]:
        """Request bodies of the messages the business sent to `to`, oldest first."""
        return [e.body for e in self.thread(integration_id, to) if e.direction == "out"]

    def thread(self, integration_id: str, to: str) -> list[ThreadEntry]:
        """Both directions of a customer's conversation with a business number."""
        return list(self.threads.get((integration_id, self.customer_key(to)), []))

    def find_entry(self, integration_id: str, wamid: str) -> tuple[str, ThreadEntry] | None:
        """(customer number, entry) of a message id."""
        for (iid, number), entries in self.threads.items():
            if iid != integration_id:
                continue
            for entry in entries:
                if entry.wamid == wamid:
                    return number, entry
        return None

    async def send_inbound(self, integration_id: str, spec: dict[str, Any]) -> tuple[str, int]:
        """Have a customer send a message; returns (wamid, the gateway's HTTP status, 0 if unreachable).

        `spec`: `from` (required), one of `text`, `upload` (the id of a file the phone uploaded, with
        `caption?`: an `image` or a `document` message), `image` ({link?, caption?, mimeType?}),
        `buttonReply`/`listReply` ({id, title, description?}), `location` ({latitude, longitude, name?, address?}),
        `message` (a raw message object for other types); optional `name`, `bsuid`, `contextId`,
        `withWaId`/`withBsuid` (false drops that identifier, as Meta does for username users).
        """
        account = self.accounts[integration_id]
        number = spec.get("from")
        if not isinstance(number, str) or not digits(number):
            raise ValueError("'from' must be a phone number")
        upload = upload_in(self.uploads, spec)
        if upload is not None:
            MEDIA_RULES["whatsapp"].kind_of(upload)  # what WhatsApp does not carry is refused first
        bsuid = spec.get("bsuid") if isinstance(spec.get("bsuid"), str) else None
        name = spec.get("name") if isinstance(spec.get("name"), str) else None
        customer = self.customer(number, name, bsuid)
        with_wa_id = spec.get("withWaId", True) is not False
        with_bsuid = spec.get("withBsuid", True) is not False
        if not with_wa_id and not with_bsuid:
            raise ValueError("a message needs withWaId or withBsuid")
        wamid = new_wamid(customer.number)
        message: dict[str, Any] = {}
        if with_wa_id:
            message["from"] = customer.number
        if with_bsuid:
            message["from_user_id"] = customer.bsuid
        message.update({"id": wamid, "timestamp": str(int(time.time()))})
        message.update(self._inbound_content(account, customer, spec, upload))
        context_id = spec.get("contextId")
        if isinstance(context_id, str) and context_id:
            message["context"] = {"from": digits(account.display_phone_number), "id": context_id}
        contact: dict[str, Any] = {"profile": {"name": customer.name or f"+{customer.number}"}}
        if with_wa_id:
            contact["wa_id"] = customer.number
        if with_bsuid:
            contact["user_id"] = customer.bsuid
        customer.last_inbound_at = time.time()
        self._save_customer(customer)
        media = [self.uploads.view(upload)] if upload is not None and self.uploads is not None else []
        self._append(integration_id, customer.number, ThreadEntry("in", wamid, time.time(), message, media=media))
        status = await self.deliver(account, {"contacts": [contact], "messages": [message]})
        return wamid, status

    def _inbound_content(self, account: Account, customer: Customer, spec: dict[str, Any],
                         upload: Upload | None = None) -> dict[str, Any]:
        last_out = next((e.wamid for e in reversed(self.threads.get((account.integration_id, customer.number), []))
                         if e.direction == "out"), None)
        if upload is not None:
            # What WhatsApp delivers for a photo (jpeg, png) or a document the customer sent: a
            # media id (lookup + download serve the file), its type and sha256, and the caption.
            kind = "image" if MEDIA_RULES["whatsapp"].kind_of(upload) == "photo" else "document"
            media_id = self.register_media(account.integration_id, None, upload.media_type, upload=upload)
            media: dict[str, Any] = {}
            if isinstance(spec.get("caption"), str) and spec["caption"].strip():
                media["caption"] = spec["caption"]
            if kind == "document":
                media["filename"] = upload.name
            media.update({"mime_type": upload.media_type, "sha256": self.media[media_id]["sha256"], "id": media_id})
            return {"type": kind, kind: media}
        if isinstance(spec.get("text"), str):
            return {"type": "text", "text": {"body": spec["text"]}}
        if isinstance(spec.get("image"), dict):
            image = spec["image"]
            media_id = self.register_media(account.integration_id, image.get("link"),
                                           str(image.get("mimeType") or "image/jpeg"))
            body: dict[str, Any] = {}
            if image.get("caption"):
                body["caption"] = str(image["caption"])
            body.update({"mime_type": self.media[media_id]["mime_type"], "sha256": self.media[media_id]["sha256"],
                         "id": media_id})
            return {"type": "image", "image": body}
        for key, kind in (("buttonReply", "button_reply"), ("listReply", "list_reply")):
            reply = spec.get(key)
            if isinstance(reply, dict):
                chosen = {"id": str(reply.get("id", "")), "title": str(reply.get("title", ""))}
                if kind == "list_reply" and isinstance(reply.get("description"), str) and reply["description"]:
                    chosen["description"] = reply["description"]
                content: dict[str, Any] = {"type": "interactive", "interactive": {"type": kind, kind: chosen}}
                if last_out and "contextId" not in spec:
                    content["context"] = {"from": digits(account.display_phone_number), "id": last_out}
                return content
        if isinstance(spec.get("location"), dict):
            loc = spec["location"]
            location: dict[str, Any] = {"latitude": float(loc["latitude"]), "longitude": float(loc["longitude"])}
            for key in ("name", "address", "url"):
                if loc.get(key):
                    location[key] = str(loc[key])
            return {"type": "location", "location": location}
        if isinstance(spec.get("message"), dict) and isinstance(spec["message"].get("type"), str):
            return dict(spec["message"])
        raise ValueError("give one of text, upload, image, buttonReply, listReply, location, message")

    def register_media(self, integration_id: str, link: Any, mime_type: str, *, upload: Upload | None = None) -> str:
        """Store a media object (served by the fake: an uploaded file, a link it redirects to, or a
        placeholder PNG) and return its id."""
        media_id = str(10**15 + int.from_bytes(os.urandom(6), "big"))
        if upload is not None:
            self.media[media_id] = {
                "integration_id": integration_id, "link": None, "mime_type": upload.media_type,
                "sha256": base64.b64encode(bytes.fromhex(upload.sha256)).decode(), "file_size": upload.size,
                "upload": upload.id,
            }
            self._journal({"kind": "media", "id": media_id, "media": self.media[media_id]})
            return media_id
        data = TINY_PNG if not isinstance(link, str) or not link else link.encode()
        self.media[media_id] = {
            "integration_id": integration_id, "link": link if isinstance(link, str) and link else None,
            "mime_type": mime_type, "sha256": base64.b64encode(hashlib.sha256(data).digest()).decode(),
            "file_size": len(TINY_PNG) if not isinstance(link, str) or not link else 0,
        }
        self._journal({"kind": "media", "id": media_id, "media": self.media[media_id]})
        return media_id

    async def send_status(self, integration_id: str, wamid: str, status: str, code: int | None = None,
                          details: str | None = None) -> int:
        """Deliver a status webhook for a message the business sent; returns the gateway's HTTP status."""
        account = self.accounts[integration_id]
        found = self.find_entry(integration_id, wamid)
        number = found[0] if found else ""
        entry = found[1] if found else None
        item: dict[str, Any] = {"id": wamid, "status": status, "timestamp": str(int(time.time())),
                                "recipient_id": number}
        if entry is not None and entry.body.get("biz_opaque_callback_data"):
            item["biz_opaque_callback_data"] = entry.body["biz_opaque_callback_data"]
        if status == "failed":
            error_code = code if code is not None else 131026
            title, default_details = ERRORS.get(error_code, ("Error", ""))
            item["errors"] = [{"code": error_code, "title": title, "message": title,
                               "error_data": {"details": details or default_details}, "href": ERROR_HREF}]
        else:
            if status == "sent":
                item["conversation"] = {"id": hashlib.md5(f"{integration_id}:{number}".encode()).hexdigest(),
                                        "expiration_timestamp": str(int(time.time()) + WINDOW_SECONDS),
                                        "origin": {"type": "service"}}
            item["pricing"] = {"billable": False, "pricing_model": "PMP", "type": "free_customer_service",
                               "category": "service"}
        if entry is not None:
            entry.status = status
            entry.errors = item.get("errors", [])
            self._save_status(integration_id, entry)
        value: dict[str, Any] = {"statuses": [item]}
        # Since the BSUID change statuses carry `contacts` (pywa 4.5 requires them).
        customer = self.customers.get(number)
        contact: dict[str, Any] = {"user_id": number}
        if customer is not None:
            contact = {"profile": {"name": customer.name or f"+{customer.number}"},
                       "wa_id": customer.number, "user_id": customer.bsuid}
        return await self.deliver(account, {"contacts": [contact], **value})

    # --- webhook delivery ---------------------------------------------------------------------

    def payload(self, account: Account, value: dict[str, Any]) -> dict[str, Any]:
        """The notification envelope Meta wraps around a change value (§1.4)."""
        return {
            "object": "whatsapp_business_account",
            "entry": [{
                "id": account.waba_id,
                "changes": [{
                    "value": {
                        "messaging_product": "whatsapp",
                        "metadata": {"display_phone_number": digits(account.display_phone_number),
                                     "phone_number_id": account.phone_number_id},
                        **value,
                    },
                    "field": "messages",
                }],
            }],
        }

    async def deliver(self, account: Account, value: dict[str, Any]) -> int:
        """Sign and POST one notification to the account's webhook; the gateway's status (0: unreachable)."""
        body = json.dumps(self.payload(account, value), ensure_ascii=True).encode()
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: signature(account.app_secret, body),
                   "User-Agent": "facebookexternalua"}
        status = 0
        with _tracer.start_as_current_span("POST whatsapp webhook", kind=SpanKind.CLIENT) as span:
            span.set_attribute("http.request.method", "POST")
            try:
                async with self._client().post(account.webhook_url, data=body,
                                               headers=inject_headers(headers)) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("webhook %s unreachable: %s", account.webhook_url, exc)
            span.set_attribute("http.response.status_code", status)
        self.webhooks.append(WebhookDelivery(account.integration_id, account.webhook_url, body, headers, status))
        return status

    async def verify_webhook(self, integration_id: str, challenge: str = "1158201444",
                             verify_token: str | None = None) -> tuple[int, str]:
        """Run Meta's subscription handshake against the account's webhook: (status, body)."""
        account = self.accounts[integration_id]
        params = {"hub.mode": "subscribe", "hub.challenge": challenge,
                  "hub.verify_token": verify_token if verify_token is not None else account.verify_token or ""}
        try:
            async with self._client().get(account.webhook_url, params=params) as resp:
                return resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            return 0, ""

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self._session

    def _append(self, integration_id: str, number: str, entry: ThreadEntry) -> None:
        self.threads.setdefault((integration_id, number), []).append(entry)
        self._journal(self._entry_record(integration_id, number, entry))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _after_send(self, account: Account, wamid: str, number: str, window_closed: bool) -> None:
        # One customer's statuses go out in order, like a phone acknowledging one message after another.
        lock = self._locks.setdefault((account.integration_id, number), asyncio.Lock())
        async with lock:
            if window_closed:
                await self.send_status(account.integration_id, wamid, "failed", 131047)
                return
            await self.send_status(account.integration_id, wamid, "sent")
            await self.send_status(account.integration_id, wamid, "delivered")

    # --- Graph API routes ---------------------------------------------------------------------

    def routes(self, prefix: str = "/sandbox") -> list[web.RouteDef]:
        """The fake's HTTP routes, mounted under `prefix`."""
        p = prefix.rstrip("/")
        s = sunco_errors  # the scripting API is ours, so it answers errors like the business API
        return [
            web.post(f"{p}/graph/{_VERSION}/{{phone_number_id}}/messages", self._graph_messages),
            web.get(f"{p}/graph/{_VERSION}/{{media_id}}", self._graph_media),
            web.get(f"{p}/whatsapp/media/{{media_id}}", self._media_download),
            web.post(f"{p}/whatsapp/{{integration_id}}/inbound", s(self._script_inbound)),
            web.post(f"{p}/whatsapp/{{integration_id}}/status", s(self._script_status)),
            web.post(f"{p}/whatsapp/{{integration_id}}/fail-next", s(self._script_fail_next)),
            web.post(f"{p}/whatsapp/{{integration_id}}/verify", s(self._script_verify)),
            web.post(f"{p}/whatsapp/{{integration_id}}/window", s(self._script_window)),
            web.get(f"{p}/whatsapp/{{integration_id}}/outbox", s(self._script_outbox)),
            web.get(f"{p}/whatsapp/{{integration_id}}/thread", s(self._script_thread)),
            web.get(f"{p}/whatsapp/{{integration_id}}", s(self._script_account)),
        ]

    def _authorized(self, request: web.Request, account: Account) -> bool:
        header = request.headers.get("Authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else request.query.get("access_token", "")
        return bool(token) and secrets_equal(account.access_token, token)

    async def _graph_messages(self, request: web.Request) -> web.Response:
        account = self.account_by_phone_id(request.match_info["phone_number_id"])
        if account is None:
            return graph_error(100, 400, f"Unsupported post request. Object with ID "
                                         f"'{request.match_info['phone_number_id']}' does not exist.")
        if not self._authorized(request, account):
            return graph_error(190, 401)
        raw = await request.read()
        try:
            body = decode_json(raw)
        except ValueError:
            return graph_error(100, 400, "The request body is not valid JSON.")
        if not isinstance(body, dict):
            return graph_error(100, 400, "The request body must be a JSON object.")
        self.requests.append({"integration_id": account.integration_id, "path": request.path, "body": body})
        if body.get("messaging_product") != "whatsapp":
            return graph_error(100, 400, "The parameter messaging_product is required.")
        if body.get("status") == "read":
            return self._mark_read(account, body)
        problem = self._validate_send(body)
        if problem is not None:
            return graph_error(problem[0], 400, problem[1])
        injected = self.injected.get(account.integration_id)
        if injected:
            error = injected[0]
            error.remaining -= 1
            if error.remaining <= 0:
                injected.pop(0)
            return graph_error(error.code, error.http_status, error.details)
        recipient = str(body.get("to") or body.get("recipient"))
        by_bsuid = "to" not in body
        number = self.customer_key(recipient)
        if not by_bsuid and digits(recipient) == digits(account.display_phone_number):
            return graph_error(131021, 400)
        if not by_bsuid:
            self.customer(number)
        wamid = new_wamid(number)
        self._append(account.integration_id, number, ThreadEntry("out", wamid, time.time(), body, status="accepted"))
        self.typing.pop((account.integration_id, number), None)  # a message ends the typing indicator
        customer = self.customers.get(number)
        window_closed = self.enforce_window and body.get("type") != "template" and (
            customer is None or customer.last_inbound_at is None
            or time.time() - customer.last_inbound_at > WINDOW_SECONDS)
        if self.auto_statuses or window_closed:
            self._spawn(self._after_send(account, wamid, number, window_closed))
        contact = {"input": recipient, "user_id": recipient} if by_bsuid else {"input": recipient, "wa_id": number}
        sent: dict[str, Any] = {"id": wamid}
        if body.get("type") == "template":
            sent["message_status"] = "accepted"
        return web.json_response({"messaging_product": "whatsapp", "contacts": [contact], "messages": [sent]})

    def _validate_send(self, body: dict[str, Any]) -> tuple[int, str] | None:
        to, recipient = body.get("to"), body.get("recipient")
        if not (isinstance(to, str) and digits(to)) and not (isinstance(recipient, str) and recipient):
            return 131008, "The parameter to is required."
        context = body.get("context")
        if context is not None and not (isinstance(context, dict) and isinstance(context.get("message_id"), str)
                                        and context["message_id"]):
            return 131009, "context['message_id'] must be a message id."
        kind = body.get("type", "text")
        if kind not in SEND_TYPES:
            return 131009, f"Unsupported message type {kind!r}."
        inner = body.get(kind)
        if not isinstance(inner, dict):
            return 131008, f"The parameter {kind} is required."
        if kind == "text":
            text = inner.get("body")
            if not isinstance(text, str) or not text.strip():
                return 131008, "The parameter text['body'] is required."
            if len(text) > LIMITS["text_body"]:
                return 131009, f"text['body'] is longer than {LIMITS['text_body']} characters."
        elif kind in ("image", "video", "audio", "document", "sticker"):
            if not inner.get("link") and not inner.get("id"):
                return 131008, f"The parameter {kind}['link'] or {kind}['id'] is required."
            caption = inner.get("caption")
            if caption is not None and (not isinstance(caption, str) or len(caption) > LIMITS["caption"]):
                return 131009, f"{kind}['caption'] must be a string of at most {LIMITS['caption']} characters."
        elif kind == "template":
            if not inner.get("name") or not isinstance(inner.get("language"), dict):
                return 131008, "The parameters template['name'] and template['language'] are required."
        elif kind == "interactive":
            return validate_interactive(inner)
        return None

    def _mark_read(self, account: Account, body: dict[str, Any]) -> web.Response:
        """`status: read` (optionally with a typing indicator) on a customer's message (§1.7.6)."""
        message_id = body.get("message_id")
        if not isinstance(message_id, str) or not message_id:
            return graph_error(131008, 400, "The parameter message_id is required.")
        typing = body.get("typing_indicator")
        if typing is not None and typing != {"type": "text"}:
            return graph_error(131009, 400, "typing_indicator['type'] must be 'text'.")
        found = self.find_entry(account.integration_id, message_id)
        if found is not None and found[1].direction == "in":
            number, entry = found
            if entry.status != "read":
                entry.status = "read"
                self._save_status(account.integration_id, entry)
            if typing is not None:
                # Shown until the business's next message or for 25 s, whichever comes first.
                self.typing[(account.integration_id, number)] = time.time()
        return web.json_response({"success": True})

    def is_typing(self, integration_id: str, to: str) -> bool:
        """Whether the business's typing indicator is showing in a customer's thread."""
        since = self.typing.get((integration_id, self.customer_key(to)))
        return since is not None and time.time() - since < TYPING_SECONDS

    async def _graph_media(self, request: web.Request) -> web.Response:
        media_id = request.match_info["media_id"]
        media = self.media.get(media_id)
        account = self.accounts.get(media["integration_id"]) if media else None
        if media is None or account is None:
            return graph_error(100, 400, f"Unsupported get request. Object with ID '{media_id}' does not exist.")
        if not self._authorized(request, account):
            return graph_error(190, 401)
        base = self.public_url or f"{request.scheme}://{request.host}"
        return web.json_response({
            "messaging_product": "whatsapp", "url": f"{base}/whatsapp/media/{media_id}",
            "mime_type": media["mime_type"], "sha256": media["sha256"], "file_size": media["file_size"],
            "id": media_id,
        })

    async def _media_download(self, request: web.Request) -> web.StreamResponse:
        media = self.media.get(request.match_info["media_id"])
        account = self.accounts.get(media["integration_id"]) if media else None
        if media is None or account is None:
            return web.Response(status=404)
        if not self._authorized(request, account):
            return web.Response(status=401)
        if media.get("upload"):
            upload = self.uploads.get(media["upload"]) if self.uploads is not None else None
            if upload is None or self.uploads is None:
                return web.Response(status=404)
            return self.uploads.response(upload, download_name=False)
        if media["link"]:
            raise web.HTTPFound(media["link"])
        return web.Response(body=TINY_PNG, content_type=media["mime_type"])

    # --- scripting routes ---------------------------------------------------------------------

    def _script_account_or_404(self, request: web.Request) -> Account:
        account = self.accounts.get(request.match_info["integration_id"])
        if account is None:
            raise ApiError(404, "Unknown WhatsApp integration in the sandbox")
        return account

    async def _script_inbound(self, request: web.Request) -> web.Response:
        account = self._script_account_or_404(request)
        spec = await read_json_object(request, MAX_BODY)
        try:
            wamid, status = await self.send_inbound(account.integration_id, spec)
        except (ValueError, KeyError, TypeError) as exc:
            raise _bad_request(str(exc)) from exc
        return web.json_response({"wamid": wamid, "webhookStatus": status})

    async def _script_status(self, request: web.Request) -> web.Response:
        account = self._script_account_or_404(request)
        spec = await read_json_object(request, MAX_BODY)
        wamid, status = spec.get("wamid"), spec.get("status")
        if not isinstance(wamid, str) or status not in ("sent", "delivered", "read", "played", "failed"):
            raise _bad_request("need wamid and status in sent|delivered|read|played|failed")
        code = spec.get("code")
        if code is not None and not isinstance(code, int):
            raise _bad_request("code must be an integer")
        details = spec.get("details") if isinstance(spec.get("details"), str) else None
        webhook_status = await self.send_status(account.integration_id, wamid, status, code, details)
        return web.json_response({"wamid": wamid, "webhookStatus": webhook_status})

    async def _script_fail_next(self, request: web.Request) -> web.Response:
        account = self._script_account_or_404(request)
        spec = await read_json_object(request, MAX_BODY)
        code, http_status, count = spec.get("code"), spec.get("httpStatus", 400), spec.get("count", 1)
        if not isinstance(code, int) or not isinstance(http_status, int) or not isinstance(count, int) or count < 1:
            raise _bad_request("need integer code, httpStatus and count >= 1")
        details = spec.get("details") if isinstance(spec.get("details"), str) else None
        self.fail_next(account.integration_id, code, http_status, count, details)
        return web.json_response({"queued": sum(e.remaining for e in self.injected[account.integration_id])})

    async def _script_verify(self, request: web.Request) -> web.Response:
        account = self._script_account_or_404(request)
        spec = await read_json_object(request, MAX_BODY)
        token = spec.get("verifyToken") if isinstance(spec.get("verifyToken"), str) else None
        challenge = str(spec.get("challenge") or "1158201444")
        status, text = await self.verify_webhook(account.integration_id, challenge, token)
        return web.json_response({"webhookStatus": status, "body": text, "ok": status == 200 and text == challenge})

    async def _script_window(self, request: web.Request) -> web.Response:
        self._script_account_or_404(request)
        spec = await read_json_object(request, MAX_BODY)
        to = spec.get("to")
        if not isinstance(to, str) or not digits(to):
            raise _bad_request("need to")
        customer = self.customer(to)
        customer.last_inbound_at = time.time() if spec.get("open", True) else None
        self._save_customer(customer)
        return web.json_response({"open": customer.last_inbound_at is not None})

    async def _script_outbox(self, request: web.Request) -> web.Response:
        account = self._script_account_or_404(request)
        to = request.query.get("to", "")
        if not to:
            raise _bad_request("need ?to=")
        return web.json_response({"messages": self.outbox(account.integration_id, to)})

    async def _script_thread(self, request: web.Request) -> web.Response:
        account = self._script_account_or_404(request)
        to = request.query.get("to", "")
        if not to:
            raise _bad_request("need ?to=")
        customer = self.customers.get(self.customer_key(to))
        return web.json_response({
            "messages": [e.view() for e in self.thread(account.integration_id, to)],
            "typing": self.is_typing(account.integration_id, to),
            "customer": {"number": customer.number, "bsuid": customer.bsuid, "name": customer.name}
            if customer else None,
        })

    async def _script_account(self, request: web.Request) -> web.Response:
        account = self._script_account_or_404(request)
        return web.json_response({"integrationId": account.integration_id,
                                  "phoneNumberId": account.phone_number_id,
                                  "displayPhoneNumber": account.display_phone_number,
                                  "webhookUrl": account.webhook_url})


def _bad_request(reason: str) -> ApiError:
    return ApiError(400, reason)




_FAKE_PATH = re.compile(r"/sandbox/graph/?$")


def points_at_sandbox(base_url: str) -> bool:
    """True when a Graph base URL is the sandbox's fake (`…/sandbox/graph`)."""
    return bool(_FAKE_PATH.search(base_url))
