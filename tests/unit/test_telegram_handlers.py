"""Pure logic of the telegram service: deep links, normalization, send bodies, error classes, config."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from services.telegram import handlers
from services.telegram.config import TelegramConfig
from services.telegram.handlers import Credentials, _Entity
from shared.config import ConfigError
from shared.encryption import KEY_ENV
from shared.messages.channel import OutboundSend
from shared.records import IntegrationRecord
from shared.sunco import (
    FileContent,
    ImageContent,
    LocationContent,
    LocationCoordinates,
    LocationRequestAction,
    ReplyAction,
    TemplateContent,
    TextContent,
    UnsupportedContent,
    WebviewAction,
)
from tests.harness import SECRETS_KEY

CREDS = Credentials(integration_id="i1", app_id="a1", token="7000000001:AAE-token", webhook_secret="s3cret_-X",
                    base_url="https://api.telegram.org", username="gw_test_bot", bot_id="7000000001")
COMMAND = [_Entity(type="bot_command", offset=0, length=6)]


@pytest.mark.parametrize(("text", "entities", "expected"), [
    ("/start ref_abc-123", COMMAND, "ref_abc-123"),
    ("/start@gw_test_bot ref1", [_Entity("bot_command", 0, 18)], "ref1"),
    ("/start@GW_TEST_BOT ref1", [_Entity("bot_command", 0, 18)], "ref1"),
    ("/start@other_bot ref1", [_Entity("bot_command", 0, 16)], None),
    ("/start " + "x" * 64, COMMAND, "x" * 64),
    ("/start " + "x" * 65, COMMAND, None),
    ("/start a+b", COMMAND, None),
    ("/start two words", COMMAND, None),
    ("/start", COMMAND, None),
    ("/start ref1", [], None),  # no bot_command entity: the user typed it in a way Telegram did not mark
    ("/startref1", COMMAND, None),
    ("hello /start ref1", [_Entity("bot_command", 6, 6)], None),
])
def test_start_payload(text: str, entities: list[_Entity], expected: str | None) -> None:
    assert handlers.start_payload(text, entities, "gw_test_bot") == expected


def test_secret_check_is_exact_and_needs_a_usable_secret() -> None:
    assert handlers.secret_ok(CREDS, "s3cret_-X")
    assert not handlers.secret_ok(CREDS, "s3cret_-x")
    assert not handlers.secret_ok(CREDS, None)
    assert not handlers.secret_ok(CREDS, "")
    no_secret = Credentials(**{**CREDS.__dict__, "webhook_secret": ""})
    assert not handlers.secret_ok(no_secret, "")
    assert not no_secret.secret_usable
    assert not Credentials(**{**CREDS.__dict__, "webhook_secret": "has space"}).secret_usable


def record(**config: Any) -> IntegrationRecord:
    return IntegrationRecord(id="i1", app_id="a1", type="telegram", config=config)


def test_credentials_from_record() -> None:
    creds = Credentials.from_record(record(token="42:abc", webhookSecret="s", username="b"))
    assert creds is not None and creds.base_url == "https://api.telegram.org" and creds.bot_id == "42"
    assert creds.method_url("getMe") == "https://api.telegram.org/bot42:abc/getMe"
    assert creds.file_url("photos/f.jpg") == "https://api.telegram.org/file/bot42:abc/photos/f.jpg"
    assert Credentials.from_record(record(webhookSecret="s")) is None
    inactive = record(token="42:abc")
    inactive.status = "inactive"
    assert Credentials.from_record(inactive) is None
    whatsapp = IntegrationRecord(id="i1", app_id="a1", type="whatsapp", config={"token": "42:abc"})
    assert Credentials.from_record(whatsapp) is None
    sandbox = Credentials.from_record(record(token="42:abc", baseUrl="http://h/sandbox/telegram-api/", botId=7))
    assert sandbox is not None and sandbox.base_url == "http://h/sandbox/telegram-api" and sandbox.bot_id == "7"


def update(**content: Any) -> bytes:
    return json.dumps({"update_id": 10, **content}).encode()


MESSAGE = {"message_id": 5, "date": 1717000000, "from": {"id": 1, "is_bot": False, "first_name": "Ada"},
           "chat": {"id": 1, "type": "private", "first_name": "Ada"}}


def test_group_message_names_the_group_and_keys_on_the_chat() -> None:
    group = {**MESSAGE, "chat": {"id": -1001234, "type": "supergroup", "title": "Support"}, "text": "hi",
             "reply_to_message": {"message_id": 3, "date": 1, "chat": {"id": -1001234, "type": "supergroup"}}}
    normalized = handlers.normalize_update(update(message=group), CREDS, "https://gw")
    message = normalized.message
    assert message is not None and message.channel_user_id == "-1001234"
    assert message.display_name == "Support" and message.client_info["user_id"] == 1
    assert message.provider_message_id == "-1001234:5" and message.quoted_provider_message_id == "-1001234:3"


def test_unhandled_content_is_kept_as_unsupported() -> None:
    sticker = {**MESSAGE, "sticker": {"file_id": "x", "file_unique_id": "y", "type": "regular"}}
    message = handlers.normalize_update(update(message=sticker), CREDS, "https://gw").message
    assert message is not None and isinstance(message.content, UnsupportedContent)
    assert message.content.channel_type == "sticker"


def test_document_location_and_ignored_updates() -> None:
    document = {**MESSAGE, "document": {"file_id": "F1", "file_name": "a.pdf", "mime_type": "application/pdf"},
                "caption": "invoice"}
    doc = handlers.normalize_update(update(message=document), CREDS, "https://gw").message
    assert doc is not None and isinstance(doc.content, FileContent)
    assert doc.content.alt_text == "a.pdf" and doc.content.text == "invoice"
    assert doc.content.media_url.startswith("https://gw/webhooks/telegram/i1/media/F1?sig=")
    where = {**MESSAGE, "location": {"latitude": 48.85, "longitude": 2.35}}
    loc = handlers.normalize_update(update(message=where), CREDS, "https://gw").message
    assert loc is not None and loc.content == LocationContent(coordinates=LocationCoordinates(lat=48.85, long=2.35))
    edited = handlers.normalize_update(update(edited_message={**MESSAGE, "text": "x"}), CREDS, "https://gw")
    assert edited.message is None and edited.callback_query_id is None


def test_callback_without_message_or_data() -> None:
    query = {"id": "q1", "from": {"id": 9, "is_bot": False, "first_name": "Bo"}, "chat_instance": "1", "data": "y"}
    normalized = handlers.normalize_update(update(callback_query=query), CREDS, "https://gw")
    assert normalized.callback_query_id == "q1" and normalized.message is not None
    assert normalized.message.channel_user_id == "9" and normalized.message.postback is not None
    assert normalized.message.postback.text == "y"  # no message to find the button label on
    with pytest.raises(handlers.WebhookShapeError):
        handlers.normalize_update(update(callback_query={**query, "data": None}), CREDS, "https://gw")


@pytest.mark.parametrize("raw", [b"", b"[]", b'{"update_id": "1"}', b'{"update_id": -1}',
                                 b'{"update_id": 1, "message": {"message_id": 1}}', b"\xff"])
def test_bad_updates_are_shape_errors(raw: bytes) -> None:
    with pytest.raises(handlers.WebhookShapeError):
        handlers.normalize_update(raw, CREDS, "https://gw")


def send(content: Any, **extra: Any) -> OutboundSend:
    return OutboundSend(app_id="a1", integration_id="i1", channel="telegram", conversation_id="c1", message_id="m1",
                        user_id="u1", client_id="k1", recipient="111", content=content, **extra)


def test_build_request_text_photo_file_location() -> None:
    method, params = handlers.build_request(send(TextContent(text="hi", actions=[
        ReplyAction(text="Yes", payload="y"), WebviewAction(text="Open", uri="https://x/y", fallback="https://x"),
        LocationRequestAction(text="Where")]), quoted_provider_message_id="111:7"))
    assert method == "sendMessage"
    assert params == {"chat_id": 111, "text": "hi", "reply_markup": {"inline_keyboard": [
        [{"text": "Yes", "callback_data": "y"}], [{"text": "Open", "url": "https://x/y"}]]},
        "reply_parameters": {"message_id": 7, "allow_sending_without_reply": True}}
    assert handlers.build_request(send(ImageContent(media_url="https://x/a.jpg"))) == (
        "sendPhoto", {"chat_id": 111, "photo": "https://x/a.jpg"})
    method, params = handlers.build_request(send(FileContent(media_url="https://x/a.pdf", text="c" * 2000)))
    assert method == "sendDocument" and len(params["caption"]) == handlers.CAPTION_MAX
    assert handlers.build_request(send(LocationContent(coordinates=LocationCoordinates(lat=1.5, long=2.5)))) == (
        "sendLocation", {"chat_id": 111, "latitude": 1.5, "longitude": 2.5})
    _method, params = handlers.build_request(send(TextContent(text="t" * 5000)))
    assert len(params["text"]) == handlers.TEXT_MAX
    _method, params = handlers.build_request(msgspec.structs.replace(send(TextContent(text="x")),
                                                                     recipient="@channel"))
    assert params["chat_id"] == "@channel"


def test_a_payload_past_callback_datas_64_bytes_goes_as_numbered_text() -> None:
    method, params = handlers.build_request(send(TextContent(text="x", actions=[
        ReplyAction(text="Yes", payload="é" * 33)])))  # 66 bytes: no button can carry it back
    assert method == "sendMessage" and params["text"] == "x\n\n1. Yes" and "reply_markup" not in params


@pytest.mark.parametrize("content", [
    TextContent(text="  "),
    ImageContent(media_url=""),
    TemplateContent(template={"name": "t"}),
])
def test_unsendable(content: Any) -> None:
    with pytest.raises(handlers.UnsendableContent):
        handlers.build_request(send(content))


def body(**doc: Any) -> bytes:
    return json.dumps({"ok": False, **doc}).encode()


def test_classify_errors() -> None:
    flood = handlers.classify_error(429, body(error_code=429, description="Too Many Requests: retry after 7",
                                              parameters={"retry_after": 7}))
    assert flood.transient and flood.retry_after == 7 and flood.code == "telegram_429"
    blocked = handlers.classify_error(403, body(error_code=403, description="Forbidden: bot was blocked by the user"))
    assert not blocked.transient and blocked.code == handlers.BLOCKED_ERROR_CODE == "telegram_403_blocked"
    assert blocked.description == "Forbidden: bot was blocked by the user"
    migrated = handlers.classify_error(400, body(error_code=400, description="Bad Request: group chat was upgraded",
                                                 parameters={"migrate_to_chat_id": -100123}))
    assert not migrated.transient and handlers.failure_details(migrated) == "migrate_to_chat_id=-100123"
    assert handlers.classify_error(502, b"<html>bad gateway</html>").transient
    assert handlers.classify_error(502, b"<html>").code == "telegram_502"
    unauthorized = handlers.classify_error(401, body(error_code=401, description="Unauthorized"))
    assert not unauthorized.transient and unauthorized.code == "telegram_401"


def test_ok_results() -> None:
    result = handlers.parse_ok_result(b'{"ok":true,"result":{"message_id":4,"chat":{"id":-5},"date":1}}')
    assert handlers.sent_message_id(result) == "-5:4"
    for bad in (b"nope", b'{"ok":false}', b'{"ok":true}'):
        with pytest.raises(handlers.SendFailure):
            handlers.parse_ok_result(bad)
    with pytest.raises(handlers.SendFailure):
        handlers.sent_message_id(True)


def test_registration_changes_with_any_field() -> None:
    base = handlers.WebhookRegistration.of(CREDS, "https://gw/")
    assert base.url == "https://gw/webhooks/telegram/i1" and base.secret == "s3cret_-X"
    assert handlers.WebhookRegistration.of(CREDS, "https://gw") == base
    rotated = Credentials(**{**CREDS.__dict__, "webhook_secret": "other"})
    assert handlers.WebhookRegistration.of(rotated, "https://gw") != base
    assert handlers.set_webhook_params(CREDS, base.url) == {
        "url": base.url, "secret_token": "s3cret_-X", "allowed_updates": ["message", "callback_query"]}


def test_ids_and_group_detection() -> None:
    message = handlers.normalize_update(update(message={**MESSAGE, "text": "x"}), CREDS, "https://gw").message
    assert message is not None and handlers.inbound_msg_id(message) == "telegram:i1:1:5"
    assert handlers.is_group_chat("-100123") and not handlers.is_group_chat("123")


def test_config_validation() -> None:
    config = TelegramConfig.from_env({KEY_ENV: SECRETS_KEY})
    assert config.bot_messages_per_second == 30 and config.chat_messages_per_second == 1
    assert config.group_messages_per_minute == 20 and config.common.http_port == 8088
    for bad in ({"TELEGRAM_CHAT_MESSAGES_PER_SECOND": "0"}, {"TELEGRAM_MAX_SEND_ATTEMPTS": "0"},
                {"TELEGRAM_RETRY_BASE_SECONDS": "5", "TELEGRAM_RETRY_MAX_SECONDS": "1"},
                {"TELEGRAM_WEBHOOK_RETRY_BASE_SECONDS": "0"}):
        with pytest.raises(ConfigError):
            TelegramConfig.from_env(bad)
