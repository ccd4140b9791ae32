"""The business REST API at /v2 (a Sunshine Conversations v2 compatible subset).

Every operation is one row of `OPERATIONS`; the router and the OpenAPI document are both built
from that table, so they cannot drift apart.

Auth: HTTP Basic `keyId:secret` or a Bearer HS256 JWT whose `kid` names the key (`scope: "app"`
for app keys, `"account"` for the account key). Missing or wrong credentials → 401. A valid app
key used on another app's path → **403** (`forbidden`): the caller is authenticated but the key
does not grant that app. The answer is the same whether that app exists or not, so it leaks
nothing. Resource ids of another app (under the caller's own app path) → 404.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
from aiohttp import web
from yarl import URL

from services.conversations import models
from services.conversations.admin import Admin, app_out, key_out, webhook_out
from services.conversations.attachments import PATH_PREFIX as ATTACHMENT_PATH
from services.conversations.attachments import Attachments
from services.conversations.clients import ADDRESS_TYPES, UNSUPPORTED_PHONE_TYPES, confirmation_content
from services.conversations.export import export_user
from services.conversations.handlers import Conversations, conversation_out
from services.conversations.openapi import Operation, openapi_document
from services.conversations.store import ConversationFilter, CursorNotFound, Store
from services.conversations.switchboard import Switchboards
from shared import records, subjects
from shared.bus import RequestFailed
from shared.http import ApiError, json_response, read_json
from shared.ids import iso, parse_iso
from shared.messages import conversation as conv
from shared.messages import handoff
from shared.messages import identity as ident
from shared.signing import DEFAULT_JWT_POLICY, JwtError, JwtPolicy, jwt_decode, jwt_header
from shared.sunco import Profile, Source
from shared.untrusted import secrets_equal

log = logging.getLogger(__name__)




# What a custom integration's key may call (SunCo's integration scope: users, conversations and
# their parts, its own webhooks; not apps, keys, integrations or switchboards).
INTEGRATION_SCOPE_TAGS = frozenset({"Users", "Clients", "Devices", "Conversations", "Participants", "Messages",
                                    "Activities", "Switchboard Actions", "Webhooks", "Handoff", "Attachments"})


@dataclass(frozen=True)
class Principal:
    """Who is calling: the account (every app), one app's key, or one custom integration's key."""

    key_id: str
    app_id: str | None  # None = account scope
    integration_id: str | None = None  # set for a custom integration's key (integration scope)

    def may_access(self, app_id: str) -> bool:
        return self.app_id is None or self.app_id == app_id


PRINCIPAL_KEY = web.RequestKey("threadline.principal", Principal)


def _b64decode(text: str) -> str:
    try:
        return base64.b64decode(text, validate=True).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(401, "Invalid credentials", "unauthorized") from exc


class Api:
    """HTTP handlers. Holds the account key; app keys live in the DB."""

    def __init__(self, store: Store, admin: Admin, conversations: Conversations, switchboards: Switchboards,
                 attachments: Attachments, account_key_id: str, account_key_secret: str, public_base_url: str,
                 jwt_policy: JwtPolicy = DEFAULT_JWT_POLICY) -> None:
        self.store = store
        self.attachments = attachments
        self.jwt_policy = jwt_policy
        self.admin = admin
        self.conversations = conversations
        self.switchboards = switchboards
        self.identity = conversations.identity
        self.account_key_id = account_key_id
        self.account_key_secret = account_key_secret
        self.public_base_url = public_base_url

    # --- auth -----------------------------------------------------------------------------

    async def _key_secret(self, key_id: str) -> tuple[str, Principal] | None:
        """The secret of a key id and who it makes the caller (app_id None: the account key)."""
        if secrets_equal(self.account_key_id, key_id):
            return self.account_key_secret, Principal(key_id=key_id, app_id=None)
        if not key_id.isascii():
            return None
        if key_id.startswith("app_"):
            row = await self.store.get_key(key_id)
            return None if row is None else (row["secret"], Principal(key_id=key_id, app_id=row["app_id"]))
        if key_id.startswith("int_"):
            row = await self.store.integration_key(key_id)
            return None if row is None else (row["secret"], Principal(
                key_id=key_id, app_id=row["app_id"], integration_id=row["integration_id"]))
        return None

    async def authenticate(self, request: web.Request) -> Principal:
        """The caller, from Basic or Bearer credentials; 401 when there are none or they are wrong."""
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "basic":
            key_id, sep, secret = _b64decode(value.strip()).partition(":")
            found = await self._key_secret(key_id) if sep else None
            if found is None or not secrets_equal(found[0], secret):
                raise ApiError(401, "Invalid credentials", "unauthorized")
            return found[1]
        if scheme == "bearer":
            token = value.strip()
            try:
                kid = jwt_header(token).get("kid")
                found = await self._key_secret(kid) if isinstance(kid, str) else None
                if found is None:
                    raise ApiError(401, "Invalid token", "unauthorized")
                payload = jwt_decode(token, found[0], self.jwt_policy)
            except JwtError as exc:
                raise ApiError(401, f"Invalid token: {exc}", "unauthorized") from exc
            principal = found[1]
            # A custom integration's key signs `integration` tokens (`app` is taken too: the key,
            # not the claim, decides what the caller may do).
            allowed = (("account",) if principal.app_id is None else ("app",) if principal.integration_id is None
                       else ("integration", "app"))
            if payload.get("scope") not in allowed:
                raise ApiError(401, f"Invalid token: scope must be {' or '.join(allowed)}", "unauthorized")
            return principal
        raise ApiError(401, "Authorization required", "unauthorized")

    def make_handler(self, op: Operation) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            if op.scope != "public":
                principal = await self.authenticate(request)
                if op.scope == "account" and principal.app_id is not None:
                    raise ApiError(403, "This operation requires an account key", "forbidden")
                app_id = request.match_info.get("appId")
                if app_id is not None and not principal.may_access(app_id):
                    raise ApiError(403, "This key does not grant access to this app", "forbidden")
                if principal.integration_id is not None:
                    if op.tag not in INTEGRATION_SCOPE_TAGS:
                        raise ApiError(403, "This operation requires an app key", "forbidden")
                    path_integration = request.match_info.get("integrationId")
                    if path_integration is not None and path_integration != principal.integration_id:
                        raise ApiError(403, "An integration's key reaches only its own webhooks", "forbidden")
                request[PRINCIPAL_KEY] = principal
            try:
                return await op.handler(self, request)
            except CursorNotFound as exc:
                raise ApiError(400, "page cursor does not name an item of this list") from exc

        return handle

    def links(self, request: web.Request, cursors: dict[str, str],
              keep: Mapping[str, str] | None = None) -> dict[str, str]:
        """`links.prev/next`: absolute URLs with `page[before]`/`page[after]` (the documented style),
        and the query parameters `keep` (a list's filters and page size, so the link lists the same)."""
        base = URL(self.public_base_url + request.path)
        out: dict[str, str] = {}
        if "before" in cursors:
            out["prev"] = str(base.with_query({**(keep or {}), "page[before]": cursors["before"]}))
        if "after" in cursors:
            out["next"] = str(base.with_query({**(keep or {}), "page[after]": cursors["after"]}))
        return out

    def _page_lists(self, request: web.Request, ids: list[str], more: bool,
                    page: models.PageParams, keep: Mapping[str, str] | None = None) -> dict[str, Any]:
        """`meta`/`links` of a forward-paged list (apps, conversations, integrations); `ids` are
        the cursors of its items."""
        meta: dict[str, Any] = {"hasMore": more}
        cursors: dict[str, str] = {}
        if ids:
            meta["afterCursor"] = ids[-1]
            meta["beforeCursor"] = ids[0]
            if page.before is not None:  # paging backwards: `more` means older items exist
                if more:
                    cursors["before"] = ids[0]
                cursors["after"] = ids[-1]
            else:
                if more:
                    cursors["after"] = ids[-1]
                if page.after is not None:
                    cursors["before"] = ids[0]
        return {"meta": meta, "links": self.links(request, cursors, keep)}

    # --- apps -----------------------------------------------------------------------------

    async def create_app(self, request: web.Request) -> web.Response:
        body = await read_json(request, models.AppCreateBody)
        return json_response({"app": await self.admin.create_app(body)}, 201)

    async def list_apps(self, request: web.Request) -> web.Response:
        page = models.page_params(request.query)
        rows, more = await self.store.list_apps(page.after, page.before, page.size)
        return json_response({"apps": [app_out(r) for r in rows],
                              **self._page_lists(request, [r["id"] for r in rows], more, page)})

    async def get_app(self, request: web.Request) -> web.Response:
        return json_response({"app": app_out(await self.admin.app_row(request.match_info["appId"]))})

    async def update_app(self, request: web.Request) -> web.Response:
        body = await read_json(request, models.AppUpdateBody)
        return json_response({"app": await self.admin.update_app(request.match_info["appId"], body)})

    async def delete_app(self, request: web.Request) -> web.Response:
        await self.admin.delete_app(request.match_info["appId"])
        return json_response({})

    # --- keys -----------------------------------------------------------------------------

    async def create_key(self, request: web.Request) -> web.Response:
        body = await read_json(request, models.AppKeyCreateBody)
        return json_response({"key": await self.admin.create_key(request.match_info["appId"], body)}, 201)

    async def list_keys(self, request: web.Request) -> web.Response:
        app_id = request.match_info["appId"]
        await self.admin.app_row(app_id)
        return json_response({"keys": [key_out(r) for r in await self.store.list_keys(app_id)]})

    async def get_key(self, request: web.Request) -> web.Response:
        return json_response({"key": await self.admin.get_key(request.match_info["appId"],
                                                               request.match_info["keyId"])})

    async def delete_key(self, request: web.Request) -> web.Response:
        await self.admin.delete_key(request.match_info["appId"], request.match_info["keyId"])
        return json_response({})

    # --- users and clients (identity) -----------------------------------------------------

    async def _app(self, request: web.Request) -> str:
        app_id = request.match_info["appId"]
        await self.admin.app_row(app_id)
        return app_id

    async def create_user(self, request: web.Request) -> web.Response:
        app_id = await self._app(request)
        body = await read_json(request, models.UserCreateBody)
        models.check_metadata(body.metadata)
        models.check_url(body.profile.avatar_url if body.profile else None, "profile.avatarUrl")
        if body.external_id is not None and not 1 <= len(body.external_id) <= 1024:
            raise ApiError(400, "externalId must be 1 to 1024 characters")
        signed_up_at = None
        if body.signed_up_at is not None:
            try:
                signed_up_at = parse_iso(body.signed_up_at)
            except ValueError as exc:
                raise ApiError(400, "signedUpAt must be an ISO-8601 timestamp") from exc
        reply = await self.identity.api_call(subjects.IDENTITY_USER_CREATE, ident.CreateUser(
            app_id=app_id, external_id=body.external_id, profile=body.profile or Profile(),
            metadata=body.metadata or {}, signed_up_at=signed_up_at))
        assert isinstance(reply, ident.UserReply)
        return json_response({"user": reply.user}, 201)

    async def get_user(self, request: web.Request) -> web.Response:
        app_id = await self._app(request)
        reply = await self.identity.api_call(subjects.IDENTITY_USER_GET, ident.GetUser(
            app_id=app_id, user_id_or_external_id=request.match_info["userIdOrExternalId"]))
        assert isinstance(reply, ident.UserReply)
        return json_response({"user": reply.user})

    async def update_user(self, request: web.Request) -> web.Response:
        app_id = await self._app(request)
        body = await read_json(request, models.UserUpdateBody)
        models.check_metadata(body.metadata)
        models.check_url(body.profile.avatar_url if body.profile else None, "profile.avatarUrl")
        reply = await self.identity.api_call(subjects.IDENTITY_USER_UPDATE, ident.UpdateUser(
            app_id=app_id, user_id_or_external_id=request.match_info["userIdOrExternalId"],
            external_id=body.external_id,
            profile=None if body.profile is None else msgspec.to_builtins(body.profile),
            metadata=body.metadata))
        assert isinstance(reply, ident.UserReply)
        async with self.store.tx():
            await self.store.set_participant_external_id(app_id, reply.user.id, reply.user.external_id)
        return json_response({"user": reply.user})

    async def delete_user(self, request: web.Request) -> web.Response:
        app_id = await self._app(request)
        await self.conversations.delete_user(app_id, request.match_info["userIdOrExternalId"])
        return json_response({})

    async def delete_personal_information(self, request: web.Request) -> web.Response:
        app_id = await self._app(request)
        user = await self.conversations.delete_personal_information(app_id, request.match_info["userIdOrExternalId"])
        return json_response({"user": user})

    async def export_user(self, request: web.Request) -> web.StreamResponse:
        """Everything held about the user, as one streamed JSON document (see export.py)."""
        app_id = await self._app(request)
        return await export_user(self.conversations, request, app_id, request.match_info["userIdOrExternalId"])

    async def list_clients(self, request: web.Request) -> web.Response:
        app_id = await self._app(request)
        reply = await self.identity.api_call(subjects.IDENTITY_CLIENTS_LIST, ident.ListClients(
            app_id=app_id, user_id_or_external_id=request.match_info["userIdOrExternalId"]))
        assert isinstance(reply, ident.ClientsReply)
        return json_response({"clients": reply.clients, "meta": {"hasMore": False}, "links": {}})

    async def create_client(self, request: web.Request) -> web.Response:
        """SunCo Clients API: link a phone number (whatsapp/twilio) or an e-mail address (mailgun)
        to the user's conversation."""
        app_id = await self._app(request)
        body = await read_json(request, models.ClientCreateBody)
        criteria = body.match_criteria
        if criteria.type in UNSUPPORTED_PHONE_TYPES:
            raise ApiError(400, f"matchCriteria.type {criteria.type} is not supported by this gateway "
                                "(use whatsapp, twilio or mailgun)")
        if criteria.type not in ADDRESS_TYPES:
            raise ApiError(400, "matchCriteria.type must be one of whatsapp, twilio, messagebird, mailgun")
        client_type = await self.conversations.phone_links.check_integration(app_id, criteria.integration_id,
                                                                            criteria.type)
        address = criteria.address if client_type == "mailgun" else criteria.phone_number
        if not address:
            raise ApiError(400, "matchCriteria.address is required" if client_type == "mailgun"
                           else "matchCriteria.phoneNumber is required")
        message = None if body.confirmation.message is None else confirmation_content(body.confirmation.message,
                                                                                       client_type)
        user = (await self._user(app_id, None, request.match_info["userIdOrExternalId"])).user
        assert criteria.integration_id is not None
        linked = await self.conversations.phone_links.link(conv.LinkPhoneClient(
            app_id=app_id, user_id=user.id, conversation_id=body.target.conversation_id,
            integration_id=criteria.integration_id, phone_number=address,
            confirmation=body.confirmation.type, primary=criteria.primary),
            message=message, message_schema=body.confirmation.message.schema if body.confirmation.message else None,
            source=Source(type="api:conversations"))
        return json_response({"client": linked.client}, 201)

    async def remove_client(self, request: web.Request) -> web.Response:
        app_id = await self._app(request)
        await self.conversations.phone_links.remove(app_id, request.match_info["userIdOrExternalId"],
                                                    request.match_info["clientId"])
        return json_response({})

    async def post_notification(self, request: web.Request) -> web.Response:
        """SunCo v1.1 Notification API: one call sends a business message to a phone number."""
        app_id = await self._app(request)
        body = await read_json(request, models.NotificationPostBody)
        message_id = await self.conversations.notify(app_id, body)
        return json_response({"notification": {"_id": message_id}}, 201)

    # --- handoff (Threadline extension + SunCo v1.1) ----------------------------------------

    async def _link_requests(self, app_id: str, user_ref: str, integration_ids: list[str],
                             conversation_id: str | None, status: int) -> web.Response:
        if not integration_ids or len(integration_ids) > 20 or not all(isinstance(i, str) and i
                                                                        for i in integration_ids):
            raise ApiError(400, "integrationIds must list 1 to 20 integration ids")
        user_id = (await self._user(app_id, None, user_ref)).user.id
        if conversation_id is None:
            row = await self.store.default_conversation(app_id, user_id)
            if row is None:
                raise ApiError(404, "The user has no conversation yet: pass conversationId", "conversation_not_found")
            conversation_id = str(row["id"])
        elif await self.store.participant(conversation_id, user_id) is None:
            raise ApiError(404, "Conversation not found", "conversation_not_found")
        issue = handoff.IssueLinks(app_id=app_id, user_id=user_id, conversation_id=conversation_id,
                                   integration_ids=integration_ids)
        try:
            data = await self.conversations.bus.request(subjects.HANDOFF_ISSUE, handoff.encode(issue), timeout=5.0)
            answer = handoff.decode(data)
        except (nats.errors.Error, TimeoutError, RequestFailed, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("handoff unavailable: %s", exc)
            raise ApiError(503, "Handoff service unavailable, try again") from exc
        if isinstance(answer, handoff.HandoffError):
            raise ApiError(answer.status, answer.title, answer.code)
        if not isinstance(answer, handoff.LinksIssued):
            raise ApiError(503, "Unexpected answer from handoff")
        return json_response({"linkRequests": [handoff.link_request_wire(link) for link in answer.links]},
                             status=status)

    async def create_link_requests(self, request: web.Request) -> web.Response:
        app_id = await self._app(request)
        body = await read_json(request, models.LinkRequestsBody)
        return await self._link_requests(app_id, request.match_info["userIdOrExternalId"], body.integration_ids,
                                         body.conversation_id, 201)

    async def get_link_request_v1(self, request: web.Request) -> web.Response:
        app_id = await self._app(request)
        raw = request.query.get("integrationIds", "")
        return await self._link_requests(app_id, request.match_info["appUserId"],
                                         [i.strip() for i in raw.split(",") if i.strip()], None, 200)

    async def list_merges(self, request: web.Request) -> web.Response:
        app_id = await self._app(request)
        user = (await self._user(app_id, None, request.match_info["userIdOrExternalId"])).user
        merges = await self.identity.api_call(subjects.IDENTITY_MERGES_LIST, ident.ListMerges(
            app_id=app_id, user_id=user.id))
        assert isinstance(merges, ident.MergesReply)
        return json_response({"merges": [{
            "id": m.id, "survivingUserId": m.surviving_user_id, "discardedUserId": m.discarded_user_id,
            "reason": m.reason, "mergedClientIds": m.merged_client_ids, "discardedMetadata": m.discarded_metadata,
            "createdAt": iso(m.created_at)} for m in merges.merges]})

    async def list_devices(self, request: web.Request) -> web.Response:
        app_id = await self._app(request)
        reply = await self.identity.api_call(subjects.IDENTITY_DEVICES_LIST, ident.ListDevices(
            app_id=app_id, user_id_or_external_id=request.match_info["userIdOrExternalId"]))
        assert isinstance(reply, ident.DevicesReply)
        return json_response({"devices": reply.devices})

    async def get_device(self, request: web.Request) -> web.Response:
        app_id = await self._app(request)
        reply = await self.identity.api_call(subjects.IDENTITY_DEVICES_LIST, ident.ListDevices(
            app_id=app_id, user_id_or_external_id=request.match_info["userIdOrExternalId"]))
        assert isinstance(reply, ident.DevicesReply)
        for device in reply.devices:
            if device.id == request.match_info["deviceId"]:
                return json_response({"device": device})
        raise ApiError(404, "Device not found", "device_not_found")

    # --- conversations --------------------------------------------------------------------

    async def _user(self, app_id: str, user_id: str | None, external_id: str | None) -> ident.ClientsReply:
        """A user (with clients) by id or externalId, from identity (404 when unknown)."""
        key = user_id or external_id
        if not key:
            raise ApiError(400, "userId or userExternalId is required")
        reply = await self.identity.api_call(subjects.IDENTITY_CLIENTS_LIST, ident.ListClients(
            app_id=app_id, user_id_or_external_id=key))
        assert isinstance(reply, ident.ClientsReply)
        if user_id is not None and reply.user.id != user_id:
            raise ApiError(404, "User not found", "user_not_found")
        return reply

    async def create_conversation(self, request: web.Request) -> web.Response:
        app_id = await self._app(request)
        body = await read_json(request, models.ConversationCreateBody)
        if body.type != "personal":
            raise ApiError(400, "Only personal conversations are supported")
        if len(body.participants) != 1:
            raise ApiError(400, "A personal conversation has exactly one participant")
        models.check_metadata(body.metadata)
        for name, value, limit in (("displayName", body.display_name, 100), ("description", body.description, 100),
                                   ("iconUrl", body.icon_url, 2048)):
            if value is not None and not 1 <= len(value) <= limit:
                raise ApiError(400, f"{name} must be 1 to {limit} characters")
        models.check_url(body.icon_url, "iconUrl")
        who = body.participants[0]
        found = await self._user(app_id, who.user_id, who.user_external_id)
        row, _ = await self.conversations.ensure_conversation(
            app_id, found.user, reason="api", default=False, display_name=body.display_name,
            description=body.description, icon_url=body.icon_url, metadata=body.metadata)
        # The user's existing clients join the conversation, most recently seen first (primary).
        for client in sorted(found.clients, key=lambda c: c.last_seen or c.linked_at or ""):
            if client.status in ("active", "pending"):
                await self.conversations.associate(app_id, row["id"], found.user, client,
                                                   _ts(client.last_seen or client.linked_at))
        return json_response({"conversation": conversation_out(row, self._switchboard(app_id))}, 201)

    async def list_conversations(self, request: web.Request) -> web.Response:
        """A user's conversations (`filter[userId]` / `filter[userExternalId]`: creation order, id
        cursors, as SunCo), or without those the app's, most recent activity first (Threadline);
        the other filters narrow either (see `models.conversation_filters`)."""
        app_id = await self._app(request)
        raw_filters = models.query_object(request.query, "filter")
        filters = models.conversation_filters(raw_filters)
        where = await self._conversation_filter(app_id, filters)
        page = models.page_params(request.query, activity=not filters.by_user)
        if filters.by_user:
            user_id = filters.user_id or (await self._user(app_id, None, filters.user_external_id)).user.id
            rows, more = await self.store.list_user_conversations(app_id, user_id, page.after, page.before,
                                                                  page.size, where)
            cursors = [str(r["id"]) for r in rows]
        else:
            rows, more = await self.store.list_conversations(
                app_id, where, None if page.after is None else models.activity_keyset(page.after),
                None if page.before is None else models.activity_keyset(page.before), page.size)
            cursors = [models.activity_cursor(r["last_updated_at"], r["id"]) for r in rows]
        keep = {f"filter[{key}]": value for key, value in raw_filters.items()}
        size = models.query_object(request.query, "page").get("size")
        if size is not None:
            keep["page[size]"] = size
        switchboard = self._switchboard(app_id)
        return json_response({"conversations": [conversation_out(r, switchboard) for r in rows],
                              **self._page_lists(request, cursors, more, page, keep)})

    async def _conversation_filter(self, app_id: str, filters: models.ConversationFilters) -> ConversationFilter:
        """The store's filter of a listing: switchboard integrations named by id or integration
        type become the ids of the app's members (400 when the app's switchboard has none such)."""
        active: tuple[str, ...] | None = None
        by_id, by_type = filters.active_switchboard_integration_id, filters.active_switchboard_integration_type
        if by_id is not None or by_type is not None:
            switchboard = await self.store.switchboard(app_id)
            members = [] if switchboard is None else await self.store.switchboard_integrations(switchboard["id"])
            ids = {str(m["id"]) for m in members}
            if by_id is not None:
                if by_id not in ids:
                    raise ApiError(400, "filter.activeSwitchboardIntegrationId names no switchboard integration "
                                        "of this app")
                ids = {by_id}
            if by_type is not None:
                typed = {str(m["id"]) for m in members if m["integration_type"] == by_type}
                if not typed:
                    raise ApiError(400, f"filter.activeSwitchboardIntegrationType: no switchboard integration of "
                                        f"type {by_type!r} in this app's switchboard")
                ids &= typed
            active = tuple(sorted(ids))
        return ConversationFilter(type=filters.type, active_switchboard_integration_ids=active,
                                  channel=filters.channel, updated_since=_next_millisecond(filters.updated_after),
                                  created_since=_next_millisecond(filters.created_after))

    async def get_conversation(self, request: web.Request) -> web.Response:
        app_id = request.match_info["appId"]
        row = await self.conversations.conversation_row(app_id, request.match_info["conversationId"])
        return json_response({"conversation": conversation_out(row, self._switchboard(app_id))})

    async def update_conversation(self, request: web.Request) -> web.Response:
        app_id, conversation_id = request.match_info["appId"], request.match_info["conversationId"]
        row = await self.conversations.conversation_row(app_id, conversation_id)
        body = await read_json(request, models.ConversationUpdateBody)
        models.check_metadata(body.metadata)
        models.check_url(body.icon_url, "iconUrl")
        async with self.store.tx():
            await self.store.set_conversation(
                conversation_id,
                row["display_name"] if body.display_name is None else body.display_name,
                row["description"] if body.description is None else body.description,
                row["icon_url"] if body.icon_url is None else body.icon_url,
                _loads_or(row["metadata"]) if body.metadata is None else body.metadata)
        return json_response({"conversation": conversation_out(
            await self.conversations.conversation_row(app_id, conversation_id), self._switchboard(app_id))})

    async def delete_conversation(self, request: web.Request) -> web.Response:
        await self.conversations.delete_conversation(request.match_info["appId"],
                                                     request.match_info["conversationId"])
        return json_response({})

    async def list_participants(self, request: web.Request) -> web.Response:
        row = await self.conversations.conversation_row(request.match_info["appId"],
                                                        request.match_info["conversationId"])
        participants = await self.conversations.participants_out(row["id"])
        return json_response({"participants": participants, "meta": {"hasMore": False}, "links": {}})

    # --- messages and activity ------------------------------------------------------------

    async def post_message(self, request: web.Request) -> web.Response:
        app_id, conversation_id = request.match_info["appId"], request.match_info["conversationId"]
        await self.conversations.conversation_row(app_id, conversation_id)
        body = await read_json(request, models.MessagePostBody)
        message = await self.conversations.post_message(app_id, conversation_id, body)
        return json_response({"messages": [message]}, 201)

    async def list_messages(self, request: web.Request) -> web.Response:
        app_id, conversation_id = request.match_info["appId"], request.match_info["conversationId"]
        await self.conversations.conversation_row(app_id, conversation_id)
        page = models.page_params(request.query)
        messages, meta, cursors = await self.conversations.list_messages(conversation_id, page)
        return json_response({"messages": messages, "meta": meta, "links": self.links(request, cursors)})

    async def delete_message(self, request: web.Request) -> web.Response:
        app_id, conversation_id = request.match_info["appId"], request.match_info["conversationId"]
        await self.conversations.delete_message(app_id, conversation_id, request.match_info["messageId"])
        return json_response({})

    async def delete_messages(self, request: web.Request) -> web.Response:
        app_id, conversation_id = request.match_info["appId"], request.match_info["conversationId"]
        await self.conversations.delete_all_messages(app_id, conversation_id)
        return json_response({})

    async def post_activity(self, request: web.Request) -> web.Response:
        app_id, conversation_id = request.match_info["appId"], request.match_info["conversationId"]
        await self.conversations.conversation_row(app_id, conversation_id)
        body = await read_json(request, models.ActivityPostBody)
        await self.conversations.post_activity(app_id, conversation_id, body)
        return json_response({})

    # --- integrations and webhooks --------------------------------------------------------

    async def create_integration(self, request: web.Request) -> web.Response:
        app_id = request.match_info["appId"]
        body = await read_json(request, dict[str, Any])
        return json_response({"integration": await self.admin.create_integration(app_id, body)}, 201)

    async def list_integrations(self, request: web.Request) -> web.Response:
        app_id = await self._app(request)
        page = models.page_params(request.query)
        types_filter = models.query_object(request.query, "filter").get("types")
        types = [t.strip() for t in types_filter.split(",") if t.strip()] if types_filter else None
        rows, more = await self.store.list_integrations(app_id, types, after=page.after, before=page.before,
                                                        limit=page.size)
        return json_response({"integrations": [await self.admin.integration_out(r) for r in rows],
                              **self._page_lists(request, [r["id"] for r in rows], more, page)})

    async def get_integration(self, request: web.Request) -> web.Response:
        row = await self.admin.integration_row(request.match_info["appId"], request.match_info["integrationId"])
        return json_response({"integration": await self.admin.integration_out(row)})

    async def update_integration(self, request: web.Request) -> web.Response:
        app_id, integration_id = request.match_info["appId"], request.match_info["integrationId"]
        await self.admin.integration_row(app_id, integration_id)
        body = await read_json(request, dict[str, Any])
        return json_response({"integration": await self.admin.update_integration(app_id, integration_id, body)})

    async def delete_integration(self, request: web.Request) -> web.Response:
        await self.admin.delete_integration(request.match_info["appId"], request.match_info["integrationId"])
        return json_response({})

    async def create_webhook(self, request: web.Request) -> web.Response:
        app_id, integration_id = request.match_info["appId"], request.match_info["integrationId"]
        await self.admin.integration_row(app_id, integration_id)
        body = await read_json(request, models.WebhookCreateBody)
        return json_response({"webhook": await self.admin.create_webhook(app_id, integration_id, body)}, 201)

    async def list_webhooks(self, request: web.Request) -> web.Response:
        return json_response({"webhooks": await self.admin.list_webhooks(
            request.match_info["appId"], request.match_info["integrationId"])})

    async def get_webhook(self, request: web.Request) -> web.Response:
        record = await self.admin.webhook_record(request.match_info["appId"], request.match_info["integrationId"],
                                                 request.match_info["webhookId"])
        return json_response({"webhook": webhook_out(record)})

    async def update_webhook(self, request: web.Request) -> web.Response:
        app_id, integration_id = request.match_info["appId"], request.match_info["integrationId"]
        await self.admin.webhook_record(app_id, integration_id, request.match_info["webhookId"])
        body = await read_json(request, models.WebhookUpdateBody)
        return json_response({"webhook": await self.admin.update_webhook(
            app_id, integration_id, request.match_info["webhookId"], body)})

    async def delete_webhook(self, request: web.Request) -> web.Response:
        await self.admin.delete_webhook(request.match_info["appId"], request.match_info["integrationId"],
                                        request.match_info["webhookId"])
        return json_response({})

    # --- switchboards -----------------------------------------------------------------------

    def _switchboard(self, app_id: str) -> records.SwitchboardRecord | None:
        """The app's switchboard, enabled or not, as this replica's copy of the apps bucket has it."""
        app = self.conversations.apps(app_id)
        return app.switchboard if app is not None else None

    async def create_switchboard(self, request: web.Request) -> web.Response:
        return json_response({"switchboard": await self.switchboards.create(request.match_info["appId"])}, 201)

    async def list_switchboards(self, request: web.Request) -> web.Response:
        return json_response({"switchboards": await self.switchboards.listed(request.match_info["appId"])})

    async def update_switchboard(self, request: web.Request) -> web.Response:
        body = await read_json(request, models.SwitchboardUpdateBody)
        return json_response({"switchboard": await self.switchboards.update(
            request.match_info["appId"], request.match_info["switchboardId"], body)})

    async def delete_switchboard(self, request: web.Request) -> web.Response:
        await self.switchboards.delete(request.match_info["appId"], request.match_info["switchboardId"])
        return json_response({})

    async def create_switchboard_integration(self, request: web.Request) -> web.Response:
        body = await read_json(request, models.SwitchboardIntegrationCreateBody)
        return json_response({"switchboardIntegration": await self.switchboards.add_member(
            request.match_info["appId"], request.match_info["switchboardId"], body)}, 201)

    async def list_switchboard_integrations(self, request: web.Request) -> web.Response:
        return json_response({"switchboardIntegrations": await self.switchboards.members(
            request.match_info["appId"], request.match_info["switchboardId"])})

    async def update_switchboard_integration(self, request: web.Request) -> web.Response:
        body = await read_json(request, models.SwitchboardIntegrationUpdateBody)
        return json_response({"switchboardIntegration": await self.switchboards.update_member(
            request.match_info["appId"], request.match_info["switchboardId"],
            request.match_info["switchboardIntegrationId"], body)})

    async def delete_switchboard_integration(self, request: web.Request) -> web.Response:
        await self.switchboards.delete_member(request.match_info["appId"], request.match_info["switchboardId"],
                                              request.match_info["switchboardIntegrationId"])
        return json_response({})

    async def pass_control(self, request: web.Request) -> web.Response:
        body = await read_json(request, models.PassControlBody)
        await self._control(request, "passControl", body.switchboard_integration, body.metadata, body.reason)
        return json_response({})

    async def offer_control(self, request: web.Request) -> web.Response:
        body = await read_json(request, models.OfferControlBody)
        await self._control(request, "offerControl", body.switchboard_integration, body.metadata, None)
        return json_response({})

    async def accept_control(self, request: web.Request) -> web.Response:
        body = await read_json(request, models.ControlBody) if request.can_read_body else models.ControlBody()
        await self._control(request, "acceptControl", None, body.metadata, body.reason)
        return json_response({})

    async def release_control(self, request: web.Request) -> web.Response:
        body = await read_json(request, models.ControlBody) if request.can_read_body else models.ControlBody()
        await self._control(request, "releaseControl", None, body.metadata, body.reason)
        return json_response({})

    async def _control(self, request: web.Request, action: conv.SwitchboardAction, target: str | None,
                       metadata: dict[str, Any] | None, reason: str | None) -> None:
        await self.switchboards.control(request.match_info["appId"], request.match_info["conversationId"], action,
                                        target=target, metadata=metadata, reason=reason,
                                        caller=request[PRINCIPAL_KEY].integration_id)

    # --- attachments ------------------------------------------------------------------------

    async def upload_attachment(self, request: web.Request) -> web.Response:
        app_id = request.match_info["appId"]
        await self.admin.app_row(app_id)
        upload = await self.attachments.check_upload(app_id, request.query)
        return json_response({"attachment": await self.attachments.upload(upload, request)}, 201)

    async def delete_attachment(self, request: web.Request) -> web.Response:
        body = await read_json(request, models.AttachmentDeleteBody)
        await self.attachments.remove(request.match_info["appId"], body.media_url)
        return json_response({})

    # --- custom integration keys --------------------------------------------------------------

    async def create_integration_key(self, request: web.Request) -> web.Response:
        body = await read_json(request, models.IntegrationApiKeyBody) if request.can_read_body else (
            models.IntegrationApiKeyBody())
        return json_response({"key": await self.admin.create_integration_key(
            request.match_info["appId"], request.match_info["integrationId"], body)}, 201)

    async def list_integration_keys(self, request: web.Request) -> web.Response:
        return json_response({"keys": await self.admin.integration_keys(
            request.match_info["appId"], request.match_info["integrationId"])})

    async def get_integration_key(self, request: web.Request) -> web.Response:
        return json_response({"key": await self.admin.integration_key(
            request.match_info["appId"], request.match_info["integrationId"], request.match_info["keyId"])})

    async def delete_integration_key(self, request: web.Request) -> web.Response:
        await self.admin.delete_integration_key(request.match_info["appId"], request.match_info["integrationId"],
                                                request.match_info["keyId"])
        return json_response({})

    async def openapi(self, request: web.Request) -> web.Response:
        return json_response(openapi_document(OPERATIONS, self.public_base_url))


def _ts(value: str | None) -> float:
    if value:
        try:
            return parse_iso(value)
        except ValueError:
            pass
    return 0.0


def _next_millisecond(millis: int | None) -> float | None:
    """`…After` filters compare times as the API shows them (milliseconds, truncated): strictly
    after `millis` is from the next millisecond on, so a conversation's own `createdAt` given
    back leaves that conversation out."""
    return None if millis is None else (millis + 1) / 1000


def _loads_or(text: str | None) -> dict[str, Any] | None:
    return None if text is None else msgspec.json.decode(text)


A = "/v2/apps/{appId}"
C = A + "/conversations/{conversationId}"
INT = A + "/integrations/{integrationId}"
SB = A + "/switchboards"
SBI = SB + "/{switchboardId}/switchboardIntegrations"
PAGE = ("page",)

OPERATIONS: tuple[Operation, ...] = (
    Operation("GET", "/v2/openapi.json", "getOpenApi", "Meta", "This OpenAPI document", Api.openapi,
              scope="public"),
    Operation("POST", "/v2/apps", "createApp", "Apps", "Create an app", Api.create_app, 201, "account",
              models.AppCreateBody, models.AppResponse),
    Operation("GET", "/v2/apps", "listApps", "Apps", "List apps", Api.list_apps, scope="account",
              response=models.AppListResponse, query=PAGE),
    Operation("GET", A, "getApp", "Apps", "Get an app", Api.get_app, response=models.AppResponse),
    Operation("PATCH", A, "updateApp", "Apps", "Update an app", Api.update_app, scope="account",
              request=models.AppUpdateBody, response=models.AppResponse),
    Operation("DELETE", A, "deleteApp", "Apps", "Delete an app and everything in it", Api.delete_app,
              scope="account"),
    Operation("POST", A + "/keys", "createAppKey", "App Keys", "Create an app key", Api.create_key, 201,
              request=models.AppKeyCreateBody, response=models.AppKeyResponse),
    Operation("GET", A + "/keys", "listAppKeys", "App Keys", "List app keys", Api.list_keys,
              response=models.AppKeyListResponse),
    Operation("GET", A + "/keys/{keyId}", "getAppKey", "App Keys", "Get an app key", Api.get_key,
              response=models.AppKeyResponse),
    Operation("DELETE", A + "/keys/{keyId}", "deleteAppKey", "App Keys", "Delete an app key", Api.delete_key),
    Operation("POST", A + "/users", "createUser", "Users", "Create a user", Api.create_user, 201,
              request=models.UserCreateBody, response=models.UserResponse),
    Operation("GET", A + "/users/{userIdOrExternalId}", "getUser", "Users", "Get a user by id or externalId",
              Api.get_user, response=models.UserResponse),
    Operation("PATCH", A + "/users/{userIdOrExternalId}", "updateUser", "Users", "Update a user",
              Api.update_user, request=models.UserUpdateBody, response=models.UserResponse),
    Operation("DELETE", A + "/users/{userIdOrExternalId}", "deleteUser", "Users",
              "Delete a user, their clients and conversations", Api.delete_user),
    Operation("DELETE", A + "/users/{userIdOrExternalId}/personalinformation", "deleteUserPersonalInformation",
              "Users", "Delete a user's personal information (profile, metadata, client details); history stays",
              Api.delete_personal_information, response=models.UserResponse),
    Operation("GET", A + "/users/{userIdOrExternalId}/export", "exportUser", "Users",
              "Everything held about the user: user, clients, devices, merges, notification opt-ins, pending "
              "confirmations, conversations with all their messages (Threadline; streamed JSON)", Api.export_user),
    Operation("GET", A + "/users/{userIdOrExternalId}/clients", "listClients", "Clients", "List a user's clients",
              Api.list_clients, response=models.ClientListResponse, query=PAGE),
    Operation("POST", A + "/users/{userIdOrExternalId}/clients", "createClient", "Clients",
              "Link a phone number (whatsapp, twilio) to the user's conversation: immediate, userActivity, prompt",
              Api.create_client, 201, request=models.ClientCreateBody, response=models.ClientResponse),
    Operation("DELETE", A + "/users/{userIdOrExternalId}/clients/{clientId}", "removeClient", "Clients",
              "Remove a client: it leaves every conversation (client:remove reason api)", Api.remove_client),
    Operation("POST", "/v1.1/apps/{appId}/notifications", "postNotification", "Notifications",
              "SunCo v1.1 Notification API: send a message to a phone number (its reply continues the conversation)",
              Api.post_notification, 201, request=models.NotificationPostBody),
    Operation("POST", A + "/users/{userIdOrExternalId}/linkRequests", "createLinkRequests", "Handoff",
              "Links (deep link, QR code) that move the user's conversation to other channels (Threadline)",
              Api.create_link_requests, 201, request=models.LinkRequestsBody),
    Operation("GET", "/v1.1/apps/{appId}/appusers/{appUserId}/linkrequest", "getLinkRequest", "Handoff",
              "SunCo v1.1 link request codes (integrationIds: comma-separated)", Api.get_link_request_v1,
              query=("integrationIds",)),
    Operation("GET", A + "/users/{userIdOrExternalId}/merges", "listMerges", "Users",
              "The audit log of user merges the user took part in (Threadline)", Api.list_merges),
    Operation("GET", A + "/users/{userIdOrExternalId}/devices", "listDevices", "Devices",
              "List a user's SDK devices (app installs and their push tokens)", Api.list_devices,
              response=models.DeviceListResponse),
    Operation("GET", A + "/users/{userIdOrExternalId}/devices/{deviceId}", "getDevice", "Devices",
              "Get one of a user's devices", Api.get_device, response=models.DeviceResponse),
    Operation("POST", A + "/conversations", "createConversation", "Conversations",
              "Create a personal conversation", Api.create_conversation, 201,
              request=models.ConversationCreateBody, response=models.ConversationResponse),
    Operation("GET", A + "/conversations", "listConversations", "Conversations",
              "List a user's conversations (filter userId or userExternalId), or without those the app's, "
              "most recent activity first (Threadline); filters type, activeSwitchboardIntegrationId, "
              "activeSwitchboardIntegrationType, channel, updatedAfter, createdAfter narrow either",
              Api.list_conversations, response=models.ConversationListResponse,
              query=("page", "conversationFilter")),
    Operation("GET", C, "getConversation", "Conversations", "Get a conversation", Api.get_conversation,
              response=models.ConversationResponse),
    Operation("PATCH", C, "updateConversation", "Conversations", "Update a conversation", Api.update_conversation,
              request=models.ConversationUpdateBody, response=models.ConversationResponse),
    Operation("DELETE", C, "deleteConversation", "Conversations", "Delete a (non-default) conversation",
              Api.delete_conversation),
    Operation("GET", C + "/participants", "listParticipants", "Participants",
              "List participants (clientAssociations, primary first)", Api.list_participants,
              response=models.ParticipantListResponse, query=PAGE),
    Operation("POST", C + "/messages", "postMessage", "Messages", "Post a message (routed to the primary client)",
              Api.post_message, 201, request=models.MessagePostBody, response=models.MessagePostResponse),
    Operation("GET", C + "/messages", "listMessages", "Messages", "List messages (backwards, 100 a page)",
              Api.list_messages, response=models.MessageListResponse, query=PAGE),
    Operation("DELETE", C + "/messages", "deleteAllMessages", "Messages", "Delete every message",
              Api.delete_messages),
    Operation("DELETE", C + "/messages/{messageId}", "deleteMessage", "Messages", "Delete a message",
              Api.delete_message),
    Operation("POST", C + "/activity", "postActivity", "Activities", "Typing or read", Api.post_activity,
              request=models.ActivityPostBody),
    Operation("POST", A + "/integrations", "createIntegration", "Integrations",
              "Create an integration (custom, web, whatsapp)", Api.create_integration, 201,
              request=models.Integration, response=models.IntegrationResponse),
    Operation("GET", A + "/integrations", "listIntegrations", "Integrations", "List integrations",
              Api.list_integrations, response=models.IntegrationListResponse, query=("page", "filter")),
    Operation("GET", INT, "getIntegration", "Integrations", "Get an integration", Api.get_integration,
              response=models.IntegrationResponse),
    Operation("PATCH", INT, "updateIntegration", "Integrations", "Update an integration", Api.update_integration,
              request=models.Integration, response=models.IntegrationResponse),
    Operation("DELETE", INT, "deleteIntegration", "Integrations", "Delete an integration and its webhooks",
              Api.delete_integration),
    Operation("POST", INT + "/webhooks", "createWebhook", "Webhooks", "Create a webhook", Api.create_webhook, 201,
              request=models.WebhookCreateBody, response=models.WebhookResponse),
    Operation("GET", INT + "/webhooks", "listWebhooks", "Webhooks", "List webhooks", Api.list_webhooks,
              response=models.WebhookListResponse),
    Operation("GET", INT + "/webhooks/{webhookId}", "getWebhook", "Webhooks", "Get a webhook", Api.get_webhook,
              response=models.WebhookResponse),
    Operation("PATCH", INT + "/webhooks/{webhookId}", "updateWebhook", "Webhooks", "Update a webhook",
              Api.update_webhook, request=models.WebhookUpdateBody, response=models.WebhookResponse),
    Operation("DELETE", INT + "/webhooks/{webhookId}", "deleteWebhook", "Webhooks", "Delete a webhook",
              Api.delete_webhook),
    Operation("POST", A + "/attachments", "uploadAttachment", "Attachments",
              "Upload a file (multipart `source`, ≤ 50 MB; query access=public, for=message, conversationId) to "
              "send as an image or file message", Api.upload_attachment, 201, response=models.AttachmentResponse,
              query=("access", "for", "conversationId")),
    Operation("POST", A + "/attachments/remove", "deleteAttachment", "Attachments", "Delete an attachment by its URL",
              Api.delete_attachment, request=models.AttachmentDeleteBody),
    Operation("POST", INT + "/keys", "createCustomIntegrationKey", "Custom Integration API Keys",
              "Create a key of a custom integration (integration scope: users, conversations, its webhooks)",
              Api.create_integration_key, 201, request=models.IntegrationApiKeyBody,
              response=models.IntegrationApiKeyResponse),
    Operation("GET", INT + "/keys", "listCustomIntegrationKeys", "Custom Integration API Keys",
              "List a custom integration's keys", Api.list_integration_keys,
              response=models.IntegrationApiKeyListResponse),
    Operation("GET", INT + "/keys/{keyId}", "getCustomIntegrationKey", "Custom Integration API Keys",
              "Get a custom integration's key", Api.get_integration_key, response=models.IntegrationApiKeyResponse),
    Operation("DELETE", INT + "/keys/{keyId}", "deleteCustomIntegrationKey", "Custom Integration API Keys",
              "Delete a custom integration's key", Api.delete_integration_key),
    Operation("POST", SB, "createSwitchboard", "Switchboards", "Create the app's switchboard (disabled)",
              Api.create_switchboard, 201, response=models.SwitchboardResponse),
    Operation("GET", SB, "listSwitchboards", "Switchboards", "List switchboards", Api.list_switchboards,
              response=models.SwitchboardListResponse),
    Operation("PATCH", SB + "/{switchboardId}", "updateSwitchboard", "Switchboards",
              "Enable a switchboard or set its default integration", Api.update_switchboard,
              request=models.SwitchboardUpdateBody, response=models.SwitchboardResponse),
    Operation("DELETE", SB + "/{switchboardId}", "deleteSwitchboard", "Switchboards",
              "Delete a switchboard and its integrations", Api.delete_switchboard),
    Operation("POST", SBI, "createSwitchboardIntegration", "Switchboard Integrations",
              "Add an integration (custom, by id) or an integration type to the switchboard",
              Api.create_switchboard_integration, 201, request=models.SwitchboardIntegrationCreateBody,
              response=models.SwitchboardIntegrationResponse),
    Operation("GET", SBI, "listSwitchboardIntegrations", "Switchboard Integrations",
              "List switchboard integrations", Api.list_switchboard_integrations,
              response=models.SwitchboardIntegrationListResponse),
    Operation("PATCH", SBI + "/{switchboardIntegrationId}", "updateSwitchboardIntegration",
              "Switchboard Integrations", "Update a switchboard integration", Api.update_switchboard_integration,
              request=models.SwitchboardIntegrationUpdateBody, response=models.SwitchboardIntegrationResponse),
    Operation("DELETE", SBI + "/{switchboardIntegrationId}", "deleteSwitchboardIntegration",
              "Switchboard Integrations", "Delete a switchboard integration (not the default, nor another's next)",
              Api.delete_switchboard_integration),
    Operation("POST", C + "/passControl", "passControl", "Switchboard Actions",
              "Give control to a switchboard integration (id, name, integration type or `next`)", Api.pass_control,
              request=models.PassControlBody),
    Operation("POST", C + "/offerControl", "offerControl", "Switchboard Actions",
              "Offer control to a switchboard integration (it becomes pending)", Api.offer_control,
              request=models.OfferControlBody),
    Operation("POST", C + "/acceptControl", "acceptControl", "Switchboard Actions",
              "The pending switchboard integration takes control", Api.accept_control, request=models.ControlBody),
    Operation("POST", C + "/releaseControl", "releaseControl", "Switchboard Actions",
              "Nobody is in control until the customer's next message (then the default is)", Api.release_control,
              request=models.ControlBody),
)


def add_routes(app: web.Application, api: Api) -> None:
    """Register every operation of the table on `app`, and the attachments' public URLs."""
    for op in OPERATIONS:
        app.router.add_route(op.method, op.path, api.make_handler(op))
    app.router.add_get(ATTACHMENT_PATH + "/{app_id}/{token}/{filename}", api.attachments.serve)


__all__ = ["OPERATIONS", "Api", "Operation", "Principal", "add_routes"]
