"""The app channel's pure logic: device validation, push content and targets, push rounds."""

from __future__ import annotations

import pytest

from services.app import handlers
from services.app.push import PushOutcome
from shared.http import ApiError
from shared.messages.channel import OutboundSend
from shared.records import IntegrationRecord
from shared.sunco import Device, ImageContent, LocationContent, LocationCoordinates, TextContent

RECORD = IntegrationRecord(id="int1", app_id="app1", type="android", status="active", display_name="Shop", config={})


def send(**changes: object) -> OutboundSend:
    fields: dict[str, object] = dict(
        app_id="app1", integration_id="int1", channel="android", conversation_id="conv1", message_id="msg1",
        user_id="user1", client_id="client1", recipient="", content=TextContent(text="Your order shipped"))
    fields.update(changes)
    return OutboundSend(**fields)  # type: ignore[arg-type]


def device(**changes: object) -> Device:
    fields: dict[str, object] = dict(id="d1", type="android", guid="g1", client_id="client1", status="active",
                                     integration_id="int1", push_notification_token="tok")
    fields.update(changes)
    return Device(**fields)  # type: ignore[arg-type]


def test_validate_device_accepts_a_guid_from_the_path_and_refuses_bad_ones() -> None:
    ok = handlers.validate_device(handlers.DeviceIn(push_notification_token="t"), guid="install-1")
    assert ok.guid == "install-1"
    for bad in ("", "has space", "x" * 129, "a/b"):
        with pytest.raises(ApiError) as exc:
            handlers.validate_device(handlers.DeviceIn(), guid=bad)
        assert exc.value.status == 400
    with pytest.raises(ApiError):
        handlers.validate_device(handlers.DeviceIn(guid="g", push_notification_token="  "))
    with pytest.raises(ApiError):
        handlers.validate_device(handlers.DeviceIn(guid="g", info={"k": "v" * 3000}))


def test_push_message_is_titled_by_the_integration_and_collapsed_per_conversation() -> None:
    message = handlers.push_message(send(), RECORD)
    assert message.title == "Shop"
    assert message.body == "Your order shipped"
    assert message.collapse_id == "conv1"
    assert message.data == {"appId": "app1", "conversationId": "conv1", "messageId": "msg1"}
    image = handlers.push_message(send(content=ImageContent(media_url="https://x/y.png")), RECORD)
    assert image.body == "📷 Photo"
    place = handlers.content_summary(send(content=LocationContent(coordinates=LocationCoordinates(lat=1, long=2))))
    assert place == "📍 Location"


def test_push_targets_are_the_recipient_clients_active_devices_with_tokens() -> None:
    devices = [device(), device(id="d2", push_notification_token=None), device(id="d3", status="inactive"),
               device(id="d4", client_id="other"), device(id="d5", integration_id="int2")]
    assert [d.id for d in handlers.push_targets(devices, send())] == ["d1"]


def test_a_push_round_is_sent_if_any_device_got_it_else_retry_else_failed() -> None:
    sent = PushOutcome(status="sent", provider_id="projects/p/messages/1")
    gone = PushOutcome(status="unregistered", code="UNREGISTERED")
    later = PushOutcome(status="retry", code="UNAVAILABLE", retry_after=7.0)
    bad = PushOutcome(status="failed", code="INVALID_ARGUMENT", reason="bad")
    assert handlers.push_round([]).status == "none"
    assert handlers.push_round([gone, sent]) == handlers.PushRound("sent", provider_id="projects/p/messages/1")
    assert handlers.push_round([gone, later]).retry_after == 7.0
    assert handlers.push_round([gone, later]).status == "retry"
    assert handlers.push_round([gone, bad]).code == "INVALID_ARGUMENT"
    assert handlers.push_round([gone]).status == "failed"
    assert handlers.push_round([gone]).code == "UNREGISTERED"


def test_statuses_carry_the_message_and_are_deduplicated_per_state() -> None:
    status = handlers.delivery_status(send(), "failed", 5.0, code="UNREGISTERED", title="gone")
    assert (status.message_id, status.conversation_id, status.error_code) == ("msg1", "conv1", "UNREGISTERED")
    assert status.provider_message_id == "app:msg1"
    assert handlers.status_msg_id(status) == "app:msg1:failed"
