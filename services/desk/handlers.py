"""The desk's logic on decoded structs: conversations entering and leaving the desk, routing them to
agents, and the agents' actions. Testable without NATS (the conversations service is the
`Conversations` protocol, live updates a callback).

**When a conversation is the desk's.** The switchboard decides: a `switchboard` event that leaves a
member of integration type `desk` in control (a bot's passControl, an acceptControl) enters it into
routing, and so does a customer message in a conversation the desk controls that it has no open
ticket for (the desk as the switchboard's default integration). An event that leaves another member
in control ends the desk's part: the ticket is resolved and its agent's slot freed. A customer
writing again in a resolved, pending or snoozed conversation the desk still controls reopens it:
back to the queue, with the agent who had it as its returning agent.

**One decision per conversation.** Every change runs in one transaction that first serializes on
the app (`shared.db.serialize`), then reads the queue and the agents, decides (`routing`), and
writes each assignment as a conditional update. Two replicas (or two agents clicking at once)
apply their changes one after the other; the second sees the first's result.

`passControl` metadata may steer routing: `desk:team` (a team id or name), `desk:priority` (an
integer, higher first), `desk:skills` (comma-separated, e.g. a language: SunCo metadata values are scalars).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import msgspec

from shared import metrics
from shared.db import Connection, serialize
from shared.http import ApiError
from shared.ids import new_id
from shared.messages import conversation as conv
from shared.telemetry import log_fields

from . import routing
from .auth import require_role, require_same_app
from .store import OPEN, PENDING, RESOLVED, SNOOZED, STATUSES, AgentRow, NoteRow, Store, TeamRow, Ticket

log = logging.getLogger(__name__)

DESK_TYPE = conv.DESK_INTEGRATION_TYPE
MAX_NOTE_LENGTH = 4096
MAX_LABELS = 20
MAX_LABEL_LENGTH = 64
MAX_PRIORITY = 1000
MAX_SKILLS = 32
# What a ticket keeps of the last message, for the inbox.
PREVIEW_LENGTH = 200

UpdateKind = Literal["ticket", "agent", "message", "note", "activity", "removed", "event"]
CHANNEL_NAMES = {"whatsapp": "WhatsApp", "messenger": "Messenger", "telegram": "Telegram", "twilio": "SMS",
                 "mailgun": "e-mail", "sdk": "the web or the app", "web": "the web", "android": "Android",
                 "ios": "iOS"}


class Update(msgspec.Struct, kw_only=True, omit_defaults=True, rename="camel"):
    """A live update for the desks of one app (sent on `desk.updates.<app>`)."""

    app_id: str
    kind: UpdateKind
    conversation_id: str | None = None
    data: dict[str, Any] | None = None


class Members(Protocol):
    """The apps' switchboards, as the desk needs them (events name a member by id only)."""

    async def member_type(self, app_id: str, member_id: str) -> str | None:
        """The integration type of an app's switchboard member (None: no such member)."""
        ...

    def has_desk(self, app_id: str) -> bool:
        """Whether the app's switchboard has a desk member (as far as this replica knows)."""
        ...


class Conversations(Protocol):
    """What the desk asks the conversations service (over NATS in the service)."""

    async def switchboard(self, app_id: str, conversation_id: str, action: str,
                          metadata: dict[str, Any] | None = None, target: str | None = None) -> None:
        """Move control as the desk: `releaseControl` only while the desk holds it, `passControl`
        to `target`."""
        ...

    async def snapshot(self, app_id: str, conversation_id: str) -> Snapshot:
        """What the desk needs of a conversation entering it: customer, channel, last message."""
        ...


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A conversation as it enters the desk (None: unknown)."""

    user_id: str | None = None
    channel: str | None = None
    last_message: Any = None
    last_message_at: float | None = None


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts: a signed-in agent, or the business's API key (agent None: admin rights, no seat)."""

    app_id: str
    agent: AgentRow | None = None
    # The signed-in session's hash (None for an app key).
    session_hash: str | None = None

    @property
    def role(self) -> str:
        return "admin" if self.agent is None else self.agent.role

    @property
    def agent_id(self) -> str | None:
        return None if self.agent is None else self.agent.id


def ticket_out(ticket: Ticket) -> dict[str, Any]:
    """A ticket as the desk API shows it."""
    return {
        "conversationId": ticket.conversation_id, "appId": ticket.app_id, "userId": ticket.user_id,
        "channel": ticket.channel, "status": ticket.status, "queued": ticket.queued, "agentId": ticket.agent_id,
        "assignedAt": ticket.assigned_at, "assignReason": ticket.assign_reason, "teamId": ticket.team_id,
        "priority": ticket.priority, "requiredSkills": ticket.required_skills, "enqueuedAt": ticket.enqueued_at,
        "lastAgentId": ticket.last_agent_id, "transferToAgentId": ticket.transfer_to_agent_id,
        "snoozedUntil": ticket.snoozed_until, "labels": ticket.labels, "lastMessageAt": ticket.last_message_at,
        "lastMessageText": ticket.last_message_text, "lastAuthor": ticket.last_author,
        "createdAt": ticket.created_at, "updatedAt": ticket.updated_at,
    }


def agent_out(agent: AgentRow) -> dict[str, Any]:
    """An agent as the desk API shows it (never the password hash)."""
    return {"id": agent.id, "appId": agent.app_id, "email": agent.email, "displayName": agent.display_name,
            "role": agent.role, "capacity": agent.capacity, "presence": agent.presence, "skills": agent.skills,
            "channels": agent.channels, "disabled": agent.disabled, "lastSeenAt": agent.last_seen_at,
            "createdAt": agent.created_at}


def team_out(team: TeamRow) -> dict[str, Any]:
    """A team as the desk API shows it."""
    return {"id": team.id, "appId": team.app_id, "name": team.name, "skills": team.skills,
            "channels": team.channels, "members": team.members, "createdAt": team.created_at}


def note_out(note: NoteRow) -> dict[str, Any]:
    """A private note as the desk API shows it."""
    return {"id": note.id, "conversationId": note.conversation_id, "agentId": note.agent_id,
            "authorName": note.author_name, "text": note.text, "createdAt": note.created_at}


def _skills(value: Any) -> list[str]:
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, list):
        items = [str(part).strip() for part in value]
    else:
        return []
    return sorted({item.casefold() for item in items if item and len(item) <= MAX_LABEL_LENGTH})[:MAX_SKILLS]


def _priority(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int | float):
        return max(-MAX_PRIORITY, min(MAX_PRIORITY, int(value)))
    if isinstance(value, str):
        try:
            return max(-MAX_PRIORITY, min(MAX_PRIORITY, int(value.strip())))
        except ValueError:
            return 0
    return 0


def _preview(message: Any) -> str:
    content = message.content
    text = getattr(content, "text", None)
    if isinstance(text, str) and text:
        return text[:PREVIEW_LENGTH]
    return f"[{getattr(content, 'type', 'message')}]"


class Desk:
    """Tickets, routing and agents' actions on one store."""

    def __init__(self, store: Store, conversations: Conversations,
                 publish: Callable[[Update], Awaitable[None]], members: Members, *,
                 default_capacity: int = 5, grace_seconds: float = 90.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.members = members
        self.conversations = conversations
        self.publish = publish
        self.default_capacity = default_capacity
        self.grace_seconds = grace_seconds
        self.clock = clock

    # --- events --------------------------------------------------------------------------------

    async def is_desk(self, app_id: str, ref: Any) -> bool:
        """Whether a conversation's `activeSwitchboardIntegration` is a desk member (events name a
        member by id only: its type comes from the app's switchboard)."""
        if ref is None:
            return False
        if ref.integration_type is not None:
            return bool(ref.integration_type == DESK_TYPE)
        return await self.members.member_type(app_id, ref.id) == DESK_TYPE

    async def handle_event(self, event: conv.ConversationUnion) -> None:
        """Follow the conversation events that concern the desk."""
        forget = conv.erasure(event)
        if forget is not None:
            await self._forget(forget, event.app_id)
            return
        if isinstance(event, conv.ConversationRemoved):
            if await self.store.ticket(event.conversation_id) is not None:
                async with self.store.transaction() as tx:
                    await self.store.delete_ticket(tx, event.conversation_id)
                await self.publish(Update(app_id=event.app_id, kind="removed", conversation_id=event.conversation_id))
            return
        if isinstance(event, conv.SwitchboardControlled):
            if event.error is not None:
                return
            active = event.conversation.active_switchboard_integration
            if await self.is_desk(event.app_id, active):
                await self.enter(event.app_id, event.conversation_id, metadata=event.metadata, at=event.created_at)
            else:
                await self.leave(event.app_id, event.conversation_id, at=event.created_at)
            return
        if isinstance(event, conv.ClientAdded | conv.ClientUpdated | conv.UsersMerged):
            if self.members.has_desk(event.app_id) or await self.store.ticket(event.conversation_id) is not None:
                await self._timeline_event(event)
            return
        if isinstance(event, conv.MessageCreated):
            await self._message(event)
        elif isinstance(event, conv.ActivityPosted) and await self.is_desk(
                event.app_id, event.conversation.active_switchboard_integration):
            author = event.activity.author
            if author is not None and author.type == "user":
                await self.publish(Update(app_id=event.app_id, kind="activity", conversation_id=event.conversation_id,
                                          data={"type": event.activity.type}))

    async def _timeline_event(self, event: conv.ClientAdded | conv.ClientUpdated | conv.UsersMerged) -> None:
        """A handoff (a client joining and becoming primary) or a merge, kept for the timeline."""
        channel: str | None = None
        primary = False
        if isinstance(event, conv.UsersMerged):
            text = f"Merged with another customer ({event.reason})"
            conversation_ids = list(dict.fromkeys([event.conversation_id, *event.merged_conversation_ids]))
        else:
            if isinstance(event, conv.ClientUpdated) and not (event.primary and event.reason == "confirmed"):
                return
            channel, primary = event.client.type, event.primary
            name = CHANNEL_NAMES.get(channel, channel)
            text = f"Moved to {name}" if event.primary else f"Linked {name}"
            conversation_ids = [event.conversation.id if event.conversation is not None else event.conversation_id]
        for conversation_id in conversation_ids:
            record = {"id": f"{event.id}:{conversation_id}"[:96], "appId": event.app_id,
                      "conversationId": conversation_id, "kind": type(event).__name__, "channel": channel,
                      "text": text, "createdAt": event.created_at}
            if not await self.store.insert_timeline_event(record):
                continue
            await self.publish(Update(app_id=event.app_id, kind="event", conversation_id=conversation_id,
                                      data=record))
            if channel is not None and channel != "sdk" and primary:
                await self._moved(conversation_id, channel, event.created_at)

    async def _moved(self, conversation_id: str, channel: str, at: float) -> None:
        """The customer's current channel changed (a handoff): the ticket follows."""
        if await self.store.set_channel(conversation_id, channel, at):
            ticket = await self.store.ticket(conversation_id)
            if ticket is not None:
                await self._announce(ticket)

    async def _forget(self, erasure: conv.Erasure, app_id: str) -> None:
        """A privacy event: expired or deleted messages take the preview with them; a deletion of
        personal information the preview and the notes (agents write about the person); a deleted
        user every ticket of theirs. Open agent screens get the ticket without its preview, and
        the freed pages are erased where the engine allows (SQLite's write-ahead log)."""
        if erasure.before is not None or erasure.delivered_only or erasure.message is not None:
            erased = False
            # One deleted message takes the preview when it is the latest (at or after its time).
            before = erasure.before if erasure.message is None else math.nextafter(erasure.message.at, math.inf)
            for conversation_id in erasure.conversation_ids:
                changed = await self.store.forget_previews(conversation_id, before)
                if erasure.delivered_only:
                    await self.store.delete_notes(conversation_id)
                    changed = True
                if changed:
                    await self._announce_if(await self.store.ticket(conversation_id))
                erased = erased or changed
            if erased:  # nothing to erase for a conversation the desk never had (most of them)
                await self.store.db.erase_freed_pages()
            return
        doomed = list(erasure.conversation_ids)
        if erasure.user_id is not None:
            doomed.extend(await self.store.user_conversations(app_id, erasure.user_id))
        for conversation_id in dict.fromkeys(doomed):
            async with self.store.transaction() as tx:
                await self.store.delete_ticket(tx, conversation_id)
            await self.publish(Update(app_id=app_id, kind="removed", conversation_id=conversation_id))

    async def _message(self, event: conv.MessageCreated) -> None:
        in_desk = await self.is_desk(event.app_id, event.conversation.active_switchboard_integration)
        if not in_desk and not self.members.has_desk(event.app_id):
            return  # every message of every app comes here: those of apps without a desk cost no read
        message = event.message
        from_customer = message.author.type == "user"
        channel = message.source.type if from_customer and message.source is not None else None
        preview = (event.conversation_id, event.created_at, _preview(message), message.author.type, channel,
                   event.user_id or None)
        if not in_desk:
            # Another member's conversation (the bot's, most often): it has a ticket only if the
            # desk handled it before.
            if await self.store.ticket(event.conversation_id) is None:
                return
            await self._announce_if(await self.store.note_message(*preview))
        elif not from_customer:
            await self._announce_if(await self.store.note_message(*preview))
        else:
            # The customer writes to the desk: most often in a conversation being handled, where
            # one conditional write moves the preview; otherwise it reopens or requeues it.
            updated = await self.store.note_message(*preview, only_while_handled=True)
            if updated is not None:
                await self._announce(updated)
            else:
                ticket = await self.store.ticket(event.conversation_id)
                if ticket is None or ticket.status in (RESOLVED, SNOOZED, PENDING) or (
                        ticket.agent_id is None and not ticket.queued):
                    await self.enter(event.app_id, event.conversation_id, user_id=event.user_id, channel=channel,
                                     at=event.created_at, message=message)
                else:  # handled after all (assigned since the write was refused), or an older message
                    await self._announce_if(await self.store.note_message(*preview))
        await self.publish(Update(app_id=event.app_id, kind="message", conversation_id=event.conversation_id,
                                  data={"message": msgspec.to_builtins(message), "cursor": event.cursor}))

    async def enter(self, app_id: str, conversation_id: str, *, user_id: str | None = None, channel: str | None = None,
                    metadata: dict[str, Any] | None = None, at: float | None = None, message: Any = None) -> Ticket:
        """The desk has control: open (or reopen) the conversation's ticket and route it."""
        when = self.clock() if at is None else at
        steer = metadata or {}
        # A customer's message reopens a pending or snoozed conversation; a snapshot's does not.
        from_customer = message is not None and message.author.type == "user"
        message_at = when
        if message is None:
            known = await self.conversations.snapshot(app_id, conversation_id)
            user_id, channel = user_id or known.user_id, channel or known.channel
            message = known.last_message
            message_at = known.last_message_at or when
        async with self.store.transaction() as tx:
            await serialize(tx, f"desk:{app_id}")
            ticket = await self.store.ticket(conversation_id, tx)
            team_id = await self._team_from(tx, app_id, steer.get("desk:team"))
            if team_id is None and ticket is None and channel:
                team_id = await self._team_serving(tx, app_id, channel)
            if ticket is None:
                last_agent = await self.store.last_agent_of_user(app_id, user_id, tx) if user_id else None
                ticket = Ticket(
                    conversation_id=conversation_id, app_id=app_id, user_id=user_id, channel=channel or "unknown",
                    status=OPEN, queued=True, agent_id=None, assigned_at=None, assign_reason=None, team_id=team_id,
                    priority=_priority(steer.get("desk:priority")), required_skills=_skills(steer.get("desk:skills")),
                    enqueued_at=when, last_agent_id=last_agent, transfer_to_agent_id=None, previous_agent_id=None,
                    transferred_from_agent_id=None, requeued_at=None, snoozed_until=None, labels=[],
                    last_message_at=None, last_message_text=None, last_author=None, created_at=when, updated_at=when)
            elif ticket.status == RESOLVED or (ticket.agent_id is None and not ticket.queued) or (
                    ticket.status in (SNOOZED, PENDING) and from_customer):
                # Reopened: the agent who had it (if any) is its returning agent, else the queue.
                keep_agent = ticket.status != RESOLVED and ticket.agent_id is not None
                ticket = replace(
                    ticket, status=OPEN, snoozed_until=None, queued=not keep_agent,
                    agent_id=ticket.agent_id if keep_agent else None,
                    last_agent_id=ticket.agent_id or ticket.last_agent_id,
                    enqueued_at=ticket.enqueued_at if keep_agent else when,
                    team_id=team_id if team_id is not None else ticket.team_id,
                    priority=_priority(steer["desk:priority"]) if "desk:priority" in steer else ticket.priority,
                    required_skills=(_skills(steer["desk:skills"]) if "desk:skills" in steer
                                     else ticket.required_skills),
                    transfer_to_agent_id=None, transferred_from_agent_id=None, updated_at=when)
            if message is not None and (ticket.last_message_at is None or ticket.last_message_at <= message_at):
                ticket = replace(ticket, last_message_at=message_at, last_message_text=_preview(message),
                                 last_author=message.author.type, updated_at=max(ticket.updated_at, when),
                                 channel=channel or ticket.channel, user_id=ticket.user_id or user_id)
            await self.store.save_ticket(tx, ticket)
            assignments = await self._route(tx, app_id)
        await self._after(app_id, assignments, changed=[conversation_id])
        return await self.store.ticket(conversation_id) or ticket

    async def leave(self, app_id: str, conversation_id: str, *, at: float | None = None) -> None:
        """Another switchboard member took control: the desk's part ends (its agent's slot is freed)."""
        when = self.clock() if at is None else at
        async with self.store.transaction() as tx:
            await serialize(tx, f"desk:{app_id}")
            ticket = await self.store.ticket(conversation_id, tx)
            if ticket is None or (ticket.status == RESOLVED and not ticket.queued):
                return
            await self.store.save_ticket(tx, replace(ticket, status=RESOLVED, queued=False, snoozed_until=None,
                                                     last_agent_id=ticket.agent_id or ticket.last_agent_id,
                                                     updated_at=max(ticket.updated_at, when)))
            assignments = await self._route(tx, app_id)
        await self._after(app_id, assignments, changed=[conversation_id])

    # --- routing -------------------------------------------------------------------------------

    async def _route(self, tx: Connection, app_id: str) -> list[routing.Assignment]:
        """Assign what can be assigned in the app now (inside the serialized transaction)."""
        if not await self.store.has_free_seat(tx, app_id):
            return []  # everyone busy or away: the queue waits as it is
        queue = [ticket.routing_record() for ticket in await self.store.queued(tx, app_id)]
        if not queue:
            return []
        agents = await self.store.routing_agents(tx, app_id)
        made = []
        for assignment in routing.assign_next(queue, agents, self.clock()):
            if await self.store.assign(tx, assignment):
                made.append(assignment)
        return made

    async def route_app(self, app_id: str) -> list[routing.Assignment]:
        """Run a routing pass for one app (after presence or capacity changed)."""
        async with self.store.transaction() as tx:
            await serialize(tx, f"desk:{app_id}")
            assignments = await self._route(tx, app_id)
        await self._after(app_id, assignments)
        return assignments

    async def _after(self, app_id: str, assignments: Sequence[routing.Assignment],
                     changed: Sequence[str] = ()) -> None:
        """Tell the app's desks what changed (once committed)."""
        reasons = {assignment.conversation_id: assignment for assignment in assignments}
        for conversation_id in dict.fromkeys([*changed, *reasons]):
            ticket = await self.store.ticket(conversation_id)
            if ticket is None:
                continue
            made = reasons.get(conversation_id)
            if made is not None:
                waited_since = max(ticket.enqueued_at or made.assigned_at, ticket.requeued_at or 0.0)
                metrics.desk_assigned(made.reason, made.assigned_at - waited_since)
                log.info("desk assigned conversation %s to agent %s (%s)", conversation_id, made.agent_id,
                         made.reason, extra=log_fields(conversation_id=conversation_id, agent_id=made.agent_id,
                                                       reason=made.reason))
            await self._announce(ticket)

    async def _announce_if(self, ticket: Ticket | None) -> None:
        if ticket is not None:
            await self._announce(ticket)

    async def _announce(self, ticket: Ticket) -> None:
        await self.publish(Update(app_id=ticket.app_id, kind="ticket", conversation_id=ticket.conversation_id,
                                  data=ticket_out(ticket)))

    async def _team_serving(self, tx: Connection, app_id: str, channel: str) -> str | None:
        """The team a new conversation of `channel` is queued for: the team that lists it among the
        channels it serves (the first by name when several do); None (the app's default team) when
        none does."""
        return next((team.id for team in await self.store.teams(app_id, tx) if channel in team.channels), None)

    async def _team_from(self, tx: Connection, app_id: str, value: Any) -> str | None:
        if not isinstance(value, str) or not value:
            return None
        for team in await self.store.teams(app_id, tx):
            if value in (team.id, team.name):
                return team.id
        return None

    # --- presence ------------------------------------------------------------------------------

    async def set_presence(self, actor: Actor, agent_id: str, presence: str) -> AgentRow:
        """An agent goes online, away or offline; away or offline returns their conversations to the
        queue (each keeps its place, and the agent gets it back as returning agent if they return
        while it still waits)."""
        if presence not in routing.PRESENCES:
            raise ApiError(400, "presence must be online, away or offline")
        agent = await self._agent_for(actor, agent_id)
        if actor.agent is not None and actor.agent.id != agent.id:
            require_role(actor.role, "admin")
        if agent.disabled and presence == "online":
            raise ApiError(409, "A disabled agent cannot go online")
        now = self.clock()
        async with self.store.transaction() as tx:
            await serialize(tx, f"desk:{agent.app_id}")
            await self.store.set_presence(tx, agent.id, presence, now)
            released = await self._release(tx, agent.id, now) if presence != "online" else []
            assignments = await self._route(tx, agent.app_id)
        updated = await self.store.agent(agent.id) or agent
        await self.publish(Update(app_id=agent.app_id, kind="agent", data=agent_out(updated)))
        await self._after(agent.app_id, assignments, changed=released)
        return updated

    async def _release(self, tx: Connection, agent_id: str, now: float) -> list[str]:
        held = await self.store.held_by(tx, agent_id)
        requeued = []
        for ticket in held:
            if ticket.status not in (OPEN, PENDING):
                continue
            # Its place (priority, enqueued_at) is kept; the agent becomes its returning agent
            # (`routing.release_agent`'s rules).
            await self.store.save_ticket(tx, replace(
                ticket, agent_id=None, queued=True, assigned_at=None, assign_reason=None,
                last_agent_id=agent_id, previous_agent_id=agent_id, transfer_to_agent_id=None,
                transferred_from_agent_id=None, requeued_at=now, updated_at=now))
            requeued.append(ticket.conversation_id)
        if requeued:
            metrics.desk_requeued("agent_left", len(requeued))
            log.info("agent %s left: %d conversation(s) back in the queue", agent_id, len(requeued))
        return requeued

    async def heard_from(self, agent: AgentRow) -> None:
        """The agent's desk is alive (a request or a socket heartbeat)."""
        await self.store.touch_agent(agent.id, self.clock())

    async def sweep(self) -> None:
        """Agents silent past the grace period go offline (their conversations back to the queue);
        snoozed conversations whose time came reopen."""
        now = self.clock()
        for agent in await self.store.silent_agents(now - self.grace_seconds):
            log.info("agent %s silent for %.0f s: offline", agent.id, self.grace_seconds)
            async with self.store.transaction() as tx:
                await serialize(tx, f"desk:{agent.app_id}")
                current = await self.store.agent(agent.id, tx)
                if current is None or current.presence == "offline" or (
                        current.last_seen_at is not None and current.last_seen_at >= now - self.grace_seconds):
                    continue
                await self.store.set_presence(tx, agent.id, "offline", None)
                released = await self._release(tx, agent.id, now)
                assignments = await self._route(tx, agent.app_id)
            refreshed = await self.store.agent(agent.id)
            if refreshed is not None:
                await self.publish(Update(app_id=agent.app_id, kind="agent", data=agent_out(refreshed)))
            await self._after(agent.app_id, assignments, changed=released)
        for ticket in await self.store.due_snoozes(now):
            await self._wake(ticket, now)
        metrics.desk_queue_length(await self.store.queued_count())

    async def _wake(self, ticket: Ticket, now: float) -> None:
        async with self.store.transaction() as tx:
            await serialize(tx, f"desk:{ticket.app_id}")
            current = await self.store.ticket(ticket.conversation_id, tx)
            if current is None or current.status != SNOOZED:
                return
            holder = await self.store.agent(current.agent_id, tx) if current.agent_id else None
            keep = holder is not None and holder.presence == "online" and not holder.disabled
            await self.store.save_ticket(tx, replace(
                current, status=OPEN, snoozed_until=None, queued=not keep, agent_id=current.agent_id if keep else None,
                last_agent_id=current.agent_id or current.last_agent_id, enqueued_at=current.enqueued_at or now,
                updated_at=now))
            assignments = await self._route(tx, current.app_id)
        await self._after(ticket.app_id, assignments, changed=[ticket.conversation_id])

    # --- agents' actions on conversations --------------------------------------------------------

    async def ticket_for(self, actor: Actor, conversation_id: str, tx: Connection | None = None) -> Ticket:
        """The ticket of a conversation in the actor's app; 404 otherwise (another app's look the same)."""
        ticket = await self.store.ticket(conversation_id, tx)
        if ticket is None:
            raise ApiError(404, "Conversation not found in the desk", "conversation_not_found")
        require_same_app(actor.app_id, ticket.app_id, "Conversation")
        return ticket

    async def accept(self, actor: Actor, conversation_id: str, agent_id: str | None = None) -> Ticket:
        """Assign a waiting conversation: to the actor (an agent taking it), or to `agent_id` (an
        admin or the API). 409 when it is no longer waiting (someone else took it first) or the agent
        cannot take it now (not online, or full)."""
        target_id = agent_id or actor.agent_id
        if target_id is None:
            raise ApiError(400, "agentId is required")
        if actor.agent_id is not None and target_id != actor.agent_id:
            require_role(actor.role, "admin")
        target = await self._agent_for(actor, target_id)
        now = self.clock()
        async with self.store.transaction() as tx:
            await serialize(tx, f"desk:{actor.app_id}")
            ticket = await self.ticket_for(actor, conversation_id, tx)
            if ticket.agent_id == target.id and ticket.status in (OPEN, PENDING):
                return ticket
            if not ticket.queued:
                raise ApiError(409, "This conversation is not waiting for an agent (it was assigned meanwhile)",
                               "conflict")
            agents = {agent.agent_id: agent for agent in await self.store.routing_agents(tx, actor.app_id)}
            seat = agents.get(target.id)
            if seat is None or seat.presence != "online":
                raise ApiError(409, "The agent is not online", "conflict")
            if not seat.has_room:
                raise ApiError(409, "The agent has no free slot (capacity reached)", "conflict")
            assignment = routing.Assignment(app_id=actor.app_id, conversation_id=conversation_id, agent_id=target.id,
                                            reason="manual", assigned_at=now,
                                            previous_agent_id=ticket.previous_agent_id)
            if not await self.store.assign(tx, assignment):
                raise ApiError(409, "This conversation was assigned meanwhile", "conflict")
        await self._after(actor.app_id, [assignment])
        return await self.ticket_for(actor, conversation_id)

    async def transfer(self, actor: Actor, conversation_id: str, *, to_agent_id: str | None,
                       to_team_id: str | None) -> Ticket:
        """Hand a conversation to an agent or a team (it waits in the queue when they cannot take it now)."""
        if to_agent_id is None and to_team_id is None:
            raise ApiError(400, "A transfer names agentId or teamId")
        if to_agent_id is not None:
            await self._agent_for(actor, to_agent_id)
        if to_team_id is not None:
            team = await self.store.team(to_team_id)
            if team is None or team.app_id != actor.app_id:
                raise ApiError(404, "Team not found")
        now = self.clock()
        async with self.store.transaction() as tx:
            await serialize(tx, f"desk:{actor.app_id}")
            ticket = await self.ticket_for(actor, conversation_id, tx)
            if ticket.status == RESOLVED:
                raise ApiError(409, "A resolved conversation cannot be transferred", "conflict")
            if actor.agent_id is not None and ticket.agent_id not in (None, actor.agent_id):
                require_role(actor.role, "admin")
            agents = await self.store.routing_agents(tx, actor.app_id)
            try:
                outcome = routing.transfer(ticket.routing_record(), agents, now, to_agent_id=to_agent_id,
                                           to_team_id=to_team_id, from_agent_id=ticket.agent_id)
            except ValueError as exc:
                raise ApiError(400, str(exc)) from exc
            record = outcome.conversation
            await self.store.save_ticket(tx, replace(
                ticket, agent_id=None, queued=True, assigned_at=None, assign_reason=None, team_id=record.team_id,
                transfer_to_agent_id=record.transfer_to_agent_id, previous_agent_id=record.previous_agent_id,
                transferred_from_agent_id=record.transferred_from_agent_id, requeued_at=record.requeued_at,
                last_agent_id=ticket.agent_id or ticket.last_agent_id, status=OPEN, snoozed_until=None,
                updated_at=now))
            made = []
            if outcome.assignment is not None and await self.store.assign(tx, outcome.assignment):
                made.append(outcome.assignment)
            else:
                metrics.desk_requeued("transfer")
            made.extend(await self._route(tx, actor.app_id))
        await self._after(actor.app_id, made, changed=[conversation_id])
        return await self.ticket_for(actor, conversation_id)

    async def set_status(self, actor: Actor, conversation_id: str, status: str,
                         snooze_until: float | None = None) -> Ticket:
        """Open, pending (waiting on the customer), snoozed (until a time) or resolved. Resolving
        frees the agent's slot and gives control back to the switchboard (`releaseControl`)."""
        if status not in STATUSES:
            raise ApiError(400, f"status must be one of {', '.join(STATUSES)}")
        now = self.clock()
        if status == SNOOZED and (snooze_until is None or snooze_until <= now):
            raise ApiError(400, "snoozedUntil must be a time in the future")
        async with self.store.transaction() as tx:
            await serialize(tx, f"desk:{actor.app_id}")
            ticket = await self.ticket_for(actor, conversation_id, tx)
            if actor.agent_id is not None and ticket.agent_id not in (None, actor.agent_id):
                require_role(actor.role, "admin")
            if ticket.status == RESOLVED and status != RESOLVED:
                # Reopened: waiting for an agent unless one still has it (a snoozed one waits for its time).
                waits = ticket.agent_id is None and status != SNOOZED
                updated = replace(ticket, status=status, queued=waits, snoozed_until=snooze_until,
                                  enqueued_at=now if waits else ticket.enqueued_at, updated_at=now)
            else:
                # A snoozed conversation leaves the queue until its time comes (it waits again then).
                updated = replace(ticket, status=status, snoozed_until=snooze_until if status == SNOOZED else None,
                                  queued=ticket.queued and status not in (RESOLVED, SNOOZED), updated_at=now)
            await self.store.save_ticket(tx, updated)
            assignments = await self._route(tx, actor.app_id)
        await self._after(actor.app_id, assignments, changed=[conversation_id])
        if status == RESOLVED and ticket.status != RESOLVED:
            await self.conversations.switchboard(actor.app_id, conversation_id, "releaseControl",
                                                 {"desk:resolvedBy": actor.agent_id or "api"})
        elif ticket.status == RESOLVED and status != RESOLVED:
            await self.conversations.switchboard(actor.app_id, conversation_id, "passControl",
                                                 {"desk:reopenedBy": actor.agent_id or "api"}, target=DESK_TYPE)
        return await self.ticket_for(actor, conversation_id)

    async def set_labels(self, actor: Actor, conversation_id: str, labels: Sequence[str]) -> Ticket:
        """Replace a conversation's labels."""
        clean = sorted({label.strip() for label in labels if label.strip()})
        if len(clean) > MAX_LABELS or any(len(label) > MAX_LABEL_LENGTH for label in clean):
            raise ApiError(400, f"At most {MAX_LABELS} labels of at most {MAX_LABEL_LENGTH} characters")
        await self.ticket_for(actor, conversation_id)
        await self.store.set_labels(conversation_id, clean, self.clock())
        updated = await self.ticket_for(actor, conversation_id)
        await self._announce(updated)
        return updated

    async def add_note(self, actor: Actor, conversation_id: str, text: str) -> NoteRow:
        """A private note on the conversation (agents only, never sent to the customer)."""
        text = text.strip()
        if not text or len(text) > MAX_NOTE_LENGTH:
            raise ApiError(400, f"A note has 1 to {MAX_NOTE_LENGTH} characters")
        await self.ticket_for(actor, conversation_id)
        note = NoteRow(id=new_id(), app_id=actor.app_id, conversation_id=conversation_id,
                       agent_id=actor.agent_id or "api",
                       author_name=actor.agent.display_name if actor.agent is not None else "API",
                       text=text, created_at=self.clock())
        await self.store.insert_note(note)
        await self.publish(Update(app_id=actor.app_id, kind="note", conversation_id=conversation_id,
                                  data=note_out(note)))
        return note

    async def notes(self, actor: Actor, conversation_id: str) -> list[NoteRow]:
        """A conversation's private notes."""
        await self.ticket_for(actor, conversation_id)
        return await self.store.notes(conversation_id)

    # --- agents and teams (admins) ---------------------------------------------------------------

    async def _agent_for(self, actor: Actor, agent_id: str) -> AgentRow:
        agent = await self.store.agent(agent_id)
        if agent is None:
            raise ApiError(404, "Agent not found")
        require_same_app(actor.app_id, agent.app_id, "Agent")
        return agent

    async def agent_for(self, actor: Actor, agent_id: str) -> AgentRow:
        """An agent of the actor's app; 404 otherwise."""
        return await self._agent_for(actor, agent_id)

    async def create_agent(self, actor: Actor, agent: AgentRow) -> AgentRow:
        """A new agent (admins only); 409 when the e-mail is taken in the app."""
        require_role(actor.role, "admin")
        async with self.store.transaction() as tx:
            if not await self.store.insert_agent(tx, agent):
                raise ApiError(409, "An agent with this e-mail already exists in the app", "conflict")
        await self.publish(Update(app_id=agent.app_id, kind="agent", data=agent_out(agent)))
        return agent

    async def update_agent(self, actor: Actor, agent: AgentRow, *, drop_sessions: bool) -> AgentRow:
        """Write an agent (admins, or the agent on their own name and password); a disabled agent
        goes offline and their conversations back to the queue."""
        async with self.store.transaction() as tx:
            await serialize(tx, f"desk:{agent.app_id}")
            if not await self.store.update_agent(tx, agent):
                raise ApiError(409, "The agent was changed meanwhile: read it again", "conflict")
            released: list[str] = []
            if agent.disabled:
                await self.store.set_presence(tx, agent.id, "offline", None)
                released = await self._release(tx, agent.id, self.clock())
            assignments = await self._route(tx, agent.app_id)
        if drop_sessions:
            await self.store.delete_agent_sessions(agent.id)
        updated = await self.store.agent(agent.id) or agent
        await self.publish(Update(app_id=agent.app_id, kind="agent", data=agent_out(updated)))
        await self._after(agent.app_id, assignments, changed=released)
        return updated

    async def delete_agent(self, actor: Actor, agent_id: str) -> None:
        """Remove an agent (admins only; not oneself): their conversations go back to the queue."""
        require_role(actor.role, "admin")
        agent = await self._agent_for(actor, agent_id)
        if actor.agent_id == agent.id:
            raise ApiError(409, "An admin cannot delete their own account", "conflict")
        async with self.store.transaction() as tx:
            await serialize(tx, f"desk:{agent.app_id}")
            await self.store.set_presence(tx, agent.id, "offline", None)
            released = await self._release(tx, agent.id, self.clock())
            await self.store.delete_agent(tx, agent.id)
            assignments = await self._route(tx, agent.app_id)
        await self.publish(Update(app_id=agent.app_id, kind="agent", data={"id": agent.id, "deleted": True}))
        await self._after(agent.app_id, assignments, changed=released)

    async def save_team(self, actor: Actor, team: TeamRow, *, new: bool) -> TeamRow:
        """Create or update a team (admins only); members must be the app's agents."""
        require_role(actor.role, "admin")
        for member in team.members:
            await self._agent_for(actor, member)
        async with self.store.transaction() as tx:
            await serialize(tx, f"desk:{actor.app_id}")
            if new:
                if not await self.store.insert_team(tx, team):
                    raise ApiError(409, "A team with this name already exists in the app", "conflict")
            elif not await self.store.update_team(tx, team):
                raise ApiError(409, "A team with this name already exists in the app", "conflict")
            assignments = await self._route(tx, actor.app_id)
        await self._after(actor.app_id, assignments)
        return await self.store.team(team.id) or team

    async def delete_team(self, actor: Actor, team_id: str) -> None:
        """Remove a team (admins only): its waiting conversations fall back to the default team."""
        require_role(actor.role, "admin")
        team = await self.store.team(team_id)
        if team is None or team.app_id != actor.app_id:
            raise ApiError(404, "Team not found")
        async with self.store.transaction() as tx:
            await serialize(tx, f"desk:{actor.app_id}")
            await self.store.delete_team(tx, team_id)
            assignments = await self._route(tx, actor.app_id)
        await self._after(actor.app_id, assignments)

