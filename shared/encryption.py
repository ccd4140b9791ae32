"""Secrets at rest: envelope encryption with AES-256-GCM under key-encryption keys from the environment.

Every secret Threadline keeps (app key secrets, channel credentials, webhook secrets) is stored,
and mirrored to KV, as a *sealed* string:

    tlenc1:<key id>:<base64url(wrap nonce | wrapped data key | nonce | ciphertext + tag)>

A fresh 256-bit data key encrypts the value (AES-256-GCM, the value's `context` — e.g.
`integration:<id>:accessToken` — as associated data, so a sealed value copied onto another row
or field does not open); the key-encryption key named by `<key id>` wraps the data key
(AES-256-GCM, the key id as associated data).

The keyring (`THREADLINE_SECRETS_KEY`, or the file named by `THREADLINE_SECRETS_KEY_FILE`) is a
list of `[<id>:]<key>` entries separated by commas or whitespace; each key is 32 random bytes in
base64 (`openssl rand -base64 32`). The first entry seals; every entry opens. Rotation: add the
new key last everywhere, then move it first, let `conversations` re-seal at start, then drop the
old one (README, "Secrets at rest").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.config import PLACEHOLDER_SECRETS, ConfigError

SEALED_PREFIX = "tlenc1:"
# The services given the keyring: those that keep secrets (`conversations`) or use them (channel
# credentials, push keys, SMTP passwords, webhook secrets; the sandbox's fakes check them; the desk
# derives its CSRF and throttle keys from it).
# `identity`, `handoff` and `web` need none and are not given it.
SERVICES_WITH_SECRETS = ("conversations", "webhooks", "notifications", "whatsapp", "messenger", "telegram", "sms",
                         "email", "app", "sandbox", "desk")
KEY_ENV = "THREADLINE_SECRETS_KEY"
KEY_FILE_ENV = "THREADLINE_SECRETS_KEY_FILE"
_KEY_BYTES = 32
_NONCE = 12
_WRAPPED = _KEY_BYTES + 16
_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
# The sandbox's keyring when none is given: sealed data stays sealed, but with a key everyone knows.
SANDBOX_KEYRING = "sandbox:" + base64.urlsafe_b64encode(
    hashlib.sha256(b"threadline sandbox secrets key (not for production)").digest()).decode().rstrip("=")


class SecretsError(Exception):
    """A sealed value cannot be opened (unknown key id, wrong key, tampered, wrong context)."""


def is_sealed(value: object) -> bool:
    """Whether `value` is a sealed string (as opposed to a plaintext one)."""
    return isinstance(value, str) and value.startswith(SEALED_PREFIX)


def sealed_key_id(value: str) -> str:
    """The id of the key that sealed `value` (which must be sealed)."""
    return value[len(SEALED_PREFIX):].partition(":")[0]


def _b64decode(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    try:
        return base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError("a secrets key must be base64 (openssl rand -base64 32)") from exc


def generate_key() -> str:
    """A new random key, as a keyring entry's key part (base64url, no padding)."""
    return base64.urlsafe_b64encode(os.urandom(_KEY_BYTES)).decode().rstrip("=")


@dataclass(frozen=True)
class Keyring:
    """Key-encryption keys by id; the first one seals, any of them opens.

    An empty keyring opens and seals nothing: a service that is not given the key (one that
    needs no secret, e.g. `web`) sees sealed values as unreadable.
    """

    keys: tuple[tuple[str, bytes], ...] = ()
    _by_id: dict[str, AESGCM] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key_id, key in self.keys:
            if key_id in self._by_id:
                raise ConfigError(f"secrets key id {key_id!r} appears twice in the keyring")
            self._by_id[key_id] = AESGCM(key)

    @classmethod
    def parse(cls, text: str, *, strict: bool = True) -> Keyring:
        """Parse `[<id>:]<base64 key>` entries (comma or whitespace separated, newest first).

        `strict` refuses placeholder and low-entropy keys (everywhere but the sandbox).
        """
        keys: list[tuple[str, bytes]] = []
        for entry in re.split(r"[\s,]+", text.strip()):
            if not entry:
                continue
            key_id, sep, material = entry.partition(":")
            if not sep:
                key_id, material = "", entry
            if strict and material.strip().lower() in PLACEHOLDER_SECRETS:
                raise ConfigError(f"{KEY_ENV} holds a placeholder; generate a key with `openssl rand -base64 32`")
            key = _b64decode(material)
            if len(key) != _KEY_BYTES:
                raise ConfigError(f"a secrets key must be {_KEY_BYTES} bytes in base64 "
                                  f"(`openssl rand -base64 32`), got {len(key)} bytes")
            if strict and len(set(key)) < 12:
                raise ConfigError(f"{KEY_ENV} holds a low-entropy key; generate one with `openssl rand -base64 32`")
            if not key_id:
                key_id = "k" + hashlib.sha256(b"threadline key id\0" + key).hexdigest()[:8]
            if not _KEY_ID.match(key_id):
                raise ConfigError(f"secrets key id {key_id!r} must be 1-32 of [A-Za-z0-9_-]")
            keys.append((key_id, key))
        if not keys:
            raise ConfigError(f"{KEY_ENV} holds no key")
        return cls(tuple(keys))

    @classmethod
    def from_env(cls, environ: Mapping[str, str], *, sandbox: bool) -> Keyring:
        """The keyring of `THREADLINE_SECRETS_KEY` or `THREADLINE_SECRETS_KEY_FILE`.

        Required outside the sandbox (placeholders and short keys refused); the sandbox falls
        back to a well-known key.
        """
        text = environ.get(KEY_ENV, "")
        path = environ.get(KEY_FILE_ENV, "")
        if text and path:
            raise ConfigError(f"set {KEY_ENV} or {KEY_FILE_ENV}, not both")
        if path:
            try:
                with open(path) as fh:
                    text = fh.read()
            except OSError as exc:
                raise ConfigError(f"{KEY_FILE_ENV}: cannot read {path}: {exc.strerror}") from exc
        if not text.strip():
            if sandbox:
                return cls.parse(SANDBOX_KEYRING, strict=False)
            raise ConfigError(f"{KEY_ENV} (or {KEY_FILE_ENV}) must be set: the key that encrypts secrets at rest")
        return cls.parse(text, strict=not sandbox)

    def derived(self, label: str) -> list[bytes]:
        """Keys for another purpose than sealing (signing reply addresses, …), one per key of the
        ring, the primary's first: sign with the first, accept any (a rotation keeps what was
        signed before it working while the old key stays in the ring)."""
        return [hmac.new(key, b"threadline derived key\0" + label.encode(), hashlib.sha256).digest()
                for _key_id, key in self.keys]

    @property
    def primary_id(self) -> str | None:
        """The id of the key that seals (None for an empty keyring)."""
        return self.keys[0][0] if self.keys else None

    def can_open(self, value: str) -> bool:
        """Whether this keyring holds the key `value` was sealed with."""
        return sealed_key_id(value) in self._by_id

    def seal(self, plaintext: str, context: str) -> str:
        """Seal `plaintext` under the primary key, bound to `context`."""
        if not self.keys:
            raise SecretsError("no secrets key is configured: cannot seal")
        key_id, _ = self.keys[0]
        data_key = AESGCM.generate_key(bit_length=256)
        wrap_nonce, nonce = os.urandom(_NONCE), os.urandom(_NONCE)
        wrapped = self._by_id[key_id].encrypt(wrap_nonce, data_key, key_id.encode())
        body = AESGCM(data_key).encrypt(nonce, plaintext.encode(), context.encode())
        blob = base64.urlsafe_b64encode(wrap_nonce + wrapped + nonce + body).decode().rstrip("=")
        return f"{SEALED_PREFIX}{key_id}:{blob}"

    def open(self, value: str, context: str) -> str:
        """The plaintext of a sealed `value`; a value that is not sealed is returned as it is
        (written before secrets were encrypted; `conversations` re-seals those at start)."""
        if not is_sealed(value):
            return value
        key_id, _, blob = value[len(SEALED_PREFIX):].partition(":")
        kek = self._by_id.get(key_id)
        if kek is None:
            raise SecretsError(f"sealed with key {key_id!r}, which the keyring does not hold")
        try:
            raw = base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))
        except (binascii.Error, ValueError) as exc:
            raise SecretsError("malformed sealed value") from exc
        if len(raw) < _NONCE + _WRAPPED + _NONCE + 16:
            raise SecretsError("malformed sealed value")
        wrap_nonce, wrapped = raw[:_NONCE], raw[_NONCE:_NONCE + _WRAPPED]
        nonce, body = raw[_NONCE + _WRAPPED:2 * _NONCE + _WRAPPED], raw[2 * _NONCE + _WRAPPED:]
        try:
            data_key = kek.decrypt(wrap_nonce, wrapped, key_id.encode())
            return AESGCM(data_key).decrypt(nonce, body, context.encode()).decode()
        except (InvalidTag, UnicodeDecodeError) as exc:
            raise SecretsError(f"sealed value does not open with key {key_id!r} in context {context!r}") from exc

    def needs_reseal(self, value: str) -> bool:
        """Whether `value` is plaintext or sealed under a key other than the primary one."""
        return not is_sealed(value) or sealed_key_id(value) != self.primary_id

    def reseal(self, value: str, context: str) -> str:
        """`value` sealed under the primary key (opened first when sealed under another)."""
        return self.seal(self.open(value, context), context) if self.needs_reseal(value) else value

    def seal_fields(self, values: Mapping[str, Any], fields: Iterable[str], context: str) -> dict[str, Any]:
        """A copy of `values` whose string `fields` are sealed under the primary key (context
        `<context>:<field>`); values sealed under an older key are re-sealed."""
        out = dict(values)
        for name in fields:
            value = out.get(name)
            if isinstance(value, str) and value:
                out[name] = self.reseal(value, f"{context}:{name}")
        return out

    def open_fields(self, values: Mapping[str, Any], context: str) -> dict[str, Any]:
        """A copy of `values` with every sealed string opened (context `<context>:<field>`).

        Raises SecretsError for a value that does not open.
        """
        return {name: self.open(value, f"{context}:{name}") if is_sealed(value) else value
                for name, value in values.items()}
