"""Between `conversations` and the agent desk (`shared.messages.desk`).

- `DeskBridge.answer` serves `conversations.desk`: an agent's message posted as the business (the
  same path as `POST …/messages`, so it is stored, announced and sent on the customer's channel),
  or a switchboard action the desk takes (the same compare-and-set as the REST actions).
- `forward_to_desk` is the REST API's `/v2/apps/{appId}/desk/…`: the caller was authenticated
  here with the app's keys; the call goes to the desk over NATS and its answer comes back as is.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import msgspec
import nats.errors
from aiohttp import web

from services.conversations import models
from services.conversations.admin import Admin
from services.conversations.api import Api
from services.conversations.handlers import Conversations
from services.conversations.openapi import Operation
from services.conversations.switchboard import Switchboards
from shared import subjects
from shared.bus import Bus, RequestFailed, Retry
from shared.http import ApiError, read_body
from shared.messages import conversation as conv
from shared.messages import desk
from shared.sunco import Author

log = logging.getLogger(__name__)

# What an admin may add or remove from the desk (not custom integrations: their keys and webhooks
# are the API's business).
CHANNEL_TYPES = ("whatsapp", "messenger", "telegram", "twilio", "mailgun", "web", "android", "ios")

# Longest a forwarded call waits for the desk (an agent creation hashes a password: ~0.2 s).
DESK_CALL_TIMEOUT = 10.0
_QUERY_LIMIT = 32


class DeskBridge:
    """The `conversations.desk` endpoint."""

    def __init__(self, conversations: Conversations, switchboards: Switchboards, admin: Admin) -> None:
        self.conversations = conversations
        self.switchboards = switchboards
        self.admin = admin

    async def answer(self, data: bytes, _headers: Mapping[str, str]) -> bytes:
        """Post an agent's message or move control; a refusal carries the REST API's status and title."""
        try:
            request = desk.REQUEST_DECODER.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return desk.encode(desk.DeskRefused(status=400, code="bad_request", title=f"Invalid request: {exc}"))
        try:
            reply = await self._handle(request)
        except ApiError as exc:
            return desk.encode(desk.DeskRefused(status=exc.status, code=exc.code, title=exc.title))
        except Retry as exc:
            return desk.encode(desk.DeskRefused(status=503, code="service_unavailable", title=str(exc)))
        return desk.encode(reply)

    async def _handle(self, request: desk.DeskRequestUnion) -> desk.DeskDone:
        if isinstance(request, desk.CreateChannel):
            if request.body.get("type") not in CHANNEL_TYPES:
                raise ApiError(400, f"The desk adds channels only ({', '.join(CHANNEL_TYPES)})")
            return desk.DeskDone(integration=await self.admin.create_integration(request.app_id, request.body))
        if isinstance(request, desk.SearchMessages):
            query = request.query.strip()
            if not 2 <= len(query) <= 200:
                raise ApiError(400, "A search has 2 to 200 characters")
            found = await self.conversations.store.search_messages(request.app_id, query,
                                                                   max(1, min(request.limit, 200)))
            return desk.DeskDone(conversation_ids=found)
        if isinstance(request, desk.DeleteChannel):
            row = await self.admin.integration_row(request.app_id, request.integration_id)
            if row["type"] not in CHANNEL_TYPES:
                raise ApiError(400, "The desk removes channels only")
            await self.admin.delete_integration(request.app_id, request.integration_id)
            return desk.DeskDone()
        await self.conversations.conversation_row(request.app_id, request.conversation_id)
        if isinstance(request, desk.PostAgentMessage):
            try:
                body = msgspec.convert({"author": {"type": "business"}, "content": request.content},
                                       models.MessagePostBody)
            except msgspec.ValidationError as exc:
                raise ApiError(400, f"Invalid message content: {exc}") from exc
            body = msgspec.structs.replace(
                body, author=Author(type="business", display_name=request.display_name[:128] or None,
                                    avatar_url=request.avatar_url),
                metadata={"desk:agentId": request.agent_id})
            message = await self.conversations.post_message(request.app_id, request.conversation_id, body)
            return desk.DeskDone(message=msgspec.to_builtins(message))
        if isinstance(request, desk.PostAgentActivity):
            await self.conversations.post_activity(request.app_id, request.conversation_id, models.ActivityPostBody(
                type=request.activity, author=Author(type="business", display_name=request.display_name[:128] or None)))
            return desk.DeskDone()
        await self.switchboards.control(
            request.app_id, request.conversation_id, request.action,
            target=request.switchboard_integration, metadata=request.metadata,
            only_if_active_type=conv.DESK_INTEGRATION_TYPE if request.only_from_desk else None)
        return desk.DeskDone()


DESK_PATH = "/v2/apps/{appId}/desk/{tail:.+}"
DESK_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def add_desk_routes(app: web.Application, api: Api, bus: Bus) -> None:
    """Route `/v2/apps/{appId}/desk/…` to the desk, authenticated like every app operation."""
    async def forward(_api: Any, request: web.Request) -> web.Response:
        return await forward_to_desk(bus, request)

    for method in DESK_METHODS:
        app.router.add_route(method, DESK_PATH, api.make_handler(Operation(
            method, DESK_PATH, f"desk{method.title()}", "Desk", "The agent desk's API (see the README)", forward)))


async def forward_to_desk(bus: Bus, request: web.Request) -> web.Response:
    """`/v2/apps/{appId}/desk/{tail}`: the desk's REST API, for the app's keys."""
    app_id = request.match_info["appId"]
    if len(request.query) > _QUERY_LIMIT:
        raise ApiError(400, "Too many query parameters")
    body = await read_body(request) if request.can_read_body else b""
    call = desk.DeskCall(app_id=app_id, method=request.method, path="/" + request.match_info["tail"],
                         query={key: value for key, value in request.query.items()}, body=body)
    try:
        raw = await bus.request(subjects.DESK_API, desk.encode(call), timeout=DESK_CALL_TIMEOUT)
        answer = desk.ANSWER_DECODER.decode(raw)
    except nats.errors.NoRespondersError as exc:
        raise ApiError(503, "The desk is not running", "service_unavailable") from exc
    except RequestFailed as exc:
        log.error("the desk failed a call: %s", exc)
        raise ApiError(502, "The desk failed to answer this call") from exc
    except (TimeoutError, nats.errors.Error) as exc:
        raise ApiError(503, "The desk did not answer in time", "service_unavailable") from exc
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        log.error("the desk answered something unreadable: %s", exc)
        raise ApiError(502, "The desk answered something unreadable") from exc
    return web.Response(status=answer.status, body=answer.body, content_type="application/json")

