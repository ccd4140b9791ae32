"""The identity service over real NATS: channel identities resolve to stable users and clients,
with its state on SQLite, then on PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest

from shared import subjects
from shared.bus import Bus
from shared.messages import identity as msgs
from shared.sunco import Profile
from tests.harness import System


@pytest.fixture
def system(system_on_each_engine: System) -> System:
    """Every test here runs with identity's state on SQLite, then on PostgreSQL."""
    return system_on_each_engine


async def ask(bus: Bus, subject: str, request: msgs.IdentityMessage) -> msgs.IdentityUnion:
    return msgs.decode(await bus.request(subject, msgs.encode(request)))


def resolve(channel_user_id: str, integration_id: str = "int1", client_type: str = "whatsapp",
            **kwargs: object) -> msgs.ResolveClient:
    return msgs.ResolveClient(app_id="app1", integration_id=integration_id, client_type=client_type,  # type: ignore[arg-type]
                              channel_user_id=channel_user_id, **kwargs)  # type: ignore[arg-type]


async def test_same_channel_identity_resolves_to_same_user(system: System, bus: Bus) -> None:
    await system.start("identity")
    first = await ask(bus, subjects.IDENTITY_RESOLVE,
                      resolve("US.1", display_name="Ada Lovelace", info={"wa_id": "15551234567"}))
    again = await ask(bus, subjects.IDENTITY_RESOLVE, resolve("US.1"))
    other = await ask(bus, subjects.IDENTITY_RESOLVE, resolve("US.2"))
    assert isinstance(first, msgs.Resolved) and isinstance(again, msgs.Resolved) and isinstance(other, msgs.Resolved)
    assert first.user_created and first.client_created
    assert not again.user_created and not again.client_created
    assert (again.user.id, again.client.id) == (first.user.id, first.client.id)
    assert other.user.id != first.user.id
    assert first.client.type == "whatsapp" and first.client.external_id == "US.1"
    assert first.client.info == {"wa_id": "15551234567"}
    assert first.user.profile.given_name == "Ada" and first.user.profile.surname == "Lovelace"


async def test_resolution_survives_restart_and_concurrent_races(system: System, bus: Bus) -> None:
    await system.start("identity")
    results = await asyncio.gather(*(ask(bus, subjects.IDENTITY_RESOLVE, resolve("race")) for _ in range(20)))
    ids = {(r.user.id, r.client.id) for r in results if isinstance(r, msgs.Resolved)}
    assert len(ids) == 1
    await system.restart_service("identity")
    after = await ask(bus, subjects.IDENTITY_RESOLVE, resolve("race"))
    assert isinstance(after, msgs.Resolved)
    assert {(after.user.id, after.client.id)} == ids
    listed = await ask(bus, subjects.IDENTITY_CLIENTS_LIST, msgs.ListClients(app_id="app1",
                                                                             user_id_or_external_id=after.user.id))
    assert isinstance(listed, msgs.ClientsReply) and len(listed.clients) == 1


async def test_users_by_id_or_external_id(system: System, bus: Bus) -> None:
    await system.start("identity")
    created = await ask(bus, subjects.IDENTITY_USER_CREATE, msgs.CreateUser(
        app_id="app1", external_id="cust-42", profile=Profile(given_name="Grace"), metadata={"tier": "gold"}))
    assert isinstance(created, msgs.UserReply)
    user = created.user
    dup = await ask(bus, subjects.IDENTITY_USER_CREATE, msgs.CreateUser(app_id="app1", external_id="cust-42"))
    assert isinstance(dup, msgs.IdentityError) and dup.status == 409
    by_ext = await ask(bus, subjects.IDENTITY_USER_GET, msgs.GetUser(app_id="app1", user_id_or_external_id="cust-42"))
    by_id = await ask(bus, subjects.IDENTITY_USER_GET, msgs.GetUser(app_id="app1", user_id_or_external_id=user.id))
    assert isinstance(by_ext, msgs.UserReply) and isinstance(by_id, msgs.UserReply)
    assert by_ext.user.id == by_id.user.id == user.id
    other_app = await ask(bus, subjects.IDENTITY_USER_GET, msgs.GetUser(app_id="app2", user_id_or_external_id=user.id))
    assert isinstance(other_app, msgs.IdentityError) and other_app.status == 404
    updated = await ask(bus, subjects.IDENTITY_USER_UPDATE, msgs.UpdateUser(
        app_id="app1", user_id_or_external_id="cust-42", profile={"surname": "Hopper"}, metadata={"tier": None}))
    assert isinstance(updated, msgs.UserReply)
    assert updated.user.profile.given_name == "Grace" and updated.user.profile.surname == "Hopper"
    assert updated.user.metadata == {}
    linked = await ask(bus, subjects.IDENTITY_RESOLVE, resolve("sdk-client-1", client_type="sdk", user_id=user.id))
    assert isinstance(linked, msgs.Resolved) and linked.user.id == user.id and not linked.user_created
    deleted = await ask(bus, subjects.IDENTITY_USER_DELETE, msgs.DeleteUser(app_id="app1",
                                                                            user_id_or_external_id=user.id))
    assert isinstance(deleted, msgs.Deleted) and deleted.client_ids == [linked.client.id]
    gone = await ask(bus, subjects.IDENTITY_USER_GET, msgs.GetUser(app_id="app1", user_id_or_external_id="cust-42"))
    assert isinstance(gone, msgs.IdentityError) and gone.status == 404


async def test_malformed_request_gets_an_error_reply(system: System, bus: Bus) -> None:
    await system.start("identity")
    reply = msgs.decode(await bus.request(subjects.IDENTITY_USER_GET, b'{"type":"nope"}'))
    assert isinstance(reply, msgs.IdentityError) and reply.status == 400


async def test_a_batch_resolves_in_order_in_one_request(system: System, bus: Bus) -> None:
    await system.start("identity")
    known = await ask(bus, subjects.IDENTITY_RESOLVE, resolve("US.known"))
    by_number = await ask(bus, subjects.IDENTITY_RESOLVE, resolve("15550001111"))
    assert isinstance(known, msgs.Resolved) and isinstance(by_number, msgs.Resolved)
    reply = await ask(bus, subjects.IDENTITY_RESOLVE_BATCH, msgs.ResolveClients(requests=[
        resolve("US.new", display_name="Bea Smith", info={"wa_id": "15550002222"}),
        resolve("US.known"),
        resolve("US.new"),  # the same new sender twice in one batch: one client
        resolve("US.bsuid", info={"wa_id": "15550001111"}),  # the number's client, under its BSUID now
        resolve("sdk-x", client_type="sdk", user_id="no-such-user"),
    ]))
    assert isinstance(reply, msgs.ResolvedBatch)
    new, again_known, new_again, bsuid, missing = reply.results
    assert isinstance(new, msgs.Resolved) and new.user_created and new.client_created
    assert new.user.profile.given_name == "Bea" and new.client.info == {"wa_id": "15550002222"}
    assert isinstance(again_known, msgs.Resolved) and again_known.client.id == known.client.id
    assert isinstance(new_again, msgs.Resolved) and not new_again.client_created
    assert (new_again.user.id, new_again.client.id) == (new.user.id, new.client.id)
    assert isinstance(bsuid, msgs.Resolved) and bsuid.client.id == by_number.client.id
    assert bsuid.client.info == {"wa_id": "15550001111"}
    assert isinstance(missing, msgs.IdentityError) and missing.status == 404
    # Each is found again one by one, by its key, its number or its alias.
    for request, expected in ((resolve("15550002222"), new), (resolve("US.bsuid"), bsuid)):
        found = await ask(bus, subjects.IDENTITY_RESOLVE, request)
        assert isinstance(found, msgs.Resolved) and found.client.id == expected.client.id
