"""Pure logic of the sms (Twilio) service: signatures, segments, forms, statuses, errors, throttling."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import pytest
from twilio.request_validator import RequestValidator

from services.sms import handlers
from services.sms.config import SmsConfig
from services.sms.handlers import Credentials, SegmentBucket, WebhookShapeError
from shared.config import ConfigError
from shared.encryption import KEY_ENV
from shared.messages.channel import OutboundSend
from shared.records import IntegrationRecord
from shared.sunco import (
    FileContent,
    ImageContent,
    LinkAction,
    LocationContent,
    LocationCoordinates,
    LocationInfo,
    ReplyAction,
    TemplateContent,
    TextContent,
    UnsupportedContent,
)
from shared.twilio_wire import signature_urls, sms_segments, twilio_signature, twilio_signature_ok
from tests.harness import SECRETS_KEY

ACCOUNT = "AC" + "0" * 32
SID = "SM" + "1" * 32
MMS = "MM" + "2" * 32
CONFIG = {"accountSid": ACCOUNT, "authToken": "auth-token-0123456789", "phoneNumber": "+15557654321",
          "baseUrl": "http://fake/sandbox/twilio-api/"}
PUBLIC = "https://gw.example.com"


def creds(**config: Any) -> Credentials:
    record = IntegrationRecord(id="int1", app_id="app1", type="twilio", config={**CONFIG, **config})
    found = Credentials.from_record(record, PUBLIC)
    assert found is not None
    return found


def inbound_form(**extra: str) -> list[tuple[str, str]]:
    form = [("SmsMessageSid", SID), ("NumMedia", "0"), ("SmsSid", SID), ("SmsStatus", "received"), ("Body", "hi"),
            ("To", "+15557654321"), ("MessageSid", SID), ("AccountSid", ACCOUNT), ("From", "+15551234567"),
            ("ApiVersion", "2010-04-01"), ("FromCity", "SAN FRANCISCO"), ("FromCountry", "US")]
    names = {k for k, _ in form}
    return [(k, extra.get(k, v)) for k, v in form] + [(k, v) for k, v in extra.items() if k not in names]


def send(content: Any, **extra: Any) -> OutboundSend:
    return OutboundSend(app_id="app1", integration_id="int1", channel="twilio", conversation_id="c1",
                        message_id="m1", user_id="u1", client_id="cl1", recipient="+15551234567",
                        content=content, **extra)


# --- signatures ----------------------------------------------------------------------------------

def test_documented_signature_vector_and_sdk_agreement() -> None:
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    params = {"CallSid": "CA1234567890ABCDE", "Caller": "+12349013030", "Digits": "1234",
              "From": "+12349013030", "To": "+18005551212"}
    assert twilio_signature("12345", url, params) == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    assert twilio_signature("12345", url, list(params.items())) == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    assert twilio_signature_ok("12345", url, params, "0/KCTR6DLpKmkAf8muzZqo1nDgQ=")
    assert not twilio_signature_ok("12346", url, params, "0/KCTR6DLpKmkAf8muzZqo1nDgQ=")
    assert not twilio_signature_ok("12345", url + "&baz=3", params, "0/KCTR6DLpKmkAf8muzZqo1nDgQ=")
    assert not twilio_signature_ok("12345", url, params, None)
    assert not twilio_signature_ok("12345", url, params, "")


def test_repeated_params_sort_values_like_the_sdk() -> None:
    form = [("To", "+15551234567"), ("MediaUrl", "https://x/b.jpg"), ("MediaUrl", "https://x/a.jpg"),
            ("Body", "hé llo+&=")]

    class Multi(dict[str, list[str]]):
        def getall(self, name: str) -> list[str]:
            return self[name]

    multi = Multi()
    for name, value in form:
        multi.setdefault(name, []).append(value)
    url = "https://gw.example.com/webhooks/twilio/x"
    assert twilio_signature("tok", url, form) == RequestValidator("tok").compute_signature(url, multi)


def test_default_port_leniency() -> None:
    assert signature_urls("https://a.example/x?q=1") == ["https://a.example/x?q=1", "https://a.example:443/x?q=1"]
    assert signature_urls("https://a.example:443/x") == ["https://a.example:443/x", "https://a.example/x"]
    assert signature_urls("http://127.0.0.1:8080/x") == ["http://127.0.0.1:8080/x"]
    signed_with_port = twilio_signature("tok", "https://a.example:443/x", {"A": "1"})
    assert twilio_signature_ok("tok", "https://a.example/x", {"A": "1"}, signed_with_port)
    other_port = twilio_signature("tok", "https://a.example:8443/x", {"A": "1"})
    assert not twilio_signature_ok("tok", "https://a.example/x", {"A": "1"}, other_port)


# --- segments ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "encoding", "count"), [
    ("", "GSM-7", 0),
    ("a" * 160, "GSM-7", 1),
    ("a" * 161, "GSM-7", 2),
    ("a" * 306, "GSM-7", 2),
    ("a" * 307, "GSM-7", 3),
    ("€" * 80, "GSM-7", 1),            # extension characters take two septets
    ("€" * 81, "GSM-7", 2),
    ("a" * 152 + "€" + "a" * 10, "GSM-7", 2),  # an escape pair is never split: 152 + (2) + 10
    ("a" * 152 + "€" + "a" * 152, "GSM-7", 3),
    ("ç" * 70, "UCS-2", 1),            # ç is not GSM-7 (only Ç is)
    ("ç" * 71, "UCS-2", 2),
    ("é" * 160, "GSM-7", 1),
    ("ж" * 134, "UCS-2", 2),
    ("ж" * 135, "UCS-2", 3),
    ("😀" * 35, "UCS-2", 1),           # astral characters take two UTF-16 units
    ("😀" * 36, "UCS-2", 2),
    ("ж" * 66 + "😀" + "ж", "UCS-2", 1),  # 69 units fit one segment
    ("ж" * 66 + "😀" + "ж" * 66, "UCS-2", 3),  # 134 units, but a surrogate pair is never split
])
def test_segments(text: str, encoding: str, count: int) -> None:
    info = sms_segments(text)
    assert (info.encoding, info.count) == (encoding, count)


def test_send_cost_counts_segments_and_mms_as_one() -> None:
    assert handlers.send_cost([("To", "+1"), ("Body", "a" * 307)]) == 3
    assert handlers.send_cost([("To", "+1"), ("Body", "a" * 307), ("MediaUrl", "https://x/a.jpg")]) == 1
    assert handlers.send_cost([("To", "+1")]) == 1


# --- token bucket ---------------------------------------------------------------------------------

def test_segment_bucket_goes_into_debt_for_long_messages() -> None:
    now = [100.0]
    bucket = SegmentBucket(1.0, burst=1.0, clock=lambda: now[0])
    assert bucket.reserve(3) == 0.0            # a 3-segment SMS goes at once…
    assert bucket.reserve(1) == pytest.approx(3.0)  # …and the next waits for 3 s of refill
    assert bucket.reserve(1, max_wait=2.0) is None  # too long a wait takes nothing
    now[0] += 4.0
    assert bucket.reserve(1) == pytest.approx(0.0)
    fast = SegmentBucket(100.0, burst=1.0, clock=lambda: now[0])
    assert fast.reserve(1) == 0.0 and fast.reserve(1) == pytest.approx(0.01)


# --- credentials and config ------------------------------------------------------------------------

def test_credentials_defaults_and_refusals() -> None:
    c = creds()
    assert c.webhook_url == f"{PUBLIC}/webhooks/twilio/int1"
    assert c.status_url == f"{PUBLIC}/webhooks/twilio/int1/status"
    assert c.messages_url == f"http://fake/sandbox/twilio-api/2010-04-01/Accounts/{ACCOUNT}/Messages.json"
    assert c.sender_key == "+15557654321"
    configured = creds(webhookUrl="https://sms.example.com/hook?x=1", messagingServiceSid="MG" + "3" * 32,
                       segmentsPerSecond=100)
    assert configured.webhook_url == "https://sms.example.com/hook?x=1"
    assert configured.sender_key == "MG" + "3" * 32 and configured.segments_per_second == 100.0
    for broken in ({"authToken": ""}, {"phoneNumber": None}, {"accountSid": 5}):
        record = IntegrationRecord(id="i", app_id="a", type="twilio", config={**CONFIG, **broken})
        assert Credentials.from_record(record, PUBLIC) is None
    assert Credentials.from_record(IntegrationRecord(id="i", app_id="a", type="twilio", status="inactive",
                                                     config=CONFIG), PUBLIC) is None
    assert Credentials.from_record(IntegrationRecord(id="i", app_id="a", type="telegram", config=CONFIG),
                                   PUBLIC) is None


def test_config_validation() -> None:
    assert SmsConfig.from_env({KEY_ENV: SECRETS_KEY}).segments_per_second == 1.0
    with pytest.raises(ConfigError):
        SmsConfig.from_env({"SMS_SEGMENTS_PER_SECOND": "0"})
    with pytest.raises(ConfigError):
        SmsConfig.from_env({"SMS_ACK_WAIT_SECONDS": "10"})


# --- inbound ------------------------------------------------------------------------------------

def test_parse_form_keeps_order_blanks_and_repeats() -> None:
    raw = urlencode([("Body", "a+b & c"), ("FromZip", ""), ("MediaUrl", "1"), ("MediaUrl", "2")]).encode()
    assert handlers.parse_form(raw) == [("Body", "a+b & c"), ("FromZip", ""), ("MediaUrl", "1"), ("MediaUrl", "2")]
    with pytest.raises(WebhookShapeError):
        handlers.parse_form(b"\xff\xfe")
    with pytest.raises(WebhookShapeError):
        handlers.parse_form(b"&".join(b"a=1" for _ in range(500)))


def test_inbound_sms() -> None:
    [message] = handlers.normalize_inbound(inbound_form(), creds(), received_at=1717000000.0)
    assert message.channel == "twilio" and message.client_type == "twilio"
    assert message.provider_message_id == SID and message.channel_user_id == "+15551234567"
    assert message.content == TextContent(text="hi")
    assert message.client_info == {"phone_number": "+15551234567", "to": "+15557654321", "city": "SAN FRANCISCO",
                                   "country": "US"}
    assert message.raw["Body"] == "hi" and message.received_at == 1717000000.0
    assert handlers.inbound_msg_id(message) == f"twilio:{SID}"


def test_inbound_mms_gives_one_message_per_media() -> None:
    form = inbound_form(MessageSid=MMS, Body="look", NumMedia="2", MediaContentType0="image/jpeg",
                        MediaUrl0="https://api.twilio.com/m/ME1", MediaContentType1="application/pdf",
                        MediaUrl1="https://api.twilio.com/m/ME2")
    first, second = handlers.normalize_inbound(form, creds())
    assert first.content == ImageContent(media_url="https://api.twilio.com/m/ME1", media_type="image/jpeg",
                                         text="look")
    assert second.content == FileContent(media_url="https://api.twilio.com/m/ME2", media_type="application/pdf")
    assert (first.provider_message_id, second.provider_message_id) == (MMS, f"{MMS}/1")


def test_inbound_whatsapp_extras_and_empty_body() -> None:
    [button] = handlers.normalize_inbound(inbound_form(From="whatsapp:+15551234567", ProfileName="Ada",
                                                       ButtonPayload="yes", ButtonText="Yes please"), creds())
    assert button.display_name == "Ada" and button.channel_user_id == "whatsapp:+15551234567"
    assert button.content == TextContent(text="Yes please", payload="yes")
    assert button.postback is not None and button.postback.payload == "yes"
    [where] = handlers.normalize_inbound(inbound_form(Body="", Latitude="48.85", Longitude="2.35"), creds())
    assert where.content == LocationContent(coordinates=LocationCoordinates(lat=48.85, long=2.35))
    [empty] = handlers.normalize_inbound(inbound_form(Body=""), creds())
    assert isinstance(empty.content, UnsupportedContent) and empty.content.channel_type == "empty"


@pytest.mark.parametrize("broken", [
    {"MessageSid": "", "SmsMessageSid": "", "SmsSid": ""},
    {"MessageSid": "not-a-sid"},
    {"From": ""},
    {"From": "has space"},
    {"NumMedia": "x"},
    {"NumMedia": "11"},
    {"NumMedia": "1"},                          # media announced, URL missing
    {"NumMedia": "1", "MediaUrl0": "ftp://x"},
    {"AccountSid": "AC" + "9" * 32},
    {"Body": "", "Latitude": "200", "Longitude": "1"},
    {"Body": "", "Latitude": "nan", "Longitude": "1"},
])
def test_inbound_refusals(broken: dict[str, str]) -> None:
    with pytest.raises(WebhookShapeError):
        handlers.normalize_inbound(inbound_form(**broken), creds())


# --- statuses -------------------------------------------------------------------------------------

def status_form(status: str, **extra: str) -> list[tuple[str, str]]:
    return [("SmsSid", SID), ("SmsStatus", status), ("MessageStatus", status), ("To", "+15551234567"),
            ("MessageSid", SID), ("AccountSid", ACCOUNT), ("From", "+15557654321"),
            ("ApiVersion", "2010-04-01"), *extra.items()]


def test_status_callbacks() -> None:
    delivered = handlers.normalize_status(status_form("delivered"), creds(), ("m1", "c1"), at=5.0)
    assert delivered is not None
    assert (delivered.status, delivered.provider_message_id, delivered.message_id, delivered.conversation_id) == (
        "delivered", SID, "m1", "c1")
    assert delivered.error_code is None and handlers.status_msg_id(delivered) == f"twilio:{SID}:delivered"
    undelivered = handlers.normalize_status(status_form("undelivered", ErrorCode="30003"), creds())
    assert undelivered is not None and undelivered.status == "failed"
    assert undelivered.error_code == "30003" and undelivered.error_title == "Unreachable destination handset"
    assert undelivered.message_id is None
    failed = handlers.normalize_status(status_form("failed", ErrorCode="30007", ErrorMessage="Filtered"), creds())
    assert failed is not None and (failed.error_code, failed.error_title) == ("30007", "Filtered")
    for ignored in ("queued", "accepted", "sending", "scheduled", "canceled"):
        assert handlers.normalize_status(status_form(ignored), creds()) is None
    with pytest.raises(WebhookShapeError):
        handlers.normalize_status(status_form("failed", ErrorCode="x1"), creds())
    with pytest.raises(WebhookShapeError):
        handlers.normalize_status([("MessageSid", SID)], creds())


# --- sending --------------------------------------------------------------------------------------

def test_send_form_text_in_sdk_order() -> None:
    [form] = handlers.build_send_forms(send(TextContent(text="hi")), creds())
    assert form == [("To", "+15551234567"), ("StatusCallback", f"{PUBLIC}/webhooks/twilio/int1/status"),
                    ("From", "+15557654321"), ("Body", "hi")]


def test_send_form_messaging_service_media_actions_location() -> None:
    service = "MG" + "3" * 32
    [with_service] = handlers.build_send_forms(send(ImageContent(media_url="https://x/a.jpg", text="cap")),
                                               creds(messagingServiceSid=service))
    assert with_service == [("To", "+15551234567"), ("StatusCallback", f"{PUBLIC}/webhooks/twilio/int1/status"),
                            ("MessagingServiceSid", service), ("Body", "cap"), ("MediaUrl", "https://x/a.jpg")]
    [actions] = handlers.build_send_forms(send(TextContent(text="Pick", actions=[
        ReplyAction(text="Yes", payload="y"), ReplyAction(text="No", payload="n"),
        LinkAction(text="Site", uri="https://shop.example")])), creds())
    # shared.render's text: actions one per line, in their order, answerable ones numbered.
    assert dict(actions)["Body"] == "Pick\n\n1. Yes\n2. No\nSite: https://shop.example"
    [location] = handlers.build_send_forms(send(LocationContent(coordinates=LocationCoordinates(lat=1.5, long=2.5),
                                                                location=LocationInfo(name="Shop"))), creds())
    assert dict(location)["Body"] == "Shop\nhttps://maps.google.com/maps?q=1.5,2.5"
    # Past 1,600 characters a text goes as several messages (a word longer than that is cut).
    long_text = handlers.build_send_forms(send(TextContent(text="x" * 2000)), creds())
    assert [len(dict(form)["Body"]) for form in long_text] == [1600, 400]
    wa = send(TextContent(text="hi"))
    wa.recipient = "whatsapp:+15551234567"
    assert ("From", "whatsapp:+15557654321") in handlers.build_send_forms(wa, creds())[0]
    [override] = handlers.build_send_forms(send(TextContent(text="ignored"), override={"twilio": {"payload": {
        "ContentSid": "HX" + "4" * 32, "To": "+1999", "MediaUrl": ["https://x/1", "https://x/2"]}}}), creds())
    assert override[-3:] == [("ContentSid", "HX" + "4" * 32), ("MediaUrl", "https://x/1"), ("MediaUrl", "https://x/2")]
    assert override[0] == ("To", "+15551234567")
    for unsendable in (TextContent(text=""), ImageContent(media_url=""),
                       TemplateContent(template={"name": "x"})):
        with pytest.raises(handlers.UnsendableContent):
            handlers.build_send_forms(send(unsendable), creds())


@pytest.mark.parametrize(("status", "body", "code", "transient"), [
    (400, b'{"code": 21211, "message": "The \'To\' number +1bad is not a valid phone number.", '
          b'"more_info": "https://www.twilio.com/docs/errors/21211", "status": 400}', 21211, False),
    (400, b'{"code": 21610, "message": "Attempt to send to unsubscribed recipient", "status": 400}', 21610, False),
    (401, b'{"code": 20003, "detail": "Your AccountSid or AuthToken was incorrect.", "message": "Authenticate",'
          b' "status": 401}', 20003, False),
    (429, b'{"code": 20429, "message": "Too Many Requests", "status": 429}', 20429, True),
    (400, b'{"code": 21611, "message": "queue full", "status": 400}', 21611, True),
    (500, b'{"code": 20500, "message": "Internal", "status": 500}', 20500, True),
    (503, b"<html>bad gateway</html>", None, True),
    (400, b'{"type": "https://www.twilio.com/docs/errors/21211", "title": "Invalid To", "status": 400,'
          b' "code": 21211, "detail": "bad number"}', 21211, False),
])
def test_error_classification(status: int, body: bytes, code: int | None, transient: bool) -> None:
    failure = handlers.classify_error(status, body)
    assert (failure.code, failure.transient) == (code, transient)
    assert failure.title
    assert failure.error_code() == (str(code) if code else f"http_{status}")


def test_send_response_parsing() -> None:
    assert handlers.parse_send_response(f'{{"sid": "{SID}", "status": "queued"}}'.encode()) == SID
    for bad in (b"{}", b"[]", b"nope", b'{"sid": "x"}'):
        with pytest.raises(handlers.SendFailure):
            handlers.parse_send_response(bad)
