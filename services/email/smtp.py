"""The e-mail channel's SMTP receiver (aiosmtpd on the service's event loop): the MX of the
integrations' domains, or the relay a front MTA (Postfix, an ESP) delivers to.

A recipient that is neither an integration's `incomingAddress` nor a reply address of one of
their domains is refused at RCPT (no backscatter). A mail is answered 250 only once its
messages are durable in JetStream; a mail that cannot be taken now (the bus or the store is
down, a sender over its rate) gets a 4xx, so the sending MTA keeps it and tries again; a mail
refused for good (unauthenticated sender, a mail bomb) gets a 5xx with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from aiosmtpd.smtp import SMTP as SmtpProtocol
from aiosmtpd.smtp import Envelope, Session

log = logging.getLogger(__name__)
# aiosmtpd logs every SMTP command at INFO.
logging.getLogger("mail.log").setLevel(logging.WARNING)

Verdict = Literal["accepted", "ignored", "refused", "retry"]
# Recipients of one mail (RFC 5321 asks servers to take at least 100).
MAX_RECIPIENTS = 100


@dataclass(frozen=True)
class Outcome:
    """What became of a received mail, and why (for the SMTP reply and the webhook answer)."""

    verdict: Verdict
    reason: str = ""

    def smtp_reply(self) -> str:
        """The SMTP reply to DATA."""
        reason = " ".join(self.reason.split())[:200]
        if self.verdict in ("accepted", "ignored"):
            return "250 2.0.0 OK" + (f" ({reason})" if reason else "")
        if self.verdict == "retry":
            return f"451 4.3.0 {reason or 'try again later'}"
        return f"550 5.7.1 {reason or 'refused'}"


# (raw mail, envelope sender, envelope recipients) → what became of it.
Receive = Callable[[bytes, str, list[str]], Awaitable[Outcome]]


class ReceiverHooks:
    """aiosmtpd hooks: recipients checked at RCPT, the mail handed to `receive` at DATA."""

    def __init__(self, accepts: Callable[[str], bool], receive: Receive) -> None:
        self.accepts = accepts
        self.receive = receive

    async def handle_RCPT(self, server: SmtpProtocol, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        if not self.accepts(address):
            return "550 5.1.1 No such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SmtpProtocol, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or envelope.content or b""
        raw = content if isinstance(content, bytes) else content.encode()
        try:
            outcome = await self.receive(raw, str(envelope.mail_from or ""), list(envelope.rcpt_tos))
        except Exception:  # the sender keeps the mail and retries: nothing is lost
            log.exception("a received mail could not be handled")
            outcome = Outcome("retry", "temporary failure, try again later")
        return outcome.smtp_reply()


class SessionGate:
    """At most `limit` SMTP sessions at once: each may hold a whole mail in memory."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0


class _Session(SmtpProtocol):
    """An SMTP session that counts against its gate, or says 421 and hangs up when it is full
    (the sending MTA tries again later)."""

    def __init__(self, hooks: ReceiverHooks, gate: SessionGate, **settings: Any) -> None:
        super().__init__(hooks, **settings)
        self._gate = gate
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._counted:  # the same session again, over TLS after STARTTLS
            super().connection_made(transport)
            return
        if self._gate.open >= self._gate.limit:
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(b"421 4.3.2 Too busy, try again later\r\n")
            transport.close()
            return
        self._gate.open += 1
        self._counted = True
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._counted:
            return  # turned away before the session began: nothing of it to tear down
        self._counted = False
        self._gate.open -= 1
        super().connection_lost(exc)


def smtp_protocol(hooks: ReceiverHooks, gate: SessionGate, hostname: str, max_bytes: int,
                  tls_context: ssl.SSLContext | None = None) -> SmtpProtocol:
    """One SMTP session's protocol (no AUTH: a receiver, not a relay; STARTTLS offered when a
    certificate is configured)."""
    return _Session(hooks, gate, hostname=hostname, ident="Threadline", data_size_limit=max_bytes,
                    enable_SMTPUTF8=True, timeout=60, tls_context=tls_context, require_starttls=False)
