"""identity's phone-number clients (direct linking): one WhatsApp number stays one client whether
its messages carry a BSUID, a wa_id or both, and whether it was first known from a message or
from the business's `matchCriteria.phoneNumber`; twilio numbers are keyed by E.164. On both
engines: a SQLite file, a real PostgreSQL server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from services.identity.handlers import IdentityHandlers
from services.identity.store import MIGRATION, IdentityStore
from shared.db import DatabaseSettings, Migration, open_database
from shared.messages import identity as msgs

APP, WA, SMS = "a" * 24, "b" * 24, "c" * 24


@pytest.fixture
async def h(database_settings: DatabaseSettings) -> AsyncIterator[IdentityHandlers]:
    store = await IdentityStore.open(database_settings)
    try:
        yield IdentityHandlers(store)
    finally:
        await store.close()


def resolve(key: str, wa_id: str | None = None, integration: str = WA,
            client_type: str = "whatsapp") -> msgs.ResolveClient:
    info = {"wa_id": wa_id} if wa_id else {}
    return msgs.ResolveClient(app_id=APP, integration_id=integration, client_type=client_type,  # type: ignore[arg-type]
                              channel_user_id=key, info=info)


async def new_user(h: IdentityHandlers, external_id: str) -> str:
    reply = await h.handle(msgs.CreateUser(app_id=APP, external_id=external_id))
    assert isinstance(reply, msgs.UserReply)
    return reply.user.id


async def test_a_number_linked_by_phone_is_the_client_its_bsuid_messages_resolve_to(h: IdentityHandlers) -> None:
    user_id = await new_user(h, "alice")
    attached = await h.handle(msgs.AttachPhoneClient(app_id=APP, user_id=user_id, integration_id=WA,
                                                     client_type="whatsapp", phone_number="+15551230001",
                                                     status="pending"))
    assert isinstance(attached, msgs.PhoneClientAttached) and attached.client_created
    assert attached.client.external_id == "15551230001" and attached.client.status == "pending"
    # Meta now sends the BSUID (and the wa_id): same client, and the BSUID alone finds it afterwards.
    first = await h.handle(resolve("US.1349000001", wa_id="15551230001"))
    assert isinstance(first, msgs.Resolved) and first.client.id == attached.client.id
    assert first.user.id == user_id and first.client.info and first.client.info["wa_id"] == "15551230001"
    h._resolved.clear()
    alone = await h.handle(resolve("US.1349000001"))
    assert isinstance(alone, msgs.Resolved) and alone.client.id == attached.client.id and not alone.client_created
    by_number = await h.handle(resolve("15551230001"))
    assert isinstance(by_number, msgs.Resolved) and by_number.client.id == attached.client.id


async def test_linking_a_number_that_wrote_before_moves_its_client_without_merging(h: IdentityHandlers) -> None:
    stranger = await h.handle(resolve("US.1349000002", wa_id="15551230002"))
    assert isinstance(stranger, msgs.Resolved) and stranger.user_created
    user_id = await new_user(h, "bob")
    attached = await h.handle(msgs.AttachPhoneClient(app_id=APP, user_id=user_id, integration_id=WA,
                                                     client_type="whatsapp", phone_number="+1 555 123 0002"))
    assert isinstance(attached, msgs.PhoneClientAttached)
    assert attached.client.id == stranger.client.id and attached.client.status == "active"
    assert attached.previous_user is not None and attached.previous_user.id == stranger.user.id
    # The former owner still exists (no merge), without the client.
    former = await h.handle(msgs.ListClients(app_id=APP, user_id_or_external_id=stranger.user.id))
    assert isinstance(former, msgs.ClientsReply) and former.clients == []
    again = await h.handle(resolve("US.1349000002", wa_id="15551230002"))
    assert isinstance(again, msgs.Resolved) and again.user.id == user_id
    # The user's own active client stays active when linked again with a confirmation.
    relinked = await h.handle(msgs.AttachPhoneClient(app_id=APP, user_id=user_id, integration_id=WA,
                                                     client_type="whatsapp", phone_number="+15551230002",
                                                     status="pending"))
    assert isinstance(relinked, msgs.PhoneClientAttached)
    assert relinked.client.status == "active" and relinked.previous_user is None


async def test_twilio_numbers_are_keyed_by_e164_and_clients_can_be_removed(h: IdentityHandlers) -> None:
    user_id = await new_user(h, "carol")
    attached = await h.handle(msgs.AttachPhoneClient(app_id=APP, user_id=user_id, integration_id=SMS,
                                                     client_type="twilio", phone_number="+15551230003"))
    assert isinstance(attached, msgs.PhoneClientAttached) and attached.client.external_id == "+15551230003"
    sms = await h.handle(resolve("+15551230003", integration=SMS, client_type="twilio"))
    assert isinstance(sms, msgs.Resolved) and sms.client.id == attached.client.id
    removed = await h.handle(msgs.RemoveClient(app_id=APP, user_id_or_external_id="carol",
                                               client_id=attached.client.id))
    assert isinstance(removed, msgs.ClientReply) and removed.client.id == attached.client.id
    missing = await h.handle(msgs.RemoveClient(app_id=APP, user_id_or_external_id="carol",
                                               client_id=attached.client.id))
    assert isinstance(missing, msgs.IdentityError) and missing.status == 404
    fresh = await h.handle(resolve("+15551230003", integration=SMS, client_type="twilio"))
    assert isinstance(fresh, msgs.Resolved) and fresh.client_created and fresh.user.id != user_id


async def test_the_migration_gives_existing_bsuid_clients_their_wa_id_alias(
        database_settings: DatabaseSettings) -> None:
    # A database from before the alias table.
    db = await open_database(database_settings, Migration(MIGRATION.steps[:3]))
    await db.execute("INSERT INTO users (id, app_id, signed_up_at) VALUES ('u1', $1, 0)", APP)
    await db.execute(
        "INSERT INTO clients (id, app_id, user_id, type, status, integration_id, external_id, info, linked_at,"
        " last_seen) VALUES ('c1', $1, 'u1', 'whatsapp', 'active', $2, 'US.1349000004', $3, 0, 0)",
        APP, WA, json.dumps({"wa_id": "15551230004", "bsuid": "US.1349000004"}))
    await db.close()
    store = await IdentityStore.open(database_settings)
    found = await store.find_client(APP, WA, "15551230004")
    assert found is not None and found[1].id == "c1"
    await store.close()


async def test_the_migration_forgets_the_first_message_kept_as_a_clients_raw(
        database_settings: DatabaseSettings) -> None:
    # A database from before raw was dropped.
    db = await open_database(database_settings, Migration(MIGRATION.steps[:4]))
    await db.execute("INSERT INTO users (id, app_id, signed_up_at) VALUES ('u1', $1, 0)", APP)
    await db.execute(
        "INSERT INTO clients (id, app_id, user_id, type, status, integration_id, external_id, raw, linked_at,"
        " last_seen) VALUES ('c1', $1, 'u1', 'whatsapp', 'active', $2, '15551230005', $3, 0, 0)",
        APP, WA, json.dumps({"text": {"body": "my first message"}}))
    await db.close()
    store = await IdentityStore.open(database_settings)
    found = await store.find_client(APP, WA, "15551230005")
    await store.close()
    assert found is not None and found[1].raw is None


async def test_the_migration_leaves_a_shared_push_token_with_the_device_seen_last(
        database_settings: DatabaseSettings) -> None:
    # A database from before one token per app was enforced, two installs sharing one token.
    unique_tokens = next(i for i, step in enumerate(MIGRATION.steps)
                         if isinstance(step, str) and "DROP INDEX devices_push_token" in step)
    db = await open_database(database_settings, Migration(MIGRATION.steps[:unique_tokens]))
    await db.execute("INSERT INTO users (id, app_id, signed_up_at) VALUES ('u1', $1, 0)", APP)
    for client, seen in (("c1", 10.0), ("c2", 20.0)):
        await db.execute(
            "INSERT INTO clients (id, app_id, user_id, type, status, integration_id, external_id, linked_at,"
            " last_seen) VALUES ($1, $2, 'u1', 'sdk', 'active', 'web', $1, 0, 0)", client, APP)
        await db.execute(
            "INSERT INTO devices (id, app_id, user_id, client_id, integration_id, type, guid, status, push_token,"
            " last_seen) VALUES ($1, $2, 'u1', $3, 'web', 'android', $3, 'active', 'tok', $4)",
            f"d-{client}", APP, client, seen)
    await db.close()
    store = await IdentityStore.open(database_settings)
    try:
        devices = {d.client_id: d for d in await store.list_devices(APP, "u1")}
    finally:
        await store.close()
    assert devices["c2"].push_notification_token == "tok" and devices["c2"].status == "active"
    assert devices["c1"].push_notification_token is None and devices["c1"].status == "inactive"
