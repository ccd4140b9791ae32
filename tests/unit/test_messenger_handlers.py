"""Pure logic of the messenger service: the reply-window policy, webhook normalization, Send API
bodies, error classification, configuration, and the Page token buckets."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.messenger import handlers
from services.messenger.config import MessengerConfig
from services.messenger.handlers import (
    Credentials,
    ReplyWindowPolicy,
    SentRef,
    Tagging,
    WebhookShapeError,
    WindowRefusal,
)
from shared.config import ConfigError
from shared.encryption import KEY_ENV
from shared.messages.channel import OutboundSend
from shared.outbound import failed_status, send_status_msg_id, sent_status
from shared.ratelimit import BucketMap, TokenBucket
from shared.records import IntegrationRecord
from shared.retry import backoff_delay
from shared.signing import meta_handshake_challenge
from shared.sunco import (
    Content,
    FileContent,
    ImageContent,
    LinkAction,
    LocationContent,
    PostbackAction,
    ReplyAction,
    TextContent,
    UnsupportedContent,
    WebviewAction,
)
from tests.harness import SECRETS_KEY

HOUR = 3600.0
NOW = 1_800_000_000.0
PAGE = "111"
PSID = "222"
CREDS = Credentials(integration_id="i1", app_id="a1", page_id=PAGE, page_access_token="t", app_secret="s",
                    verify_token="v", api_version="v23.0", base_url="https://graph.facebook.com")
policy = ReplyWindowPolicy()


# --- the reply window ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("hours_ago", "human", "requested", "expected"), [
    (1, False, None, Tagging("RESPONSE")),
    (23.9, False, None, Tagging("RESPONSE")),
    (1, False, Tagging("UPDATE"), Tagging("UPDATE")),
    (25, True, None, Tagging("MESSAGE_TAG", "HUMAN_AGENT")),
    (6 * 24, True, None, Tagging("MESSAGE_TAG", "HUMAN_AGENT")),
    (25, False, Tagging("MESSAGE_TAG", "HUMAN_AGENT"), Tagging("MESSAGE_TAG", "HUMAN_AGENT")),
    (1, False, Tagging("MESSAGE_TAG", "HUMAN_AGENT"), Tagging("MESSAGE_TAG", "HUMAN_AGENT")),
    (30 * 24, False, Tagging("MESSAGE_TAG", "ACCOUNT_UPDATE"), Tagging("MESSAGE_TAG", "ACCOUNT_UPDATE")),
    (None, False, Tagging("MESSAGE_TAG", "POST_PURCHASE_UPDATE"), Tagging("MESSAGE_TAG", "POST_PURCHASE_UPDATE")),
    (-1, False, None, Tagging("RESPONSE")),  # a timestamp slightly in the future (clock skew)
])
def test_policy_allows(hours_ago: float | None, human: bool, requested: Tagging | None, expected: Tagging) -> None:
    last = None if hours_ago is None else NOW - hours_ago * HOUR
    assert policy.decide(last, NOW, human_agent=human, requested=requested) == expected


@pytest.mark.parametrize(("hours_ago", "human", "requested", "code"), [
    (24.01, False, None, "outside_messaging_window"),
    (25, False, Tagging("UPDATE"), "outside_messaging_window"),
    (7 * 24 + 0.01, True, None, "outside_messaging_window"),
    (8 * 24, False, Tagging("MESSAGE_TAG", "HUMAN_AGENT"), "outside_messaging_window"),
    (None, True, None, "outside_messaging_window"),
    (1, False, Tagging("MESSAGE_TAG", "PROMOTION"), "invalid_message_tag"),
    (1, False, Tagging("MESSAGE_TAG", None), "invalid_message_tag"),
    (1, False, Tagging("BROADCAST"), "invalid_messaging_type"),
])
def test_policy_refuses(hours_ago: float | None, human: bool, requested: Tagging | None, code: str) -> None:
    last = None if hours_ago is None else NOW - hours_ago * HOUR
    decision = policy.decide(last, NOW, human_agent=human, requested=requested)
    assert isinstance(decision, WindowRefusal) and decision.code == code and decision.details


def test_policy_limits_are_configurable_and_worded() -> None:
    short = ReplyWindowPolicy(standard_seconds=HOUR, human_agent_seconds=2 * HOUR)
    refusal = short.decide(NOW - 1.5 * HOUR, NOW)
    assert isinstance(refusal, WindowRefusal) and "1-hour" in refusal.title and "1.5 h ago" in refusal.details
    assert short.decide(NOW - 1.5 * HOUR, NOW, human_agent=True) == Tagging("MESSAGE_TAG", "HUMAN_AGENT")


def _send(content: Content, override: dict[str, Any] | None = None) -> OutboundSend:
    return OutboundSend(app_id="a1", integration_id="i1", channel="messenger", conversation_id="c1",
                        message_id="m1", user_id="u1", client_id="k1", recipient=PSID, content=content,
                        override=override)


def test_requested_tagging_from_override() -> None:
    assert handlers.requested_tagging(_send(TextContent(text="x"))) is None
    payload = {"messaging_type": "MESSAGE_TAG", "tag": "HUMAN_AGENT"}
    assert handlers.requested_tagging(_send(TextContent(text="x"), {"messenger": {"payload": payload}})) == \
        Tagging("MESSAGE_TAG", "HUMAN_AGENT")
    tag_only = {"messenger": {"payload": {"tag": "HUMAN_AGENT"}}}
    assert handlers.requested_tagging(_send(TextContent(text="x"), tag_only)) == Tagging("MESSAGE_TAG", "HUMAN_AGENT")
    assert handlers.requested_tagging(_send(TextContent(text="x"), {"whatsapp": {"payload": payload}})) is None


# --- webhook normalization -----------------------------------------------------------------------------

def _webhook(*events: dict[str, Any], page: str = PAGE) -> bytes:
    return json.dumps({"object": "page", "entry": [{"id": page, "time": 1, "messaging": list(events)}]}).encode()


def _event(**body: Any) -> dict[str, Any]:
    return {"sender": {"id": PSID}, "recipient": {"id": PAGE}, "timestamp": 1_717_000_000_050, **body}


def _normalize(raw: bytes, resolve: handlers.Resolver = lambda _page: None) -> handlers.Normalized:
    return handlers.normalize_webhook(raw, CREDS, resolve, now=NOW)


def test_text_reply_to_and_window_action() -> None:
    out = _normalize(_webhook(_event(message={"mid": "m_1", "text": "hi", "reply_to": {"mid": "m_0"}})))
    [message] = out.messages
    assert message.content == TextContent(text="hi") and message.provider_message_id == "m_1"
    assert message.received_at == 1_717_000_000.05 and message.quoted_provider_message_id == "m_0"
    assert handlers.inbound_msg_id(message) == "messenger:m_1"
    assert out.actions == [handlers.UserAction(PAGE, PSID, 1_717_000_000.05)]


def test_future_timestamps_do_not_stretch_the_window() -> None:
    future = _normalize(_webhook(_event(timestamp=int((NOW + 10 * HOUR) * 1000), message={"mid": "m", "text": "x"})))
    assert future.actions[0].at == NOW


def test_attachments_split_dedupe_stickers_and_keep_unknown() -> None:
    out = _normalize(_webhook(_event(message={"mid": "m_2", "text": "look", "attachments": [
        {"type": "image", "payload": {"url": "https://x/a.jpg"}},
        {"type": "sticker", "payload": {"url": "https://x/s.png", "sticker_id": 369239263222822}},
        {"type": "image", "payload": {"url": "https://x/s.png", "sticker_id": 369239263222822}},
        {"type": "audio", "payload": {"url": "https://x/v.mp4"}},
        {"type": "location", "payload": {"coordinates": {"lat": 1.5, "long": 2.5}}},
        {"type": "fallback", "payload": {"url": "https://x/link"}, "title": "A link"},
    ]})))
    assert [m.provider_message_id for m in out.messages] == ["m_2", "m_2#1", "m_2#3", "m_2#4", "m_2#5"]
    contents = [m.content for m in out.messages]
    assert contents[0] == ImageContent(media_url="https://x/a.jpg", text="look")
    assert contents[1] == ImageContent(media_url="https://x/s.png", alt_text="sticker")
    assert contents[2] == FileContent(media_url="https://x/v.mp4")
    assert isinstance(contents[3], LocationContent) and contents[3].coordinates.lat == 1.5
    assert isinstance(contents[4], UnsupportedContent) and contents[4].channel_type == "fallback"
    assert contents[4].raw["title"] == "A link"


def test_postback_referral_reaction_and_skipped_events() -> None:
    out = _normalize(_webhook(
        _event(postback={"title": "Get Started", "payload": "GET_STARTED",
                         "referral": {"ref": "code_1", "source": "SHORTLINK", "type": "OPEN_THREAD"}}),
        _event(referral={"ref": "code_2", "source": "SHORTLINK", "type": "OPEN_THREAD"}),
        _event(referral={"source": "ADS", "type": "OPEN_THREAD", "ad_id": "9"}),
        _event(reaction={"reaction": "love", "emoji": "❤️", "action": "react", "mid": "m_9"}),
        _event(message={"mid": "m_echo", "text": "ours", "is_echo": True, "app_id": 1}),
        {"sender": {"id": PAGE}, "recipient": {"id": PSID}, "timestamp": 1, "message": {"mid": "m_x", "text": "x"}},
        _event(optin={"ref": "x"}),
    ))
    started, referral, reaction = out.messages
    assert started.referral == "code_1" and started.postback is not None
    assert started.provider_message_id == f"postback.{PSID}.1717000000050"
    assert referral.referral == "code_2" and isinstance(referral.content, UnsupportedContent)
    assert isinstance(reaction.content, UnsupportedContent) and reaction.content.channel_type == "reaction"
    assert reaction.referral is None
    # Postback and both referrals (the ad one too) are actions; reactions and echoes are not.
    assert len(out.actions) == 3


def test_receipts_and_their_statuses() -> None:
    out = _normalize(_webhook(_event(delivery={"mids": ["m_a", "m_b"], "watermark": 1_717_000_000_500}),
                              _event(read={"watermark": 1_717_000_000_999})))
    delivered, read = out.receipts
    assert delivered.status == "delivered" and delivered.mids == ("m_a", "m_b")
    assert delivered.watermark == 1_717_000_000.5
    assert read.status == "read" and read.mids == ()
    statuses = handlers.receipt_statuses(delivered, [SentRef("m_a", "msg_a", "conv")])
    assert [(s.provider_message_id, s.message_id, s.status) for s in statuses] == [
        ("m_a", "msg_a", "delivered"), ("m_b", None, "delivered")]
    assert handlers.status_msg_id(statuses[0]) == "messenger:m_a:delivered"
    assert handlers.receipt_statuses(read, []) == []
    assert out.actions == []


def test_sibling_pages_and_unknown_pages() -> None:
    sibling = Credentials(integration_id="i2", app_id="a2", page_id="333", page_access_token="t2", app_secret="s",
                          verify_token="", api_version="v23.0", base_url="x")
    other_app = Credentials(integration_id="i3", app_id="a3", page_id="444", page_access_token="t3",
                            app_secret="different", verify_token="", api_version="v23.0", base_url="x")
    pages = {"333": sibling, "444": other_app}
    raw = json.dumps({"object": "page", "entry": [
        {"id": "333", "messaging": [_event(message={"mid": "m_s", "text": "a"})]},
        {"id": "444", "messaging": [_event(message={"mid": "m_o", "text": "b"})]},
        {"id": "555", "messaging": [_event(message={"mid": "m_u", "text": "c"})]},
    ]}).encode()
    out = _normalize(raw, pages.get)
    [message] = out.messages
    assert message.integration_id == "i2" and message.provider_message_id == "m_s"


@pytest.mark.parametrize("raw", [
    b"", b"{", b"[]", b'{"object": "user", "entry": []}', b'{"object": "page"}', b'{"object": "page", "entry": {}}',
])
def test_malformed_notifications_are_refused(raw: bytes) -> None:
    with pytest.raises(WebhookShapeError):
        _normalize(raw)


BAD_EVENTS = [
    {"recipient": {"id": PAGE}, "timestamp": 1, "message": {"mid": "m", "text": "x"}},
    _event(timestamp="yesterday", message={"mid": "m", "text": "x"}),
    _event(timestamp=-1, message={"mid": "m", "text": "x"}),
    _event(message={"text": "no mid"}),
    _event(message={"mid": "", "text": "empty mid"}),
    _event(sender={"id": ""}, message={"mid": "m", "text": "x"}),
    _event(read={"watermark": "soon"}),
    _event(postback="GET_STARTED"),
    "not an event",
]


@pytest.mark.parametrize("bad", BAD_EVENTS)
def test_a_malformed_event_is_rejected_and_its_siblings_kept(bad: Any) -> None:
    good = [_event(message={"mid": "m_good1", "text": "a"}), _event(message={"mid": "m_good2", "text": "b"})]
    out = _normalize(_webhook(good[0], bad, good[1]))
    assert [m.provider_message_id for m in out.messages] == ["m_good1", "m_good2"]
    assert len(out.actions) == 2
    [rejected] = out.rejected
    assert rejected.where == "entry[0].messaging[1]" and rejected.reason


def test_a_malformed_entry_is_rejected_and_the_other_entries_kept() -> None:
    raw = json.dumps({"object": "page", "entry": [
        {"messaging": [_event(message={"mid": "m_lost_page", "text": "x"})]},  # no Page id
        {"id": PAGE, "messaging": [_event(message={"mid": "m_ok", "text": "y"})]},
    ]}).encode()
    out = _normalize(raw)
    assert [m.provider_message_id for m in out.messages] == ["m_ok"]
    assert [r.where for r in out.rejected] == ["entry[0]"]


def test_rejected_event_names_its_mid() -> None:
    out = _normalize(_webhook(_event(timestamp="soon", message={"mid": "m_bad", "text": "x"})))
    assert out.messages == [] and [r.provider_id for r in out.rejected] == ["m_bad"]


def test_handshake() -> None:
    assert meta_handshake_challenge(CREDS.verify_token, "subscribe", "v", "42") == "42"
    assert meta_handshake_challenge(CREDS.verify_token, "subscribe", "w", "42") is None
    assert meta_handshake_challenge(CREDS.verify_token, "unsubscribe", "v", "42") is None
    assert meta_handshake_challenge(None, "subscribe", "v", "42") is None
    assert meta_handshake_challenge("", "subscribe", "", "42") is None  # no token set: never


# --- Send API bodies -------------------------------------------------------------------------------------

RESPONSE = Tagging("RESPONSE")


def _bodies(content: Content, tagging: Tagging = RESPONSE, override: dict[str, Any] | None = None) -> list[Any]:
    return [p.body for p in handlers.build_send_parts(_send(content, override), tagging)]


def test_text_buttons_webview_and_clipping() -> None:
    # Nothing is cut: a long text goes in several messages (each tagged), between lines or words.
    long_text = _bodies(TextContent(text=("word " * 500).strip()), Tagging("MESSAGE_TAG", "HUMAN_AGENT"))
    assert len(long_text) == 2 and all(b["messaging_type"] == "MESSAGE_TAG" and b["tag"] == "HUMAN_AGENT"
                                       for b in long_text)
    assert all(len(b["message"]["text"]) <= handlers.TEXT_MAX for b in long_text)
    assert " ".join(b["message"]["text"] for b in long_text).split() == ["word"] * 500
    [buttons] = _bodies(TextContent(text="Choose", actions=[
        WebviewAction(text="Open the catalogue please", uri="https://x/w", size="tall"),
        PostbackAction(text="Buy", payload="BUY"), LinkAction(text="Site", uri="https://x"),
        ReplyAction(text="Later", payload="LATER")]))
    payload = buttons["message"]["attachment"]["payload"]
    assert payload["buttons"] == [
        {"type": "web_url", "url": "https://x/w", "title": "Open the catalogue …", "webview_height_ratio": "tall"},
        {"type": "postback", "title": "Buy", "payload": "BUY"},
        {"type": "web_url", "url": "https://x", "title": "Site"}]
    assert buttons["message"]["quick_replies"] == [{"content_type": "text", "title": "Later", "payload": "LATER"}]
    # Past a limit (a 4th button, a 14th quick reply) the choices go as numbered text: none dropped.
    four = _bodies(TextContent(text="Choose", actions=[PostbackAction(text=f"B{i}", payload=f"b{i}")
                                                        for i in range(4)]))
    assert [b["message"]["text"] for b in four] == ["Choose\n\n1. B0\n2. B1\n3. B2\n4. B3"]
    many = _bodies(TextContent(text="q", actions=[ReplyAction(text=str(i)) for i in range(20)]))
    assert "quick_replies" not in many[0]["message"] and many[0]["message"]["text"].endswith("20. 19")


def test_media_kinds_parts_and_buckets() -> None:
    video = handlers.build_send_parts(_send(FileContent(media_url="https://x/v.mp4", media_type="video/mp4")),
                                      RESPONSE)
    assert [p.media for p in video] == [True]
    assert video[0].body["message"]["attachment"]["type"] == "video"
    pdf = _bodies(FileContent(media_url="https://x/a.pdf", media_type="application/pdf", text="the invoice"))
    assert [b["message"].get("attachment", {}).get("type") for b in pdf] == ["file", None]
    assert pdf[1]["message"] == {"text": "the invoice"}
    image = handlers.build_send_parts(_send(ImageContent(media_url="https://x/a.png", actions=[
        ReplyAction(text="Nice", payload="NICE")])), RESPONSE)
    assert [p.body["message"] for p in image] == [{
        "attachment": {"type": "image", "payload": {"url": "https://x/a.png", "is_reusable": True}},
        "quick_replies": [{"content_type": "text", "title": "Nice", "payload": "NICE"}]}]
    captioned = _bodies(ImageContent(media_url="https://x/a.png", text="Like it?", actions=[
        ReplyAction(text="Nice", payload="NICE")]))
    assert captioned[1]["message"] == {"text": "Like it?", "quick_replies": [
        {"content_type": "text", "title": "Nice", "payload": "NICE"}]}


def test_unsendable_content() -> None:
    for content in (TextContent(text=""), ImageContent(media_url=""),
                    TextContent(text="", actions=[PostbackAction(text="b", payload="p")]),
                    UnsupportedContent(channel_type="x")):
        with pytest.raises(handlers.UnsendableContent):
            _bodies(content)


def test_override_payload_is_sent_with_window_tagging() -> None:
    [body] = _bodies(TextContent(text="ignored"), Tagging("MESSAGE_TAG", "HUMAN_AGENT"), {"messenger": {"payload": {
        "message": {"attachment": {"type": "audio", "payload": {"url": "https://x/a.mp3"}}},
        "messaging_type": "RESPONSE", "notification_type": "SILENT_PUSH"}}})
    assert body == {"recipient": {"id": PSID}, "messaging_type": "MESSAGE_TAG", "tag": "HUMAN_AGENT",
                    "message": {"attachment": {"type": "audio", "payload": {"url": "https://x/a.mp3"}}},
                    "notification_type": "SILENT_PUSH"}


# --- errors and answers ----------------------------------------------------------------------------------

def _graph(code: int, subcode: int | None = None, **extra: Any) -> bytes:
    error: dict[str, Any] = {"message": f"(#{code}) x", "type": "OAuthException", "code": code,
                             "fbtrace_id": "Ab", **extra}
    if subcode is not None:
        error["error_subcode"] = subcode
    return json.dumps({"error": error}).encode()


@pytest.mark.parametrize(("status", "body", "transient", "code"), [
    (400, _graph(613), True, "613"),
    (400, _graph(4), True, "4"),
    (500, _graph(2), True, "2"),
    (500, _graph(1200), True, "1200"),
    (400, _graph(10, 2018278), False, "10"),
    (400, _graph(551, 1545041), False, "551"),
    (400, _graph(100, 2018001), False, "100"),
    (401, _graph(190), False, "190"),
    (400, _graph(100, None, is_transient=True), True, "100"),
    (502, b"<html>bad gateway</html>", True, "http_502"),
    (429, b"", True, "http_429"),
    (404, b"not json", False, "http_404"),
])
def test_classify_error(status: int, body: bytes, transient: bool, code: str) -> None:
    failure = handlers.classify_error(status, body)
    assert failure.transient is transient and failure.error_code() == code


def test_error_details_carry_subcode_and_trace() -> None:
    failure = handlers.classify_error(400, _graph(10, 2018278))
    assert failure.subcode == 2018278 and failure.details == "error_subcode 2018278; fbtrace_id Ab"
    assert failure.title == "(#10) x"


def test_parse_send_response() -> None:
    assert handlers.parse_send_response(b'{"recipient_id": "1", "message_id": "m_A"}') == "m_A"
    for bad in (b"{}", b"nope", b'{"message_id": 5}', b"[]"):
        with pytest.raises(handlers.SendFailure) as info:
            handlers.parse_send_response(bad)
        assert info.value.transient


def test_statuses_for_the_send_loop() -> None:
    send = _send(TextContent(text="x"))
    sent = sent_status(handlers.CHANNEL, send, "m_1", at=5.0)
    assert (sent.status, sent.provider_message_id, sent.message_id, sent.timestamp) == ("sent", "m_1", "m1", 5.0)
    failed = failed_status(handlers.CHANNEL, send, "outside_messaging_window", "closed", "details")
    assert failed.status == "failed" and failed.error_code == "outside_messaging_window"
    assert send_status_msg_id(failed) == "messenger:send:m1:failed"


# --- credentials, configuration, buckets ---------------------------------------------------------------------

def test_credentials_from_record() -> None:
    record = IntegrationRecord(id="i", app_id="a", type="messenger", config={
        "pageId": "1", "pageAccessToken": "t", "appSecret": "s", "apiVersion": "24.0", "humanAgent": True})
    creds = Credentials.from_record(record)
    assert creds is not None and creds.messages_url == "https://graph.facebook.com/v24.0/1/messages"
    assert creds.human_agent is True
    assert Credentials.from_record(IntegrationRecord(id="i", app_id="a", type="messenger",
                                                     config={"pageId": "1"})) is None
    assert Credentials.from_record(IntegrationRecord(id="i", app_id="a", type="messenger", status="inactive",
                                                     config=record.config)) is None
    assert Credentials.from_record(IntegrationRecord(id="i", app_id="a", type="telegram",
                                                     config=record.config)) is None


def test_config_validation() -> None:
    config = MessengerConfig.from_env({"THREADLINE_DATA_DIR": "/tmp/x", KEY_ENV: SECRETS_KEY})
    assert config.calls_per_second == 300 and config.media_calls_per_second == 10
    assert config.database.sqlite_path == "/tmp/x/messenger.db" and config.database.engine == "sqlite"
    for bad in ({"MESSENGER_WINDOW_HOURS": "48"}, {"MESSENGER_HUMAN_AGENT_DAYS": "8"},
                {"MESSENGER_CALLS_PER_SECOND": "0"}, {"MESSENGER_MAX_SEND_ATTEMPTS": "0"},
                {"MESSENGER_RETRY_BASE_SECONDS": "5", "MESSENGER_RETRY_MAX_SECONDS": "1"}):
        with pytest.raises(ConfigError):
            MessengerConfig.from_env(bad)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_page_token_buckets() -> None:
    clock = Clock()
    pages = BucketMap(300, clock=clock)
    first = pages.get("page-1")
    assert pages.get("page-1") is first and pages.get("page-2") is not first
    assert all(first.try_take() == 0 for _ in range(300))
    assert first.try_take() == pytest.approx(1 / 300)
    assert pages.get("page-2").try_take() == 0  # one Page's burst does not slow another
    clock.now = 0.5
    assert sum(1 for _ in range(300) if first.try_take() == 0) == 150
    media = TokenBucket(10, clock=clock)
    assert [media.try_take() == 0 for _ in range(11)] == [True] * 10 + [False]
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_backoff() -> None:
    assert [backoff_delay(n, 0.5, 3) for n in (1, 2, 3, 4, 100)] == [0.5, 1, 2, 3, 3]
