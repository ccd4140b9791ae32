"""The sandbox's SMTP sink: a real SMTP server (aiosmtpd) that keeps every mail it is sent.

`make up` points the sandbox `email` integration at it, so the notification e-mails (and opt-in
codes) the gateway sends show up in the sandbox page's Mail tab instead of anyone's inbox.

- SMTP on `THREADLINE_SANDBOX_SMTP_HOST:THREADLINE_SANDBOX_SMTP_PORT` (127.0.0.1:2525; port 0
  picks a free one, `port` tells which). AUTH is offered (any login is accepted and recorded,
  also without TLS: it is loopback), STARTTLS / implicit TLS when given a TLS context (tests).
- Each mail is parsed (from, to, subject, text, html, headers, links) and kept in memory and in
  `<data_dir>/sandbox-mail.jsonl`, like the phones' threads.
- Scripting API under `/sandbox/mail`: `GET` (list, `?to=` filters by recipient), `GET /{id}`,
  `DELETE` (empty the inbox), `POST /failures` (`{stage: "mail"|"rcpt"|"data", code, message?,
  count?}`: the next commands of that stage are refused with that reply, e.g. 550 or 451),
  `GET /server` (host and port the sink listens on).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import re
import ssl
import time
from collections import deque
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import getaddresses
from typing import Any, Final

from aiohttp import web
from aiosmtpd.smtp import SMTP as SmtpProtocol
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from shared.http import ApiError
from shared.ids import new_id

from .journal import Journal
from .scripting import read_json_object, sunco_errors

log = logging.getLogger(__name__)
# aiosmtpd logs every SMTP command at INFO; the sandbox's own log lines say what matters.
logging.getLogger("mail.log").setLevel(logging.WARNING)

MAX_MAILS: Final = 500
MAX_MAIL_BYTES: Final = 2 * 1024 * 1024
STAGES: Final = ("mail", "rcpt", "data")
_URL = re.compile(r"https?://[^\s<>\"')\]]+")


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
    return {
        "id": new_id(),
        "receivedAt": received_at,
        "mailFrom": envelope_from,
        "rcptTos": list(rcpt_tos),
        "from": str(parsed.get("From") or ""),
        "to": [address for _name, address in getaddresses([str(v) for v in parsed.get_all("To") or []])],
        "subject": str(parsed.get("Subject") or ""),
        "date": str(parsed.get("Date") or ""),
        "messageId": str(parsed.get("Message-ID") or ""),
        "text": text,
        "html": html,
        "links": links,
        "unsubscribe": unsubscribe.strip().removeprefix("<").removesuffix(">") or None,
        "headers": [[name, str(value)] for name, value in parsed.items()],
        "login": login,
    }


class SmtpSink:
    """The SMTP server, its inbox and its scripted failures."""

    def __init__(self, host: str = "127.0.0.1", port: int = 2525, store_path: str | None = None, *,
                 tls_context: ssl.SSLContext | None = None, implicit_tls: bool = False) -> None:
        self.host = host
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
                handler, hostname="sandbox.threadline.local", ident="Threadline sandbox SMTP sink",
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
        ]

    async def _list(self, request: web.Request) -> web.Response:
        wanted = request.query.get("to", "").strip().lower()
        mails = [m for m in self.mails
                 if not wanted or wanted in (a.lower() for a in [*m.get("rcptTos", []), *m.get("to", [])])]
        return web.json_response({"mails": mails, "listening": self.port is not None})

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
