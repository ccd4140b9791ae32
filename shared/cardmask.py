"""Card numbers (PANs) masked out of message text: the app setting `maskCreditCardNumbers`.

A card number is 13 to 19 digits that pass the Luhn check, written in one piece or in groups
separated by single spaces (plain, no-break or thin), dashes or dots ("4111 1111 1111 1111",
"4111-1111-1111-1111", "4111.1111.1111.1111"). Every such
number in a text has all its digits but the last four replaced by `*`, separators kept:
"**** **** **** 1111". Digits are never masked unless they belong to one.

Which groups make the number is not always clear ("call 555 1234 4111 1111 1111 1111"): every
run of whole groups with 13 to 19 digits that passes Luhn is masked (all but its last four
digits), so a real card is never left readable next to other numbers, at the price of masking
a neighbour that happens to complete a valid number.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from shared.sunco import (
    Action,
    CarouselContent,
    Content,
    FileContent,
    FormContent,
    FormOption,
    FormResponseContent,
    ImageContent,
    Item,
    ListContent,
    LocationContent,
    TemplateContent,
    TextContent,
    UnsupportedContent,
)

MIN_DIGITS = 13
MAX_DIGITS = 19
KEEP_LAST = 4
MASK_CHAR = "*"

# Groups of ASCII digits joined by single separators; a group longer than a card is never part of one.
_TOKEN = re.compile("[0-9]+(?:[ .\\-\u00a0\u2007\u2009\u202f][0-9]+)*")
_GROUP = re.compile(r"[0-9]+")
# Cheap pre-check: a text with fewer digits than a card cannot hold one.
_DIGIT = re.compile(r"[0-9]")
_DIGITS_OR_MASK = frozenset("0123456789" + MASK_CHAR)


def luhn_valid(digits: str) -> bool:
    """The Luhn check of a string of ASCII digits."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def card_number_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every card number in `text` (end exclusive, on digit boundaries), in order.

    Spans may overlap when groups can be read as more than one number (see the module doc).
    """
    if len(_DIGIT.findall(text)) < MIN_DIGITS:
        return []
    spans: list[tuple[int, int]] = []
    for token in _TOKEN.finditer(text):
        groups = [(m.start() + token.start(), m.end() + token.start())
                  for m in _GROUP.finditer(token.group())]
        for first in range(len(groups)):
            digits = ""
            for last in range(first, len(groups)):
                start, end = groups[last]
                digits += text[start:end]
                if len(digits) > MAX_DIGITS:
                    break
                if len(digits) >= MIN_DIGITS and luhn_valid(digits):
                    spans.append((groups[first][0], end))
    return spans


def mask_card_numbers(text: str) -> str:
    """`text` with every card number's digits but its last four replaced by `*`."""
    spans = card_number_spans(text)
    if not spans:
        return text
    chars = list(text)
    for start, end in spans:
        kept = 0
        for index in range(end - 1, start - 1, -1):
            if chars[index] not in _DIGITS_OR_MASK:
                continue  # a separator
            if kept < KEEP_LAST:
                kept += 1
                continue
            chars[index] = MASK_CHAR
    return "".join(chars)


def _mask_optional(text: str | None) -> str | None:
    return None if text is None else mask_card_numbers(text)


def mask_strings(value: Any) -> Any:
    """Every string inside a JSON-like value (dicts, lists) with its card numbers masked."""
    if isinstance(value, str):
        return mask_card_numbers(value)
    if isinstance(value, list):
        return [mask_strings(item) for item in value]
    if isinstance(value, dict):
        return {key: mask_strings(item) for key, item in value.items()}
    return value


def _mask_items(items: list[Item]) -> list[Item]:
    return [msgspec.structs.replace(item, title=mask_card_numbers(item.title),
                                    description=_mask_optional(item.description),
                                    alt_text=_mask_optional(item.alt_text),
                                    actions=_mask_actions(item.actions) or []) for item in items]


def _mask_options(options: list[FormOption] | None) -> list[FormOption] | None:
    if not options:
        return options
    return [msgspec.structs.replace(option, label=mask_card_numbers(option.label)) for option in options]


def _mask_actions(actions: list[Action] | None) -> list[Action] | None:
    if not actions:
        return actions
    return [msgspec.structs.replace(action, text=mask_card_numbers(action.text)) for action in actions]


def mask_content(content: Content) -> Content:
    """The content with card numbers masked in everything a person reads (texts, alt texts,
    button labels, template parameters); URLs and payloads (the business's own ids) are left alone."""
    replace = msgspec.structs.replace
    if isinstance(content, TextContent):
        return replace(content, text=mask_card_numbers(content.text), html_text=_mask_optional(content.html_text),
                       markdown_text=_mask_optional(content.markdown_text), actions=_mask_actions(content.actions))
    if isinstance(content, ImageContent):
        return replace(content, text=_mask_optional(content.text), alt_text=_mask_optional(content.alt_text),
                       actions=_mask_actions(content.actions))
    if isinstance(content, FileContent):
        return replace(content, text=_mask_optional(content.text), alt_text=_mask_optional(content.alt_text))
    if isinstance(content, LocationContent) and content.location is not None:
        location = replace(content.location, name=_mask_optional(content.location.name),
                           address=_mask_optional(content.location.address))
        return replace(content, location=location)
    if isinstance(content, CarouselContent):
        return replace(content, text=_mask_optional(content.text), items=_mask_items(content.items))
    if isinstance(content, ListContent):
        return replace(content, items=_mask_items(content.items), actions=_mask_actions(content.actions))
    if isinstance(content, FormContent | FormResponseContent):
        fields = [replace(f, label=mask_card_numbers(f.label), placeholder=_mask_optional(f.placeholder),
                          text=_mask_optional(f.text), email=_mask_optional(f.email),
                          options=_mask_options(f.options), select=_mask_options(f.select)) for f in content.fields]
        if isinstance(content, FormResponseContent):
            return replace(content, fields=fields, text_fallback=_mask_optional(content.text_fallback))
        return replace(content, fields=fields)
    if isinstance(content, TemplateContent):
        return replace(content, template=mask_strings(content.template))
    if isinstance(content, UnsupportedContent):
        return replace(content, raw=mask_strings(content.raw))
    return content
