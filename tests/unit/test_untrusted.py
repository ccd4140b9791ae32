"""Hostile text and JSON are refused (False or a ValueError), never a TypeError or RecursionError."""

from __future__ import annotations

import base64

import msgspec
import pytest

from shared.signing import (
    JwtError,
    jwt_decode,
    jwt_encode,
    jwt_header,
    meta_signature,
    meta_signature_ok,
    sign_token,
    verify_token,
    webhook_signature_ok,
)
from shared.twilio_wire import twilio_signature_ok
from shared.untrusted import MAX_JSON_DEPTH, decode_json, json_depth, secrets_equal

NESTED = b"[" * 2000 + b"]" * 2000


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize("given", ["é", "sha256=é", "\udcff", "\ud800", b"\xff", "", None])
def test_secrets_equal_refuses_any_text(given: str | bytes | None) -> None:
    assert secrets_equal("sha256=abc", given) is False


def test_secrets_equal_accepts_the_secret_in_either_type() -> None:
    assert secrets_equal("s3cret", "s3cret") and secrets_equal(b"s3cret", "s3cret") and secrets_equal("é", "é")


def test_signature_checks_refuse_non_ascii_headers() -> None:
    assert meta_signature_ok("secret", b"{}", "sha256=é") is False
    assert meta_signature_ok("secret", b"{}", "sha256=\udcff") is False
    assert meta_signature_ok("secret", b"{}", meta_signature("secret", b"{}")) is True
    assert webhook_signature_ok("secret", b"{}", "t=1,v1=é", now=1) is False
    assert twilio_signature_ok("token", "https://x.test/hook", [("Body", "hi")], "é\udcff") is False


def test_sdk_token_with_non_ascii_signature_is_not_authentic() -> None:
    token = sign_token("secret", {"user": "u"})
    assert verify_token("secret", token) == {"user": "u"}
    assert verify_token("secret", token.split(".")[0] + ".é") is None
    assert verify_token("secret", "abc.\udcff") is None


def test_jwt_with_a_deep_or_non_ascii_header_is_malformed() -> None:
    with pytest.raises(JwtError):
        jwt_header(f"{_b64url(NESTED)}.e30.c2ln")
    with pytest.raises(JwtError):
        jwt_decode(f"{_b64url(NESTED)}.e30.c2ln", "key")
    good = jwt_encode({"scope": "app"}, "key", kid="app_1")
    head, payload, sig = good.split(".")
    with pytest.raises(JwtError):
        jwt_decode(f"{head}.{payload}é.{sig}", "key")
    with pytest.raises(JwtError):
        jwt_decode(f"{head}.{_b64url(NESTED)}.{sig}", "key")
    assert jwt_decode(good, "key") == {"scope": "app"}


def test_decode_json_bounds_depth_and_size() -> None:
    with pytest.raises(msgspec.DecodeError, match="nested deeper"):
        decode_json(NESTED)
    with pytest.raises(msgspec.DecodeError, match="nested deeper"):
        decode_json(NESTED.decode(), dict)
    with pytest.raises(msgspec.DecodeError, match="larger than"):
        decode_json(b'"' + b"a" * 100 + b'"', max_bytes=50)
    at_limit = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert decode_json(at_limit) is not None
    with pytest.raises(msgspec.DecodeError):
        decode_json(b"[" + at_limit + b"]")


def test_brackets_inside_strings_do_not_count() -> None:
    text = b'{"a": "' + b"[" * 500 + b'\\" [[[", "b": [[1]]}'
    assert json_depth(text) == 3
    assert decode_json(text)["b"] == [[1]]


def test_decode_json_refuses_undecodable_text() -> None:
    for raw in (b'{"a": "\xff"}', '{"a": "\udcff"}', rb'{"a": "\udcff"}'):
        with pytest.raises(msgspec.DecodeError):
            decode_json(raw)
