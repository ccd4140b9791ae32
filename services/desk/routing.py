"""The desk's routing engine: which agent gets which waiting conversation, as pure decisions.

Nothing here does I/O or reads the clock (`now` is an argument), so the service can run a decision
inside one database transaction, serialized per app and written with a compare-and-set, and two
desk replicas never decide the same conversation twice. Every rule is unit-tested with plain values
(tests/unit/test_desk_routing.py).

The rules, in the order they are tried for each waiting conversation:

1. **Transfer to a named agent**: the conversation goes to that agent if they are online (same app)
   with a free slot. The routing filters (team, skills, channels) do not apply: a person chose that
   agent on purpose. Presence and capacity still do: nobody gets work while away or full.
2. **Returning customer**: back to the customer's last agent if that agent is online, eligible (team,
   skills, channel) and has a free slot.
3. **Least busy**: among the online, eligible agents with a free slot, the one with the fewest open
   conversations (an absolute count, not a load ratio: capacity is a ceiling, not a target, and
   a count spreads customers evenly and has no float ties); among equals the one assigned longest
   ago (never assigned first), then by agent id, so the same input always gives the same output.

Eligibility: same app, presence "online", in the conversation's team (`team_id=None` is the app's
default team, which every agent of the app belongs to), every required skill, and the channel among
those the agent serves (an empty set serves all). A conversation transferred away by an agent is
never routed back to that agent while it waits.

Queue order: priority (higher first), then waiting time (oldest `enqueued_at` first), then
conversation id (determinism). Greedy in that order; a conversation nobody can take now is skipped,
never blocking the ones behind it that another skill set or team can take.

A transfer to an agent who cannot take it now waits in the queue with the transfer noted: that
agent gets it as soon as they can, but it is not reserved for them. It is queued for the
conversation's team if the agent is in it, else for the agent's team (the smallest team id if they
have several, the app's default team if none), or for the team the caller names; any eligible agent
of that team may take it meanwhile. A reservation for an agent who is away is exactly the stuck
queue the desk must not have.

When an agent goes away or offline, or their socket has been down longer than a grace period, their
open conversations go back to the queue with their original priority and `enqueued_at` (they keep
their place) and the agent recorded as previous and last agent, so the agent gets them back as a
returning customer's agent if they come back while the conversations still wait.

Complexity of `assign_next` with n waiting conversations, A agents, a assignments made and K distinct
eligibility keys (app, team, skills, channel) among the conversations reached: one sort, O(n log n);
one bucket per key built lazily from the app's agents with a free slot, O(K·A) set checks; each
bucket is a heap of agents ordered by (load, last assigned, id) kept up to date lazily (an entry
made stale by an assignment is refreshed only when it reaches the top), O((n + a·K) log A) at worst
and far less in practice. No rescan of the agents per conversation; the pass stops as soon as
no online agent has a free slot.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

Presence = Literal["online", "away", "offline"]
PRESENCES: frozenset[str] = frozenset({"online", "away", "offline"})

# How the agent was chosen; shown in the desk and logged with the assignment.
# `manual`: taken by hand (an agent accepting, an admin assigning), not decided by routing.
AssignReason = Literal["transfer", "returning", "least_busy", "manual"]


@dataclass(frozen=True, slots=True)
class QueuedConversation:
    """A conversation waiting for an agent: its routing record.

    `channel` is the customer's current channel (whatsapp, messenger, telegram, twilio, mailgun,
    web, android, ios). `team_id=None` is the app's default team. `last_agent_id` is the agent who
    last served this customer. `previous_agent_id` is the agent who held this conversation right
    before it (re-)entered the queue (released or transferred), `transferred_from_agent_id` the
    agent who transferred it away (never routed back to them while it waits), `requeued_at` when
    that happened; the three are None for a conversation entering routing for the first time.
    """

    app_id: str
    conversation_id: str
    channel: str
    enqueued_at: float
    priority: int = 0
    team_id: str | None = None
    required_skills: frozenset[str] = frozenset()
    last_agent_id: str | None = None
    transfer_to_agent_id: str | None = None
    previous_agent_id: str | None = None
    transferred_from_agent_id: str | None = None
    requeued_at: float | None = None


@dataclass(frozen=True, slots=True)
class Agent:
    """An agent as routing sees them.

    `channels` empty serves every channel. `capacity` is the most conversations they hold at once;
    `assigned` the conversation ids they hold now; `last_assigned_at` when they last got one (None:
    never), for round-robin among equally busy agents.
    """

    agent_id: str
    app_id: str
    presence: Presence
    capacity: int
    teams: frozenset[str] = frozenset()
    skills: frozenset[str] = frozenset()
    channels: frozenset[str] = frozenset()
    assigned: frozenset[str] = frozenset()
    last_assigned_at: float | None = None

    def __post_init__(self) -> None:
        # Rows come from the database as plain strings: a typo must fail here, not be read as "not online".
        if self.presence not in PRESENCES:
            raise ValueError(f"unknown presence {self.presence!r}")
        if self.capacity < 0:
            raise ValueError(f"capacity must be >= 0, not {self.capacity}")

    @property
    def load(self) -> int:
        """How many conversations the agent holds now."""
        return len(self.assigned)

    @property
    def has_room(self) -> bool:
        """Whether the agent holds fewer conversations than their capacity."""
        return len(self.assigned) < self.capacity


@dataclass(frozen=True, slots=True)
class Assignment:
    """One decision: `agent_id` takes `conversation_id`, and why (`reason`)."""

    app_id: str
    conversation_id: str
    agent_id: str
    reason: AssignReason
    assigned_at: float
    previous_agent_id: str | None = None


@dataclass(frozen=True, slots=True)
class TransferOutcome:
    """The routing record after a transfer, and the assignment made at once (None: it waits)."""

    conversation: QueuedConversation
    assignment: Assignment | None


# --- rules --------------------------------------------------------------------------------------

def queue_order_key(conversation: QueuedConversation) -> tuple[int, float, str, str]:
    """The sort key of the queue: priority (desc), waiting time (oldest first), then ids."""
    return (-conversation.priority, conversation.enqueued_at, conversation.conversation_id, conversation.app_id)


def in_queue_order(queue: Iterable[QueuedConversation]) -> list[QueuedConversation]:
    """The waiting conversations in the order routing serves them."""
    return sorted(queue, key=queue_order_key)


def is_eligible(agent: Agent, conversation: QueuedConversation) -> bool:
    """Whether automatic routing may give `conversation` to `agent`, capacity aside.

    Same app, online, in the conversation's team (none: the app's default team, i.e. every agent),
    every required skill, serves the channel, and not the agent who transferred it away.
    """
    return (agent.app_id == conversation.app_id
            and agent.presence == "online"
            and agent.agent_id != conversation.transferred_from_agent_id
            and (conversation.team_id is None or conversation.team_id in agent.teams)
            and conversation.required_skills <= agent.skills
            and (not agent.channels or conversation.channel in agent.channels))


def can_take_transfer(agent: Agent, conversation: QueuedConversation) -> bool:
    """Whether `agent`, named as the transfer target, may take `conversation` now.

    Same app, online, a free slot; team, skills and channels are not asked of a named target.
    """
    return (agent.app_id == conversation.app_id
            and agent.presence == "online"
            and agent.agent_id != conversation.transferred_from_agent_id
            and agent.has_room)


# --- one pass -----------------------------------------------------------------------------------

_SortKey = tuple[int, float, int, str]  # (load, last assigned, order within this pass, agent id)


class _Seat:
    """An agent's load while one pass runs (agents themselves are frozen)."""

    __slots__ = ("agent", "last_at", "load", "pass_order")

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.load = agent.load
        self.last_at = -math.inf if agent.last_assigned_at is None else agent.last_assigned_at
        # Every assignment of a pass carries the same `now`; this keeps round-robin among agents
        # served earlier in the same pass instead of falling back to id order.
        self.pass_order = 0

    @property
    def has_room(self) -> bool:
        return self.load < self.agent.capacity

    def sort_key(self) -> _SortKey:
        return (self.load, self.last_at, self.pass_order, self.agent.agent_id)


_BucketKey = tuple[str, str | None, frozenset[str], str, str | None]


class _Pass:
    """One greedy pass over the queue; see the module docstring for the rules and the cost."""

    def __init__(self, agents: Iterable[Agent], now: float) -> None:
        self.now = now
        self.seats: dict[str, _Seat] = {}
        self.online_by_app: dict[str, list[_Seat]] = {}
        self.free_slots = 0
        self.buckets: dict[_BucketKey, list[_SortKey]] = {}
        self.assignments_made = 0
        for agent in agents:
            if agent.agent_id in self.seats:
                raise ValueError(f"agent {agent.agent_id!r} listed twice")
            seat = _Seat(agent)
            self.seats[agent.agent_id] = seat
            if agent.presence == "online":
                self.online_by_app.setdefault(agent.app_id, []).append(seat)
                self.free_slots += max(0, agent.capacity - agent.load)

    def choose(self, conversation: QueuedConversation) -> tuple[_Seat, AssignReason] | None:
        target = self.seats.get(conversation.transfer_to_agent_id or "")
        if target is not None and can_take_transfer(target.agent, conversation) and target.has_room:
            return target, "transfer"
        last = self.seats.get(conversation.last_agent_id or "")
        if last is not None and last.has_room and is_eligible(last.agent, conversation):
            return last, "returning"
        least_busy = self._pop_least_busy(conversation)
        return (least_busy, "least_busy") if least_busy is not None else None

    def assign(self, seat: _Seat, conversation: QueuedConversation, reason: AssignReason) -> Assignment:
        seat.load += 1
        # max(): a replica's clock behind the stored value must not make this agent look idle longest.
        seat.last_at = max(seat.last_at, self.now)
        self.assignments_made += 1
        seat.pass_order = self.assignments_made
        self.free_slots -= 1
        return Assignment(app_id=conversation.app_id, conversation_id=conversation.conversation_id,
                          agent_id=seat.agent.agent_id, reason=reason, assigned_at=self.now,
                          previous_agent_id=conversation.previous_agent_id)

    def _bucket(self, conversation: QueuedConversation) -> list[_SortKey]:
        key = (conversation.app_id, conversation.team_id, conversation.required_skills, conversation.channel,
               conversation.transferred_from_agent_id)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = [seat.sort_key() for seat in self.online_by_app.get(conversation.app_id, ())
                      if seat.has_room and is_eligible(seat.agent, conversation)]
            heapq.heapify(bucket)
            self.buckets[key] = bucket
        return bucket

    def _pop_least_busy(self, conversation: QueuedConversation) -> _Seat | None:
        bucket = self._bucket(conversation)
        while bucket:
            seat = self.seats[bucket[0][-1]]
            if not seat.has_room:
                heapq.heappop(bucket)  # loads only grow within a pass: it will not come back
            elif bucket[0] != (current := seat.sort_key()):
                heapq.heapreplace(bucket, current)  # stale: its true key is larger, sink it
            else:
                return seat  # stays in the bucket; the assignment makes its entry stale
        return None


def assign_next(queue: Iterable[QueuedConversation], agents: Iterable[Agent], now: float) -> list[Assignment]:
    """Every assignment possible now, greedy in queue order, in the order they were decided.

    Each agent's load grows as the pass goes, so nobody goes over capacity. A conversation that an
    agent already holds, or that is listed twice (the first in queue order counts), is not assigned
    again. Raises ValueError when an agent id is listed twice.
    """
    routing = _Pass(agents, now)
    decided = {(seat.agent.app_id, conversation_id)
               for seat in routing.seats.values() for conversation_id in seat.agent.assigned}
    assignments: list[Assignment] = []
    for conversation in in_queue_order(queue):
        if routing.free_slots <= 0:
            break
        identity = (conversation.app_id, conversation.conversation_id)
        if identity in decided:
            continue
        decided.add(identity)
        choice = routing.choose(conversation)
        if choice is not None:
            seat, reason = choice
            assignments.append(routing.assign(seat, conversation, reason))
    return assignments


def route_one(conversation: QueuedConversation, agents: Iterable[Agent], now: float) -> Assignment | None:
    """The agent for one conversation now, or None: it waits in the queue.

    Meant for a newcomer while the queue is at rest (`assign_next` has run since the last change):
    then no agent with a free slot could take anyone already waiting, so it jumps nobody.
    """
    assignments = assign_next([conversation], agents, now)
    return assignments[0] if assignments else None


# --- agents leaving, transfers ------------------------------------------------------------------

def should_release(agent: Agent, now: float, *, disconnected_since: float | None, grace_seconds: float) -> bool:
    """Whether `agent`'s open conversations must go back to the queue now.

    Yes when they hold some and are away or offline, or their socket has been down for
    `grace_seconds` or more (the service picks the grace and marks the agent away before releasing).
    """
    if not agent.assigned:
        return False
    if agent.presence != "online":
        return True
    return disconnected_since is not None and now - disconnected_since >= grace_seconds


def release_agent(agent: Agent, held: Iterable[QueuedConversation], now: float) -> list[QueuedConversation]:
    """`agent`'s open conversations back in the queue, in queue order.

    `held` are the routing records of the conversations; those that are not `agent`'s (another app,
    not in `agent.assigned`) are left out. Each keeps its priority and `enqueued_at`, so it keeps
    its place, and records `agent` as previous and last agent; a fulfilled transfer note is cleared.
    The agent must already be away or offline (ValueError otherwise), else the next pass would hand
    the conversations straight back to them. The caller empties the agent's assignments in the same
    transaction: while an agent still lists a conversation, `assign_next` treats it as held.
    """
    if agent.presence == "online":
        raise ValueError(f"agent {agent.agent_id!r} is online: mark them away or offline before releasing")
    released = (replace(conversation, last_agent_id=agent.agent_id, previous_agent_id=agent.agent_id,
                        transfer_to_agent_id=None, transferred_from_agent_id=None, requeued_at=now)
                for conversation in held
                if conversation.app_id == agent.app_id and conversation.conversation_id in agent.assigned)
    return in_queue_order(released)


def transfer(conversation: QueuedConversation, agents: Sequence[Agent], now: float, *,
             to_agent_id: str | None = None, to_team_id: str | None = None,
             from_agent_id: str | None = None) -> TransferOutcome:
    """Transfer `conversation` to an agent, a team, or an agent with a fallback team.

    `from_agent_id` is the agent giving it away (None: it was waiting in the queue); it is never
    routed back to them while it waits. The conversation keeps its priority and `enqueued_at`. The
    named agent gets it now if online (same app) with a free slot, whatever their team, skills and
    channels; else it waits with the transfer noted, queued for `to_team_id` if given, else for the
    conversation's team when the agent is in it, else the agent's team (smallest id; none: the app's
    default team), and the first eligible agent of that team, or the named agent once free, takes it.
    Raises ValueError for no target, a target in another app or unknown, or a transfer to oneself.
    """
    if to_agent_id is None and to_team_id is None:
        raise ValueError("a transfer needs an agent or a team")
    if to_agent_id is not None and to_agent_id == from_agent_id:
        raise ValueError("an agent cannot transfer a conversation to themselves")
    team_id = to_team_id
    if to_agent_id is not None:
        target = next((agent for agent in agents if agent.agent_id == to_agent_id), None)
        if target is None or target.app_id != conversation.app_id:
            raise ValueError(f"no agent {to_agent_id!r} in app {conversation.app_id!r}")
        if to_team_id is None:
            team_id = _team_for(conversation.team_id, target)
    record = replace(
        conversation, team_id=team_id, transfer_to_agent_id=to_agent_id, transferred_from_agent_id=from_agent_id,
        previous_agent_id=from_agent_id if from_agent_id is not None else conversation.previous_agent_id,
        requeued_at=now)
    # The giving agent still lists the conversation until the service commits; it must not count as held.
    pool = [replace(agent, assigned=agent.assigned - {conversation.conversation_id})
            if agent.agent_id == from_agent_id else agent for agent in agents]
    return TransferOutcome(conversation=record, assignment=route_one(record, pool, now))


def _team_for(team_id: str | None, target: Agent) -> str | None:
    if team_id is None or team_id in target.teams:
        return team_id
    return min(target.teams) if target.teams else None


# --- applying decisions -------------------------------------------------------------------------

def apply_assignments(agents: Iterable[Agent], assignments: Iterable[Assignment]) -> list[Agent]:
    """The agents after `assignments` (conversations added, `last_assigned_at` moved), input order kept."""
    taken: dict[str, list[Assignment]] = {}
    for assignment in assignments:
        taken.setdefault(assignment.agent_id, []).append(assignment)
    updated = []
    for agent in agents:
        mine = taken.get(agent.agent_id)
        if not mine:
            updated.append(agent)
            continue
        latest = max(assignment.assigned_at for assignment in mine)
        updated.append(replace(
            agent, assigned=agent.assigned | {assignment.conversation_id for assignment in mine},
            last_assigned_at=latest if agent.last_assigned_at is None else max(agent.last_assigned_at, latest)))
    return updated


def still_waiting(queue: Iterable[QueuedConversation], assignments: Iterable[Assignment]) -> list[QueuedConversation]:
    """The conversations of `queue` that `assignments` did not place, in queue order."""
    placed = {(assignment.app_id, assignment.conversation_id) for assignment in assignments}
    return [conversation for conversation in in_queue_order(queue)
            if (conversation.app_id, conversation.conversation_id) not in placed]
