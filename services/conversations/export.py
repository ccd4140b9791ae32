"""The export of everything Threadline holds about one user, for an access request (Threadline
extension `GET /v2/apps/{appId}/users/{userIdOrExternalId}/export`).

One JSON document, streamed: identity's user, clients, devices and merge log, notifications'
opt-ins and sends, the pending link and merge confirmations, then every conversation of the user
with its participants and all its messages, oldest first. Messages are read and written a page
at a time, so a user with any amount of history costs the server one page of memory. Whatever
can fail (an unknown user, a service that does not answer) fails before the first byte, with the
API's usual error; a failure while streaming ends the response early, leaving invalid JSON that
no client can mistake for a whole export.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import nats.errors
from aiohttp import web

from services.conversations.handlers import Conversations, api_message, conversation_out
from shared import subjects
from shared.bus import RequestFailed
from shared.http import ApiError
from shared.ids import iso, now
from shared.messages import identity as ident
from shared.messages import notification as note

log = logging.getLogger(__name__)

EXPORT_FORMAT = "threadline.userExport.v1"
EXPORT_PAGE = 500
MAX_SENDS = 1000
_ENCODER = msgspec.json.Encoder()


def _time(value: float | None) -> str | None:
    return None if value is None else iso(value)


async def _notifications(convs: Conversations, app_id: str, user_id: str) -> note.UserData:
    request = note.ExportUserData(app_id=app_id, user_id=user_id, max_sends=MAX_SENDS)
    try:
        reply = note.decode(await convs.bus.request(subjects.NOTIFICATIONS_USER_EXPORT, note.ENCODER.encode(request),
                                                    timeout=10.0))
    except (nats.errors.Error, TimeoutError, RequestFailed, msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("notifications unavailable for an export: %s", exc)
        raise ApiError(503, "Notifications service unavailable, try again") from exc
    if isinstance(reply, note.NotificationError):
        raise ApiError(reply.status, reply.title, reply.code)
    if not isinstance(reply, note.UserData):
        raise ApiError(503, "Unexpected answer from notifications")
    return reply


async def _head(convs: Conversations, app_id: str, user_ref: str) -> tuple[str, dict[str, Any]]:
    """The user's id and everything but the conversations (all asked before anything is sent)."""
    identity = convs.identity
    found = await identity.api_call(subjects.IDENTITY_CLIENTS_LIST, ident.ListClients(
        app_id=app_id, user_id_or_external_id=user_ref))
    assert isinstance(found, ident.ClientsReply)
    user = found.user
    devices = await identity.api_call(subjects.IDENTITY_DEVICES_LIST, ident.ListDevices(
        app_id=app_id, user_id_or_external_id=user.id))
    assert isinstance(devices, ident.DevicesReply)
    merges = await identity.api_call(subjects.IDENTITY_MERGES_LIST, ident.ListMerges(app_id=app_id, user_id=user.id))
    assert isinstance(merges, ident.MergesReply)
    notified = await _notifications(convs, app_id, user.id)
    links = await convs.store.user_pending_links(app_id, user.id)
    pending_merges = await convs.store.user_pending_merges(app_id, user.id)
    return user.id, {
        "format": EXPORT_FORMAT,
        "exportedAt": iso(now()),
        "app": {"id": app_id},
        "user": user,
        "clients": found.clients,
        "devices": devices.devices,
        "merges": [{"id": m.id, "survivingUserId": m.surviving_user_id, "discardedUserId": m.discarded_user_id,
                    "reason": m.reason, "mergedClientIds": m.merged_client_ids,
                    "discardedMetadata": m.discarded_metadata, "createdAt": iso(m.created_at)}
                   for m in merges.merges],
        "notifications": {
            "optIns": [{"id": o.id, "channel": o.channel, "address": o.address, "status": o.status,
                        "conversationId": o.conversation_id, "integrationId": o.integration_id,
                        "createdAt": iso(o.created_at), "confirmedAt": _time(o.confirmed_at),
                        "stoppedAt": _time(o.stopped_at)} for o in notified.opt_ins],
            "sends": [{"id": x.id, "channel": x.channel, "recipient": x.recipient, "kind": x.kind,
                       "status": x.status, "conversationId": x.conversation_id, "createdAt": iso(x.created_at)}
                      for x in notified.sends],
            "sendsTruncated": notified.sends_truncated,
        },
        "pendingConfirmations": {
            "clientLinks": [{"clientId": r["client_id"], "conversationId": r["conversation_id"],
                             "integrationId": r["integration_id"], "type": r["client_type"],
                             "phoneNumber": r["phone_number"], "confirmation": r["confirmation"],
                             "createdAt": iso(r["created_at"]), "expiresAt": iso(r["expires_at"])} for r in links],
            "mergeConfirmations": [{"clientId": p.client_id, "conversationId": p.conversation_id,
                                    "survivingUserId": p.surviving_user_id, "discardedUserId": p.discarded_user_id,
                                    "integrationId": p.integration_id, "createdAt": iso(p.created_at),
                                    "expiresAt": iso(p.expires_at)} for p in pending_merges],
        },
    }


async def export_user(convs: Conversations, request: web.Request, app_id: str, user_ref: str) -> web.StreamResponse:
    """Stream the export of `user_ref` (an id or externalId of `app_id`)."""
    user_id, head = await _head(convs, app_id, user_ref)
    conversation_ids = await convs.store.user_conversation_ids(app_id, user_id)
    response = web.StreamResponse(headers={
        "Content-Type": "application/json; charset=utf-8",
        "Content-Disposition": f'attachment; filename="user-{user_id}.json"',
        "Cache-Control": "no-store",
    })
    await response.prepare(request)
    opening = _ENCODER.encode(head)
    await response.write(opening[:-1] + b',"conversations":[')
    first_conversation = True
    for conversation_id in conversation_ids:
        row = await convs.store.get_conversation(app_id, conversation_id)
        if row is None:  # deleted while exporting
            continue
        participants = await convs.participants_out(conversation_id)
        prefix = b"" if first_conversation else b","
        first_conversation = False
        await response.write(prefix + b'{"conversation":' + _ENCODER.encode(conversation_out(row))
                             + b',"participants":' + _ENCODER.encode(participants) + b',"messages":[')
        after, first_message = 0, True
        while True:
            page, more = await convs.store.messages_after(conversation_id, after, EXPORT_PAGE)
            if page:
                chunk = b",".join(_ENCODER.encode(api_message(stored)) for stored in page)
                await response.write((b"" if first_message else b",") + chunk)
                first_message = False
                after = page[-1].seq
            if not more:
                break
        await response.write(b"]}")
    await response.write(b"]}")
    await response.write_eof()
    return response
