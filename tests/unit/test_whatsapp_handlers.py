"""Pure logic of the whatsapp service: parsing/normalization, send bodies, error classes, back-off, throttling."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.whatsapp import handlers
from services.whatsapp.handlers import Credentials, WebhookShapeError
from shared.messages.channel import OutboundSend
from shared.records import IntegrationRecord
from shared.signing import meta_handshake_challenge
from shared.sunco import (
    FileContent,
    LinkAction,
    LocationContent,
    LocationCoordinates,
    LocationInfo,
    PostbackAction,
    ReplyAction,
    TemplateContent,
    TextContent,
    UnsupportedContent,
)

CONFIG = {"phoneNumberId": "111", "accessToken": "tok", "appSecret": "sec", "verifyToken": "vt",
          "apiVersion": "23.0", "baseUrl": "http://fake/graph/"}
BASE = "https://gw.example"


def creds(**config: Any) -> Credentials:
    record = IntegrationRecord(id="int1", app_id="app1", type="whatsapp", config={**CONFIG, **config})
    found = Credentials.from_record(record)
    assert found is not None
    return found


def envelope(*values: dict[str, Any], field: str = "messages") -> bytes:
    return json.dumps({"object": "whatsapp_business_account", "entry": [
        {"id": "waba", "changes": [{"field": field, "value": value}]} for value in values]}).encode()


def text_value(wamid: str, sender: str = "15551234567", phone_id: str = "111", **message: Any) -> dict[str, Any]:
    return {"messaging_product": "whatsapp", "metadata": {"phone_number_id": phone_id},
            "contacts": [{"profile": {"name": "Ada"}, "wa_id": sender}],
            "messages": [{"from": sender, "id": wamid, "timestamp": "1717000000", "type": "text",
                          "text": {"body": "hi"}, **message}]}


def no_siblings(_phone_id: str) -> Credentials | None:
    return None


def test_credentials_from_record() -> None:
    c = creds()
    assert c.api_version == "v23.0" and c.base_url == "http://fake/graph"
    assert c.messages_url == "http://fake/graph/v23.0/111/messages"
    assert creds(baseUrl="").base_url == "https://graph.facebook.com"
    assert Credentials.from_record(IntegrationRecord(id="i", app_id="a", type="web", config=CONFIG)) is None
    assert Credentials.from_record(IntegrationRecord(id="i", app_id="a", type="whatsapp",
                                                     config={**CONFIG, "appSecret": ""})) is None
    assert Credentials.from_record(IntegrationRecord(id="i", app_id="a", type="whatsapp", status="inactive",
                                                     config=CONFIG)) is None


def test_handshake() -> None:
    token = creds().verify_token
    assert meta_handshake_challenge(token, "subscribe", "vt", "123") == "123"
    assert meta_handshake_challenge(token, "subscribe", "nope", "123") is None
    assert meta_handshake_challenge(token, "other", "vt", "123") is None
    assert meta_handshake_challenge(creds(verifyToken="").verify_token, "subscribe", "", "123") is None
    assert meta_handshake_challenge(None, "subscribe", "vt", "123") is None


def test_every_entry_change_message_and_status_is_read() -> None:
    statuses = {"metadata": {"phone_number_id": "111"}, "statuses": [
        {"id": "wamid.O1", "status": "played", "timestamp": "1717000005", "recipient_id": "1",
         "biz_opaque_callback_data": "tl:conv9:msg9"},
        {"id": "wamid.O2", "status": "deleted", "timestamp": "1717000006"},
        {"id": "wamid.O3", "status": "failed", "timestamp": "1717000007", "errors": [
            {"code": 131026, "title": "Message Undeliverable", "error_data": {"details": "nope"}}]}]}
    two = text_value("wamid.B")
    two["messages"].append({"from": "15551234567", "id": "wamid.C", "timestamp": "1717000001", "type": "text",
                            "text": {"body": "again"}})
    raw = envelope(text_value("wamid.A"), two, statuses)
    out = handlers.normalize_webhook(raw, creds(), no_siblings, BASE)
    assert [m.provider_message_id for m in out.messages] == ["wamid.A", "wamid.B", "wamid.C"]
    assert [(s.provider_message_id, s.status) for s in out.statuses] == [("wamid.O1", "read"), ("wamid.O3", "failed")]
    assert out.statuses[0].message_id == "msg9" and out.statuses[0].conversation_id == "conv9"
    failed = out.statuses[1]
    assert (failed.error_code, failed.error_title, failed.error_details) == ("131026", "Message Undeliverable", "nope")
    assert out.messages[0].channel_user_id == "15551234567" and out.messages[0].display_name == "Ada"
    assert out.messages[0].received_at == 1717000000.0


def test_other_fields_are_ignored_and_siblings_routed() -> None:
    assert handlers.normalize_webhook(envelope({"anything": 1}, field="account_update"), creds(),
                                      no_siblings, BASE).messages == []
    sibling = Credentials(integration_id="int2", app_id="app2", phone_number_id="222", access_token="t",
                          app_secret="sec", verify_token="", api_version="v23.0", base_url="x")
    stranger = Credentials(integration_id="int3", app_id="app3", phone_number_id="333", access_token="t",
                           app_secret="other", verify_token="", api_version="v23.0", base_url="x")
    lookup = {"222": sibling, "333": stranger}.get
    out = handlers.normalize_webhook(envelope(text_value("wamid.S", phone_id="222"),
                                              text_value("wamid.X", phone_id="333")), creds(), lookup, BASE)
    assert [(m.provider_message_id, m.integration_id, m.app_id) for m in out.messages] == [("wamid.S", "int2", "app2")]


@pytest.mark.parametrize("raw", [
    b"", b"null", b"[]", b'{"object":"page","entry":[]}', b'{"object":"whatsapp_business_account"}',
    b'{"object":"whatsapp_business_account","entry":{}}',
])
def test_malformed_notifications_raise(raw: bytes) -> None:
    with pytest.raises(WebhookShapeError):
        handlers.normalize_webhook(raw, creds(), no_siblings, BASE)


def _good(wamid: str) -> dict[str, Any]:
    return {"from": "15551234567", "id": wamid, "timestamp": "1717000000", "type": "text", "text": {"body": "hi"}}


BAD_MESSAGES = [
    {**_good("wamid.BAD"), "timestamp": "yesterday"},
    {**_good("wamid.BAD"), "timestamp": "inf"},
    {k: v for k, v in _good("wamid.BAD").items() if k != "from"} | {"id": "wamid.BAD"},
    {k: v for k, v in _good("wamid.BAD").items() if k != "text"},
    {**_good("wamid.BAD"), "type": "location", "location": {"latitude": "north"}},
    {"type": "text"},
    "not a message",
]


@pytest.mark.parametrize("bad", BAD_MESSAGES)
def test_a_malformed_message_is_rejected_and_its_siblings_kept(bad: Any) -> None:
    value = {"metadata": {"phone_number_id": "111"}, "messages": [_good("wamid.G1"), bad, _good("wamid.G2")],
             "statuses": [{"id": "wamid.S", "status": "read", "timestamp": "1717000001", "recipient_id": "1"},
                          {"id": "wamid.S2", "status": "read", "timestamp": "later"}]}
    out = handlers.normalize_webhook(envelope(value), creds(), no_siblings, BASE)
    assert [m.provider_message_id for m in out.messages] == ["wamid.G1", "wamid.G2"]
    assert [s.provider_message_id for s in out.statuses] == ["wamid.S"]
    assert [r.where for r in out.rejected] == ["entry[0].changes[0].value.messages[1]",
                                               "entry[0].changes[0].value.statuses[1]"]
    assert out.rejected[1].provider_id == "wamid.S2"
    if isinstance(bad, dict) and "id" in bad:
        assert out.rejected[0].provider_id == "wamid.BAD"


def test_a_malformed_change_is_rejected_and_the_other_changes_kept() -> None:
    raw = json.dumps({"object": "whatsapp_business_account", "entry": [
        {"id": "waba", "changes": [{"field": "messages", "value": {"messages": "nope"}},
                                   {"field": "messages"},
                                   {"field": "messages", "value": {"messages": [_good("wamid.OK")]}}]},
        "not an entry",
    ]}).encode()
    out = handlers.normalize_webhook(raw, creds(), no_siblings, BASE)
    assert [m.provider_message_id for m in out.messages] == ["wamid.OK"]
    assert [r.where for r in out.rejected] == ["entry[0].changes[0]", "entry[0].changes[1]", "entry[1]"]


def test_contact_matching_and_unsupported_kept() -> None:
    value = {"contacts": [{"profile": {"name": "Bob"}, "wa_id": "2", "user_id": "US.2"},
                          {"profile": {"name": "Ada"}, "wa_id": "1", "user_id": "US.1"}],
             "messages": [{"from": "1", "id": "wamid.R", "timestamp": "1", "type": "reaction",
                           "reaction": {"message_id": "wamid.O", "emoji": "x"}}]}
    [message] = handlers.normalize_webhook(envelope(value), creds(), no_siblings, BASE).messages
    assert message.display_name == "Ada" and message.channel_user_id == "US.1"
    assert message.client_info == {"phone_number_id": "111", "wa_id": "1", "bsuid": "US.1"}
    assert isinstance(message.content, UnsupportedContent) and message.content.channel_type == "reaction"
    assert message.content.raw["reaction"]["message_id"] == "wamid.O"


def test_documents_become_files_with_gateway_media_urls() -> None:
    value = text_value("wamid.D", type="document", document={"id": "m1", "mime_type": "application/pdf",
                                                             "filename": "a.pdf"})
    [message] = handlers.normalize_webhook(envelope(value), creds(), no_siblings, BASE).messages
    assert isinstance(message.content, FileContent)
    sig = handlers.media_signature("sec", "int1", "m1")
    assert message.content.media_url == f"{BASE}/webhooks/whatsapp/int1/media/m1?sig={sig}"
    assert message.content.alt_text == "a.pdf"


def send(content: Any, **extra: Any) -> OutboundSend:
    return OutboundSend(app_id="a", integration_id="int1", channel="whatsapp", conversation_id="c1",
                        message_id="m1", user_id="u", client_id="cl", recipient="US.123",
                        recipient_info={"wa_id": "+1 555 123"}, content=content, **extra)


def test_text_and_buttons_bodies() -> None:
    body = handlers.build_send_body(send(TextContent(text="hello"), quoted_provider_message_id="wamid.IN"))
    assert body == {"messaging_product": "whatsapp", "recipient_type": "individual", "to": "1555123",
                    "type": "text", "text": {"body": "hello", "preview_url": False},
                    "context": {"message_id": "wamid.IN"}, "biz_opaque_callback_data": "tl:c1:m1"}
    buttons = handlers.build_send_body(send(TextContent(text="pick", actions=[
        ReplyAction(text="A very long button title indeed", payload="p1"), PostbackAction(text="B", payload=""),
        LinkAction(text="Site", uri="https://x.example")])))
    interactive = buttons["interactive"]
    assert interactive["body"]["text"] == "pick\n\nSite: https://x.example"
    assert [b["reply"] for b in interactive["action"]["buttons"]] == [
        {"id": "p1", "title": "A very long button …"}, {"id": "B", "title": "B"}]
    assert len(interactive["action"]["buttons"][0]["reply"]["title"]) == 20
    many = handlers.build_send_body(send(TextContent(text="menu", actions=[
        ReplyAction(text=f"Option {i}", payload=f"o{i}") for i in range(12)])))
    assert many["type"] == "text"  # 12 choices do not fit a 10-row list: numbered text, none dropped
    assert many["text"]["body"].endswith("12. Option 11")


def test_other_content_bodies_and_addressing() -> None:
    loc = handlers.build_send_body(send(LocationContent(coordinates=LocationCoordinates(lat=1.5, long=2.5),
                                                        location=LocationInfo(name="Shop"))))
    assert loc["location"] == {"latitude": 1.5, "longitude": 2.5, "name": "Shop"}
    doc = handlers.build_send_body(send(FileContent(media_url="https://x/files/report.pdf?x=1")))
    assert doc["document"] == {"link": "https://x/files/report.pdf?x=1", "filename": "report.pdf"}
    template = {"name": "hello_world", "language": {"code": "en_US"}}
    assert handlers.build_send_body(send(TemplateContent(template=template)))["template"] == template
    bsuid = send(TextContent(text="hi"))
    bsuid.recipient_info = {}
    assert handlers.addressing(bsuid) == {"recipient": "US.123"}
    bsuid.recipient = "+44 20 7946 0000"
    assert handlers.addressing(bsuid) == {"to": "442079460000"}
    with pytest.raises(handlers.UnsendableContent):
        handlers.build_send_body(send(UnsupportedContent(channel_type="sticker")))
    with pytest.raises(handlers.UnsendableContent):
        handlers.build_send_body(send(TextContent(text="")))


def test_override_payload_wins() -> None:
    payload = {"type": "reaction", "reaction": {"message_id": "wamid.X", "emoji": "👍"}}
    body = handlers.build_send_body(send(TextContent(text="x"), override={"whatsapp": {"payload": payload}}))
    assert body == {**payload, "messaging_product": "whatsapp", "to": "1555123"}


@pytest.mark.parametrize(("status", "code", "transient"), [
    (400, 130429, True), (400, 131056, True), (500, 131000, True), (503, 131016, True), (400, 4, True),
    (400, 80007, True), (502, None, True), (400, 131026, False), (400, 131008, False), (401, 190, False),
    (400, 131047, False),
])
def test_error_classification(status: int, code: int | None, transient: bool) -> None:
    body = json.dumps({"error": {"message": f"(#{code}) x", "code": code, "error_data": {"details": "d"}}}).encode()
    failure = handlers.classify_error(status, body if code is not None else b"<html>")
    assert failure.transient is transient
    assert failure.code == code
    assert failure.error_code() == (str(code) if code is not None else f"http_{status}")


def test_send_response_parsing() -> None:
    ok = b'{"messaging_product":"whatsapp","contacts":[{"input":"1","wa_id":"1"}],"messages":[{"id":"wamid.Z"}]}'
    assert handlers.parse_send_response(ok) == "wamid.Z"
    with pytest.raises(handlers.SendFailure):
        handlers.parse_send_response(b'{"success": true}')


def test_callback_data_round_trip() -> None:
    assert handlers.parse_callback_data(handlers.callback_data(send(TextContent(text="x")))) == ("m1", "c1")
    assert handlers.parse_callback_data("someone else's data") == (None, None)
    assert handlers.parse_callback_data(None) == (None, None)
