"""The desk's logic on its store, on both engines (a real SQLite file, a real PostgreSQL server),
with the conversations service replaced by a recorder and the clock by a number.

Routing through events and actions: least busy first, a returning customer back to their last
agent, transfers, agents who fall silent past the grace period, snoozes, control leaving the desk,
erasure, and two desks (replicas) deciding at once on one database.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

import pytest

from services.desk.handlers import Actor, Desk, Snapshot, Update
from services.desk.store import AgentRow, Store, TeamRow, Ticket, TicketFilter
from shared.db import DatabaseSettings
from shared.http import ApiError
from shared.messages import conversation as conv
from shared.sunco import Author, ConversationRef, Message, SwitchboardIntegrationRef, TextContent, UserRef

APP = "app00000000000000000000a"
OTHER_APP = "app00000000000000000000b"
DESK_MEMBER = "sbi_desk"
BOT_MEMBER = "sbi_bot"


class Recorder:
    """The conversations service: records the switchboard actions, knows every customer."""

    def __init__(self) -> None:
        self.actions: list[tuple[str, str]] = []
        self.customers: dict[str, tuple[str, str]] = {}

    async def switchboard(self, app_id: str, conversation_id: str, action: str,
                          metadata: dict[str, Any] | None = None, target: str | None = None) -> None:
        self.actions.append((conversation_id, action))

    async def snapshot(self, app_id: str, conversation_id: str) -> Snapshot:
        user, channel = self.customers.get(conversation_id, (f"user-{conversation_id}", "whatsapp"))
        return Snapshot(user_id=user, channel=channel)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Members:
    """Every app's switchboard: a bot and the desk."""

    async def member_type(self, _app_id: str, member_id: str) -> str | None:
        return {DESK_MEMBER: "desk", BOT_MEMBER: "custom"}.get(member_id)

    def has_desk(self, _app_id: str) -> bool:
        return True


def make_desk(store: Store, clock: Clock, updates: list[Update] | None = None,
              recorder: Recorder | None = None) -> Desk:
    async def publish(update: Update) -> None:
        if updates is not None:
            updates.append(update)

    return Desk(store, recorder or Recorder(), publish, Members(), grace_seconds=60.0, clock=clock)


def control_event(conversation_id: str, member: str | None, at: float, app_id: str = APP,
                  metadata: dict[str, Any] | None = None) -> conv.SwitchboardControlled:
    ref = None if member is None else SwitchboardIntegrationRef(id=member)
    return conv.SwitchboardControlled(
        id=f"evt-{conversation_id}-{at}", app_id=app_id, conversation_id=conversation_id, created_at=at,
        action="passControl", conversation=ConversationRef(id=conversation_id, type="personal",
                                                           active_switchboard_integration=ref),
        metadata=metadata)


async def add_agent(desk: Desk, name: str, *, capacity: int = 2, skills: tuple[str, ...] = (),
                    app_id: str = APP, role: str = "agent") -> AgentRow:
    agent = AgentRow(id=f"agent-{name}", app_id=app_id, email=f"{name}@example.com", display_name=name,
                     role=role, password_hash=None, capacity=capacity, presence="offline", skills=list(skills),
                     channels=[], disabled=False, last_assigned_at=None, last_seen_at=None, created_at=desk.clock())
    return await desk.create_agent(Actor(app_id=app_id), agent)


async def online(desk: Desk, agent: AgentRow) -> None:
    await desk.set_presence(Actor(app_id=agent.app_id), agent.id, "online")


async def holder(desk: Desk, conversation_id: str) -> str | None:
    ticket = await desk.store.ticket(conversation_id)
    assert ticket is not None
    return ticket.agent_id


@pytest.fixture
async def store(database_settings: DatabaseSettings) -> Any:
    opened = await Store.open(database_settings)
    try:
        yield opened
    finally:
        await opened.close()


async def test_least_busy_returning_customer_and_agents_leaving(store: Store) -> None:
    clock = Clock()
    updates: list[Update] = []
    desk = make_desk(store, clock, updates)
    ada, bob = await add_agent(desk, "ada"), await add_agent(desk, "bob")
    await online(desk, ada)
    clock.now += 1
    await online(desk, bob)

    # Least busy first, round robin among equals (never assigned first, then assigned longest ago).
    for n in range(4):
        clock.now += 1
        await desk.handle_event(control_event(f"c{n}", DESK_MEMBER, clock.now))
    holders = [await holder(desk, f"c{n}") for n in range(4)]
    assert sorted(holders) == [ada.id, ada.id, bob.id, bob.id]  # type: ignore[type-var]
    assert holders[0] != holders[1]
    # Both full (capacity 2): the fifth waits.
    await desk.handle_event(control_event("c4", DESK_MEMBER, clock.now + 1))
    assert await holder(desk, "c4") is None
    assert any(u.kind == "ticket" and u.conversation_id == "c0" for u in updates)

    # Resolving frees a slot: the waiting one is routed at once; control goes back to the switchboard.
    first_holder = holders[0]
    assert first_holder is not None
    resolver = Actor(app_id=APP, agent=await store.agent(first_holder))
    await desk.set_status(resolver, "c0", "resolved")
    assert await holder(desk, "c4") == first_holder
    assert ("c0", "releaseControl") in desk.conversations.actions  # type: ignore[attr-defined]

    # Ada falls silent past the grace period: offline, and her open conversations go back to the
    # queue keeping their place; Bob is full, so they wait.
    ada_held = [c for c in ("c1", "c2", "c3", "c4") if await holder(desk, c) == ada.id]
    clock.now += 30
    await desk.heard_from(bob)
    clock.now += 40  # Ada last heard from 70 s ago, Bob 40 s ago (grace 60 s)
    await desk.sweep()
    assert (await store.agent(ada.id)).presence == "offline"  # type: ignore[union-attr]
    assert (await store.agent(bob.id)).presence == "online"  # type: ignore[union-attr]
    for conversation_id in ada_held:
        ticket = await store.ticket(conversation_id)
        assert ticket is not None and ticket.queued and ticket.agent_id is None
        assert ticket.last_agent_id == ada.id

    # Ada returns: her customers come back to her (returning customer), before anyone else.
    await online(desk, ada)
    for conversation_id in ada_held:
        ticket = await store.ticket(conversation_id)
        assert ticket is not None and ticket.agent_id == ada.id and ticket.assign_reason == "returning"


async def test_transfer_skills_snooze_leave_and_reopen(store: Store) -> None:
    clock = Clock()
    desk = make_desk(store, clock)
    ada, bob = await add_agent(desk, "ada", skills=("german",)), await add_agent(desk, "bob")
    carl = await add_agent(desk, "carl", role="admin")
    team = await desk.save_team(Actor(app_id=APP), TeamRow(id="team-billing", app_id=APP, name="Billing", skills=[],
                                                           channels=[], members=[bob.id], created_at=clock.now),
                                new=True)
    for agent in (ada, bob, carl):
        await online(desk, agent)

    # Skills from the bot's metadata: only Ada speaks German.
    await desk.handle_event(control_event("de", DESK_MEMBER, clock.now, metadata={"desk:skills": "German"}))
    assert await holder(desk, "de") == ada.id
    # A team from the metadata, by name: only Bob is in Billing.
    await desk.handle_event(control_event("bill", DESK_MEMBER, clock.now, metadata={"desk:team": "Billing"}))
    assert await holder(desk, "bill") == bob.id

    # Ada transfers hers to Carl (an agent, online with room): his at once.
    ada_actor = Actor(app_id=APP, agent=ada)
    moved = await desk.transfer(ada_actor, "de", to_agent_id=carl.id, to_team_id=None)
    assert moved.agent_id == carl.id and moved.last_agent_id == carl.id
    # Bob cannot move Carl's conversation (not his, not an admin); Carl can send it to a team.
    with pytest.raises(ApiError) as refused:
        await desk.transfer(Actor(app_id=APP, agent=bob), "de", to_agent_id=None, to_team_id=team.id)
    assert refused.value.status == 403
    moved = await desk.transfer(Actor(app_id=APP, agent=carl), "de", to_agent_id=None, to_team_id=team.id)
    # Nobody in Billing speaks German: it waits for the team (never back to Carl, who gave it away).
    assert moved.agent_id is None and moved.queued and moved.team_id == team.id
    # Ada joins Billing: the next routing pass gives it to her.
    await desk.save_team(Actor(app_id=APP), TeamRow(id=team.id, app_id=APP, name="Billing", skills=[], channels=[],
                                                    members=[bob.id, ada.id], created_at=team.created_at), new=False)
    assert await holder(desk, "de") == ada.id

    # Snoozed until later: it wakes when due, still Bob's while he is online.
    bob_actor = Actor(app_id=APP, agent=bob)
    await desk.set_status(bob_actor, "bill", "snoozed", clock.now + 600)
    await desk.sweep()
    assert (await store.ticket("bill")).status == "snoozed"  # type: ignore[union-attr]
    clock.now += 601
    await desk.heard_from(bob)
    await desk.heard_from(ada)
    await desk.heard_from(carl)
    await desk.sweep()
    woken = await store.ticket("bill")
    assert woken is not None and woken.status == "open" and woken.agent_id == bob.id

    # The bot takes control back: the desk's part ends and Bob's slot is free.
    await desk.handle_event(control_event("bill", BOT_MEMBER, clock.now))
    ended = await store.ticket("bill")
    assert ended is not None and ended.status == "resolved" and not ended.queued
    # The desk gets it again later: the customer's last agent, Bob, takes it back.
    clock.now += 10
    await desk.handle_event(control_event("bill", DESK_MEMBER, clock.now))
    again = await store.ticket("bill")
    assert again is not None and again.status == "open" and again.agent_id == bob.id
    assert again.assign_reason == "returning"

    # Erasure of the customer: the desk forgets the conversation and its notes.
    await desk.add_note(bob_actor, "bill", "asked for a refund")
    await desk.handle_event(conv.UserRemoved(
        id="evt-erase", app_id=APP, conversation_id="bill", created_at=clock.now,
        user=UserRef(id="user-bill"), conversation_ids=["bill"]))
    assert await store.ticket("bill") is None
    assert await store.notes("bill") == []


async def test_other_apps_and_roles(store: Store) -> None:
    clock = Clock()
    desk = make_desk(store, clock)
    ada = await add_agent(desk, "ada")
    stranger = await add_agent(desk, "eve", app_id=OTHER_APP, role="admin")
    await online(desk, ada)
    await desk.handle_event(control_event("mine", DESK_MEMBER, clock.now))
    eve = Actor(app_id=OTHER_APP, agent=stranger)
    for action in (desk.ticket_for(eve, "mine"), desk.add_note(eve, "mine", "hi"),
                   desk.set_status(eve, "mine", "resolved"), desk.accept(eve, "mine"),
                   desk.agent_for(eve, ada.id), desk.set_presence(eve, ada.id, "offline")):
        with pytest.raises(ApiError) as refused:
            await action
        assert refused.value.status == 404
    with pytest.raises(ApiError) as refused:
        await desk.create_agent(Actor(app_id=APP, agent=ada), AgentRow(
                id="agent-x", app_id=APP, email="x@example.com", display_name="X", role="admin", password_hash=None,
                capacity=1, presence="offline", skills=[], channels=[], disabled=False, last_assigned_at=None,
                last_seen_at=None, created_at=clock.now))
    assert refused.value.status == 403  # an agent creating agents
    assert await holder(desk, "mine") == ada.id


async def test_two_desks_on_one_database_decide_each_conversation_once(
        store: Store, database_settings: DatabaseSettings) -> None:
    clock = Clock()
    second_store = await Store.open(database_settings)
    try:
        first, second = make_desk(store, clock), make_desk(second_store, clock)
        agents = [await add_agent(first, f"a{i}", capacity=3) for i in range(4)]
        for agent in agents:
            await online(first, agent)
        # 12 conversations reach the two replicas at once (each event once, split between them).
        await asyncio.gather(*((first if n % 2 else second).handle_event(control_event(f"k{n}", DESK_MEMBER,
                                                                                       clock.now + n))
                               for n in range(12)))
        holders = [await holder(first, f"k{n}") for n in range(12)]
        assert None not in holders
        loads = {agent.id: holders.count(agent.id) for agent in agents}
        assert sorted(loads.values()) == [3, 3, 3, 3]
        # Two replicas accepting one waiting conversation for two agents: one wins.
        await asyncio.gather(*(first.set_presence(Actor(app_id=APP), a.id, "online") for a in agents))
        extra = await add_agent(first, "late", capacity=1)
        await online(first, extra)
        await first.handle_event(control_event("k-last", DESK_MEMBER, clock.now + 100,
                                               metadata={"desk:skills": "nobody"}))
        other = await add_agent(first, "later", capacity=1)
        await online(first, other)
        results = await asyncio.gather(first.accept(Actor(app_id=APP, agent=extra), "k-last"),
                                       second.accept(Actor(app_id=APP, agent=other), "k-last"),
                                       return_exceptions=True)
        assert sum(1 for r in results if isinstance(r, ApiError) and r.status == 409) == 1
        assert await holder(first, "k-last") in {extra.id, other.id}
    finally:
        await second_store.close()


async def test_concurrent_writers_never_undo_an_assignment_and_snoozes_leave_the_queue(store: Store) -> None:
    clock = Clock()
    recorder = Recorder()
    desk = make_desk(store, clock, recorder=recorder)
    ada = await add_agent(desk, "ada", capacity=5)
    await online(desk, ada)
    # Waiting for a skill nobody has: Ada takes it by hand while a business message and a label
    # change land at the same moment; none of them may write the assignment away.
    await desk.handle_event(control_event("race", DESK_MEMBER, clock.now, metadata={"desk:skills": "klingon"}))
    business = conv.MessageCreated(
        id="evt-business", app_id=APP, conversation_id="race", created_at=clock.now + 1,
        conversation=ConversationRef(id="race", type="personal",
                                     active_switchboard_integration=SwitchboardIntegrationRef(id=DESK_MEMBER)),
        message=Message(id="m1", received="2026-12-07T00:00:00.000Z", author=Author(type="business"),
                        content=TextContent(text="we are on it")), cursor=2, user_id="user-race")
    ada_actor = Actor(app_id=APP, agent=ada)
    await asyncio.gather(desk.accept(ada_actor, "race"), desk.handle_event(business),
                         desk.set_labels(ada_actor, "race", ["urgent"]))
    ticket = await store.ticket("race")
    assert ticket is not None and ticket.agent_id == ada.id and not ticket.queued
    assert ticket.labels == ["urgent"] and ticket.last_message_text == "we are on it"
    assert ticket.assign_reason == "manual"

    # Snoozing a waiting conversation takes it out of the queue until its time.
    await desk.handle_event(control_event("later", DESK_MEMBER, clock.now, metadata={"desk:skills": "klingon"}))
    await desk.set_status(Actor(app_id=APP), "later", "snoozed", clock.now + 60)
    bob = await add_agent(desk, "bob", skills=("klingon",))
    await online(desk, bob)
    snoozed = await store.ticket("later")
    assert snoozed is not None and snoozed.status == "snoozed" and snoozed.agent_id is None and not snoozed.queued
    clock.now += 61
    for agent in (ada, bob):
        await desk.heard_from(agent)
    await desk.sweep()
    assert await holder(desk, "later") == bob.id

    # Reopening a resolved conversation takes control back for the desk.
    await desk.set_status(Actor(app_id=APP, agent=bob), "later", "resolved")
    await desk.set_status(Actor(app_id=APP, agent=bob), "later", "open")
    assert recorder.actions[-2:] == [("later", "releaseControl"), ("later", "passControl")]


async def test_labels_match_literally_and_teams_keep_unique_names(store: Store) -> None:
    clock = Clock()
    desk = make_desk(store, clock)
    admin = Actor(app_id=APP)
    for n, labels in enumerate((["café"], ["50%_off"], ["50xxoff"], ['say "hi"\\'])):
        await desk.handle_event(control_event(f"l{n}", DESK_MEMBER, clock.now))
        await desk.set_labels(admin, f"l{n}", labels)
    for label, expected in (("café", ["l0"]), ("50%_off", ["l1"]), ('say "hi"\\', ["l3"]), ("50", [])):
        found = await store.tickets(APP, TicketFilter(label=label), before=None, limit=10)
        assert [t.conversation_id for t in found] == expected, label
    first = await desk.save_team(admin, TeamRow(id="t1", app_id=APP, name="Sales", skills=[], channels=[], members=[],
                                                created_at=clock.now), new=True)
    await desk.save_team(admin, TeamRow(id="t2", app_id=APP, name="Support", skills=[], channels=[], members=[],
                                        created_at=clock.now), new=True)
    with pytest.raises(ApiError) as refused:
        await desk.save_team(admin, TeamRow(id="t2", app_id=APP, name="Sales", skills=[], channels=[], members=[],
                                            created_at=clock.now), new=False)
    assert refused.value.status == 409 and first.name == "Sales"


async def test_privacy_events_reach_previews_notes_and_every_ticket_of_the_user(store: Store) -> None:
    clock = Clock()
    updates: list[Update] = []
    desk = make_desk(store, clock, updates)
    ada = await add_agent(desk, "ada")
    await online(desk, ada)
    recorder = desk.conversations
    assert isinstance(recorder, Recorder)
    for name in ("p1", "p2", "p3"):
        recorder.customers[name] = ("user-pat", "whatsapp")
        await desk.handle_event(control_event(name, DESK_MEMBER, clock.now))
        await store.note_message(name, clock.now, f"secret {name}", "user", None, None)
        await desk.add_note(Actor(app_id=APP, agent=ada), name, "called them")
    seen = len(updates)
    await desk.handle_event(conv.MessagesExpired(id="e-exp", app_id=APP, conversation_id="p1",
                                                 created_at=clock.now + 1, before=clock.now + 1,
                                                 conversation=ConversationRef(id="p1", type="personal")))
    assert (await store.ticket("p1")).last_message_text is None  # type: ignore[union-attr]
    # Open agent screens are told: the ticket as it is now, without the preview.
    shown = [u.data for u in updates[seen:] if u.kind == "ticket" and u.conversation_id == "p1"]
    assert len(shown) == 1 and shown[0] is not None and "secret p1" not in json.dumps(shown[0])
    # One deleted message takes the preview when it is the latest; an older one leaves it.
    await store.note_message("p3", clock.now + 2, "secret p3 again", "user", None, None)
    for at, expected in ((clock.now + 1, "secret p3 again"), (clock.now + 2, None)):
        await desk.handle_event(conv.MessageDeleted(
            id=f"e-del-{at}", app_id=APP, conversation_id="p3", created_at=clock.now + 3,
            conversation=ConversationRef(id="p3", type="personal"), message_id="m", message_event_id="e",
            message_at=at))
        assert (await store.ticket("p3")).last_message_text == expected  # type: ignore[union-attr]
    await desk.handle_event(conv.PersonalInformationDeleted(
        id="e-pii", app_id=APP, conversation_id="p2", created_at=clock.now, user_id="user-pat",
        conversation_ids=["p2"]))
    assert (await store.ticket("p2")).last_message_text is None  # type: ignore[union-attr]
    assert await store.notes("p2") == [] and len(await store.notes("p3")) == 1
    # The user is deleted: every conversation the desk had of theirs goes, named or not.
    await desk.handle_event(conv.UserRemoved(id="e-rm", app_id=APP, conversation_id="p1", created_at=clock.now,
                                             user=UserRef(id="user-pat"), conversation_ids=["p1"]))
    for name in ("p1", "p2", "p3"):
        assert await store.ticket(name) is None


async def test_a_team_serving_a_channel_gets_its_new_conversations(store: Store) -> None:
    clock = Clock()
    recorder = Recorder()
    desk = make_desk(store, clock, recorder=recorder)
    ada, bob = await add_agent(desk, "ada"), await add_agent(desk, "bob")
    await desk.save_team(Actor(app_id=APP), TeamRow(id="t-sms", app_id=APP, name="SMS desk", skills=[],
                                                    channels=["twilio"], members=[bob.id], created_at=clock.now),
                         new=True)
    await online(desk, ada)
    recorder.customers["text"] = ("user-text", "twilio")
    recorder.customers["chat"] = ("user-chat", "whatsapp")
    await desk.handle_event(control_event("text", DESK_MEMBER, clock.now))
    await desk.handle_event(control_event("chat", DESK_MEMBER, clock.now))
    texting = await store.ticket("text")
    assert texting is not None and texting.team_id == "t-sms" and texting.agent_id is None  # Ada is not in it
    assert await holder(desk, "chat") == ada.id
    await online(desk, bob)
    assert await holder(desk, "text") == bob.id


async def test_two_admins_editing_one_agent_at_once_do_not_undo_each_other(store: Store) -> None:
    clock = Clock()
    desk = make_desk(store, clock)
    ada = await add_agent(desk, "ada")
    read_by_first = await store.agent(ada.id)
    read_by_second = await store.agent(ada.id)
    assert read_by_first is not None and read_by_second is not None
    admin = Actor(app_id=APP)
    await desk.update_agent(admin, replace(read_by_first, disabled=True), drop_sessions=True)
    with pytest.raises(ApiError) as refused:  # built on a stale read: it would have enabled her again
        await desk.update_agent(admin, replace(read_by_second, capacity=9), drop_sessions=False)
    assert refused.value.status == 409
    current = await store.agent(ada.id)
    assert current is not None and current.disabled and current.capacity == ada.capacity and current.version == 1
    # Nobody online with a free seat: a conversation waits without a routing pass over the queue.
    await desk.handle_event(control_event("waits", DESK_MEMBER, clock.now))
    assert await holder(desk, "waits") is None


async def test_messages_update_the_inbox_preview_in_order_and_only_of_tickets(store: Store) -> None:
    clock = Clock()
    desk = make_desk(store, clock)
    recorder = desk.conversations
    assert isinstance(recorder, Recorder)
    recorder.customers["n1"] = ("user-n", "whatsapp")
    await desk.handle_event(control_event("n1", DESK_MEMBER, clock.now))
    assert await store.note_message("unknown", clock.now, "hi", "user", None, None) is None
    # Each answers the ticket as it wrote it.
    first = await store.note_message("n1", clock.now + 2, "second", "business", None, None)
    second = await store.note_message("n1", clock.now + 3, "third", "user", "messenger", "user-n")
    late = await store.note_message("n1", clock.now + 1, "older", "user", None, None)
    assert first is not None and first.last_message_text == "second" and first.last_author == "business"
    assert second is not None and second.last_message_text == "third" and second.channel == "messenger"
    assert late is None  # an older message never overwrites a newer preview
    ticket = await store.ticket("n1")
    assert ticket is not None and ticket.last_message_text == "third" and ticket.last_message_at == clock.now + 3


async def handled_by_ada(store: Store, clock: Clock, conversation_id: str, user_id: str) -> tuple[Desk, AgentRow]:
    """A desk whose only agent, Ada, was routed the customer's conversation."""
    desk = make_desk(store, clock)
    ada = await add_agent(desk, "ada")
    await online(desk, ada)
    recorder = desk.conversations
    assert isinstance(recorder, Recorder)
    recorder.customers[conversation_id] = (user_id, "whatsapp")
    await desk.handle_event(control_event(conversation_id, DESK_MEMBER, clock.now))
    assert await holder(desk, conversation_id) == ada.id
    return desk, ada


def customer_says(conversation_id: str, user_id: str, text: str, at: float) -> conv.MessageCreated:
    """The customer's message in a conversation the desk holds."""
    return conv.MessageCreated(
        id=f"evt-{text}", app_id=APP, conversation_id=conversation_id, created_at=at,
        conversation=ConversationRef(id=conversation_id, type="personal",
                                     active_switchboard_integration=SwitchboardIntegrationRef(id=DESK_MEMBER)),
        message=Message(id=f"m-{text}", received="2026-12-07T00:00:00.000Z",
                        author=Author(type="user", user_id=user_id), content=TextContent(text=text)),
        cursor=1, user_id=user_id)


async def test_a_customer_writing_reopens_a_pending_conversation_and_otherwise_moves_the_preview(
        store: Store) -> None:
    clock = Clock()
    desk, ada = await handled_by_ada(store, clock, "w1", "user-w")
    await desk.handle_event(customer_says("w1", "user-w", "still there?", clock.now + 1))
    handled = await store.ticket("w1")
    assert handled is not None and handled.status == "open" and handled.agent_id == ada.id
    assert handled.last_message_text == "still there?"
    await desk.set_status(Actor(app_id=APP, agent=ada), "w1", "pending")
    await desk.handle_event(customer_says("w1", "user-w", "hello again", clock.now + 2))
    reopened = await store.ticket("w1")
    assert reopened is not None and reopened.status == "open" and reopened.agent_id == ada.id
    assert reopened.last_message_text == "hello again"


async def test_a_customer_message_refused_as_unhandled_still_reaches_a_conversation_assigned_meanwhile(
        store: Store) -> None:
    # The conditional write found the ticket pending; before the ticket was read, an agent
    # opened it for themselves: the message is still the inbox's preview.
    clock = Clock()
    desk, ada = await handled_by_ada(store, clock, "r1", "user-r")
    ada_actor = Actor(app_id=APP, agent=ada)
    await desk.set_status(ada_actor, "r1", "pending")
    real_note = store.note_message

    async def note_then_open(*args: Any, **kwargs: Any) -> Ticket | None:
        written = await real_note(*args, **kwargs)
        if kwargs.get("only_while_handled"):
            await desk.set_status(ada_actor, "r1", "open")
        return written

    store.note_message = note_then_open  # type: ignore[method-assign]
    await desk.handle_event(customer_says("r1", "user-r", "are you there?", clock.now + 5))
    ticket = await store.ticket("r1")
    assert ticket is not None and ticket.status == "open" and ticket.last_message_text == "are you there?"
