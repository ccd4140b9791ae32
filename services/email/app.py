"""The e-mail service: e-mail as a conversation channel (SunCo's `mailgun` integration type).

In: an SMTP receiver (`smtp.py`), Mailgun's inbound route (`POST /webhooks/mailgun/{id}`,
signed) and SendGrid's Inbound Parse (`POST /webhooks/sendgrid/{id}/{inboundSecret}`), all three
through one path: parse within bounds (`shared.mailparse`), find the integration, refuse an
unauthenticated sender (SPF/DKIM/DMARC), drop auto-replies and bounces (logged), keep the
attachments in the object store, join the conversation a signed reply address names
(`shared.mailreply`), publish durably — only then answer 250/200.

Out: the send loop (`sender.py`): one threaded mail per business message.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any
from urllib.parse import parse_qsl

import dns.exception
import dns.resolver
import msgspec
import nats.errors
import nats.js.errors
from aiohttp import BodyPartReader, web
from nats.js.kv import KeyValue
from opentelemetry.trace import SpanKind

from shared import metrics, records, subjects
from shared.bus import Bus, KvMirror
from shared.config import ConfigError
from shared.http import ApiError, error_middleware, tracing_middleware
from shared.ingress import publish_durably
from shared.mailparse import (
    AuthVerdict,
    InboundMail,
    MailAttachment,
    MailLimits,
    MailRejected,
    domains_aligned,
    inbound_from_mailgun,
    inbound_from_sendgrid,
    mailgun_signature_valid,
    parse_authentication_results,
    parse_mail,
    verdict_from_mailgun,
    verdict_from_sendgrid,
    verify_dkim,
)
from shared.mailreply import carries_reply_token, normal_address, replied_conversation
from shared.media import ALLOWED_TYPES, OPAQUE_TYPE, attachment_url, named_file, new_token, normal_type, object_key
from shared.objectstore import ObjectStore, ObjectStoreError, put_bytes
from shared.ratelimit import SharedLimiter
from shared.records import IntegrationRecord
from shared.service import ServiceApp
from shared.telemetry import log_fields, setup_telemetry, tracer
from shared.untrusted import secrets_equal

from . import handlers
from .config import EmailConfig
from .handlers import Credentials, KeptFile
from .sender import EmailSender, ThreadStore
from .smtp import Outcome, ReceiverHooks, SessionGate, smtp_protocol

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

MAIL_THREADS_TTL_SECONDS = 180 * 86400.0
MAIL_LIMITS_TTL_SECONDS = 86400.0
_CHUNK = 256 * 1024
# An ESP's inbound post: some 30 fields and up to MailLimits.max_attachments files; a body must
# arrive within a minute (a post that trickles in holds a slot meant for mail).
MAX_FORM_FIELDS = 128
PART_OVERHEAD_BYTES = 128
FORM_READ_SECONDS = 60.0


class MailReader:
    """Parses mail in worker processes, each within a time budget: reading a hostile mail (HTML
    or address lists built to be slow to parse) must cost neither the event loop nor more than
    the budget; a mail that takes longer is refused, and its worker replaced."""

    def __init__(self, workers: int = 2, budget_seconds: float = 30.0) -> None:
        self.workers = workers
        self.budget_seconds = budget_seconds
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: a fork of a process running an event loop and threads is not safe to use.
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    async def read(self, parse: Callable[..., InboundMail], *args: Any) -> InboundMail:
        """`parse(*args)` in a worker; MailRejected when it fails or runs out of time."""
        future = asyncio.get_running_loop().run_in_executor(self._executor(), parse, *args)
        try:
            return await asyncio.wait_for(future, self.budget_seconds)
        except TimeoutError:
            self._replace_workers()
            raise MailRejected(f"the mail could not be read within {self.budget_seconds:.0f} s") from None
        except BrokenProcessPool:
            self._replace_workers()
            raise MailRejected("the mail could not be read") from None

    def _replace_workers(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # Python 3.11 has no public way to stop a running task: its process is killed.
        for process in list(getattr(pool, "_processes", {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    async def close(self) -> None:
        """Stop the workers."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)


class KeyLookup:
    """DKIM key lookups over DNS that remember whether DNS failed (a timeout, SERVFAIL), which
    dkimpy's own lookup reports like a missing key: a mail then gets a 451 and comes again."""

    def __init__(self, resolve: Callable[..., Any] = dns.resolver.resolve) -> None:
        self.resolve = resolve
        self.failed = False

    def __call__(self, name: bytes, timeout: float = 5.0) -> bytes | None:
        try:
            answer = self.resolve(name.decode("ascii", "replace").rstrip("."), "TXT", lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except dns.exception.DNSException:
            self.failed = True
            return None
        return b"".join(b"".join(record.strings) for record in answer[:1])


class EmailService(ServiceApp):
    """SMTP and webhooks in, SMTP out."""

    name = "email"
    # Set by `start`, before SMTP and HTTP serve (and released by `stop`, in the reverse order).
    bus: Bus
    integrations: KvMirror
    files: ObjectStore
    threads: ThreadStore
    limiter: SharedLimiter
    # Mailgun signature tokens seen (with a digest of their body), in the limits bucket.
    replays: KeyValue
    sender: EmailSender

    def __init__(self, config: EmailConfig) -> None:
        super().__init__(config.common)
        self.config = config
        self.limits = MailLimits(max_bytes=handlers.MAX_MAIL_BYTES)
        self.reader = MailReader(budget_seconds=config.parse_budget_seconds)
        self.smtp_port: int | None = None
        # Webhook posts read at once (each may hold a 25 MB mail): past it, 503 and the ESP retries.
        self.webhook_slots = asyncio.Semaphore(config.max_sessions)
        self.http.middlewares.append(tracing_middleware)
        self.http.middlewares.append(error_middleware)
        self.http.router.add_post("/webhooks/mailgun/{integration_id}", self.mailgun_webhook)
        self.http.router.add_post("/webhooks/sendgrid/{integration_id}/{secret}", self.sendgrid_webhook)

    async def start(self) -> None:
        """Open the object store, connect NATS, mirror the integrations, start the send loop,
        then the SMTP receiver and HTTP."""
        if not self.config.keyring.keys:
            raise ConfigError("the e-mail channel signs reply addresses with THREADLINE_SECRETS_KEY: set it")
        self.on_stop(self.reader.close)
        self.files = await self.open_files()
        self.bus = await self.connect_bus()
        self.integrations = await self.mirror_bucket(self.bus, subjects.INTEGRATIONS_BUCKET,
                                                     records.integration_decoder(self.config.keyring))
        self.threads = ThreadStore(await self.bus.key_value(subjects.MAIL_THREADS_BUCKET,
                                                            ttl=MAIL_THREADS_TTL_SECONDS))
        self.replays = await self.bus.key_value(subjects.MAIL_LIMITS_BUCKET, ttl=MAIL_LIMITS_TTL_SECONDS)
        self.limiter = SharedLimiter(self.replays, self.config.keyring.derived("mail rate limits")[0])
        self.sender = EmailSender(self.bus, self.config.send, self.credentials, self.threads, self.config.keyring,
                                  self.common.egress)
        await self.bus.consume(subjects.channel_outbound_consumer(handlers.CHANNEL), self.sender.on_outbound)
        if self.config.smtp_port is not None:
            await self._start_smtp()
        await self.start_http()

    async def _start_smtp(self) -> None:
        hooks = ReceiverHooks(self.accepts_recipient, self.receive_smtp)
        gate = SessionGate(self.config.max_sessions)
        tls = self.config.tls_context()
        # Replicas share the port (SO_REUSEPORT): the kernel spreads connections among them.
        server = await asyncio.get_running_loop().create_server(
            lambda: smtp_protocol(hooks, gate, self.config.smtp_hostname, handlers.MAX_MAIL_BYTES, tls),
            self.config.smtp_host, self.config.smtp_port, reuse_address=True, reuse_port=True)
        self.smtp_port = server.sockets[0].getsockname()[1]

        async def close() -> None:
            server.close()
            await server.wait_closed()

        self.on_stop(close)
        log.info("e-mail SMTP receiver on %s:%d", self.config.smtp_host, self.smtp_port)

    # --- integrations ----------------------------------------------------------------------

    def credentials(self, integration_id: str) -> Credentials | None:
        """The usable credentials of a `mailgun` integration, or None."""
        record = self.integrations.get(integration_id)
        return Credentials.from_record(record) if isinstance(record, IntegrationRecord) else None

    def all_credentials(self) -> list[Credentials]:
        """Every usable `mailgun` integration."""
        found = (Credentials.from_record(record) for record in self.integrations.values.values()
                 if isinstance(record, IntegrationRecord) and record.type == handlers.CHANNEL)
        return [creds for creds in found if creds is not None]

    def accepts_recipient(self, address: str) -> bool:
        """Whether a recipient is one of ours: an integration's incoming address, or a reply
        address of an integration's domain (its token is checked against the sender later)."""
        address = normal_address(address)
        domain = address.rpartition("@")[2]
        return any(creds.incoming_address == address or (creds.domain == domain and carries_reply_token(address))
                   for creds in self.all_credentials())

    # --- the three ways in ------------------------------------------------------------------

    async def receive_smtp(self, raw: bytes, mail_from: str, rcpt_tos: list[str]) -> Outcome:
        """A mail the SMTP receiver took (recipients already checked)."""
        try:
            mail = await self.reader.read(parse_mail, raw, self.limits)
        except MailRejected as exc:
            return self._rejected(None, exc.reason)
        mail = msgspec.structs.replace(mail, envelope_from=mail_from or mail.envelope_from,
                                       envelope_to=[*rcpt_tos, *mail.envelope_to])
        return await self.accept(mail, await self._smtp_verdict(raw, mail), handlers.digest(raw), "smtp")

    async def _smtp_verdict(self, raw: bytes, mail: InboundMail) -> AuthVerdict:
        """What the trusted front MTA concluded (Authentication-Results); without one, DKIM
        verified here (SPF needs the connecting address of the first hop, which only the MX has)."""
        if self.config.trusted_authserv_ids and mail.authentication_results:
            verdict = parse_authentication_results(mail.authentication_results, set(self.config.trusted_authserv_ids),
                                                   mail.from_domain)
            if verdict != AuthVerdict():
                return verdict
        lookup = KeyLookup()
        try:
            domains = await asyncio.to_thread(verify_dkim, raw, lookup)
        except Exception as exc:  # a DNS outage is no verdict: the sender retries later
            log.warning("DKIM verification failed to run: %s", exc)
            return AuthVerdict(dkim="temperror")
        if not domains and lookup.failed:
            return AuthVerdict(dkim="temperror")  # a key that could not be fetched is no forgery
        aligned = any(domains_aligned(domain, mail.from_domain) for domain in domains)
        return AuthVerdict(dkim="pass" if domains else "none", aligned=aligned)

    async def mailgun_webhook(self, request: web.Request) -> web.Response:
        """Mailgun's inbound route (`forward()`): signed, form-encoded or multipart. 200 once
        durable; 406 (Mailgun never retries it) for a mail refused for good; 503 to be retried."""
        creds = self._webhook_integration(request)
        fields, files = await self._read_form(request)
        if not (creds.webhook_signing_key and mailgun_signature_valid(
                creds.webhook_signing_key, fields.get("timestamp", ""), fields.get("token", ""),
                fields.get("signature", ""), time.time())):
            raise ApiError(401, "Missing or invalid Mailgun signature")
        await self._first_use_of(fields["token"], fields)
        try:
            mail = await self.reader.read(inbound_from_mailgun, fields, files, self.limits)
            verdict = verdict_from_mailgun(fields, self.limits)
        except MailRejected as exc:
            return self._webhook_answer(self._rejected(creds, exc.reason))
        outcome = await self.accept(mail, verdict, handlers.digest(fields.get("token", "").encode()), "mailgun",
                                    creds)
        return self._webhook_answer(outcome)

    async def sendgrid_webhook(self, request: web.Request) -> web.Response:
        """SendGrid's Inbound Parse (multipart; unsigned: the secret in the path is the proof)."""
        creds = self._webhook_integration(request)
        if not creds.inbound_secret or not secrets_equal(creds.inbound_secret, request.match_info["secret"]):
            raise ApiError(401, "Unknown inbound parse URL")
        fields, files = await self._read_form(request)
        try:
            mail = await self.reader.read(inbound_from_sendgrid, fields, files, self.limits)
        except MailRejected as exc:
            return self._webhook_answer(self._rejected(creds, exc.reason))
        verdict = verdict_from_sendgrid(fields.get("SPF", ""), fields.get("dkim", ""), mail.from_domain,
                                        mail.envelope_from or None)
        raw = "\n".join(f"{key}={fields[key]}" for key in sorted(fields)).encode()
        return self._webhook_answer(await self.accept(mail, verdict, handlers.digest(raw), "sendgrid", creds))

    async def _first_use_of(self, token: str, fields: Mapping[str, str]) -> None:
        """401 when a signature's token was seen with another body: Mailgun signs the timestamp
        and token, not the body, so a captured signature must not carry a forged mail. The same
        body again (Mailgun's retry) passes, and its Message-ID de-duplicates it."""
        body = handlers.digest("\n".join(f"{key}={fields[key]}" for key in sorted(fields)).encode()).encode()
        key = f"mgtoken.{handlers.digest(token.encode())}"
        try:
            await self.replays.create(key, body)
            return
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        except (nats.errors.Error, TimeoutError) as exc:
            raise ApiError(503, "try again later") from exc
        try:
            seen = (await self.replays.get(key)).value
        except (nats.errors.Error, TimeoutError) as exc:
            raise ApiError(503, "try again later") from exc
        if seen != body:
            log.warning("a Mailgun signature came again with another body: refused", extra=log_fields(
                event="mail_refused", reason="replayed signature"))
            raise ApiError(401, "Missing or invalid Mailgun signature")

    def _webhook_integration(self, request: web.Request) -> Credentials:
        creds = self.credentials(request.match_info["integration_id"])
        if creds is None:
            raise ApiError(404, "Unknown integration")
        return creds

    @staticmethod
    def _webhook_answer(outcome: Outcome) -> web.Response:
        if outcome.verdict in ("accepted", "ignored"):
            return web.Response(status=200, text=outcome.reason or "ok", content_type="text/plain")
        if outcome.verdict == "retry":
            raise ApiError(503, outcome.reason or "try again later")
        # 406: Mailgun's "rejected, do not retry"; SendGrid retries only 5xx.
        raise ApiError(406, outcome.reason or "refused", "mail_refused")

    async def _read_form(self, request: web.Request) -> tuple[dict[str, str], list[MailAttachment]]:
        """A webhook's form fields and files, bounded: 413 past the mail limit, 400 past the
        fields an ESP sends, 408 for a body that does not arrive in time, 503 while as many posts
        as SMTP sessions are being read (the ESP retries)."""
        if self.webhook_slots.locked():
            raise ApiError(503, "Too busy, try again later")
        async with self.webhook_slots:
            try:
                async with asyncio.timeout(FORM_READ_SECONDS):
                    return await self._read_form_now(request)
            except TimeoutError:
                raise ApiError(408, "The body did not arrive in time") from None

    async def _read_form_now(self, request: web.Request) -> tuple[dict[str, str], list[MailAttachment]]:
        limit = handlers.MAX_MAIL_BYTES + 1024 * 1024
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(413, "The mail is larger than 25 MB")
        if request.content_type == "application/x-www-form-urlencoded":
            body = await request.content.read(limit + 1)
            if len(body) > limit:
                raise ApiError(413, "The mail is larger than 25 MB")
            try:
                return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True,
                                      max_num_fields=MAX_FORM_FIELDS)), []
            except ValueError as exc:
                raise ApiError(400, f"More than {MAX_FORM_FIELDS} form fields") from exc
        if request.content_type != "multipart/form-data":
            raise ApiError(415, "Content-Type must be multipart/form-data or application/x-www-form-urlencoded")
        fields: dict[str, str] = {}
        files: list[MailAttachment] = []
        total = 0
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if len(fields) + len(files) >= MAX_FORM_FIELDS:
                    raise ApiError(400, f"More than {MAX_FORM_FIELDS} form fields")
                if not isinstance(part, BodyPartReader):
                    raise ApiError(400, "A nested multipart body is not a form field")
                # Each part's headers and boundary count too (an empty part is not free).
                total += PART_OVERHEAD_BYTES
                data = bytearray()
                while chunk := await part.read_chunk(_CHUNK):
                    total += len(chunk)
                    if total > limit:
                        raise ApiError(413, "The mail is larger than 25 MB")
                    data += chunk
                if part.filename is not None:
                    files.append(MailAttachment(part.filename, normal_type(part.headers.get("Content-Type"))
                                                or OPAQUE_TYPE, bytes(data)))
                elif part.name:
                    fields[part.name] = handlers.decoded_field(bytes(data), part.get_charset("utf-8"))
        except ValueError as exc:
            raise ApiError(400, f"Malformed multipart/form-data body: {exc}") from exc
        return fields, files

    # --- one path for every mail ------------------------------------------------------------

    async def accept(self, mail: InboundMail, verdict: AuthVerdict, raw_digest: str, way: str,
                     creds: Credentials | None = None) -> Outcome:
        """Take a parsed mail: find its integration and conversation, check its sender, keep its
        files, publish its messages durably."""
        with _tracer.start_as_current_span("mail receive", kind=SpanKind.CONSUMER) as span:
            span.set_attribute("threadline.mail.ingress", way)
            replied = replied_conversation(self.config.keyring, mail)
            found = handlers.integration_for(mail.recipients, self.all_credentials(), replied)
            if creds is None:
                creds = found
            if creds is None:
                return self._rejected(None, "no such mailbox here")
            if replied is not None and replied[0] != creds.app_id:
                replied = None
            recipients = {normal_address(address) for address in mail.recipients}
            if replied is None and creds.incoming_address not in recipients and any(map(carries_reply_token,
                                                                                        recipients)):
                # A reply address whose token is not this sender's: forged, or forwarded by someone else.
                return self._rejected(creds, "the reply address was not issued to this sender")
            if mail.auto_submitted:
                log.info("automatic mail (auto-reply, bounce) from %s not taken as a message", mail.from_domain,
                         extra=log_fields(integration_id=creds.integration_id, event="mail_ignored"))
                metrics.message_in(handlers.CHANNEL, "rejected")
                return Outcome("ignored", "automatic mail not taken as a message")
            reason = handlers.refusal(verdict, mail)
            if reason is not None:
                if verdict.dkim == "temperror" or verdict.spf == "temperror":
                    return Outcome("retry", "sender authentication could not be checked now")
                return self._rejected(creds, reason)
            try:
                wait = await self.limiter.take("sender", f"{creds.app_id}:{normal_address(mail.from_address)}",
                                               self.config.per_sender)
            except Exception as exc:  # the KV is down: the sender retries
                log.warning("mail rate limit unavailable: %s", exc)
                return Outcome("retry", "try again later")
            if wait > 0:
                metrics.message_in(handlers.CHANNEL, "rejected")
                return Outcome("retry", f"too many mails from this sender; try again in {int(wait) + 1} s")
            try:
                files = [await self._keep(creds, attachment) for attachment in mail.attachments]
            except ObjectStoreError as exc:
                log.warning("mail attachments not stored: %s", exc)
                return Outcome("retry", "temporary failure storing attachments")
            conversation_id = replied[1] if replied is not None else await self.threads.replied_conversation(
                creds.app_id, mail)
            id_of_mail = handlers.provider_id(mail, raw_digest)
            messages = handlers.inbound_messages(mail, creds, id_of_mail=id_of_mail, received_at=time.time(),
                                                 conversation_id=conversation_id, files=files, verdict=verdict)
            try:
                await publish_durably(self.bus, handlers.CHANNEL, messages, message_id=handlers.inbound_msg_id,
                                      what="mail")
            except ApiError:
                return Outcome("retry", "temporary failure, try again later")
            thread_key = conversation_id or handlers.sender_thread_key(creds.integration_id, mail.from_address)
            await self.threads.add(thread_key, id_of_mail, mail.subject)
            if conversation_id is not None:
                await self.threads.link(id_of_mail, creds.app_id, conversation_id, mail.from_address)
            log.info("mail accepted through %s: %d message(s)", way, len(messages),
                     extra=log_fields(integration_id=creds.integration_id, conversation_id=conversation_id,
                                      messages=len(messages)))
            return Outcome("accepted")

    def _rejected(self, creds: Credentials | None, reason: str) -> Outcome:
        metrics.message_in(handlers.CHANNEL, "rejected")
        log.warning("mail refused: %s", reason, extra=log_fields(
            integration_id=creds.integration_id if creds else None, event="mail_refused", reason=reason))
        return Outcome("refused", reason)

    async def _keep(self, creds: Credentials, attachment: MailAttachment) -> KeptFile:
        """Store one attachment (as its type when that may be served, else as a download)."""
        declared = normal_type(attachment.media_type)
        kept_type = declared if declared in ALLOWED_TYPES else OPAQUE_TYPE
        name = named_file(attachment.filename or None, kept_type)
        token = new_token()
        await put_bytes(self.files, object_key(creds.app_id, token), attachment.data, kept_type)
        return KeptFile(attachment_url(self.common.public_base_url, creds.app_id, token, name), kept_type, name)


def create(environ: Mapping[str, str] | None = None) -> EmailService:
    """Build the e-mail service from the environment (os.environ when None)."""
    setup_telemetry("email")
    return EmailService(EmailConfig.from_env(environ))
