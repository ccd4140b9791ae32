"""Privacy settings and rights, against the running services: `maskCreditCardNumbers` (nothing
stored, delivered or sent carries the card number), `conversationRetentionSeconds` (old messages
and every copy of them go), user deletion and personal-information deletion (no byte of the
person left in any database), and the export of everything held about a user."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import sunshine_conversations_client as sc

from services.conversations import export
from shared import subjects
from shared.bus import Bus
from shared.http import basic_auth_header
from shared.messages import notification as note
from tests.e2e.test_direct_linking import Sandbox
from tests.e2e.test_handoff_channels import yes_answer
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System, business_webhooks
from tests.integration.test_web_conversation import eventually
from threadline.bootstrap import AccountKey, bootstrap_sandbox

SERVICES = ("identity", "conversations", "webhooks", "handoff", "notifications", "whatsapp", "sandbox")
TRIGGERS = ["conversation:message", "conversation:create", "client:add", "client:update", "client:remove",
            "user:remove", "user:update", "user:merge"]
ACCOUNT = basic_auth_header(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET)
PAN = "4111 1111 1111 1111"
PAN_DIGITS = PAN.replace(" ", "")
BUSINESS_PAN = "4242-4242-4242-4242"


@contextlib.asynccontextmanager
async def running(system: System, tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with business_webhooks() as (hook_url, events):
        await system.start(*SERVICES)
        info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                       str(tmp_path / "sbx"), ("web", "whatsapp", "email"))
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{system.base_url}/v2/apps/{info['appId']}/integrations",
                                 headers=basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"]),
                                 json={"type": "custom", "webhooks": [{"target": hook_url, "triggers": TRIGGERS}]},
                                 ) as resp:
                assert resp.status == 201
            yield Sandbox(system, http, info, events)


@pytest.fixture
async def sandbox(system: System, tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with running(system, tmp_path) as s:
        yield s


async def set_settings(s: Sandbox, settings: dict[str, Any]) -> None:
    async with s.http.patch(f"{s.system.base_url}/v2/apps/{s.app_id}", headers=ACCOUNT,
                            json={"settings": settings}) as resp:
        assert resp.status == 200, await resp.text()


async def s_request(s: Sandbox, method: str, path: str, body: Any = None,
                    headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with s.http.request(method, s.system.base_url + path, json=body, headers=headers or s.auth) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if text else None)


async def stream_bytes(bus: Bus, stream: subjects.StreamSpec) -> bytes:
    """Every message still stored in a stream, concatenated."""
    info = await bus.js.stream_info(stream.name)
    out = b""
    if info.state.messages == 0:
        return out
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        with contextlib.suppress(Exception):
            out += (await bus.js.get_msg(stream.name, seq)).data or b""
    return out


def files_bytes(*folders: Path) -> dict[str, bytes]:
    """The bytes of every file under `folders` (databases with their -wal/-shm, stream blocks),
    except the sandbox's: its fakes are the platforms and phones, which keep what they got."""
    found: dict[str, bytes] = {}
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.name.startswith("sandbox"):
                found[str(path)] = path.read_bytes()
    return found


def holding(files: dict[str, bytes], *needles: str) -> list[str]:
    return sorted(f"{path}: {needle!r}" for path, data in files.items() for needle in needles
                  if needle.encode() in data)


async def files_once_erased(folder: Path, *needles: str, timeout: float = 10.0) -> dict[str, bytes]:
    """The files under `folder` once none holds `needles`, or as they are after `timeout`. A
    service erases its rows, then truncates its write-ahead log a moment later: the rows can be
    gone while the log still holds their old pages."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        files = files_bytes(folder)
        if not holding(files, *needles) or asyncio.get_running_loop().time() > deadline:
            return files
        await asyncio.sleep(0.05)


async def test_card_numbers_are_masked_in_and_out_before_anything_keeps_them(
        sandbox: Sandbox, tmp_path: Path) -> None:
    s = sandbox
    phone = "+15557300001"
    await set_settings(s, {"maskCreditCardNumbers": True})
    # In: the customer writes a card number on WhatsApp.
    await s.phone_sends("whatsapp", phone, f"my card is {PAN}, expiry 12/27")
    masked_in = "my card is **** **** **** 1111, expiry 12/27"
    event = await s.event("conversation:message")
    assert event["payload"]["message"]["content"]["text"] == masked_in
    conversation_id = event["payload"]["conversation"]["id"]
    # Out: the business answers with a card number; the phone and the webhook get it masked.
    post = sc.MessagePost(author=sc.Author(type="business"), content=sc.Content(sc.TextMessage(
        type="text", text=f"We charged {BUSINESS_PAN}")))
    sent = (await s.call(sc.MessagesApi(s.api).post_message, s.app_id, conversation_id, post)).messages[0]
    assert sent.content.actual_instance.text == "We charged ****-****-****-4242"
    await s.phone_receives("whatsapp", phone, "We charged ****-****-****-4242")
    assert not any("4242-4242" in text for text in await s.phone_outbox("whatsapp", phone))

    async def business_echo() -> bool:
        return any(e["payload"]["message"]["author"]["type"] == "business" for e in s.of("conversation:message"))

    await eventually(business_echo, timeout=10.0)
    history = (await s.call(sc.MessagesApi(s.api).list_messages, s.app_id, conversation_id)).messages
    assert [m.content.actual_instance.text for m in history] == [masked_in, "We charged ****-****-****-4242"]
    webhook_texts = [e["payload"]["message"]["content"]["text"] for e in s.of("conversation:message")]
    assert not any(PAN in t or BUSINESS_PAN in t for t in webhook_texts)
    # Nothing stored anywhere keeps either number: the databases, and the bus (the raw inbound
    # copy is erased once the masked message is stored).
    bus = await Bus.connect(s.system.nats_url, "test-privacy")
    try:
        for stream in subjects.ALL_STREAMS:
            data = await stream_bytes(bus, stream)
            assert PAN.encode() not in data and BUSINESS_PAN.encode() not in data, stream.name
    finally:
        await bus.close()
    stored = files_bytes(Path(s.system.data_dir), tmp_path / "nats")
    assert holding(stored, PAN, PAN_DIGITS, BUSINESS_PAN) == []


async def test_numbers_are_kept_as_written_when_the_app_does_not_mask(sandbox: Sandbox) -> None:
    s = sandbox
    await s.phone_sends("whatsapp", "+15557300002", f"my card is {PAN}")
    event = await s.event("conversation:message")
    assert event["payload"]["message"]["content"]["text"] == f"my card is {PAN}"


async def customer_conversation(s: Sandbox, phone: str, text: str) -> str:
    """The customer writes on WhatsApp; the conversation it landed in."""
    await s.phone_sends("whatsapp", phone, text)

    async def arrived() -> dict[str, Any] | None:
        for e in s.of("conversation:message"):
            if e["payload"]["message"]["content"].get("text") == text:
                return e
        return None

    event = await eventually(arrived, timeout=10.0)
    return str(event["payload"]["conversation"]["id"])


async def stored_row_count(system: System, service: str, sql: str, *params: Any) -> int:
    return int(await system.service(service).store.db.fetchval(sql, *params))


async def answered_conversation(s: Sandbox, phone: str, text: str, reply: str) -> str:
    """A customer's conversation with the business's reply, once `notifications` holds its
    pending notification and `webhooks` has delivered both messages (the copies an erasure must
    take)."""
    conversation_id = await customer_conversation(s, phone, text)
    await s.call(sc.MessagesApi(s.api).post_message, s.app_id, conversation_id, sc.MessagePost(
        author=sc.Author(type="business"), content=sc.Content(sc.TextMessage(type="text", text=reply))))
    notifications = s.system.service("notifications")

    async def copies_made() -> bool:
        return (await notifications.store.pending(conversation_id) is not None and await stored_row_count(
            s.system, "webhooks", "SELECT COUNT(*) FROM deliveries WHERE conversation_id=$1 AND status='delivered'",
            conversation_id) >= 2)

    await eventually(copies_made, timeout=10.0)
    return conversation_id


async def copies_gone(s: Sandbox, conversation_id: str) -> bool:
    """Whether `notifications` and `webhooks` hold nothing of the conversation any more."""
    return (await s.system.service("notifications").store.pending(conversation_id) is None
            and await stored_row_count(s.system, "webhooks", "SELECT COUNT(*) FROM deliveries WHERE conversation_id=$1",
                                       conversation_id) == 0)


async def events_read(bus: Bus) -> bool:
    """Whether every consumer of the events has read and acknowledged everything."""
    return all(info.num_pending == 0 and info.num_ack_pending == 0
               for info in await bus.js.consumers_info(subjects.EVENTS.name))


async def check_emptied(s: Sandbox, emptied: str, other: str, other_text: str) -> None:
    """`emptied` has no message left but stays (as after SunCo's Delete All Messages), and
    `notifications` and `webhooks` drop their copies of it; `other` keeps its message and copies."""
    messages = sc.MessagesApi(s.api)
    assert (await s.call(messages.list_messages, s.app_id, emptied)).messages == []
    assert [m.content.actual_instance.text for m in (await s.call(messages.list_messages, s.app_id, other)).messages] \
        == [other_text]
    assert (await s.call(sc.ConversationsApi(s.api).get_conversation, s.app_id, emptied)).conversation.id == emptied
    await eventually(lambda: copies_gone(s, emptied), timeout=10.0)
    assert await stored_row_count(s.system, "webhooks", "SELECT COUNT(*) FROM deliveries WHERE conversation_id=$1",
                                  other) > 0


async def test_retention_deletes_an_inactive_conversations_messages_and_every_copy(
        sandbox: Sandbox, tmp_path: Path) -> None:
    s = sandbox
    status, _ = await s_request(s, "PATCH", f"/v2/apps/{s.app_id}", {"settings": {"conversationRetentionSeconds": -1}},
                                ACCOUNT)
    assert status == 400
    await set_settings(s, {"conversationRetentionSeconds": 3600})
    old = await answered_conversation(s, "+15557300011", "old news from Ada", "old reply to Ada")
    fresh = await customer_conversation(s, "+15557300012", "fresh news from Bea")
    # Ada's conversation was last active two hours ago (its rows say so); Bea's is active now.
    convs = s.system.service("conversations").conversations
    async with convs.store.tx() as tx:
        await tx.execute("UPDATE messages SET received = received - 7200 WHERE conversation_id=$1", old)
        await tx.execute("UPDATE conversations SET last_updated_at = last_updated_at - 7200 WHERE id=$1", old)
    assert await convs.sweep_retention() == 2
    assert await convs.sweep_retention() == 0  # nothing left, nothing visited again
    await check_emptied(s, old, fresh, "fresh news from Bea")
    await convs.purge_consumed()
    bus = await Bus.connect(s.system.nats_url, "test-privacy")
    try:
        events = await stream_bytes(bus, subjects.EVENTS)
        assert b"fresh news from Bea" in events
        for stream in subjects.ALL_STREAMS:
            data = await stream_bytes(bus, stream)
            assert b"old news from Ada" not in data and b"old reply to Ada" not in data, stream.name
    finally:
        await bus.close()
    # Every database file (JetStream purges are logical: block files keep bytes until compacted).
    stored = await files_once_erased(Path(s.system.data_dir), "old news from Ada", "old reply to Ada")
    assert holding(stored, "old news from Ada", "old reply to Ada") == []
    assert holding(stored, "fresh news from Bea")  # the search does find what is still there


async def test_delete_all_messages_empties_the_history_and_every_copy_of_it(sandbox: Sandbox) -> None:
    """SunCo's Delete All Messages, by the official client, on a customer's default conversation
    (which cannot be deleted itself): the messages go, and so do the deliveries `webhooks`
    stored, the pending notification and the conversation's events on the bus; another
    conversation keeps all of its."""
    s = sandbox
    await set_settings(s, {"conversationRetentionSeconds": 0})
    gone = await answered_conversation(s, "+15557300031", "please forget my order 7731", "order 7731 noted")
    kept = await customer_conversation(s, "+15557300032", "keep my order 8842")
    bus = await Bus.connect(s.system.nats_url, "test-privacy-delete-all")
    try:
        await eventually(lambda: events_read(bus), timeout=10.0)  # what is unread stays on the bus
    finally:
        await bus.close()
    messages = sc.MessagesApi(s.api)
    await s.call(messages.delete_all_messages, s.app_id, gone)
    await check_emptied(s, gone, kept, "keep my order 8842")
    bus = await Bus.connect(s.system.nats_url, "test-privacy-delete-all")
    try:
        events = await stream_bytes(bus, subjects.EVENTS)  # purged by the deletion itself
        assert b"keep my order 8842" in events
        assert b"order 7731" not in events
        await s.system.service("conversations").conversations.purge_consumed()  # the sweep: inbound copies
        for stream in subjects.ALL_STREAMS:
            assert b"order 7731" not in await stream_bytes(bus, stream), stream.name
    finally:
        await bus.close()
    stored = await files_once_erased(Path(s.system.data_dir), "order 7731")
    assert holding(stored, "order 7731") == []
    assert holding(stored, "keep my order 8842")
    # The conversation goes on: a new message is stored, delivered and kept.
    await customer_conversation(s, "+15557300031", "a new question")
    assert [m.content.actual_instance.text for m in (await s.call(messages.list_messages, s.app_id, gone)).messages] \
        == ["a new question"]


async def test_delete_message_erases_that_message_and_every_copy_of_it_only(sandbox: Sandbox) -> None:
    """SunCo's Delete Message, by the official client: the business's reply goes from the
    history, from `webhooks`' deliveries, from `notifications` (the pending notification carried
    its text) and from the bus; the customer's message before it keeps every copy."""
    s = sandbox
    conversation_id = await answered_conversation(s, "+15557300041", "my locker code is 4417",
                                                  "we changed it to 9083, keep it secret")
    bus = await Bus.connect(s.system.nats_url, "test-privacy-delete-one")
    try:
        await eventually(lambda: events_read(bus), timeout=10.0)  # what is unread stays on the bus
        messages = sc.MessagesApi(s.api)
        listed = (await s.call(messages.list_messages, s.app_id, conversation_id)).messages
        reply = next(m for m in listed if m.author.type == "business")
        await s.call(messages.delete_message, s.app_id, conversation_id, reply.id)
        with pytest.raises(sc.ApiException) as again:
            await s.call(messages.delete_message, s.app_id, conversation_id, reply.id)
        assert again.value.status == 404
        assert [m.content.actual_instance.text for m in (await s.call(messages.list_messages, s.app_id,
                                                                       conversation_id)).messages] \
            == ["my locker code is 4417"]

        async def reply_copies_gone() -> bool:
            bodies = [bytes(r[0]) for r in await s.system.service("webhooks").store.db.fetch(
                "SELECT body FROM deliveries WHERE conversation_id=$1", conversation_id)]
            return (await s.system.service("notifications").store.pending(conversation_id) is None
                    and not any(b"9083" in body for body in bodies) and any(b"4417" in body for body in bodies))

        await eventually(reply_copies_gone, timeout=10.0)
        events = await stream_bytes(bus, subjects.EVENTS)
        assert b"9083" not in events and b"my locker code is 4417" in events
    finally:
        await bus.close()
    stored = await files_once_erased(Path(s.system.data_dir), "9083")
    assert holding(stored, "9083") == []
    assert holding(stored, "my locker code is 4417")


# The person of the erasure tests: every trace of these must go with her.
NAME, SURNAME, EMAIL = "Adalinda", "Zqwertyova", "adalinda.zq@example.com"
PHONE, OPTIN_EMAIL = "+15557300021", "ada.optin@example.org"
SECRET_META, OLD_TEXT = "vip-tier-obsidian", "my flat is 12 Quayside Lane"


async def person_with_history(s: Sandbox) -> tuple[str, str]:
    """Ada chatted on WhatsApp anonymously, then the business created her account (externalId
    `ada-ext`), linked her WhatsApp to it (she said YES to bring her chat along: a merge in the
    audit log), she opted in to notifications, and the business wrote to her. (user id,
    conversation id)."""
    async with s.http.post(f"{s.system.base_url}/sandbox/whatsapp/{s.integration('whatsapp')}/inbound",
                           json={"from": PHONE, "text": OLD_TEXT, "name": f"{NAME} {SURNAME}"}) as resp:
        assert resp.status == 200
    await customer_conversation_of(s, OLD_TEXT)
    user = (await s.call(sc.UsersApi(s.api).create_user, s.app_id, sc.UserCreateBody(
        external_id="ada-ext", profile=sc.Profile(given_name=NAME, surname=SURNAME, email=EMAIL),
        metadata={"tier": SECRET_META}))).user
    body = sc.ConversationCreateBody(type="personal", participants=[
        sc.ParticipantSubSchema(sc.ParticipantWithUserId(user_id=user.id))])
    conversation_id = (await s.call(sc.ConversationsApi(s.api).create_conversation, s.app_id, body)).conversation.id
    status, links = await s_request(s, "POST", f"/v2/apps/{s.app_id}/users/{user.id}/linkRequests",
                                    {"integrationIds": [s.integration("whatsapp")]})
    assert status == 201, links
    prefilled = parse_qs(urlsplit(links["linkRequests"][0]["url"]).query)["text"][0]
    await s.phone_sends("whatsapp", PHONE, prefilled)
    texts = await s.phone_receives("whatsapp", PHONE, "reply YES")
    await s.phone_sends("whatsapp", PHONE, yes_answer(next(t for t in texts if "reply YES" in t)))
    await s.event("user:merge")
    bus = await Bus.connect(s.system.nats_url, "test-privacy-optin")
    try:
        reply = note.decode(await bus.request(subjects.NOTIFICATIONS_OPTIN_START, note.ENCODER.encode(note.StartOptIn(
            app_id=s.app_id, user_id=user.id, conversation_id=conversation_id, channel="email",
            address=OPTIN_EMAIL))))
        assert isinstance(reply, note.OptInState), reply
    finally:
        await bus.close()
    await s.call(sc.MessagesApi(s.api).post_message, s.app_id, conversation_id, sc.MessagePost(
        author=sc.Author(type="business"), content=sc.Content(sc.TextMessage(type="text", text="Welcome back!"))))
    await s.phone_receives("whatsapp", PHONE, "Welcome back!")
    return user.id, conversation_id


async def customer_conversation_of(s: Sandbox, text: str) -> dict[str, Any]:
    async def arrived() -> dict[str, Any] | None:
        for e in s.of("conversation:message"):
            if e["payload"]["message"]["content"].get("text") == text:
                return e
        return None

    found: dict[str, Any] = await eventually(arrived, timeout=10.0)
    return found


async def test_deleting_a_user_leaves_no_byte_of_them_and_fires_user_remove(sandbox: Sandbox) -> None:
    s = sandbox
    user_id, conversation_id = await person_with_history(s)
    data = Path(s.system.data_dir)
    before = files_bytes(data)
    # Before: the person is all over the databases (the search works).
    for needle in (NAME, SURNAME, EMAIL, SECRET_META, OLD_TEXT, PHONE.lstrip("+"), OPTIN_EMAIL):
        assert holding(before, needle), needle
    status, _ = await s_request(s, "DELETE", f"/v2/apps/{s.app_id}/users/ada-ext")
    assert status == 200
    removed = await s.event("user:remove")
    assert removed["payload"]["user"] == {"id": user_id, "externalId": "ada-ext", "authenticated": False}
    assert sc.UserRemoveEvent.from_dict(removed).payload.user.id == user_id
    status, body = await s_request(s, "GET", f"/v2/apps/{s.app_id}/users/{user_id}")
    assert status == 404 and body["errors"][0]["code"] == "user_not_found"
    status, _ = await s_request(s, "GET", f"/v2/apps/{s.app_id}/conversations/{conversation_id}")
    assert status == 404
    notifications = s.system.service("notifications")

    async def others_forgot() -> bool:
        return (await notifications.store.optins(s.app_id, user_id) == [] and await stored_row_count(
            s.system, "webhooks", "SELECT COUNT(*) FROM deliveries WHERE trigger_name <> 'user:remove'") == 0)

    await eventually(others_forgot, timeout=10.0)
    erased = (NAME, SURNAME, EMAIL, SECRET_META, OLD_TEXT, "Welcome back!", PHONE.lstrip("+"), OPTIN_EMAIL)
    after = await files_once_erased(data, *erased)
    assert holding(after, *erased) == []
    # The merge audit log keeps who, why and when, nothing of the person merged.
    identity = s.system.service("identity").store
    merges = [tuple(row) for row in await identity.db.fetch(
        "SELECT surviving_user_id, discarded_user_id, reason, discarded_user, discarded_metadata FROM merges")]
    assert len(merges) == 1 and merges[0][0] == user_id and merges[0][2] == "channelLinking"
    assert json.loads(merges[0][3]) == {"id": merges[0][1]} and merges[0][4] == "{}"
    # Nothing readable on the bus either, once the consumed copies are purged.
    await s.system.service("conversations").conversations.purge_consumed()
    bus = await Bus.connect(s.system.nats_url, "test-privacy")
    try:
        for stream in (subjects.INBOUND, subjects.EVENTS, subjects.OUTBOUND):
            stored = await stream_bytes(bus, stream)
            for needle in (NAME, EMAIL, SECRET_META, OLD_TEXT, "Welcome back!", OPTIN_EMAIL):
                assert needle.encode() not in stored, (stream.name, needle)
    finally:
        await bus.close()


async def test_deleting_personal_information_keeps_the_user_and_history_but_not_the_person(
        sandbox: Sandbox) -> None:
    s = sandbox
    user_id, conversation_id = await person_with_history(s)

    async def delivered_all() -> bool:
        return await stored_row_count(s.system, "webhooks",
                                      "SELECT COUNT(*) FROM deliveries WHERE status = 'pending'") == 0

    await eventually(delivered_all, timeout=10.0)
    # The official client's call works against Threadline.
    user = (await s.call(sc.UsersApi(s.api).delete_user_personal_information, s.app_id, "ada-ext")).user
    assert user.id == user_id and user.external_id == "ada-ext"
    assert user.profile is None or (user.profile.given_name, user.profile.surname, user.profile.email) == (
        None, None, None)
    assert not user.metadata
    clients = (await s.call(sc.ClientsApi(s.api).list_clients, s.app_id, user_id)).clients
    assert [c.type for c in clients] == ["whatsapp"] and clients[0].external_id  # kept: it routes replies
    assert (clients[0].display_name, clients[0].info, clients[0].raw) == (None, None, None)
    # The history stays, without the author's name.
    conversations = (await s.call(sc.ConversationsApi(s.api).list_conversations, s.app_id,
                                  filter=sc.ConversationListFilter(user_id=user_id))).conversations
    texts, names = [], []
    for conversation in conversations:
        for message in (await s.call(sc.MessagesApi(s.api).list_messages, s.app_id, conversation.id)).messages:
            texts.append(message.content.actual_instance.text)
            names.append(message.author.display_name)
    assert OLD_TEXT in texts and "Welcome back!" in texts and conversation_id in [c.id for c in conversations]
    assert names and all(name is None for name in names)
    notifications = s.system.service("notifications")

    async def others_forgot() -> bool:
        return (await notifications.store.optins(s.app_id, user_id) == [] and await stored_row_count(
            s.system, "webhooks", "SELECT COUNT(*) FROM deliveries") == 0)

    await eventually(others_forgot, timeout=10.0)
    after = await files_once_erased(Path(s.system.data_dir), NAME, SURNAME, EMAIL, SECRET_META, OPTIN_EMAIL)
    assert holding(after, NAME, SURNAME, EMAIL, SECRET_META, OPTIN_EMAIL) == []
    assert holding(after, OLD_TEXT)  # the history is still there
    assert not s.of("user:remove")


async def test_export_holds_everything_about_the_user_streamed_a_page_at_a_time(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    s = sandbox
    monkeypatch.setattr(export, "EXPORT_PAGE", 2)  # several pages per conversation
    user_id, conversation_id = await person_with_history(s)
    for n in range(3):
        await s.call(sc.MessagesApi(s.api).post_message, s.app_id, conversation_id, sc.MessagePost(
            author=sc.Author(type="business"), content=sc.Content(sc.TextMessage(type="text", text=f"note {n}"))))
    async with s.http.get(f"{s.system.base_url}/v2/apps/{s.app_id}/users/ada-ext/export", headers=s.auth) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("application/json")
        assert resp.headers["Content-Disposition"] == f'attachment; filename="user-{user_id}.json"'
        document = json.loads(await resp.read())
    assert document["format"] == "threadline.userExport.v1" and document["app"] == {"id": s.app_id}
    user = document["user"]
    assert (user["id"], user["externalId"], user["profile"]["email"], user["metadata"]) == (
        user_id, "ada-ext", EMAIL, {"tier": SECRET_META})
    assert [c["type"] for c in document["clients"]] == ["whatsapp"] and document["devices"] == []
    [merge] = document["merges"]
    assert merge["survivingUserId"] == user_id and merge["reason"] == "channelLinking"
    [optin] = document["notifications"]["optIns"]
    assert (optin["channel"], optin["address"], optin["status"]) == ("email", OPTIN_EMAIL, "pending")
    assert document["notifications"]["sends"] == [] and document["notifications"]["sendsTruncated"] is False
    assert document["pendingConfirmations"] == {"clientLinks": [], "mergeConfirmations": []}
    exported = {c["conversation"]["id"]: c for c in document["conversations"]}
    assert conversation_id in exported and len(exported) == 2
    for conversation in document["conversations"]:
        assert conversation["participants"][0]["userId"] == user_id
        listed = (await s.call(sc.MessagesApi(s.api).list_messages, s.app_id,
                               conversation["conversation"]["id"])).messages
        assert [m["id"] for m in conversation["messages"]] == [m.id for m in listed]
    texts = [m["content"]["text"] for c in document["conversations"] for m in c["messages"]]
    assert OLD_TEXT in texts and ["Welcome back!", "note 0", "note 1", "note 2"] == [
        t for t in texts if t in ("Welcome back!", "note 0", "note 1", "note 2")]
    # Unknown users, and a service that cannot answer, are the API's usual errors.
    status, body = await s_request(s, "GET", f"/v2/apps/{s.app_id}/users/nobody/export")
    assert status == 404 and body["errors"][0]["code"] == "user_not_found"
    await s.system.stop_service("notifications")
    status, body = await s_request(s, "GET", f"/v2/apps/{s.app_id}/users/ada-ext/export")
    assert status == 503 and "otifications" in body["errors"][0]["title"]


async def test_another_apps_key_can_neither_export_nor_erase_a_user(sandbox: Sandbox) -> None:
    s = sandbox
    user_id, _conversation_id = await person_with_history(s)
    async with s.http.post(f"{s.system.base_url}/v2/apps", json={"displayName": "Other"}, headers=ACCOUNT) as resp:
        other_app = (await resp.json())["app"]["id"]
    async with s.http.post(f"{s.system.base_url}/v2/apps/{other_app}/keys", json={"displayName": "k"},
                           headers=ACCOUNT) as resp:
        key = (await resp.json())["key"]
    other = basic_auth_header(key["id"], key["secret"])
    for method, tail in (("GET", "/export"), ("DELETE", "/personalinformation"), ("DELETE", "")):
        # On the user's app path: refused before anything is looked up.
        status, body = await s_request(s, method, f"/v2/apps/{s.app_id}/users/{user_id}{tail}", headers=other)
        assert status in (403, 404) and NAME not in json.dumps(body), (method, tail, status)
        # On its own app's path, the other app's user does not exist.
        status, body = await s_request(s, method, f"/v2/apps/{other_app}/users/{user_id}{tail}", headers=other)
        assert status == 404 and body["errors"][0]["code"] == "user_not_found", (method, tail, body)
    user = (await s.call(sc.UsersApi(s.api).get_user, s.app_id, user_id)).user
    assert user.profile.given_name == NAME and not s.of("user:remove")
