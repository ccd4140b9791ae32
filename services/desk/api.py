"""The desk's API, one table of operations served two ways:

- to signed-in agents at `/desk/api/v1/…` (session cookie, CSRF token on every change; the app is
  the agent's), by `DeskApi.http_handler`;
- to the business at `/v2/apps/{appId}/desk/…` (the app's keys, checked by `conversations`, which
  forwards the call over NATS as a `DeskCall`), by `DeskApi.answer_call`. A key acts with an
  admin's rights and holds no seat: it cannot take conversations for itself.

Every operation takes the acting `Actor` and answers (status, JSON). Ids of another app answer 404,
as ids that do not exist do.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec
from aiohttp import web

from shared.http import ApiError, error_response, json_response, read_body
from shared.ids import new_id
from shared.messages import desk as msgs
from shared.records import IntegrationRecord
from shared.untrusted import decode_json

from . import auth
from .handlers import (
    Actor,
    Desk,
    agent_out,
    note_out,
    team_out,
    ticket_out,
)
from .store import STATUSES, AgentRow, SearchMatches, TeamRow, TicketFilter

log = logging.getLogger(__name__)

API_PREFIX = "/desk/api/v1"
MAX_BODY = 64 * 1024
MAX_MESSAGE_LENGTH = 4096
MAX_NAME_LENGTH = 128
MAX_EMAIL_LENGTH = 254
MAX_SNOOZE_SECONDS = 366 * 86400
PAGE_SIZE = 50
VIEWS = ("mine", "unassigned", "team", "all")
AGENT_ACTIVITIES = ("typing:start", "typing:stop", "conversation:read")
TEMPLATE_NAME = re.compile(r"[a-z0-9_]{1,512}")
TEMPLATE_LANGUAGE = re.compile(r"[a-z]{2,3}(_[A-Z]{2})?")
# The channels an admin sets up from the desk, and the path of their platform webhook (None: the
# SDK channels, which have none).
CHANNEL_SETUP: dict[str, str | None] = {"whatsapp": "whatsapp", "messenger": "messenger", "telegram": "telegram",
                                        "twilio": "twilio", "mailgun": "mailgun", "web": None, "android": None,
                                        "ios": None}
# Where a conversation can be continued with a handoff link, and how the customer is told.
HANDOFF_TARGETS = {"whatsapp": "WhatsApp", "messenger": "Messenger", "telegram": "Telegram", "twilio": "SMS",
                   "mailgun": "e-mail", "web": "the web", "android": "the app", "ios": "the app"}


class _Body(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    pass


class AgentCreateBody(_Body):
    email: str
    display_name: str
    role: str = "agent"
    password: str | None = None
    capacity: int | None = None
    skills: list[str] = []
    channels: list[str] = []


class AgentUpdateBody(_Body):
    display_name: str | None = None
    role: str | None = None
    password: str | None = None
    # Required to change one's own password.
    current_password: str | None = None
    capacity: int | None = None
    skills: list[str] | None = None
    channels: list[str] | None = None
    disabled: bool | None = None


class TeamBody(_Body):
    name: str | None = None
    skills: list[str] | None = None
    channels: list[str] | None = None
    members: list[str] | None = None


class PresenceBody(_Body):
    presence: str


class AssignBody(_Body):
    agent_id: str | None = None


class TransferBody(_Body):
    agent_id: str | None = None
    team_id: str | None = None


class StatusBody(_Body):
    status: str
    # ISO 8601 or Unix seconds; required for `snoozed`.
    snoozed_until: str | float | None = None


class LabelsBody(_Body):
    labels: list[str]


class NoteBody(_Body):
    text: str


class WhatsappTemplateBody(_Body):
    name: str
    language: str


class CannedReplyBody(_Body):
    shortcut: str
    text: str
    # An approved WhatsApp template this reply stands for (sent once the 24-hour window is closed).
    whatsapp_template: WhatsappTemplateBody | None = None


class ActivityBody(_Body):
    type: str


class SsoBody(_Body):
    issuer: str
    client_id: str
    # Needed the first time; left out, the secret set before stays.
    client_secret: str | None = None


class SettingsBody(_Body):
    # null clears the context panel; left out, it stays as it is.
    context_url: str | msgspec.UnsetType | None = msgspec.UNSET
    rotate_context_secret: bool = False
    # null turns single sign-on off; left out, it stays as it is.
    sso: SsoBody | msgspec.UnsetType | None = msgspec.UNSET


class HandoffBody(_Body):
    integration_id: str


class MessageBody(_Body):
    text: str | None = None
    content: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Call:
    """One operation call: who, the path's parameters, the query and the raw body."""

    actor: Actor
    params: Mapping[str, str]
    query: Mapping[str, str]
    body: bytes

    def decode(self, type_: type[Any]) -> Any:
        if not self.body:
            raise ApiError(400, "Request body is required")
        if len(self.body) > MAX_BODY:
            raise ApiError(413, f"Request body larger than {MAX_BODY} bytes")
        refuse_nul(self.body)
        try:
            return decode_json(self.body, type_)
        except msgspec.ValidationError as exc:
            raise ApiError(400, f"Invalid request body: {exc}") from exc
        except msgspec.DecodeError as exc:
            raise ApiError(400, f"Malformed JSON: {exc}") from exc


def refuse_nul(raw: bytes) -> None:
    """400 for a NUL character anywhere in a JSON body (PostgreSQL's text cannot hold one, and no
    name, note or e-mail needs it)."""
    if b"\x00" in raw or b"\\u0000" in raw.lower():
        raise ApiError(400, "Text must not contain NUL characters")


Result = tuple[int, Any]
OperationFn = Callable[["DeskApi", Call], Awaitable[Result]]


@dataclass(frozen=True, slots=True)
class DeskOperation:
    method: str
    path: str
    fn: OperationFn
    # Only a signed-in agent (not an app key) may call it.
    agent_only: bool = False


def _clean_list(values: list[str], what: str, limit: int = 32) -> list[str]:
    clean = sorted({value.strip().casefold() for value in values if value.strip()})
    if len(clean) > limit or any(len(value) > 64 for value in clean):
        raise ApiError(400, f"{what}: at most {limit} values of at most 64 characters")
    return clean


def _name(value: str, what: str) -> str:
    value = value.strip()
    if not value or len(value) > MAX_NAME_LENGTH or any(ord(c) < 32 for c in value):
        raise ApiError(400, f"{what} must have 1 to {MAX_NAME_LENGTH} printable characters")
    return value


def _capacity(value: int | None, default: int) -> int:
    capacity = default if value is None else value
    if not 0 <= capacity <= 100:
        raise ApiError(400, "capacity must be between 0 and 100")
    return capacity


def _role(value: str) -> str:
    if value not in auth.ROLES:
        raise ApiError(400, f"role must be one of {', '.join(auth.ROLES)}")
    return value


def _timestamp(value: str | float | None) -> float | None:
    """A time given as ISO 8601 (UTC when it names no offset) or Unix seconds; finite and within
    `MAX_SNOOZE_SECONDS` of now."""
    if value is None:
        return None
    if isinstance(value, float | int):
        at = float(value)
    else:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ApiError(400, "snoozedUntil must be ISO 8601 or Unix seconds") from exc
        at = (parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)).timestamp()
    if not math.isfinite(at) or at > time.time() + MAX_SNOOZE_SECONDS:
        raise ApiError(400, "snoozedUntil must be within a year")
    return at


class ContextPanel(Protocol):
    """The business's context panel (`context.py`), as the service wires it."""

    async def cards(self, app_id: str, user_id: str, external_id: str | None,
                    conversation_id: str) -> tuple[list[dict[str, Any]], str | None]: ...

    async def settings(self, app_id: str) -> tuple[str | None, str | None]: ...

    async def configure(self, app_id: str, url: str | None, *, rotate: bool) -> tuple[str | None, str | None]: ...

    async def sso_settings(self, app_id: str) -> dict[str, Any] | None: ...

    async def configure_sso(self, app_id: str, issuer: str | None, client_id: str | None,
                            client_secret: str | None) -> dict[str, Any] | None: ...


class DeskApi:
    """The operations, over the desk's logic."""

    def __init__(self, desk: Desk, kdf: auth.Kdf, conversations: Any,
                 channels: Callable[[str], list[IntegrationRecord]], public_base_url: str,
                 context: ContextPanel) -> None:
        self.desk = desk
        self.store = desk.store
        self.kdf = kdf
        self.conversations = conversations
        self.channels = channels
        self.public_base_url = public_base_url
        self.context_panel = context

    # --- agents --------------------------------------------------------------------------------

    async def me(self, call: Call) -> Result:
        assert call.actor.agent is not None
        return 200, {"agent": agent_out(call.actor.agent)}

    async def list_agents(self, call: Call) -> Result:
        return 200, {"agents": [agent_out(agent) for agent in await self.store.agents(call.actor.app_id)]}

    async def get_agent(self, call: Call) -> Result:
        return 200, {"agent": agent_out(await self.desk.agent_for(call.actor, call.params["agentId"]))}

    async def create_agent(self, call: Call) -> Result:
        auth.require_role(call.actor.role, "admin")
        body: AgentCreateBody = call.decode(AgentCreateBody)
        email = auth.normalize_email(body.email)
        if len(email) > MAX_EMAIL_LENGTH or "@" not in email:
            raise ApiError(400, "email must be an e-mail address")
        password_hash = None
        if body.password is not None:
            try:
                auth.check_new_password(body.password, email)
            except auth.PasswordRejected as exc:
                raise ApiError(400, f"password: {exc.reason}") from exc
            password_hash = await self.kdf.hash(body.password)
        agent = AgentRow(
            id=new_id(), app_id=call.actor.app_id, email=email, display_name=_name(body.display_name, "displayName"),
            role=_role(body.role), password_hash=password_hash,
            capacity=_capacity(body.capacity, self.desk.default_capacity), presence="offline",
            skills=_clean_list(body.skills, "skills"), channels=_clean_list(body.channels, "channels"),
            disabled=False, last_assigned_at=None, last_seen_at=None, created_at=self.desk.clock())
        return 201, {"agent": agent_out(await self.desk.create_agent(call.actor, agent))}

    async def update_agent(self, call: Call) -> Result:
        agent = await self.desk.agent_for(call.actor, call.params["agentId"])
        body: AgentUpdateBody = call.decode(AgentUpdateBody)
        own = call.actor.agent_id == agent.id
        admin_fields = (body.role, body.capacity, body.skills, body.channels, body.disabled)
        if not own or any(value is not None for value in admin_fields):
            auth.require_role(call.actor.role, "admin")
        if own and (body.disabled or (body.role is not None and body.role != agent.role)):
            raise ApiError(409, "An admin cannot disable or demote their own account", "conflict")
        password_hash = agent.password_hash
        if body.password is not None:
            if own and not await self.kdf.verify(agent.password_hash, body.current_password or ""):
                raise ApiError(403, "currentPassword is wrong or missing")
            try:
                auth.check_new_password(body.password, agent.email)
            except auth.PasswordRejected as exc:
                raise ApiError(400, f"password: {exc.reason}") from exc
            password_hash = await self.kdf.hash(body.password)
        updated = AgentRow(
            id=agent.id, app_id=agent.app_id, email=agent.email,
            display_name=agent.display_name if body.display_name is None else _name(body.display_name, "displayName"),
            role=agent.role if body.role is None else _role(body.role), password_hash=password_hash,
            capacity=_capacity(body.capacity, agent.capacity), presence=agent.presence,
            skills=agent.skills if body.skills is None else _clean_list(body.skills, "skills"),
            channels=agent.channels if body.channels is None else _clean_list(body.channels, "channels"),
            disabled=agent.disabled if body.disabled is None else body.disabled,
            last_assigned_at=agent.last_assigned_at, last_seen_at=agent.last_seen_at, created_at=agent.created_at,
            version=agent.version)
        # Someone else's role or password changed, or they were disabled: they sign in again. One's
        # own password change keeps only the session that made it: a thief's session ends with it.
        privileges_changed = (updated.role != agent.role or updated.disabled
                              or updated.password_hash != agent.password_hash)
        saved = await self.desk.update_agent(call.actor, updated, drop_sessions=privileges_changed and not own)
        if own and updated.password_hash != agent.password_hash:
            await self.store.delete_agent_sessions(agent.id, keep=call.actor.session_hash)
        return 200, {"agent": agent_out(saved)}

    async def delete_agent(self, call: Call) -> Result:
        await self.desk.delete_agent(call.actor, call.params["agentId"])
        return 200, {}

    async def set_presence(self, call: Call) -> Result:
        body: PresenceBody = call.decode(PresenceBody)
        agent = await self.desk.set_presence(call.actor, call.params["agentId"], body.presence)
        return 200, {"agent": agent_out(agent)}

    # --- teams ---------------------------------------------------------------------------------

    async def list_teams(self, call: Call) -> Result:
        return 200, {"teams": [team_out(team) for team in await self.store.teams(call.actor.app_id)]}

    async def create_team(self, call: Call) -> Result:
        body: TeamBody = call.decode(TeamBody)
        if body.name is None:
            raise ApiError(400, "name is required")
        team = TeamRow(id=new_id(), app_id=call.actor.app_id, name=_name(body.name, "name"),
                       skills=_clean_list(body.skills or [], "skills"),
                       channels=_clean_list(body.channels or [], "channels"),
                       members=sorted(set(body.members or [])), created_at=self.desk.clock())
        return 201, {"team": team_out(await self.desk.save_team(call.actor, team, new=True))}

    async def update_team(self, call: Call) -> Result:
        team = await self.store.team(call.params["teamId"])
        if team is None or team.app_id != call.actor.app_id:
            raise ApiError(404, "Team not found")
        body: TeamBody = call.decode(TeamBody)
        updated = TeamRow(
            id=team.id, app_id=team.app_id, name=team.name if body.name is None else _name(body.name, "name"),
            skills=team.skills if body.skills is None else _clean_list(body.skills, "skills"),
            channels=team.channels if body.channels is None else _clean_list(body.channels, "channels"),
            members=team.members if body.members is None else sorted(set(body.members)), created_at=team.created_at)
        return 200, {"team": team_out(await self.desk.save_team(call.actor, updated, new=False))}

    async def delete_team(self, call: Call) -> Result:
        await self.desk.delete_team(call.actor, call.params["teamId"])
        return 200, {}

    # --- canned replies ------------------------------------------------------------------------

    async def list_canned(self, call: Call) -> Result:
        return 200, {"cannedReplies": await self.store.canned_replies(call.actor.app_id)}

    async def create_canned(self, call: Call) -> Result:
        auth.require_role(call.actor.role, "admin")
        body: CannedReplyBody = call.decode(CannedReplyBody)
        text = body.text.strip()
        if not text or len(text) > MAX_MESSAGE_LENGTH:
            raise ApiError(400, f"text must have 1 to {MAX_MESSAGE_LENGTH} characters")
        reply_id = new_id()
        shortcut = _name(body.shortcut, "shortcut")
        template = None
        if body.whatsapp_template is not None:
            if not TEMPLATE_NAME.fullmatch(body.whatsapp_template.name) or not TEMPLATE_LANGUAGE.fullmatch(
                    body.whatsapp_template.language):
                raise ApiError(400, "whatsappTemplate: name is [a-z0-9_] (≤ 512), language a code such as en_US")
            template = {"name": body.whatsapp_template.name, "language": body.whatsapp_template.language}
        if not await self.store.insert_canned_reply(call.actor.app_id, reply_id, shortcut, text, self.desk.clock(),
                                                    template):
            raise ApiError(409, "A canned reply with this shortcut already exists", "conflict")
        return 201, {"cannedReply": {"id": reply_id, "shortcut": shortcut, "text": text,
                                     "whatsappTemplate": template}}

    async def delete_canned(self, call: Call) -> Result:
        auth.require_role(call.actor.role, "admin")
        if not await self.store.delete_canned_reply(call.actor.app_id, call.params["cannedReplyId"]):
            raise ApiError(404, "Canned reply not found")
        return 200, {}

    # --- conversations -------------------------------------------------------------------------

    async def list_conversations(self, call: Call) -> Result:
        query = call.query
        view = query.get("view", "all")
        if view not in VIEWS:
            raise ApiError(400, f"view must be one of {', '.join(VIEWS)}")
        statuses = [s for s in query.get("status", "").split(",") if s]
        if any(status not in STATUSES for status in statuses):
            raise ApiError(400, f"status must be among {', '.join(STATUSES)}")
        where = TicketFilter(statuses=statuses or None, channel=query.get("channel") or None,
                             label=query.get("label") or None)
        if view == "mine":
            if call.actor.agent_id is None:
                raise ApiError(400, "view=mine needs a signed-in agent")
            where = replace(where, agent_id=call.actor.agent_id)
        elif view == "unassigned":
            where = replace(where, unassigned=True)
        elif view == "team":
            teams = await self.store.teams(call.actor.app_id)
            wanted = query.get("team")
            if wanted:
                team_ids = [team.id for team in teams if team.id == wanted]
            else:
                team_ids = [team.id for team in teams if call.actor.agent_id in team.members]
            where = replace(where, team_ids=team_ids)
        if query.get("team") and view != "team":
            where = replace(where, team_ids=[query["team"]])
        text = query.get("q", "").strip()
        if text:
            if not 2 <= len(text) <= 200:
                raise ApiError(400, "q has 2 to 200 characters")
            conversation_ids, user_ids = await self.conversations.search(call.actor.app_id, text)
            where = replace(where, search=SearchMatches(text=text, conversation_ids=conversation_ids,
                                                        user_ids=user_ids))
        before = None
        cursor = query.get("before")
        if cursor:
            at, _, conversation_id = cursor.partition("_")
            try:
                before = (float(at), conversation_id)
            except ValueError as exc:
                raise ApiError(400, "before is not a cursor of this list") from exc
            if not math.isfinite(before[0]) or not conversation_id.isalnum() or len(conversation_id) > 64:
                raise ApiError(400, "before is not a cursor of this list")
        try:
            size = min(max(int(query.get("size", PAGE_SIZE)), 1), 100)
        except ValueError as exc:
            raise ApiError(400, "size must be an integer") from exc
        tickets = await self.store.tickets(call.actor.app_id, where, before=before, limit=size + 1)
        more = len(tickets) > size
        tickets = tickets[:size]
        next_cursor = f"{tickets[-1].updated_at!r}_{tickets[-1].conversation_id}" if more and tickets else None
        return 200, {"conversations": [ticket_out(ticket) for ticket in tickets],
                     "meta": {"hasMore": more, "before": next_cursor}}

    async def get_conversation(self, call: Call) -> Result:
        ticket = await self.desk.ticket_for(call.actor, call.params["conversationId"])
        notes = await self.store.notes(ticket.conversation_id)
        previous = [ticket_out(other) for other in (await self.store.user_tickets(ticket.app_id, ticket.user_id)
                                                     if ticket.user_id else [])
                    if other.conversation_id != ticket.conversation_id]
        return 200, {"conversation": ticket_out(ticket), "notes": [note_out(note) for note in notes],
                     "previousConversations": previous}

    async def timeline(self, call: Call) -> Result:
        """The conversation as one timeline: its messages (each with its channel in `source.type`)
        and the desk's private notes, for the agent's view."""
        ticket = await self.desk.ticket_for(call.actor, call.params["conversationId"])
        try:
            limit = min(max(int(call.query.get("limit", 200)), 1), 1000)
        except ValueError as exc:
            raise ApiError(400, "limit must be an integer") from exc
        history = await self.conversations.history(ticket.app_id, ticket.conversation_id, limit)
        notes = await self.store.notes(ticket.conversation_id)
        return 200, {**history, "notes": [note_out(note) for note in notes], "ticket": ticket_out(ticket),
                     "events": await self.store.timeline_events(ticket.conversation_id)}

    async def context(self, call: Call) -> Result:
        """The customer beside the conversation: profile, every channel identity, previous conversations."""
        ticket = await self.desk.ticket_for(call.actor, call.params["conversationId"])
        profile = await self.conversations.profile(ticket.app_id, ticket.user_id) if ticket.user_id else None
        previous = [ticket_out(other) for other in (await self.store.user_tickets(ticket.app_id, ticket.user_id)
                                                     if ticket.user_id else [])
                    if other.conversation_id != ticket.conversation_id]
        cards: list[dict[str, Any]] = []
        context_error = None
        if profile is not None and ticket.user_id:
            cards, context_error = await self.context_panel.cards(
                ticket.app_id, ticket.user_id, profile["user"].get("externalId"), ticket.conversation_id)
        opt_ins = await self.conversations.opt_ins(ticket.app_id, ticket.user_id) if profile is not None else []
        suggestions = []
        if profile is not None and ticket.user_id:
            channels = self.channels(ticket.app_id)
            for similar in await self.conversations.similar_users(ticket.app_id, ticket.user_id):
                # Merging takes the customer's own confirmation: the desk offers to send them a link
                # to a channel where the other user is; redeeming it there asks them "YES <n>".
                target = next((record for kind in similar.channels for record in channels
                               if record.type == kind and record.status == "active"), None)
                suggestions.append({"userId": similar.user_id, "reason": similar.reason, "channels": similar.channels,
                                    "confirmOn": None if target is None else {"integrationId": target.id,
                                                                              "type": target.type}})
        return 200, {"user": None if profile is None else profile["user"],
                     "clients": [] if profile is None else profile["clients"], "previousConversations": previous,
                     "optIns": opt_ins, "mergeSuggestions": suggestions, "cards": cards,
                     "contextError": context_error}

    async def get_settings(self, call: Call) -> Result:
        """The app's desk settings (admins): the context panel's URL and signing secret."""
        auth.require_role(call.actor.role, "admin")
        url, secret = await self.context_panel.settings(call.actor.app_id)
        return 200, {"settings": {"contextUrl": url, "contextSecret": secret,
                                  "sso": await self.context_panel.sso_settings(call.actor.app_id)}}

    async def put_settings(self, call: Call) -> Result:
        """Set (or clear, with null) the context panel's URL; a secret is made on first use."""
        auth.require_role(call.actor.role, "admin")
        body: SettingsBody = call.decode(SettingsBody)
        app_id = call.actor.app_id
        if not isinstance(body.sso, msgspec.UnsetType):
            await self.context_panel.configure_sso(app_id, None if body.sso is None else body.sso.issuer,
                                                   None if body.sso is None else body.sso.client_id,
                                                   None if body.sso is None else body.sso.client_secret)
        if not isinstance(body.context_url, msgspec.UnsetType) or body.rotate_context_secret:
            current, _ = await self.context_panel.settings(app_id)
            wanted = current if isinstance(body.context_url, msgspec.UnsetType) else body.context_url
            await self.context_panel.configure(app_id, wanted, rotate=body.rotate_context_secret)
        return await self.get_settings(call)

    async def assign(self, call: Call) -> Result:
        body: AssignBody = call.decode(AssignBody) if call.body else AssignBody()
        ticket = await self.desk.accept(call.actor, call.params["conversationId"], body.agent_id)
        return 200, {"conversation": ticket_out(ticket)}

    async def transfer(self, call: Call) -> Result:
        body: TransferBody = call.decode(TransferBody)
        ticket = await self.desk.transfer(call.actor, call.params["conversationId"], to_agent_id=body.agent_id,
                                          to_team_id=body.team_id)
        return 200, {"conversation": ticket_out(ticket)}

    async def set_status(self, call: Call) -> Result:
        body: StatusBody = call.decode(StatusBody)
        ticket = await self.desk.set_status(call.actor, call.params["conversationId"], body.status,
                                            _timestamp(body.snoozed_until))
        return 200, {"conversation": ticket_out(ticket)}

    async def set_labels(self, call: Call) -> Result:
        body: LabelsBody = call.decode(LabelsBody)
        ticket = await self.desk.set_labels(call.actor, call.params["conversationId"], body.labels)
        return 200, {"conversation": ticket_out(ticket)}

    async def list_notes(self, call: Call) -> Result:
        notes = await self.desk.notes(call.actor, call.params["conversationId"])
        return 200, {"notes": [note_out(note) for note in notes]}

    async def add_note(self, call: Call) -> Result:
        body: NoteBody = call.decode(NoteBody)
        note = await self.desk.add_note(call.actor, call.params["conversationId"], body.text)
        return 201, {"note": note_out(note)}

    async def activity(self, call: Call) -> Result:
        """The agent is typing, stopped, or read the conversation (the customer sees it where the
        channel can show it)."""
        agent = call.actor.agent
        assert agent is not None
        ticket = await self.desk.ticket_for(call.actor, call.params["conversationId"])
        body: ActivityBody = call.decode(ActivityBody)
        if body.type not in AGENT_ACTIVITIES:
            raise ApiError(400, f"type must be one of {', '.join(AGENT_ACTIVITIES)}")
        await self.conversations.post_activity(msgs.PostAgentActivity(
            app_id=ticket.app_id, conversation_id=ticket.conversation_id, activity=body.type,  # type: ignore[arg-type]
            display_name=agent.display_name))
        return 200, {}

    async def list_channels(self, call: Call) -> Result:
        """The app's channels (integrations), for "Continue on …" and the channel setup: for an admin
        also what to paste into the platform (webhook URL, verify token, e-mail address) and when its
        last webhook came in."""
        records = [record for record in self.channels(call.actor.app_id) if record.type in CHANNEL_SETUP]
        admin = call.actor.role == "admin"
        seen = await self.conversations.webhook_seen([record.id for record in records]) if admin else {}
        channels = []
        for record in records:
            channel: dict[str, Any] = {"id": record.id, "type": record.type, "displayName": record.display_name,
                                       "status": record.status}
            if admin:
                path = CHANNEL_SETUP[record.type]
                if path:
                    channel["webhookUrl"] = f"{self.public_base_url}/webhooks/{path}/{record.id}"
                for key in ("verifyToken", "phoneNumber", "pageId", "username", "incomingAddress"):
                    if record.config.get(key):
                        channel[key] = str(record.config[key])
                channel["lastWebhookAt"] = seen.get(record.id)
            channels.append(channel)
        return 200, {"channels": channels}

    async def create_channel(self, call: Call) -> Result:
        """Add a channel: the REST API's integration body (`type` and its fields)."""
        auth.require_role(call.actor.role, "admin")
        body = call.decode(dict[str, Any])
        if body.get("type") not in CHANNEL_SETUP:
            raise ApiError(400, f"type must be one of {', '.join(CHANNEL_SETUP)}")
        integration = await self.conversations.create_channel(call.actor.app_id, body)
        return 201, {"channel": integration}

    async def delete_channel(self, call: Call) -> Result:
        """Remove a channel."""
        auth.require_role(call.actor.role, "admin")
        integration_id = call.params["integrationId"]
        if not any(record.id == integration_id for record in self.channels(call.actor.app_id)):
            raise ApiError(404, "Channel not found")
        await self.conversations.delete_channel(call.actor.app_id, integration_id)
        return 200, {}

    async def handoff(self, call: Call) -> Result:
        """Send the customer a link that continues this conversation on another channel."""
        ticket = await self.desk.ticket_for(call.actor, call.params["conversationId"])
        body: HandoffBody = call.decode(HandoffBody)
        target = next((record for record in self.channels(call.actor.app_id) if record.id == body.integration_id),
                      None)
        if target is None:
            raise ApiError(404, "Integration not found")
        if target.type not in HANDOFF_TARGETS:
            raise ApiError(400, f"A conversation cannot be continued on a {target.type} integration")
        if ticket.user_id is None:
            raise ApiError(409, "The conversation has no customer to send a link to", "conflict")
        url = await self.conversations.issue_link(ticket.app_id, ticket.user_id, ticket.conversation_id, target.id)
        name = HANDOFF_TARGETS[target.type]
        agent = call.actor.agent
        message = await self.conversations.post_message(msgs.PostAgentMessage(
            app_id=ticket.app_id, conversation_id=ticket.conversation_id,
            agent_id=agent.id if agent is not None else "api",
            display_name=agent.display_name if agent is not None else "",
            content={"type": "text", "text": f"Continue this conversation on {name}: {url}",
                     "actions": [{"type": "link", "text": f"Continue on {name}", "uri": url}]}))
        return 201, {"message": message, "url": url}

    async def send_message(self, call: Call) -> Result:
        """An agent's reply, sent on the customer's current channel (by `conversations`)."""
        agent = call.actor.agent
        assert agent is not None
        ticket = await self.desk.ticket_for(call.actor, call.params["conversationId"])
        body: MessageBody = call.decode(MessageBody)
        if body.content is not None:
            content = body.content
        elif body.text is not None and body.text.strip() and len(body.text) <= MAX_MESSAGE_LENGTH:
            content = {"type": "text", "text": body.text}
        else:
            raise ApiError(400, f"text (1 to {MAX_MESSAGE_LENGTH} characters) or content is required")
        message = await self.conversations.post_message(msgs.PostAgentMessage(
            app_id=ticket.app_id, conversation_id=ticket.conversation_id, agent_id=agent.id,
            display_name=agent.display_name, content=content))
        await self.desk.heard_from(agent)
        return 201, {"message": message}


A = "/agents"
T = "/teams"
C = "/conversations/{conversationId}"
OPERATIONS: tuple[DeskOperation, ...] = (
    DeskOperation("GET", "/me", DeskApi.me, agent_only=True),
    DeskOperation("GET", A, DeskApi.list_agents),
    DeskOperation("POST", A, DeskApi.create_agent),
    DeskOperation("GET", A + "/{agentId}", DeskApi.get_agent),
    DeskOperation("PATCH", A + "/{agentId}", DeskApi.update_agent),
    DeskOperation("DELETE", A + "/{agentId}", DeskApi.delete_agent),
    DeskOperation("PUT", A + "/{agentId}/presence", DeskApi.set_presence),
    DeskOperation("GET", T, DeskApi.list_teams),
    DeskOperation("POST", T, DeskApi.create_team),
    DeskOperation("PATCH", T + "/{teamId}", DeskApi.update_team),
    DeskOperation("DELETE", T + "/{teamId}", DeskApi.delete_team),
    DeskOperation("GET", "/canned-replies", DeskApi.list_canned),
    DeskOperation("POST", "/canned-replies", DeskApi.create_canned),
    DeskOperation("DELETE", "/canned-replies/{cannedReplyId}", DeskApi.delete_canned),
    DeskOperation("GET", "/conversations", DeskApi.list_conversations),
    DeskOperation("GET", C, DeskApi.get_conversation),
    DeskOperation("GET", C + "/messages", DeskApi.timeline),
    DeskOperation("GET", C + "/context", DeskApi.context),
    DeskOperation("POST", C + "/assign", DeskApi.assign),
    DeskOperation("POST", C + "/transfer", DeskApi.transfer),
    DeskOperation("PUT", C + "/status", DeskApi.set_status),
    DeskOperation("PUT", C + "/labels", DeskApi.set_labels),
    DeskOperation("GET", C + "/notes", DeskApi.list_notes),
    DeskOperation("POST", C + "/notes", DeskApi.add_note),
    DeskOperation("POST", C + "/messages", DeskApi.send_message, agent_only=True),
    DeskOperation("POST", C + "/handoff", DeskApi.handoff),
    DeskOperation("POST", C + "/activity", DeskApi.activity, agent_only=True),
    DeskOperation("GET", "/settings", DeskApi.get_settings),
    DeskOperation("PUT", "/settings", DeskApi.put_settings),
    DeskOperation("GET", "/channels", DeskApi.list_channels),
    DeskOperation("POST", "/channels", DeskApi.create_channel),
    DeskOperation("DELETE", "/channels/{integrationId}", DeskApi.delete_channel),
)

_PARAM = re.compile(r"{([A-Za-z]+)}")


def _pattern(path: str) -> re.Pattern[str]:
    return re.compile("^" + _PARAM.sub(lambda m: f"(?P<{m.group(1)}>[A-Za-z0-9_-]{{1,64}})", path) + "$")


_MATCHERS = [(op, _pattern(op.path)) for op in OPERATIONS]


def match(method: str, path: str) -> tuple[DeskOperation, dict[str, str]] | None:
    """The operation of (method, path below the API prefix) and its parameters; None when none."""
    for op, pattern in _MATCHERS:
        found = pattern.match(path)
        if found is not None and op.method == method:
            return op, found.groupdict()
    return None


def _error_body(status: int, title: str, code: str | None = None) -> bytes:
    body = error_response(status, title, code).body
    assert isinstance(body, bytes)
    return body


async def run(api: DeskApi, op: DeskOperation, call: Call) -> tuple[int, bytes]:
    """Run an operation; its status and JSON body (SunCo's error body for an ApiError)."""
    try:
        status, data = await op.fn(api, call)
    except ApiError as exc:
        return exc.status, _error_body(exc.status, exc.title, exc.code)
    response = json_response(data, status)
    assert isinstance(response.body, bytes)
    return status, response.body


async def answer_call(api: DeskApi, data: bytes) -> bytes:
    """`desk.api`: a business's call forwarded by `conversations` (the app key already checked)."""
    try:
        call = msgs.CALL_DECODER.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return msgs.encode(msgs.DeskAnswer(status=400, body=b'{"errors":[{"code":"bad_request","title":"Bad call"}]}'))
    found = match(call.method, call.path)
    if found is None or found[0].agent_only:
        return msgs.encode(msgs.DeskAnswer(status=404, body=_error_body(404, "No such desk operation")))
    op, params = found
    if any("\x00" in value for value in call.query.values()):
        status, body = 400, _error_body(400, "Query values must not contain NUL characters")
    else:
        status, body = await run(api, op, Call(actor=Actor(app_id=call.app_id), params=params, query=call.query,
                                               body=call.body))
    return msgs.encode(msgs.DeskAnswer(status=status, body=body))


def http_handler(api: DeskApi, op: DeskOperation,
                 actor_of: Callable[[web.Request], Awaitable[Actor]]) -> Callable[[web.Request], Awaitable[Any]]:
    """The aiohttp handler of an operation for signed-in agents."""
    async def handle(request: web.Request) -> web.Response:
        actor = await actor_of(request)
        if any("\x00" in value for value in request.query.values()):
            raise ApiError(400, "Query values must not contain NUL characters")
        body = await read_body(request, MAX_BODY) if request.can_read_body else b""
        status, payload = await run(api, op, Call(actor=actor, params=dict(request.match_info),
                                                  query=dict(request.query), body=body))
        return web.Response(status=status, body=payload, content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    return handle
