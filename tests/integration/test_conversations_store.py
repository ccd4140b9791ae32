"""The conversations database on both engines (a real SQLite file, a real PostgreSQL server):
the inbound hot path, conversations made once even by two writers at a time, keyset paging,
merges, pending links and merges, retention, erasure, and transactions that commit together."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.conversations.store import PendingMerge, Resealed, Store
from shared import records
from shared.db import INTEGRITY_ERRORS, DatabaseSettings
from shared.sunco import ConversationRef
from tests.harness import TEST_KEYRING

APP = "a" * 24


@pytest.fixture
async def store(database_settings: DatabaseSettings) -> AsyncIterator[Store]:
    s = await Store.open(database_settings, TEST_KEYRING)
    async with s.tx():
        await s.add_app(APP, "Acme", {"maskCreditCardNumbers": True}, {}, 1.0)
        await s.add_integration("wa", APP, "whatsapp", "active", None, {}, 2.0)
    try:
        yield s
    finally:
        await s.close()


async def conversation(store: Store, user_id: str, *, default: bool = True, at: float = 10.0) -> str:
    row, _ = await store.create_personal_conversation(
        f"c-{user_id}-{at}", f"p-{user_id}-{at}", APP, user_id, None, default=default, display_name=None,
        description=None, icon_url=None, metadata=None, now=at)
    return str(row["id"])


async def inbound(store: Store, conversation_id: str, user_id: str, provider_id: str, client_id: str = "cl1",
                  at: float = 20.0, external_id: str | None = None) -> tuple[int | None, bool, bool]:
    record = await store.record_inbound(
        message_id=f"m-{provider_id}", app_id=APP, conversation_id=conversation_id, user_id=user_id,
        user_external_id=external_id, integration_id="wa", provider_message_id=provider_id, event_id=f"e-{provider_id}",
        received=at, body='{"id": "x"}', client_id=client_id, client_type="whatsapp", client_integration_id="wa",
        client_external_id="155", client_info={"phoneNumber": "+155"})
    return record.seq, record.new_client, record.joined_others


async def test_the_inbound_hot_path(store: Store) -> None:
    lookup = await store.inbound_lookup(APP, "wa", "w1")
    assert lookup.integration_known and lookup.masks_cards and lookup.duplicate is None
    assert not (await store.inbound_lookup(APP, "nope", "w1")).integration_known
    assert not (await store.inbound_lookup("unknown-app", "wa", "w1")).integration_known
    assert await store.masks_cards(APP) and not await store.masks_cards("unknown-app")
    assert await store.integration_type("wa") == "whatsapp" and await store.integration_type("nope") is None

    conv = await conversation(store, "u1")
    assert (await store.default_conversation(APP, "u1") or {})["id"] == conv
    seq, new_client, joined = await inbound(store, conv, "u1", "w1", external_id="ext-1")
    assert seq is not None and new_client and not joined
    assert await inbound(store, conv, "u1", "w1") == (None, False, False)  # stored once
    duplicate = (await store.inbound_lookup(APP, "wa", "w1")).duplicate
    assert duplicate is not None and duplicate.seq == seq and duplicate.id == "m-w1"
    participant = await store.participant(conv, "u1")
    assert participant is not None and participant["user_external_id"] == "ext-1"
    # A returning client is touched; a second client joins the others.
    later, new_client, joined = await inbound(store, conv, "u1", "w2", at=30.0)
    assert later is not None and later > seq and not new_client and not joined
    _, new_client, joined = await inbound(store, conv, "u1", "w3", client_id="cl2", at=40.0)
    assert new_client and joined
    associations = await store.associations(str(participant["id"]))
    assert [a.client_id for a in associations] == ["cl2", "cl1"]
    assert associations[0].info == {"phoneNumber": "+155"} and associations[0].last_active == 40.0
    assert associations[1].last_active == 30.0
    # A returning client's message carrying a new externalId updates the participant.
    await inbound(store, conv, "u1", "w4", at=45.0, external_id="ext-2")
    participant = await store.participant(conv, "u1")
    assert participant is not None and participant["user_external_id"] == "ext-2"
    row = await store.get_conversation(APP, conv)
    assert row is not None and row["last_updated_at"] == 45.0
    # Concurrent messages share a group commit, each stored once.
    results = await asyncio.gather(*(inbound(store, conv, "u1", f"burst-{i % 5}", at=50.0 + i) for i in range(10)))
    assert sum(seq is not None for seq, _, _ in results) == 5
    page, more = await store.messages_before(conv, None, 100)
    assert len(page) == 9 and not more and [m.seq for m in page] == sorted(m.seq for m in page)


async def test_a_default_conversation_is_made_once(store: Store, database_settings: DatabaseSettings) -> None:
    first, created = await store.create_personal_conversation(
        "c1", "p1", APP, "u1", "ext", default=True, display_name="D", description=None, icon_url=None,
        metadata={"k": 1}, now=5.0)
    assert created and first["default_user_id"] == "u1" and first["metadata"] == '{"k":1}'
    again, created = await store.create_personal_conversation(
        "c2", "p2", APP, "u1", "ext", default=True, display_name=None, description=None, icon_url=None,
        metadata=None, now=6.0)
    assert not created and again["id"] == "c1"
    extra, created = await store.create_personal_conversation(
        "c3", "p3", APP, "u1", "ext", default=False, display_name=None, description=None, icon_url=None,
        metadata=None, now=7.0)
    assert created and extra["default_user_id"] is None
    # Not the default but the user's first: it becomes the default.
    other, _ = await store.create_personal_conversation(
        "c4", "p4", APP, "u2", None, default=False, display_name=None, description=None, icon_url=None,
        metadata=None, now=8.0)
    assert other["default_user_id"] == "u2"
    # Two writers (replicas) at once, and several requests in one group commit: one conversation.
    replica = await Store.open(database_settings, TEST_KEYRING)
    try:
        made = await asyncio.gather(*(
            s.create_personal_conversation(f"r{i}", f"rp{i}", APP, "u3", None, default=True, display_name=None,
                                           description=None, icon_url=None, metadata=None, now=9.0)
            for i, s in enumerate([store, replica, store, replica])))
    finally:
        await replica.close()
    assert sum(created for _, created in made) == 1
    assert len({row["id"] for row, _ in made}) == 1
    assert len(await store.user_conversation_ids(APP, "u3")) == 1


async def test_keyset_paging(store: Store) -> None:
    for i in range(5):
        async with store.tx():
            await store.add_app(f"app{i}", f"A{i}", {}, {}, 100.0 + i // 2)  # ties on created_at
            await store.add_integration(f"i{i}", APP, "web" if i % 2 else "whatsapp", "active", None, {}, 50.0 + i)
    apps, more = await store.list_apps(None, None, 3)
    assert [a["id"] for a in apps] == [APP, "app0", "app1"] and more
    apps, more = await store.list_apps("app1", None, 3)
    assert [a["id"] for a in apps] == ["app2", "app3", "app4"] and not more
    apps, more = await store.list_apps(None, "app3", 2)
    assert [a["id"] for a in apps] == ["app1", "app2"] and more
    with pytest.raises(LookupError):
        await store.list_apps("nope", None, 3)
    webs, _ = await store.list_integrations(APP, ["web"])
    assert [i["id"] for i in webs] == ["i1", "i3"]
    some, more = await store.list_integrations(APP, ["web", "whatsapp"], after="i0", limit=2)
    assert [i["id"] for i in some] == ["i1", "i2"] and more
    everything, _ = await store.list_integrations(None)
    assert len(everything) == 6
    conv = await conversation(store, "u1")
    second = await conversation(store, "u1", default=False, at=11.0)
    mine, more = await store.list_user_conversations(APP, "u1", None, conv, 10)
    assert mine == [] and not more
    mine, more = await store.list_user_conversations(APP, "u1", conv, None, 10)
    assert [c["id"] for c in mine] == [second] and not more


async def test_keys_webhooks_and_secrets(store: Store) -> None:
    async with store.tx():
        await store.add_key("app_k1", APP, "server", "s3cret", 1.0)
        assert await store.count_keys(APP) == 1  # the transaction sees its own write
    key = await store.get_key("app_k1")
    assert key is not None and key["secret"] == "s3cret"
    assert [k["id"] for k in await store.list_keys(APP)] == ["app_k1"]
    hook = records.WebhookRecord(id="w1", app_id=APP, integration_id="wa", target="https://bot.example/hook",
                                 triggers=["conversation:message"], secret="plaintext-secret")
    async with store.tx():
        await store.add_webhook("w1", APP, "wa", records.ENCODER.encode(hook).decode(), 3.0)
    assert [w["id"] for w in await store.list_webhooks(app_id=APP)] == ["w1"]
    assert await store.get_webhook("wa", "w1") is not None
    # The key's secret is sealed already; the webhook's (written as an older version did) is not.
    assert await store.reseal_secrets(()) == Resealed(app_keys=0, integrations=0, webhooks=1)
    assert await store.reseal_secrets(()) == Resealed()
    assert await store.delete_integration("wa") == 1
    assert await store.list_webhooks() == []  # cascaded
    assert await store.delete_key(APP, "app_k1") == 1 and await store.count_keys(APP) == 0


async def test_a_transaction_commits_together_or_not_at_all(store: Store) -> None:
    conv = await conversation(store, "u1")
    with pytest.raises(RuntimeError):
        async with store.tx():
            await store.insert_message("m1", APP, conv, "business", None, None, None, "e1", 1.0, "{}")
            assert await store.message_seq(conv, "m1") is not None  # read inside: seen
            raise RuntimeError("undo")
    assert await store.message_seq(conv, "m1") is None
    with pytest.raises(RuntimeError, match="inside"):
        async with store.tx(), store.tx():
            pass
    with pytest.raises(RuntimeError, match="inside"):  # a group commit would wait for the transaction
        async with store.tx():
            await conversation(store, "u2")
    with pytest.raises(INTEGRITY_ERRORS):
        async with store.tx():
            await store.insert_message("m2", APP, "no-such-conversation", "business", None, None, None, "e2", 1.0,
                                       "{}")
    async with store.tx():
        first = await store.insert_message("m3", APP, conv, "business", None, None, None, "e3", 2.0, "{}")
        await store.touch_conversation(conv, 2.0)
        await store.add_unread(conv)
    assert first is not None
    participant = await store.participant(conv, "u1")
    assert participant is not None and participant["unread_count"] == 1


async def test_messages_and_provider_ids(store: Store) -> None:
    conv = await conversation(store, "u1")
    seqs = [await store.insert_message(f"m{i}", APP, conv, "user", "u1", "wa", f"w{i}", f"e{i}", float(i), "{}")
            for i in range(6)]
    assert await store.insert_message("m-dup", APP, conv, "user", "u1", "wa", "w0", "e", 9.0, "{}") is None
    assert all(seq is not None for seq in seqs)
    s = [int(seq or 0) for seq in seqs]
    older, more = await store.messages_before(conv, s[4], 2)
    assert [m.id for m in older] == ["m2", "m3"] and more
    newer, more = await store.messages_after(conv, s[3], 10)
    assert [m.id for m in newer] == ["m4", "m5"] and not more
    assert await store.has_messages(conv, before_seq=s[0]) is False
    assert await store.has_messages(conv, after_seq=s[4]) is True
    assert await store.has_messages(conv) is True
    found = await store.message_by_provider_id(APP, "wa", "w2")
    assert found is not None and found.id == "m2" and found.seq == s[2]
    assert (await store.get_message(APP, "m3") or found).id == "m3"
    await store.upsert_external(APP, "wa", "out-1", "m1", conv, 1.0)
    await store.upsert_external(APP, "wa", "out-1", "m2", conv, 2.0)  # a replay changes nothing
    external = await store.external(APP, "wa", "out-1")
    assert external is not None and external["message_id"] == "m1"
    assert await store.user_history(APP, "u1") == (6, 0.0)
    assert await store.user_history(APP, "nobody") == (0, None)
    assert await store.delete_message(conv, "m5") == 1
    assert await store.delete_messages(conv) == 5


async def test_merges_and_associations(store: Store) -> None:
    survivor_default = await conversation(store, "keep")
    discarded_default = await conversation(store, "gone")
    await store.insert_message("m1", APP, discarded_default, "user", "gone", None, None, "e1", 1.0, "{}")
    async with store.tx():
        moved = await store.merge_user(APP, "gone", "keep", "ext-keep")
    assert moved == [discarded_default]
    gone = await store.get_conversation(APP, discarded_default)
    assert gone is not None and gone["default_user_id"] is None  # the survivor keeps its own default
    assert sorted(await store.user_conversation_ids(APP, "keep")) == sorted([survivor_default, discarded_default])
    assert (await store.user_authored(APP, "keep", 0, 10))[0][1] == "{}"
    # A survivor without a default conversation takes the discarded one's.
    lone = await conversation(store, "lone")
    async with store.tx():
        await store.merge_user(APP, "lone", "fresh", None)
    row = await store.get_conversation(APP, lone)
    assert row is not None and row["default_user_id"] == "fresh"

    participant = await store.participant(survivor_default, "keep")
    assert participant is not None
    pid = str(participant["id"])
    assert await store.upsert_association(pid, "c1", "sdk", "web", None, None, 1.0)
    assert await store.upsert_association(pid, "c2", "whatsapp", "wa", "155", {"a": 1}, 2.0)
    assert not await store.upsert_association(pid, "c1", "sdk", "web", None, None, 3.0)
    assert [a.client_id for a in await store.associations(pid)] == ["c1", "c2"]
    other = await store.participant(discarded_default, "keep")
    assert other is not None
    await store.upsert_association(str(other["id"]), "c2", "whatsapp", "wa", "155", None, 4.0)
    async with store.tx():
        left = await store.leave_conversations(APP, "c2", except_user_id="nobody")
    assert left == [ConversationRef(id=discarded_default, type="personal"),
                    ConversationRef(id=survivor_default, type="personal")]
    async with store.tx():
        assert await store.remove_association(APP, "keep", "c1") == [survivor_default]
    assert await store.associations(pid) == []
    async with store.tx():
        await store.set_participant_external_id(APP, "keep", None)
        await store.mark_read(pid, 9.0)
        await store.set_business_last_read(survivor_default, 9.0)
    participant = await store.participant(survivor_default, "keep")
    assert participant is not None and participant["last_read"] == 9.0 and participant["user_external_id"] is None


async def test_pending_links_and_merges(store: Store) -> None:
    conv = await conversation(store, "u1")
    for expires in (100.0, 50.0):  # the second replaces the first
        await store.put_client_link(client_id="cl", app_id=APP, user_id="u1", conversation_id=conv, integration_id="wa",
                                    client_type="whatsapp", phone_number="+155", confirmation="prompt", primary=True,
                                    source_integration_id=None, created_at=1.0, expires_at=expires)
    link = await store.client_link("cl")
    assert link is not None and link["is_primary"] == 1 and link["expires_at"] == 50.0
    assert [r["client_id"] for r in await store.expired_client_links(60.0)] == ["cl"]
    assert await store.expired_client_links(10.0) == []
    assert [r["client_id"] for r in await store.user_pending_links(APP, "u1")] == ["cl"]
    assert await store.drop_client_link("cl") and not await store.drop_client_link("cl")

    pending = PendingMerge(client_id="cl", app_id=APP, surviving_user_id="u1", discarded_user_id="u2",
                           conversation_id=conv, integration_id="wa", client_type="whatsapp", code=None,
                           answer="4821", created_at=5.0, expires_at=500.0)
    assert not (await store.inbound_lookup(APP, "wa", "any")).merges_pending
    async with store.tx():
        await store.put_pending_merge(pending)
        await store.put_pending_merge(pending)
    assert (await store.inbound_lookup(APP, "wa", "any")).merges_pending  # every message looks then
    assert await store.pending_merge("cl") == pending
    assert await store.pending_merge("other") is None
    assert await store.expired_pending_merges(600.0) == [pending] and await store.expired_pending_merges(1.0) == []
    assert await store.user_pending_merges(APP, "u2") == [pending]
    async with store.tx():
        assert not await store.drop_pending_merge("cl", 6.0)  # a newer one: left alone
        assert await store.drop_pending_merge("cl", 5.0)
    assert not (await store.inbound_lookup(APP, "wa", "any")).merges_pending


async def test_retention_and_erasure(store: Store) -> None:
    old = await conversation(store, "u1", at=10.0)
    fresh = await conversation(store, "u2", at=10.0)
    for i in range(5):
        await store.insert_message(f"o{i}", APP, old, "user", "u1", "wa", f"o{i}", f"eo{i}", 10.0 + i,
                                   '{"author": {"displayName": "Ada"}}')
        await store.insert_message(f"f{i}", APP, fresh, "user", "u2", "wa", f"f{i}", f"ef{i}", 10.0 + i, "{}")
    await store.upsert_external(APP, "wa", "out-old", "o0", old, 10.0)
    async with store.tx():
        await store.touch_conversation(fresh, 1000.0)
        await store.set_app(APP, "Acme", {"conversationRetentionSeconds": 100}, {})
    assert await store.retention_settings() == [(APP, 100)]
    inactive = await store.inactive_conversations(APP, 500.0, None, 10)
    assert [r["id"] for r in inactive] == [old]
    assert await store.inactive_conversations(APP, 500.0, (float(inactive[0]["last_updated_at"]), old), 10) == []
    assert await store.has_messages_before(old, 500.0)
    async with store.tx():
        assert await store.delete_expired_messages(old, 500.0, 3) == 3
    async with store.tx():
        assert await store.delete_expired_messages(old, 500.0, 3) == 2
        assert await store.delete_expired_messages(fresh, 500.0, 3) == 0  # active since
        assert await store.delete_expired_externals(old, 500.0) == 1
    assert not await store.has_messages_before(old, 500.0)

    authored = await store.user_authored(APP, "u2", 0, 3)
    assert len(authored) == 3
    async with store.tx():
        await store.set_message_bodies([(seq, '{"anonymous": true}') for seq, _ in authored])
        await store.clear_association_info(APP, "u2")
    assert {body for _, body in await store.user_authored(APP, "u2", 0, 10)} == {'{"anonymous": true}', "{}"}
    async with store.tx():
        assert await store.delete_some_messages(fresh, 2) == 2
    ids = await store.user_conversation_ids(APP, "u2")
    async with store.tx():
        await store.delete_user_rows(APP, "u2", ids)
        await store.delete_user_rows(APP, "nobody", [])
    assert await store.get_conversation(APP, fresh) is None and await store.user_conversation_ids(APP, "u2") == []
    await store.checkpoint()
