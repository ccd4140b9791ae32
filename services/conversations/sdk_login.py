"""SDK login (`Threadline.login(externalId, jwt)`): verify the user JWT against the app's keys
(which live here), then let `identity` identify the session's user or merge it into the user who
has that externalId, and bring the conversations store and the business up to date.

The JWT is SunCo's SDK user token: HS256, header `kid` = an API key id of the app, payload
`{"scope": "user", "external_id": "<string>"}` signed with that key's secret; its time claims
as `shared.signing.JwtPolicy` says (numbers only, bounded lifetime).

The JWT proves who holds the session, not who holds the other clients of its user: a visitor
that joined someone's channel conversation through a link is `separated` — the session alone
moves to the account (and to its default conversation); the channel stays the user it was. Were
it merged, whoever sent the link would hold a channel of the account (and read and write as it).
"""

from __future__ import annotations

import logging
from typing import Any

import nats.errors

from services.conversations.core import ConversationCore
from services.conversations.identity_client import IdentityUnavailable
from shared import subjects
from shared.http import ApiError
from shared.ids import new_id, now
from shared.messages import conversation as conv
from shared.messages import identity as ident
from shared.signing import JwtError, jwt_decode, jwt_header
from shared.sunco import Source

log = logging.getLogger(__name__)

MAX_JWT_LENGTH = 8192
MAX_EXTERNAL_ID_LENGTH = 1024
INVALID_AUTH = "invalid_auth"


def _refuse(title: str) -> ApiError:
    return ApiError(401, f"Invalid login JWT: {title}", INVALID_AUTH)


async def verify_user_jwt(convs: ConversationCore, app_id: str, token: str, external_id: str) -> None:
    """Raise a 401 ApiError unless `token` is a valid user JWT of `app_id` for `external_id`."""
    if not token or len(token) > MAX_JWT_LENGTH:
        raise _refuse("a JWT is required")
    try:
        header = jwt_header(token)
    except JwtError as exc:
        raise _refuse(str(exc)) from exc
    if header.get("alg") != "HS256":
        raise _refuse("alg must be HS256")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise _refuse("the header must name the signing key in kid")
    key = await convs.store.get_key(kid) if kid.startswith("app_") and len(kid) <= 64 else None
    if key is None or key["app_id"] != app_id:
        raise _refuse("kid is not an API key of this app")
    try:
        payload: dict[str, Any] = jwt_decode(token, key["secret"], convs.jwt_policy)
    except JwtError as exc:
        raise _refuse(str(exc)) from exc
    if payload.get("scope") != "user":
        raise _refuse('scope must be "user"')
    claimed = payload.get("external_id")
    if not isinstance(claimed, str):
        raise _refuse("external_id must be a string")
    if claimed != external_id:
        raise _refuse("external_id does not match externalId")


async def sdk_login(convs: ConversationCore, req: conv.SdkLogin) -> conv.SdkLoggedIn:
    """Log the session's user in as `req.external_id` (see the module docstring)."""
    if not 1 <= len(req.external_id) <= MAX_EXTERNAL_ID_LENGTH:
        raise ApiError(400, f"externalId must be 1-{MAX_EXTERNAL_ID_LENGTH} characters")
    row = await convs.store.get_conversation(req.app_id, req.conversation_id)
    if row is None or await convs.store.participant(req.conversation_id, req.user_id) is None:
        # The session's user was merged away or deleted: its token no longer names anyone here.
        raise ApiError(401, "Invalid session token (the session's user no longer exists)")
    await verify_user_jwt(convs, req.app_id, req.jwt, req.external_id)
    try:
        reply = await convs.identity.call(subjects.IDENTITY_USER_LOGIN, ident.LoginUser(
            app_id=req.app_id, user_id=req.user_id, client_id=req.client_id, external_id=req.external_id))
    except IdentityUnavailable as exc:
        raise ApiError(503, "Identity service unavailable, try again") from exc
    if isinstance(reply, ident.IdentityError):
        if reply.status == 404:
            raise ApiError(401, "Invalid session token (the session's user no longer exists)")
        raise ApiError(reply.status if 400 <= reply.status < 600 else 503, reply.title, reply.code)
    if not isinstance(reply, ident.UserLoggedIn):
        raise ApiError(503, "Unexpected answer from identity")
    if reply.outcome == "separated":
        return await _separated(convs, req, reply)
    user, client = reply.user, reply.client
    at = now()
    store = convs.store
    if reply.outcome == "identified":
        convs.identity.forget_user(user.id)
        async with store.tx():
            await store.set_participant_external_id(req.app_id, user.id, user.external_id)
        await convs.publish_event(conv.UserUpdated(
            id=new_id(), app_id=req.app_id, conversation_id=req.conversation_id, created_at=at, user=user,
            reason="authentication"))
    elif reply.outcome == "merged" and reply.merge is not None and reply.discarded_user is not None:
        discarded = reply.discarded_user
        convs.identity.forget_user(discarded.id)
        convs.identity.forget_user(user.id)
        async with store.tx():
            merged_conversations = await store.merge_user(req.app_id, discarded.id, user.id, user.external_id)
            participant = await store.participant(req.conversation_id, user.id)
            if participant is not None:
                # The visitor is active on this client now: it is the conversation's primary one.
                await store.upsert_association(str(participant["id"]), client.id, client.type,
                                               client.integration_id, client.external_id, client.info, at)
        await convs.publish_event(conv.UsersMerged(
            id=reply.merge.id, app_id=req.app_id, conversation_id=req.conversation_id, created_at=at,
            surviving=user, discarded=discarded, reason=reply.merge.reason,
            merged_client_ids=reply.merge.merged_client_ids, merged_conversation_ids=merged_conversations,
            discarded_metadata=reply.merge.discarded_metadata))
        await convs.publish_event(conv.ClientAdded(
            id=new_id(), app_id=req.app_id, conversation_id=req.conversation_id, created_at=at, user=user,
            client=client, reason="sdkLogin"))
        log.info("sdk login merged %s into %s (conversation %s kept)", discarded.id, user.id, req.conversation_id)
    outcome: conv.SdkLoginOutcome = "merged" if reply.outcome == "merged" else (
        "identified" if reply.outcome == "identified" else "unchanged")
    return conv.SdkLoggedIn(user=user, conversation_id=req.conversation_id, outcome=outcome)


async def _separated(convs: ConversationCore, req: conv.SdkLogin, reply: ident.UserLoggedIn) -> conv.SdkLoggedIn:
    """The visitor holds clients the JWT does not prove: the session's client alone went to the
    account, whose default conversation the session continues in."""
    user, client, left = reply.user, reply.client, reply.left_user
    store = convs.store
    convs.identity.forget_user(user.id)
    if left is not None:
        convs.identity.forget_user(left.id)
    try:
        row, _created = await convs.ensure_conversation(
            req.app_id, user, reason="startConversation", source=Source(type="web", integration_id=req.integration_id))
    except (nats.errors.Error, TimeoutError) as exc:
        raise ApiError(503, "Messaging bus unavailable, try again") from exc
    at = now()
    async with store.tx():
        if left is not None:
            await store.remove_association(req.app_id, left.id, client.id)
        participant = await store.participant(row["id"], user.id)
        if participant is not None:
            await store.upsert_association(str(participant["id"]), client.id, client.type, client.integration_id,
                                           client.external_id, client.info, at)
    await convs.publish_event(conv.ClientAdded(
        id=new_id(), app_id=req.app_id, conversation_id=row["id"], created_at=at, user=user, client=client,
        reason="sdkLogin"))
    log.info("sdk login moved client %s alone into %s (conversation %s); %s keeps its channels", client.id, user.id,
             row["id"], None if left is None else left.id)
    return conv.SdkLoggedIn(user=user, conversation_id=row["id"], outcome="separated")
