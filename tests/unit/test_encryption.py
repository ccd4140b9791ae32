"""shared/encryption.py: envelope encryption of secrets, key rotation, keyring configuration."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from shared.config import ConfigError
from shared.encryption import KEY_ENV, KEY_FILE_ENV, Keyring, SecretsError, generate_key, is_sealed, sealed_key_id
from shared.records import IntegrationRecord, integration_context, open_integration

OLD = f"k1:{generate_key()}"
NEW = f"k2:{generate_key()}"


def test_sealed_values_open_only_with_their_key_and_context() -> None:
    ring = Keyring.parse(OLD)
    sealed = ring.seal("EAAG-secret-token", "integration:i1:accessToken")
    assert is_sealed(sealed) and sealed_key_id(sealed) == "k1" and "EAAG" not in sealed
    assert ring.open(sealed, "integration:i1:accessToken") == "EAAG-secret-token"
    # A fresh data key each time: the same secret never seals to the same text.
    assert ring.seal("EAAG-secret-token", "integration:i1:accessToken") != sealed
    # Copied to another row or field, it does not open.
    with pytest.raises(SecretsError):
        ring.open(sealed, "integration:i2:accessToken")
    with pytest.raises(SecretsError):
        Keyring.parse(f"k1:{generate_key()}").open(sealed, "integration:i1:accessToken")
    tampered = sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]
    with pytest.raises(SecretsError):
        ring.open(tampered, "integration:i1:accessToken")
    with pytest.raises(SecretsError):
        ring.open("tlenc1:k1:not-base64!", "integration:i1:accessToken")
    # Plaintext (rows from before encryption) passes through, for the migration to seal.
    assert ring.open("legacy-plaintext", "x") == "legacy-plaintext"


def test_rotation_old_key_opens_new_key_seals() -> None:
    sealed_old = Keyring.parse(OLD).seal("s3cret", "appkey:app_1:secret")
    rotating = Keyring.parse(f"{NEW},{OLD}")
    assert rotating.primary_id == "k2"
    assert rotating.open(sealed_old, "appkey:app_1:secret") == "s3cret"
    assert rotating.needs_reseal(sealed_old) and rotating.needs_reseal("plaintext")
    resealed = rotating.reseal(sealed_old, "appkey:app_1:secret")
    assert sealed_key_id(resealed) == "k2" and not rotating.needs_reseal(resealed)
    assert Keyring.parse(NEW).open(resealed, "appkey:app_1:secret") == "s3cret"
    # Once the old key is dropped, what it sealed no longer opens.
    with pytest.raises(SecretsError, match="k1"):
        Keyring.parse(NEW).open(sealed_old, "appkey:app_1:secret")
    token_old = Keyring.parse(OLD).seal("tok", "ctx:accessToken")
    fields = rotating.seal_fields({"accessToken": token_old, "phoneNumber": "+1555", "appSecret": "plain"},
                                  ("accessToken", "appSecret"), "ctx")
    assert rotating.open_fields(fields, "ctx") == {"accessToken": "tok", "phoneNumber": "+1555", "appSecret": "plain"}
    assert fields["phoneNumber"] == "+1555"
    assert all(sealed_key_id(fields[f]) == "k2" for f in ("accessToken", "appSecret"))


def test_placeholder_short_or_missing_keys_are_refused_outside_the_sandbox(tmp_path: Path) -> None:
    for bad in ("changeme", "k1:changeme", "k1:" + base64.b64encode(b"short").decode(),
                "k1:" + base64.b64encode(bytes(32)).decode(), "not base64 at all!", f"k1:{generate_key()},{OLD}"):
        with pytest.raises(ConfigError):
            Keyring.from_env({KEY_ENV: bad}, sandbox=False)
    with pytest.raises(ConfigError):
        Keyring.from_env({}, sandbox=False)
    ring = Keyring.from_env({KEY_ENV: f"{NEW}\n{OLD}"}, sandbox=False)
    assert [kid for kid, _ in ring.keys] == ["k2", "k1"]
    # `openssl rand -base64 32` without an id gets one derived from the key.
    anonymous = Keyring.from_env({KEY_ENV: base64.b64encode(bytes(range(32))).decode()}, sandbox=False)
    assert anonymous.primary_id is not None and anonymous.primary_id.startswith("k")
    # A mounted Secret file works the same; not both.
    key_file = tmp_path / "key"
    key_file.write_text(NEW + "\n")
    assert Keyring.from_env({KEY_FILE_ENV: str(key_file)}, sandbox=False).primary_id == "k2"
    with pytest.raises(ConfigError):
        Keyring.from_env({KEY_FILE_ENV: str(key_file), KEY_ENV: NEW}, sandbox=False)
    with pytest.raises(ConfigError):
        Keyring.from_env({KEY_FILE_ENV: str(tmp_path / "missing")}, sandbox=False)
    # The sandbox falls back to a well-known key.
    assert Keyring.from_env({}, sandbox=True).primary_id == "sandbox"


def test_a_service_without_the_key_never_sees_a_secret() -> None:
    ring = Keyring.parse(OLD)
    config = ring.seal_fields({"accessToken": "tok", "phoneNumberId": "123"}, ("accessToken",),
                              integration_context("i1"))
    record = IntegrationRecord(id="i1", app_id="a", type="whatsapp", config=config)
    assert open_integration(record, ring).config == {"accessToken": "tok", "phoneNumberId": "123"}
    # No keyring (web): the sealed field is left out, never handed on as ciphertext.
    assert open_integration(record, Keyring()).config == {"phoneNumberId": "123"}
    with pytest.raises(SecretsError):
        Keyring().seal("x", "y")
