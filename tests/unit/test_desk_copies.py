"""Which conversation events the agent desk is sent a copy of (`conv.concerns_desk`), and where."""

from __future__ import annotations

from typing import Any

import pytest

from shared import subjects
from shared.bus import subjects_overlap
from shared.messages import conversation as conv
from shared.records import SwitchboardIntegrationRecord, SwitchboardRecord
from shared.sunco import (
    Author,
    Client,
    ConversationRef,
    Message,
    SwitchboardIntegrationRef,
    TextContent,
    User,
    UserRef,
)

BOT = SwitchboardIntegrationRecord(id="sw-bot", name="bot", integration_type="custom", integration_id="int-bot")
DESK = SwitchboardIntegrationRecord(id="sw-desk", name="desk", integration_type="desk")
WITH_DESK = SwitchboardRecord(id="sb", enabled=True, integrations=[BOT, DESK])
BOT_ONLY = SwitchboardRecord(id="sb", enabled=True, integrations=[BOT])
BASE: dict[str, Any] = {"id": "ev", "app_id": "app", "conversation_id": "conv", "created_at": 1.0}


def ref(active: str | None, integration_type: str | None = None) -> ConversationRef:
    return ConversationRef(id="conv", type="personal", active_switchboard_integration=None if active is None else
                           SwitchboardIntegrationRef(id=active, integration_type=integration_type))


def message_in(conversation: ConversationRef) -> conv.MessageCreated:
    return conv.MessageCreated(**BASE, conversation=conversation, cursor=1, user_id="u", message=Message(
        id="m", received="2026-12-07T00:00:00Z", author=Author(type="user", user_id="u"),
        content=TextContent(text="hi")))


@pytest.mark.parametrize(("conversation", "switchboard", "copied"), [
    (ref(None), None, False),                      # no switchboard at all: the desk has nothing here
    (ref("sw-bot"), BOT_ONLY, False),              # a bot's conversation in an app without a desk
    (ref(None), WITH_DESK, True),                  # the app has a desk: it may take any conversation
    (ref("sw-bot"), WITH_DESK, True),
    (ref("sw-desk", "desk"), BOT_ONLY, True),      # the desk controls it, though this copy lacks the member
    (ref("sw-gone"), BOT_ONLY, True),              # a controller unknown here: copied rather than missed
    (ref("sw-gone", "custom"), BOT_ONLY, False),   # a known kind that is not the desk
])
def test_messages_and_activities_go_to_the_desk_when_the_app_or_the_conversation_has_one(
        conversation: ConversationRef, switchboard: SwitchboardRecord | None, copied: bool) -> None:
    assert conv.concerns_desk(message_in(conversation), switchboard) is copied
    activity = conv.ActivityPosted(**BASE, conversation=conversation, user_id="u",
                                   activity=conv.Activity(type="typing:start", author=Author(type="user")))
    assert conv.concerns_desk(activity, switchboard) is copied


def test_privacy_control_handoffs_and_merges_go_to_the_desk_whatever_the_app() -> None:
    user, client = User(id="u"), Client(id="c", type="whatsapp", status="active")
    always = [
        conv.UserRemoved(**BASE, user=UserRef(id="u"), conversation_ids=["conv"]),
        conv.PersonalInformationDeleted(**BASE, user_id="u", conversation_ids=["conv"]),
        conv.MessagesExpired(**BASE, conversation=ref(None), before=1.0),
        conv.ConversationRemoved(**BASE, conversation=ref(None)),
        conv.SwitchboardControlled(**BASE, action="passControl", conversation=ref("sw-bot")),
        conv.UsersMerged(**BASE, surviving=user, discarded=User(id="d"), reason="channelLinking"),
        conv.ClientAdded(**BASE, user=user, client=client),
        conv.ClientUpdated(**BASE, user=user, client=client, reason="confirmed", primary=True),
    ]
    for event in always:
        assert conv.concerns_desk(event, None), type(event).__name__
    # What the desk does not follow is not sent to it, even in an app with a desk.
    never = [
        conv.ClientUpdated(**BASE, user=user, client=client, reason="blocked"),
        conv.ConversationCreated(**BASE, conversation=ref(None), user=user, creation_reason="message"),
        conv.DeliveryReported(**BASE, kind="channel", conversation=ref(None), user=UserRef(id="u"), message_id="m",
                              destination=conv.Destination(type="whatsapp")),
    ]
    for event in never:
        assert not conv.concerns_desk(event, WITH_DESK), type(event).__name__


def test_the_desk_copies_are_out_of_the_other_readers_filters_and_purged_with_their_conversation() -> None:
    copy = subjects.desk_event_subject("app", "conv")
    original = subjects.event_subject("app", "conv")
    assert copy.split(".")[-1] == original.split(".")[-1]  # the same partition
    partition = int(copy.split(".")[-1])
    assert subjects_overlap(copy, subjects.DESK_EVENTS.filter(partition))
    for reader in (subjects.WEBHOOKS_EVENTS, subjects.NOTIFICATIONS_EVENTS):
        assert not subjects_overlap(copy, reader.filter(partition))
        assert subjects_overlap(original, reader.filter(partition))
    assert not subjects_overlap(original, subjects.DESK_EVENTS.filter(partition))
    assert not subjects_overlap(copy, subjects.CONVERSATION_EVENTS_ALL)
    assert subjects_overlap(copy, subjects.conversation_desk_events("app", "conv"))
    assert not subjects_overlap(copy, subjects.conversation_desk_events("app", "other"))
