"""identity's store on both engines (a SQLite file, a real PostgreSQL server): users unique per
externalId, one client per channel identity however many transactions race to create it, devices
and their push tokens, merges and their audit log, erasure, and the SDK login's three outcomes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.identity.handlers import IdentityHandlers
from services.identity.login import identify, login_user, user_by_external_id
from services.identity.store import ChannelIdentity, Conflict, IdentityStore, Resolution, UserGone
from shared.db import DatabaseSettings
from shared.messages import identity as msgs
from shared.sunco import Profile

APP, WA, WEB = "a" * 24, "b" * 24, "d" * 24


@pytest.fixture
async def store(database_settings: DatabaseSettings) -> AsyncIterator[IdentityStore]:
    s = await IdentityStore.open(database_settings)
    try:
        yield s
    finally:
        await s.close()


def identity(key: str, *, client_type: str = "whatsapp", integration: str = WA, wa_id: str | None = None,
             user_id: str | None = None, display_name: str | None = None) -> ChannelIdentity:
    request = msgs.ResolveClient(app_id=APP, integration_id=integration, client_type=client_type,  # type: ignore[arg-type]
                                 channel_user_id=key, info={"wa_id": wa_id} if wa_id else {}, user_id=user_id,
                                 display_name=display_name)
    return ChannelIdentity(request, wa_id)


async def count(store: IdentityStore, table: str) -> int:
    return int(await store.db.fetchval(f"SELECT COUNT(*) FROM {table} WHERE app_id = $1", APP))


async def test_users_are_unique_per_external_id(store: IdentityStore) -> None:
    grace = await store.create_user(APP, "grace", Profile(given_name="Grace"), {"tier": "gold"},
                                    signed_up_at=1_700_000_000)  # an int, into a REAL column
    assert grace.signed_up_at == "2023-11-14T22:13:20.000Z" and grace.metadata == {"tier": "gold"}
    with pytest.raises(Conflict):
        await store.create_user(APP, "grace", Profile(), {})
    ada = await store.create_user(APP, None, Profile(given_name="Ada"), {})
    with pytest.raises(Conflict):
        await store.update_user(APP, ada, "grace", None, None)
    # The refused statement spoiled nothing: the same connections go on.
    ada = await store.update_user(APP, ada, "ada", {"surname": "Lovelace"}, {"k": "v"})
    assert (ada.external_id, ada.profile.surname, ada.metadata) == ("ada", "Lovelace", {"k": "v"})
    assert (await store.find_user(APP, "ada")) == ada and await count(store, "users") == 2


async def test_racing_transactions_create_one_client_and_one_user(store: IdentityStore) -> None:
    batches = [[identity("US.1", wa_id="15550001", display_name="Bea Smith")] for _ in range(8)]
    results = await asyncio.gather(*(store.resolve_clients(batch) for batch in batches))
    resolutions = [r for [r] in results if r is not None]
    assert len(resolutions) == 8 and len({(r.user.id, r.client.id) for r in resolutions}) == 1
    assert sum(r.client_created for r in resolutions) == 1 and sum(r.user_created for r in resolutions) == 1
    # The losers' users were undone with their clients; the winner's alias finds the client.
    assert (await count(store, "users"), await count(store, "clients"), await count(store, "client_aliases")) == (
        1, 1, 1)
    found = await store.find_client(APP, WA, "15550001")
    assert found is not None and found[1].id == resolutions[0].client.id
    # create_client of an identity created meanwhile writes nothing and answers the existing one.
    user, client, user_created, client_created = await store.create_client(
        app_id=APP, integration_id=WA, client_type="whatsapp", channel_user_id="US.1", display_name=None,
        avatar_url=None, info={}, raw={}, user_id=None)
    assert (user.id, client.id, user_created, client_created) == (
        resolutions[0].user.id, resolutions[0].client.id, False, False)
    assert await count(store, "users") == 1
    # An SDK client of a user that does not exist resolves to nothing.
    assert await store.resolve_clients([identity("sdk-1", client_type="sdk", user_id="nobody")]) == [None]


async def test_devices_keep_a_push_token_on_one_install(store: IdentityStore) -> None:
    [first] = await store.resolve_clients([identity("sdk-1", client_type="sdk", integration=WEB)])
    [second] = await store.resolve_clients([identity("sdk-2", client_type="sdk", integration=WEB)])
    assert first is not None and second is not None

    def register(who: Resolution, guid: str, token: str | None, **kwargs: object) -> msgs.RegisterDevice:
        return msgs.RegisterDevice(app_id=APP, user_id=who.user.id, client_id=who.client.id, integration_id=WEB,
                                   device_type="android", guid=guid, push_notification_token=token,
                                   **kwargs)  # type: ignore[arg-type]

    one = await store.register_device(register(first, "g1", "tok", info={"os": "14"}, app_version="1.0"))
    assert one is not None and one.push_notification_token == "tok" and one.info == {"os": "14"}
    again = await store.register_device(register(first, "g1", None))  # no token, no info: both kept
    assert again is not None and again.id == one.id
    assert (again.push_notification_token, again.info, again.app_version) == ("tok", {"os": "14"}, "1.0")
    other = await store.register_device(register(second, "g2", "tok"))  # the token moved to another install
    assert other is not None and other.push_notification_token == "tok"
    [old] = await store.list_devices(APP, first.user.id)
    assert old.push_notification_token is None and old.status == "inactive"
    assert await store.register_device(msgs.RegisterDevice(
        app_id=APP, user_id=first.user.id, client_id=second.client.id, integration_id=WEB, device_type="web",
        guid="g3")) is None  # not the user's client
    assert await store.drop_push_token(APP, other.id, "older-token") is not None
    dropped = await store.drop_push_token(APP, other.id, "tok")
    assert dropped is not None and dropped.push_notification_token is None and dropped.status == "inactive"
    blocked = await store.set_client_status(APP, first.client.id, "blocked")
    assert blocked is not None and blocked[1].status == "blocked" and blocked[0].id == first.user.id
    assert await store.set_client_status(APP, "no-such-client", "blocked") is None


async def test_one_push_token_stays_on_one_device_when_two_replicas_register_it_at_once(
        store: IdentityStore, database_settings: DatabaseSettings) -> None:
    installs = await store.resolve_clients([identity(f"sdk-{i}", client_type="sdk", integration=WEB)
                                            for i in range(6)])
    replica = await IdentityStore.open(database_settings)  # a second process on the same database
    try:
        await asyncio.gather(*(
            (store if i % 2 else replica).register_device(msgs.RegisterDevice(
                app_id=APP, user_id=who.user.id, client_id=who.client.id, integration_id=WEB,
                device_type="android", guid=f"g{i}", push_notification_token="shared-token"))
            for i, who in enumerate(installs) if who is not None))
    finally:
        await replica.close()
    holders = await store.db.fetchval(
        "SELECT COUNT(*) FROM devices WHERE app_id = $1 AND push_token = $2", APP, "shared-token")
    assert holders == 1
    assert await count(store, "devices") == 6


async def test_a_merge_asked_of_two_replicas_at_once_happens_once(
        store: IdentityStore, database_settings: DatabaseSettings) -> None:
    survivor = await store.create_user(APP, "kim", Profile(given_name="Kim"), {"plan": "gold"})
    [anon] = await store.resolve_clients([identity("US.77", display_name="Anon")])
    assert anon is not None
    replica = await IdentityStore.open(database_settings)  # a second process on the same database
    try:
        records = await asyncio.gather(*(
            s.merge_users(APP, surviving=survivor, discarded=anon.user, reason="channelLinking")
            for s in (store, replica, store, replica)))
    finally:
        await replica.close()
    assert len({r.id for r in records}) == 1  # one merge, the same record for every caller
    assert await store.list_merges(APP, survivor.id) == [records[0]]
    merged = await store.find_user(APP, survivor.id)
    assert merged is not None and merged.metadata == {"plan": "gold"} and merged.profile.given_name == "Kim"
    assert [c.id for c in await store.list_clients(APP, survivor.id)] == [anon.client.id]
    # A user deleted meanwhile cannot be merged: the caller learns it.
    [gone] = await store.resolve_clients([identity("US.78")])
    assert gone is not None
    await store.delete_user(APP, gone.user.id)
    with pytest.raises(UserGone):
        await store.merge_users(APP, surviving=survivor, discarded=gone.user, reason="channelLinking")


async def test_merges_are_logged_and_erasure_clears_what_they_kept(store: IdentityStore) -> None:
    survivor = await store.create_user(APP, "sam", Profile(given_name="Sam"), {"a": 1})
    [anon] = await store.resolve_clients([identity("US.9", display_name="Ann Onymous")])
    assert anon is not None
    await store.update_user(APP, anon.user, None, None, {"secret": "s3cret", "a": 2})
    assert await identify(store, APP, anon.user.id, "sam") is False  # taken: the unique index decides
    await store.db.execute("UPDATE users SET authenticated = 1 WHERE app_id = $1 AND id = $2", APP, anon.user.id)
    discarded = await store.find_user(APP, anon.user.id)
    assert discarded is not None
    record = await store.merge_users(APP, surviving=survivor, discarded=discarded, reason="channelLinking")
    merged = await store.find_user(APP, survivor.id)
    assert merged is not None and merged.authenticated and merged.external_id == "sam"
    assert merged.metadata == {"a": 1, "secret": "s3cret"} and merged.profile.given_name == "Sam"
    assert [c.id for c in await store.list_clients(APP, survivor.id)] == [anon.client.id] == record.merged_client_ids
    assert await store.find_user(APP, anon.user.id) is None
    assert await store.list_merges(APP, anon.user.id) == [record] == await store.list_merges(APP, survivor.id)

    scrubbed = await store.delete_personal_information(APP, survivor.id)
    assert scrubbed is not None and scrubbed.metadata == {} and scrubbed.external_id == "sam"
    [client] = await store.list_clients(APP, survivor.id)
    assert client.display_name is None and client.info is None
    kept = await store.db.fetchrow("SELECT discarded_user, discarded_metadata FROM merges WHERE id = $1", record.id)
    assert kept is not None and (kept[0], kept[1]) == (f'{{"id":"{anon.user.id}"}}', "{}")

    assert await store.delete_user(APP, survivor.id) == [client.id]
    assert [await count(store, t) for t in ("users", "clients", "client_aliases", "devices")] == [0, 0, 0, 0]
    assert len(await store.list_merges(APP, survivor.id)) == 1  # who, why and when stay


async def test_sdk_login_identifies_merges_or_separates(store: IdentityStore) -> None:
    h = IdentityHandlers(store)

    async def session(key: str) -> tuple[str, str]:
        [r] = await store.resolve_clients([identity(key, client_type="sdk", integration=WEB)])
        assert r is not None
        return r.user.id, r.client.id

    async def login(user_id: str, client_id: str, external_id: str) -> msgs.UserLoggedIn:
        reply = await login_user(h.store, h.forget_user, msgs.LoginUser(
            app_id=APP, user_id=user_id, client_id=client_id, external_id=external_id))
        assert isinstance(reply, msgs.UserLoggedIn), reply
        return reply

    first = await login(*await session("sdk-a"), "ext-1")
    assert first.outcome == "identified" and first.user.authenticated and first.user.external_id == "ext-1"
    second_user, second_client = await session("sdk-b")
    second = await login(second_user, second_client, "ext-1")
    assert second.outcome == "merged" and second.user.id == first.user.id and second.client.id == second_client
    assert await store.find_user(APP, second_user) is None
    # A session whose user also holds a channel it never proved: only the session's client moves.
    third_user, third_client = await session("sdk-c")
    [phone] = await store.resolve_clients([identity("US.7", user_id=third_user)])
    assert phone is not None and phone.user.id == third_user
    third = await login(third_user, third_client, "ext-2")
    assert third.outcome == "separated" and third.user.external_id == "ext-2" and third.user.authenticated
    assert [c.id for c in await store.list_clients(APP, third.user.id)] == [third_client]
    assert [c.id for c in await store.list_clients(APP, third_user)] == [phone.client.id]
    found = await user_by_external_id(store, APP, "ext-2")
    assert found is not None and found.id == third.user.id


async def test_similar_users_share_a_number_or_an_address(store: IdentityStore) -> None:
    sms = "e" * 24
    mail = "f" * 24
    # One person reached the business three ways, each a user of its own: WhatsApp (a BSUID, the
    # number in wa_id), SMS (the E.164 number) and e-mail (the address, also in a fourth user's profile).
    [whatsapp] = await store.resolve_clients([identity("US.77", wa_id="15550077")])
    [texting] = await store.resolve_clients([identity("+15550077", client_type="twilio", integration=sms)])
    [emailing] = await store.resolve_clients([identity("kim@example.com", client_type="mailgun", integration=mail)])
    assert whatsapp is not None and texting is not None and emailing is not None
    profiled = await store.create_user(APP, "kim", Profile(email="Kim@Example.com"), {})
    stranger = await store.create_user(APP, None, Profile(email="kim@example.com.evil"), {})
    other_app = await store.create_user("c" * 24, None, Profile(email="kim@example.com"), {})
    found = {s.user_id: s for s in await store.similar_users(APP, whatsapp.user.id)}
    assert set(found) == {texting.user.id}
    assert found[texting.user.id].reason == "phone" and found[texting.user.id].channels == ["twilio"]
    found = {s.user_id: s for s in await store.similar_users(APP, texting.user.id)}
    assert set(found) == {whatsapp.user.id} and found[whatsapp.user.id].channels == ["whatsapp"]
    found = {s.user_id: s for s in await store.similar_users(APP, profiled.id)}
    assert set(found) == {emailing.user.id} and found[emailing.user.id].reason == "email"
    found = {s.user_id: s for s in await store.similar_users(APP, emailing.user.id)}
    assert set(found) == {profiled.id}
    assert stranger.id not in found and other_app.id not in found
    assert await store.similar_users(APP, "0" * 24) == []


async def test_search_names_users_by_external_id_number_address_or_profile(store: IdentityStore) -> None:
    [whatsapp] = await store.resolve_clients([identity("US.88", wa_id="15550088")])
    [texting] = await store.resolve_clients([identity("+15550099", client_type="twilio", integration="e" * 24)])
    assert whatsapp is not None and texting is not None
    noor = await store.create_user(APP, "crm-42", Profile(given_name="Noor", surname="Haddad", email="noor@ex.com"), {})
    odd = await store.create_user(APP, None, Profile(given_name="100%_sure"), {})
    assert await store.search_users(APP, "crm-42") == [noor.id]
    assert await store.search_users(APP, "haddad") == [noor.id]
    assert await store.search_users(APP, "NOOR@EX.COM") == [noor.id]
    assert await store.search_users(APP, "+1 (555) 0088") == [whatsapp.user.id]  # the alias of a BSUID sender
    assert await store.search_users(APP, "1555-0099") == [texting.user.id]
    assert await store.search_users(APP, "100%_") == [odd.id] and await store.search_users(APP, "0%x") == []
    assert await store.search_users("c" * 24, "haddad") == []
