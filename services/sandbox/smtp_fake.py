"""The sandbox's SMTP sink: a real SMTP server (aiosmtpd) that keeps every mail it is sent.

`make up` points the sandbox `email` integration at it, so the notification e-mails (and opt-in
codes) the gateway sends show up in the sandbox page's Mail tab instead of anyone's inbox.

- SMTP on `THREADLINE_SANDBOX_SMTP_HOST:THREADLINE_SANDBOX_SMTP_PORT` (127.0.0.1:2525; port 0
  picks a free one, `port` tells which). AUTH is offered (any login is accepted and recorded,
  also without TLS: it is loopback), STARTTLS / implicit TLS when given a TLS context (tests).
- Each mail is parsed (from, to, subject, text, html, headers, links) and kept in memory and in
  `<data_dir>/sandbox-mail.jsonl`, like the phones' threads.
- Scripting API under `/sandbox/mail`: `GET` (list, `?to=` filters by mail box: the mails sent
  to that address and the replies sent from it), `GET /{id}`, `DELETE` (empty the inbox),
  `POST /failures` (`{stage: "mail"|"rcpt"|"data", code, message?, count?}`: the next commands of
  that stage are refused with that reply, e.g. 550 or 451), `GET /server` (host and port the sink
  listens on). The list says too whether replies can be sent (`replies`: enabled, or the reason).
- Replies: `POST /sandbox/mail/{id}/reply {"text", "from"?}` answers a received mail as the
  person's mail client would, over real SMTP to the e-mail service's receiver
  (THREADLINE_MAIL_SMTP_HOST:THREADLINE_MAIL_SMTP_PORT): From the address the mail was sent to,
  To its Reply-To (else its From), `Re: ` subject, In-Reply-To and References, the text above the
  quoted original ("On <date>, <from> wrote:" and "> " lines), a fresh Message-ID and the
  `Authentication-Results` stamp of the sandbox (`AUTHSERV_ID`: it stands in for the person's
  mail provider, whose SPF/DKIM/DMARC checks the receiver trusts in the sandbox only). Answered
  200 `{sent: true, smtp: {code, message}, mail}` with the receiver's reply, 502 `{sent: false,
  smtp: {code, message}}` when it refused the mail (its SMTP code) or could not be reached (code
  null), 503 when no receiver port is configured. A reply sent is kept in the mail box
  (`direction: "sent"`) next to the mails received (`direction: "received"`).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import html as html_lib
import logging
import re
import ssl
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formatdate, getaddresses, make_msgid, parsedate_to_datetime
from typing import Any, Final

import aiosmtplib
from aiohttp import web
from aiosmtpd.smtp import SMTP as SmtpProtocol
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from shared.http import ApiError
from shared.ids import new_id
from shared.mailreply import SANDBOX_AUTHSERV_ID

from .journal import Journal
from .scripting import read_json_object, sunco_errors

log = logging.getLogger(__name__)
# aiosmtpd logs every SMTP command at INFO; the sandbox's own log lines say what matters.
logging.getLogger("mail.log").setLevel(logging.WARNING)

MAX_MAILS: Final = 500
MAX_MAIL_BYTES: Final = 2 * 1024 * 1024
STAGES: Final = ("mail", "rcpt", "data")
_URL = re.compile(r"https?://[^\s<>\"')\]]+")
# The authserv-id the mail box stamps on its replies (`Authentication-Results`), which the e-mail
# service trusts in sandbox mode only; the sink greets with the same name.
AUTHSERV_ID: Final = SANDBOX_AUTHSERV_ID
MAX_REPLY_CHARS: Final = 20_000
MAX_REFERENCES: Final = 20
REPLY_TIMEOUT_SECONDS: Final = 15.0
_REPLY_PREFIX = re.compile(r"^\s*re\s*:", re.IGNORECASE)
_MESSAGE_ID = re.compile(r"<[^<>\s]+>")
_TAG = re.compile(r"<[^>]*>")


@dataclass
class ScriptedFailure:
    """The next `count` commands of `stage` are refused with `code message`."""

    stage: str
    code: int
    message: str
    count: int = 1


def mail_record(envelope_from: str, rcpt_tos: list[str], content: bytes, login: str | None,
                received_at: float) -> dict[str, Any]:
    """A received mail as the scripting API and the page show it (parsed from its raw bytes)."""
    parsed = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)

    def part(kind: str) -> str | None:
        body = parsed.get_body(preferencelist=(kind,))
        if body is None or body.get_content_type() != f"text/{kind}":
            return None
        try:
            return str(body.get_content())
        except (LookupError, ValueError):
            return None

    text = part("plain")
    html = part("html")
    links = list(dict.fromkeys(_URL.findall(text or "") + _URL.findall(html or "")))
    unsubscribe = str(parsed.get("List-Unsubscribe") or "")
    reply_to = [address for _name, address in getaddresses([str(v) for v in parsed.get_all("Reply-To") or []])
                if address]
    return {
        "id": new_id(),
        "direction": "received",
        "receivedAt": received_at,
        "mailFrom": envelope_from,
        "rcptTos": list(rcpt_tos),
        "from": str(parsed.get("From") or ""),
        "to": [address for _name, address in getaddresses([str(v) for v in parsed.get_all("To") or []])],
        "subject": str(parsed.get("Subject") or ""),
        "date": str(parsed.get("Date") or ""),
        # (a long Message-ID is folded onto a line of its own: its value then starts with a space)
        "messageId": str(parsed.get("Message-ID") or "").strip(),
        "replyTo": reply_to[0] if reply_to else None,
        "inReplyTo": str(parsed.get("In-Reply-To") or "").strip() or None,
        "references": " ".join(str(parsed.get("References") or "").split()) or None,
        "text": text,
        "html": html,
        "links": links,
        "unsubscribe": unsubscribe.strip().removeprefix("<").removesuffix(">") or None,
        "headers": [[name, str(value)] for name, value in parsed.items()],
        "login": login,
    }


# --- replies (what the person's mail client sends back) ----------------------------------------


def is_sent(mail: Mapping[str, Any]) -> bool:
    """Whether a mail box entry is a reply the mail box sent (else a mail the sink received)."""
    return mail.get("direction") == "sent"


def _address_of(value: str) -> str:
    found = [address for _name, address in getaddresses([value]) if address]
    return found[0] if found else ""


def mail_box_addresses(mail: Mapping[str, Any]) -> list[str]:
    """The addresses whose mail box shows a mail: its recipients, or the sender of a reply sent."""
    if is_sent(mail):
        return [str(mail.get("mailFrom") or "")]
    return [str(a) for a in [*mail.get("rcptTos", []), *mail.get("to", [])]]


def reply_subject(subject: str) -> str:
    """`Re: <subject>`, without a second `Re:`."""
    subject = " ".join(subject.split())
    return subject if _REPLY_PREFIX.match(subject) else f"Re: {subject}".rstrip()


def reply_references(mail: Mapping[str, Any]) -> str | None:
    """RFC 5322 §3.6.4: the replied mail's References (else its In-Reply-To), then its Message-ID."""
    message_id = str(mail.get("messageId") or "").strip()
    if not message_id:
        return None
    earlier = _MESSAGE_ID.findall(str(mail.get("references") or mail.get("inReplyTo") or ""))
    ids = [*[found for found in earlier if found != message_id][-(MAX_REFERENCES - 1):], message_id]
    return " ".join(ids)


def attribution(mail: Mapping[str, Any]) -> str:
    """"On <date>, <from> wrote:", as mail clients introduce what they quote."""
    when: datetime | None = None
    try:
        when = parsedate_to_datetime(str(mail.get("date") or "")) if mail.get("date") else None
    except (TypeError, ValueError, IndexError):
        when = None
    if when is None:
        when = datetime.fromtimestamp(float(mail.get("receivedAt") or time.time()), UTC)
    hour = when.hour % 12 or 12
    stamp = f"{when:%a}, {when:%b} {when.day}, {when.year} at {hour}:{when:%M} {'AM' if when.hour < 12 else 'PM'}"
    sender = " ".join(str(mail.get("from") or "").split()) or "(unknown sender)"
    return f"On {stamp}, {sender} wrote:"


def quoted(text: str) -> str:
    """Each line of `text` quoted ("> "), as a mail client quotes what it answers."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n").split("\n")
    return "\n".join(">" + line if line.startswith(">") else ("> " + line if line else ">") for line in lines)


def original_text(mail: Mapping[str, Any]) -> str:
    """What the replied mail said, as text (its HTML without tags when it had no text part)."""
    if isinstance(mail.get("text"), str) and mail["text"].strip():
        return str(mail["text"])
    if isinstance(mail.get("html"), str):
        without_blocks = re.sub(r"(?is)<(script|style)[^>]*>.*?</\1>", "", mail["html"])
        with_breaks = re.sub(r"(?i)<br\s*/?>|</p>|</div>|</tr>|</h\d>", "\n", without_blocks)
        return "\n".join(line.strip() for line in html_lib.unescape(_TAG.sub("", with_breaks)).splitlines()).strip()
    return ""


def authentication_results(sender: str) -> str:
    """The sandbox's verdict on the reply's sender: SPF, DKIM and DMARC pass for its domain."""
    domain = sender.rpartition("@")[2].lower()
    return (f"{AUTHSERV_ID}; spf=pass smtp.mailfrom={sender}; dkim=pass header.d={domain};"
            f" dmarc=pass header.from={domain}")


def reply_message(mail: Mapping[str, Any], text: str, sender: str, *, now: float | None = None) -> EmailMessage:
    """The reply a mail client sends to `mail` from `sender` with the typed `text`."""
    recipient = str(mail.get("replyTo") or "") or _address_of(str(mail.get("from") or ""))
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = reply_subject(str(mail.get("subject") or ""))
    message["Date"] = formatdate(now if now is not None else time.time(), usegmt=True)
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or "sandbox.threadline.local")
    message_id = str(mail.get("messageId") or "").strip()
    if message_id:
        message["In-Reply-To"] = message_id
        references = reply_references(mail)
        if references:
            message["References"] = references
    message["Authentication-Results"] = authentication_results(sender)
    body = text.strip("\n").rstrip()
    original = original_text(mail)
    if original:
        body += f"\n\n{attribution(mail)}\n{quoted(original)}"
    message.set_content(body + "\n")
    return message


@dataclass(frozen=True)
class ReplyOutcome:
    """What the e-mail service's receiver answered a reply: `code` None when it was not reached."""

    sent: bool
    code: int | None
    message: str

    def view(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


async def deliver_reply(host: str, port: int, message: EmailMessage, sender: str, recipient: str,
                        timeout: float = REPLY_TIMEOUT_SECONDS) -> ReplyOutcome:
    """Send `message` over SMTP (no TLS: loopback) and say how the receiver answered."""
    smtp = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=timeout,
                           local_hostname=AUTHSERV_ID)
    try:
        await smtp.connect()
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        return ReplyOutcome(False, None, f"cannot reach the e-mail service's SMTP receiver at {host}:{port}: {exc}")
    try:
        _refused, answer = await smtp.send_message(message, sender=sender, recipients=[recipient])
        return ReplyOutcome(True, 250, " ".join(str(answer).split()) or "OK")
    except aiosmtplib.SMTPRecipientsRefused as exc:
        first = exc.recipients[0] if exc.recipients else None
        return ReplyOutcome(False, first.code if first else 550, first.message if first else str(exc))
    except aiosmtplib.SMTPResponseException as exc:
        return ReplyOutcome(False, exc.code, exc.message)
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        return ReplyOutcome(False, None, f"the SMTP session with {host}:{port} failed: {exc}")
    finally:
        try:
            await smtp.quit()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            smtp.close()


def sent_record(mail: Mapping[str, Any], message: EmailMessage, sender: str, recipient: str,
                outcome: ReplyOutcome, sent_at: float) -> dict[str, Any]:
    """A reply the mail box sent, as the mail box lists it."""
    body = message.get_body(preferencelist=("plain",))
    text = str(body.get_content()) if isinstance(body, EmailMessage) else ""
    return {
        "id": new_id(), "direction": "sent", "receivedAt": sent_at, "mailFrom": sender, "rcptTos": [recipient],
        "from": sender, "to": [recipient], "subject": str(message["Subject"] or ""),
        "date": str(message["Date"] or ""), "messageId": str(message["Message-ID"] or ""), "replyTo": None,
        "inReplyTo": str(message["In-Reply-To"] or "") or None,
        "references": str(message["References"] or "") or None, "text": text, "html": None,
        "links": list(dict.fromkeys(_URL.findall(text))), "unsubscribe": None,
        "headers": [[name, str(value)] for name, value in message.items()], "login": None,
        "repliedTo": mail.get("id"), "smtp": outcome.view(),
    }


class SmtpSink:
    """The SMTP server, its inbox and its scripted failures."""

    def __init__(self, host: str = "127.0.0.1", port: int = 2525, store_path: str | None = None, *,
                 tls_context: ssl.SSLContext | None = None, implicit_tls: bool = False,
                 receiver: tuple[str, int] | None = None,
                 receiver_problem: str = "no e-mail service receiver is configured") -> None:
        self.host = host
        # The e-mail service's SMTP receiver, where replies go (None: replies are off, and why).
        self.receiver = receiver
        self.receiver_problem = "" if receiver is not None else receiver_problem
        self.requested_port = port
        self.port: int | None = None
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.mails: deque[dict[str, Any]] = deque(maxlen=MAX_MAILS)
        self.failures: list[ScriptedFailure] = []
        self.received = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None
        self._journal = Journal(store_path)
        lines = self._journal.replay(self._apply)
        self._journal.compact(({"op": "mail", "mail": m} for m in self.mails), lines)

    def _apply(self, record: dict[str, Any]) -> None:
        if record["op"] == "mail" and isinstance(record["mail"], dict):
            self.mails.append(record["mail"])
        elif record["op"] == "clear":
            self.mails.clear()

    # --- the SMTP server ----------------------------------------------------------------------

    async def start(self) -> None:
        """Listen (a port already taken is logged: the sandbox runs on without a mail sink)."""
        loop = asyncio.get_running_loop()
        handler = _Handler(self)

        def protocol() -> SmtpProtocol:
            return SmtpProtocol(
                handler, hostname=AUTHSERV_ID, ident="Threadline sandbox SMTP sink",
                data_size_limit=MAX_MAIL_BYTES, auth_require_tls=False, authenticator=_accept_any_login,
                tls_context=None if self.implicit_tls else self.tls_context, timeout=60)

        try:
            self._server = await loop.create_server(
                protocol, self.host, self.requested_port,
                ssl=self.tls_context if self.implicit_tls else None, reuse_address=True)
        except OSError as exc:
            log.error("sandbox SMTP sink cannot listen on %s:%s: %s", self.host, self.requested_port, exc)
            return
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("sandbox SMTP sink listening on %s:%s", self.host, self.port)

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def take_failure(self, stage: str) -> ScriptedFailure | None:
        """The scripted failure for the next command of `stage`, if one is armed."""
        for failure in self.failures:
            if failure.stage == stage:
                failure.count -= 1
                if failure.count <= 0:
                    self.failures.remove(failure)
                return failure
        return None

    def store(self, record: dict[str, Any]) -> None:
        """Keep a received mail (memory + journal) and wake whoever waits for one."""
        self.mails.append(record)
        self._journal.append({"op": "mail", "mail": record})
        self.received.set()
        self.received = asyncio.Event()

    def keep_sent(self, record: dict[str, Any]) -> None:
        """Keep a reply the mail box sent (memory + journal)."""
        self.mails.append(record)
        self._journal.append({"op": "mail", "mail": record})

    def find(self, mail_id: str) -> dict[str, Any] | None:
        """The mail box entry with this id."""
        return next((mail for mail in self.mails if mail.get("id") == mail_id), None)

    def replies_view(self) -> dict[str, Any]:
        """Whether the mail box can reply, and where to (or why not)."""
        if self.receiver is None:
            return {"enabled": False, "host": None, "port": None, "reason": f"E-mail replies are off: "
                                                                             f"{self.receiver_problem}."}
        return {"enabled": True, "host": self.receiver[0], "port": self.receiver[1], "reason": None}

    async def reply(self, mail: dict[str, Any], text: str, sender: str) -> tuple[ReplyOutcome, dict[str, Any] | None]:
        """Answer a received mail from `sender` over SMTP; the outcome and, once accepted, the kept reply."""
        assert self.receiver is not None
        message = reply_message(mail, text, sender)
        recipient = str(message["To"])
        outcome = await deliver_reply(self.receiver[0], self.receiver[1], message, sender, recipient)
        log.info("sandbox mail box reply from %s: %s %s", sender, outcome.code, outcome.message)
        if not outcome.sent:
            return outcome, None
        record = sent_record(mail, message, sender, recipient, outcome, time.time())
        self.keep_sent(record)
        return outcome, record

    def clear(self) -> None:
        """Empty the inbox."""
        self.mails.clear()
        self._journal.append({"op": "clear"})

    # --- the scripting API --------------------------------------------------------------------

    def routes(self, prefix: str) -> list[web.RouteDef]:
        """`/sandbox/mail…` routes."""
        base = f"{prefix}/mail"
        return [
            web.get(base, sunco_errors(self._list)),
            web.delete(base, sunco_errors(self._clear)),
            web.get(f"{base}/server", sunco_errors(self._server_info)),
            web.post(f"{base}/failures", sunco_errors(self._script_failure)),
            web.get(f"{base}/{{mail_id}}", sunco_errors(self._get)),
            web.post(f"{base}/{{mail_id}}/reply", sunco_errors(self._reply)),
        ]

    async def _list(self, request: web.Request) -> web.Response:
        wanted = request.query.get("to", "").strip().lower()
        mails = [m for m in self.mails if not wanted or wanted in (a.lower() for a in mail_box_addresses(m))]
        return web.json_response({"mails": mails, "listening": self.port is not None,
                                  "replies": self.replies_view()})

    async def _reply(self, request: web.Request) -> web.Response:
        mail = self.find(request.match_info["mail_id"])
        if mail is None:
            raise ApiError(404, "Mail not found")
        if self.receiver is None:
            raise ApiError(503, self.replies_view()["reason"], "replies_disabled")
        body = await read_json_object(request, 4 * MAX_REPLY_CHARS + 4096)
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ApiError(400, "text must be the reply's text")
        if len(text) > MAX_REPLY_CHARS:
            raise ApiError(400, f"text is longer than {MAX_REPLY_CHARS} characters")
        if is_sent(mail):
            raise ApiError(400, "This is a reply the mail box sent: reply to a mail it received")
        recipients = list(dict.fromkeys(a for a in [*mail.get("to", []), *mail.get("rcptTos", [])] if a))
        wanted = body.get("from")
        if wanted is not None:
            if not isinstance(wanted, str):
                raise ApiError(400, "from must be an address the mail was sent to")
            match = [a for a in recipients if a.lower() == wanted.strip().lower()]
            if not match:
                raise ApiError(400, "from must be an address the mail was sent to")
            recipients = match
        if not recipients or "@" not in recipients[0]:
            raise ApiError(400, "The mail names no recipient to reply as")
        outcome, record = await self.reply(mail, text, recipients[0])
        answer: dict[str, Any] = {"sent": outcome.sent, "smtp": outcome.view(), "mail": record}
        if not outcome.sent:
            what = f"{outcome.code} {outcome.message}" if outcome.code is not None else outcome.message
            answer["errors"] = [{"code": "smtp_refused" if outcome.code is not None else "smtp_unreachable",
                                 "title": f"The e-mail service did not take the reply: {what}"}]
        return web.json_response(answer, status=200 if outcome.sent else 502)

    async def _get(self, request: web.Request) -> web.Response:
        mail_id = request.match_info["mail_id"]
        for mail in self.mails:
            if mail.get("id") == mail_id:
                return web.json_response({"mail": mail})
        raise ApiError(404, "Mail not found")

    async def _clear(self, _request: web.Request) -> web.Response:
        self.clear()
        return web.json_response({"mails": []})

    async def _server_info(self, _request: web.Request) -> web.Response:
        return web.json_response({"host": self.host, "port": self.port, "listening": self.port is not None})

    async def _script_failure(self, request: web.Request) -> web.Response:
        body = await read_json_object(request, 4096)
        stage = body.get("stage", "rcpt")
        code = body.get("code")
        count = body.get("count", 1)
        if stage not in STAGES:
            raise ApiError(400, f"stage must be one of {', '.join(STAGES)}")
        if isinstance(code, bool) or not isinstance(code, int) or not 400 <= code <= 599:
            raise ApiError(400, "code must be an SMTP error reply code (400-599)")
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 100:
            raise ApiError(400, "count must be between 1 and 100")
        default = "Mailbox unavailable" if code >= 500 else "Try again later"
        message = " ".join(str(body.get("message") or default).split())[:200]
        self.failures.append(ScriptedFailure(stage=stage, code=code, message=message, count=count))
        return web.json_response({"stage": stage, "code": code, "message": message, "count": count}, status=201)


def _accept_any_login(server: SmtpProtocol, session: Session, envelope: Envelope, mechanism: str,
                      auth_data: Any) -> AuthResult:
    """The sandbox accepts every login and remembers the user name (shown with the mail)."""
    login = auth_data.login.decode(errors="replace") if isinstance(auth_data, LoginPassword) else mechanism
    return AuthResult(success=True, auth_data=login)


class _Handler:
    """aiosmtpd hooks: scripted refusals, then store the mail."""

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_MAIL(self, server: SmtpProtocol, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        failure = self.sink.take_failure("mail")
        if failure is not None:
            return f"{failure.code} {failure.message}"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: SmtpProtocol, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        failure = self.sink.take_failure("rcpt")
        if failure is not None:
            return f"{failure.code} {failure.message}"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SmtpProtocol, session: Session, envelope: Envelope) -> str:
        failure = self.sink.take_failure("data")
        if failure is not None:
            return f"{failure.code} {failure.message}"
        content = envelope.original_content or envelope.content or b""
        raw = content if isinstance(content, bytes) else content.encode()
        login = session.auth_data if isinstance(session.auth_data, str) else None
        try:
            record = mail_record(str(envelope.mail_from or ""), list(envelope.rcpt_tos), raw, login, time.time())
        except Exception:  # a mail the parser chokes on is still accepted (a real server would)
            log.exception("sandbox SMTP sink could not parse a mail")
            return "250 OK (unparsed)"
        self.sink.store(record)
        return "250 OK"
