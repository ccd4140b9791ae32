"""Content as readable text, for a channel that cannot show it natively (SMS, e-mail, or a
platform limit passed), and the way back: a customer's numbered answer to the choices it offered.

Every tappable action that answers something (`reply`, `postback`) becomes a numbered line
(`1. Yes`); links, webviews and payments become `label: url`; a location request asks for an
address. `choices` lists the answerable actions in the order `fallback` numbers them, so a
customer's "2" maps back to the second one (`answered_choice`), whatever channel it came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from shared.sunco import (
    Action,
    BuyAction,
    CarouselContent,
    Content,
    FileContent,
    FormContent,
    FormResponseContent,
    ImageContent,
    Item,
    LinkAction,
    ListContent,
    LocationContent,
    LocationRequestAction,
    PostbackAction,
    ReplyAction,
    TextContent,
    WebviewAction,
)

Answerable = ReplyAction | PostbackAction
# The channels that show every choice numbered (they have no buttons): a bare number typed there
# answers the business's latest message.
NUMBERED_CHANNELS = frozenset({"twilio", "messagebird", "mailgun"})
_NUMBER = re.compile(r"^\s*#?(\d{1,2})\s*[.)]?\s*$")
LOCATION_PROMPT = "Reply with your address, or share your location."


@dataclass(frozen=True)
class Fallback:
    """What to send instead: text, media to attach (by URL), and the numbered choices offered."""

    text: str
    media_urls: list[str] = field(default_factory=list)
    choices: list[Answerable] = field(default_factory=list)


class NoFallback(ValueError):
    """The content has no text form (a WhatsApp template, an unsupported platform message)."""


def maps_link(content: LocationContent) -> str:
    """A link that opens the location in a map."""
    return f"https://maps.google.com/maps?q={content.coordinates.lat},{content.coordinates.long}"


def choices(content: Content) -> list[Answerable]:
    """The actions of `content` a customer can answer, in the order `fallback` numbers them."""
    actions: list[Action] = []
    if isinstance(content, TextContent | ImageContent):
        actions = list(content.actions or [])
    elif isinstance(content, CarouselContent):
        actions = [a for item in content.items for a in list(item.actions)]
    elif isinstance(content, ListContent):
        actions = [a for item in content.items for a in list(item.actions)] + list(content.actions or [])
    return [a for a in actions if isinstance(a, ReplyAction | PostbackAction) and a.text]


def _link_line(action: Action) -> str | None:
    # A webview's `fallback` is the page SunCo opens where a channel has no webview.
    uri = (action.fallback or action.uri) if isinstance(action, WebviewAction) else getattr(action, "uri", None)
    if isinstance(action, LinkAction | WebviewAction) and uri:
        return f"{action.text}: {uri}" if action.text else uri
    if isinstance(action, BuyAction) and action.uri:
        price = f" ({action.amount / 100:.2f} {action.currency.upper()})" if action.currency else ""
        return f"{action.text}{price}: {action.uri}"
    return None


class _Numbering:
    """Numbers answerable actions as they are written, in `choices` order."""

    def __init__(self) -> None:
        self.offered: list[Answerable] = []

    def lines(self, actions: list[Action]) -> list[str]:
        out: list[str] = []
        for action in actions:
            if isinstance(action, ReplyAction | PostbackAction) and action.text:
                self.offered.append(action)
                out.append(f"{len(self.offered)}. {action.text}")
            elif isinstance(action, LocationRequestAction):
                out.append(LOCATION_PROMPT)
            else:
                link = _link_line(action)
                if link is not None:
                    out.append(link)
        return out


def _item_block(item: Item, numbering: _Numbering) -> str:
    head = f"{item.title} — {item.description}" if item.description else item.title
    lines = [head, *([item.media_url] if item.media_url else []), *numbering.lines(list(item.actions))]
    return "\n".join(lines)


def fallback(content: Content) -> Fallback:
    """`content` as text (and media URLs); NoFallback when it has none."""
    numbering = _Numbering()
    if isinstance(content, TextContent):
        parts = [content.text.strip()] if content.text.strip() else []
        parts += ["\n".join(numbering.lines(list(content.actions or [])))] if content.actions else []
        return Fallback("\n\n".join(p for p in parts if p), [], numbering.offered)
    if isinstance(content, ImageContent):
        lines = numbering.lines(list(content.actions or []))
        text = "\n\n".join(p for p in (content.text or "", "\n".join(lines)) if p)
        return Fallback(text, [content.media_url] if content.media_url else [], numbering.offered)
    if isinstance(content, FileContent):
        return Fallback(content.text or "", [content.media_url] if content.media_url else [])
    if isinstance(content, LocationContent):
        place = [x for x in ((content.location.name, content.location.address) if content.location else ()) if x]
        return Fallback("\n".join([*place, maps_link(content)]))
    if isinstance(content, CarouselContent | ListContent):
        blocks = [content.text] if isinstance(content, CarouselContent) and content.text else []
        blocks += [_item_block(item, numbering) for item in content.items]
        if isinstance(content, ListContent) and content.actions:
            blocks.append("\n".join(numbering.lines(list(content.actions))))
        return Fallback("\n\n".join(blocks), [], numbering.offered)
    if isinstance(content, FormContent):
        lines = []
        for form_field in content.fields:
            options = f" ({', '.join(o.label for o in form_field.options)})" if form_field.options else ""
            lines.append(f"{form_field.label}{options}")
        return Fallback("Please reply with:\n" + "\n".join(lines))
    if isinstance(content, FormResponseContent):
        return Fallback(content.text_fallback or form_response_text(content))
    raise NoFallback(f"{content.__class__.__name__} has no text form")


def form_response_text(content: FormResponseContent) -> str:
    """SunCo's `textFallback` of a form response: `label: value` per field, one per line."""
    lines = []
    for answer in content.fields:
        value = answer.text or answer.email or ", ".join(o.label for o in answer.select or [])
        lines.append(f"{answer.label}: {value}")
    return "\n".join(lines)


def is_numbered_answer(answer: str) -> bool:
    """Whether a reply is a bare choice number (`2`, `2.`, `#2`): cheap to test before looking
    for what was offered."""
    return _NUMBER.match(answer) is not None


def offered_action(payload: str, offered: Content) -> Answerable | None:
    """The answerable action of `offered` whose payload a customer's tap carries (a button
    without a payload carries its label, as the channels send it)."""
    return next((a for a in choices(offered) if (a.payload or a.text) == payload), None)


def answered_choice(answer: str, offered: Content) -> Answerable | None:
    """The action a customer's reply picks among the choices `offered` showed: a bare number
    (`2`, `2.`, `#2`), or the label itself (case and spaces aside); None when it picks none."""
    candidates = choices(offered)
    if not candidates:
        return None
    number = _NUMBER.match(answer)
    if number is not None:
        index = int(number.group(1))
        return candidates[index - 1] if 1 <= index <= len(candidates) else None
    wanted = " ".join(answer.split()).casefold()
    matches = [a for a in candidates if " ".join(a.text.split()).casefold() == wanted]
    return matches[0] if len(matches) == 1 else None
