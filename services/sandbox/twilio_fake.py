"""A wire-accurate fake of Twilio Programmable Messaging plus a scriptable customer phone.

`FakeTwilio` needs no NATS: register accounts with `add_account(...)` (or let the sandbox `sync`
them from integration records whose `baseUrl` is `…/sandbox/twilio-api`), mount `routes(prefix)`
on an aiohttp app, and it behaves like Twilio towards a gateway (platform reference §5):

- the REST API (`{prefix}/twilio-api/2010-04-01/Accounts/{AccountSid}/Messages.json`): HTTP Basic
  `AccountSid:AuthToken`, form-encoded parameters validated as Twilio does, answered 201 with the
  Message resource JSON, errors in Twilio's envelope `{code, message, more_info, status}`;
  fetch a message (`Messages/{Sid}.json`) and the media of inbound MMS (`…/Media/{MediaSid}`: a
  file the phone uploaded is answered as Twilio answers, with a redirect to where the file is);
- form-encoded webhooks signed with `X-Twilio-Signature` over the exact webhook URL configured for
  the number (the gateway's public URL, through its proxy): inbound SMS/MMS (STOP/START keywords
  opt the customer out/in, as Twilio's Advanced Opt-Out does) and status callbacks
  (`sent`, `delivered`, or `undelivered`/`failed` with `ErrorCode`) to each message's StatusCallback;
- scripting (`{prefix}/twilio/{integrationId}/...`): inbound messages, late statuses, injected
  send errors, the outbox and the whole thread per customer (each text with the segments it
  costs, and the numbered choices the business's latest texts offer), errors in SunCo's shape.

With a `store_path` threads, Message resources, MMS media and opt-outs survive a restart (JSON
lines, replayed and compacted when the fake is created), like `FakeWhatsApp`'s.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import mimetypes
import os
import re
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qsl, urlencode

import aiohttp
from aiohttp import web
from opentelemetry.trace import SpanKind

from services.sandbox.scripting import read_json_object, sunco_errors
from services.sandbox.uploads import MEDIA_RULES, Uploads
from shared.http import ApiError
from shared.records import IntegrationRecord
from shared.tasks import cancel_and_wait
from shared.telemetry import inject_headers, tracer
from shared.twilio_wire import (
    API_VERSION,
    ERROR_TITLES,
    FORM_CONTENT_TYPE,
    MAX_BODY_CHARS,
    MAX_MEDIA,
    SIGNATURE_HEADER,
    more_info,
    sms_segments,
    twilio_signature,
)
from shared.untrusted import secrets_equal

from .journal import Journal

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

MAX_BODY = 256 * 1024
STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"})
START_WORDS = frozenset({"START", "YES", "UNSTOP"})
HELP_WORDS = frozenset({"HELP", "INFO"})
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
# A numbered choice as the gateway writes one on a line of its own (`shared.render`): "2. Medium".
_CHOICE_LINE = re.compile(r"^(\d{1,2})\. (.+)$")
# A 1x1 transparent PNG: what an inbound MMS without a real link serves.
TINY_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII=")
_FAKE_PATH = re.compile(r"/sandbox/twilio-api/?$")


def points_at_sandbox(base_url: str) -> bool:
    """True when a Twilio base URL is the sandbox's fake (`…/sandbox/twilio-api`)."""
    return bool(_FAKE_PATH.search(base_url))


def new_sid(prefix: str) -> str:
    """A Twilio SID: two letters and 32 hex digits."""
    return prefix + os.urandom(16).hex()


def twilio_error(code: int, http_status: int = 400, message: str | None = None) -> web.Response:
    """Twilio's REST error envelope (§5.5)."""
    body: dict[str, Any] = {"code": code, "message": message or ERROR_TITLES.get(code, "Error"),
                            "more_info": more_info(code), "status": http_status}
    if code == 20003:
        body = {"code": 20003, "detail": "Your AccountSid or AuthToken was incorrect.", "message": "Authenticate",
                "more_info": more_info(20003), "status": 401}
    return web.json_response(body, status=http_status)


def _address(value: str) -> str:
    return value.removeprefix("whatsapp:")


def form_view(form: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """A form as the scripting API shows it: `MediaUrl` always a list, other names their (last) value."""
    out: dict[str, Any] = {}
    for name, value in form:
        if name == "MediaUrl":
            out.setdefault("MediaUrl", []).append(value)
        else:
            out[name] = value
    return out


@dataclass
class Account:
    """One simulated Twilio number (or Messaging Service) of one integration."""

    integration_id: str
    account_sid: str
    auth_token: str
    phone_number: str
    webhook_url: str
    messaging_service_sid: str = ""


@dataclass
class ThreadEntry:
    """One message in a customer's thread, either direction."""

    direction: str  # "in" (customer → business) or "out" (business → customer)
    sid: str
    at: float
    body: dict[str, Any]
    status: str = ""
    error_code: int | None = None
    status_callback: str = ""
    # A file the phone sent (the upload's view: what the phone shows of it).
    media: list[dict[str, Any]] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        """JSON shape for the scripting API and the phone page (with the segments its text costs)."""
        out: dict[str, Any] = {"direction": self.direction, "sid": self.sid, "at": self.at, "body": self.body,
                               "status": self.status}
        if self.media:
            out["media"] = self.media
        text = self.body.get("Body")
        if isinstance(text, str) and text:
            out["segments"] = sms_segments(text).count
        if self.error_code is not None:
            out["errorCode"] = self.error_code
        return out


@dataclass
class InjectedError:
    """A scripted synchronous send error (after `skip` sends that go through)."""

    code: int
    http_status: int
    remaining: int
    skip: int = 0


@dataclass
class WebhookDelivery:
    """A webhook the fake posted, with the gateway's answer (0: unreachable)."""

    integration_id: str
    url: str
    form: list[tuple[str, str]]
    body: bytes
    headers: dict[str, str]
    status: int
    response_type: str = ""
    response_body: str = ""


@dataclass
class FakeTwilio:
    """The fake Twilio; see the module docstring."""

    # Where `routes(prefix)` is reachable from outside (for media URLs), e.g. `{public}/sandbox`.
    public_url: str = ""
    # The gateway's public base URL: webhooks default to `{gateway_url}/webhooks/twilio/{id}`.
    gateway_url: str = ""
    auto_statuses: bool = True
    integration_type: str = "twilio"
    accounts: dict[str, Account] = field(default_factory=dict)
    threads: dict[tuple[str, str], list[ThreadEntry]] = field(default_factory=dict)
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)
    media: dict[str, dict[str, Any]] = field(default_factory=dict)
    opted_out: set[tuple[str, str]] = field(default_factory=set)
    injected: dict[str, list[InjectedError]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    webhooks: list[WebhookDelivery] = field(default_factory=list)
    _session: aiohttp.ClientSession | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    # Where the journal of threads, resources, media and opt-outs lives (None: memory only).
    store_path: str | None = None
    # The files the phones uploaded (`{"upload": id}` in an inbound spec).
    uploads: Uploads | None = None
    _journal: Journal = field(init=False)

    def __post_init__(self) -> None:
        self.public_url = self.public_url.rstrip("/")
        if not self.gateway_url:
            self.gateway_url = self.public_url.removesuffix("/sandbox")
        self.gateway_url = self.gateway_url.rstrip("/")
        self._journal = Journal(self.store_path)
        lines = self._journal.replay(self._apply)
        self._journal.compact(self._snapshot(), lines)  # after the replay: the live state

    # --- persistence -----------------------------------------------------------------------------

    def _apply(self, record: dict[str, Any]) -> None:
        kind = record["kind"]
        if kind == "entry":
            code = record.get("errorCode")
            entry = ThreadEntry(record["direction"], str(record["sid"]), float(record["at"]), dict(record["body"]),
                                status=str(record.get("status") or ""),
                                error_code=int(code) if code is not None else None,
                                status_callback=str(record.get("statusCallback") or ""),
                                media=list(record.get("media") or []))
            self.threads.setdefault((record["integrationId"], record["number"]), []).append(entry)
        elif kind == "status":
            found = self.find(record["integrationId"], record["sid"])
            if found is not None:
                code = record.get("errorCode")
                found[1].status = str(record["status"])
                found[1].error_code = int(code) if code is not None else None
        elif kind == "message":
            self.messages[str(record["sid"])] = dict(record["resource"])
        elif kind == "media":
            self.media[str(record["id"])] = dict(record["media"])
        elif kind == "optout":
            key = (str(record["integrationId"]), str(record["number"]))
            if record["out"]:
                self.opted_out.add(key)
            else:
                self.opted_out.discard(key)

    def _snapshot(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = [{"kind": "message", "sid": sid, "resource": r}
                                         for sid, r in self.messages.items()]
        records += [{"kind": "media", "id": media_id, "media": m} for media_id, m in self.media.items()]
        records += [{"kind": "optout", "integrationId": iid, "number": n, "out": True} for iid, n in self.opted_out]
        for (integration_id, number), entries in self.threads.items():
            records += [self._entry_record(integration_id, number, e) for e in entries]
        return records

    @staticmethod
    def _entry_record(integration_id: str, number: str, entry: ThreadEntry) -> dict[str, Any]:
        return {"kind": "entry", "integrationId": integration_id, "number": number, "direction": entry.direction,
                "sid": entry.sid, "at": entry.at, "body": entry.body, "status": entry.status,
                "errorCode": entry.error_code, "statusCallback": entry.status_callback, "media": entry.media}

    def _save_opt_out(self, key: tuple[str, str], out: bool) -> None:
        if out == (key in self.opted_out):
            return
        if out:
            self.opted_out.add(key)
        else:
            self.opted_out.discard(key)
        self._journal.append({"kind": "optout", "integrationId": key[0], "number": key[1], "out": out})

    # --- lifecycle and accounts ----------------------------------------------------------------

    async def close(self) -> None:
        """Cancel pending status callbacks and close the HTTP client."""
        await cancel_and_wait(list(self._tasks))
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait until scheduled status callbacks have been delivered."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    def default_webhook_url(self, integration_id: str) -> str:
        """The gateway's public inbound webhook URL for an integration."""
        return f"{self.gateway_url}/webhooks/twilio/{integration_id}"

    def add_account(self, integration_id: str, account_sid: str, auth_token: str, phone_number: str,
                    webhook_url: str | None = None, *, messaging_service_sid: str = "") -> Account:
        """Register (or replace) a number whose inbound messages go to `webhook_url`."""
        account = Account(integration_id=integration_id, account_sid=account_sid, auth_token=auth_token,
                          phone_number=phone_number or "+15550002222",
                          webhook_url=webhook_url or self.default_webhook_url(integration_id),
                          messaging_service_sid=messaging_service_sid)
        self.accounts[integration_id] = account
        return account

    def remove_account(self, integration_id: str) -> None:
        """Forget a number."""
        self.accounts.pop(integration_id, None)

    def sync(self, records: Sequence[IntegrationRecord]) -> None:
        """Mirror the twilio integrations whose REST base URL is this fake."""
        seen: set[str] = set()
        for record in records:
            cfg = record.config
            if record.type != "twilio" or not points_at_sandbox(str(cfg.get("baseUrl") or "")):
                continue
            account_sid, auth_token = str(cfg.get("accountSid") or ""), str(cfg.get("authToken") or "")
            if not account_sid or not auth_token:
                continue
            seen.add(record.id)
            wanted = Account(integration_id=record.id, account_sid=account_sid, auth_token=auth_token,
                             phone_number=str(cfg.get("phoneNumber") or "+15550002222"),
                             webhook_url=str(cfg.get("webhookUrl") or self.default_webhook_url(record.id)),
                             messaging_service_sid=str(cfg.get("messagingServiceSid") or ""))
            if self.accounts.get(record.id) != wanted:
                self.accounts[record.id] = wanted
        for integration_id in [i for i in self.accounts if i not in seen]:
            del self.accounts[integration_id]

    # --- scripting (Python API; the HTTP scripting routes call these) ---------------------------

    def fail_next(self, integration_id: str, code: int, http_status: int = 400, count: int = 1,
                  skip: int = 0) -> None:
        """Make the next `count` sends of an account fail with a Twilio error (once `skip` more
        have gone through: the second text of a message split in two, say)."""
        self.injected.setdefault(integration_id, []).append(InjectedError(code, http_status, count, skip))

    def thread(self, integration_id: str, number: str) -> list[ThreadEntry]:
        """Both directions of a customer's conversation with a business number."""
        return list(self.threads.get((integration_id, _address(number)), []))

    def outbox(self, integration_id: str, number: str) -> list[dict[str, Any]]:
        """The Messages.json parameters of what the business sent to `number`, oldest first."""
        return [e.body for e in self.thread(integration_id, number) if e.direction == "out"]

    def choices(self, integration_id: str, number: str) -> list[dict[str, Any]]:
        """The numbered choices the business's latest texts offer (`1. Yes` lines), which the
        customer can answer with the number; none once the customer has written since.

        A message the gateway split into several texts numbers on across them, so the texts
        since the customer's last one are read back to the one whose choices start at 1.
        """
        offered: list[tuple[int, str]] = []
        for entry in reversed(self.thread(integration_id, number)):
            if entry.direction != "out":
                break
            text = entry.body.get("Body")
            lines = [m for m in (_CHOICE_LINE.match(line.strip()) for line in str(text or "").splitlines()) if m]
            offered = [(int(m.group(1)), m.group(2)) for m in lines] + offered
            if offered and offered[0][0] == 1:
                break
        if [n for n, _ in offered] != list(range(1, len(offered) + 1)):
            return []
        return [{"number": n, "label": label} for n, label in offered]

    def find(self, integration_id: str, sid: str) -> tuple[str, ThreadEntry] | None:
        """(customer number, entry) of a message SID."""
        for (iid, number), entries in self.threads.items():
            if iid == integration_id:
                for entry in entries:
                    if entry.sid == sid:
                        return number, entry
        return None

    async def send_inbound(self, integration_id: str, spec: dict[str, Any]) -> tuple[str, int]:
        """Have a customer text the business; returns (MessageSid, the gateway's HTTP status, 0 if unreachable).

        `spec`: `from` (E.164, required), `text`, `upload` (the id of a file the phone uploaded: the
        MMS's first media), `mediaUrl` (a URL or a list), `mediaContentType` (one or a list; guessed
        from the URL otherwise), `name` (WhatsApp-style ProfileName).
        """
        account = self.accounts[integration_id]
        sender = spec.get("from")
        if not isinstance(sender, str) or not _E164.match(_address(sender)):
            raise ValueError("'from' must be an E.164 phone number like +15551234567")
        text = spec.get("text", "")
        if not isinstance(text, str) or len(text) > MAX_BODY_CHARS:
            raise ValueError(f"'text' must be a string of at most {MAX_BODY_CHARS} characters")
        links = spec.get("mediaUrl") or []
        links = [links] if isinstance(links, str) else links
        types = spec.get("mediaContentType") or []
        types = [types] if isinstance(types, str) else types
        if not isinstance(links, list) or not all(isinstance(u, str) and u for u in links) or len(links) > MAX_MEDIA:
            raise ValueError("'mediaUrl' must be a URL or a list of at most 10 URLs")
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise ValueError("'mediaContentType' must be a string or a list of strings")
        upload = None
        if spec.get("upload") is not None:
            upload = self.uploads.get(spec["upload"]) if self.uploads is not None else None
            if upload is None:
                raise ValueError("'upload' must be the id of a file uploaded to /sandbox/uploads")
            MEDIA_RULES["twilio"].kind_of(upload)
            if len(links) >= MAX_MEDIA:
                raise ValueError("an MMS carries at most 10 media")
        # (link, content type, upload id) of each media, the uploaded file first.
        media_items: list[tuple[str | None, str | None, str | None]] = (
            [(None, upload.media_type, upload.id)] if upload is not None else [])
        media_items += [(link, types[index] if index < len(types) and types[index] else None, None)
                        for index, link in enumerate(links)]
        if not text and not media_items:
            raise ValueError("give 'text', 'upload' and/or 'mediaUrl'")
        sid = new_sid("MM" if media_items else "SM")
        number = _address(sender)
        country = "US" if number.startswith("+1") else ""
        form: list[tuple[str, str]] = [
            ("ToCountry", "US" if account.phone_number.startswith("+1") else ""), ("ToState", ""),
            ("SmsMessageSid", sid), ("NumMedia", str(len(media_items))), ("ToCity", ""), ("FromZip", ""),
            ("SmsSid", sid), ("FromState", ""), ("SmsStatus", "received"), ("FromCity", ""), ("Body", text),
            ("FromCountry", country), ("To", account.phone_number if not sender.startswith("whatsapp:")
                                       else f"whatsapp:{account.phone_number}"),
        ]
        if account.messaging_service_sid:
            form.append(("MessagingServiceSid", account.messaging_service_sid))
        form += [("ToZip", ""), ("NumSegments", str(max(1, sms_segments(text).count))),
                 ("ReferralNumMedia", "0"), ("MessageSid", sid), ("AccountSid", account.account_sid),
                 ("From", sender), ("ApiVersion", API_VERSION)]
        if isinstance(spec.get("name"), str) and spec["name"]:
            form.append(("ProfileName", spec["name"]))
        keyword = text.strip().upper()
        key = (integration_id, number)
        if keyword in STOP_WORDS:
            form.append(("OptOutType", "STOP"))
            self._save_opt_out(key, True)
        elif keyword in START_WORDS:
            form.append(("OptOutType", "START"))
            self._save_opt_out(key, False)
        elif keyword in HELP_WORDS:
            form.append(("OptOutType", "HELP"))
        for index, (link, declared, upload_id) in enumerate(media_items):
            guessed = mimetypes.guess_type(link.split("?", 1)[0])[0] if link else None
            content_type = declared or guessed or "image/jpeg"
            media_sid = new_sid("ME")
            self.media[media_sid] = {"link": link or "", "content_type": content_type,
                                     "account_sid": account.account_sid}
            if upload_id is not None:
                self.media[media_sid]["upload"] = upload_id
            self._journal.append({"kind": "media", "id": media_sid, "media": self.media[media_sid]})
            url = (f"{self.public_url}/twilio-api/{API_VERSION}/Accounts/{account.account_sid}"
                   f"/Messages/{sid}/Media/{media_sid}")
            form += [(f"MediaContentType{index}", content_type), (f"MediaUrl{index}", url)]
        shown = [self.uploads.view(upload)] if upload is not None and self.uploads is not None else []
        self._append(integration_id, number, ThreadEntry("in", sid, time.time(), form_view(form), status="received",
                                                         media=shown))
        status = await self.deliver(account, account.webhook_url, form)
        return sid, status

    async def send_status(self, integration_id: str, sid: str, status: str, error_code: int | None = None) -> int:
        """Post a status callback for a message the business sent; the gateway's HTTP status.

        Raises KeyError for an unknown message and ValueError when it had no StatusCallback.
        """
        account = self.accounts[integration_id]
        found = self.find(integration_id, sid)
        if found is None or found[1].direction != "out":
            raise KeyError(f"no outbound message {sid}")
        _number, entry = found
        if not entry.status_callback:
            raise ValueError(f"message {sid} was sent without a StatusCallback")
        entry.status = status
        if status in ("undelivered", "failed"):
            entry.error_code = error_code if error_code is not None else 30003
        resource = self.messages.get(sid)
        if resource is not None:
            resource["status"] = status
            resource["error_code"] = entry.error_code
            resource["date_updated"] = formatdate(usegmt=False).replace("-0000", "+0000")
            self._journal.append({"kind": "message", "sid": sid, "resource": resource})
        self._journal.append({"kind": "status", "integrationId": integration_id, "sid": sid, "status": status,
                              "errorCode": entry.error_code})
        form: list[tuple[str, str]] = []
        if entry.error_code is not None and status in ("undelivered", "failed"):
            form.append(("ErrorCode", str(entry.error_code)))
        form += [("SmsSid", sid), ("SmsStatus", status), ("MessageStatus", status), ("To", entry.body.get("To", "")),
                 ("MessageSid", sid), ("AccountSid", account.account_sid)]
        if entry.body.get("MessagingServiceSid"):
            form.append(("MessagingServiceSid", entry.body["MessagingServiceSid"]))
        form += [("From", entry.body.get("From") or account.phone_number), ("ApiVersion", API_VERSION)]
        if status in ("delivered", "undelivered"):
            form.append(("RawDlrDoneDate", time.strftime("%y%m%d%H%M", time.gmtime())))
        return await self.deliver(account, entry.status_callback, form)

    # --- webhook delivery ---------------------------------------------------------------------

    async def deliver(self, account: Account, url: str, form: list[tuple[str, str]]) -> int:
        """Sign (over `url`, as Twilio does) and POST one form; the gateway's status (0: unreachable)."""
        body = urlencode(form).encode()
        headers = {"Content-Type": FORM_CONTENT_TYPE, SIGNATURE_HEADER: twilio_signature(account.auth_token, url, form),
                   "User-Agent": "TwilioProxy/1.1", "I-Twilio-Idempotency-Token": os.urandom(16).hex(),
                   "Accept": "*/*"}
        status, response_type, response_body = 0, "", ""
        with _tracer.start_as_current_span("POST twilio webhook", kind=SpanKind.CLIENT) as span:
            span.set_attribute("http.request.method", "POST")
            try:
                async with self._client().post(url, data=body, headers=inject_headers(headers)) as resp:
                    response_body = (await resp.read()).decode("utf-8", "replace")
                    status, response_type = resp.status, resp.content_type
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("twilio webhook %s unreachable: %s", url, exc)
            span.set_attribute("http.response.status_code", status)
        self.webhooks.append(WebhookDelivery(account.integration_id, url, list(form), body, headers, status,
                                             response_type, response_body))
        return status

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self._session

    def _append(self, integration_id: str, number: str, entry: ThreadEntry) -> None:
        self.threads.setdefault((integration_id, number), []).append(entry)
        self._journal.append(self._entry_record(integration_id, number, entry))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _after_send(self, integration_id: str, sid: str, number: str) -> None:
        # One customer's callbacks go out in order, like a handset acknowledging one after another.
        async with self._locks.setdefault(f"{integration_id}:{number}", asyncio.Lock()):
            for status in ("sent", "delivered"):
                if integration_id not in self.accounts:
                    return
                await self.send_status(integration_id, sid, status)

    # --- REST API ---------------------------------------------------------------------------------

    def routes(self, prefix: str = "/sandbox") -> list[web.RouteDef]:
        """The fake's HTTP routes, mounted under `prefix`."""
        p = prefix.rstrip("/")
        api = f"{p}/twilio-api/{API_VERSION}/Accounts/{{account_sid}}"
        s = sunco_errors  # the scripting API is ours, so it answers errors like the business API
        return [
            web.post(f"{api}/Messages.json", self._create_message),
            web.get(f"{api}/Messages/{{sid}}.json", self._fetch_message),
            web.get(f"{api}/Messages/{{sid}}/Media/{{media_sid}}", self._media),
            web.post(f"{p}/twilio/{{integration_id}}/inbound", s(self._script_inbound)),
            web.post(f"{p}/twilio/{{integration_id}}/status", s(self._script_status)),
            web.post(f"{p}/twilio/{{integration_id}}/fail-next", s(self._script_fail_next)),
            web.get(f"{p}/twilio/{{integration_id}}/outbox", s(self._script_outbox)),
            web.get(f"{p}/twilio/{{integration_id}}/thread", s(self._script_thread)),
            web.get(f"{p}/twilio/{{integration_id}}", s(self._script_account)),
        ]

    def _authenticate(self, request: web.Request) -> Account | None:
        header = request.headers.get("Authorization", "")
        if not header.lower().startswith("basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        for account in self.accounts.values():
            if secrets_equal(account.account_sid, user) and secrets_equal(account.auth_token, password):
                return account
        return None

    def _account_for(self, request: web.Request) -> Account | web.Response:
        account = self._authenticate(request)
        if account is None:
            return twilio_error(20003, 401)
        if account.account_sid != request.match_info["account_sid"]:
            return twilio_error(20404, 404, f"The requested resource {request.path} was not found")
        return account

    async def _create_message(self, request: web.Request) -> web.Response:
        account = self._account_for(request)
        if isinstance(account, web.Response):
            return account
        raw = await request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            return twilio_error(21617, 413, "Request body too large")
        try:
            form = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, errors="strict")
        except (UnicodeDecodeError, ValueError):
            return twilio_error(21602, 400, "The request body could not be parsed.")
        self.requests.append({"integration_id": account.integration_id, "path": request.path, "form": form,
                              "headers": dict(request.headers)})
        params = form_view(form)
        problem = self._validate(account, params)
        if problem is not None:
            return twilio_error(*problem)
        injected = self.injected.get(account.integration_id)
        if injected and injected[0].skip > 0:
            injected[0].skip -= 1
        elif injected:
            error = injected[0]
            error.remaining -= 1
            if error.remaining <= 0:
                injected.pop(0)
            return twilio_error(error.code, error.http_status)
        to = params["To"]
        number = _address(to)
        if (account.integration_id, number) in self.opted_out:
            return twilio_error(21610, 400, "Attempt to send to unsubscribed recipient")
        media = params.get("MediaUrl", [])
        sid = new_sid("MM" if media else "SM")
        resource = self._resource(account, sid, params)
        self.messages[sid] = resource
        self._journal.append({"kind": "message", "sid": sid, "resource": resource})
        self._append(account.integration_id, number, ThreadEntry(
            "out", sid, time.time(), params, status=resource["status"],
            status_callback=params.get("StatusCallback", "")))
        if self.auto_statuses and params.get("StatusCallback"):
            self._spawn(self._after_send(account.integration_id, sid, number))
        return web.json_response(resource, status=201)

    def _validate(self, account: Account, params: dict[str, Any]) -> tuple[int, int, str] | None:
        to = params.get("To", "")
        if not to:
            return 21604, 400, "A 'To' phone number is required."
        if not _E164.match(_address(to)):
            return 21211, 400, f"The 'To' number {to} is not a valid phone number."
        sender, service = params.get("From", ""), params.get("MessagingServiceSid", "")
        if not sender and not service:
            return 21603, 400, "A 'From' phone number is required."
        if service and service != account.messaging_service_sid:
            return 21701, 400, f"The Messaging Service Sid {service} is invalid."
        if sender and _address(sender) != account.phone_number:
            return 21606, 400, (f"The From phone number {sender} is not a valid, SMS-capable inbound phone "
                                f"number or short code for your account.")
        if sender and _address(sender) == _address(to):
            return 21266, 400, "'To' and 'From' number cannot be the same"
        body, media = params.get("Body", ""), params.get("MediaUrl", [])
        if not body and not media and not params.get("ContentSid"):
            return 21602, 400, "Message body is required."
        if len(body) > MAX_BODY_CHARS:
            return 21617, 400, "The concatenated message body exceeds the 1600 character limit."
        if len(media) > MAX_MEDIA:
            return 21623, 400, "Number of media files exceeds allowed limit."
        if any(not str(u).startswith(("https://", "http://")) for u in media):
            return 21620, 400, "Invalid media URL(s)"
        callback = params.get("StatusCallback", "")
        if callback and not callback.startswith(("https://", "http://")):
            return 21609, 400, "Invalid StatusCallback URL"
        return None

    def _resource(self, account: Account, sid: str, params: dict[str, Any]) -> dict[str, Any]:
        """The Message resource JSON (snake_case, §5.4)."""
        now = formatdate(usegmt=False).replace("-0000", "+0000")
        service = params.get("MessagingServiceSid") or None
        media = params.get("MediaUrl", [])
        body = params.get("Body", "")
        uri = f"/{API_VERSION}/Accounts/{account.account_sid}/Messages/{sid}"
        return {
            "account_sid": account.account_sid, "api_version": API_VERSION, "body": body,
            "date_created": now, "date_sent": None, "date_updated": now, "direction": "outbound-api",
            "error_code": None, "error_message": None,
            "from": params.get("From") or (None if service else account.phone_number),
            "messaging_service_sid": service, "num_media": str(len(media)),
            "num_segments": "0" if service else str(max(1, sms_segments(body).count)),
            "price": None, "price_unit": "USD", "sid": sid, "status": "accepted" if service else "queued",
            "subresource_uris": {"media": f"{uri}/Media.json"}, "to": params["To"], "uri": f"{uri}.json",
        }

    async def _fetch_message(self, request: web.Request) -> web.Response:
        account = self._account_for(request)
        if isinstance(account, web.Response):
            return account
        resource = self.messages.get(request.match_info["sid"])
        if resource is None or resource["account_sid"] != account.account_sid:
            return twilio_error(20404, 404, f"The requested resource {request.path} was not found")
        return web.json_response(resource)

    async def _media(self, request: web.Request) -> web.Response:
        media = self.media.get(request.match_info["media_sid"])
        if media is None or media["account_sid"] != request.match_info["account_sid"]:
            return twilio_error(20404, 404, f"The requested resource {request.path} was not found")
        if media.get("upload"):
            # Twilio answers a media URL with a redirect to where the file is kept (its CDN).
            upload = self.uploads.get(media["upload"]) if self.uploads is not None else None
            if upload is None or self.uploads is None:
                return twilio_error(20404, 404, f"The requested resource {request.path} was not found")
            raise web.HTTPTemporaryRedirect(self.uploads.url(upload))
        link = str(media["link"])
        if link.startswith(("https://", "http://")) and not link.startswith(self.public_url + "/"):
            raise web.HTTPFound(link)
        return web.Response(body=TINY_PNG, content_type="image/png")

    # --- scripting routes ---------------------------------------------------------------------

    def _script_account_or_404(self, request: web.Request) -> Account:
        account = self.accounts.get(request.match_info["integration_id"])
        if account is None:
            raise ApiError(404, "Unknown Twilio integration in the sandbox")
        return account

    async def _script_inbound(self, request: web.Request) -> web.Response:
        account = self._script_account_or_404(request)
        spec = await read_json_object(request, MAX_BODY)
        try:
            sid, status = await self.send_inbound(account.integration_id, spec)
        except (ValueError, TypeError) as exc:
            raise ApiError(400, str(exc)) from exc
        return web.json_response({"sid": sid, "webhookStatus": status})

    async def _script_status(self, request: web.Request) -> web.Response:
        account = self._script_account_or_404(request)
        spec = await read_json_object(request, MAX_BODY)
        sid, status, code = spec.get("sid"), spec.get("status"), spec.get("errorCode")
        if not isinstance(sid, str) or status not in ("sent", "delivered", "undelivered", "failed", "read"):
            raise ApiError(400, "need sid and status in sent|delivered|undelivered|failed|read")
        if code is not None and (not isinstance(code, int) or isinstance(code, bool)):
            raise ApiError(400, "errorCode must be an integer")
        try:
            webhook_status = await self.send_status(account.integration_id, sid, status, code)
        except KeyError as exc:
            raise ApiError(404, f"Unknown outbound message {sid}") from exc
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc
        return web.json_response({"sid": sid, "webhookStatus": webhook_status})

    async def _script_fail_next(self, request: web.Request) -> web.Response:
        account = self._script_account_or_404(request)
        spec = await read_json_object(request, MAX_BODY)
        code, http_status, count = spec.get("code"), spec.get("httpStatus", 400), spec.get("count", 1)
        skip = spec.get("skip", 0)
        if not (isinstance(code, int) and isinstance(http_status, int) and isinstance(count, int)
                and isinstance(skip, int)) or count < 1 or skip < 0:
            raise ApiError(400, "need integer code, httpStatus, count >= 1 and skip >= 0")
        self.fail_next(account.integration_id, code, http_status, count, skip)
        return web.json_response({"queued": sum(e.remaining for e in self.injected[account.integration_id])})

    async def _script_outbox(self, request: web.Request) -> web.Response:
        account = self._script_account_or_404(request)
        to = request.query.get("to", "")
        if not to:
            raise ApiError(400, "need ?to=")
        return web.json_response({"messages": self.outbox(account.integration_id, to)})

    async def _script_thread(self, request: web.Request) -> web.Response:
        account = self._script_account_or_404(request)
        to = request.query.get("to", "")
        if not to:
            raise ApiError(400, "need ?to=")
        return web.json_response({"messages": [e.view() for e in self.thread(account.integration_id, to)],
                                  "choices": self.choices(account.integration_id, to),
                                  "optedOut": (account.integration_id, _address(to)) in self.opted_out})

    async def _script_account(self, request: web.Request) -> web.Response:
        account = self._script_account_or_404(request)
        return web.json_response({"integrationId": account.integration_id, "accountSid": account.account_sid,
                                  "phoneNumber": account.phone_number,
                                  "messagingServiceSid": account.messaging_service_sid or None,
                                  "webhookUrl": account.webhook_url})
