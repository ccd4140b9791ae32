"""Single sign-on for the desk with OpenID Connect: the authorization code flow with PKCE.

An app's admins set the identity provider in the desk's settings (`issuer`, `clientId`,
`clientSecret`; the secret sealed at rest) and register `<public base URL>/desk/api/v1/sso/callback`
as its redirect URI. Signing in:

1. `GET /desk/api/v1/sso/start?app=<appId>`: the provider's discovery document is read (through the
   egress policy, cached); a random `state`, `nonce` and PKCE verifier are made, the state kept in
   the desk's store (single use, ten minutes) and in a short-lived cookie of this browser (so a
   callback carrying someone else's state — login CSRF — is refused); the browser goes to the
   provider's authorization endpoint (`response_type=code`, `scope=openid email profile`, S256).
2. `GET /desk/api/v1/sso/callback?code&state`: the state must match the cookie and a stored, unused,
   unexpired one of this app; the code is exchanged at the token endpoint (client secret basic, the
   PKCE verifier); the ID token's signature is checked against the provider's JWKS (RS256/ES256 and
   the like, never `none` or HMAC), its `iss`, `aud` (the client id), `exp`, `iat` and `nonce`; its
   `email` must be verified. The agent is the app's agent with that e-mail (SSO signs existing agents
   in; it creates none), not disabled. Then the session is rotated as after a password sign-in.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import jwt
import msgspec

# Algorithms an ID token may be signed with: asymmetric only (HMAC would let a client-secret holder
# mint tokens; `none` is no signature).
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
STATE_TTL = 600.0
CLOCK_LEEWAY = 60
SCOPES = "openid email profile"


class SsoError(Exception):
    """Why a sign-in through the provider failed (shown to the person, logged)."""


class Discovery(msgspec.Struct, kw_only=True):
    """What the desk reads of a provider's `/.well-known/openid-configuration`."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str


@dataclass(frozen=True, slots=True)
class Pending:
    """A sign-in under way: what the callback checks."""

    state: str
    nonce: str
    verifier: str


def new_pending() -> Pending:
    """Fresh random state, nonce and PKCE verifier (256 bits each)."""
    return Pending(state=secrets.token_urlsafe(32), nonce=secrets.token_urlsafe(32),
                   verifier=secrets.token_urlsafe(48))


def challenge(verifier: str) -> str:
    """The PKCE S256 code challenge of a verifier."""
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def state_hash(state: str) -> str:
    """How the store keys a state (never the state itself)."""
    return hashlib.sha256(state.encode()).hexdigest()


def authorization_url(discovery: Discovery, client_id: str, redirect_uri: str, pending: Pending) -> str:
    """Where the browser goes to sign in at the provider."""
    query = urlencode({"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
                       "scope": SCOPES, "state": pending.state, "nonce": pending.nonce,
                       "code_challenge": challenge(pending.verifier), "code_challenge_method": "S256"})
    separator = "&" if "?" in discovery.authorization_endpoint else "?"
    return f"{discovery.authorization_endpoint}{separator}{query}"


def verify_id_token(token: str, jwks: dict[str, Any], *, issuer: str, client_id: str, nonce: str,
                    now: float | None = None) -> dict[str, Any]:
    """The claims of a valid ID token; SsoError otherwise."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise SsoError("the provider's ID token is malformed") from exc
    algorithm = header.get("alg")
    if algorithm not in ALGORITHMS:
        raise SsoError(f"the provider's ID token is signed with {algorithm!r}, which the desk does not accept")
    try:
        keys = jwt.PyJWKSet.from_dict(jwks).keys
    except (jwt.PyJWTError, KeyError, TypeError, ValueError) as exc:
        raise SsoError("the provider's keys (JWKS) are unreadable") from exc
    kid = header.get("kid")
    candidates = [key for key in keys if kid is None or key.key_id == kid]
    if not candidates:
        raise SsoError("the provider's ID token names a key it does not publish")
    for key in candidates:
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key=key.key, algorithms=[algorithm], audience=client_id, issuer=issuer, leeway=CLOCK_LEEWAY,
                options={"require": ["iss", "aud", "exp", "iat", "sub"]})
        except jwt.InvalidSignatureError:
            continue
        except jwt.PyJWTError as exc:
            raise SsoError(f"the provider's ID token is not valid here: {exc}") from exc
        break
    else:
        raise SsoError("the provider's ID token signature does not verify")
    if not secrets.compare_digest(str(claims.get("nonce", "")), nonce):
        raise SsoError("the provider's ID token is not for this sign-in (nonce)")
    if (now or time.time()) - float(claims["iat"]) > STATE_TTL + CLOCK_LEEWAY:
        raise SsoError("the provider's ID token is too old")
    if not isinstance(claims.get("email"), str) or claims.get("email_verified") is not True:
        raise SsoError("the provider did not vouch for an e-mail address (email_verified)")
    return claims
