"""conversations on the bus: inbound messages/activity, delivery statuses, outbound routing and
the start/history endpoints, against real identity + conversations services and nats-server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sunshine_conversations_client as sc
from nats.js.errors import NotFoundError

from services.conversations.store import loads
from services.webhooks.handlers import webhook_event
from shared import bus as bus_module
from shared import fencing, subjects
from shared.bus import Bus
from shared.ids import new_id
from shared.messages import channel as chan
from shared.messages import conversation as conv
from shared.messages import identity as ident
from shared.messages.channel import Postback
from shared.subjects import ConsumerSpec, StreamSpec
from shared.sunco import TextContent, UnsupportedContent
from tests.integration.test_conversations_api import Tenant, eventually, text_post
from tests.integration.test_conversations_api import system as system  # on SQLite, then on PostgreSQL
from tests.integration.test_conversations_api import tenant as tenant
from tests.integration.test_webhooks_fencing import stall


class Wa:
    """A tenant with an active WhatsApp integration and a bus connection (as the whatsapp service)."""

    def __init__(self, t: Tenant, bus: Bus, integration_id: str) -> None:
        self.t = t
        self.bus = bus
        self.integration_id = integration_id

    def inbound(self, provider_id: str, text: str = "hello", **extra: Any) -> chan.InboundMessage:
        fields: dict[str, Any] = {
            "app_id": self.t.app_id, "integration_id": self.integration_id, "channel": "whatsapp",
            "client_type": "whatsapp", "channel_user_id": "15551234", "provider_message_id": provider_id,
            "received_at": time.time(), "content": TextContent(text=text), "display_name": "Zoe",
            "client_info": {"phoneNumber": "+15551234"},
        }
        fields.update(extra)
        return chan.InboundMessage(**fields)

    async def publish_inbound(self, message: chan.ChannelMessage) -> None:
        await self.bus.publish(chan.subject_of(message), chan.encode(message))

    async def publish_status(self, status: str, provider_id: str, message_id: str | None = None,
                             **extra: Any) -> None:
        delivery_status = chan.DeliveryStatus(
            app_id=self.t.app_id, integration_id=self.integration_id, channel="whatsapp",
            provider_message_id=provider_id, status=status, timestamp=time.time(),  # type: ignore[arg-type]
            message_id=message_id, **extra)
        await self.bus.publish(chan.subject_of(delivery_status), chan.encode(delivery_status))


async def stored(bus: Bus, stream: StreamSpec, prefix: str = "") -> list[tuple[str, bytes]]:
    """Every message a stream holds (subject, data), optionally only subjects starting with `prefix`."""
    info = await bus.js.stream_info(stream.name)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await bus.js.get_msg(stream.name, seq)
        except Exception:
            continue
        if msg.subject and msg.subject.startswith(prefix) and msg.data is not None:
            out.append((msg.subject, msg.data))
    return out


async def events(bus: Bus, app_id: str) -> list[conv.ConversationUnion]:
    return [conv.decode(data) for _, data in await stored(bus, subjects.EVENTS, f"events.{app_id}.")]


async def consumed(bus: Bus, spec: ConsumerSpec, count: int) -> None:
    """Wait until a consumer group has acked `count` messages and has nothing pending."""
    async def done() -> bool:
        acked = 0
        for partition in range(subjects.PARTITIONS):
            try:
                info = await bus.js.consumer_info(spec.stream.name, spec.durable(partition))
            except NotFoundError:
                return False
            if info.num_pending or info.num_ack_pending:
                return False
            acked += info.ack_floor.consumer_seq or 0
        return acked >= count

    await eventually(done)


@pytest.fixture
async def wa(tenant: Tenant) -> AsyncIterator[Wa]:
    status, body = await tenant.request("POST", f"/v2/apps/{tenant.app_id}/integrations", body={
        "type": "whatsapp", "phoneNumberId": "100", "accessToken": "token-0123456789", "appSecret": "s" * 20})
    assert status == 201
    bus = await Bus.connect(tenant.system.nats_url, "test-whatsapp")
    try:
        yield Wa(tenant, bus, body["integration"]["id"])
    finally:
        await bus.close()


async def user_conversation(wa: Wa) -> tuple[str, str]:
    """(user id, conversation id) of the WhatsApp customer, once their first message is in."""
    async def created() -> conv.MessageCreated | None:
        for event in await events(wa.bus, wa.t.app_id):
            if isinstance(event, conv.MessageCreated):
                return event
        return None

    event = await eventually(created)
    return event.user_id, event.conversation_id


async def test_inbound_message_is_stored_once_and_announced(wa: Wa) -> None:
    message = wa.inbound("wamid.1")
    await wa.publish_inbound(message)
    await wa.publish_inbound(message)  # a redelivery past JetStream's de-dup window
    await consumed(wa.bus, subjects.CONVERSATIONS_INBOUND, 2)
    found = await events(wa.bus, wa.t.app_id)
    created = [e for e in found if isinstance(e, conv.MessageCreated)]
    assert len(created) == 1  # the duplicate re-published with the same event id: de-duplicated
    assert [type(e).__name__ for e in found] == ["ConversationCreated", "MessageCreated"]
    event = created[0]
    assert event.message.author.type == "user" and event.message.author.display_name == "Zoe"
    assert event.message.source is not None and event.message.source.type == "whatsapp"
    assert event.message.source.original_message_id == "wamid.1"
    assert event.message.source.client is not None and event.message.source.client.external_id == "15551234"
    assert event.cursor >= 1
    # The API shows one message, and the WhatsApp client as the participant's primary client.
    t = wa.t
    listed = await t.call(sc.MessagesApi(t.client()).list_messages, t.app_id, event.conversation_id)
    assert [m.content.actual_instance.text for m in listed.messages] == ["hello"]
    assert listed.messages[0].source.integration_id == wa.integration_id
    participants = await t.call(sc.ParticipantsApi(t.client()).list_participants, t.app_id, event.conversation_id)
    associations = participants.participants[0].client_associations
    assert [a.type for a in associations] == ["whatsapp"]
    assert associations[0].client_id == event.message.source.client.id
    conversations = await t.call(sc.ConversationsApi(t.client()).list_conversations, t.app_id,
                                 sc.ConversationListFilter(user_id=event.user_id))
    assert [c.id for c in conversations.conversations] == [event.conversation_id]
    assert conversations.conversations[0].is_default is True


async def test_business_reply_goes_to_whatsapp_and_statuses_are_reported(wa: Wa) -> None:
    await wa.publish_inbound(wa.inbound("wamid.in"))
    user_id, conversation_id = await user_conversation(wa)
    t = wa.t
    messages = sc.MessagesApi(t.client())
    posted = (await t.call(messages.post_message, t.app_id, conversation_id, text_post("Hi Zoe"))).messages[0]
    outbound = [chan.decode(d) for _, d in await stored(
        wa.bus, subjects.OUTBOUND, f"outbound.whatsapp.{wa.integration_id}.")]
    assert len(outbound) == 1
    send = outbound[0]
    assert isinstance(send, chan.OutboundSend)
    assert send.message_id == posted.id and send.recipient == "15551234" and send.user_id == user_id
    assert send.recipient_info == {"phoneNumber": "+15551234"}
    assert isinstance(send.content, TextContent) and send.content.text == "Hi Zoe"
    # A silent message (integrationType none) is stored but not sent.
    status, _ = await t.request("POST", f"/v2/apps/{t.app_id}/conversations/{conversation_id}/messages", body={
        "author": {"type": "business"}, "content": {"type": "text", "text": "note"},
        "destination": {"integrationType": "none"}})
    assert status == 201
    assert len(await stored(wa.bus, subjects.OUTBOUND)) == 1
    # `delivered` arrives before `sent` has mapped the provider id: it is retried, then reported.
    await wa.publish_status("delivered", "wamid.out1")
    await wa.publish_status("sent", "wamid.out1", message_id=posted.id, conversation_id=conversation_id)
    await wa.publish_status("read", "wamid.out1")
    await wa.publish_status("failed", "wamid.out1", error_code="131047", error_title="Re-engagement message")
    await wa.publish_status("sent", "wamid.out1", message_id=posted.id)  # a redelivered `sent`

    async def reports() -> list[conv.DeliveryReported] | None:
        found = [e for e in await events(wa.bus, t.app_id) if isinstance(e, conv.DeliveryReported)]
        return found if len(found) >= 4 else None

    found = await eventually(reports, timeout=8)
    await consumed(wa.bus, subjects.CONVERSATIONS_STATUS, 5)
    found = [e for e in await events(wa.bus, t.app_id) if isinstance(e, conv.DeliveryReported)]
    by_kind = {(e.kind, e.read): e for e in found}
    assert len(found) == 4  # the second `sent` is the same event id, de-duplicated
    assert set(by_kind) == {("channel", False), ("user", False), ("user", True), ("failure", False)}
    channel = by_kind[("channel", False)]
    assert channel.message_id == posted.id and channel.user.id == user_id
    assert channel.destination.type == "whatsapp" and channel.destination.integration_id == wa.integration_id
    assert [m.id for m in channel.external_messages] == ["wamid.out1"]
    failure = by_kind[("failure", False)]
    assert failure.is_final and failure.error is not None and failure.error.code == "131047"
    hook = webhook_event(failure)
    assert hook is not None and hook[0] == "conversation:message:delivery:failure"


async def test_postback_and_unsupported_content(wa: Wa) -> None:
    # A reply-button tap quotes the business message it answers (WhatsApp's context.id).
    await wa.publish_inbound(wa.inbound("wamid.p", text="", postback=Postback(payload="BUY_1", text="Buy"),
                                        quoted_provider_message_id="wamid.OUTBOUND1"))
    await wa.publish_inbound(wa.inbound("wamid.u", content=UnsupportedContent(channel_type="whatsapp",
                                                                              raw={"type": "sticker"})))
    await consumed(wa.bus, subjects.CONVERSATIONS_INBOUND, 2)
    _, conversation_id = await user_conversation(wa)
    t = wa.t
    status, body = await t.request("GET", f"/v2/apps/{t.app_id}/conversations/{conversation_id}/messages")
    assert status == 200
    contents = [m["content"] for m in body["messages"]]
    assert contents[0] == {"type": "text", "text": "Buy", "payload": "BUY_1"}
    assert body["messages"][0]["quotedMessage"] == {"type": "externalMessageId",
                                                    "externalMessageId": "wamid.OUTBOUND1"}
    assert contents[1]["type"] == "text" and "unsupported" in contents[1]["text"]
    # The client parses both.
    listed = await t.call(sc.MessagesApi(t.client()).list_messages, t.app_id, conversation_id)
    assert len(listed.messages) == 2
    assert listed.messages[0].quoted_message is not None


async def test_inbound_for_unknown_integration_is_dropped(wa: Wa) -> None:
    stray = wa.inbound("wamid.x", integration_id=new_id())
    await wa.bus.publish(chan.subject_of(stray), chan.encode(stray))
    await consumed(wa.bus, subjects.CONVERSATIONS_INBOUND, 1)
    assert await events(wa.bus, wa.t.app_id) == []


async def test_customer_read_activity(wa: Wa) -> None:
    await wa.publish_inbound(wa.inbound("wamid.r"))
    user_id, conversation_id = await user_conversation(wa)
    t = wa.t
    await t.call(sc.MessagesApi(t.client()).post_message, t.app_id, conversation_id, text_post("unread"))
    participants = sc.ParticipantsApi(t.client())
    before = (await t.call(participants.list_participants, t.app_id, conversation_id)).participants[0]
    assert before.unread_count == 1
    participant_client = before.client_associations[0].client_id
    await wa.publish_inbound(chan.InboundActivity(
        app_id=t.app_id, integration_id=wa.integration_id, channel="whatsapp", user_id=user_id,
        client_id=participant_client, conversation_id=conversation_id, activity="conversation:read",
        at=time.time()))

    async def read() -> Any:
        found = (await t.call(participants.list_participants, t.app_id, conversation_id)).participants[0]
        return found if found.unread_count == 0 and found.last_read else None

    assert (await eventually(read)).last_read.endswith("Z")

    async def announced() -> list[conv.ActivityPosted]:
        # The read is stored before it is announced: the history can show it a moment earlier.
        return [e for e in await events(wa.bus, t.app_id) if isinstance(e, conv.ActivityPosted)]

    await eventually(announced)
    await asyncio.sleep(0.2)  # a second announcement, were there one, would be there by now
    activity = await announced()
    assert len(activity) == 1 and activity[0].activity.type == "conversation:read"
    assert activity[0].activity.author is not None and activity[0].activity.author.type == "user"


async def test_start_and_history_endpoints(wa: Wa) -> None:
    t = wa.t
    web_status, web = await t.request("POST", f"/v2/apps/{t.app_id}/integrations", body={"type": "web"})
    assert web_status == 201
    user = (await t.call(sc.UsersApi(t.client()).create_user, t.app_id,
                         sc.UserCreateBody(external_id="sdk-user"))).user
    client_id = new_id()
    request = conv.StartConversation(app_id=t.app_id, integration_id=web["integration"]["id"], user_id=user.id,
                                     client_id=client_id)
    started = conv.decode_request(await wa.bus.request(subjects.CONVERSATIONS_START, conv.ENCODER.encode(request)))
    assert isinstance(started, conv.ConversationStarted) and started.created
    again = conv.decode_request(await wa.bus.request(subjects.CONVERSATIONS_START, conv.ENCODER.encode(request)))
    assert isinstance(again, conv.ConversationStarted) and not again.created
    assert again.conversation.id == started.conversation.id
    conversation_id = started.conversation.id
    participants = await t.call(sc.ParticipantsApi(t.client()).list_participants, t.app_id, conversation_id)
    assert [(a.type, a.client_id) for a in participants.participants[0].client_associations] == [("sdk", client_id)]
    # A business message to an sdk-primary user is not sent to any channel service.
    for text in ("one", "two", "three"):
        await t.call(sc.MessagesApi(t.client()).post_message, t.app_id, conversation_id, text_post(text))
    assert await stored(wa.bus, subjects.OUTBOUND) == []

    async def history(**fields: Any) -> conv.ConversationRequestUnion:
        req = conv.GetHistory(app_id=t.app_id, conversation_id=conversation_id, **fields)
        return conv.decode_request(await wa.bus.request(subjects.CONVERSATIONS_HISTORY, conv.ENCODER.encode(req)))

    latest = await history(user_id=user.id, limit=2)
    assert isinstance(latest, conv.HistoryPage) and latest.has_more
    assert [m.message.content.text for m in latest.messages] == ["two", "three"]  # type: ignore[union-attr]
    first_cursor = latest.messages[0].cursor - 1
    after = await history(after=first_cursor, limit=10)
    assert isinstance(after, conv.HistoryPage) and not after.has_more
    assert [m.message.content.text for m in after.messages] == ["two", "three"]  # type: ignore[union-attr]
    assert after.messages[0].cursor < after.messages[1].cursor
    stranger = await history(user_id=new_id())
    assert isinstance(stranger, conv.ConversationError) and stranger.status == 404
    missing = conv.decode_request(await wa.bus.request(subjects.CONVERSATIONS_HISTORY, conv.ENCODER.encode(
        conv.GetHistory(app_id=t.app_id, conversation_id=new_id()))))
    assert isinstance(missing, conv.ConversationError) and missing.status == 404


async def test_a_blocking_failure_marks_the_client_blocked(wa: Wa) -> None:
    await wa.publish_inbound(wa.inbound("wamid.b1"))
    user_id, conversation_id = await user_conversation(wa)
    t = wa.t
    posted = (await t.call(sc.MessagesApi(t.client()).post_message, t.app_id, conversation_id,
                           text_post("are you there?"))).messages[0]
    await wa.publish_status("sent", "wamid.out-b1", message_id=posted.id, conversation_id=conversation_id)
    await wa.publish_status("failed", "wamid.out-b1", error_code="21610", error_title="unsubscribed")

    async def updated() -> conv.ClientUpdated | None:
        return next((e for e in await events(wa.bus, t.app_id) if isinstance(e, conv.ClientUpdated)), None)

    event = await eventually(updated)
    assert event.reason == "blocked" and event.client.status == "blocked" and event.user.id == user_id
    webhook = webhook_event(event)
    assert webhook is not None and webhook[0] == "client:update"
    assert webhook[1]["payload"]["reason"] == "blocked"
    clients = await t.call(sc.ClientsApi(t.client()).list_clients, t.app_id, user_id)
    assert [c.status for c in clients.clients] == ["blocked"]
    # A failure that is not a block leaves other clients alone.
    assert sum(isinstance(e, conv.ClientUpdated) for e in await events(wa.bus, t.app_id)) == 1


async def test_a_user_ended_through_another_replica_leaves_no_cached_resolution(wa: Wa) -> None:
    """A merge or deletion made through another replica reaches this one's identity cache over
    NATS (the ended-users bucket identity writes), not after the cache's TTL."""
    await wa.publish_inbound(wa.inbound("wamid.cache"))
    user_id, _ = await user_conversation(wa)
    cache = wa.t.system.service("conversations").conversations.identity
    assert any(user.id == user_id for _, user, _ in cache._resolved.values())
    kv = await wa.bus.key_value(subjects.ENDED_USERS_BUCKET)
    await kv.put(user_id, ident.USER_ENDED_ENCODER.encode(ident.UserEnded(app_id=wa.t.app_id, reason="deleted")))

    async def forgotten() -> bool:
        return not any(user.id == user_id for _, user, _ in cache._resolved.values())

    await eventually(forgotten)


async def test_taps_and_numbered_answers_are_postbacks_or_replies_as_the_business_asked(wa: Wa) -> None:
    t = wa.t
    status, body = await t.request("POST", f"/v2/apps/{t.app_id}/integrations", body={
        "type": "twilio", "accountSid": "AC" + "b" * 32, "authToken": "twilio-token-0123456789",
        "phoneNumber": "+15550009999"})
    assert status == 201
    sms = Wa(t, wa.bus, body["integration"]["id"])

    def on_sms(provider_id: str, text: str) -> chan.InboundMessage:
        return sms.inbound(provider_id, text=text, channel="twilio", client_type="twilio")

    question = {"author": {"type": "business"}, "content": {"type": "text", "text": "How can we help?", "actions": [
        {"type": "postback", "text": "Talk to sales", "payload": "SALES", "metadata": {"team": "sales"}},
        {"type": "reply", "text": "Track my order", "payload": "TRACK"}]}}
    await wa.publish_inbound(wa.inbound("wamid.first", text="hi"))
    user_id, conversation_id = await user_conversation(wa)
    status, _ = await t.request("POST", f"/v2/apps/{t.app_id}/conversations/{conversation_id}/messages",
                                body=question)
    assert status == 201
    # Taps on WhatsApp's buttons carry their payload; a number typed there is just a number.
    await wa.publish_inbound(wa.inbound("wamid.tap1", text="Talk to sales",
                                        postback=Postback(payload="SALES", text="Talk to sales")))
    await wa.publish_inbound(wa.inbound("wamid.tap2", text="Track my order",
                                        postback=Postback(payload="TRACK", text="Track my order")))
    await wa.publish_inbound(wa.inbound("wamid.n1", text="1"))
    await consumed(wa.bus, subjects.CONVERSATIONS_INBOUND, 4)
    # On SMS the choices were numbered: a bare number answers the latest message if it is the business's.
    await sms.publish_inbound(on_sms("SM1", "hello"))
    await consumed(wa.bus, subjects.CONVERSATIONS_INBOUND, 5)
    sms_conversation = next(e.conversation_id for e in await events(wa.bus, t.app_id)
                            if isinstance(e, conv.MessageCreated) and e.message.source is not None
                            and e.message.source.type == "twilio")
    assert sms_conversation != conversation_id  # another number, another customer
    status, _ = await t.request("POST", f"/v2/apps/{t.app_id}/conversations/{sms_conversation}/messages",
                                body=question)
    assert status == 201
    await sms.publish_inbound(on_sms("SM2", " 1 "))  # → the postback
    await consumed(wa.bus, subjects.CONVERSATIONS_INBOUND, 6)
    status, _ = await t.request("POST", f"/v2/apps/{t.app_id}/conversations/{sms_conversation}/messages",
                                body=question)
    assert status == 201
    await sms.publish_inbound(on_sms("SM3", "2."))  # → the reply, in the customer's words
    await sms.publish_inbound(on_sms("SM4", "1"))  # the latest message is the customer's: just a number
    await consumed(wa.bus, subjects.CONVERSATIONS_INBOUND, 8)
    found = await events(wa.bus, t.app_id)
    postbacks = [e for e in found if isinstance(e, conv.PostbackReceived)]
    assert [(p.payload, p.metadata, p.conversation_id) for p in postbacks] == [
        ("SALES", {"team": "sales"}, conversation_id), ("SALES", {"team": "sales"}, sms_conversation)]
    assert postbacks[0].user.id == user_id and len({p.id for p in postbacks}) == 2
    hook = webhook_event(postbacks[0])
    assert hook is not None and hook[0] == "conversation:postback"
    parsed = sc.ConversationPostbackEvent.from_dict(hook[1])
    assert parsed.payload.postback.payload == "SALES" and parsed.payload.postback.metadata == {"team": "sales"}
    assert parsed.payload.user.id == user_id and parsed.payload.conversation.id == conversation_id

    async def user_said(conversation: str) -> list[dict[str, Any]]:
        status, body = await t.request("GET", f"/v2/apps/{t.app_id}/conversations/{conversation}/messages")
        assert status == 200
        return [m["content"] for m in body["messages"] if m["author"]["type"] == "user"]

    # Postbacks are not messages of the history; replies are, with their payload.
    assert await user_said(conversation_id) == [{"type": "text", "text": "hi"},
                                                {"type": "text", "text": "Track my order", "payload": "TRACK"},
                                                {"type": "text", "text": "1"}]
    assert await user_said(sms_conversation) == [{"type": "text", "text": "hello"},
                                                 {"type": "text", "text": "2.", "payload": "TRACK"},
                                                 {"type": "text", "text": "1"}]


async def test_a_replica_stalled_past_its_lease_stores_nothing_of_the_message_it_held(
        wa: Wa, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replica A holds a customer's second message when it stalls past its lease; B takes the
    partition over (a later epoch), gets the message again and stores it, then the third. A wakes
    up and goes on: its write is refused by the fence (nothing stored, not acknowledged), and it
    gives the partition up at once. The history holds the three messages once each, in order.
    (Unfenced, A's late write is a duplicate, but A goes on pulling the partition's next messages
    beside B until its own lease check tells it, and two consumers of one partition may store a
    sender's messages in either order.)"""
    system = wa.t.system
    a = system.service("conversations")
    await eventually(lambda: _holds_every_inbound_partition(a))
    first, second, third = (wa.inbound(f"wamid.fence.{n}", text) for n, text in
                            ((1, "one"), (2, "two"), (3, "three")))
    await wa.publish_inbound(first)
    _, conversation_id = await user_conversation(wa)

    store_a = a.conversations.store
    record = store_a.record_inbound
    holding, go_on = asyncio.Event(), asyncio.Event()
    outcome: list[object] = []

    async def held_at_the_write(**fields: Any) -> Any:
        if fields["provider_message_id"] != second.provider_message_id or outcome:
            return await record(**fields)
        holding.set()
        await go_on.wait()
        try:
            result = await record(**fields)
        except BaseException as exc:
            outcome.append(exc)
            raise
        outcome.append(result)
        return result

    monkeypatch.setattr(store_a, "record_inbound", held_at_the_write)
    await wa.publish_inbound(second)
    await asyncio.wait_for(holding.wait(), 10)
    partition = subjects.partition_of(subjects.inbound_key(wa.integration_id, "15551234"))
    taken_by_a = a.conversations.inbound_leases[partition].epoch
    leases_a = next(leases for leases in a.bus._leases if leases.group == subjects.CONVERSATIONS_INBOUND.group)
    await stall(leases_a)

    b = await system.start_replica("conversations")
    try:
        await eventually(lambda: _holds_every_inbound_partition(b))
        assert b.conversations.inbound_leases[partition].epoch > taken_by_a
        await wa.publish_inbound(third)

        async def texts() -> list[str] | None:
            stored_messages, _ = await b.conversations.store.messages_before(conversation_id, None, 100)
            found = [loads(message.body)["content"]["text"] for message in stored_messages]
            return found if len(found) == 3 else None

        assert await eventually(texts, timeout=20.0) == ["one", "two", "three"]
        go_on.set()
        await eventually(lambda: _settled(outcome), timeout=10.0)
        assert isinstance(outcome[0], fencing.StaleEpoch)
        await eventually(lambda: _gave_up(a, partition), timeout=10.0)
        assert await texts() == ["one", "two", "three"]
    finally:
        go_on.set()
        await b.stop()


async def _holds_every_inbound_partition(service: Any) -> bool:
    return len(service.conversations.inbound_leases) == subjects.PARTITIONS


async def _settled(outcome: list[object]) -> bool:
    return bool(outcome)


async def _gave_up(service: Any, partition: int) -> bool:
    return partition not in service.conversations.inbound_leases


async def test_a_customer_message_of_a_type_from_a_newer_version_is_kept_and_the_senders_next_waits(
        wa: Wa, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A newer `whatsapp` (mid-upgrade) publishes an inbound kind this `conversations` does not
    know: it is not terminated (a customer's message is never dropped; a newer replica will take
    it), and the same sender's next message waits behind it, as order per customer asks."""
    monkeypatch.setattr(bus_module, "NEWER_VERSION_RETRY_SECONDS", 0.1)
    after = wa.inbound("wamid.after", text="after the new kind")
    newer = json.dumps({"type": "channel.inbound.from.a.newer.version", "app_id": wa.t.app_id,
                        "integration_id": wa.integration_id, "channel_user_id": "15551234"}).encode()
    await wa.bus.publish(chan.subject_of(after), newer, msg_id="wamid.newer")
    await wa.publish_inbound(after)

    async def tried_again() -> bool:
        return sum("waiting for a newer replica" in r.getMessage() for r in caplog.records) >= 3

    await eventually(tried_again)
    assert not [e for e in await events(wa.bus, wa.t.app_id) if isinstance(e, conv.MessageCreated)]

    monkeypatch.setattr(bus_module, "NEWER_VERSION_PATIENCE_SECONDS", 0.0)  # rolled back: it is given up

    async def stored_after() -> bool:
        return any(isinstance(e, conv.MessageCreated) and e.message.source is not None
                   and e.message.source.original_message_id == "wamid.after"
                   for e in await events(wa.bus, wa.t.app_id))

    await eventually(stored_after)


async def test_a_message_claiming_another_channels_integration_is_not_believed(
        wa: Wa, caplog: pytest.LogCaptureFixture) -> None:
    """NATS lets each service publish only on its own channel's subjects. A message on the web
    channel's subject that claims to be a WhatsApp customer's (what a web service taken over from
    the internet could send) is refused, and the real customer's messages go on."""
    forged = wa.inbound("wamid.forged", text="transfer my balance")
    genuine = wa.inbound("wamid.genuine", text="hello")
    web_subject = subjects.inbound_subject("web", new_id(), forged.channel_user_id or "")
    await wa.bus.publish(web_subject, chan.encode(forged))
    await wa.publish_inbound(genuine)

    async def refused() -> bool:
        return any("refusing a message that claims whatsapp" in r.getMessage() for r in caplog.records)

    await eventually(refused)
    await consumed(wa.bus, subjects.CONVERSATIONS_INBOUND, 2)
    texts = [e.message.content.text for e in await events(wa.bus, wa.t.app_id)
             if isinstance(e, conv.MessageCreated) and isinstance(e.message.content, TextContent)]
    assert texts == ["hello"]
