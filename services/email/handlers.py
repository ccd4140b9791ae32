"""The e-mail channel's logic on decoded values: which integration a mail is for, whether its
sender is who it claims, what customer messages it becomes, and the mail a business message
becomes. No I/O here (see `app.py`, `smtp.py`, `sender.py`).

The channel is SunCo's `mailgun` integration type. Its config (camelCase): `incomingAddress`
(where customers write, e.g. `support@mail.example.com`; replies go to `reply+<token>@` that
domain), the SMTP settings of `shared.mailsend` for sending, and for the HTTP ingress
`webhookSigningKey` (Mailgun's HTTP webhook signing key) and `inboundSecret` (the secret path
segment of the SendGrid Inbound Parse URL).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import msgspec

from shared.mailparse import AuthVerdict, InboundMail, is_spoofed
from shared.mailreply import carries_reply_token, normal_address
from shared.messages.channel import InboundMessage
from shared.messages.handoff import redemption_code
from shared.outbound import SendFailure
from shared.records import IntegrationRecord
from shared.sunco import Content, FileContent, ImageContent, TextContent

CHANNEL: Final = "mailgun"
# What one received mail may weigh (SMTP `SIZE`, webhook bodies): 25 MB of mail carries about
# 18 MB of attachments once base64-encoded, what the large mail providers accept.
MAX_MAIL_BYTES: Final = 25 * 1024 * 1024
# Kept in `tl_mail_threads` per conversation: the subject and the last Message-IDs.
MAX_THREAD_IDS: Final = 20
MIN_INBOUND_SECRET: Final = 16


@dataclass(frozen=True)
class Credentials:
    """The fields of a `mailgun` integration record the channel needs."""

    integration_id: str
    app_id: str
    record: IntegrationRecord
    incoming_address: str  # normalized, "" when unset
    domain: str  # of incomingAddress (else fromAddress), "" when neither
    webhook_signing_key: str
    inbound_secret: str

    @classmethod
    def from_record(cls, record: IntegrationRecord) -> Credentials | None:
        """Credentials of a usable `mailgun` integration, or None."""
        if record.type != CHANNEL or record.status not in ("active", ""):
            return None
        cfg = record.config
        incoming = cfg.get("incomingAddress")
        incoming = normal_address(incoming) if isinstance(incoming, str) and "@" in incoming else ""
        sender = cfg.get("fromAddress")
        domain = (incoming or (normal_address(sender) if isinstance(sender, str) else "")).rpartition("@")[2]
        signing_key = cfg.get("webhookSigningKey")
        secret = cfg.get("inboundSecret")
        return cls(integration_id=record.id, app_id=record.app_id, record=record, incoming_address=incoming,
                   domain=domain, webhook_signing_key=signing_key if isinstance(signing_key, str) else "",
                   inbound_secret=secret if isinstance(secret, str) and len(secret) >= MIN_INBOUND_SECRET else "")


def integration_for(recipients: Iterable[str], integrations: Sequence[Credentials],
                    replied: tuple[str, str] | None = None) -> Credentials | None:
    """The integration a mail was sent to: the one whose `incomingAddress` is a recipient, or,
    for a reply address (`reply+…@domain`), the integration of that domain — of the replied
    conversation's app when the token was valid."""
    addresses = [normal_address(address) for address in recipients]
    for address in addresses:
        owners = [creds for creds in integrations if creds.incoming_address and creds.incoming_address == address]
        if len(owners) == 1:
            return owners[0]
        if owners:  # two integrations at one address (the API refuses it): deliver to neither
            return None
    for address in addresses:
        if not carries_reply_token(address):
            continue
        domain = address.rpartition("@")[2]
        for creds in integrations:
            if creds.domain == domain and (replied is None or creds.app_id == replied[0]):
                return creds
    return None


def refusal(verdict: AuthVerdict, mail: InboundMail) -> str | None:
    """Why a mail must be refused as a possible forgery (None when its sender is authenticated):
    DMARC failed, or neither SPF nor DKIM passed for a domain aligned with the From address."""
    if not mail.from_address or "@" not in mail.from_address:
        return "the mail must have exactly one From address"
    if not is_spoofed(verdict):
        return None
    if verdict.dmarc == "fail":
        return f"DMARC failed for {mail.from_domain}"
    return (f"the sender is not authenticated: neither SPF ({verdict.spf}) nor DKIM ({verdict.dkim}) passed"
            f" for {mail.from_domain}")


@dataclass(frozen=True)
class KeptFile:
    """An attachment kept in the object store: its public URL, type and name."""

    url: str
    media_type: str
    filename: str


def decoded_field(data: bytes, charset: str | None) -> str:
    """A webhook form field as text: in its declared charset, UTF-8 when that is unknown."""
    try:
        return data.decode(charset or "utf-8", "replace")
    except LookupError:
        return data.decode("utf-8", "replace")


def provider_id(mail: InboundMail, raw_digest: str) -> str:
    """The mail's id for de-duplication: its Message-ID, else a digest of what arrived."""
    return mail.message_id or f"<sha256.{raw_digest}@threadline>"


def digest(data: bytes) -> str:
    """A short digest of a received mail (its id when it has no Message-ID)."""
    return hashlib.sha256(data).hexdigest()[:32]


def customer_text(mail: InboundMail, replied: bool) -> str:
    """What a mail says in the conversation: the new text of a reply; for a first mail, its
    subject above its text (the subject is often all a short mail says)."""
    text = mail.text.strip()
    subject = " ".join(mail.subject.split())
    if replied or not subject or redemption_code(text) is not None:
        return text  # a handoff's prefilled mail is its code, whatever its subject
    return f"{subject}\n\n{text}" if text else subject


MAX_SUBJECT_METADATA = 200


def mail_metadata(mail: InboundMail, id_of_mail: str, verdict: AuthVerdict) -> dict[str, str | int | float | bool]:
    """What the business may want of a mail beside its text (SunCo message metadata, flat): its
    subject, Message-ID and the sender authentication it passed."""
    return {"email:subject": " ".join(mail.subject.split())[:MAX_SUBJECT_METADATA], "email:messageId": id_of_mail,
            "email:spf": verdict.spf, "email:dkim": verdict.dkim, "email:dmarc": verdict.dmarc}


def inbound_messages(mail: InboundMail, creds: Credentials, *, id_of_mail: str, received_at: float,
                     conversation_id: str | None, files: Sequence[KeptFile],
                     verdict: AuthVerdict = AuthVerdict()) -> list[InboundMessage]:
    """The customer messages a mail becomes: its text, then one per attachment (`<id>/<n>`),
    each with the mail's metadata."""
    sender = normal_address(mail.from_address)
    info = {"email": sender}
    contents: list[Content] = []
    text = customer_text(mail, replied=conversation_id is not None)
    if text:
        contents.append(TextContent(text=text))
    for file in files:
        if file.media_type.startswith("image/"):
            contents.append(ImageContent(media_url=file.url, media_type=file.media_type, alt_text=file.filename))
        else:
            contents.append(FileContent(media_url=file.url, media_type=file.media_type, alt_text=file.filename))
    if not contents:
        contents.append(TextContent(text=" ".join(mail.subject.split()) or "(empty e-mail)"))
    return [InboundMessage(
        app_id=creds.app_id, integration_id=creds.integration_id, channel=CHANNEL, client_type=CHANNEL,
        channel_user_id=sender, provider_message_id=id_of_mail if index == 0 else f"{id_of_mail}/{index}",
        received_at=received_at, content=content, display_name=mail.from_name or None, client_info=info,
        conversation_id=conversation_id, metadata=mail_metadata(mail, id_of_mail, verdict))
        for index, content in enumerate(contents)]


def inbound_msg_id(message: InboundMessage) -> str:
    """JetStream de-duplication id of an inbound e-mail message."""
    return f"{CHANNEL}:{message.integration_id}:{message.provider_message_id}"


# --- threads -----------------------------------------------------------------------------------

class MailThread(msgspec.Struct, kw_only=True):
    """A conversation's e-mail thread: its subject and its last Message-IDs, oldest first (what a
    business reply needs to thread under the customer's mail)."""

    subject: str = ""
    message_ids: list[str] = []

    def with_message(self, message_id: str, subject: str | None = None) -> MailThread:
        """The thread once `message_id` joined it (and its subject, when it had none)."""
        ids = [found for found in self.message_ids if found != message_id] + [message_id]
        return MailThread(subject=self.subject or " ".join((subject or "").split()),
                          message_ids=ids[-MAX_THREAD_IDS:])


def sender_thread_key(integration_id: str, address: str) -> str:
    """Where the thread of a mail that named no conversation is kept (a customer's first mail),
    until the conversation's own thread exists (KV keys allow no `@`)."""
    return f"sender.{integration_id}.{hashlib.sha256(normal_address(address).encode()).hexdigest()[:32]}"


class ThreadLink(msgspec.Struct, kw_only=True):
    """Which conversation a Message-ID of ours or of a customer's belongs to, and with whom: a
    reply naming it (In-Reply-To, References) joins that conversation only from that address."""

    app_id: str
    conversation_id: str
    address: str


def message_link_key(app_id: str, message_id: str) -> str:
    """Where a Message-ID's `ThreadLink` in an app is kept (KV keys allow no `<@>`)."""
    return f"mid.{app_id}.{hashlib.sha256(message_id.strip().lower().encode()).hexdigest()[:40]}"


LINK_ENCODER = msgspec.json.Encoder()
LINK_DECODER = msgspec.json.Decoder(ThreadLink)
THREAD_ENCODER = msgspec.json.Encoder()
THREAD_DECODER = msgspec.json.Decoder(MailThread)


# --- sending -----------------------------------------------------------------------------------

@dataclass
class MailSendFailure(SendFailure):
    """An SMTP send that failed: transient for 4xx replies and connection trouble."""

    title: str
    code: int | None = None
    transient: bool = False

    def __str__(self) -> str:
        return self.title

    def status_error(self) -> tuple[str, str, str | None]:
        return (f"smtp_{self.code}" if self.code is not None else "smtp"), self.title, None


@dataclass(frozen=True)
class MailPart:
    """One e-mail to send: to whom, what it says, its threading headers, and the thread it
    continues (which it joins once sent)."""

    to: str
    subject: str
    text: str
    headers: dict[str, str]
    message_id: str
    conversation_id: str
    thread: MailThread
