"""SDK login on the identity side: an SDK session's user becomes `externalId`'s user.

The caller (`conversations`) verified the login JWT; here the user is identified (takes the
externalId and becomes `authenticated`), or merged into the user who already has it through the
same `IdentityStore.merge_users` as channel linking (reason `sdkLogin`), or left alone when it is
that user already. A user that carries another externalId is never merged (409).

The JWT proves who holds the session's client and nothing about the user's other clients: a
browser that opened someone's link joined that person's user, channel included. Such a user is
neither identified nor merged; the session's client alone moves to the externalId's user
(`separated`) and the rest stays with the user it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from services.identity.store import Conflict, IdentityStore, UserGone
from shared.db import INTEGRITY_ERRORS
from shared.messages import identity as msgs
from shared.sunco import Client, Profile, User

# Drops a user's entries from the resolver's cache (the user changed: merged, moved, separated).
ForgetUser = Callable[[str], None]

log = logging.getLogger(__name__)

MAX_EXTERNAL_ID_LENGTH = 1024
LOGIN_REASON = "sdkLogin"


async def user_by_id(store: IdentityStore, app_id: str, user_id: str) -> User | None:
    """The user with exactly this id (never a user whose externalId happens to equal it)."""
    found = await store.db.fetchval("SELECT id FROM users WHERE app_id = $1 AND id = $2", app_id, user_id)
    return None if found is None else await store.find_user(app_id, user_id)


async def user_by_external_id(store: IdentityStore, app_id: str, external_id: str) -> User | None:
    """The user with exactly this externalId."""
    found = await store.db.fetchval("SELECT id FROM users WHERE app_id = $1 AND external_id = $2",
                                    app_id, external_id)
    return None if found is None else await store.find_user(app_id, str(found))


async def identify(store: IdentityStore, app_id: str, user_id: str, external_id: str) -> bool:
    """Give an anonymous user `external_id` and mark it authenticated.

    False when another user took `external_id` meanwhile (or this user got another one): the
    unique index decides, so two concurrent logins cannot both take it.
    """
    try:
        changed = await store.db.execute(
            "UPDATE users SET external_id = $1, authenticated = 1"
            " WHERE app_id = $2 AND id = $3 AND external_id IS NULL", external_id, app_id, user_id)
    except INTEGRITY_ERRORS:  # one statement, no transaction of ours to spoil
        return False
    return changed == 1


async def mark_authenticated(store: IdentityStore, app_id: str, user_id: str) -> None:
    """The user proved who it is with a JWT (SunCo `authenticated`)."""
    await store.db.execute("UPDATE users SET authenticated = 1 WHERE app_id = $1 AND id = $2", app_id, user_id)


async def session_client(store: IdentityStore, app_id: str, user_id: str, client_id: str) -> Client | None:
    """The session's client, if it belongs to `user_id`."""
    return next((c for c in await store.list_clients(app_id, user_id) if c.id == client_id), None)


def _error(status: int, code: str, title: str) -> msgs.IdentityError:
    return msgs.IdentityError(status=status, code=code, title=title)


async def login_user(store: IdentityStore, forget_user: ForgetUser, req: msgs.LoginUser) -> msgs.IdentityMessage:
    """Identify the session's user as `req.external_id`, or merge it into the user who has it."""
    if not 1 <= len(req.external_id) <= MAX_EXTERNAL_ID_LENGTH:
        return _error(400, "bad_request", f"externalId must be 1-{MAX_EXTERNAL_ID_LENGTH} characters")
    current = await user_by_id(store, req.app_id, req.user_id)
    if current is None:
        return _error(404, "user_not_found", "The session's user no longer exists")
    client = await session_client(store, req.app_id, current.id, req.client_id)
    if client is None:
        return _error(404, "client_not_found", "The session's client no longer exists")
    if current.external_id == req.external_id:
        return msgs.UserLoggedIn(user=current, client=client, outcome="unchanged")
    if current.external_id is not None:
        return _error(409, "conflict", "This session already belongs to another externalId; log out before "
                                       "logging in as someone else")
    # Clients this session proved it reads (a confirmed opt-in code typed here) go with it.
    proven = await store.proven_by(req.app_id, client.id)
    others = [c for c in await store.list_clients(req.app_id, current.id) if c.id != client.id and c.id not in proven]
    if others:
        return await _separate(store, forget_user, req, current, client, others)
    for _ in range(3):
        target = await user_by_external_id(store, req.app_id, req.external_id)
        if target is None:
            if await identify(store, req.app_id, current.id, req.external_id):
                forget_user(current.id)
                identified = await user_by_id(store, req.app_id, current.id)
                assert identified is not None
                return msgs.UserLoggedIn(user=identified, client=client, outcome="identified")
            continue  # someone took the externalId meanwhile: merge into them
        try:
            merge = await store.merge_users(req.app_id, surviving=target, discarded=current, reason=LOGIN_REASON)
        except UserGone:
            return _error(409, "conflict", "The session's user changed while logging in; try again")
        await mark_authenticated(store, req.app_id, target.id)
        forget_user(current.id)
        forget_user(target.id)
        survivor = await user_by_id(store, req.app_id, target.id)
        moved = await session_client(store, req.app_id, target.id, req.client_id)
        assert survivor is not None and moved is not None
        log.info("sdk login merged user %s into %s", current.id, survivor.id)
        return msgs.UserLoggedIn(user=survivor, client=moved, outcome="merged", merge=merge, discarded_user=current)
    return _error(409, "conflict", "The externalId changed hands while logging in; try again")


async def _separate(store: IdentityStore, forget_user: ForgetUser, req: msgs.LoginUser, current: User,
                    client: Client, others: list[Client]) -> msgs.IdentityMessage:
    """Move only the session's client to `req.external_id`'s user (created when missing)."""
    for _ in range(3):
        target = await user_by_external_id(store, req.app_id, req.external_id)
        if target is None:
            try:
                target = await store.create_user(req.app_id, req.external_id, Profile(), {})
            except Conflict:
                continue  # created by a concurrent login: move the client to that one
        await mark_authenticated(store, req.app_id, target.id)
        await store.move_client(req.app_id, client.id, target.id)
        forget_user(current.id)
        forget_user(target.id)
        survivor = await user_by_id(store, req.app_id, target.id)
        moved = await session_client(store, req.app_id, target.id, client.id)
        assert survivor is not None and moved is not None
        log.info("sdk login moved client %s from %s (which keeps %d other clients) to %s", client.id, current.id,
                 len(others), survivor.id)
        return msgs.UserLoggedIn(user=survivor, client=moved, outcome="separated", left_user=current)
    return _error(409, "conflict", "The externalId changed hands while logging in; try again")
