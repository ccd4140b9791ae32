"""E-mail out: a notification, an opt-in code or a message of the e-mail channel, through the
SMTP server of a `mailgun` integration (SunCo's e-mail integration type; Threadline sends it over
SMTP, e.g. Mailgun's SMTP relay).

The integration's config (camelCase, as the business API stores it): `smtpHost`, `smtpPort`,
`security` ("starttls" | "tls" | "none"), `username`/`password` (SMTP AUTH when a username is
set), `fromAddress` (else SunCo's `incomingAddress`), `fromName` (else the integration's display
name). Mailgun's `apiKey` is never used here.

The connection goes through the egress policy (`shared.egress`): `smtpHost` is resolved once,
every address checked (no loopback, private, link-local, … unless allow-listed) and the socket
opened to a checked address, while TLS still verifies `smtpHost`. A refusal is permanent.

Failures are split the way a sender must treat them: `EmailTransientError` (4xx replies,
connection refused/reset, timeouts: try again later) and `EmailPermanentError` (5xx replies such
as 550 mailbox unavailable, a bad address, a server that cannot do the configured security:
retrying would fail the same way).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formataddr, formatdate, make_msgid
from typing import Any, Final

import aiosmtplib
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared.egress import EgressPolicy, EgressRefused
from shared.records import IntegrationRecord
from shared.telemetry import inject_headers, tracer

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

DEFAULT_TIMEOUT_SECONDS: Final = 20.0
DEFAULT_PORTS: Final = {"starttls": 587, "tls": 465, "none": 25}
# Real SMTP has no trace-context standard: the W3C traceparent rides in a private header, so a
# receiving system that knows it (the sandbox inbox shows it) can join the trace.
TRACEPARENT_HEADER: Final = "X-Threadline-Traceparent"
MAX_SUBJECT_LENGTH: Final = 200
# The headers a caller may add (`build_message`'s `headers`): replies and threading.
THREAD_HEADERS: Final = ("Reply-To", "In-Reply-To", "References")


class EmailError(Exception):
    """Sending failed; `code` is the SMTP reply code when the server gave one."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class EmailTransientError(EmailError):
    """Worth retrying later: a 4xx reply, a connection problem or a timeout."""


class EmailPermanentError(EmailError):
    """Retrying cannot help: a 5xx reply, an unusable address or configuration."""


def _classify(code: int | None, message: str) -> EmailError:
    if code is not None and 400 <= code < 500:
        return EmailTransientError(message, code)
    return EmailPermanentError(message, code)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def sender_address(integration: IntegrationRecord) -> tuple[str, str]:
    """(display name, address) of the From header: `fromName`, else the integration's name."""
    config = integration.config
    address = str(config.get("fromAddress") or config.get("incomingAddress") or "")
    if "@" not in address:
        raise EmailPermanentError(f"integration {integration.id} has no usable fromAddress")
    name = config.get("fromName") or integration.display_name or ""
    return _one_line(str(name)), address


def build_message(integration: IntegrationRecord, to: str, subject: str, text: str, html: str | None = None,
                  *, unsubscribe_url: str | None = None, traceparent: str | None = None,
                  headers: Mapping[str, str] | None = None, automated: bool = True,
                  message_id: str | None = None) -> EmailMessage:
    """The MIME message (text, plus an HTML alternative when given) with every header set.

    `headers` adds Reply-To, In-Reply-To, References (a `Subject` there replaces `subject`);
    `automated` marks it `Auto-Submitted` (notifications and codes, not a conversation's
    messages); `message_id` is its Message-ID (a new one when None). Raises
    `EmailPermanentError` for a recipient that is not one plain address.
    """
    name, from_address = sender_address(integration)
    try:
        recipient = Address(addr_spec=to.strip())
    except (ValueError, IndexError) as exc:
        raise EmailPermanentError(f"not an e-mail address: {to!r}") from exc
    if not recipient.domain or not recipient.username or "," in to or "\n" in to or "\r" in to:
        raise EmailPermanentError(f"not an e-mail address: {to!r}")
    extra = dict(headers or {})
    message = EmailMessage(policy=SMTP)
    message["From"] = formataddr((name, from_address)) if name else from_address
    message["To"] = recipient.addr_spec
    message["Subject"] = _one_line(extra.pop("Subject", subject))[:MAX_SUBJECT_LENGTH]
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = message_id or make_msgid(domain=from_address.rpartition("@")[2] or None)
    for header in THREAD_HEADERS:
        value = _one_line(extra.get(header, ""))
        if value:
            message[header] = value
    if automated:
        # Automated mail: no out-of-office replies back to the sender.
        message["Auto-Submitted"] = "auto-generated"
    if unsubscribe_url:
        message["List-Unsubscribe"] = f"<{unsubscribe_url}>"
    if traceparent:
        message[TRACEPARENT_HEADER] = traceparent
    message.set_content(text)
    if html is not None:
        message.add_alternative(html, subtype="html")
    return message


def smtp_options(integration: IntegrationRecord, timeout: float,
                 tls_context: ssl.SSLContext | None = None) -> dict[str, Any]:
    """The aiosmtplib connection options for the integration's host, port, security and login."""
    config = integration.config
    security = str(config.get("security") or "starttls")
    if security not in DEFAULT_PORTS:
        raise EmailPermanentError(f"integration {integration.id}: unknown security {security!r}")
    host = str(config.get("smtpHost") or "")
    if not host:
        raise EmailPermanentError(f"integration {integration.id} has no smtpHost")
    port = config.get("smtpPort") or DEFAULT_PORTS[security]
    options: dict[str, Any] = {
        "hostname": host, "port": int(port), "timeout": timeout,
        "use_tls": security == "tls",
        # "none" must never upgrade on its own; "starttls" must (fails when not offered).
        "start_tls": security == "starttls",
    }
    if tls_context is not None:
        options["tls_context"] = tls_context
    username = config.get("username")
    if username:
        options["username"] = str(username)
        options["password"] = str(config.get("password") or "")
    return options


async def send_email(integration: IntegrationRecord, to: str, subject: str, text: str, html: str | None = None,
                     *, unsubscribe_url: str | None = None, timeout: float = DEFAULT_TIMEOUT_SECONDS,
                     tls_context: ssl.SSLContext | None = None, policy: EgressPolicy | None = None,
                     headers: Mapping[str, str] | None = None, automated: bool = True,
                     message_id: str | None = None) -> str:
    """Send one e-mail through the integration's SMTP server; return its Message-ID.

    `unsubscribe_url` becomes the List-Unsubscribe header (the opt-out link). `tls_context`
    overrides certificate checks (tests with a private CA). `policy` is the egress policy (the
    strictest when None). `headers`, `automated`, `message_id`: see `build_message`. Raises
    `EmailTransientError` or `EmailPermanentError`.
    """
    with _tracer.start_as_current_span("smtp send", kind=SpanKind.CLIENT) as span:
        span.set_attribute("server.address", str(integration.config.get("smtpHost") or ""))
        span.set_attribute("threadline.integration.id", integration.id)
        try:
            traceparent = inject_headers().get("traceparent")
            message = build_message(integration, to, subject, text, html, unsubscribe_url=unsubscribe_url,
                                    traceparent=traceparent, headers=headers, automated=automated,
                                    message_id=message_id)
            options = smtp_options(integration, timeout, tls_context)
            span.set_attribute("server.port", options["port"])
            await _deliver(message, options, policy or EgressPolicy())
        except EmailError as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            if exc.code is not None:
                span.set_attribute("smtp.response.code", exc.code)
            raise
        message_id = str(message["Message-ID"])
        span.set_attribute("messaging.message.id", message_id)
        return message_id


async def _deliver(message: EmailMessage, options: dict[str, Any], policy: EgressPolicy) -> None:
    """aiosmtplib.send over a socket the egress policy opened, its exceptions turned into
    transient/permanent errors."""
    options = dict(options)
    host, port = str(options.pop("hostname")), int(options.pop("port"))
    try:
        sock = await policy.connect_smtp(host, port, timeout=options.get("timeout"))
    except EgressRefused as exc:
        raise EmailPermanentError(str(exc)) from exc
    except OSError as exc:
        raise EmailTransientError(f"SMTP connection failed: {exc}") from exc
    try:
        await aiosmtplib.send(message, hostname=host, sock=sock, **options)
    except aiosmtplib.SMTPRecipientsRefused as exc:
        codes = [r.code for r in exc.recipients]
        # Every recipient refused with a 4xx (greylisting, mailbox busy): try again later.
        code = codes[0] if codes else None
        if codes and all(400 <= c < 500 for c in codes):
            raise EmailTransientError(f"recipient refused: {exc.recipients[0].message}", code) from exc
        raise EmailPermanentError(f"recipient refused: {exc.recipients[0].message if exc.recipients else exc}",
                                  code) from exc
    except (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPTimeoutError, aiosmtplib.SMTPServerDisconnected) as exc:
        raise EmailTransientError(f"SMTP connection failed: {exc}") from exc
    except aiosmtplib.SMTPResponseException as exc:
        raise _classify(exc.code, f"SMTP {exc.code}: {exc.message}") from exc
    except aiosmtplib.SMTPNotSupported as exc:
        # e.g. security "starttls" against a server without STARTTLS: a configuration error.
        raise EmailPermanentError(f"SMTP server cannot do what the integration asks: {exc}") from exc
    except ssl.SSLCertVerificationError as exc:
        raise EmailPermanentError(f"SMTP server certificate rejected: {exc}") from exc
    except aiosmtplib.SMTPException as exc:
        # aiosmtplib reports a missing STARTTLS / AUTH extension as a bare SMTPException.
        if "not supported" in str(exc):
            raise EmailPermanentError(f"SMTP server cannot do what the integration asks: {exc}") from exc
        raise EmailTransientError(f"SMTP failed: {exc}") from exc
    except OSError as exc:
        raise EmailTransientError(f"SMTP failed: {exc}") from exc
    finally:
        sock.close()
