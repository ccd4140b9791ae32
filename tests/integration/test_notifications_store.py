"""The notifications database on both engines (a real SQLite file, a real PostgreSQL server):
pending notifications fold and survive a reopen, sends are recorded once, reply windows never
move back, opt-in and limit decisions hold when replicas race, privacy events erase, and a data
directory of the previous store layer keeps opening."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from pathlib import Path

from services.notifications.limits import Counter, Refusal
from services.notifications.store import MIGRATION, OptInRow, SendRow, Store
from shared import subjects
from shared.config import Rate
from shared.db import DatabaseSettings
from shared.messages.conversation import Erasure

T0 = 1_700_000_000.0
HOUR = 3600.0
DAY = 24 * HOUR


def a_send(send_id: str, conversation_id: str = "conv-1", *, user_id: str = "user-1", kind: str = "text") -> SendRow:
    return SendRow(id=send_id, notification_id=f"n-{send_id}", app_id="app-1", conversation_id=conversation_id,
                   conversation_type="personal", user_id=user_id, channel="whatsapp", integration_id="int-wa",
                   client_id="client-wa", recipient="+15550001111", recipient_info={"phone": "+15550001111"},
                   kind=kind, notice={"business": "Shop", "unread_count": 2}, status="published", error_code=None)


def an_optin(optin_id: str, *, user_id: str = "user-1", destination: str = "dest-1", now: float = T0,
             channel: str = "twilio", app_id: str = "app-1") -> OptInRow:
    return OptInRow(id=optin_id, app_id=app_id, user_id=user_id, conversation_id="conv-1", channel=channel,
                    address="+15550002222", integration_id="int-sms", source_integration_id=None, status="pending",
                    code_hash=f"hash-{optin_id}", code_expires_at=now + 600, attempts=0, linked=False,
                    created_at=now, destination=destination)


async def schedule(store: Store, message_id: str, *, conversation_id: str = "conv-1", at: float = T0,
                   notification_id: str = "n-1") -> object:
    return await store.schedule(app_id="app-1", conversation_id=conversation_id, conversation_type="personal",
                                user_id="user-1", message_id=message_id, text=f"text of {message_id}", at=at,
                                delay=300.0, new_notification_id=notification_id)


async def test_pending_notifications_fold_fire_and_survive_a_reopen(database_settings: DatabaseSettings) -> None:
    store = await Store.open(database_settings)
    try:
        first = await schedule(store, "m1")
        assert first == await store.pending("conv-1")
        folded = await schedule(store, "m2", at=T0 + 60, notification_id="n-ignored")
        again = await schedule(store, "m2", at=T0 + 60, notification_id="n-ignored")  # a redelivered event
        assert folded == again
        row = await store.pending("conv-1")
        assert row is not None
        assert (row.notification_id, row.first_unread_at, row.due_at, row.unread_count, row.last_message_id,
                row.last_text, row.attempts) == ("n-1", T0, T0 + 300, 2, "m2", "text of m2", 0)
        assert isinstance(row.due_at, float) and isinstance(row.unread_count, int)
        # Two replies handed in during one turn of the loop (one group commit) both count.
        await asyncio.gather(schedule(store, "m3"), schedule(store, "m4"))
        assert (await store.pending("conv-1")).unread_count == 4  # type: ignore[union-attr]

        everything = range(subjects.PARTITIONS)
        assert await store.due(T0 + 299, everything) == []
        assert [r.conversation_id for r in await store.due(T0 + 300, everything)] == ["conv-1"]
        # Only the partitions asked for: another replica fires the others' notifications.
        mine = subjects.partition_of("conv-1")
        assert await store.due(T0 + 300, [p for p in everything if p != mine]) == []
        assert [r.conversation_id for r in await store.due(T0 + 300, [mine])] == ["conv-1"]
        await store.postpone("conv-1", "n-1", T0 + 900, failed_attempt=True)
        await store.postpone("conv-1", "n-other", T0 + 5)  # another notification's: nothing changes
        row = await store.pending("conv-1")
        assert row is not None and (row.due_at, row.attempts) == (T0 + 900, 1)

        # The customer writes from a channel: the notification goes, the window opens, at once.
        await schedule(store, "m1", conversation_id="conv-2", notification_id="n-2")
        assert await store.customer_wrote("conv-2", "client-wa", "app-1", "user-1", T0 + 10) is True
        assert await store.customer_wrote("conv-2", "client-wa", "app-1", "user-1", T0 + 5) is False
        assert await store.pending("conv-2") is None
        assert await store.last_inbound("client-wa") == T0 + 10  # a late message never moves it back
        assert await store.customer_wrote("conv-9", None, "app-1", "user-1", T0 + 20) is False
        await store.set_last_inbound("client-wa", "app-1", "user-1", T0 - DAY)  # as is (tests, operators)
        assert await store.last_inbound("client-wa") == T0 - DAY
        assert await store.last_inbound("client-nobody") is None
        assert await store.cancel("conv-2") is False
    finally:
        await store.close()

    store = await Store.open(database_settings)
    try:
        row = await store.pending("conv-1")
        assert row is not None and row.unread_count == 4
        send = a_send("ntf_1")
        await store.finish("conv-1", "n-1", send, T0 + 900)
        await store.finish("conv-1", "n-1", send, T0 + 901)  # again (a restart): one send, no error
        assert await store.pending("conv-1") is None
        assert await store.sends("conv-1") == [send]
        assert await store.cancel("conv-1") is False
    finally:
        await store.close()



async def test_sends_are_recorded_once_and_follow_their_statuses(database_settings: DatabaseSettings) -> None:
    store = await Store.open(database_settings)
    try:
        code = a_send("ntf_code", kind="code")
        await store.record_send(code, T0)
        await store.record_send(dataclasses.replace(code, status="sent"), T0 + 1)
        assert await store.get_send("ntf_code") == code
        assert await store.get_send("ntf_none") is None
        assert await store.set_send_status("ntf_code", "sent", None, T0 + 2) is True
        assert await store.set_send_status("ntf_code", "sent", None, T0 + 3) is False  # a redelivered status
        assert await store.set_send_status("ntf_code", "failed", "blocked", T0 + 4) is True
        stored = await store.get_send("ntf_code")
        assert stored is not None and (stored.status, stored.error_code) == ("failed", "blocked")
        await store.finish("conv-1", "n-none", a_send("ntf_later"), T0 + 10)  # no pending row: still recorded
        assert [s.id for s in await store.sends("conv-1")] == ["ntf_code", "ntf_later"]
        assert (await store.sends("conv-1"))[0].recipient_info == {"phone": "+15550001111"}
    finally:
        await store.close()


def counter(scope: str, key: str, *rates: Rate) -> Counter:
    return Counter(scope, key, rates)


async def test_opt_ins_pending_codes_decoys_and_their_life(database_settings: DatabaseSettings) -> None:
    store = await Store.open(database_settings)
    try:
        starts = [counter("user", "app-1:user-1", Rate(5, HOUR))]
        sends = [counter("address", "dest-1", Rate(2, HOUR)), counter("app", "app-1", Rate(100, HOUR))]

        async def start(fresh: OptInRow, now: float = T0) -> object:
            return await store.start_optin(fresh, "decoy-hash", starts=starts, sends=sends, now=now, max_attempts=3)

        sent = await start(an_optin("o1"))
        assert sent.kind == "send" and sent.optin == an_optin("o1")  # type: ignore[attr-defined]
        # The same user asks again while the code is live: their opt-in again, nothing sent.
        own = await start(an_optin("o2"))
        assert (own.kind, own.optin) == ("pending", an_optin("o1"))  # type: ignore[attr-defined]
        # Somebody else asks for the destination: a decoy, stored unsent with a code nobody has.
        decoy = await start(an_optin("o3", user_id="user-2"))
        assert decoy.kind == "pending" and decoy.optin.id == "o3"  # type: ignore[attr-defined]
        stored = await store.optin("app-1", "o3")
        assert stored is not None and (stored.code_sent, stored.code_hash) == (False, "decoy-hash")
        # The code could not be sent: the address is free for the next request, which sends.
        await store.expire_code("o1", T0 + 1)
        resent = await start(an_optin("o4", user_id="user-3"), T0 + 2)
        assert resent.kind == "send"  # type: ignore[attr-defined]
        # The destination's budget (2/h) is spent.
        await store.expire_code("o4", T0 + 3)
        refused = await start(an_optin("o5", user_id="user-4"), T0 + 4)
        assert refused.kind == "refused"  # type: ignore[attr-defined]
        assert refused.refusal == Refusal("address", int(HOUR) - 4)  # type: ignore[attr-defined]
        # The user's starts (5/h) are spent too now.
        assert (await start(an_optin("o6"), T0 + 5)).refusal.scope == "user"  # type: ignore[attr-defined]

        await store.count_attempt("o4")
        assert await store.confirm_optin("o4", T0 + 10, "client-sdk") is True
        assert await store.confirm_optin("o4", T0 + 11) is False
        confirmed = await store.optin_any("o4")
        assert confirmed is not None
        assert (confirmed.status, confirmed.attempts, confirmed.code_hash, confirmed.code_expires_at,
                confirmed.proven_by, confirmed.linked) == ("confirmed", 1, None, None, "client-sdk", False)
        assert await store.optin("app-other", "o4") is None
        assert [o.id for o in await store.unlinked_phone_optins()] == ["o4"]
        await store.mark_linked("o4")
        assert await store.unlinked_phone_optins() == []
        assert (await store.optin_any("o4")).linked is True  # type: ignore[union-attr]
        assert await store.stop_optin("o1", T0 + 20) is True
        assert await store.stop_optin("o1", T0 + 21) is False
        assert sorted(o.id for o in await store.active_optins("app-1", "twilio")) == ["o3", "o4"]
        assert [o.id for o in await store.optins("app-1", "user-1")] == ["o1"]
    finally:
        await store.close()


async def test_limits_count_in_windows_and_forget_old_hits(database_settings: DatabaseSettings) -> None:
    store = await Store.open(database_settings)
    try:
        counters = [counter("notify_address", "a", Rate(2, HOUR), Rate(3, DAY)), counter("notify_app", "app-1",
                                                                                         Rate(100, HOUR))]
        assert await store.take(counters, T0) is None
        assert await store.take(counters, T0 + 100) is None
        # Full for the hour: free once the first hit leaves the window.
        assert await store.take(counters, T0 + 200) == Refusal("notify_address", int(HOUR) - 200)
        assert await store.take(counters, T0 + HOUR + 1) is None
        # Full for the day: the oldest of the day's three must leave.
        assert await store.take(counters, T0 + 2 * HOUR + 200) == Refusal("notify_address", int(DAY - 2 * HOUR - 200))
        assert await store.take([], T0) is None
        assert await store.prune_hits(T0 + 150) == 4  # two of each counter
        assert await store.prune_hits(T0 + 150) == 0
    finally:
        await store.close()


async def test_replicas_racing_decide_opt_ins_and_replies_as_one(database_settings: DatabaseSettings) -> None:
    """Two replicas on one database: requests for one destination racing on both send one code,
    and replies to one conversation racing on both are all counted."""
    one, two = await Store.open(database_settings), await Store.open(database_settings)
    try:
        sends = [counter("address", "dest-1", Rate(10, HOUR))]
        outcomes = await asyncio.gather(*(
            (one if n % 2 else two).start_optin(an_optin(f"o{n}", user_id=f"user-{n}"), "decoy", starts=[],
                                                sends=sends, now=T0, max_attempts=3)
            for n in range(8)))
        assert sorted(o.kind for o in outcomes) == ["pending"] * 7 + ["send"]
        assert await one.db.fetchval("SELECT COUNT(*) FROM limit_hits WHERE key = $1", "dest-1") == 1
        await asyncio.gather(*((one if n % 2 else two).schedule(
            app_id="app-1", conversation_id="conv-r", conversation_type="personal", user_id="user-1",
            message_id=f"m{n}", text="t", at=T0 + n, delay=60.0, new_notification_id=f"n{n}") for n in range(6)))
        row = await one.pending("conv-r")
        assert row is not None and row.unread_count == 6
    finally:
        await one.close()
        await two.close()


async def test_privacy_events_erase_what_they_name(database_settings: DatabaseSettings) -> None:
    store = await Store.open(database_settings)
    try:
        for conversation in ("conv-1", "conv-2"):
            await schedule(store, "m1", conversation_id=conversation, notification_id=f"n-{conversation}")
            await store.record_send(a_send(f"s-{conversation}", conversation), T0)
        await store.record_send(a_send("s-late", "conv-1"), T0 + 100)
        await store.customer_wrote("conv-3", "client-wa", "app-1", "user-1", T0)
        await store.start_optin(an_optin("o1"), "decoy", starts=[], sends=[], now=T0, max_attempts=3)
        await store.record_send(a_send("s-user-2", "conv-9", user_id="user-2"), T0)

        # Messages past retention: the conversation's pending row and its older sends.
        assert await store.forget(Erasure(("conv-1",), before=T0 + 50)) == 2
        assert await store.pending("conv-1") is None
        assert [s.id for s in await store.sends("conv-1")] == ["s-late"]
        assert await store.forget(Erasure(("conv-1",), before=T0 + 50)) == 0
        # Personal information: the user's opt-ins and sends go, their pending history stays.
        assert await store.forget(Erasure(("conv-2",), user_id="user-1", delivered_only=True)) == 3
        assert await store.pending("conv-2") is not None
        assert await store.optins("app-1", "user-1") == []
        assert await store.last_inbound("client-wa") == T0
        # A deleted user: everything of theirs.
        assert await store.forget(Erasure((), user_id="user-1")) == 2
        assert await store.pending("conv-2") is None and await store.last_inbound("client-wa") is None
        assert [s.id for s in await store.sends("conv-9")] == ["s-user-2"]
    finally:
        await store.close()


async def test_a_users_data_for_an_export(database_settings: DatabaseSettings) -> None:
    store = await Store.open(database_settings)
    try:
        await store.start_optin(an_optin("o1"), "decoy", starts=[], sends=[], now=T0, max_attempts=3)
        for n in range(3):
            await store.record_send(a_send(f"s{n}"), T0 + n)
        optins, sends, truncated = await store.user_data("app-1", "user-1", 2)
        assert [(r["id"], r["address"], r["created_at"]) for r in optins] == [("o1", "+15550002222", T0)]
        assert [r["id"] for r in sends] == ["s2", "s1"] and truncated
        assert (await store.user_data("app-1", "user-1", 3))[2] is False
    finally:
        await store.close()


PREVIOUS_LAYER_VERSION = 3  # a data directory last opened before the `destination` column


async def test_a_data_directory_of_the_previous_store_layer_keeps_opening(tmp_path: Path) -> None:
    """A file written by `shared.store.open_db` (same scripts, `schema_migrations` as it made
    it): the new layer applies the missing version only and keeps the rows."""
    path = tmp_path / "notifications.db"
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL)")
    for version, script in enumerate(MIGRATION.steps[:PREVIOUS_LAYER_VERSION], start=1):
        assert isinstance(script, str)
        old.executescript(f"BEGIN; {script}; COMMIT")
        old.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (?, strftime('%s','now'))", (version,))
    old.execute("INSERT INTO optins (id, app_id, user_id, conversation_id, channel, address, integration_id, status,"
                " created_at, code_sent) VALUES ('o-old', 'app-1', 'user-1', 'conv-1', 'twilio', '+15550002222',"
                " 'int-sms', 'confirmed', ?, 1)", (T0,))
    old.execute("INSERT INTO pending (conversation_id, app_id, conversation_type, user_id, notification_id,"
                " first_unread_at, due_at, unread_count, last_message_id, last_text) VALUES ('conv-old', 'app-1',"
                " 'personal', 'user-1', 'n-old', ?, ?, 1, 'm-old', 'hi')", (T0, T0 + 300))
    old.close()
    store = await Store.open(DatabaseSettings(sqlite_path=str(path), schema="notifications"))
    try:
        assert await store.db.fetchval("SELECT MAX(version) FROM schema_migrations") == len(MIGRATION.steps) == 6
        kept = await store.optin_any("o-old")
        assert kept is not None and (kept.status, kept.destination, kept.code_sent) == ("confirmed", None, True)
        # A notification pending from before partitioning is fired by its conversation's partition holder.
        mine = subjects.partition_of("conv-old")
        assert [r.conversation_id for r in await store.due(T0 + 300, [mine])] == ["conv-old"]
        assert await store.due(T0 + 300, [p for p in range(subjects.PARTITIONS) if p != mine]) == []
    finally:
        await store.close()


async def test_pending_rows_follow_a_changed_partition_count_at_the_next_start(
        database_settings: DatabaseSettings) -> None:
    store = await Store.open(database_settings)
    conversations = [f"conv-{i}" for i in range(12)]
    try:
        for i, conversation in enumerate(conversations):
            await schedule(store, f"m{i}", conversation_id=conversation, notification_id=f"n-{i}")
        # As a deployment with another partition count wrote them.
        async with store.db.transaction() as tx:
            await tx.execute("UPDATE pending SET part = $1", subjects.MAX_PARTITIONS - 1)
        assert await store.due(T0 + 300, range(subjects.PARTITIONS)) == []
    finally:
        await store.close()
    store = await Store.open(database_settings)
    try:
        for conversation in conversations:
            due = await store.due(T0 + 300, [subjects.partition_of(conversation)], limit=100)
            assert conversation in {r.conversation_id for r in due}
        assert len(await store.due(T0 + 300, range(subjects.PARTITIONS), limit=100)) == len(conversations)
    finally:
        await store.close()
