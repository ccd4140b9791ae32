"""The identity service: users, clients (one per channel identity), request/reply over NATS."""

from __future__ import annotations

import os
from collections.abc import Mapping

import msgspec
from nats.js.kv import KeyValue

from services.identity.config import IdentityConfig
from services.identity.handlers import IdentityHandlers
from services.identity.store import IdentityStore
from shared import subjects
from shared.bus import Bus
from shared.http import error_middleware, tracing_middleware
from shared.ids import now
from shared.messages import identity as msgs
from shared.service import ServiceApp
from shared.telemetry import setup_telemetry

ENDPOINTS = (
    subjects.IDENTITY_RESOLVE,
    subjects.IDENTITY_RESOLVE_BATCH,
    subjects.IDENTITY_USER_CREATE,
    subjects.IDENTITY_USER_GET,
    subjects.IDENTITY_USER_UPDATE,
    subjects.IDENTITY_USER_DELETE,
    subjects.IDENTITY_USER_PERSONAL_DELETE,
    subjects.IDENTITY_CLIENTS_LIST,
    subjects.IDENTITY_CLIENT_STATUS,
    subjects.IDENTITY_DEVICE_REGISTER,
    subjects.IDENTITY_DEVICES_LIST,
    subjects.IDENTITY_DEVICE_DROP_TOKEN,
    subjects.IDENTITY_CLIENT_LINK,
    subjects.IDENTITY_MERGES_LIST,
    subjects.IDENTITY_USERS_SIMILAR,
    subjects.IDENTITY_USERS_SEARCH,
    subjects.IDENTITY_CLIENT_ATTACH_PHONE,
    subjects.IDENTITY_CLIENT_REMOVE,
    subjects.IDENTITY_USER_LOGIN,
)


class IdentityService(ServiceApp):
    """Users and clients: the request/reply endpoints other services resolve identities with."""

    name = "identity"
    # Set by `start`, before NATS and HTTP serve (and released by `stop`, in the reverse order).
    store: IdentityStore
    handlers: IdentityHandlers
    bus: Bus
    ended_users: KeyValue

    def __init__(self, config: IdentityConfig) -> None:
        super().__init__(config.common)
        self.config = config
        self.http.middlewares.extend([tracing_middleware, error_middleware])
        self.add_database_check(lambda: self.store.db)

    async def start(self) -> None:
        """Open the database, connect NATS, serve the endpoints, then HTTP."""
        self.store = await IdentityStore.open(self.config.database)
        self.on_stop(self.store.close)
        self.handlers = IdentityHandlers(self.store)
        self.bus = await self.connect_bus()
        self.ended_users = await self.bus.key_value(subjects.ENDED_USERS_BUCKET)
        await self.bus.serve(subjects.IDENTITY_SERVICE, {subject: self._answer for subject in ENDPOINTS})
        await self.start_http()

    async def _answer(self, data: bytes, _headers: Mapping[str, str]) -> bytes:
        try:
            request = msgs.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return msgs.encode(msgs.IdentityError(status=400, code="bad_request", title=f"Invalid request: {exc}"))
        reply = await self.handlers.handle(request)
        ended = msgs.ended_user(getattr(request, "app_id", ""), reply, now())
        if ended is not None:
            await self._record_ended_user(*ended)
        return msgs.encode(reply)

    async def _record_ended_user(self, user_id: str, ended: msgs.UserEnded) -> None:
        """Tell the SDK services that `user_id`'s session tokens are void (before replying, so the
        caller's next step — a new token for the survivor — never races an old token's use)."""
        await self.ended_users.put(user_id, msgs.USER_ENDED_ENCODER.encode(ended))


def create(environ: Mapping[str, str] | None = None) -> IdentityService:
    """Build the identity service from the environment."""
    setup_telemetry("identity")
    return IdentityService(IdentityConfig.from_env(os.environ if environ is None else environ))
