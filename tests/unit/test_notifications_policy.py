"""Reply windows, quiet hours and bursts of the notifications service (pure rules, plain numbers)."""

from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest

from services.notifications import policy
from services.notifications.handlers import is_stop, mask, optin_of_token, optout_token, whatsapp_template
from shared.records import NotificationSettings, NotificationTemplates, QuietHours, WhatsappTemplate

HOUR = 3600.0
NOW = 1_800_000_000.0
TEMPLATE = WhatsappTemplate(name="reply_waiting", language="en_US", parameters=["business", "text", "link"])
WITH_TEMPLATE = NotificationSettings(templates=NotificationTemplates(whatsapp=TEMPLATE))
NOTICE = policy.Notice(business="Acme", reply_text="Your order\nshipped   today", link="https://x.test/?c=1")


def test_whatsapp_inside_the_window_sends_free_text() -> None:
    decision = policy.WhatsappWindow().decide(NOW, NOW - 23 * HOUR, WITH_TEMPLATE, NOTICE)
    assert isinstance(decision, policy.Send)
    assert "Acme replied:" in decision.text and "Your order shipped today" in decision.text


@pytest.mark.parametrize("last", [NOW - 24 * HOUR, NOW - 30 * 24 * HOUR, None])
def test_whatsapp_outside_the_window_sends_the_template_with_one_line_parameters(last: float | None) -> None:
    decision = policy.WhatsappWindow().decide(NOW, last, WITH_TEMPLATE, NOTICE)
    assert isinstance(decision, policy.SendTemplate)
    assert decision.template == TEMPLATE
    assert decision.params == ("Acme", "Your order shipped today", "https://x.test/?c=1")
    body = whatsapp_template(decision.template, decision.params)
    assert body["name"] == "reply_waiting" and body["language"]["code"] == "en_US"
    assert [p["text"] for p in body["components"][0]["parameters"]] == list(decision.params)


def test_whatsapp_outside_the_window_without_a_template_is_skipped_never_free_text() -> None:
    decision = policy.WhatsappWindow().decide(NOW, NOW - 25 * HOUR, NotificationSettings(), NOTICE)
    assert isinstance(decision, policy.Skip) and decision.code == "template_not_configured"


def test_template_parameters_default_to_the_reply_and_are_never_empty_or_long() -> None:
    template = WhatsappTemplate(name="t")
    notice = policy.Notice(business="Acme", reply_text="x" * 1000)
    (text,) = policy.template_params(template, notice)
    assert len(text) == policy.TEMPLATE_PARAM_CHARS and text.endswith("…")
    link_only = WhatsappTemplate(name="t", parameters=["link"])
    assert policy.template_params(link_only, policy.Notice(business="Acme", reply_text="")) == ("Acme",)


@pytest.mark.parametrize(("elapsed", "expected"), [
    (2 * HOUR, policy.Send),
    (2 * 24 * HOUR, policy.SendTagged),
    (6.9 * 24 * HOUR, policy.SendTagged),
    (7 * 24 * HOUR, policy.Skip),
    (30 * 24 * HOUR, policy.Skip),
])
def test_messenger_window_then_human_agent_then_nothing(elapsed: float, expected: type) -> None:
    decision = policy.MessengerWindow().decide(NOW, NOW - elapsed, NotificationSettings(), NOTICE)
    assert isinstance(decision, expected)
    if isinstance(decision, policy.SendTagged):
        assert decision.tag == "HUMAN_AGENT"
    if isinstance(decision, policy.Skip):
        assert decision.code == "outside_messaging_window"


def test_messenger_never_written_to_is_skipped() -> None:
    assert isinstance(policy.MessengerWindow().decide(NOW, None, NotificationSettings(), NOTICE), policy.Skip)


@pytest.mark.parametrize("channel", ["telegram", "twilio", "email", "android", "ios"])
def test_channels_without_a_window_always_send(channel: str) -> None:
    window = policy.window_of(channel)
    assert window is not None
    decision = window.decide(NOW, None, NotificationSettings(), NOTICE)
    assert isinstance(decision, policy.Send) and "Acme" in decision.text
    if channel == "email":
        assert "Reply here" not in decision.text and NOTICE.link is not None and NOTICE.link in decision.text
    assert policy.window_of("web") is None


def test_a_burst_of_replies_is_one_notification_due_after_the_first() -> None:
    first = policy.schedule(None, NOW, 300)
    second = policy.schedule(first, NOW + 60, 300)
    third = policy.schedule(second, NOW + 290, 300)
    assert third == policy.Pending(first_unread_at=NOW, due_at=NOW + 300, unread_count=3)
    assert "3 messages" in policy.Notice(business="Acme", reply_text="hi", unread_count=3).text()


def _at(zone: str, year: int, month: int, day: int, hour: int, minute: int = 0) -> float:
    return dt.datetime(year, month, day, hour, minute, tzinfo=zoneinfo.ZoneInfo(zone)).timestamp()


def test_quiet_hours_over_midnight_postpone_to_the_end_in_the_apps_time_zone() -> None:
    quiet = QuietHours(start="22:00", end="07:00", timezone="Europe/Paris")
    assert policy.quiet_until(_at("Europe/Paris", 2026, 3, 10, 23, 30), quiet) == _at("Europe/Paris", 2026, 3, 11, 7)
    assert policy.quiet_until(_at("Europe/Paris", 2026, 3, 11, 6, 59), quiet) == _at("Europe/Paris", 2026, 3, 11, 7)
    assert policy.quiet_until(_at("Europe/Paris", 2026, 3, 11, 7), quiet) is None
    assert policy.quiet_until(_at("Europe/Paris", 2026, 3, 11, 12), quiet) is None
    # Same instant, other zone: 23:30 in Paris is 17:30 in New York, not quiet there.
    assert policy.quiet_until(_at("Europe/Paris", 2026, 3, 10, 23, 30),
                              QuietHours(start="22:00", end="07:00", timezone="America/New_York")) is None


def test_quiet_hours_within_a_day_and_none() -> None:
    quiet = QuietHours(start="12:00", end="14:00", timezone="UTC")
    assert policy.quiet_until(_at("UTC", 2026, 1, 5, 13), quiet) == _at("UTC", 2026, 1, 5, 14)
    assert policy.quiet_until(_at("UTC", 2026, 1, 5, 11, 59), quiet) is None
    assert policy.quiet_until(NOW, None) is None


def test_stop_words_masks_and_optout_tokens() -> None:
    assert is_stop(" Stop ") and is_stop("STOP!") and not is_stop("stop sending me the invoice")
    assert mask("twilio", "+15551234567") == "+1••••••4567"
    assert mask("email", "alice@example.com") == "a•••@example.com"
    token = optout_token("secret-0123456789abcdef", "abc123")
    assert optin_of_token("secret-0123456789abcdef", token) == "abc123"
    assert optin_of_token("another-secret-0123456789", token) is None
    assert optin_of_token("secret-0123456789abcdef", "abc124." + token.split(".")[1]) is None
