"""Pure decisions of the notifications service: reply windows per channel, quiet hours, bursts.

Each channel's reply window is one small class with `decide(now, last_inbound_at, settings,
notice)`; nothing here does I/O, so every rule is unit-tested with plain numbers
(tests/unit/test_notifications_policy.py).

- WhatsApp: free text within 24 h of the customer's last message, else the app's approved
  template (platform reference §1.9) — never free text outside (that fails with 131047).
- Messenger: free text within 24 h, the `HUMAN_AGENT` tag within 7 days, else no send at all
  (§2.5): a policy violation costs the Page, a skipped notification costs nothing.
- Telegram, SMS (twilio), e-mail, app push: no window.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from dataclasses import dataclass
from typing import Protocol

from shared.records import NotificationSettings, QuietHours, WhatsappTemplate

DAY = 24 * 3600.0
WHATSAPP_WINDOW_SECONDS = DAY
MESSENGER_WINDOW_SECONDS = DAY
MESSENGER_HUMAN_AGENT_SECONDS = 7 * DAY
HUMAN_AGENT = "HUMAN_AGENT"
REPLY_EXCERPT_CHARS = 300
TEMPLATE_PARAM_CHARS = 200
DEFAULT_TEMPLATE_PARAMETERS = ("text",)


# --- what to do -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Send:
    """Free-form text."""

    text: str


@dataclass(frozen=True)
class SendTemplate:
    """An approved WhatsApp template; `params` fill the body's {{1}}, {{2}}, … in order."""

    template: WhatsappTemplate
    params: tuple[str, ...]


@dataclass(frozen=True)
class SendTagged:
    """Free text declared with a Messenger message tag (outside the standard window)."""

    text: str
    tag: str


@dataclass(frozen=True)
class Skip:
    """Do not send: `code` is the failure event's error code, `reason` says why."""

    code: str
    reason: str


Decision = Send | SendTemplate | SendTagged | Skip


@dataclass(frozen=True)
class Notice:
    """What a notification says: the business, the (latest) reply, how many, the way back."""

    business: str
    reply_text: str
    unread_count: int = 1
    link: str | None = None
    code: str | None = None  # an opt-in confirmation code (template parameter `code`)

    def text(self, *, reply_here: bool = True) -> str:
        """The free-form notification text."""
        head = (f"{self.business} replied:" if self.unread_count <= 1
                else f"{self.business} sent you {self.unread_count} messages. The latest:")
        lines = [head, excerpt(self.reply_text, REPLY_EXCERPT_CHARS)]
        if reply_here and self.link:
            lines += ["", f"Reply here to continue, or open the chat: {self.link}"]
        elif reply_here:
            lines += ["", "Reply here to continue the conversation."]
        elif self.link:
            lines += ["", f"Continue the conversation: {self.link}"]
        return "\n".join(lines)


def excerpt(text: str, limit: int) -> str:
    """`text` on one paragraph, cut to `limit` characters with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def template_params(template: WhatsappTemplate, notice: Notice) -> tuple[str, ...]:
    """The body parameters of `template` for `notice`.

    WhatsApp refuses parameters with newlines, tabs or more than 4 spaces in a row (132018), and
    empty ones: every value is one trimmed line, never empty.
    """
    values = {"text": notice.reply_text, "link": notice.link or notice.business, "business": notice.business,
              "code": notice.code or ""}
    names = template.parameters if template.parameters is not None else DEFAULT_TEMPLATE_PARAMETERS
    return tuple(excerpt(values[name], TEMPLATE_PARAM_CHARS) or "-" for name in names)


# --- reply windows ----------------------------------------------------------------------------

class ReplyWindow(Protocol):
    """The rule of one channel."""

    def decide(self, now: float, last_inbound_at: float | None, settings: NotificationSettings,
               notice: Notice) -> Decision: ...


class WhatsappWindow:
    """24 h customer service window; outside it only the app's approved template."""

    window_seconds = WHATSAPP_WINDOW_SECONDS

    def decide(self, now: float, last_inbound_at: float | None, settings: NotificationSettings,
               notice: Notice) -> Decision:
        if last_inbound_at is not None and now - last_inbound_at < self.window_seconds:
            return Send(notice.text())
        template = settings.templates.whatsapp if settings.templates is not None else None
        if template is None:
            return Skip("template_not_configured",
                        "Outside WhatsApp's 24-hour window only an approved template may be sent, and the app "
                        "has no settings.notifications.templates.whatsapp")
        return SendTemplate(template, template_params(template, notice))


class MessengerWindow:
    """24 h standard window, then `HUMAN_AGENT` up to 7 days, then nothing."""

    window_seconds = MESSENGER_WINDOW_SECONDS
    human_agent_seconds = MESSENGER_HUMAN_AGENT_SECONDS

    def decide(self, now: float, last_inbound_at: float | None, settings: NotificationSettings,
               notice: Notice) -> Decision:
        if last_inbound_at is None:
            return Skip("outside_messaging_window", "The person never wrote to this Page: Messenger allows no "
                                                    "message before they do")
        elapsed = now - last_inbound_at
        if elapsed < self.window_seconds:
            return Send(notice.text())
        if elapsed < self.human_agent_seconds:
            return SendTagged(notice.text(), HUMAN_AGENT)
        return Skip("outside_messaging_window",
                    f"The person last wrote {elapsed / DAY:.1f} days ago; Messenger allows human agent replies "
                    f"(HUMAN_AGENT) for {self.human_agent_seconds / DAY:g} days only")


class NoWindow:
    """Telegram, SMS, push: any time."""

    def __init__(self, reply_here: bool = True) -> None:
        self.reply_here = reply_here

    def decide(self, now: float, last_inbound_at: float | None, settings: NotificationSettings,
               notice: Notice) -> Decision:
        return Send(notice.text(reply_here=self.reply_here))


WINDOWS: dict[str, ReplyWindow] = {
    "whatsapp": WhatsappWindow(),
    "messenger": MessengerWindow(),
    "telegram": NoWindow(),
    "twilio": NoWindow(),
    # The mail says itself how to answer: by replying when it carries a signed Reply-To.
    "email": NoWindow(reply_here=False),
    "android": NoWindow(reply_here=False),
    "ios": NoWindow(reply_here=False),
}


def window_of(channel: str) -> ReplyWindow | None:
    """The reply window of a channel, None when notifications cannot go there."""
    return WINDOWS.get(channel)


# --- quiet hours ------------------------------------------------------------------------------

def _minutes(clock: str) -> int:
    hours, minutes = clock.split(":")
    return int(hours) * 60 + int(minutes)


def quiet_until(now: float, quiet: QuietHours | None) -> float | None:
    """When the quiet hours around `now` end (unix seconds), None when `now` is not in them."""
    if quiet is None:
        return None
    try:
        zone = zoneinfo.ZoneInfo(quiet.timezone)
        start, end = _minutes(quiet.start), _minutes(quiet.end)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return None
    local = dt.datetime.fromtimestamp(now, tz=zone)
    minute = local.hour * 60 + local.minute
    inside = start <= minute < end if start < end else (minute >= start or minute < end)
    if not inside:
        return None
    end_date = local.date()
    if start > end and minute >= start:
        end_date += dt.timedelta(days=1)  # 22:00 → 07:00: the end is tomorrow morning
    naive_end = dt.datetime.combine(end_date, dt.time(end // 60, end % 60))
    return naive_end.replace(tzinfo=zone).timestamp()


# --- bursts ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pending:
    """The pending notification of a conversation (one per conversation)."""

    first_unread_at: float
    due_at: float
    unread_count: int


def schedule(existing: Pending | None, message_at: float, delay: float) -> Pending:
    """Fold one more unread business message into the conversation's pending notification.

    A burst of replies is ONE notification, due `delay` after the first unread one: later
    replies only raise the count (and become the excerpt), they never push the time back.
    """
    if existing is None:
        return Pending(first_unread_at=message_at, due_at=message_at + delay, unread_count=1)
    return Pending(first_unread_at=existing.first_unread_at, due_at=existing.due_at,
                   unread_count=existing.unread_count + 1)
