"""Replies by e-mail land in their conversation: every mail Threadline sends for a conversation
(a notification, a business message on the e-mail channel) carries a `Reply-To` of its own,
`reply+<token>@<the integration's domain>`, whose token names the app and the conversation and is
signed (`shared.mailparse.reply_address`).

The signing key is derived from the secrets keyring **and the recipient's address**, so a token
is valid only in a reply from the address it was sent to: a token copied into a mail from
anyone else is no proof of anything. That a reply really comes from that address is what the
sender authentication (SPF/DKIM/DMARC) of the e-mail channel checks.
"""

from __future__ import annotations

import hashlib
import hmac

from shared.encryption import Keyring
from shared.mailparse import InboundMail, parse_reply_address, reply_address
from shared.records import IntegrationRecord

KEY_LABEL = "mail reply addresses"
# The authserv-id the sandbox's mail box stamps on the replies it sends (`Authentication-Results`);
# the e-mail service trusts it in the sandbox only.
SANDBOX_AUTHSERV_ID = "sandbox.threadline.local"
LOCAL_PART = "reply"


def normal_address(address: str) -> str:
    """An address as keys and identities use it: trimmed and lower-cased."""
    return address.strip().lower()


def _sender_key(key: bytes, address: str) -> bytes:
    return hmac.new(key, b"sender\0" + normal_address(address).encode(), hashlib.sha256).digest()


def reply_domain(integration: IntegrationRecord) -> str | None:
    """The domain replies go to: the integration's `incomingAddress`'s (SunCo's inbound
    address), else its `fromAddress`'s; None when it has neither."""
    for field in ("incomingAddress", "fromAddress"):
        value = integration.config.get(field)
        if isinstance(value, str) and "@" in value:
            return value.rpartition("@")[2].strip().lower() or None
    return None


def reply_to(keyring: Keyring, integration: IntegrationRecord, conversation_id: str, recipient: str) -> str | None:
    """The Reply-To of a mail to `recipient` for a conversation of the integration's app; None
    when the integration has no domain or the keyring no key."""
    domain = reply_domain(integration)
    keys = keyring.derived(KEY_LABEL)
    if domain is None or not keys:
        return None
    return reply_address(_sender_key(keys[0], recipient), integration.app_id, conversation_id, LOCAL_PART, domain)


def replied_conversation(keyring: Keyring, mail: InboundMail) -> tuple[str, str] | None:
    """(app id, conversation id) of the reply address the mail was sent to, when its token was
    minted for the mail's From address (by any key of the ring); None otherwise."""
    if not mail.from_address:
        return None
    for key in keyring.derived(KEY_LABEL):
        secret = _sender_key(key, mail.from_address)
        for address in mail.recipients:
            found = parse_reply_address(secret, address)
            if found is not None:
                return found
    return None


def carries_reply_token(address: str) -> bool:
    """Whether an address has the shape of a reply address (`reply+…@`), valid or not."""
    local = address.strip().rpartition("@")[0].lower()
    return local.startswith(f"{LOCAL_PART}+")
