"""A wire-accurate fake of the Messenger Platform (Page webhooks + Send API) plus a scriptable person.

`FakeMessenger` needs no NATS: register Pages with `add_account(...)` (or let `sync` take them
from integration records whose `baseUrl` is the sandbox), mount `routes(prefix)` on an aiohttp
app, and it behaves like Meta towards a gateway (platform reference §2):

- the Send API at `{prefix}/messenger-graph/v{N}.0/{page-id|me}/messages`: Page token as
  `access_token` query parameter or Bearer header, JSON or form bodies (form fields holding JSON
  strings, as in Meta's curl examples), answered `{"recipient_id", "message_id"}` or with the
  Graph error envelope; the standard window is enforced (free-form more than 24 h after the
  person's last action, or HUMAN_AGENT after 7 days → `(#10)` / 2018278); message bodies are
  checked as Meta checks them (`validate_message`: text ≤ 2,000, 1-13 quick replies of title ≤ 20
  and payload ≤ 1,000, button templates of 1-3 buttons and text ≤ 640, generic templates of 1-10
  elements with title/subtitle ≤ 80, http(s) URLs, no location quick reply) and refused with
  `(#100)` in the Graph envelope; `sender_action` calls (`typing_on`, `typing_off`, `mark_seen`)
  are answered `{"recipient_id"}` and recorded (`sender_actions`, the person's typing / seen state);
- signed webhooks (`X-Hub-Signature-256` over `json.dumps(payload, ensure_ascii=True)`) for the
  person's messages, postbacks (Get Started with the m.me `ref` on a new thread), referrals
  (m.me `ref` into an existing thread), quick replies, attachments, and `delivery`/`read` receipts;
- a photo or a document the phone uploaded (`{"upload": id}`) arrives as an `image` or `file`
  attachment whose payload URL is on the fake's CDN path (`{prefix}/messenger-cdn/v/…/{name}?oe=`,
  no token needed, expiring after 3 days as Meta's links do: 403 "URL signature expired");
- scripting under `{prefix}/messenger/{integrationId}/…`: `inbound`, `read`, `fail-next`,
  `verify`, `window`, `outbox?to=`, `thread?to=` (with the Page's sender actions and whether it
  is typing), errors in SunCo's shape.

With a `store_path` the people and threads survive a restart (JSON lines, replayed and compacted
when the fake is created), like `FakeWhatsApp`'s.
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
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
from aiohttp import web
from opentelemetry.trace import SpanKind

from services.sandbox.scripting import read_json_object, sunco_errors
from services.sandbox.uploads import MEDIA_RULES, Upload, Uploads, upload_in
from shared.http import ApiError
from shared.records import IntegrationRecord
from shared.telemetry import inject_headers, tracer
from shared.untrusted import decode_json, secrets_equal

from .journal import Journal

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

INTEGRATION_TYPE = "messenger"
SIGNATURE_HEADER = "X-Hub-Signature-256"
WINDOW_SECONDS = 24 * 3600
HUMAN_AGENT_SECONDS = 7 * 24 * 3600
MAX_BODY = 1024 * 1024
TEXT_MAX = 2000
MAX_QUICK_REPLIES = 13
QUICK_REPLY_TITLE_MAX = 20
PAYLOAD_MAX = 1000
BUTTON_TITLE_MAX = 20
BUTTON_TEXT_MAX = 640
MAX_BUTTONS = 3
MAX_ELEMENTS = 10
ELEMENT_TEXT_MAX = 80
# Meta turns a typing indicator off after 20 s, or when the Page sends a message.
TYPING_SECONDS = 20.0
SENDER_ACTIONS = ("typing_on", "typing_off", "mark_seen")
MAX_SENDER_ACTIONS = 1000
TEMPLATE_TYPES = frozenset({"button", "generic", "media", "receipt", "customer_feedback", "product"})
BUTTON_TYPES = frozenset({"postback", "web_url", "phone_number", "account_link", "account_unlink", "game_play"})
_VERSION = r"{version:v\d+\.\d+}"
TAGS = frozenset({"CONFIRMED_EVENT_UPDATE", "POST_PURCHASE_UPDATE", "ACCOUNT_UPDATE", "HUMAN_AGENT"})
ATTACHMENT_TYPES = frozenset({"image", "video", "audio", "file", "template"})
# How long an attachment URL of the fake's CDN works (Meta's expire too: the gateway copies them).
CDN_URL_SECONDS = 3 * 24 * 3600
WINDOW_MESSAGE = ("(#10) This message is sent outside of allowed window. Learn more about the new policy here: "
                  "https://developers.facebook.com/docs/messenger-platform/policy-overview")

# code → default message as Graph words it (platform reference §2.6).
ERRORS: dict[int, str] = {
    1: "An unknown error occurred",
    2: "An unexpected error has occurred. Please retry your request later.",
    4: "(#4) Application request limit reached",
    10: WINDOW_MESSAGE,
    17: "(#17) User request limit reached",
    32: "(#32) Page request limit reached",
    100: "(#100) Invalid parameter",
    190: "Invalid OAuth access token - Cannot parse access token",
    200: "(#200) Requires pages_messaging permission to manage the object",
    230: "(#230) Requires pages_messaging_subscriptions permission to manage the object",
    551: "(#551) This person isn't available right now.",
    613: "(#613) Calls to this api have exceeded the rate limit.",
    1200: "(#1200) Temporary send message failure. Please try again later",
}
DEFAULT_SUBCODES: dict[int, int] = {10: 2018278, 551: 1545041}


def signature(app_secret: str, body: bytes) -> str:
    """`X-Hub-Signature-256` of a body."""
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()


def legacy_signature(app_secret: str, body: bytes) -> str:
    """The older `X-Hub-Signature` (HMAC-SHA1) Meta still sends alongside."""
    return "sha1=" + hmac.new(app_secret.encode(), body, hashlib.sha1).hexdigest()


def new_mid() -> str:
    """A message id shaped like Messenger's (`m_` + URL-safe base64)."""
    return "m_" + base64.urlsafe_b64encode(os.urandom(48)).decode().rstrip("=")


def graph_error(code: int, http_status: int | None = None, message: str | None = None,
                subcode: int | None = None) -> web.Response:
    """A Graph API error envelope as Meta answers it."""
    error: dict[str, Any] = {"message": message or ERRORS.get(code, f"(#{code}) Error"),
                             "type": "OAuthException", "code": code}
    sub = subcode if subcode is not None else DEFAULT_SUBCODES.get(code)
    if sub is not None:
        error["error_subcode"] = sub
    error["fbtrace_id"] = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
    status = http_status if http_status is not None else (401 if code == 190 else 500 if code in (1, 2) else 400)
    return web.json_response({"error": error}, status=status)


@dataclass
class Account:
    """One simulated Facebook Page."""

    integration_id: str
    page_id: str
    app_secret: str
    page_access_token: str
    webhook_url: str
    verify_token: str | None = None


@dataclass
class Person:
    """A simulated Messenger user, as one Page sees them (PSIDs are page-scoped)."""

    psid: str
    name: str = ""
    last_user_at: float | None = None
    # What the Page's sender actions show the person (not journaled: it fades anyway).
    typing_until: float = 0.0
    seen_at: float | None = None

    @property
    def typing(self) -> bool:
        """Whether the person sees the Page typing now."""
        return self.typing_until > time.time()


@dataclass
class ThreadEntry:
    """One message in a person's thread with a Page, either direction."""

    direction: str  # "in" (person → Page) or "out" (Page → person)
    mid: str
    at: float
    body: dict[str, Any]
    status: str = ""
    # A file the phone sent (the upload's view: what the phone shows of it).
    media: list[dict[str, Any]] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        """JSON shape for the scripting API and the phone page."""
        out = {"direction": self.direction, "mid": self.mid, "at": self.at, "body": self.body,
               "status": self.status}
        if self.media:
            out["media"] = self.media
        return out


@dataclass
class InjectedError:
    """A scripted synchronous send error."""

    code: int
    http_status: int | None
    remaining: int
    subcode: int | None = None
    message: str | None = None


@dataclass
class WebhookDelivery:
    """A webhook the fake posted, with the gateway's answer (0: unreachable)."""

    integration_id: str
    url: str
    body: bytes
    headers: dict[str, str]
    status: int


@dataclass
class SenderAction:
    """A `sender_action` call the fake accepted."""

    integration_id: str
    psid: str
    action: str
    at: float

    def view(self) -> dict[str, Any]:
        """JSON shape for the scripting API."""
        return {"action": self.action, "at": self.at}


@dataclass
class SendRequest:
    """A Send API call as received (after auth), for white-box assertions."""

    integration_id: str
    path: str
    body: dict[str, Any]
    status: int = 0


class FakeMessenger:
    """The fake Messenger Platform; see the module docstring."""

    integration_type = INTEGRATION_TYPE

    def __init__(self, gateway_url: str = "", *, enforce_window: bool = True, auto_statuses: bool = True,
                 store_path: str | None = None, uploads: Uploads | None = None) -> None:
        # The gateway's public base URL: webhooks go to `{gateway_url}/webhooks/messenger/{id}`.
        self.gateway_url = gateway_url.rstrip("/")
        # The files the phones uploaded (`{"upload": id}` in an inbound spec), served on the CDN path.
        self.uploads = uploads
        self.enforce_window = enforce_window
        self.auto_statuses = auto_statuses
        self.accounts: dict[str, Account] = {}
        self.people: dict[tuple[str, str], Person] = {}
        self.threads: dict[tuple[str, str], list[ThreadEntry]] = {}
        self.injected: dict[str, list[InjectedError]] = {}
        self.requests: list[SendRequest] = []
        self.actions: list[SenderAction] = []
        self.webhooks: list[WebhookDelivery] = []
        self._synced: dict[str, tuple[str, ...]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # Append-only journal of people and threads (None: memory only, as in unit tests).
        self.store_path = store_path
        self._journal = Journal(store_path)
        lines = self._journal.replay(self._apply)
        self._journal.compact(self._snapshot(), lines)  # after the replay: the live state

    # --- persistence -----------------------------------------------------------------------------

    def _apply(self, record: dict[str, Any]) -> None:
        kind = record["kind"]
        if kind == "person":
            last = record.get("lastUserAt")
            self.people[(record["integrationId"], record["psid"])] = Person(
                psid=record["psid"], name=str(record.get("name") or ""),
                last_user_at=float(last) if last is not None else None)
        elif kind == "entry":
            entry = ThreadEntry(record["direction"], str(record["mid"]), float(record["at"]), dict(record["body"]),
                                status=str(record.get("status") or ""), media=list(record.get("media") or []))
            self.threads.setdefault((record["integrationId"], record["psid"]), []).append(entry)
        elif kind == "status":
            found = self.find_entry(record["integrationId"], record["mid"])
            if found is not None:
                found[1].status = str(record["status"])

    def _snapshot(self) -> list[dict[str, Any]]:
        records = [self._person_record(iid, p) for (iid, _psid), p in self.people.items()]
        for (integration_id, psid), entries in self.threads.items():
            records += [self._entry_record(integration_id, psid, e) for e in entries]
        return records

    @staticmethod
    def _person_record(integration_id: str, person: Person) -> dict[str, Any]:
        return {"kind": "person", "integrationId": integration_id, "psid": person.psid, "name": person.name,
                "lastUserAt": person.last_user_at}

    @staticmethod
    def _entry_record(integration_id: str, psid: str, entry: ThreadEntry) -> dict[str, Any]:
        return {"kind": "entry", "integrationId": integration_id, "psid": psid, "direction": entry.direction,
                "mid": entry.mid, "at": entry.at, "body": entry.body, "status": entry.status, "media": entry.media}

    def _save_person(self, integration_id: str, person: Person) -> None:
        self._journal.append(self._person_record(integration_id, person))

    def _save_status(self, integration_id: str, entry: ThreadEntry) -> None:
        self._journal.append({"kind": "status", "integrationId": integration_id, "mid": entry.mid,
                              "status": entry.status})

    # --- lifecycle and accounts ----------------------------------------------------------------

    def add_account(self, integration_id: str, page_id: str, app_secret: str, page_access_token: str,
                    webhook_url: str, verify_token: str | None = None) -> Account:
        """Register (or update) a simulated Page."""
        account = Account(integration_id, page_id, app_secret, page_access_token, webhook_url, verify_token)
        self.accounts[integration_id] = account
        return account

    def remove_account(self, integration_id: str) -> None:
        """Forget a Page (its threads stay, as Meta keeps them)."""
        self.accounts.pop(integration_id, None)

    def account_by_page_id(self, page_id: str, token: str = "") -> Account | None:
        """The Page of a Send API path (`me` = the Page whose token is used)."""
        for account in self.accounts.values():
            if account.page_id == page_id or (page_id == "me" and token and secrets_equal(
                    account.page_access_token, token)):
                return account
        return None

    def sync(self, records: Sequence[IntegrationRecord]) -> None:
        """Mirror the messenger integrations whose Graph base URL is the sandbox into Pages."""
        seen: set[str] = set()
        for record in records:
            if record.type != INTEGRATION_TYPE or not points_at_sandbox(str(record.config.get("baseUrl") or "")):
                continue
            cfg = record.config
            fields = tuple(str(cfg.get(k) or "") for k in ("pageId", "appSecret", "pageAccessToken", "verifyToken"))
            if not all(fields[:3]):
                continue
            seen.add(record.id)
            if self._synced.get(record.id) != fields:
                page_id, app_secret, token, verify_token = fields
                self.add_account(record.id, page_id, app_secret, token,
                                 f"{self.gateway_url}/webhooks/messenger/{record.id}", verify_token or None)
                self._synced[record.id] = fields
        for integration_id in [i for i in self._synced if i not in seen]:
            self.remove_account(integration_id)
            del self._synced[integration_id]

    async def close(self) -> None:
        """Stop pending deliveries and the HTTP client."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- people and threads ----------------------------------------------------------------------

    def person(self, integration_id: str, psid: str, name: str | None = None) -> Person:
        """The person with this PSID on a Page (created on first use)."""
        key = (integration_id, psid)
        found = self.people.get(key)
        changed = found is None
        if found is None:
            found = self.people[key] = Person(psid=psid)
        if name and name != found.name:
            found.name = name
            changed = True
        if changed:
            self._save_person(integration_id, found)
        return found

    def thread(self, integration_id: str, psid: str) -> list[ThreadEntry]:
        """Both directions of a person's conversation with a Page."""
        return list(self.threads.get((integration_id, psid), []))

    def outbox(self, integration_id: str, psid: str) -> list[dict[str, Any]]:
        """Send API bodies the Page sent to `psid`, as received, oldest first."""
        return [e.body for e in self.thread(integration_id, psid) if e.direction == "out"]

    def sender_actions(self, integration_id: str, psid: str) -> list[str]:
        """The sender actions (`typing_on`, …) the Page sent to `psid`, oldest first."""
        return [a.action for a in self.actions if a.integration_id == integration_id and a.psid == psid]

    def find_entry(self, integration_id: str, mid: str) -> tuple[str, ThreadEntry] | None:
        """(psid, entry) of a message id."""
        for (iid, psid), entries in self.threads.items():
            if iid == integration_id:
                for entry in entries:
                    if entry.mid == mid:
                        return psid, entry
        return None

    def fail_next(self, integration_id: str, code: int, http_status: int | None = None, count: int = 1,
                  subcode: int | None = None, message: str | None = None) -> None:
        """Make the next `count` sends of a Page fail with a Graph error."""
        self.injected.setdefault(integration_id, []).append(
            InjectedError(code=code, http_status=http_status, remaining=count, subcode=subcode, message=message))

    def _append(self, integration_id: str, psid: str, entry: ThreadEntry) -> None:
        self.threads.setdefault((integration_id, psid), []).append(entry)
        self._journal.append(self._entry_record(integration_id, psid, entry))

    # --- the person's side (webhooks) -------------------------------------------------------------

    async def send_inbound(self, integration_id: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Have a person act; returns the mids, events and the gateway's HTTP statuses.

        `spec`: `from` (the PSID, required); any of `ref` (m.me?ref=: a Get Started postback
        carrying it on a new thread, a `referral` event on an existing one), `postback` (a payload
        string or {payload, title}), `text` (+ `quickReply`: a payload), `upload` (the id of a file the
        phone uploaded: an `image` or `file` attachment on the fake's CDN), `image` (a URL) or
        `attachment` ({type, url}); optional `name`, `at` (Unix seconds of the action), `replyTo`.
        """
        account = self.accounts[integration_id]
        psid = spec.get("from")
        if not isinstance(psid, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", psid):
            raise ValueError("'from' must be a PSID ([A-Za-z0-9_.-], up to 64 characters)")
        name = spec.get("name") if isinstance(spec.get("name"), str) else None
        at = spec.get("at")
        if at is not None and (not isinstance(at, int | float) or isinstance(at, bool) or at <= 0):
            raise ValueError("'at' must be Unix seconds")
        when = float(at) if at is not None else time.time()
        new_thread = not self.threads.get((integration_id, psid))
        upload = upload_in(self.uploads, spec)
        if upload is not None:
            kind = "image" if MEDIA_RULES["messenger"].kind_of(upload) == "photo" else "file"
            spec = {**spec, "attachment": {"type": kind, "url": self.cdn_url(upload, when)}}
            spec.pop("image", None)
        person = self.person(integration_id, psid, name)
        events = self._inbound_events(account, psid, spec, new_thread)
        if not events:
            raise ValueError("give one of text, ref, postback, upload, image, attachment")
        statuses: list[int] = []
        mids: list[str] = []
        for offset, event in enumerate(events):
            ms = int(when * 1000) + offset
            event = {"sender": {"id": psid}, "recipient": {"id": account.page_id}, "timestamp": ms, **event}
            mid = (event.get("message") or event.get("postback") or {}).get("mid")
            if mid:
                mids.append(mid)
            media = ([self.uploads.view(upload)] if upload is not None and self.uploads is not None
                     and "message" in event and event["message"].get("attachments") else [])
            self._append(integration_id, psid, ThreadEntry("in", mid or "", ms / 1000, event, media=media))
            person.last_user_at = max(person.last_user_at or 0.0, ms / 1000)
            statuses.append(await self.deliver(account, [event]))
        self._save_person(integration_id, person)
        return {"mids": mids, "mid": mids[-1] if mids else None, "events": len(events),
                "webhookStatus": max(statuses, key=lambda s: (s != 200, s)), "webhookStatuses": statuses}

    def cdn_url(self, upload: Upload, now: float | None = None) -> str:
        """Where an attachment the person sent is on the fake's CDN (as on Meta's: a path that ends
        in the file's name, `oe` its expiry in hex seconds)."""
        bucket = "t1.15752-9" if upload.is_image else "t59.2708-21"
        expiry = int((now if now is not None else time.time()) + CDN_URL_SECONDS)
        return (f"{self.gateway_url}/sandbox/messenger-cdn/v/{bucket}/{upload.id}/{quote(upload.name)}"
                f"?_nc_cat=1&_nc_sid=b8a5f8&oe={expiry:08X}")

    @staticmethod
    def _inbound_events(account: Account, psid: str, spec: dict[str, Any], new_thread: bool) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        ref = spec.get("ref")
        if ref is not None:
            if not isinstance(ref, str) or not ref or len(ref) > 2083:
                raise ValueError("'ref' must be a non-empty string of at most 2083 characters")
            referral = {"ref": ref, "source": "SHORTLINK", "type": "OPEN_THREAD"}
            if new_thread:
                # A new conversation opened from m.me?ref=: the ref rides on Get Started (§2.3).
                events.append({"postback": {"title": "Get Started", "payload": "GET_STARTED", "mid": new_mid(),
                                            "referral": referral}})
            else:
                events.append({"referral": referral})
        postback = spec.get("postback")
        if postback is not None:
            if isinstance(postback, str):
                postback = {"payload": postback, "title": postback}
            if not isinstance(postback, dict) or not isinstance(postback.get("payload"), str):
                raise ValueError("'postback' must be a payload string or {payload, title}")
            events.append({"postback": {"title": str(postback.get("title") or postback["payload"]),
                                        "payload": postback["payload"], "mid": new_mid()}})
        message: dict[str, Any] = {}
        text = spec.get("text")
        if text is not None:
            if not isinstance(text, str) or not text:
                raise ValueError("'text' must be a non-empty string")
            message["text"] = text
            quick = spec.get("quickReply")
            if quick is not None:
                if not isinstance(quick, str) or not quick:
                    raise ValueError("'quickReply' must be a payload string")
                message["quick_reply"] = {"payload": quick}
        attachment = spec.get("attachment")
        if isinstance(spec.get("image"), str):
            attachment = {"type": "image", "url": spec["image"]}
        if attachment is not None:
            if not isinstance(attachment, dict) or not isinstance(attachment.get("type"), str):
                raise ValueError("'attachment' must be {type, url}")
            payload: dict[str, Any] = {}
            if isinstance(attachment.get("url"), str):
                payload["url"] = attachment["url"]
            if isinstance(attachment.get("stickerId"), int):
                payload["sticker_id"] = attachment["stickerId"]
            message["attachments"] = [{"type": attachment["type"], "payload": payload}]
        if message:
            reply_to = spec.get("replyTo")
            if isinstance(reply_to, str) and reply_to:
                message["reply_to"] = {"mid": reply_to}
            events.append({"message": {"mid": new_mid(), **message}})
        return events

    async def send_read(self, integration_id: str, psid: str, watermark: float | None = None) -> int:
        """The person reads the thread: a `read` receipt up to now (or `watermark`, Unix seconds)."""
        account = self.accounts[integration_id]
        mark = time.time() if watermark is None else watermark
        for entry in self.threads.get((integration_id, psid), []):
            if entry.direction == "out" and entry.at <= mark and entry.status != "read":
                entry.status = "read"
                self._save_status(integration_id, entry)
        return await self.deliver(account, [{"sender": {"id": psid}, "recipient": {"id": account.page_id},
                                             "timestamp": int(time.time() * 1000),
                                             "read": {"watermark": int(mark * 1000)}}])

    async def send_delivery(self, integration_id: str, psid: str, mids: list[str]) -> int:
        """The person's device received messages: a `delivery` receipt naming them."""
        account = self.accounts[integration_id]
        now = time.time()
        for mid in mids:
            found = self.find_entry(integration_id, mid)
            if found is not None and found[1].status not in ("read", "delivered"):
                found[1].status = "delivered"
                self._save_status(integration_id, found[1])
        return await self.deliver(account, [{"sender": {"id": psid}, "recipient": {"id": account.page_id},
                                             "timestamp": int(now * 1000),
                                             "delivery": {"mids": mids, "watermark": int(now * 1000)}}])

    def payload(self, account: Account, events: list[dict[str, Any]]) -> dict[str, Any]:
        """The notification envelope Meta wraps around Page events (§2.2)."""
        return {"object": "page", "entry": [{"id": account.page_id, "time": int(time.time() * 1000),
                                             "messaging": events}]}

    async def deliver(self, account: Account, events: list[dict[str, Any]]) -> int:
        """Sign and POST one notification to the Page's webhook; the gateway's status (0: unreachable)."""
        body = json.dumps(self.payload(account, events), ensure_ascii=True).encode()
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: signature(account.app_secret, body),
                   "X-Hub-Signature": legacy_signature(account.app_secret, body), "User-Agent": "facebookexternalua"}
        status = 0
        with _tracer.start_as_current_span("POST messenger webhook", kind=SpanKind.CLIENT) as span:
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
        """Run Meta's subscription handshake against the Page's webhook: (status, body)."""
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

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _after_send(self, account: Account, psid: str, mid: str) -> None:
        # One person's receipts go out in order, like a phone acknowledging one message after another.
        lock = self._locks.setdefault((account.integration_id, psid), asyncio.Lock())
        async with lock:
            if account.integration_id in self.accounts:
                await self.send_delivery(account.integration_id, psid, [mid])

    # --- Send API -----------------------------------------------------------------------------------

    def routes(self, prefix: str = "/sandbox") -> list[web.RouteDef]:
        """The fake's HTTP routes, mounted under `prefix`."""
        p = prefix.rstrip("/")
        s = sunco_errors  # the scripting API is ours, so it answers errors like the business API
        return [
            web.post(f"{p}/messenger-graph/{_VERSION}/{{page_id}}/messages", self._send_api),
            web.get(f"{p}/messenger-cdn/v/{{bucket}}/{{upload_id}}/{{name}}", self._cdn),
            web.post(f"{p}/messenger/{{integration_id}}/inbound", s(self._script_inbound)),
            web.post(f"{p}/messenger/{{integration_id}}/read", s(self._script_read)),
            web.post(f"{p}/messenger/{{integration_id}}/fail-next", s(self._script_fail_next)),
            web.post(f"{p}/messenger/{{integration_id}}/verify", s(self._script_verify)),
            web.post(f"{p}/messenger/{{integration_id}}/window", s(self._script_window)),
            web.get(f"{p}/messenger/{{integration_id}}/outbox", s(self._script_outbox)),
            web.get(f"{p}/messenger/{{integration_id}}/thread", s(self._script_thread)),
            web.get(f"{p}/messenger/{{integration_id}}", s(self._script_account)),
        ]

    @staticmethod
    def _token(request: web.Request) -> str:
        header = request.headers.get("Authorization", "")
        return header[7:] if header.lower().startswith("bearer ") else request.query.get("access_token", "")

    @staticmethod
    async def _send_body(request: web.Request) -> dict[str, Any] | None:
        raw = await request.read()
        if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            try:
                form = await request.post()
            except ValueError:  # undecodable text, a broken multipart body
                return None
            body: dict[str, Any] = {}
            for key, value in form.items():
                text = value if isinstance(value, str) else ""
                # Form fields hold JSON strings for objects (`recipient={"id":"…"}`).
                if text[:1] in ("{", "["):
                    try:
                        body[key] = decode_json(text)
                        continue
                    except ValueError:
                        return None
                body[key] = text
            return body
        try:
            doc = decode_json(raw)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    async def _send_api(self, request: web.Request) -> web.Response:
        token = self._token(request)
        account = self.account_by_page_id(request.match_info["page_id"], token)
        if account is None:
            return graph_error(100, 400, f"(#100) Unsupported post request. Object with ID "
                                         f"'{request.match_info['page_id']}' does not exist, cannot be loaded due "
                                         f"to missing permissions, or does not support this operation.", 33)
        if not token or not secrets_equal(account.page_access_token, token):
            return graph_error(190, 401)
        body = await self._send_body(request)
        if body is None:
            return graph_error(100, 400, "(#100) The request body is not valid JSON.")
        record = SendRequest(account.integration_id, request.path, body)
        self.requests.append(record)
        response = self._send(account, body)
        record.status = response.status
        return response

    def _send(self, account: Account, body: dict[str, Any]) -> web.Response:
        recipient = body.get("recipient")
        psid = recipient.get("id") if isinstance(recipient, dict) else None
        if not isinstance(psid, str) or not psid:
            return graph_error(100, 400, "(#100) The parameter recipient is required")
        message, action = body.get("message"), body.get("sender_action")
        if message is None and action is None:
            return graph_error(100, 400, "(#100) Must send either message or sender action")
        if message is not None and action is not None:
            return graph_error(100, 400, "(#100) sender_action cannot be sent with message")
        if action is not None and action not in SENDER_ACTIONS:
            return graph_error(100, 400, "(#100) Param sender_action must be one of {MARK_SEEN, TYPING_ON, "
                                         "TYPING_OFF}")
        person = self.people.get((account.integration_id, psid))
        if person is None:
            return graph_error(100, 400, "(#100) No matching user found", 2018001)
        if message is not None:
            problem = validate_message(body, message)
            if problem is not None:
                return graph_error(100, 400, problem)
        if message is None:
            # Scripted failures (`fail_next`) are for messages: a typing indicator never eats one.
            self._sender_action(account.integration_id, person, str(action))
            return web.json_response({"recipient_id": psid})
        injected = self.injected.get(account.integration_id)
        if injected:
            error = injected[0]
            error.remaining -= 1
            if error.remaining <= 0:
                injected.pop(0)
            return graph_error(error.code, error.http_status, error.message, error.subcode)
        if self.enforce_window and not self._window_allows(person, body):
            return graph_error(10, 400)
        mid = new_mid()
        person.typing_until = 0.0  # a message ends the typing indicator
        self._append(account.integration_id, psid, ThreadEntry("out", mid, time.time(), body, status="sent"))
        if self.auto_statuses:
            self._spawn(self._after_send(account, psid, mid))
        return web.json_response({"recipient_id": psid, "message_id": mid})

    def _sender_action(self, integration_id: str, person: Person, action: str) -> None:
        now = time.time()
        self.actions.append(SenderAction(integration_id, person.psid, action, now))
        del self.actions[:-MAX_SENDER_ACTIONS]  # a sandbox runs for days: keep the recent ones
        if action == "typing_on":
            person.typing_until = now + TYPING_SECONDS
        elif action == "typing_off":
            person.typing_until = 0.0
        else:
            person.seen_at = now

    @staticmethod
    def _window_allows(person: Person, body: dict[str, Any]) -> bool:
        if body.get("messaging_type") == "MESSAGE_TAG" and body.get("tag") != "HUMAN_AGENT":
            return True  # non-promotional update tags work outside the window
        if person.last_user_at is None:
            return False
        elapsed = time.time() - person.last_user_at
        limit = HUMAN_AGENT_SECONDS if body.get("tag") == "HUMAN_AGENT" else WINDOW_SECONDS
        return elapsed <= limit

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        """An attachment the person sent, as Meta's CDN serves it (no token; 403 once expired)."""
        try:
            expiry = int(request.query.get("oe", ""), 16)
        except ValueError:
            return web.Response(status=403, text="Bad URL hash")
        if expiry < time.time():
            return web.Response(status=403, text="URL signature expired")
        upload = self.uploads.get(request.match_info["upload_id"]) if self.uploads is not None else None
        if upload is None or self.uploads is None:
            return web.Response(status=404, text="Not Found")
        return self.uploads.response(upload)

    # --- scripting routes --------------------------------------------------------------------------

    def _account_or_404(self, request: web.Request) -> Account:
        account = self.accounts.get(request.match_info["integration_id"])
        if account is None:
            raise ApiError(404, "Unknown Messenger integration in the sandbox")
        return account

    async def _script_inbound(self, request: web.Request) -> web.Response:
        account = self._account_or_404(request)
        spec = await read_json_object(request, MAX_BODY)
        try:
            result = await self.send_inbound(account.integration_id, spec)
        except (ValueError, KeyError, TypeError) as exc:
            raise ApiError(400, str(exc)) from exc
        return web.json_response(result)

    async def _script_read(self, request: web.Request) -> web.Response:
        account = self._account_or_404(request)
        spec = await read_json_object(request, MAX_BODY)
        to = spec.get("to")
        if not isinstance(to, str) or not to:
            raise ApiError(400, "need to")
        return web.json_response({"webhookStatus": await self.send_read(account.integration_id, to)})

    async def _script_fail_next(self, request: web.Request) -> web.Response:
        account = self._account_or_404(request)
        spec = await read_json_object(request, MAX_BODY)
        code, http_status, count = spec.get("code"), spec.get("httpStatus"), spec.get("count", 1)
        subcode = spec.get("subcode")
        if (not isinstance(code, int) or not isinstance(count, int) or count < 1
                or (http_status is not None and not isinstance(http_status, int))
                or (subcode is not None and not isinstance(subcode, int))):
            raise ApiError(400, "need integer code, optional httpStatus/subcode and count >= 1")
        message = spec.get("message") if isinstance(spec.get("message"), str) else None
        self.fail_next(account.integration_id, code, http_status, count, subcode, message)
        return web.json_response({"queued": sum(e.remaining for e in self.injected[account.integration_id])})

    async def _script_verify(self, request: web.Request) -> web.Response:
        account = self._account_or_404(request)
        spec = await read_json_object(request, MAX_BODY)
        token = spec.get("verifyToken") if isinstance(spec.get("verifyToken"), str) else None
        challenge = str(spec.get("challenge") or "1158201444")
        status, text = await self.verify_webhook(account.integration_id, challenge, token)
        return web.json_response({"webhookStatus": status, "body": text, "ok": status == 200 and text == challenge})

    async def _script_window(self, request: web.Request) -> web.Response:
        account = self._account_or_404(request)
        spec = await read_json_object(request, MAX_BODY)
        to, hours_ago = spec.get("to"), spec.get("hoursAgo", 0)
        if not isinstance(to, str) or not to or not isinstance(hours_ago, int | float):
            raise ApiError(400, "need to (and optional hoursAgo)")
        person = self.person(account.integration_id, to)
        person.last_user_at = time.time() - float(hours_ago) * 3600 if spec.get("open", True) else None
        self._save_person(account.integration_id, person)
        return web.json_response({"lastUserAt": person.last_user_at})

    async def _script_outbox(self, request: web.Request) -> web.Response:
        account = self._account_or_404(request)
        to = request.query.get("to", "")
        if not to:
            raise ApiError(400, "need ?to=")
        return web.json_response({"messages": self.outbox(account.integration_id, to)})

    async def _script_thread(self, request: web.Request) -> web.Response:
        account = self._account_or_404(request)
        to = request.query.get("to", "")
        if not to:
            raise ApiError(400, "need ?to=")
        person = self.people.get((account.integration_id, to))
        return web.json_response({
            "messages": [e.view() for e in self.thread(account.integration_id, to)],
            "person": {"psid": person.psid, "name": person.name, "lastUserAt": person.last_user_at,
                       "typing": person.typing, "seenAt": person.seen_at} if person else None,
            "senderActions": [a.view() for a in self.actions
                              if a.integration_id == account.integration_id and a.psid == to],
        })

    async def _script_account(self, request: web.Request) -> web.Response:
        account = self._account_or_404(request)
        return web.json_response({"integrationId": account.integration_id, "pageId": account.page_id,
                                  "webhookUrl": account.webhook_url, "link": f"https://m.me/{account.page_id}"})


# --- what Meta accepts in a message -------------------------------------------------------------------

def _is_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _string(value: Any, where: str, limit: int) -> str | None:
    """Meta's complaint about a required string (non-empty, at most `limit` characters), or None."""
    if not isinstance(value, str) or not value.strip():
        return f"(#100) param {where} must be a non-empty UTF-8 encoded string"
    if len(value) > limit:
        return f"(#100) Length of param {where} must be less than or equal to {limit}"
    return None


def validate_message(body: dict[str, Any], message: Any) -> str | None:
    """What Meta would refuse in a Send API body's tagging and `message` (the `(#100)` error
    message), or None when it is sendable (platform reference §2.4; Meta's Send API reference)."""
    messaging_type = body.get("messaging_type")
    if messaging_type not in ("RESPONSE", "UPDATE", "MESSAGE_TAG"):
        return "(#100) param messaging_type must be one of {RESPONSE, UPDATE, MESSAGE_TAG}"
    if messaging_type == "MESSAGE_TAG" and body.get("tag") not in TAGS:
        return "(#100) Param tag must be a valid message tag when messaging_type is MESSAGE_TAG"
    if not isinstance(message, dict):
        return "(#100) param message must be an object"
    text, attachment = message.get("text"), message.get("attachment")
    if (text is None) == (attachment is None):
        return "(#100) Must send either text or attachment in message"
    if text is not None:
        problem = _string(text, "message[text]", TEXT_MAX)
        if problem is not None:
            return problem
    if attachment is not None:
        problem = _attachment_problem(attachment)
        if problem is not None:
            return problem
    return _quick_replies_problem(message.get("quick_replies"))


def _attachment_problem(attachment: Any) -> str | None:
    where = "message[attachment]"
    if not isinstance(attachment, dict) or attachment.get("type") not in ATTACHMENT_TYPES:
        return f"(#100) param {where}[type] must be one of {{image, video, audio, file, template}}"
    payload = attachment.get("payload")
    if not isinstance(payload, dict):
        return f"(#100) param {where}[payload] is required"
    if attachment["type"] != "template":
        if payload.get("attachment_id"):
            return None
        if not _is_url(payload.get("url")):
            return f"(#100) param {where}[payload][url] must be a valid http(s) URL"
        return None
    kind = payload.get("template_type")
    if kind not in TEMPLATE_TYPES:
        return f"(#100) param {where}[payload][template_type] must be one of {{{', '.join(sorted(TEMPLATE_TYPES))}}}"
    where = f"{where}[payload]"
    if kind == "button":
        return (_string(payload.get("text"), f"{where}[text]", BUTTON_TEXT_MAX)
                or _buttons_problem(payload.get("buttons"), f"{where}[buttons]", required=True))
    if kind == "generic":
        ratio = payload.get("image_aspect_ratio")
        if ratio is not None and ratio not in ("horizontal", "square"):
            return f"(#100) param {where}[image_aspect_ratio] must be one of {{horizontal, square}}"
        elements = payload.get("elements")
        if not isinstance(elements, list) or not 1 <= len(elements) <= MAX_ELEMENTS:
            return f"(#100) param {where}[elements] must be an array of 1 to {MAX_ELEMENTS} elements"
        for index, element in enumerate(elements):
            problem = _element_problem(element, f"{where}[elements][{index}]")
            if problem is not None:
                return problem
    return None


def _element_problem(element: Any, where: str) -> str | None:
    if not isinstance(element, dict):
        return f"(#100) param {where} must be an object"
    problem = _string(element.get("title"), f"{where}[title]", ELEMENT_TEXT_MAX)
    if problem is not None:
        return problem
    if element.get("subtitle") is not None:
        problem = _string(element["subtitle"], f"{where}[subtitle]", ELEMENT_TEXT_MAX)
        if problem is not None:
            return problem
    if element.get("image_url") is not None and not _is_url(element["image_url"]):
        return f"(#100) param {where}[image_url] must be a valid http(s) URL"
    default = element.get("default_action")
    if default is not None:
        if not isinstance(default, dict) or default.get("type") != "web_url" or not _is_url(default.get("url")):
            return f"(#100) param {where}[default_action] must be a web_url with a valid URL"
        if "title" in default:
            return f"(#100) param {where}[default_action] must not have a title"
    if element.get("buttons") is not None:
        problem = _buttons_problem(element["buttons"], f"{where}[buttons]", required=True)
        if problem is not None:
            return problem
    if not any(element.get(k) for k in ("subtitle", "image_url", "buttons")):
        return ("(#100) Incomplete element data: title and at least one other field (image url, subtitle or "
                "buttons) is required with non-empty value")
    return None


def _buttons_problem(buttons: Any, where: str, required: bool) -> str | None:
    if not isinstance(buttons, list) or not (1 if required else 0) <= len(buttons) <= MAX_BUTTONS:
        return f"(#100) param {where} must be an array of 1 to {MAX_BUTTONS} buttons"
    for index, button in enumerate(buttons):
        at = f"{where}[{index}]"
        if not isinstance(button, dict) or button.get("type") not in BUTTON_TYPES:
            return f"(#100) param {at}[type] must be one of {{{', '.join(sorted(BUTTON_TYPES))}}}"
        kind = button["type"]
        if kind in ("postback", "web_url", "phone_number", "game_play"):
            problem = _string(button.get("title"), f"{at}[title]", BUTTON_TITLE_MAX)
            if problem is not None:
                return problem
        if kind == "postback":
            problem = _string(button.get("payload"), f"{at}[payload]", PAYLOAD_MAX)
            if problem is not None:
                return problem
        elif kind in ("web_url", "account_link"):
            if not _is_url(button.get("url")):
                return f"(#100) param {at}[url] must be a valid http(s) URL"
            ratio = button.get("webview_height_ratio")
            if ratio is not None and ratio not in ("compact", "tall", "full"):
                return f"(#100) param {at}[webview_height_ratio] must be one of {{compact, tall, full}}"
        elif kind == "phone_number":
            number = button.get("payload")
            if not isinstance(number, str) or not re.fullmatch(r"\+[0-9]{6,15}", number):
                return f"(#100) param {at}[payload] must be a phone number starting with +"
    return None


def _quick_replies_problem(replies: Any) -> str | None:
    if replies is None:
        return None
    where = "message[quick_replies]"
    if not isinstance(replies, list) or not 1 <= len(replies) <= MAX_QUICK_REPLIES:
        return f"(#100) param {where} must be an array of 1 to {MAX_QUICK_REPLIES} elements"
    for index, reply in enumerate(replies):
        at = f"{where}[{index}]"
        if not isinstance(reply, dict):
            return f"(#100) param {at} must be an object"
        kind = reply.get("content_type")
        if kind == "location":
            return f"(#100) param {at}[content_type] location is no longer supported"
        if kind not in ("text", "user_phone_number", "user_email"):
            return f"(#100) param {at}[content_type] must be one of {{text, user_phone_number, user_email}}"
        if kind != "text":
            continue
        problem = (_string(reply.get("title"), f"{at}[title]", QUICK_REPLY_TITLE_MAX)
                   or _string(reply.get("payload"), f"{at}[payload]", PAYLOAD_MAX))
        if problem is not None:
            return problem
        if reply.get("image_url") is not None and not _is_url(reply["image_url"]):
            return f"(#100) param {at}[image_url] must be a valid http(s) URL"
    return None


_FAKE_PATH = re.compile(r"/sandbox/messenger-graph/?$")


def points_at_sandbox(base_url: str) -> bool:
    """True when a Graph base URL is the sandbox's fake (`…/sandbox/messenger-graph`)."""
    return bool(_FAKE_PATH.search(base_url))


def gateway_base(public_url: str) -> str:
    """The gateway's public base URL from what the sandbox passes (it may end in `/sandbox`)."""
    url = public_url.rstrip("/")
    return url[: -len("/sandbox")] if url.endswith("/sandbox") else url

