"""Requests to the `identity` service from `conversations`, with a cache of resolved identities."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Protocol

import msgspec
import nats.errors

from shared import subjects
from shared.bus import Poison, RequestFailed
from shared.http import ApiError
from shared.messages import identity as ident
from shared.sunco import Client, User

log = logging.getLogger(__name__)


class Publisher(Protocol):
    """What the handlers need from the bus."""

    async def publish(self, subject: str, data: bytes, *, msg_id: str | None = None,
                      headers: Mapping[str, str] | None = None) -> Any: ...

    async def request(self, subject: str, data: bytes, *, timeout: float = 5.0) -> bytes: ...


class IdentityUnavailable(Exception):
    """identity did not answer (no responders, timeout, service error)."""


class IdentityClient:
    """Requests to the identity service, with an in-memory cache of resolved channel identities."""

    def __init__(self, bus: Publisher, timeout: float = 5.0, cache_size: int = 50_000,
                 cache_ttl: float = 300.0) -> None:
        self.bus = bus
        self.timeout = timeout
        self.cache_size = cache_size
        # A TTL bounds how long a merge done elsewhere can leave a stale user behind a client.
        self.cache_ttl = cache_ttl
        self._resolved: OrderedDict[tuple[str, str, str], tuple[float, User, Client]] = OrderedDict()

    async def call(self, subject: str, request: ident.IdentityMessage) -> ident.IdentityUnion:
        """Send a request; IdentityUnavailable when identity cannot answer."""
        try:
            data = await self.bus.request(subject, ident.encode(request), timeout=self.timeout)
            return ident.decode(data)
        except (nats.errors.Error, TimeoutError, RequestFailed, msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise IdentityUnavailable(str(exc) or type(exc).__name__) from exc

    async def api_call(self, subject: str, request: ident.IdentityMessage) -> ident.IdentityUnion:
        """Like `call`, for the REST API: refusals and outages become ApiErrors."""
        try:
            reply = await self.call(subject, request)
        except IdentityUnavailable as exc:
            log.warning("identity unavailable: %s", exc)
            raise ApiError(503, "Identity service unavailable, try again") from exc
        if isinstance(reply, ident.IdentityError):
            raise ApiError(reply.status, reply.title, reply.code)
        return reply

    async def resolve(self, request: ident.ResolveClient) -> tuple[User, Client]:
        """The user and client behind a channel identity (cached; identity asked on a miss)."""
        key = (request.app_id, request.integration_id, request.channel_user_id)
        hit = self._resolved.get(key)
        if hit is not None and hit[0] > time.monotonic():
            self._resolved.move_to_end(key)
            return hit[1], hit[2]
        reply = await self.call(subjects.IDENTITY_RESOLVE, request)
        if isinstance(reply, ident.IdentityError):
            if reply.status >= 500:
                raise IdentityUnavailable(reply.title)
            raise Poison(f"identity refused {key}: {reply.status} {reply.title}")
        if not isinstance(reply, ident.Resolved):
            raise IdentityUnavailable(f"unexpected reply {type(reply).__name__}")
        self._resolved[key] = (time.monotonic() + self.cache_ttl, reply.user, reply.client)
        while len(self._resolved) > self.cache_size:
            self._resolved.popitem(last=False)
        return reply.user, reply.client

    def forget_user(self, user_id: str) -> None:
        """Drop cached resolutions of a deleted user."""
        for key in [k for k, v in self._resolved.items() if v[1].id == user_id]:
            del self._resolved[key]
