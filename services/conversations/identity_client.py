"""Requests to the `identity` service from `conversations`, with a cache of resolved identities."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import msgspec
import nats.errors
from opentelemetry import trace

from shared import subjects
from shared.bus import Poison, RequestFailed
from shared.http import ApiError
from shared.messages import identity as ident
from shared.sunco import Client, User
from shared.telemetry import tracer

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

BATCH_GATHER_TURNS = 3
MAX_RESOLVE_BATCH = 250


class Publisher(Protocol):
    """What the handlers need from the bus."""

    async def publish(self, subject: str, data: bytes, *, msg_id: str | None = None,
                      headers: Mapping[str, str] | None = None) -> Any: ...

    async def publish_together(self, messages: Sequence[tuple[str, bytes, str | None]]) -> list[Any]: ...

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
        # Merges and deletions done elsewhere arrive through the ended-users bucket (forget_user);
        # the TTL is a backstop should that watch lag.
        self.cache_ttl = cache_ttl
        self._resolved: OrderedDict[tuple[str, str, str], tuple[float, User, Client]] = OrderedDict()
        self._waiting: list[tuple[ident.ResolveClient, asyncio.Future[ident.Resolved | ident.IdentityError],
                                  trace.SpanContext]] = []
        self._flush: asyncio.Task[None] | None = None

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
        future: asyncio.Future[ident.Resolved | ident.IdentityError] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future, trace.get_current_span().get_span_context()))
        if self._flush is None:
            self._flush = asyncio.create_task(self._send_waiting(), name="identity:resolve-batch")
        reply = await future
        if isinstance(reply, ident.IdentityError):
            if reply.status >= 500:
                raise IdentityUnavailable(reply.title)
            raise Poison(f"identity refused {key}: {reply.status} {reply.title}")
        self._resolved[key] = (time.monotonic() + self.cache_ttl, reply.user, reply.client)
        while len(self._resolved) > self.cache_size:
            self._resolved.popitem(last=False)
        return reply.user, reply.client

    async def _send_waiting(self) -> None:
        # The handlers of one fetched batch reach `resolve` within a few turns of the loop: they
        # share one request (one round trip, one transaction in identity).
        for _ in range(BATCH_GATHER_TURNS):
            await asyncio.sleep(0)
        self._flush = None
        waiting, self._waiting = self._waiting, []
        for start in range(0, len(waiting), MAX_RESOLVE_BATCH):
            chunk = waiting[start:start + MAX_RESOLVE_BATCH]
            # One request serves several messages' traces: its span links to each of them.
            links = [trace.Link(context) for _, _, context in chunk if context.is_valid]
            try:
                with _tracer.start_as_current_span("resolve identities", links=links) as span:
                    span.set_attribute("threadline.batch_size", len(chunk))
                    reply = await self.call(subjects.IDENTITY_RESOLVE_BATCH,
                                            ident.ResolveClients(requests=[request for request, _, _ in chunk]))
                if not isinstance(reply, ident.ResolvedBatch) or len(reply.results) != len(chunk):
                    raise IdentityUnavailable(f"unexpected reply {type(reply).__name__}")
            except IdentityUnavailable as exc:
                for _, future, _ in chunk:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future, _), result in zip(chunk, reply.results, strict=True):
                if not future.done():
                    future.set_result(result)

    def forget_user(self, user_id: str) -> None:
        """Drop cached resolutions of a deleted user."""
        for key in [k for k, v in self._resolved.items() if v[1].id == user_id]:
            del self._resolved[key]
