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
    subjects.IDENTITY_CLIENT_ATTACH_PHONE,
    subjects.IDENTITY_CLIENT_REMOVE,
    subjects.IDENTITY_USER_LOGIN,
)


class IdentityService(ServiceApp):
    name = "identity"

    def __init__(self, config: IdentityConfig) -> None:
        super().__init__(config.common)
        self.config = config
        self.http.middlewares.extend([tracing_middleware, error_middleware])
        self.bus: Bus | None = None
        self.store: IdentityStore | None = None
        self.add_database_check(lambda: None if self.store is None else self.store.db)
        self.handlers: IdentityHandlers | None = None
        self.ended_users: KeyValue | None = None

    async def start(self) -> None:
        self.store = await IdentityStore.open(self.config.database)
        self.handlers = IdentityHandlers(self.store)
        self.bus = await self.connect_bus()
        await self.bus.serve(subjects.IDENTITY_SERVICE, {subject: self._answer for subject in ENDPOINTS})
        await self.start_http()

    async def _answer(self, data: bytes, _headers: Mapping[str, str]) -> bytes:
        assert self.handlers is not None
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
        assert self.bus is not None
        if self.ended_users is None:
            self.ended_users = await self.bus.key_value(subjects.ENDED_USERS_BUCKET)
        await self.ended_users.put(user_id, msgs.USER_ENDED_ENCODER.encode(ended))

    async def stop(self) -> None:
        await self.stop_http()
        if self.bus is not None:
            await self.bus.close()
            self.bus = None
        if self.store is not None:
            await self.store.close()
            self.store = None


def create(environ: Mapping[str, str] | None = None) -> IdentityService:
    """Build the identity service from the environment."""
    setup_telemetry("identity")
    return IdentityService(IdentityConfig.from_env(os.environ if environ is None else environ))
