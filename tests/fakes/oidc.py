"""A local OpenID Connect provider for the desk's single sign-on tests: discovery, an authorization
endpoint that signs whoever `user` names straight in (no login page), a token endpoint checking
the client's secret, the code's redirect URI and the PKCE verifier, and its JWKS. RS256 keys made
at start. `tamper` bends the next ID token (another audience, an unverified e-mail, …)."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

KID = "test-key-1"


@dataclass
class FakeProvider:
    client_id: str = "threadline-desk"
    client_secret: str = "provider-client-secret-0123456789"
    user: dict[str, Any] = field(default_factory=lambda: {"sub": "u-1", "email": "ben@example.com",
                                                          "email_verified": True})
    tamper: dict[str, Any] = field(default_factory=dict)
    base: str = ""
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    token_requests: int = 0

    def __post_init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> dict[str, Any]:
        public = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return {"keys": [{**public, "kid": KID, "use": "sig", "alg": "RS256"}]}

    async def discovery(self, _request: web.Request) -> web.Response:
        return web.json_response({"issuer": self.base, "authorization_endpoint": f"{self.base}/authorize",
                                  "token_endpoint": f"{self.base}/token", "jwks_uri": f"{self.base}/jwks"})

    async def keys(self, _request: web.Request) -> web.Response:
        return web.json_response(self.jwks())

    async def authorize(self, request: web.Request) -> web.Response:
        query = request.query
        if query.get("client_id") != self.client_id or query.get("code_challenge_method") != "S256":
            return web.Response(status=400, text="bad authorization request")
        code = secrets.token_urlsafe(16)
        self.codes[code] = {"nonce": query.get("nonce"), "challenge": query.get("code_challenge"),
                            "redirect_uri": query.get("redirect_uri"), "user": dict(self.user)}
        location = f"{query['redirect_uri']}?{urlencode({'code': code, 'state': query.get('state', '')})}"
        raise web.HTTPFound(location)

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        expected = "Basic " + base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return web.json_response({"error": "invalid_client"}, status=401)
        form = await request.post()
        grant = self.codes.pop(str(form.get("code", "")), None)
        verifier = str(form.get("code_verifier", ""))
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
        if grant is None or grant["challenge"] != challenge or grant["redirect_uri"] != form.get("redirect_uri"):
            return web.json_response({"error": "invalid_grant"}, status=400)
        now = int(time.time())
        claims = {"iss": self.base, "aud": self.client_id, "iat": now, "exp": now + 300, "nonce": grant["nonce"],
                  **grant["user"], **self.tamper}
        id_token = jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": KID})
        return web.json_response({"access_token": "at", "token_type": "Bearer", "id_token": id_token})


@asynccontextmanager
async def oidc_provider() -> AsyncIterator[FakeProvider]:
    """The provider on a free loopback port (its `base` is the issuer)."""
    provider = FakeProvider()
    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", provider.discovery)
    app.router.add_get("/jwks", provider.keys)
    app.router.add_get("/authorize", provider.authorize)
    app.router.add_post("/token", provider.token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    provider.base = f"http://127.0.0.1:{port}"
    try:
        yield provider
    finally:
        await runner.cleanup()
