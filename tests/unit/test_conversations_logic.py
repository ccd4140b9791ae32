"""Pure logic of the conversations service: query parsing, ids, ordering keys, the OpenAPI
document, and the handlers against a real database (SQLite, then PostgreSQL) with a recording
(or failing) publisher."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from multidict import MultiDict

from services.conversations import core, models
from services.conversations.api import OPERATIONS
from services.conversations.app import inbound_ordering_key, status_ordering_key
from services.conversations.handlers import Conversations, IdentityClient, derived_id
from services.conversations.openapi import openapi_document
from services.conversations.store import Store
from shared import metrics, records, subjects
from shared.db import DatabaseSettings
from shared.http import ApiError
from shared.ids import new_id, now
from shared.messages import channel as chan
from shared.messages import conversation as conv
from shared.messages import identity as ident
from shared.sunco import Author, TextContent, User


def q(**params: str) -> MultiDict[str]:
    return MultiDict(params)


def test_query_object_accepts_both_styles() -> None:
    brackets = models.query_object(MultiDict([("page[after]", "a" * 24), ("page[size]", "10")]), "page")
    as_json = models.query_object(q(page=json.dumps({"after": "a" * 24, "size": 10})), "page")
    assert brackets == as_json == {"after": "a" * 24, "size": "10"}
    assert models.query_object(q(filter='{"userId": "u1"}'), "filter") == {"userId": "u1"}
    assert models.query_object(q(), "page") == {}
    with pytest.raises(ApiError) as exc:
        models.query_object(q(page="[1]"), "page")
    assert exc.value.status == 400
    with pytest.raises(ApiError):
        models.query_object(q(page="{not json"), "page")


def test_page_params_validation() -> None:
    assert models.page_params(q()) == models.PageParams(None, None, 25)
    assert models.page_params(q(page=json.dumps({"before": "b" * 24, "size": 100}))) == models.PageParams(
        None, "b" * 24, 100)
    for bad in ({"after": "short"}, {"size": 0}, {"size": 101}, {"after": "a" * 24, "before": "b" * 24},
                {"after": "G" * 24}):
        with pytest.raises(ApiError) as exc:
            models.page_params(q(page=json.dumps(bad)))
        assert exc.value.status == 400


def test_metadata_and_webhook_checks() -> None:
    models.check_metadata({"a": 1, "b": "x", "c": True})
    with pytest.raises(ApiError):
        models.check_metadata({"nested": {"no": 1}})
    with pytest.raises(ApiError):
        models.check_metadata({"big": "x" * 5000})
    models.check_webhook("https://example.com/hook", ["conversation:message"])
    with pytest.raises(ApiError):
        models.check_webhook("ftp://example.com", None)
    with pytest.raises(ApiError):
        models.check_webhook(None, ["conversation:nope"])


def test_derived_ids_are_stable_24_hex() -> None:
    a = derived_id("m1", "i1", "sent")
    assert a == derived_id("m1", "i1", "sent") and a != derived_id("m1", "i1", "read")
    assert len(a) == 24 and all(c in "0123456789abcdef" for c in a)


def test_ordering_keys() -> None:
    message = chan.InboundMessage(app_id="a", integration_id="i", channel="whatsapp", client_type="whatsapp",
                                  channel_user_id="155", provider_message_id="p", received_at=1.0,
                                  content=TextContent(text="x"))
    assert inbound_ordering_key("inbound.whatsapp.i", chan.encode(message)) == "i:155"
    assert inbound_ordering_key("inbound.whatsapp.i", b"not json") == "inbound.whatsapp.i"
    status = chan.DeliveryStatus(app_id="a", integration_id="i", channel="whatsapp", provider_message_id="w1",
                                 status="sent", timestamp=1.0)
    assert status_ordering_key("status.whatsapp.i", chan.encode(status)) == "i:w1"


def test_openapi_document_covers_every_operation() -> None:
    doc = openapi_document(OPERATIONS, "http://localhost:8080")
    ops = {(method.upper(), path) for path, item in doc["paths"].items() for method in item}
    assert ops == {(op.method, op.path) for op in OPERATIONS}
    assert doc["paths"]["/v2/apps"]["post"]["responses"]["201"]
    schemas = doc["components"]["schemas"]
    assert "displayName" in schemas["AppCreateBody"]["properties"]
    assert schemas["MessagePostBody"]["required"] == ["author", "content"]
    json.dumps(doc)  # serializable


# --- handlers with a real database --------------------------------------------------------

class Recorder:
    """Records publishes, each acked with its place as its sequence; fails them all when `fail`
    is set, and the next `fail_desk_copies` publishes of desk copies."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, str | None]] = []
        self.fail = False
        self.fail_desk_copies = 0

    async def publish(self, subject: str, data: bytes, *, msg_id: str | None = None,
                      headers: Mapping[str, str] | None = None) -> Any:
        if self.fail:
            raise ConnectionError("bus down")
        if subject.startswith(subjects.DESK_COPY_PREFIX + ".") and self.fail_desk_copies:
            self.fail_desk_copies -= 1
            raise ConnectionError("no ack for the copy")
        self.published.append((subject, data, msg_id))
        return SimpleNamespace(seq=len(self.published))

    async def publish_together(self, messages: Sequence[tuple[str, bytes, str | None]]) -> list[Any]:
        results: list[Any] = []
        for subject, data, msg_id in messages:
            try:
                results.append(await self.publish(subject, data, msg_id=msg_id))
            except ConnectionError as exc:
                results.append(exc)
        return results

    async def request(self, subject: str, data: bytes, *, timeout: float = 5.0) -> bytes:
        raise TimeoutError


@pytest.fixture
async def handlers(database_settings: DatabaseSettings) -> AsyncIterator[tuple[Conversations, Recorder, str]]:
    """The handlers on a store of each engine (a SQLite file, then a PostgreSQL database)."""
    store = await Store.open(database_settings)
    recorder = Recorder()
    app_id = new_id()
    async with store.tx():
        await store.add_app(app_id, "A", {}, {}, now())
    try:
        yield Conversations(store, recorder, IdentityClient(recorder)), recorder, app_id
    finally:
        await store.close()


async def test_post_message_is_undone_when_the_bus_fails(handlers: tuple[Conversations, Recorder, str]) -> None:
    conversations, recorder, app_id = handlers
    row, created = await conversations.ensure_conversation(app_id, User(id=new_id()), reason="api")
    assert created and row["default_user_id"] is not None
    body = models.MessagePostBody(author=Author(type="business"), content=TextContent(text="hi"))
    recorder.fail = True
    with pytest.raises(ApiError) as exc:
        await conversations.post_message(app_id, row["id"], body)
    assert exc.value.status == 503
    messages, _, _ = await conversations.list_messages(row["id"], models.PageParams(None, None, 25))
    assert messages == []
    recorder.fail = False
    posted = await conversations.post_message(app_id, row["id"], body)
    subject, data, msg_id = recorder.published[-1]
    event = conv.decode(data)
    assert isinstance(event, conv.MessageCreated) and event.message.id == posted.id and msg_id == event.id
    assert subject == subjects.event_subject(app_id, row["id"])


async def test_default_conversation_is_created_once(handlers: tuple[Conversations, Recorder, str]) -> None:
    conversations, recorder, app_id = handlers
    user = User(id=new_id())
    first, created = await conversations.ensure_conversation(app_id, user, reason="message")
    second, created_again = await conversations.ensure_conversation(app_id, user, reason="message")
    assert created and not created_again and first["id"] == second["id"]
    extra, _ = await conversations.ensure_conversation(app_id, user, reason="api", default=False)
    assert extra["id"] != first["id"] and extra["default_user_id"] is None
    kinds = [type(conv.decode(d)).__name__ for _, d, _ in recorder.published]
    assert kinds == ["ConversationCreated", "ConversationCreated"]


async def test_failed_conversation_announcement_leaves_nothing(handlers: tuple[Conversations, Recorder, str]) -> None:
    conversations, recorder, app_id = handlers
    user = User(id=new_id())
    recorder.fail = True
    with pytest.raises(ConnectionError):
        await conversations.ensure_conversation(app_id, user, reason="message")
    assert await conversations.store.default_conversation(app_id, user.id) is None


async def test_history_request_errors_are_conversation_errors(handlers: tuple[Conversations, Recorder, str]) -> None:
    conversations, _, app_id = handlers
    reply = conv.decode_request(await conversations.answer(conv.ENCODER.encode(
        conv.GetHistory(app_id=app_id, conversation_id=new_id())), {}))
    assert isinstance(reply, conv.ConversationError) and reply.status == 404
    garbage = conv.decode_request(await conversations.answer(b"{}", {}))
    assert isinstance(garbage, conv.ConversationError) and garbage.status == 400
    assert msgspec.json.decode(await conversations.answer(b"[", {}))["status"] == 400


async def test_an_events_desk_copy_goes_with_it_and_is_retried_alone_then_given_up_without_failing_the_caller(
        database_settings: DatabaseSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core, "DESK_COPY_RETRY_DELAYS", (0.0, 0.0, 0.0))
    store = await Store.open(database_settings)
    recorder = Recorder()
    app_id = new_id()
    desk_app = records.AppRecord(id=app_id, display_name="A", switchboard=records.SwitchboardRecord(
        id="sb", enabled=True, integrations=[records.SwitchboardIntegrationRecord(id="m", name="desk",
                                                                                 integration_type="desk")]))
    conversations = Conversations(store, recorder, IdentityClient(recorder), apps=lambda _app: desk_app)
    try:
        async with store.tx():
            await store.add_app(app_id, "A", {}, {}, now())
        row, _ = await conversations.ensure_conversation(app_id, User(id=new_id()), reason="api")
        body = models.MessagePostBody(author=Author(type="business"), content=TextContent(text="hello"))
        copy_subject = subjects.desk_event_subject(app_id, row["id"])

        # The copy follows its original at once, or after a failed try or two.
        recorder.published.clear()
        recorder.fail_desk_copies = 2
        await conversations.post_message(app_id, row["id"], body)
        assert [subject for subject, _, _ in recorder.published] == [
            subjects.event_subject(app_id, row["id"]), copy_subject]
        assert recorder.published[1][2] == recorder.published[0][2] + ":desk"
        assert recorder.published[1][1] == recorder.published[0][1]

        # Given up after its tries: counted, and the message stands (the caller is not failed).
        assert "threadline_desk_copies_lost_total" in metrics.exported_series()
        lost = sum(metrics._desk_copies_lost._totals.values())
        recorder.published.clear()
        recorder.fail_desk_copies = 1 + len(core.DESK_COPY_RETRY_DELAYS)
        message = await conversations.post_message(app_id, row["id"], body)
        assert [subject for subject, _, _ in recorder.published] == [subjects.event_subject(app_id, row["id"])]
        assert sum(metrics._desk_copies_lost._totals.values()) == lost + 1
        assert await store.get_message(app_id, message.id) is not None
    finally:
        await store.close()


class IdentityAnswers(Recorder):
    """The bus, with identity answering who a user is and their deletion."""

    def __init__(self, user: User) -> None:
        super().__init__()
        self.user = user

    async def request(self, subject: str, data: bytes, *, timeout: float = 5.0) -> bytes:
        if subject == subjects.IDENTITY_USER_GET:
            return ident.encode(ident.UserReply(user=self.user))
        if subject == subjects.IDENTITY_USER_DELETE:
            return ident.encode(ident.Deleted(user_id=self.user.id))
        raise TimeoutError


async def test_a_user_deletion_whose_announcement_failed_is_retried_with_every_conversation_named(
        database_settings: DatabaseSettings) -> None:
    store = await Store.open(database_settings)
    user = User(id=new_id())
    bus = IdentityAnswers(user)
    conversations = Conversations(store, bus, IdentityClient(bus))
    app_id = new_id()
    try:
        async with store.tx():
            await store.add_app(app_id, "A", {}, {}, now())
        row, _ = await conversations.ensure_conversation(app_id, user, reason="api")
        await conversations.post_message(app_id, row["id"], models.MessagePostBody(
            author=Author(type="business"), content=TextContent(text="your order")))
        # The bus refuses `user:remove` once the history is gone: the retry still names the
        # conversation, from the deletion's note.
        bus.fail = True
        with pytest.raises(ApiError) as refused:
            await conversations.delete_user(app_id, user.id)
        assert refused.value.status == 503
        assert await store.get_conversation(app_id, row["id"]) is None
        bus.fail = False
        await conversations.delete_user(app_id, user.id)
        removed = [conv.decode(data) for subject, data, _ in bus.published
                   if b"conversation.user.removed" in data and subject == subjects.event_subject(app_id, row["id"])]
        assert len(removed) == 1 and isinstance(removed[0], conv.UserRemoved)
        assert removed[0].conversation_ids == [row["id"]] and removed[0].conversation_id == row["id"]
        assert await store.get_conversation(app_id, row["id"]) is None
        assert await store.db.fetchval("SELECT count(*) FROM user_deletions") == 0
    finally:
        await store.close()
