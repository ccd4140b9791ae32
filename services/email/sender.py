"""The e-mail send path: a business message becomes one mail through the integration's SMTP
server (`shared.mailsend`), threaded under the conversation's mail (`In-Reply-To`,
`References`, `Re:` subject) and with the conversation's signed `Reply-To`, so the customer's
answer comes back to the same conversation."""

from __future__ import annotations

import logging
from collections.abc import Callable

import nats.js.errors
from nats.js.kv import KeyValue

from shared import mailsend, render
from shared.bus import Bus
from shared.egress import EgressPolicy
from shared.encryption import Keyring
from shared.mailparse import InboundMail, reply_headers
from shared.mailreply import normal_address, reply_to
from shared.messages.channel import OutboundSend
from shared.outbound import ChannelSender, SendSettings, UnsendableContent

from . import handlers
from .handlers import Credentials, MailPart, MailSendFailure, MailThread, ThreadLink

log = logging.getLogger(__name__)

# In-Reply-To and the last References looked up to find the conversation a mail answers.
MAX_LINK_LOOKUPS = 5


class ThreadStore:
    """Each conversation's `MailThread` in the `tl_mail_threads` KV bucket (shared by replicas)."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, conversation_id: str) -> MailThread:
        """The conversation's thread (an empty one when it has none yet)."""
        try:
            entry = await self.kv.get(conversation_id)
        except nats.js.errors.KeyNotFoundError:
            return MailThread()
        return handlers.THREAD_DECODER.decode(entry.value) if entry.value else MailThread()

    async def add(self, key: str, message_id: str, subject: str | None = None) -> None:
        """Note a mail of a thread (best effort: an unthreaded reply still arrives)."""
        try:
            await self.put(key, (await self.get(key)).with_message(message_id, subject))
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("mail thread %s not updated: %s", key, exc)

    async def put(self, key: str, thread: MailThread) -> None:
        """Keep a thread as it is now."""
        await self.kv.put(key, handlers.THREAD_ENCODER.encode(thread))

    async def link(self, message_id: str, app_id: str, conversation_id: str, address: str) -> None:
        """Remember that a mail (ours, or the customer's) belongs to the conversation with `address`
        (best effort: a reply to it still has its Reply-To)."""
        try:
            # The first link of an id stays: a later mail claiming the same Message-ID moves nothing.
            await self.kv.create(handlers.message_link_key(app_id, message_id), handlers.LINK_ENCODER.encode(
                ThreadLink(app_id=app_id, conversation_id=conversation_id, address=normal_address(address))))
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("mail %s not linked to its conversation: %s", message_id, exc)

    async def replied_conversation(self, app_id: str, mail: InboundMail) -> str | None:
        """The conversation a mail answers by its In-Reply-To or References (the nearest first),
        when that mail was exchanged with the same address in this app; None otherwise."""
        sender = normal_address(mail.from_address)
        for message_id in [mail.in_reply_to, *reversed(mail.references)][:MAX_LINK_LOOKUPS]:
            if not message_id:
                continue
            try:
                entry = await self.kv.get(handlers.message_link_key(app_id, message_id))
            except nats.js.errors.KeyNotFoundError:
                continue
            link = handlers.LINK_DECODER.decode(entry.value) if entry.value else None
            if link is not None and link.app_id == app_id and link.address == sender:
                return link.conversation_id
        return None


class EmailSender(ChannelSender[Credentials, MailPart]):
    """One mail per business message; SMTP 4xx and connection trouble are retried with back-off,
    5xx replies and refused destinations are reported failed."""

    channel = handlers.CHANNEL

    def __init__(self, bus: Bus, settings: SendSettings, credentials: Callable[[str], Credentials | None],
                 threads: ThreadStore, keyring: Keyring, egress: EgressPolicy,
                 timeout: float = mailsend.DEFAULT_TIMEOUT_SECONDS) -> None:
        super().__init__(bus, settings, credentials)
        self.threads = threads
        self.keyring = keyring
        self.egress = egress
        self.timeout = timeout

    def unknown_integration(self) -> MailSendFailure:
        return MailSendFailure("Unknown or inactive e-mail integration", transient=True)

    async def plan(self, command: OutboundSend, creds: Credentials) -> list[MailPart]:
        try:
            fallback = render.fallback(command.content)
        except render.NoFallback as exc:
            raise UnsendableContent(str(exc)) from exc
        links = [url for url in fallback.media_urls if url not in fallback.text]
        text = "\n\n".join(part for part in (fallback.text, *links) if part)
        if not text:
            raise UnsendableContent("an empty message")
        thread = await self.threads.get(command.conversation_id)
        if not thread.message_ids:  # the business answers the customer's first mail
            thread = await self.threads.get(handlers.sender_thread_key(creds.integration_id, command.recipient))
        name = creds.record.config.get("fromName") or creds.record.display_name or "us"
        if not thread.subject:
            thread = MailThread(subject=f"Your conversation with {name}", message_ids=thread.message_ids)
        headers = reply_headers(thread.subject, None, thread.message_ids)
        address = reply_to(self.keyring, creds.record, command.conversation_id, command.recipient)
        if address is not None:
            headers["Reply-To"] = address
        return [MailPart(to=command.recipient, subject=headers.get("Subject", thread.subject), text=text,
                         headers=headers, message_id=f"<{command.message_id}@{creds.domain or 'threadline.invalid'}>",
                         conversation_id=command.conversation_id, thread=thread)]

    async def deliver(self, creds: Credentials, part: MailPart) -> str:
        try:
            provider_id = await mailsend.send_email(
                creds.record, part.to, part.subject, part.text, headers=part.headers, automated=False,
                message_id=part.message_id, policy=self.egress, timeout=self.timeout)
        except mailsend.EmailTransientError as exc:
            raise MailSendFailure(str(exc), exc.code, transient=True) from exc
        except mailsend.EmailPermanentError as exc:
            raise MailSendFailure(str(exc), exc.code) from exc
        await self.remember_sent(creds, part, provider_id)
        return provider_id

    async def remember_sent(self, creds: Credentials, part: MailPart, provider_id: str) -> None:
        """The conversation's thread now ends with the mail just sent, and a reply naming it joins
        the conversation (best effort)."""
        try:
            await self.threads.put(part.conversation_id, part.thread.with_message(provider_id))
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("mail thread of conversation %s not updated: %s", part.conversation_id, exc)
        await self.threads.link(provider_id, creds.app_id, part.conversation_id, part.to)
