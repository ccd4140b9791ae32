"""Signatures: Meta's X-Hub-Signature-256, Threadline's webhook signature, HS256 JWTs, SDK tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import time
from dataclasses import dataclass
from typing import Any

from shared.untrusted import decode_json, secrets_equal

META_SIGNATURE_HEADER = "X-Hub-Signature-256"
WEBHOOK_SIGNATURE_HEADER = "X-Threadline-Signature"


def meta_signature(app_secret: str, raw_body: bytes) -> str:
    """The `X-Hub-Signature-256` value Meta sends for `raw_body`."""
    return "sha256=" + hmac.new(app_secret.encode(), raw_body, hashlib.sha256).hexdigest()


def meta_signature_ok(app_secret: str, raw_body: bytes, header: str | None) -> bool:
    """Constant-time check of an `X-Hub-Signature-256` header over the raw bytes received."""
    if not header or not header.startswith("sha256="):
        return False
    return secrets_equal(meta_signature(app_secret, raw_body), header)


def meta_handshake_challenge(verify_token: str | None, mode: str | None, token: str | None,
                             challenge: str | None) -> str | None:
    """The `hub.challenge` to echo when Meta's subscription handshake (`hub.mode=subscribe`,
    `hub.verify_token`) is genuine for an integration whose verify token is `verify_token`, else
    None (no token set, another mode, or the wrong token)."""
    if not verify_token or mode != "subscribe" or challenge is None or token is None:
        return None
    return challenge if secrets_equal(verify_token, token) else None


def webhook_signature(secret: str, raw_body: bytes, timestamp: int | None = None) -> str:
    """`X-Threadline-Signature`: `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`."""
    ts = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{ts}.".encode() + raw_body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={digest}"


def webhook_signature_ok(secret: str, raw_body: bytes, header: str, *, tolerance: int = 300,
                         now: float | None = None) -> bool:
    """Verify an `X-Threadline-Signature` header (what a business's receiver should do)."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        ts = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance:
        return False
    return secrets_equal(webhook_signature(secret, raw_body, ts), header)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class JwtError(ValueError):
    """The token is malformed, unsigned, wrongly signed or expired."""


@dataclass(frozen=True)
class JwtPolicy:
    """What `jwt_decode` requires of the time claims beyond a good signature.

    `exp`, `iat` and `nbf`, when present, must be numbers (a string or a boolean is refused, not
    ignored). A token may live at most `max_lifetime_seconds` (`exp` minus `iat`, or minus now
    without `iat`); `require_exp` refuses tokens without `exp` (SunCo's documented tokens carry
    none, so it is off by default). `leeway_seconds` absorbs clock skew on `exp`/`nbf`/`iat`.
    """

    max_lifetime_seconds: float = 24 * 3600
    require_exp: bool = False
    leeway_seconds: float = 60


DEFAULT_JWT_POLICY = JwtPolicy()


def jwt_encode(payload: dict[str, Any], key: str, kid: str | None = None) -> str:
    """An HS256 JWT."""
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signing_input = _b64url(json.dumps(header, separators=(",", ":")).encode()) + "." + _b64url(
        json.dumps(payload, separators=(",", ":")).encode())
    sig = hmac.new(key.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64url(sig)


def jwt_header(token: str) -> dict[str, Any]:
    """The (unverified) header of a JWT, to find its `kid` (bounded decoding: it is unverified)."""
    if not token.isascii():  # base64url and dots only; `jwt_decode` relies on this too
        raise JwtError("malformed token")
    try:
        header = decode_json(_b64url_decode(token.split(".")[0]))
    except (ValueError, IndexError) as exc:
        raise JwtError("malformed token") from exc
    if not isinstance(header, dict):
        raise JwtError("malformed token")
    return header


def jwt_decode(token: str, key: str, policy: JwtPolicy = DEFAULT_JWT_POLICY,
               now: float | None = None) -> dict[str, Any]:
    """Verify an HS256 JWT with `key` and return its payload; refuses other algorithms and time
    claims `policy` does not accept (see `JwtPolicy`)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtError("malformed token")
    header = jwt_header(token)
    if header.get("alg") != "HS256":
        raise JwtError("only HS256 tokens are accepted")
    expected = hmac.new(key.encode(), f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    try:
        given = _b64url_decode(parts[2])
        payload = decode_json(_b64url_decode(parts[1]))
    except ValueError as exc:
        raise JwtError("malformed token") from exc
    if not secrets_equal(expected, given):
        raise JwtError("bad signature")
    if not isinstance(payload, dict):
        raise JwtError("malformed payload")
    check_time_claims(payload, policy, time.time() if now is None else now)
    return payload


def _number_claim(payload: dict[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None and name not in payload:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise JwtError(f"{name} must be a number of seconds since the epoch")
    return float(value)


def check_time_claims(payload: dict[str, Any], policy: JwtPolicy, now: float) -> None:
    """Raise JwtError unless `exp`/`iat`/`nbf` are numbers that make the token valid at `now`."""
    exp = _number_claim(payload, "exp")
    iat = _number_claim(payload, "iat")
    nbf = _number_claim(payload, "nbf")
    leeway = policy.leeway_seconds
    if exp is None:
        if policy.require_exp:
            raise JwtError("exp is required")
    elif exp + leeway < now:
        raise JwtError("token expired")
    if nbf is not None and nbf - leeway > now:
        raise JwtError("token not valid yet (nbf)")
    if iat is not None and iat - leeway > now:
        raise JwtError("iat is in the future")
    if exp is not None and exp - (iat if iat is not None else now) > policy.max_lifetime_seconds:
        raise JwtError(f"exp is more than {policy.max_lifetime_seconds:g} seconds after "
                       f"{'iat' if iat is not None else 'now'} (maximum token lifetime)")


def sign_token(secret: str, fields: dict[str, Any]) -> str:
    """A compact signed token (`<b64 json>.<b64 hmac>`) for SDK sessions and similar."""
    body = _b64url(json.dumps(fields, separators=(",", ":"), sort_keys=True).encode())
    sig = _b64url(hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest())
    return f"{body}.{sig}"


def verify_token(secret: str, token: str) -> dict[str, Any] | None:
    """The fields of a token made by `sign_token`, or None when it is not authentic."""
    try:
        body, sig = token.split(".")
        expected = _b64url(hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest())
        if not secrets_equal(expected, sig):
            return None
        fields = decode_json(_b64url_decode(body))
    except ValueError:
        return None
    return fields if isinstance(fields, dict) else None
