"""Pure logic of the web service: tokens, origins, validation, bus messages, socket frames."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from services.web import handlers
from shared import sdk_service
from shared.http import ApiError
from shared.media import ALLOWED_TYPES
from shared.messages import conversation as conv
from shared.records import IntegrationRecord
from shared.sdk import (
    ChannelFrame,
    DeliveryFrame,
    MessageFrame,
    PostActivity,
    PostMessage,
    ReadFrame,
    SessionClaims,
    TypingFrame,
    decode_frame,
    encode_frame,
)
from shared.sunco import (
    Activity,
    Author,
    Client,
    ConversationRef,
    Destination,
    Message,
    Source,
    TextContent,
    UnsupportedContent,
    User,
    UserRef,
)

SECRET = "unit-test-sdk-secret-0123456789"
NOW = 1_800_000_000
CLAIMS = SessionClaims(typ="session", app="app1", user="u1", client="c1", integration="i1", channel_user_id="cu1",
                       conversation="conv1", iat=NOW, exp=NOW + 3600, sst=NOW)
REF = ConversationRef(id="conv1", type="personal")


def web_record(**config: object) -> IntegrationRecord:
    return IntegrationRecord(id="i1", app_id="app1", type="web", config=dict(config))


def test_token_round_trip_and_tampering() -> None:
    token = CLAIMS.to_token(SECRET)
    assert sdk_service.authenticate(SECRET, token, "app1", NOW) == CLAIMS
    body, sig = token.split(".")
    forged = msgspec.structs.replace(CLAIMS, user="u2")
    forged_body = forged.to_token("another-secret-0123456789").split(".")[0]
    for bad in (None, "", "garbage", f"{forged_body}.{sig}", f"{body}.{sig}x", CLAIMS.to_token("other-secret")):
        with pytest.raises(ApiError) as exc:
            sdk_service.authenticate(SECRET, bad, "app1", NOW)
        assert exc.value.status == 401
    with pytest.raises(ApiError) as exc:
        sdk_service.authenticate(SECRET, token, "another-app", NOW)
    assert exc.value.status == 401


def test_bearer_token_parsing() -> None:
    assert sdk_service.bearer_token("Bearer abc.def") == "abc.def"
    assert sdk_service.bearer_token("bearer  abc ") == "abc"
    assert sdk_service.bearer_token("Basic abc") is None
    assert sdk_service.bearer_token(None) is None
    assert sdk_service.bearer_token("Bearer ") is None


def test_web_integration_must_be_active_web_of_the_app() -> None:
    assert handlers.web_integration(web_record(), "app1").id == "i1"
    refused = [
        (None, "app1"),
        (web_record(), "app2"),
        (IntegrationRecord(id="i1", app_id="app1", type="whatsapp"), "app1"),
        (IntegrationRecord(id="i1", app_id="app1", type="web", status="inactive"), "app1"),
    ]
    for record, app_id in refused:
        with pytest.raises(ApiError) as exc:
            handlers.web_integration(record, app_id)
        assert exc.value.status == 404


def test_origin_whitelist() -> None:
    open_record = web_record()
    assert handlers.origin_allowed(open_record, "https://anything.example")
    locked = web_record(originWhitelist=["https://shop.example.com", "http://localhost:3000/"])
    assert handlers.origin_allowed(locked, "https://shop.example.com")
    assert handlers.origin_allowed(locked, "https://SHOP.example.com:443")
    assert handlers.origin_allowed(locked, "http://localhost:3000")
    assert not handlers.origin_allowed(locked, "http://localhost:3001")
    assert not handlers.origin_allowed(locked, "https://evil.example.com")
    assert not handlers.origin_allowed(locked, "null")
    assert handlers.origin_allowed(locked, None)  # not a browser
    with pytest.raises(ApiError) as exc:
        handlers.check_origin(locked, "https://evil.example.com")
    assert exc.value.status == 403


def test_public_config_exposes_no_secrets() -> None:
    record = IntegrationRecord(id="i1", app_id="app1", type="web", display_name="Shop",
                               config={"brandColor": "ff0000", "originWhitelist": ["https://a"], "secret": "x"})
    public = msgspec.to_builtins(handlers.public_config(record))
    assert public == {"integrationId": "i1", "displayName": "Shop", "brandColor": "ff0000"}


@pytest.mark.parametrize("raw,expected", [(None, None), ("", None), ("0", 0), ("42", 42)])
def test_parse_cursor(raw: str | None, expected: int | None) -> None:
    assert sdk_service.parse_cursor(raw) == expected


@pytest.mark.parametrize("raw", ["-1", "abc", "1.5", "9" * 30])
def test_parse_cursor_refuses(raw: str) -> None:
    with pytest.raises(ApiError) as exc:
        sdk_service.parse_cursor(raw)
    assert exc.value.status == 400


def test_post_message_validation() -> None:
    ok = PostMessage(client_message_id="3f1c2a9e-1b2c-4d5e-8f90-123456789abc", text="hello")
    assert sdk_service.validate_post_message(ok) is ok
    assert sdk_service.validate_post_message(PostMessage(client_message_id=ok.client_message_id, text="x" * 4096))
    for bad in (PostMessage(client_message_id="short", text="hi"),
                PostMessage(client_message_id="has spaces in it", text="hi"),
                PostMessage(client_message_id=ok.client_message_id, text="   "),
                PostMessage(client_message_id=ok.client_message_id, text="x" * 4097)):
        with pytest.raises(ApiError) as exc:
            sdk_service.validate_post_message(bad)
        assert exc.value.status == 400


def test_inbound_message_and_activity_carry_the_session() -> None:
    body = PostMessage(client_message_id="3f1c2a9e-1b2c-4d5e-8f90-123456789abc", text="hello")
    msg = sdk_service.inbound_message(CLAIMS, "conv1", body, 100.0, "web")
    assert (msg.app_id, msg.integration_id, msg.channel, msg.client_type) == ("app1", "i1", "web", "sdk")
    assert (msg.user_id, msg.client_id, msg.conversation_id, msg.channel_user_id) == ("u1", "c1", "conv1", "cu1")
    assert msg.provider_message_id == body.client_message_id
    assert msg.content == TextContent(text="hello")
    assert sdk_service.inbound_msg_id("web", body.client_message_id) == f"web:{body.client_message_id}"
    activity = sdk_service.inbound_activity(CLAIMS, "conv1", PostActivity(type="typing:start"), 5.0, "web")
    assert (activity.activity, activity.user_id, activity.conversation_id, activity.at) == (
        "typing:start", "u1", "conv1", 5.0)


def test_conversation_error_becomes_api_error() -> None:
    data = conv.ENCODER.encode(conv.ConversationError(status=404, code="conversation_not_found", title="nope"))
    with pytest.raises(ApiError) as exc:
        sdk_service.conversation_reply(data)
    assert (exc.value.status, exc.value.code) == (404, "conversation_not_found")
    with pytest.raises(ApiError) as exc:
        sdk_service.conversation_reply(b"not json")
    assert exc.value.status == 503


def _message(mid: str, author: str = "business", content: TextContent | UnsupportedContent | None = None) -> Message:
    return Message(id=mid, received="2026-01-01T00:00:00.000Z", author=Author(type=author),  # type: ignore[arg-type]
                   content=content or TextContent(text=mid), source=Source(type="api:conversations"))


def test_history_page_sorted_and_rendered() -> None:
    page = conv.HistoryPage(conversation=REF, messages=[
        conv.HistoryMessage(cursor=3, message=_message("m3", content=UnsupportedContent(channel_type="whatsapp"))),
        conv.HistoryMessage(cursor=2, message=_message("m2")),
    ], has_more=True, business_last_read=0.5)
    out = sdk_service.messages_page(page)
    assert [e.cursor for e in out.messages] == [2, 3]
    assert out.messages[1].message.content == TextContent(text="[unsupported whatsapp message]")
    wire = msgspec.to_builtins(out)
    assert wire["hasMore"] is True
    assert wire["businessLastRead"] == "1970-01-01T00:00:00.500Z"


def _event_base() -> dict[str, object]:
    return {"id": "e1", "app_id": "app1", "conversation_id": "conv1", "created_at": 10.0}


def test_event_frames() -> None:
    created = conv.MessageCreated(**_event_base(), conversation=REF, message=_message("m1"), cursor=7,  # type: ignore[arg-type]
                                  user_id="u1")
    frame = sdk_service.event_frame(created)
    assert isinstance(frame, MessageFrame) and frame.cursor == 7 and frame.message.id == "m1"
    wire = msgspec.json.decode(encode_frame(frame))
    assert wire["type"] == "message" and wire["cursor"] == 7 and wire["message"]["content"]["text"] == "m1"
    assert decode_frame(encode_frame(frame)) == frame

    def activity(kind: str, author: str | None) -> conv.ActivityPosted:
        return conv.ActivityPosted(**_event_base(), conversation=REF, user_id="u1",  # type: ignore[arg-type]
                                   activity=Activity(type=kind, author=Author(type=author) if author else None))  # type: ignore[arg-type]

    typing = sdk_service.event_frame(activity("typing:start", "business"))
    assert isinstance(typing, TypingFrame) and typing.active
    stop = sdk_service.event_frame(activity("typing:stop", "business"))
    assert isinstance(stop, TypingFrame) and not stop.active
    read = sdk_service.event_frame(activity("conversation:read", "business"))
    assert isinstance(read, ReadFrame) and read.at == "1970-01-01T00:00:10.000Z"
    assert sdk_service.event_frame(activity("typing:start", "user")) is None  # no echo of the customer
    delivery = conv.DeliveryReported(**_event_base(), kind="user", conversation=REF, user=UserRef(id="u1"),  # type: ignore[arg-type]
                                     message_id="m1", destination=Destination(type="web"), read=True)
    assert sdk_service.event_frame(delivery) == DeliveryFrame(message_id="m1", status="read")
    removed = conv.ConversationRemoved(**_event_base(), conversation=REF)  # type: ignore[arg-type]
    assert sdk_service.event_frame(removed) is None


def test_cursor_watermark_deduplicates() -> None:
    mark = sdk_service.CursorWatermark(5)
    assert [c for c in (3, 5, 6, 6, 7, 7, 9) if mark.admit(c)] == [6, 7, 9]
    assert mark.high == 9


def test_channel_frames_say_moved_only_when_the_new_client_is_primary() -> None:
    user = User(id="u1")
    active = Client(id="c1", type="whatsapp", status="active", integration_id="wa1")
    pending = Client(id="c1", type="whatsapp", status="pending", integration_id="wa1")
    moved = ChannelFrame(status="moved", client_type="whatsapp", integration_id="wa1")

    def added(client: Client, primary: bool = True) -> conv.ClientAdded:
        return conv.ClientAdded(id="e1", app_id="a", conversation_id="k", created_at=1.0, user=user,
                                client=client, primary=primary)

    def updated(reason: str, primary: bool) -> conv.ClientUpdated:
        return conv.ClientUpdated(id="e2", app_id="a", conversation_id="k", created_at=1.0, user=user,
                                  client=active, reason=reason, primary=primary)

    assert sdk_service.event_frame(added(active)) == moved  # a handoff link
    assert sdk_service.event_frame(added(pending)) is None  # a direct link not yet confirmed
    assert sdk_service.event_frame(added(active, primary=False)) is None  # e.g. a notification opt-in
    assert sdk_service.event_frame(updated("confirmed", primary=True)) == moved
    assert sdk_service.event_frame(updated("confirmed", primary=False)) is None
    assert sdk_service.event_frame(updated("blocked", primary=False)) is None


def test_the_widget_and_the_sandbox_app_offer_the_types_threadline_keeps() -> None:
    """The clients' own check of a file's type (before uploading) is shared/media.py's list."""
    root = Path(__file__).resolve().parents[2]
    for path, name in ((root / "services/web/static/threadline.js", "UPLOAD_TYPES"),
                       (root / "services/sandbox/static/phone.js", "APP_UPLOAD_TYPES")):
        found = re.search(rf"\b{name} = \[(.*?)\];", path.read_text(encoding="utf-8"), re.S)
        assert found is not None, path
        assert set(re.findall(r'"([^"]+)"', found.group(1))) == set(ALLOWED_TYPES), path
