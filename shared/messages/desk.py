"""The `desk` family: request/reply between the agent desk and `conversations`.

- `conversations` forwards the business's calls to the desk's REST API (`/v2/apps/{appId}/desk/…`,
  authenticated there with the app's keys) as `DeskCall`s on `desk.api`; the desk answers a
  `DeskAnswer` holding the HTTP status and JSON body to return.
- The desk asks `conversations` (on `conversations.desk`) to post an agent's message
  (`PostAgentMessage`) or activity (`PostAgentActivity`), or to move switchboard control
  (`MoveControl`), or an admin's channel change (`CreateChannel`, `DeleteChannel`), and gets a
  `DeskDone` or a
  `DeskRefused` (the status and title the API would have answered).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class DeskCall(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One REST call to the desk's API on behalf of an app key (admin rights, no agent seat)."""

    app_id: str
    method: str
    # Below `/v2/apps/{appId}/desk`, e.g. `/conversations/{id}/transfer`.
    path: str
    query: dict[str, str] = {}
    body: bytes = b""


class DeskAnswer(msgspec.Struct, kw_only=True):
    """The HTTP answer to a `DeskCall`: status and JSON body."""

    status: int
    body: bytes


class DeskRequest(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
    """Base of what the desk asks `conversations`."""

    app_id: str
    conversation_id: str


class PostAgentMessage(DeskRequest, tag="desk.message"):
    """Post a business message written by an agent. `content` is SunCo message content (JSON
    object); the author is the business with the agent's display name and avatar."""

    agent_id: str
    display_name: str
    content: dict[str, Any]
    avatar_url: str | None = None


AgentActivityType = Literal["typing:start", "typing:stop", "conversation:read"]


class PostAgentActivity(DeskRequest, tag="desk.activity"):
    """An agent is typing, stopped, or read the conversation: shown to the customer where the
    channel can (as the business's activity)."""

    activity: AgentActivityType
    display_name: str


ControlAction = Literal["passControl", "offerControl", "acceptControl", "releaseControl"]


class MoveControl(DeskRequest, tag="desk.control"):
    """A switchboard action taken by the desk (e.g. `releaseControl` when a conversation is resolved).
    With `only_from_desk`, nothing happens unless a `desk` member is in control at that moment (a bot
    that took the conversation back keeps it)."""

    action: ControlAction
    switchboard_integration: str | None = None
    metadata: dict[str, Any] | None = None
    only_from_desk: bool = False


class CreateChannel(DeskRequest, tag="desk.channel.create"):
    """An admin adds a channel (integration) from the desk: `body` is the REST API's integration
    body (`type` and its fields). `conversation_id` is unused ("")."""

    body: dict[str, Any]


class DeleteChannel(DeskRequest, tag="desk.channel.delete"):
    """An admin removes a channel (integration) from the desk. `conversation_id` is unused ("")."""

    integration_id: str


class SearchMessages(DeskRequest, tag="desk.search"):
    """The app's conversations whose messages contain `query` (case-insensitive for ASCII), most
    recent first. `conversation_id` is unused ("")."""

    query: str
    limit: int = 100


class DeskDone(msgspec.Struct, tag_field="type", tag="desk.done", kw_only=True, omit_defaults=True):
    """Done; `message` is the posted message (SunCo JSON) for a `PostAgentMessage`, `integration`
    the created integration (the REST API's form) for a `CreateChannel`."""

    message: dict[str, Any] | None = None
    integration: dict[str, Any] | None = None
    # For a `SearchMessages`.
    conversation_ids: list[str] | None = None


class DeskRefused(msgspec.Struct, tag_field="type", tag="desk.refused", kw_only=True):
    """Refused: the status, code and title the REST API would have answered."""

    status: int
    code: str
    title: str


DeskRequestUnion = (PostAgentMessage | MoveControl | PostAgentActivity | CreateChannel | DeleteChannel
                    | SearchMessages)
DeskReplyUnion = DeskDone | DeskRefused

ENCODER = msgspec.json.Encoder()
CALL_DECODER = msgspec.json.Decoder(DeskCall)
ANSWER_DECODER = msgspec.json.Decoder(DeskAnswer)
REQUEST_DECODER: msgspec.json.Decoder[DeskRequestUnion] = msgspec.json.Decoder(DeskRequestUnion)
REPLY_DECODER: msgspec.json.Decoder[DeskReplyUnion] = msgspec.json.Decoder(DeskReplyUnion)


def encode(message: msgspec.Struct) -> bytes:
    """Encode any message of the family."""
    return ENCODER.encode(message)
